"""Pixel defect masks of master images (pure): hot / cold pixels against a smooth background
and the whole-column rule (DARK01, COSMETICS00). Canonical quadrant image areas in, uint8 bits
out."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.analyzer.science.smooth import fit_poly_2d
from shared.geometry import PRESCAN_COLS

#: Mask bits of the dark / defect masks.
DEFECT_HOT = 1
DEFECT_COLD = 2
DEFECT_COLUMN = 4


@dataclass
class DefectMask:
    """Defects of one quadrant's image area (canonical, 2066 x 2048 or fewer rows)."""

    bits: np.ndarray  # uint8, image-area shape
    n_hot: int
    n_cold: int
    bad_columns: list[int]  # canonical quadrant column indices (prescan included)
    background: np.ndarray = field(repr=False, default=None)

    @property
    def n_masked(self) -> int:
        return int(np.count_nonzero(self.bits))

    @property
    def n_hot_isolated(self) -> int:
        """Hot pixels outside the columns masked whole."""
        return int(np.count_nonzero(((self.bits & DEFECT_HOT) != 0) & ((self.bits & DEFECT_COLUMN) == 0)))


def column_rule(bad: np.ndarray, min_bad: int = 200) -> np.ndarray:
    """Indices (image-area columns) of the columns holding >= ``min_bad`` bad pixels."""
    return np.flatnonzero(np.count_nonzero(bad, axis=0) >= min_bad)


def defect_mask(
    image: np.ndarray,
    lo: float = -1000.0,
    hi: float = 50.0,
    min_bad: int = 200,
    degree: int = 5,
    nbins: tuple[int, int] = (32, 32),
) -> DefectMask:
    """Defect mask of an image area (ADU, canonical): minus its smooth 2-D background (Legendre
    polynomial through block medians), hot above ``hi``, cold below ``lo``; a column holding
    >= ``min_bad`` bad pixels is masked whole (bit :data:`DEFECT_COLUMN`)."""
    img = np.asarray(image, dtype=np.float32)
    background = fit_poly_2d(img, degree=degree, nbins=nbins).model
    resid = img - background
    hot = resid > hi
    cold = resid < lo
    bits = np.zeros(img.shape, dtype=np.uint8)
    bits[hot] |= DEFECT_HOT
    bits[cold] |= DEFECT_COLD
    cols = column_rule(hot | cold, min_bad)
    bits[:, cols] |= DEFECT_COLUMN
    return DefectMask(bits, int(hot.sum()), int(cold.sum()), [int(c) + PRESCAN_COLS for c in cols], background)
