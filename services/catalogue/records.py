"""Events -> catalogue rows (pure: no database). One function per event kind, each returning
plain dicts keyed by the column names of :mod:`services.catalogue.models`.

Units come from the result key's suffix (``_adu`` ADU, ``_e`` e-, ``_adu_s`` ADU/s, ``_e_s``
e-/s, ``_s`` s, ``_v`` V, ``_px`` px, ``_mm`` mm, ``_pct`` %, ...); ``<key>_err`` is the error of
``<key>`` (stored with it, not as a quantity of its own). Only numbers (and nulls) are stored:
lists such as ``bad_columns`` stay in ``results.json``.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any

from services.catalogue.fpa import fpa_blocks, fpa_cell
from shared.events import AnalysisCompleted, ExposureValidated, MetatestCompleted
from shared.refdata import fpa_layout

#: key suffix -> unit, longest first
SUFFIX_UNITS: list[tuple[str, str]] = [
    ("_adu_s", "ADU/s"), ("_e_s", "e-/s"), ("_adu", "ADU"), ("_e", "e-"), ("_pct", "%"), ("_ms", "ms"),
    ("_s", "s"), ("_v", "V"), ("_px", "px"), ("_mm", "mm"), ("_um", "um"), ("_nm", "nm"), ("_k", "K"),
]
#: whole keys / prefixes whose unit the suffix does not tell
KEY_UNITS: dict[str, str] = {"gain": "e-/ADU", "a00": "1/e-"}
PREFIX_UNITS: list[tuple[str, str]] = [("offset_", "ADU"), ("n_", "count")]
QUADRANTS = ("E", "F", "G", "H")
_CCD = re.compile(r"^CCD[1-3]$")


class RecordError(ValueError):
    """An event whose content cannot be catalogued (the reason names the field)."""


def unit_of(key: str) -> str:
    """The unit of a result key from its name ('' when unknown)."""
    k = key.lower()
    if k in KEY_UNITS:
        return KEY_UNITS[k]
    for suffix, unit in SUFFIX_UNITS:
        if k.endswith(suffix):
            return unit
    for prefix, unit in PREFIX_UNITS:
        if k.startswith(prefix):
            return unit
    return ""


def utc(value: datetime | None) -> datetime:
    """A UTC-aware time (naive values are taken as UTC); now when None."""
    if value is None:
        return datetime.now(timezone.utc)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _number(value: Any) -> float | None | bool:
    """A storable float, None for null / NaN, False for anything that is not a number."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        v = float(value)
        return None if math.isnan(v) or math.isinf(v) else v
    return False


# --------------------------------------------------------------------------- exposures
def exposure_rows(ev: ExposureValidated) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``exposures`` row and its ``exposure_quadrants`` rows of one validated exposure."""
    pre = ev.offsets("pre")
    means = {ccd: sum(q.values()) / len(q) for ccd, q in pre.items() if q}
    row = {
        "block": ev.block, "obsid": ev.obsid, "roe": ev.roe, "test": ev.test,
        "obs_time": utc(ev.date or ev.complete_at or ev.produced_at), "validated_at": utc(ev.produced_at),
        "passed": ev.passed, "verdict": "PASS" if ev.passed else "FAIL", "flags": int(ev.flags),
        "flag_names": ",".join(ev.flag_names),
        "offset_ccd1": means.get("CCD1"), "offset_ccd2": means.get("CCD2"), "offset_ccd3": means.get("CCD3"),
        "structure": ev.structure, "files": [{"ccd": f.ccd, "path": f.path} for f in ev.files],
        "event_id": str(ev.event_id),
    }
    quads = []
    for ccd, per_q in sorted(ev.stats.items()):
        for q, s in sorted(per_q.items()):
            quads.append({
                "block": ev.block, "obsid": ev.obsid, "ccd": ccd, "quadrant": q,
                "offset_pre": s.pre.offset, "offset_img": s.img.offset, "offset_ove": s.ove.offset,
                "noise_pre": s.pre.noise, "noise_img": s.img.noise, "noise_ove": s.ove.noise,
                "saturated": s.saturated, "lost": s.lost,
            })
    return row, quads


# --------------------------------------------------------------------------- analyses
def software_version(provenance: dict[str, Any]) -> str:
    sw = provenance.get("software")
    if isinstance(sw, dict):
        return str(sw.get("version") or "")
    return str(sw or provenance.get("software_version") or "")


def _values(values: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """(quantity, value, error) of the numeric entries of one result mapping."""
    out = []
    for key, raw in values.items():
        if key.endswith("_err") and key[:-4] in values:
            continue
        v = _number(raw)
        if v is False:
            continue
        err = _number(values.get(f"{key}_err"))
        out.append((key, v, err if err is not False else None))
    return out


def analysis_rows(ev: AnalysisCompleted) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``analyses`` row and the ``results`` rows of one analysis event. ``results`` is
    ``{CCD: {Q: {key: value}}}`` plus optional test-level ``{key: number}`` entries."""
    if not isinstance(ev.results, dict):
        raise RecordError("results: expected an object {CCD: {Q: {key: value}}}")
    version = software_version(ev.provenance or {})
    produced = utc(ev.produced_at)
    repeat = int(ev.repeat or 0)
    event_id = str(ev.event_id)
    head = {
        "event_id": event_id, "block": ev.block, "test": ev.test, "repeat": repeat, "status": ev.status,
        "flags": int(ev.flags), "flag_names": ",".join(ev.flag_names), "software_version": version,
        "produced_at": produced, "error": ev.error, "products": list(ev.products),
    }
    base = {"event_id": event_id, "block": ev.block, "test": ev.test, "repeat": repeat,
            "software_version": version, "produced_at": produced}
    rows: list[dict[str, Any]] = []
    top: dict[str, Any] = {}
    for ccd, per_q in ev.results.items():
        if _CCD.match(str(ccd)) and isinstance(per_q, dict):
            ccd_level = {}
            for q, values in per_q.items():
                if q in QUADRANTS and isinstance(values, dict):
                    for key, v, err in _values(values):
                        rows.append(dict(base, ccd=ccd, quadrant=q, quantity=key, value=v, error=err, unit=unit_of(key)))
                elif isinstance(values, dict):
                    raise RecordError(f"results.{ccd}.{q}: expected a quadrant E/F/G/H with an object of values")
                else:
                    ccd_level[q] = values  # a per-CCD value
            for key, v, err in _values(ccd_level):
                rows.append(dict(base, ccd=ccd, quadrant="", quantity=key, value=v, error=err, unit=unit_of(key)))
        else:
            top[str(ccd)] = per_q
    for key, v, err in _values(top):
        rows.append(dict(base, ccd="", quadrant="", quantity=key, value=v, error=err, unit=unit_of(key)))
    return head, rows


# --------------------------------------------------------------------------- FPA
def metatest_rows(ev: MetatestCompleted, missing: list[str] | None = None) -> tuple[dict[str, Any], list[dict], list[dict]]:
    """The ``fpa_families`` row, the ``fpa_blocks`` rows and the ``fpa_values`` rows of one
    ``metatest.completed`` (``results`` = ``{quantity: {block: {CCD: {Q: value}}}}``)."""
    if not isinstance(ev.results, dict):
        raise RecordError("results: expected an object {quantity: {block: {CCD: {Q: value}}}}")
    produced = utc(ev.produced_at)
    event_id = str(ev.event_id)
    if missing is None:  # the event's own list when its model has it, else the FPA blocks not in `blocks`
        given = getattr(ev, "missing", None)
        missing = list(given) if given else [b for b in fpa_blocks() if b not in ev.blocks]
    head = {"family": ev.family, "event_id": event_id, "produced_at": produced, "blocks": list(ev.blocks),
            "missing": list(missing), "products": list(ev.products)}
    slices = {b: s for s, pair in enumerate(fpa_layout()["slices"], start=1) for b in pair}
    present = set(ev.blocks) - set(missing)
    blocks = [{"family": ev.family, "block": b, "slice": slices.get(b), "present": b in present} for b in fpa_blocks()]
    values = []
    for quantity, per_block in ev.results.items():
        if not isinstance(per_block, dict):
            raise RecordError(f"results.{quantity}: expected an object {{block: {{CCD: {{Q: value}}}}}}")
        for block, per_ccd in per_block.items():
            if per_ccd is None:
                continue
            if not isinstance(per_ccd, dict):
                raise RecordError(f"results.{quantity}.{block}: expected an object {{CCD: {{Q: value}}}}")
            for ccd, per_q in per_ccd.items():
                if not isinstance(per_q, dict):
                    raise RecordError(f"results.{quantity}.{block}.{ccd}: expected an object {{Q: value}}")
                for q, raw in per_q.items():
                    v = _number(raw)
                    if v is False:
                        raise RecordError(f"results.{quantity}.{block}.{ccd}.{q}: not a number: {raw!r}")
                    cell = fpa_cell(block, ccd, q)
                    values.append({
                        "family": ev.family, "quantity": quantity, "block": block, "ccd": ccd, "quadrant": q,
                        "value": v, "slice": cell.slice if cell else None, "col": cell.col if cell else None,
                        "x": cell.x if cell else None, "y": cell.y if cell else None,
                        "event_id": event_id, "produced_at": produced,
                    })
    return head, blocks, values
