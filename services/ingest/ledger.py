"""The ingest ledger (SQLite in the state dir): what has been published or reported, so that a
restart neither republishes nor misses anything.

Tables: ``exposures`` (block, ObsID -> published / failed, event id), ``files`` (SHA-256 cache by
path, size and mtime), ``reported`` (failure keys already reported), ``hk_progress`` (rows of a
daily HK file already published)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from shared.statedb import open_state_db


class Ledger:
    """What ingest has published or reported (see the module docstring for the tables)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db = open_state_db(
            self.path,
            """
            CREATE TABLE IF NOT EXISTS exposures (block TEXT, obsid INTEGER, status TEXT, event_id TEXT, at REAL,
                                                  PRIMARY KEY (block, obsid));
            CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime REAL, sha256 TEXT);
            CREATE TABLE IF NOT EXISTS reported (key TEXT PRIMARY KEY, at REAL);
            CREATE TABLE IF NOT EXISTS hk_progress (path TEXT PRIMARY KEY, rows INTEGER);
            """,
        )
        self._lock = threading.Lock()
        self.writes = 0  # successful commits (ingest tells a cleared "disk full" by it)
        self._published = {(b, o) for b, o in self._db.execute("SELECT block, obsid FROM exposures WHERE status = 'published'")}

    # exposures
    def exposure_status(self, block: str, obsid: int) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT status FROM exposures WHERE block = ? AND obsid = ?", (block, obsid)).fetchone()
        return None if row is None else row[0]

    def is_published(self, block: str, obsid: int) -> bool:
        return (block, int(obsid)) in self._published

    def mark_exposure(self, block: str, obsid: int, status: str, event_id: str = "") -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO exposures VALUES (?, ?, ?, ?, ?)",
                             (block, obsid, status, event_id, time.time()))
            self._db.commit()
            self.writes += 1
            if status == "published":
                self._published.add((block, int(obsid)))

    def published_count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM exposures WHERE status = 'published'").fetchone()[0]

    # file hashes
    def cached_sha(self, path: str, size: int, mtime: float) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT size, mtime, sha256 FROM files WHERE path = ?", (path,)).fetchone()
        if row is None or row[0] != size or abs(row[1] - mtime) > 1e-6:
            return None
        return row[2]

    def store_sha(self, path: str, size: int, mtime: float, sha: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", (path, size, mtime, sha))
            self._db.commit()
            self.writes += 1

    # failures already reported
    def was_reported(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM reported WHERE key = ?", (key,)).fetchone() is not None

    def mark_reported(self, key: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO reported VALUES (?, ?)", (key, time.time()))
            self._db.commit()
            self.writes += 1

    # daily HK
    def hk_rows(self, path: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT rows FROM hk_progress WHERE path = ?", (path,)).fetchone()
        return 0 if row is None else int(row[0])

    def set_hk_rows(self, path: str, rows: int) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO hk_progress VALUES (?, ?)", (path, rows))
            self._db.commit()
            self.writes += 1

    def close(self) -> None:
        self._db.close()
