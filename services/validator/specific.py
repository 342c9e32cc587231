"""Test-specific checks of one exposure (campaign.md, the tests table), from the per-quadrant
statistics the validator already has (median offsets of prescan / image / overscan, ADU) and the
exposure-log values of each CCD. Pure functions.

- DARK01: fluence = image median - mean(prescan, overscan) in [-2, 5] ADU (FLUENCE_OOL);
- flat-field frames of FLAT01, FLAT02_<nm>, FLAT_STB, PTC01, PTC02_*, COSMETICS00 (shutter open,
  flat source, exposure time > 0) and the NL01/NL02 stability frames: fluence (image - prescan)
  within 10 % of ``min(exptime / tFWC_flat, 1) x 2^16`` (FLUENCE_OOL; NL stability frames are
  at 50 % of full well); below 10 % of it: the source is off or the shutter closed (SOURCEOFF);
- flux check of those frames whose measured fluence is below 0.8 x 2^16: ``2^16 / mean(fluence / t)`` over the CCD's
  quadrants within [0.9, 1.1] x tFWC_flat (FLUX_OOL) - a wrong filter shows here;
- NL01/NL02 background frames (comments BGD, or shutter closed): image - prescan in
  [-10, 20] ADU (BGD_OOL);
- frames that must see no light (BIAS*, DARK*, shutter-closed frames of any test, no charge
  injection): image - mean(prescan, overscan) <= 20 ADU, else SOURCEON;
- charge-injection frames (CHINJ01/02, TP01/11/02/21, any frame with ``chinj`` or pumping), on
  the well-injected half only: the campaign's expected level (:func:`shared.injection.
  expected_injection_adu`: 0 when id_wid < 10; ``600 + max(0, IG2 - IG1) x 6000`` when IDL < IG1 +
  7.5; unknown otherwise, then not checked) with the median of the injected lines within [0.5,
  1.5] x expected (FLUENCE_OOL) and their std within [0.03, 0.45] x expected (FLUENCEGRAD_OOL);
  no injection expected: the median <= 50 ADU. Leaves ``injection.<CCD>.<Q>.level`` / ``.std``.

The leaves go under ``compliance["test"]``: ``fluence.<CCD>.<Q>`` (ratio measured / expected, or
ADU for darks and backgrounds), ``flux.<CCD>`` (tFWC ratio), ``source.<CCD>.<Q>`` (ADU).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from services.validator.specific_psf import assess_point_tests
from shared.flags import Flag
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, Geometry, quadrant
from shared.injection import expected_injection_adu, injected_rows, well_injected_half

FULL_SCALE = 65536.0
FLUENCE_TOLERANCE = 0.10
FLUX_LIMITS = (0.9, 1.1)
FLUX_MAX_FRACTION = 0.8
SOURCE_OFF_FRACTION = 0.1
DARK_FLUENCE_ADU = (-2.0, 5.0)
NL_BACKGROUND_ADU = (-10.0, 20.0)
NO_LIGHT_MAX_ADU = 20.0
FLAT_TESTS = ("FLAT01", "FLAT02", "FLAT_STB", "PTC01", "PTC02", "COSMETICS00")
NL_TESTS = ("NL01", "NL02")
NL_STABILITY_FRACTION = 0.5
INJECTION_LEVEL_LIMITS = (0.5, 1.5)
INJECTION_STD_LIMITS = (0.03, 0.45)
NO_INJECTION_MAX_ADU = 50.0
INJECTION_KEYS = ("chinj", "v_tpump", "s_tpump")


def _num(value: Any, default: float = float("nan")) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out


def _leaf(value: float, lo: float | None, hi: float | None) -> dict[str, Any]:
    ok = math.isfinite(value) and (lo is None or value >= lo) and (hi is None or value <= hi)
    return {"passed": bool(ok), "value": value if math.isfinite(value) else None, "lo": lo, "hi": hi}


def t_full_well(row: Mapping[str, Any], chamber: Mapping[str, Any]) -> float | None:
    """tFWC_flat (s) of the frame's filter position in the chamber profile, None if unknown."""
    try:
        nm = chamber["FW"][f"F{int(_num(row.get('wave'), 4))}"]
        return float(chamber["tFWC_flat"][f"nm{int(nm)}"])
    except (KeyError, TypeError, ValueError):
        return None


def _base(test: str) -> str:
    return (test or "").strip().upper().split(".")[0]


def _comment(row: Mapping[str, Any]) -> str:
    return str(row.get("comments") or "").strip().upper()


def injection_registers(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """The registers the injection statistics need, or None for a frame without injection."""
    if not any(_num(row.get(k), 0.0) for k in INJECTION_KEYS):
        return None
    return {k: row.get(k) for k in ("chinj_on", "chinj_of", "vstart", "vend")}


def injection_stats(data: np.ndarray, registers: Mapping[str, Any], stats: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Median and std (ADU, prescan offset subtracted) of the injected lines of each quadrant's
    image area (every 4th column: fast), from a full frame in array orientation."""
    geometry = Geometry.from_shape(data.shape)
    vend = int(_num(registers.get("vend"), 2086))
    rows = injected_rows(registers)[: min(vend, IMAGE_ROWS)]
    out: dict[str, dict[str, float]] = {}
    for q, s in stats.items():
        quad = quadrant(data, q, geometry)
        lines = quad[: rows.size][rows, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS:4]
        if lines.size == 0:
            continue
        lines = lines.astype(np.float32) - np.float32(s["pre"]["offset"])
        out[q] = {"median": float(np.median(lines)), "std": float(lines.std())}
    return out


def _assess_injection(ccd: str, row: Mapping[str, Any], inj: Mapping[str, Mapping[str, float]], tree: dict[str, Any],
                      notes: list[str]) -> Flag:
    flags = Flag(0)
    good = well_injected_half(_num(row.get("id_dly"), 1500.0), _num(row.get("toi_ch"), 1000.0))
    for q, s in inj.items():
        if q not in good:
            continue
        expected = expected_injection_adu(row, int(ccd[-1]), q)
        if expected is None:
            notes.append(f"{ccd} {q}: expected injection unknown (IDL >= IG1 + 7.5): not checked")
            continue
        node: dict[str, Any] = {}
        if expected == 0:
            node["level"] = _leaf(s["median"], None, NO_INJECTION_MAX_ADU)
        else:
            node["level"] = _leaf(s["median"] / expected, *INJECTION_LEVEL_LIMITS)
            node["std"] = _leaf(s["std"] / expected, *INJECTION_STD_LIMITS)
        tree.setdefault("injection", {}).setdefault(ccd, {})[q] = node
        if not node["level"]["passed"]:
            flags |= Flag.FLUENCE_OOL
        if "std" in node and not node["std"]["passed"]:
            flags |= Flag.FLUENCEGRAD_OOL
    return flags


def frame_role(test: str, row: Mapping[str, Any]) -> str:
    """``dark`` | ``flat`` | ``nl_stability`` | ``nl_background`` | ``no_light`` | ``injection`` |
    ``other``."""
    base = _base(test)
    closed = _num(row.get("shuttr"), 1.0) == 0 or _num(row.get("exptime"), 0.0) <= 0
    injecting = any(_num(row.get(k), 0.0) for k in INJECTION_KEYS)
    if injecting:
        return "injection"
    if base.startswith("DARK"):
        return "dark"
    if base.startswith(NL_TESTS):
        if _comment(row) == "BGD" or closed:
            return "nl_background"
        return "nl_stability" if _comment(row) == "STAB" else "other"
    if closed and not injecting and (base.startswith("BIAS") or base.startswith(FLAT_TESTS)):
        return "no_light"
    if base.startswith(FLAT_TESTS) and str(row.get("source", "flat")).lower() == "flat":
        return "flat"
    return "other"


def assess_test_specific(
    test: str,
    stats: Mapping[str, Mapping[str, Mapping[str, Any]]],
    rows: Mapping[str, Mapping[str, Any]],
    chamber: Mapping[str, Any] | None,
    injection: Mapping[str, Mapping[str, Mapping[str, float]]] | None = None,
) -> tuple[dict[str, Any], Flag, list[str]]:
    """The test-specific checks (module docstring) of one exposure. ``stats`` =
    ``{CCD: {Q: {"pre": {"offset"}, "img": {...}, "ove": {...}}}}``; ``rows`` = ``{CCD:
    exposure-log values}``; ``chamber`` = the chamber profile (tFWC); ``injection`` = ``{CCD: {Q:
    {median, std}}}`` of injection frames (:func:`injection_stats`). Returns (tree, flags, notes
    on checks that could not run)."""
    tree: dict[str, Any] = {}
    flags = Flag(0)
    notes: list[str] = []
    for ccd, quads in stats.items():
        row = rows.get(ccd) or {}
        role = frame_role(test, row)
        if role == "injection":
            if injection and ccd in injection:
                flags |= _assess_injection(ccd, row, injection[ccd], tree, notes)
            continue
        if role == "other":
            continue
        exptime = _num(row.get("exptime"), 0.0)
        expected = None
        tfwc = None
        if role in ("flat", "nl_stability"):
            tfwc = t_full_well(row, chamber or {})
            if tfwc is None or tfwc <= 0:
                notes.append(f"{ccd}: no tFWC_flat for wave={row.get('wave')} in the chamber profile: fluence not checked")
                continue
            rel = NL_STABILITY_FRACTION if role == "nl_stability" else min(exptime / tfwc, 1.0)
            expected = rel * FULL_SCALE
        rates = []
        for q, s in quads.items():
            pre, img, ove = (_num(s[r]["offset"]) for r in ("pre", "img", "ove"))
            if role in ("dark", "no_light"):
                signal = img - 0.5 * (pre + ove)
                if role == "dark":
                    node = _leaf(signal, *DARK_FLUENCE_ADU)
                    tree.setdefault("fluence", {}).setdefault(ccd, {})[q] = node
                    if not node["passed"]:
                        flags |= Flag.FLUENCE_OOL
                src = _leaf(signal, None, NO_LIGHT_MAX_ADU)
                tree.setdefault("source", {}).setdefault(ccd, {})[q] = src
                if not src["passed"]:
                    flags |= Flag.SOURCEON
            elif role == "nl_background":
                node = _leaf(img - pre, *NL_BACKGROUND_ADU)
                tree.setdefault("background", {}).setdefault(ccd, {})[q] = node
                if not node["passed"]:
                    flags |= Flag.BGD_OOL
            else:
                fluence = img - pre
                ratio = fluence / expected if expected else float("nan")
                node = _leaf(ratio, 1.0 - FLUENCE_TOLERANCE, 1.0 + FLUENCE_TOLERANCE)
                tree.setdefault("fluence", {}).setdefault(ccd, {})[q] = node
                if not node["passed"]:
                    flags |= Flag.FLUENCE_OOL
                if expected and expected > 10 * NO_LIGHT_MAX_ADU and fluence < SOURCE_OFF_FRACTION * expected:
                    flags |= Flag.SOURCEOFF
                if exptime > 0 and role == "flat" and 0 < fluence < FLUX_MAX_FRACTION * FULL_SCALE:
                    rates.append(fluence / exptime)
        if rates and tfwc:
            mean_rate = sum(rates) / len(rates)
            estimate = FULL_SCALE / mean_rate if mean_rate > 0 else float("inf")
            node = _leaf(estimate / tfwc, *FLUX_LIMITS)
            tree.setdefault("flux", {})[ccd] = node
            if not node["passed"]:
                flags |= Flag.FLUX_OOL
    flags |= assess_point_tests(test, stats, rows, chamber, tree, notes)  # FOCUS00, PSF01/02, PERSIST01 (specific_psf)
    return tree, flags, notes


__all__ = ["assess_test_specific", "frame_role", "injection_registers", "injection_stats", "t_full_well"]
