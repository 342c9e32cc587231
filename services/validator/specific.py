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
  injection): image - mean(prescan, overscan) <= 20 ADU, else SOURCEON.

The leaves go under ``compliance["test"]``: ``fluence.<CCD>.<Q>`` (ratio measured / expected, or
ADU for darks and backgrounds), ``flux.<CCD>`` (tFWC ratio), ``source.<CCD>.<Q>`` (ADU).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from shared.flags import Flag

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


def frame_role(test: str, row: Mapping[str, Any]) -> str:
    """``dark`` | ``flat`` | ``nl_stability`` | ``nl_background`` | ``no_light`` | ``other``."""
    base = _base(test)
    closed = _num(row.get("shuttr"), 1.0) == 0 or _num(row.get("exptime"), 0.0) <= 0
    injecting = any(_num(row.get(k), 0.0) for k in ("chinj", "v_tpump", "s_tpump"))
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
) -> tuple[dict[str, Any], Flag, list[str]]:
    """The test-specific checks (module docstring) of one exposure. ``stats`` =
    ``{CCD: {Q: {"pre": {"offset"}, "img": {...}, "ove": {...}}}}``; ``rows`` = ``{CCD:
    exposure-log values}``; ``chamber`` = the chamber profile (tFWC). Returns (tree, flags,
    notes on checks that could not run)."""
    tree: dict[str, Any] = {}
    flags = Flag(0)
    notes: list[str] = []
    for ccd, quads in stats.items():
        row = rows.get(ccd) or {}
        role = frame_role(test, row)
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
    return tree, flags, notes


__all__ = ["assess_test_specific", "frame_role", "t_full_well"]
