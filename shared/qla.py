"""Quick-look statistics of a frame: per quadrant (canonical orientation) and region
(prescan / image / overscan), mean, std, min, max and quartiles, inside a border trim."""

from __future__ import annotations

import numpy as np

from shared.geometry import QUADRANTS, Geometry, quadrant, region

STAT_KEYS = ("mean", "std", "min", "max", "p25", "p50", "p75")
QLA_REGIONS = ("pre", "img", "ove")


def region_stats(values: np.ndarray) -> dict[str, float]:
    """mean, std, min, max, p25, p50, p75 of an array (ADU); NaN for an empty one.

    Quartiles use linear interpolation between order statistics (numpy's default), found with
    one partial sort of a float32 copy: several times faster than ``np.percentile``."""
    flat = np.ascontiguousarray(values, dtype=np.float32).ravel()
    n = flat.size
    if n == 0:
        return {k: float("nan") for k in STAT_KEYS}
    positions = [q * (n - 1) for q in (0.25, 0.5, 0.75)]
    kth = sorted({int(np.floor(p)) for p in positions} | {min(int(np.floor(p)) + 1, n - 1) for p in positions})
    part = np.partition(flat, kth)
    quartiles = []
    for p in positions:
        lo = int(np.floor(p))
        hi = min(lo + 1, n - 1)
        quartiles.append(float(part[lo]) + (p - lo) * (float(part[hi]) - float(part[lo])))
    return {
        "mean": float(flat.mean(dtype=np.float64)),
        "std": float(flat.std(dtype=np.float64)),
        "min": float(flat.min()),
        "max": float(flat.max()),
        "p25": quartiles[0],
        "p50": quartiles[1],
        "p75": quartiles[2],
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
