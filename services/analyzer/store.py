"""The analyzer's persistent state (SQLite, ``<state_dir>/analyzer.sqlite``, WAL; shared by the
collector and the worker processes of one host):

- ``frames``: every validated frame per (block, test run), with its file, checksum and
  exposure-log values;
- ``plans``: expected frames per (block, test run) from the campaign definition;
- ``jobs``: analysis jobs (outbox + state machine ``pending -> queued -> running -> publishing
  -> completed | failed``), keyed by a deterministic id of (block, test run, frame set), which
  is what makes enqueueing and running idempotent.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3

from shared.statedb import open_state_db
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from services.analyzer.definitions import Plan, default_plan
from services.analyzer.model import FrameMeta

ACTIVE = ("pending", "queued", "running", "publishing", "completed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS frames (
    block TEXT NOT NULL, test TEXT NOT NULL, obsid INTEGER NOT NULL, ccd INTEGER NOT NULL,
    meta TEXT NOT NULL, event_id TEXT, received_at REAL NOT NULL,
    PRIMARY KEY (block, test, obsid, ccd)
);
CREATE TABLE IF NOT EXISTS plans (
    block TEXT NOT NULL, test TEXT NOT NULL, expected INTEGER, data_from TEXT, params TEXT,
    updated_at REAL NOT NULL, PRIMARY KEY (block, test)
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY, block TEXT NOT NULL, test TEXT NOT NULL, frame_hash TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL, status TEXT NOT NULL,
    owner TEXT, attempts INTEGER NOT NULL DEFAULT 0, message TEXT NOT NULL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, error TEXT, result TEXT
);
CREATE INDEX IF NOT EXISTS jobs_run ON jobs (block, test, frame_hash);
"""


def frame_set_hash(frames: Iterable[FrameMeta]) -> str:
    """Identity of a frame set: SHA-1 of the sorted (ObsID, CCD, file name, SHA-256)."""
    items = sorted((f.obsid, f.ccd, Path(f.path).name, f.sha256 or "") for f in frames)
    return hashlib.sha1(json.dumps(items).encode()).hexdigest()[:16]


def job_id_for(block: str, test: str, frame_hash: str, generation: int = 0) -> str:
    """``<test>.<block>.<frame hash>[.g<n>]`` (deterministic)."""
    return f"{test}.{block}.{frame_hash}" + (f".g{generation}" if generation else "")


class AnalyzerStore:
    """Thread-safe SQLite access (one connection per process; ``timeout`` for the WAL lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db = open_state_db(self.path, _SCHEMA, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()

    @classmethod
    def in_state_dir(cls, state_dir: str | Path) -> "AnalyzerStore":
        return cls(Path(state_dir) / "analyzer.sqlite")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._db.execute(sql, args)

    # -------------------------------------------------------------------- frames
    def add_frames(self, block: str, test: str, frames: list[FrameMeta], event_id: str | None = None) -> int:
        """Record frames (an exposure's 3 CCDs); returns how many were new."""
        now = time.time()
        new = 0
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for f in frames:
                    cur = self._db.execute(
                        "INSERT OR IGNORE INTO frames VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (block, test, f.obsid, f.ccd, f.model_dump_json(), event_id, now),
                    )
                    new += cur.rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return new

    def frames(self, block: str, test: str) -> list[FrameMeta]:
        rows = self._exec("SELECT meta FROM frames WHERE block = ? AND test = ? ORDER BY obsid, ccd", (block, test)).fetchall()
        return [FrameMeta.model_validate_json(r["meta"]) for r in rows]

    def complete_exposures(self, block: str, test: str, ccds: int = 3) -> list[int]:
        """ObsIDs of the test run that have all their CCD frames."""
        rows = self._exec(
            "SELECT obsid FROM frames WHERE block = ? AND test = ? GROUP BY obsid HAVING COUNT(DISTINCT ccd) >= ? ORDER BY obsid",
            (block, test, ccds),
        ).fetchall()
        return [r["obsid"] for r in rows]

    def runs(self) -> list[tuple[str, str]]:
        """(block, test run) pairs that have frames."""
        return [(r["block"], r["test"]) for r in self._exec("SELECT DISTINCT block, test FROM frames").fetchall()]

    # -------------------------------------------------------------------- plans
    def set_plans(self, block: str, plans: dict[str, Plan]) -> None:
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for name, p in plans.items():
                    self._db.execute(
                        "INSERT OR REPLACE INTO plans VALUES (?, ?, ?, ?, ?, ?)",
                        (block, name, p.expected_frames, p.data_from, json.dumps(dict(p.params or {})), now),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def plans(self, block: str) -> dict[str, Plan]:
        rows = self._exec("SELECT * FROM plans WHERE block = ?", (block,)).fetchall()
        return {r["test"]: Plan(r["test"], r["expected"], r["data_from"], json.loads(r["params"] or "{}"), "campaign") for r in rows}

    def plan(self, block: str, test: str) -> Plan:
        """The campaign plan of a test run when one was received, else the catalogue default."""
        r = self._exec("SELECT * FROM plans WHERE block = ? AND test = ?", (block, test)).fetchone()
        if r is not None:
            return Plan(test, r["expected"], r["data_from"], json.loads(r["params"] or "{}"), "campaign")
        return default_plan(test)

    # -------------------------------------------------------------------- jobs
    def create_job(self, block: str, test: str, frame_hash: str, reason: str, message_for: Any, rerun_failed: bool = False) -> tuple[str, bool]:
        """Create the job of (block, test run, frame set) unless one exists. ``message_for(job_id)``
        gives the job message (JSON text) stored as the outbox. Returns ``(job_id, created)``;
        a failed job gets a new generation only when ``rerun_failed`` (an operator's close)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                rows = self._db.execute(
                    "SELECT job_id, status, generation FROM jobs WHERE block = ? AND test = ? AND frame_hash = ? ORDER BY generation DESC",
                    (block, test, frame_hash),
                ).fetchall()
                if rows and (rows[0]["status"] in ACTIVE or not rerun_failed):
                    self._db.execute("COMMIT")
                    return rows[0]["job_id"], False
                generation = rows[0]["generation"] + 1 if rows else 0
                job_id = job_id_for(block, test, frame_hash, generation)
                now = time.time()
                self._db.execute(
                    "INSERT INTO jobs (job_id, block, test, frame_hash, generation, reason, status, message, created_at, updated_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
                    (job_id, block, test, frame_hash, generation, reason, message_for(job_id), now, now),
                )
                self._db.execute("COMMIT")
                return job_id, True
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def has_job(self, block: str, test: str, reasons: tuple[str, ...] | None = None) -> bool:
        sql = "SELECT 1 FROM jobs WHERE block = ? AND test = ?"
        args: tuple = (block, test)
        if reasons:
            sql += f" AND reason IN ({','.join('?' * len(reasons))})"
            args += tuple(reasons)
        return self._exec(sql, args).fetchone() is not None

    def job(self, job_id: str) -> dict[str, Any] | None:
        r = self._exec("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return dict(r) if r is not None else None

    def jobs(self, block: str | None = None, test: str | None = None, status: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        for col, value in (("block", block), ("test", test), ("status", status)):
            if value is not None:
                sql += f" AND {col} = ?"
                args.append(value)
        return [dict(r) for r in self._exec(sql + " ORDER BY created_at", tuple(args)).fetchall()]

    def set_status(self, job_id: str, status: str, *, error: str | None = None, result: Any = None, owner: str | None = None) -> None:
        self._exec(
            "UPDATE jobs SET status = ?, updated_at = ?, error = COALESCE(?, error), result = COALESCE(?, result),"
            " owner = COALESCE(?, owner) WHERE job_id = ?",
            (status, time.time(), error, json.dumps(result) if result is not None else None, owner, job_id),
        )

    def mark_queued(self, job_id: str) -> bool:
        """``pending -> queued`` once the job message is on the broker (never overwrites a job a
        worker already claimed: the worker can be faster than this update)."""
        cur = self._exec("UPDATE jobs SET status = 'queued', updated_at = ? WHERE job_id = ? AND status = 'pending'",
                         (time.time(), job_id))
        return cur.rowcount == 1

    def claim(self, job_id: str, owner: str, takeover: bool, message: str | None = None) -> tuple[bool, str]:
        """Take a job for running. A job already running / publishing is taken over only when
        ``takeover`` (a redelivered message: its previous worker died). Returns (claimed, status
        before); an unknown job (store reset) is inserted from ``message``."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                r = self._db.execute("SELECT status FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
                if r is None and message is not None:
                    doc = json.loads(message)
                    now = time.time()
                    self._db.execute(
                        "INSERT INTO jobs (job_id, block, test, frame_hash, generation, reason, status, message, created_at, updated_at)"
                        " VALUES (?, ?, ?, ?, 0, ?, 'queued', ?, ?, ?)",
                        (job_id, doc.get("block", ""), doc.get("test", ""), doc.get("frame_hash", ""), doc.get("reason", ""), message, now, now),
                    )
                    before = "queued"
                elif r is None:
                    self._db.execute("COMMIT")
                    return False, "unknown"
                else:
                    before = r["status"]
                ok = before in ("pending", "queued") or (takeover and before in ("running", "publishing"))
                if ok:
                    self._db.execute(
                        "UPDATE jobs SET status = 'running', owner = ?, attempts = attempts + 1, updated_at = ? WHERE job_id = ?",
                        (owner, time.time(), job_id),
                    )
                self._db.execute("COMMIT")
                return ok, before
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def begin_publish(self, job_id: str, owner: str) -> bool:
        """Atomically move a job this worker runs to ``publishing`` (only one worker wins)."""
        cur = self._exec(
            "UPDATE jobs SET status = 'publishing', updated_at = ? WHERE job_id = ? AND status = 'running' AND owner = ?",
            (time.time(), job_id, owner),
        )
        return cur.rowcount == 1

    def attempts(self, job_id: str) -> int:
        r = self._exec("SELECT attempts FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return int(r["attempts"]) if r else 0

    def release(self, job_id: str, owner: str) -> None:
        """Give a job back (graceful stop mid-analysis): queued again, the attempt not counted."""
        self._exec(
            "UPDATE jobs SET status = 'queued', attempts = MAX(attempts - 1, 0), updated_at = ? WHERE job_id = ? AND owner = ?"
            " AND status = 'running'",
            (time.time(), job_id, owner),
        )
