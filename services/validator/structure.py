"""The seam between the validator and the campaign definition: persist ``campaign.defined``
payloads and the exposure-log rows already validated per (block, test, CCD), and run
``shared.campaign``'s pure ``check_structure`` on them.

Without a campaign definition for the block (or without ``shared.campaign``) the structure is
reported as not checked and no flag is raised."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from shared.flags import Flag
from shared.statedb import open_state_db

log = logging.getLogger("vison.validator.structure")


class ValidatorStore:
    """SQLite in the state dir: latest campaign definition per block, rows validated per test."""

    def __init__(self, path: str | Path):
        self._db = open_state_db(
            path,
            """
            CREATE TABLE IF NOT EXISTS campaigns (block TEXT PRIMARY KEY, definition TEXT, received_at REAL);
            CREATE TABLE IF NOT EXISTS history (block TEXT, test TEXT, ccd INTEGER, obsid INTEGER, row TEXT,
                                                PRIMARY KEY (block, test, ccd, obsid));
            CREATE TABLE IF NOT EXISTS current_test (block TEXT PRIMARY KEY, test TEXT, obsid INTEGER);
            """,
        )
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

    def switch_test(self, block: str, test: str, obsid: int) -> str | None:
        """Record that ``test`` is running on ``block`` (as of ``obsid``); return the test that ran
        before when this exposure starts another one (None otherwise, and for an older ObsID
        arriving late)."""
        with self._lock:
            row = self._db.execute("SELECT test, obsid FROM current_test WHERE block = ?", (block,)).fetchone()
            if row is not None and int(obsid) < int(row[1]):
                return None
            self._db.execute("INSERT OR REPLACE INTO current_test VALUES (?, ?, ?)", (block, test, int(obsid)))
            self._db.commit()
        return row[0] if row is not None and row[0] != test else None

    def ccds(self, block: str, test: str) -> list[int]:
        """CCDs with rows recorded for a test."""
        with self._lock:
            cur = self._db.execute("SELECT DISTINCT ccd FROM history WHERE block = ? AND test = ? ORDER BY ccd", (block, test))
            return [int(r[0]) for r in cur.fetchall()]

    def close(self) -> None:
        self._db.close()


def _plan(store: ValidatorStore, block: str, test: str) -> tuple[Any, str]:
    """(test plan, status) for a test of the block's campaign; plan None when not checkable."""
    definition = store.campaign(block)
    if definition is None:
        return None, "not checked: no campaign definition for this block"
    try:
        from shared.campaign.config import CampaignDefinition
    except ImportError as exc:  # pragma: no cover - campaign part absent
        return None, f"not checked: shared.campaign unavailable ({exc})"
    try:
        campaign = CampaignDefinition.model_validate(definition)
    except Exception as exc:
        return None, f"not checked: invalid campaign definition ({exc.__class__.__name__})"
    try:
        return campaign.test(test), "checked"
    except KeyError:
        return None, f"test {test!r} is not in the campaign of block {block}"


def finish_test_structure(store: ValidatorStore, block: str, test: str) -> dict[str, Any]:
    """The structure verdict of a test that is over: every recorded row of each CCD checked with
    ``finished=True`` (missing frames -> ended early, MISSDATA). Returns the fields of a
    :class:`shared.events.TestStructureChecked` event (without reason / ids)."""
    from shared.campaign.structure import check_structure

    plan, status = _plan(store, block, test)
    ccds = store.ccds(block, test)
    seen = {f"CCD{ccd}": len(store.rows(block, test, ccd, 2**62)) for ccd in ccds}
    if plan is None:
        return dict(test=test, block=block, passed=True, ended_early=False, frames_seen=seen, status=status)
    tree: dict[str, Any] = {}
    extra: dict[str, int] = {}
    flags = Flag(0)
    ended_early = False
    for ccd in ccds or [1, 2, 3]:
        result = check_structure(plan.script, store.rows(block, test, ccd, 2**62), finished=True)
        tree[f"CCD{ccd}"] = result.tree
        extra[f"CCD{ccd}"] = result.extra_frames
        ended_early |= result.ended_early
        flags |= Flag(result.flag_value)
    return dict(
        test=test, block=block, passed=not flags, ended_early=ended_early,
        frames_expected=plan.script.total_frames, frames_seen=seen, extra_frames=extra,
        compliance=tree, flags=int(flags), flag_names=[f.name for f in Flag if flags & f], status=status,
    )


def check_exposure_structure(
    store: ValidatorStore, block: str, test: str, obsid: int, rows: Mapping[int, Mapping[str, Any]]
) -> tuple[str, dict[str, Any], Flag]:
    """(status, tree, flags) of the structure check of one exposure.

    ``rows`` = ``{ccd: exposure-log values}``. The rows are recorded in the history first (so a
    redelivered exposure is not counted twice); the tree holds, per CCD, the script column this
    frame belongs to plus ``extra_frames`` / ``complete``; flags are this frame's."""
    store.add_rows(block, test, obsid, rows)
    plan, status = _plan(store, block, test)
    if plan is None:
        if status.startswith("test "):
            tree = {"test_in_campaign": {"passed": False, "value": None, "lo": None, "hi": None}}
            return status, tree, Flag.WRONGTEST
        return status, {}, Flag(0)
    from shared.campaign.structure import check_structure

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
