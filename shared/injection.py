"""Charge-injection rules of the campaign (campaign.md, families.md), shared by the validator and
the analyses: which half of a CCD injects well at an injection delay, which image rows are
injected, and the injection level the campaign expects from the bias voltages."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from shared.geometry import IMAGE_ROWS


def _num(values: Mapping[str, Any], key: str, default: float) -> float:
    try:
        v = values.get(key, default)
        return float(v) if v not in (None, "") else default
    except (TypeError, ValueError):
        return default


def well_injected_half(id_dly_us: float, toi_ch_us: float) -> tuple[str, str]:
    """Quadrants that inject well at this injection delay: ``id_dly / toi_ch`` in (1, 2] -> G and
    H; in (2, 3] -> E and F; outside (1, 3] (e.g. the 0.75 of a 750 us delay at the default 1000 us
    phase time) -> E and F, so that the campaign's two delays cover both halves."""
    ratio = id_dly_us / max(toi_ch_us, 1e-9)
    return ("G", "H") if 1.0 < ratio <= 2.0 else ("E", "F")


def injected_rows(values: Mapping[str, Any], rows: int = IMAGE_ROWS) -> np.ndarray:
    """Boolean per canonical image row: injected when ``(y - vstart) mod (chinj_on + chinj_of) <
    chinj_on`` (rows before vstart are not read)."""
    on, off = int(_num(values, "chinj_on", 30)), int(_num(values, "chinj_of", 100))
    y = np.arange(rows) - int(_num(values, "vstart", 0))
    return (np.mod(y, max(on + off, 1)) < on) & (y >= 0)


def expected_injection_adu(values: Mapping[str, Any], ccd: int, quadrant: str) -> float | None:
    """The campaign's expected injection level (ADU): 0 when ``id_wid < 10``; ``600 + max(0, IG2
    - IG1) x 6000`` when ``IDL < IG1 + 7.5`` (IG1 of the quadrant's CCD side, IG2 of its side);
    None (unknown) otherwise."""
    if _num(values, "id_wid", 100.0) < 10:
        return 0.0
    side = "T" if quadrant in ("E", "F") else "B"
    ig1 = _num(values, f"IG1_{ccd}_{side}", _num(values, "IG1", 6.0))
    ig2 = _num(values, f"IG2_{side}", _num(values, "IG2", 2.0))
    if _num(values, "IDL", 13.0) < ig1 + 7.5:
        return 600.0 + max(0.0, ig2 - ig1) * 6000.0
    return None
