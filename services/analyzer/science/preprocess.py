"""Common preprocessing of canonical quadrants (pure; ADU, float32 images): offsets (bias level)
from the prescan or overscan, offset subtraction, image area, master bias / flat / mask."""

from __future__ import annotations

from typing import Literal

import numpy as np

from services.analyzer.science.stats import clipped_stats
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, STANDARD_TRIMS, region

OffsetMethod = Literal["row", "global", "mean", "none"]
OffsetRegion = Literal["pre", "ove"]

#: Image-area column span in canonical orientation.
IMG_COLS = slice(PRESCAN_COLS, PRESCAN_COLS + IMAGE_COLS)


def row_offsets(
    quad: np.ndarray,
    method: OffsetMethod = "row",
    where: OffsetRegion = "pre",
    trim: tuple[int, int] | None = None,
) -> np.ndarray:
    """Offset (ADU) per row of a canonical quadrant, shape ``(nrows,)`` float64.

    ``method="row"``: median of the trimmed prescan (or overscan) of each row (all rows, the
    parallel overscan included); ``"global"``: one median of the trimmed region over the image
    rows, repeated; ``"mean"``: one 4-sigma clipped mean instead (no median quantisation bias on
    digitised data: use it when sub-0.1 ADU fluence accuracy matters); ``"none"``: zeros. ``trim`` defaults to the standard trims (prescan [25, 5],
    overscan [5, 5]).
    """
    nrows = quad.shape[0]
    if method == "none":
        return np.zeros(nrows)
    trim = trim if trim is not None else STANDARD_TRIMS[where]
    if where not in ("pre", "ove"):
        raise ValueError(f"offset region must be 'pre' or 'ove', not {where!r}")
    c0 = {"pre": 0, "ove": PRESCAN_COLS + IMAGE_COLS}[where] + trim[0]
    c1 = (PRESCAN_COLS if where == "pre" else quad.shape[1]) - trim[1]
    if c1 <= c0 or quad.shape[1] < PRESCAN_COLS + IMAGE_COLS:
        raise ValueError(f"quadrant of shape {quad.shape} has no {where} columns after trim {trim}")
    strip = np.asarray(quad[:, c0:c1], dtype=np.float64)
    if method == "row":
        return np.median(strip, axis=1)
    if method == "global":
        return np.full(nrows, float(np.median(strip[:IMAGE_ROWS])))
    if method == "mean":
        return np.full(nrows, clipped_stats(strip[:IMAGE_ROWS], 4.0).mean)
    raise ValueError(f"unknown offset method {method!r} (row, global, none)")


def subtract_offset(
    quad: np.ndarray,
    method: OffsetMethod = "row",
    where: OffsetRegion = "pre",
    trim: tuple[int, int] | None = None,
) -> np.ndarray:
    """The quadrant minus its offset (:func:`row_offsets`), float32, same shape."""
    off = row_offsets(quad, method, where, trim)
    return (np.asarray(quad, dtype=np.float32) - off[:, None].astype(np.float32)).astype(np.float32)


def image_area(quad: np.ndarray, trim: tuple[int, int] = (0, 0), vstart: int = 0, vend: int = 2086) -> np.ndarray:
    """Image columns of a canonical quadrant (rows ``[vstart, min(2066, vend))``), a view.
    ``trim`` drops (leading, trailing) columns."""
    return region(quad, "img", trim, vstart, vend)


def preprocess_quadrant(
    quad: np.ndarray,
    offset: OffsetMethod = "row",
    offset_region: OffsetRegion = "pre",
    master_bias: np.ndarray | None = None,
    master_flat: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Common preprocessing of one canonical quadrant, full quadrant shape, float32.

    1. offset subtraction (per-row prescan median by default, see :func:`row_offsets`);
    2. optional master bias subtraction (an offset-subtracted master of the same shape);
    3. optional master flat division (same shape; pixels where it is <= 0 or NaN become NaN);
    4. optional mask (bool, True = bad; same shape): bad pixels become NaN.
    """
    out = subtract_offset(quad, offset, offset_region)
    if master_bias is not None:
        out -= np.asarray(master_bias, dtype=np.float32)
    if master_flat is not None:
        flat = np.asarray(master_flat, dtype=np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(flat > 0, out / flat, np.nan).astype(np.float32)
    if mask is not None:
        out[np.asarray(mask, dtype=bool)] = np.nan
    return out


def reference_pixels(quad: np.ndarray, vstart: int = 0, vend: int = 2086) -> np.ndarray:
    """Virtual pixels of a canonical quadrant (no photo-charge, no dark signal): trimmed prescan
    and serial overscan over the image rows, and the parallel overscan rows (2 rows of border)
    of the image columns trimmed by (5, 5), as one 1-D float32 array."""
    from shared.geometry import standard_region

    parts = [standard_region(quad, "pre", vstart, vend).ravel(), standard_region(quad, "ove", vstart, vend).ravel()]
    if quad.shape[0] > IMAGE_ROWS and vend > IMAGE_ROWS:
        parts.append(region(quad, "povr", (5, 5), row_border=2).ravel())
    return np.concatenate(parts).astype(np.float32, copy=False)


def reference_offset(quad: np.ndarray, nsigma: float = 4.0, vstart: int = 0, vend: int = 2086) -> float:
    """Offset (ADU): 4-sigma clipped mean of the virtual pixels (:func:`reference_pixels`)."""
    return clipped_stats(reference_pixels(quad, vstart, vend), nsigma, subsample=17).mean
