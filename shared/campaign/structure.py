"""The structure check (pure): do the exposure-log rows of one CCD follow a test's script?

Frames are consumed column by column in acquisition order. Every exposure-log value whose key is
also a script key is compared with the column's value (numbers with a relative tolerance, strings
exactly; the log's ``IPHI`` against the string composed from IPHI1..4; 7.5.X spellings
``v_tp_mod``/``s_tp_mod``/``motr`` map to ``v_tpmod``/``s_tpmod``/``motr_on``); waived keys are
skipped. Frames beyond the script are "extra"; a finished test with fewer frames "ended early".

Compliance tree (leaves ``{passed, value, lo, hi}``)::

    {"col001": {"frames": leaf, "<key>": leaf, ...}, ..., "extra_frames": leaf, "complete": leaf}

Flags: MISSDATA (ended early or extra frames), WRONG_ROE_CONF (a register differs), WRONGSOURCE
(source / wave / mirror / shutter / exposure time differ), WRONGTEST (the ``test`` register differs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, Field

from shared.campaign.keys import EXPLOG_ALIASES, IPHI_KEYS, SCRIPT_KEYS, STRING_KEYS, Value, iphi_string
from shared.campaign.script import Script
from shared.flags import Flag

RTOL = 0.005
_SCRIPT_KEYS = frozenset(SCRIPT_KEYS) - {"frames"}
SOURCE_KEYS = frozenset({"source", "wave", "mirr_on", "mirr_pos", "shuttr", "e_shuttr", "exptime",
                         "motr_on", "motr_cnt", "motr_siz"})


class Mismatch(BaseModel):
    """One exposure-log value that differs from the script."""

    frame: int = Field(description="0-based index of the row among the rows checked")
    column: int = Field(description="0-based script column")
    key: str
    value: Any
    expected: Value


class StructureResult(BaseModel):
    """Outcome of ``check_structure`` for one CCD."""

    test: str
    passed: bool
    frames_seen: int
    frames_expected: int
    frames_per_column: list[int] = Field(description="frames seen per column")
    extra_frames: int
    ended_early: bool
    column_of_frame: list[int | None] = Field(description="script column of each row (None = extra)")
    frame_flags: list[list[str]] = Field(description="flag names per row")
    mismatches: list[Mismatch]
    tree: dict[str, Any]
    flags: list[str] = Field(description="flag names of the whole check")

    @property
    def flag_value(self) -> int:
        value = 0
        for name in self.flags:
            value |= Flag[name].value
        return value


def leaf(passed: bool, value: Any, lo: Any, hi: Any) -> dict[str, Any]:
    """A compliance leaf."""
    return {"passed": bool(passed), "value": value, "lo": lo, "hi": hi}


def _as_number(value: Any) -> float:
    if value is None or (isinstance(value, str) and not value.strip()):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def compare_value(key: str, value: Any, expected: Value, rtol: float = RTOL) -> tuple[bool, Any, Any, Any]:
    """(passed, value, lo, hi) of one logged value against the expected register value."""
    if key in STRING_KEYS or isinstance(expected, str):
        got = "" if value is None else str(value).strip()
        return got == str(expected), got, str(expected), str(expected)
    number = _as_number(value)
    tol = abs(float(expected)) * rtol
    lo, hi = float(expected) - tol, float(expected) + tol
    ok = not math.isnan(number) and lo - 1e-9 <= number <= hi + 1e-9
    return ok, number, lo, hi


def _row_items(row: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    """(script key, logged value) pairs of an exposure-log row."""
    for key, value in row.items():
        key = EXPLOG_ALIASES.get(key, key)
        if key in _SCRIPT_KEYS or key == "IPHI":
            yield key, value


def explog_values(values: Mapping[str, Value]) -> dict[str, Value]:
    """The 7.5.X exposure-log columns a frame of this script column should carry (script keys
    present in the log, ``IPHI`` composed, ``v_tp_mod``/``s_tp_mod``/``motr`` renamed); what a
    simulator writes so that the structure check passes."""
    from shared.refdata import elvis_formats

    columns = elvis_formats()["explog_columns"]["7.5.X"]
    out: dict[str, Value] = {}
    for col in columns:
        key = EXPLOG_ALIASES.get(col, col)
        if col == "IPHI":
            out[col] = iphi_string(values)
        elif key in values:
            out[col] = values[key]
    return out


def _flag_of(key: str) -> Flag:
    if key == "test":
        return Flag.WRONGTEST
    if key in SOURCE_KEYS:
        return Flag.WRONGSOURCE
    return Flag.WRONG_ROE_CONF


def check_structure(
    script: Script | Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    finished: bool = False,
    waived: Iterable[str] = (),
    rtol: float = RTOL,
) -> StructureResult:
    """Check the exposure-log ``rows`` of one CCD (acquisition order, all rows of the test seen so
    far) against ``script``. ``finished``: the test is declared over (missing frames -> MISSDATA).
    ``waived`` adds to ``script.waived_keys``. ``script`` may also be a TestPlan (its ``.script``
    is used). Pure: no I/O."""
    if not isinstance(script, Script) and isinstance(getattr(script, "script", None), Script):
        script = script.script
    skip = set(script.waived_keys) | set(waived)
    ncols = len(script.columns)
    seen = [0] * ncols
    column_of: list[int | None] = []
    frame_flags: list[list[str]] = []
    mismatches: list[Mismatch] = []
    # per column and key: (passed so far, value shown, lo, hi)
    key_leaves: list[dict[str, dict[str, Any]]] = [{} for _ in range(ncols)]

    for i, row in enumerate(rows):
        k = script.column_of_frame(i)
        column_of.append(k)
        if k is None:
            frame_flags.append([Flag.MISSDATA.name])
            continue
        seen[k] += 1
        expected = script.columns[k].values
        flags = Flag(0)
        for key, value in _row_items(row):
            if key in skip:
                continue
            if key == "IPHI":
                if any(x in skip for x in IPHI_KEYS):
                    continue
                exp: Value = iphi_string(expected)
            else:
                exp = expected[key]
            ok, got, lo, hi = compare_value(key, value, exp, rtol)
            prev = key_leaves[k].get(key)
            if prev is None or (prev["passed"] and not ok):
                key_leaves[k][key] = leaf(ok, got, lo, hi)
            if not ok:
                flags |= _flag_of(key)
                mismatches.append(Mismatch(frame=i, column=k, key=key, value=got, expected=exp))
        frame_flags.append([f.name for f in Flag if flags & f])

    total_seen = len(rows)
    extra = max(0, total_seen - script.total_frames)
    ended_early = finished and total_seen < script.total_frames
    last_started = max((j for j in range(ncols) if seen[j]), default=-1)

    tree: dict[str, Any] = {}
    for j, col in enumerate(script.columns):
        settled = finished or j < last_started
        lo = col.frames if settled else 0
        node = {"frames": leaf(lo <= seen[j] <= col.frames, seen[j], lo, col.frames)}
        node.update(key_leaves[j])
        tree[f"col{j + 1:03d}"] = node
    tree["extra_frames"] = leaf(extra == 0, extra, 0, 0)
    tree["complete"] = leaf(not ended_early, total_seen, script.total_frames if finished else 0, script.total_frames)

    flags = Flag(0)
    if ended_early or extra:
        flags |= Flag.MISSDATA
    for ff in frame_flags:
        for name in ff:
            flags |= Flag[name]
    passed = not flags and all(n["frames"]["passed"] for key, n in tree.items() if key.startswith("col"))
    return StructureResult(
        test=script.test, passed=passed, frames_seen=total_seen, frames_expected=script.total_frames,
        frames_per_column=seen, extra_frames=extra, ended_early=ended_early, column_of_frame=column_of,
        frame_flags=frame_flags, mismatches=mismatches, tree=tree, flags=[f.name for f in Flag if flags & f],
    )
