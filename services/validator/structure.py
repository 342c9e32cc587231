"""The seam between the validator and the campaign definition: persist ``campaign.defined``
payloads and the exposure-log rows already validated per (block, test, CCD), and run
``shared.campaign``'s pure ``check_structure`` on them.

Without a campaign definition for the block (or without ``shared.campaign``) the structure is
reported as not checked and no flag is raised."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from shared.flags import Flag

log = logging.getLogger("vison.validator.structure")


class ValidatorStore:
    """SQLite in the state dir: latest campaign definition per block, rows validated per test."""

    def __init__(self, path: str | Path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS campaigns (block TEXT PRIMARY KEY, definition TEXT, received_at REAL);
            CREATE TABLE IF NOT EXISTS history (block TEXT, test TEXT, ccd INTEGER, obsid INTEGER, row TEXT,
                                                PRIMARY KEY (block, test, ccd, obsid));
            """
        )
        self._db.commit()
        self._lock = threading.Lock()

    def save_campaign(self, block: str, definition: Mapping[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO campaigns VALUES (?, ?, ?)", (block, json.dumps(definition), time.time()))
            self._db.commit()

    def campaign(self, block: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT definition FROM campaigns WHERE block = ?", (block,)).fetchone()
        return None if row is None else json.loads(row[0])

    def add_rows(self, block: str, test: str, obsid: int, rows: Mapping[int, Mapping[str, Any]]) -> None:
        with self._lock:
            self._db.executemany(
                "INSERT OR REPLACE INTO history VALUES (?, ?, ?, ?, ?)",
                [(block, test, int(ccd), int(obsid), json.dumps(row, default=str)) for ccd, row in rows.items()],
            )
            self._db.commit()

    def rows(self, block: str, test: str, ccd: int, up_to_obsid: int) -> list[dict[str, Any]]:
        """Rows of one CCD of a test, in ObsID order, up to (including) ``up_to_obsid``."""
        with self._lock:
            cur = self._db.execute(
                "SELECT row FROM history WHERE block = ? AND test = ? AND ccd = ? AND obsid <= ? ORDER BY obsid",
                (block, test, int(ccd), int(up_to_obsid)),
            )
            return [json.loads(r[0]) for r in cur.fetchall()]

    def close(self) -> None:
        self._db.close()


def check_exposure_structure(
    store: ValidatorStore, block: str, test: str, obsid: int, rows: Mapping[int, Mapping[str, Any]]
) -> tuple[str, dict[str, Any], Flag]:
    """(status, tree, flags) of the structure check of one exposure.

    ``rows`` = ``{ccd: exposure-log values}``. The rows are recorded in the history first (so a
    redelivered exposure is not counted twice); the tree holds, per CCD, the script column this
    frame belongs to plus ``extra_frames`` / ``complete``; flags are this frame's."""
    store.add_rows(block, test, obsid, rows)
    definition = store.campaign(block)
    if definition is None:
        return "not checked: no campaign definition for this block", {}, Flag(0)
    try:
        from shared.campaign.config import CampaignDefinition
        from shared.campaign.structure import check_structure
    except ImportError as exc:  # pragma: no cover - campaign part absent
        return f"not checked: shared.campaign unavailable ({exc})", {}, Flag(0)
    try:
        campaign = CampaignDefinition.model_validate(definition)
    except Exception as exc:
        return f"not checked: invalid campaign definition ({exc.__class__.__name__})", {}, Flag(0)
    try:
        plan = campaign.test(test)
    except KeyError:
        tree = {"test_in_campaign": {"passed": False, "value": None, "lo": None, "hi": None}}
        return f"test {test!r} is not in the campaign of block {block}", tree, Flag.WRONGTEST
    tree: dict[str, Any] = {}
    flags = Flag(0)
    for ccd in sorted(rows):
        history = store.rows(block, test, ccd, obsid)
        result = check_structure(plan.script, history)
        column = result.column_of_frame[-1] if result.column_of_frame else None
        node: dict[str, Any] = {}
        if column is not None:
            node[f"col{column + 1:03d}"] = result.tree.get(f"col{column + 1:03d}", {})
        node["extra_frames"] = result.tree["extra_frames"]
        tree[f"CCD{ccd}"] = node
        for name in (result.frame_flags[-1] if result.frame_flags else []):
            flags |= Flag[name]
    return "checked", tree, flags
