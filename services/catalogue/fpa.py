"""Positions on the flight focal plane (``reference-data.json`` ``fpa_layout``, metatest.md).

A CCD of the FPA is ``<slice>-<col>``: columns 1-3 are CCD1..3 of the left block of a slice,
columns 4-6 are CCD3..1 of the right block (rotated 180 deg). The 12 x 12 quadrant grid has x =
0..11 (2 quadrants per CCD column) and y = 0..11 (2 per slice), origin lower left; within a CCD
of columns 1-3: E top-left, F top-right, H bottom-left, G bottom-right; columns 4-6 rotated.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import BaseModel

from shared.refdata import fpa_layout

#: (dx, dy) of a quadrant inside its CCD's 2 x 2 cell (dy 1 = top), columns 1-3 / columns 4-6.
_CELL_LEFT = {"E": (0, 1), "F": (1, 1), "H": (0, 0), "G": (1, 0)}
_CELL_RIGHT = {"G": (0, 1), "H": (1, 1), "F": (0, 0), "E": (1, 0)}


class FpaCell(BaseModel):
    """Where a block's CCD quadrant sits: slice 1..6, column 1..6, grid x / y 0..11."""

    slice: int
    col: int
    x: int
    y: int

    @property
    def ccdid(self) -> str:
        return f"{self.slice}-{self.col}"


@lru_cache(maxsize=1)
def _positions() -> dict[tuple[str, str], tuple[int, int]]:
    out = {}
    for s, (left, right) in enumerate(fpa_layout()["slices"], start=1):
        for n in (1, 2, 3):
            out[(left, f"CCD{n}")] = (s, n)
            out[(right, f"CCD{n}")] = (s, 7 - n)
    return out


def fpa_blocks() -> list[str]:
    """The 12 blocks of the flight FPA (spares excluded), slice by slice."""
    return [b for pair in fpa_layout()["slices"] for b in pair]


def fpa_cell(block: str, ccd: str, quadrant: str) -> FpaCell | None:
    """The FPA position of one quadrant; None for spares, unknown blocks, CCDs or quadrants."""
    pos = _positions().get((block, ccd))
    cells = _CELL_LEFT if pos and pos[1] <= 3 else _CELL_RIGHT
    if pos is None or quadrant not in cells:
        return None
    s, col = pos
    dx, dy = cells[quadrant]
    return FpaCell(slice=s, col=col, x=2 * (col - 1) + dx, y=2 * (s - 1) + dy)
