"""Quick-look statistics of a frame: per quadrant (canonical orientation) and region
(prescan / image / overscan), mean, std, min, max and quartiles, inside a border trim."""

from __future__ import annotations

import numpy as np

from shared.geometry import QUADRANTS, Geometry, quadrant, region

STAT_KEYS = ("mean", "std", "min", "max", "p25", "p50", "p75")
QLA_REGIONS = ("pre", "img", "ove")


def region_stats(values: np.ndarray) -> dict[str, float]:
    """mean, std, min, max, p25, p50, p75 of an array (ADU); NaN for an empty one."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    if flat.size == 0:
        return {k: float("nan") for k in STAT_KEYS}
    p25, p50, p75 = np.percentile(flat, [25, 50, 75])
    return {
        "mean": float(flat.mean()),
        "std": float(flat.std()),
        "min": float(flat.min()),
        "max": float(flat.max()),
        "p25": float(p25),
        "p50": float(p50),
        "p75": float(p75),
    }


def quadrant_stats(quad: np.ndarray, border: int = 3, vstart: int = 0, vend: int = 2086) -> dict[str, dict[str, float]]:
    """Statistics of the prescan, image and overscan of one canonical quadrant, each region
    shrunk by ``border`` pixels on every side."""
    return {
        name: region_stats(region(quad, name, (border, border), vstart, vend, row_border=border))
        for name in QLA_REGIONS
    }


def frame_qla(data: np.ndarray, border: int = 3, vstart: int = 0, vend: int = 2086) -> dict[str, dict[str, dict[str, float]]]:
    """The quick-look report of a frame: ``{quadrant: {region: {stat: value}}}``."""
    geometry = Geometry.from_shape(data.shape)
    return {q: quadrant_stats(quadrant(data, q, geometry), border, vstart, vend) for q in QUADRANTS}
