"""The coordinator's persistent state (SQLite ``<state_dir>/analyzer.sqlite``, WAL; only the
coordinator process opens it):

- ``frames``: every validated frame per (block, test run), with its file, checksum and
  exposure-log values;
- ``plans``: expected exposures per (block, test run) from the campaign definition;
- ``units``: extraction units per (block, test run, family): ``pending -> queued -> done |
  failed`` with the job message (outbox) and the extraction reference;
- ``solves``: solve jobs (outbox + ``pending -> queued -> completed | failed``), their event id
  and what they supersede;
- ``runs``: per (block, test run, family): closed by an operator, waiting for needs (which,
  since when), the current solve;
- ``calibrations``: what completed analyses provide (per block, name, providing test run).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from services.analyzer.definitions import Plan, default_plan
from services.analyzer.family import Calibration
from services.analyzer.model import FrameMeta
from shared.statedb import open_state_db

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
CREATE TABLE IF NOT EXISTS units (
    block TEXT NOT NULL, test TEXT NOT NULL, family TEXT NOT NULL, unit TEXT NOT NULL,
    job_id TEXT NOT NULL, status TEXT NOT NULL, message TEXT NOT NULL, ref TEXT, error TEXT,
    seconds REAL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (block, test, family, unit)
);
CREATE INDEX IF NOT EXISTS units_job ON units (job_id);
CREATE TABLE IF NOT EXISTS solves (
    job_id TEXT PRIMARY KEY, block TEXT NOT NULL, test TEXT NOT NULL, family TEXT NOT NULL,
    status TEXT NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL, event_id TEXT NOT NULL,
    reanalysis_of TEXT, published INTEGER NOT NULL DEFAULT 0, error TEXT, seconds REAL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    block TEXT NOT NULL, test TEXT NOT NULL, family TEXT NOT NULL, closed INTEGER NOT NULL DEFAULT 0,
    waiting TEXT, waiting_since REAL, solve_id TEXT, updated_at REAL NOT NULL,
    PRIMARY KEY (block, test, family)
);
CREATE TABLE IF NOT EXISTS calibrations (
    block TEXT NOT NULL, name TEXT NOT NULL, test TEXT NOT NULL, record TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (block, name, test)
);
"""


class AnalyzerStore:
    """Thread-safe SQLite access (one connection, a lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db = open_state_db(self.path, _SCHEMA, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self.lock = threading.RLock()

    @classmethod
    def in_state_dir(cls, state_dir: str | Path) -> "AnalyzerStore":
        return cls(Path(state_dir) / "analyzer.sqlite")

    def close(self) -> None:
        with self.lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self.lock:
            return self._db.execute(sql, args)

    def _all(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        return [dict(r) for r in self._exec(sql, args).fetchall()]

    # -------------------------------------------------------------------- frames
    def add_frames(self, block: str, test: str, frames: list[FrameMeta], event_id: str | None = None) -> int:
        """Record frames (an exposure's CCDs); returns how many were new."""
        now, new = time.time(), 0
        with self.lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for f in frames:
                    cur = self._db.execute("INSERT OR IGNORE INTO frames VALUES (?, ?, ?, ?, ?, ?, ?)",
                                           (block, test, f.obsid, f.ccd, f.model_dump_json(), event_id, now))
                    new += cur.rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return new

    def frames(self, block: str, test: str) -> list[FrameMeta]:
        rows = self._exec("SELECT meta FROM frames WHERE block = ? AND test = ? ORDER BY obsid, ccd", (block, test)).fetchall()
        return [FrameMeta.model_validate_json(r["meta"]) for r in rows]

    def last_frame_at(self, block: str, test: str) -> float | None:
        r = self._exec("SELECT MAX(received_at) AS t FROM frames WHERE block = ? AND test = ?", (block, test)).fetchone()
        return r["t"] if r else None

    def complete_exposures(self, block: str, test: str, ccds: int = 3) -> list[int]:
        """ObsIDs of the test run that have all their CCD frames."""
        rows = self._exec("SELECT obsid FROM frames WHERE block = ? AND test = ? GROUP BY obsid "
                          "HAVING COUNT(DISTINCT ccd) >= ? ORDER BY obsid", (block, test, ccds)).fetchall()
        return [r["obsid"] for r in rows]

    def exposure_count(self, block: str, test: str) -> int:
        r = self._exec("SELECT COUNT(DISTINCT obsid) AS n FROM frames WHERE block = ? AND test = ?", (block, test)).fetchone()
        return int(r["n"] or 0)

    def frame_runs(self) -> list[tuple[str, str]]:
        """(block, test run) pairs that have frames."""
        return [(r["block"], r["test"]) for r in self._exec("SELECT DISTINCT block, test FROM frames ORDER BY block, test")]

    # -------------------------------------------------------------------- plans
    def set_plans(self, block: str, plans: dict[str, Plan]) -> None:
        now = time.time()
        with self.lock:
            for name, p in plans.items():
                self._db.execute("INSERT OR REPLACE INTO plans VALUES (?, ?, ?, ?, ?, ?)",
                                 (block, name, p.expected_frames, p.data_from, json.dumps(dict(p.params or {})), now))

    def plans(self, block: str) -> dict[str, Plan]:
        rows = self._all("SELECT * FROM plans WHERE block = ?", (block,))
        return {r["test"]: Plan(r["test"], r["expected"], r["data_from"], json.loads(r["params"] or "{}"), "campaign") for r in rows}

    def plan(self, block: str, test: str) -> Plan:
        """The campaign plan of a test run when one was received, else the catalogue default."""
        r = self._exec("SELECT * FROM plans WHERE block = ? AND test = ?", (block, test)).fetchone()
        if r is not None:
            return Plan(test, r["expected"], r["data_from"], json.loads(r["params"] or "{}"), "campaign")
        return default_plan(test)

    # -------------------------------------------------------------------- units
    def unit(self, block: str, test: str, family: str, unit: str) -> dict[str, Any] | None:
        r = self._exec("SELECT * FROM units WHERE block = ? AND test = ? AND family = ? AND unit = ?", (block, test, family, unit)).fetchone()
        return dict(r) if r else None

    def units(self, block: str, test: str, family: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM units WHERE block = ? AND test = ?", (block, test)
        if family:
            sql, args = sql + " AND family = ?", args + (family,)
        return self._all(sql + " ORDER BY unit", args)

    def put_unit(self, block: str, test: str, family: str, unit: str, job_id: str, message: str) -> bool:
        """Record a unit's job (``pending``) unless the same job is recorded; True when new."""
        now = time.time()
        with self.lock:
            r = self._db.execute("SELECT job_id FROM units WHERE block = ? AND test = ? AND family = ? AND unit = ?",
                                 (block, test, family, unit)).fetchone()
            if r is not None and r["job_id"] == job_id:
                return False
            self._db.execute("INSERT OR REPLACE INTO units VALUES (?, ?, ?, ?, ?, 'pending', ?, NULL, NULL, NULL, ?, ?)",
                             (block, test, family, unit, job_id, message, now, now))
            return True

    def unit_by_job(self, job_id: str) -> dict[str, Any] | None:
        r = self._exec("SELECT * FROM units WHERE job_id = ?", (job_id,)).fetchone()
        return dict(r) if r else None

    def set_unit(self, job_id: str, status: str, ref: Any = None, error: str | None = None, seconds: float | None = None) -> int:
        cur = self._exec("UPDATE units SET status = ?, ref = COALESCE(?, ref), error = ?, seconds = COALESCE(?, seconds), "
                         "updated_at = ? WHERE job_id = ?",
                         (status, json.dumps(ref) if ref is not None else None, error, seconds, time.time(), job_id))
        return cur.rowcount

    def mark_unit_queued(self, job_id: str) -> None:
        self._exec("UPDATE units SET status = 'queued', updated_at = ? WHERE job_id = ? AND status = 'pending'", (time.time(), job_id))

    def pending_messages(self) -> list[tuple[str, str, str]]:
        """(kind, job id, message) of the jobs recorded but maybe never sent (crash before send)."""
        out = [("extract", r["job_id"], r["message"]) for r in self._all("SELECT job_id, message FROM units WHERE status = 'pending'")]
        out += [("solve", r["job_id"], r["message"]) for r in self._all("SELECT job_id, message FROM solves WHERE status = 'pending'")]
        return out

    # -------------------------------------------------------------------- solves
    def solve(self, job_id: str) -> dict[str, Any] | None:
        r = self._exec("SELECT * FROM solves WHERE job_id = ?", (job_id,)).fetchone()
        return dict(r) if r else None

    def solves(self, block: str | None = None, test: str | None = None, family: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM solves WHERE 1=1", []
        for col, value in (("block", block), ("test", test), ("family", family)):
            if value is not None:
                sql += f" AND {col} = ?"
                args.append(value)
        return self._all(sql + " ORDER BY created_at, rowid", tuple(args))

    def put_solve(self, job_id: str, block: str, test: str, family: str, reason: str, message: str, event_id: str,
                  reanalysis_of: str | None) -> bool:
        now = time.time()
        with self.lock:
            cur = self._db.execute("INSERT OR IGNORE INTO solves (job_id, block, test, family, status, reason, message, event_id, "
                                   "reanalysis_of, created_at, updated_at) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
                                   (job_id, block, test, family, reason, message, event_id, reanalysis_of, now, now))
            return cur.rowcount == 1

    def set_solve(self, job_id: str, status: str, error: str | None = None, seconds: float | None = None) -> None:
        self._exec("UPDATE solves SET status = ?, error = ?, seconds = COALESCE(?, seconds), updated_at = ? WHERE job_id = ?",
                   (status, error, seconds, time.time(), job_id))

    def mark_solve_queued(self, job_id: str) -> None:
        self._exec("UPDATE solves SET status = 'queued', updated_at = ? WHERE job_id = ? AND status = 'pending'", (time.time(), job_id))

    def mark_published(self, job_id: str) -> None:
        self._exec("UPDATE solves SET published = 1, updated_at = ? WHERE job_id = ?", (time.time(), job_id))

    # -------------------------------------------------------------------- runs
    def run(self, block: str, test: str, family: str) -> dict[str, Any]:
        r = self._exec("SELECT * FROM runs WHERE block = ? AND test = ? AND family = ?", (block, test, family)).fetchone()
        if r is None:
            return {"block": block, "test": test, "family": family, "closed": 0, "waiting": None, "waiting_since": None,
                    "solve_id": None}
        return dict(r)

    def runs(self) -> list[dict[str, Any]]:
        return self._all("SELECT * FROM runs ORDER BY block, test, family")

    def update_run(self, block: str, test: str, family: str, **values: Any) -> None:
        row = self.run(block, test, family)
        row.update(values)
        if isinstance(row.get("waiting"), (list, dict)):
            row["waiting"] = json.dumps(row["waiting"])
        self._exec("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                   (block, test, family, int(row.get("closed") or 0), row.get("waiting"), row.get("waiting_since"),
                    row.get("solve_id"), time.time()))

    # -------------------------------------------------------------------- calibrations
    def add_calibration(self, cal: Calibration) -> None:
        self._exec("INSERT OR REPLACE INTO calibrations VALUES (?, ?, ?, ?, ?)",
                   (cal.block, cal.name, cal.test, cal.model_dump_json(), time.time()))

    def calibrations(self, block: str, name: str | None = None) -> list[Calibration]:
        sql, args = "SELECT record FROM calibrations WHERE block = ?", (block,)
        if name:
            sql, args = sql + " AND name = ?", args + (name,)
        return [Calibration.model_validate_json(r["record"]) for r in self._exec(sql + " ORDER BY updated_at", args).fetchall()]
