"""CCD273 frame geometry: quadrants E/F/G/H, canonical orientation, prescan / image / overscan
sections and the standard statistic regions.

Array convention: a frame is a numpy array ``[row, column]`` as read from FITS (row 0 at the
bottom as displayed). H is bottom-left, G bottom-right, E top-left, F top-right. The canonical
orientation puts each quadrant's readout node at (0, 0): H as is, G flipped in x, E flipped in y,
F flipped in x and y. Canonical quadrant columns: 0..50 prescan, 51..2098 image, 2099.. serial
overscan; rows 0..2065 image, 2066..2085 parallel overscan (when read out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

QUADRANTS: tuple[str, ...] = ("E", "F", "G", "H")
CCDS: tuple[str, ...] = ("CCD1", "CCD2", "CCD3")

PRESCAN_COLS = 51
IMAGE_COLS = 2048
IMAGE_ROWS = 2066
PARALLEL_OVERSCAN_ROWS = 20
SERIAL_OVERSCAN_COLS = (20, 29)  # ground models, flight models
NAXIS2_VARIANTS = (2 * (IMAGE_ROWS + PARALLEL_OVERSCAN_ROWS), 2 * IMAGE_ROWS)  # 4172, 4132

Region = Literal["pre", "img", "ove", "povr"]

#: Standard trims (leading, trailing) columns of each statistic region, from formats.md.
STANDARD_TRIMS: dict[str, tuple[int, int]] = {"pre": (25, 5), "img": (5, 5), "ove": (5, 5)}

# Flips (rows, cols) that bring each quadrant's block of the frame to canonical orientation.
_FLIPS: dict[str, tuple[bool, bool]] = {
    "H": (False, False),
    "G": (False, True),
    "E": (True, False),
    "F": (True, True),
}


class GeometryError(ValueError):
    """An array or file whose shape is not a CCD273 frame (or a wrong quadrant / region name)."""


@dataclass(frozen=True)
class Geometry:
    """Frame layout: serial overscan width (20 or 29 columns) and whether the parallel
    overscan rows were read out (NAXIS2 4172) or not (4132)."""

    overscan: int = 20
    parallel_overscan: bool = True

    @property
    def quad_cols(self) -> int:
        """Columns per quadrant (prescan + image + serial overscan): 2119 or 2128."""
        return PRESCAN_COLS + IMAGE_COLS + self.overscan

    @property
    def quad_rows(self) -> int:
        """Rows per quadrant: 2086 with parallel overscan, 2066 without."""
        return IMAGE_ROWS + (PARALLEL_OVERSCAN_ROWS if self.parallel_overscan else 0)

    @property
    def shape(self) -> tuple[int, int]:
        """Full-frame array shape (NAXIS2, NAXIS1)."""
        return (2 * self.quad_rows, 2 * self.quad_cols)

    @classmethod
    def from_shape(cls, shape: tuple[int, ...]) -> "Geometry":
        """The geometry of an array of this shape; GeometryError for anything else."""
        if len(shape) != 2:
            raise GeometryError(f"expected a 2-D frame, got shape {shape}")
        naxis2, naxis1 = shape
        overscan = naxis1 // 2 - PRESCAN_COLS - IMAGE_COLS
        if naxis1 % 2 or overscan not in SERIAL_OVERSCAN_COLS:
            raise GeometryError(
                f"NAXIS1={naxis1} is not a CCD273 frame width "
                f"(expected {[2 * (PRESCAN_COLS + IMAGE_COLS + o) for o in SERIAL_OVERSCAN_COLS]})"
            )
        if naxis2 not in NAXIS2_VARIANTS:
            raise GeometryError(f"NAXIS2={naxis2} is not a CCD273 frame height (expected {list(NAXIS2_VARIANTS)})")
        return cls(overscan=overscan, parallel_overscan=naxis2 == NAXIS2_VARIANTS[0])

    def columns(self, region: Region) -> slice:
        """Canonical column span of a region (untrimmed)."""
        if region == "pre":
            return slice(0, PRESCAN_COLS)
        if region in ("img", "povr"):
            return slice(PRESCAN_COLS, PRESCAN_COLS + IMAGE_COLS)
        if region == "ove":
            return slice(PRESCAN_COLS + IMAGE_COLS, self.quad_cols)
        raise GeometryError(f"unknown region {region!r} (pre, img, ove, povr)")

    def quadrant_block(self, quadrant: str) -> tuple[slice, slice]:
        """Array (rows, cols) slices of a quadrant in the frame, before reorientation."""
        if quadrant not in _FLIPS:
            raise GeometryError(f"unknown quadrant {quadrant!r} (E, F, G, H)")
        top = quadrant in ("E", "F")
        right = quadrant in ("F", "G")
        r, c = self.quad_rows, self.quad_cols
        return (slice(r, 2 * r) if top else slice(0, r), slice(c, 2 * c) if right else slice(0, c))


def _orient(block: np.ndarray, quadrant: str) -> np.ndarray:
    flip_rows, flip_cols = _FLIPS[quadrant]
    return block[:: -1 if flip_rows else 1, :: -1 if flip_cols else 1]


def quadrant(frame: np.ndarray, q: str, geometry: Geometry | None = None) -> np.ndarray:
    """Quadrant ``q`` of a frame in canonical orientation: a view, no copy."""
    geometry = geometry or Geometry.from_shape(frame.shape)
    rows, cols = geometry.quadrant_block(q)
    return _orient(frame[rows, cols], q)


def quadrants(frame: np.ndarray, geometry: Geometry | None = None) -> dict[str, np.ndarray]:
    """All four canonical quadrant views of a frame, keyed E, F, G, H."""
    geometry = geometry or Geometry.from_shape(frame.shape)
    return {q: quadrant(frame, q, geometry) for q in QUADRANTS}


def assemble(quads: dict[str, np.ndarray], geometry: Geometry | None = None, dtype=None) -> np.ndarray:
    """Inverse of :func:`quadrants`: a full frame from four canonical quadrant arrays."""
    first = quads[QUADRANTS[0]]
    if geometry is None:
        geometry = Geometry.from_shape((2 * first.shape[0], 2 * first.shape[1]))
    frame = np.empty(geometry.shape, dtype=dtype or first.dtype)
    for q in QUADRANTS:
        arr = quads[q]
        if arr.shape != (geometry.quad_rows, geometry.quad_cols):
            raise GeometryError(f"quadrant {q} has shape {arr.shape}, expected {(geometry.quad_rows, geometry.quad_cols)}")
        quadrant(frame, q, geometry)[...] = arr
    return frame


def region(
    quad: np.ndarray,
    name: Region,
    trim: tuple[int, int] | None = None,
    vstart: int = 0,
    vend: int = IMAGE_ROWS + PARALLEL_OVERSCAN_ROWS,
    row_border: int = 0,
) -> np.ndarray:
    """A region of a canonical quadrant (a view).

    ``pre`` / ``img`` / ``ove`` span rows ``[vstart, min(2066, vend))`` (shrunk by ``row_border``
    at both ends); ``povr`` is the parallel overscan rows of the image columns. ``trim`` drops
    (leading, trailing) columns; ``None`` applies no trim (use :data:`STANDARD_TRIMS` for the
    standard statistic regions).
    """
    geometry = Geometry(overscan=quad.shape[1] - PRESCAN_COLS - IMAGE_COLS, parallel_overscan=quad.shape[0] > IMAGE_ROWS)
    cols = geometry.columns(name)
    lead, trail = trim or (0, 0)
    cols = slice(cols.start + lead, cols.stop - trail)
    if name == "povr":
        if not geometry.parallel_overscan:
            raise GeometryError("this frame has no parallel overscan rows (NAXIS2 4132)")
        rows = slice(IMAGE_ROWS + row_border, quad.shape[0] - row_border)
    else:
        rows = slice(max(vstart, 0) + row_border, min(IMAGE_ROWS, vend) - row_border)
    return quad[rows, cols]


def standard_region(quad: np.ndarray, name: Region, vstart: int = 0, vend: int = 2086) -> np.ndarray:
    """A standard statistic region (formats.md trims: prescan [25, 5], image and overscan [5, 5])."""
    return region(quad, name, STANDARD_TRIMS.get(name, (0, 0)), vstart, vend)
