"""Synthetic events with known values, for filling a catalogue in tests and demos (no pixels).

Values are simple functions of their position, so a query's expected rows can be written down:
an exposure's prescan offset is ``1000 + 100 * ccd_number + quadrant_index`` ADU (E=0 .. H=3)
plus ``obsid / 1000``; a gain is ``3.0 + 0.1 * ccd_number + 0.01 * quadrant_index`` (+ the
block index / 100 on the FPA), etc.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from shared.events import (
    AnalysisCompleted,
    ExposureValidated,
    FileRef,
    MetatestCompleted,
    QuadrantStats,
    RegionStats,
    derived_event_id,
)
from shared.flags import flag_names

QUADRANTS = ("E", "F", "G", "H")
CCDS = ("CCD1", "CCD2", "CCD3")
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)


def offset_of(obsid: int, ccd: int, q: str) -> float:
    return 1000.0 + 100 * ccd + QUADRANTS.index(q) + obsid / 1000


def exposure(obsid: int, block: str = "BORN", test: str = "BIAS01", flags: int = 0,
             when: datetime | None = None, date_folder: str = "010326") -> ExposureValidated:
    """A validated exposure; ``passed`` when no flag is set."""
    when = when or T0 + timedelta(minutes=obsid)
    stats = {
        f"CCD{c}": {q: QuadrantStats(pre=RegionStats(offset=offset_of(obsid, c, q), noise=1.3),
                                     img=RegionStats(offset=offset_of(obsid, c, q) + 0.5, noise=1.4),
                                     ove=RegionStats(offset=offset_of(obsid, c, q) + 1.0, noise=1.35),
                                     saturated=0, lost=0, npix=1000) for q in QUADRANTS}
        for c in (1, 2, 3)
    }
    stamp = when.strftime("%d%m%yD%H%M%S")
    files = [FileRef(ccd=c, path=f"{date_folder}/EUC_{obsid}_{stamp}T_ROE1_CCD{c}.fits", sha256="0" * 64, size=1)
             for c in (1, 2, 3)]
    return ExposureValidated(
        event_id=derived_event_id("synthetic.exposure", block, obsid, test, flags), producer="validator",
        produced_at=when + timedelta(seconds=3), obsid=obsid, block=block, test=test, date=when, files=files,
        passed=flags == 0, flags=flags, flag_names=flag_names(flags), compliance={}, stats=stats,
        complete_at=when + timedelta(seconds=1),
    )


def gain_of(ccd: int, q: str, block_index: int = 0) -> float:
    return round(3.0 + 0.1 * ccd + 0.01 * QUADRANTS.index(q) + block_index / 100, 4)


def ron_of(ccd: int, q: str, shift: float = 0.0) -> float:
    return round(1.3 + 0.01 * ccd + 0.001 * QUADRANTS.index(q) + shift, 4)


def analysis(test: str, block: str = "BORN", repeat: int | None = None, when: datetime | None = None,
             values: dict[str, Any] | None = None, version: str = "0.1.0", status: str = "completed",
             shift: float = 0.0) -> AnalysisCompleted:
    """An ``analysis.completed`` with per-quadrant values: PTC tests give ``gain`` (+ ``gain_err``),
    BIAS tests ``ron_img_adu`` (+ ``offset_pre``), DARK ``dark_current_e_s``; ``values`` adds
    top-level keys. ``shift`` is added to the RON (a later analysis, a different value)."""
    when = when or T0 + timedelta(hours=1)
    results: dict[str, Any] = {}
    for c in (1, 2, 3):
        per_q = {}
        for q in QUADRANTS:
            v: dict[str, Any] = {}
            if test.startswith("PTC"):
                v.update(gain=gain_of(c, q), gain_err=0.002, a00=3.5e-7, bloom_adu=60000 + c)
            elif test.startswith("BIAS"):
                v.update(ron_img_adu=ron_of(c, q, shift), offset_pre=offset_of(0, c, q), bad_columns=[])
            elif test.startswith("DARK"):
                v.update(dark_current_e_s=0.001 * c)
            per_q[q] = v
        results[f"CCD{c}"] = per_q
    results.update(values or {})
    if status == "failed":
        results = {}
    return AnalysisCompleted(
        event_id=derived_event_id("synthetic.analysis", block, test, repeat, when.isoformat(), status),
        producer="analyzer", produced_at=when, test=test, block=block, repeat=repeat, status=status,
        results=results, products=[f"{block}/{test}/results.json"],
        provenance={"software": {"name": "vison", "version": version}},
    )


def fpa_results(blocks: list[str]) -> dict[str, Any]:
    """``{quantity: {block: {CCD: {Q: value}}}}`` of gain, ron_img_e, dark_current_e_s, prnu_pct."""
    from services.catalogue.fpa import fpa_blocks

    order = fpa_blocks()
    out: dict[str, Any] = {"gain": {}, "ron_img_e": {}, "dark_current_e_s": {}, "prnu_pct": {}}
    for b in blocks:
        i = order.index(b) if b in order else 12
        for name, fn in (("gain", lambda c, q: gain_of(c, q, i)), ("ron_img_e", lambda c, q: ron_of(c, q) * 3.3),
                         ("dark_current_e_s", lambda c, q: 0.001 * c + i / 1e4),
                         ("prnu_pct", lambda c, q: 0.5 + 0.01 * QUADRANTS.index(q) + i / 100)):
            out[name][b] = {f"CCD{c}": {q: fn(c, q) for q in QUADRANTS} for c in (1, 2, 3)}
    return out


def metatest(family: str, blocks: list[str], when: datetime | None = None) -> MetatestCompleted:
    """A ``metatest.completed`` of ``family`` holding :func:`fpa_results` of ``blocks``."""
    when = when or T0 + timedelta(hours=2)
    return MetatestCompleted(
        event_id=derived_event_id("synthetic.metatest", family, ",".join(blocks), when.isoformat()),
        producer="metatest", produced_at=when, family=family, blocks=list(blocks), results=fpa_results(blocks),
        products=[f"FPA/{family}/{family}_maps.json"],
    )
