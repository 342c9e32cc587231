"""The SQLite files services keep in the state dir (ledgers, seen-event stores, collectors):
one way to open them, durable and shareable between threads."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Literal


def open_state_db(
    path: str | Path,
    schema: str = "",
    synchronous: Literal["FULL", "NORMAL"] = "FULL",
    isolation_level: str | None = "",
) -> sqlite3.Connection:
    """Open (creating folder and tables) a SQLite database in WAL mode, usable from several
    threads (callers serialise access with their own lock), waiting up to 30 s for a lock.
    ``synchronous`` FULL survives power loss (ledgers); NORMAL is enough for caches of event ids.
    ``isolation_level`` None gives autocommit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, timeout=30, isolation_level=isolation_level)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={synchronous}")
    if schema:
        db.executescript(schema)
        db.commit()
    return db
