"""The metatest service's durable state (SQLite in ``VISON_STATE_DIR``): the latest completed
result per (block, test, repeat), the families waiting for a recomputation, and the ids of the
``metatest.completed`` events already published."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path

from services.metatest.aggregate import ResultRecord
from shared.statedb import open_state_db

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    block TEXT NOT NULL, test TEXT NOT NULL, repeat INTEGER NOT NULL,
    event_id TEXT NOT NULL, produced_at TEXT NOT NULL, results TEXT NOT NULL, products TEXT NOT NULL,
    received_at REAL NOT NULL,
    PRIMARY KEY (block, test, repeat)
);
CREATE TABLE IF NOT EXISTS due (family TEXT PRIMARY KEY, since REAL NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS published (event_id TEXT PRIMARY KEY, family TEXT NOT NULL, at REAL NOT NULL);
"""


class MetatestStore:
    """Thread-safe; every write is committed (synchronous FULL) before it returns."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db = open_state_db(self.path, SCHEMA, "FULL")
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- results
    def put(self, rec: ResultRecord) -> str:
        """Keep ``rec`` if it is newer (``produced_at``) than the stored result of its (block, test,
        repeat). Returns ``"new"`` (stored), ``"same"`` (that very result is already stored) or
        ``"older"`` (not the latest: ignored)."""
        with self._lock:
            row = self._db.execute("SELECT event_id, produced_at FROM results WHERE block=? AND test=? AND repeat=?",
                                   (rec.block, rec.test, rec.repeat)).fetchone()
            if row is not None:
                if row[0] == rec.event_id:
                    return "same"
                if datetime.fromisoformat(row[1]) >= rec.produced_at:
                    return "older"
            self._db.execute(
                "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (rec.block, rec.test, rec.repeat, rec.event_id, rec.produced_at.isoformat(),
                 json.dumps(rec.results, allow_nan=True), json.dumps(rec.products), time.time()))
            self._db.commit()
            return "new"

    def records(self) -> list[ResultRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT block, test, repeat, event_id, produced_at, results, products FROM results").fetchall()
        return [ResultRecord(b, t, r, e, datetime.fromisoformat(p), json.loads(res), json.loads(prod))
                for b, t, r, e, p, res, prod in rows]

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0]

    # -- families to recompute
    def mark_dirty(self, families: list[str]) -> None:
        """Mark families due (``since``: the first mark, for batching; ``seq`` counts the marks)."""
        with self._lock:
            now = time.time()
            self._db.executemany("INSERT INTO due VALUES (?, ?, 1) ON CONFLICT(family) DO UPDATE SET seq = seq + 1",
                                 [(f, now) for f in families])
            self._db.commit()

    def due(self, older_than: float = 0.0) -> dict[str, int]:
        """``family -> seq`` of the families first marked at least ``older_than`` s ago."""
        with self._lock:
            rows = self._db.execute("SELECT family, seq FROM due WHERE since <= ? ORDER BY since, family",
                                    (time.time() - older_than,)).fetchall()
        return {f: seq for f, seq in rows}

    def dirty(self, older_than: float = 0.0) -> list[str]:
        return list(self.due(older_than))

    def clear_dirty(self, family: str, seq: int | None = None) -> bool:
        """Clear a family's mark, unless it was marked again since ``seq`` was read (then it stays
        due: an input arrived during the recomputation). True when cleared."""
        with self._lock:
            if seq is None:
                cur = self._db.execute("DELETE FROM due WHERE family = ?", (family,))
            else:
                cur = self._db.execute("DELETE FROM due WHERE family = ? AND seq = ?", (family, seq))
            self._db.commit()
            return cur.rowcount > 0

    # -- published events
    def was_published(self, event_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM published WHERE event_id = ?", (event_id,)).fetchone() is not None

    def mark_published(self, event_id: str, family: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO published VALUES (?, ?, ?)", (event_id, family, time.time()))
            self._db.commit()

    def published_count(self, family: str | None = None) -> int:
        with self._lock:
            if family is None:
                return self._db.execute("SELECT COUNT(*) FROM published").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM published WHERE family = ?", (family,)).fetchone()[0]


__all__ = ["MetatestStore"]
