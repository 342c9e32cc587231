"""The flight focal plane (FPA): 6 slices x 6 CCD columns = 12 blocks (``reference-data.json``,
``fpa_layout``), and the 12 x 12 grid of quadrant cells the maps use.

Slice ``s`` (1..6, row of the FPA, slice 1 at the bottom) holds two blocks: columns 1-3 are CCD1,
CCD2, CCD3 of the left block; columns 4-6 are CCD3, CCD2, CCD1 of the right block, rotated by
180 deg. A CCD of the FPA is named ``<slice>-<col>``. Quadrant cells inside a CCD (as read in a
frame) for columns 1-3: E top-left, F top-right, H bottom-left, G bottom-right; columns 4-6 are
rotated 180 deg (G top-left, H top-right, F bottom-left, E bottom-right). Spares are not on the FPA.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from shared.geometry import CCDS, QUADRANTS
from shared.refdata import reference_data

GRID_SIZE = 12
#: (x, y) of a quadrant inside its 2 x 2 CCD cell (x right, y up), columns 1-3 (frame orientation).
_CELL = {"E": (0, 1), "F": (1, 1), "H": (0, 0), "G": (1, 0)}
#: the same for columns 4-6 (rotated 180 deg).
_CELL_ROTATED = {q: (1 - x, 1 - y) for q, (x, y) in _CELL.items()}


@dataclass(frozen=True)
class Position:
    """Where a CCD of a block sits on the FPA."""

    slice: int  # 1..6 (row, 1 = bottom)
    col: int  # 1..6 (CCD column, 1 = left)

    @property
    def ccd_id(self) -> str:
        return f"{self.slice}-{self.col}"

    @property
    def rotated(self) -> bool:
        """True for columns 4-6 (the right block, rotated by 180 deg)."""
        return self.col >= 4


class FPALayout:
    """Block / CCD -> FPA position, and quadrant -> 12 x 12 grid cell (row 0 = bottom)."""

    def __init__(self, slices: list[list[str]], spares: list[str]):
        if len(slices) != 6 or any(len(pair) != 2 for pair in slices):
            raise ValueError("fpa_layout: expected 6 slices of 2 blocks")
        self.slices = [list(pair) for pair in slices]
        self.spares = list(spares)
        self._pos: dict[tuple[str, str], Position] = {}
        for s, (left, right) in enumerate(self.slices, start=1):
            for n in (1, 2, 3):
                self._pos[(left, f"CCD{n}")] = Position(s, n)
                self._pos[(right, f"CCD{n}")] = Position(s, 7 - n)

    @property
    def fpa_blocks(self) -> list[str]:
        """The 12 blocks on the FPA, slice by slice (left, right)."""
        return [b for pair in self.slices for b in pair]

    @property
    def known_blocks(self) -> list[str]:
        return self.fpa_blocks + self.spares

    def on_fpa(self, block: str) -> bool:
        return block in self.fpa_blocks

    def is_known(self, block: str) -> bool:
        return block in self.fpa_blocks or block in self.spares

    def position(self, block: str, ccd: str) -> Position | None:
        """FPA position of a CCD (None for a spare or an unknown block)."""
        return self._pos.get((block, ccd))

    def layout_doc(self) -> dict[str, dict[str, str]]:
        """``{block: {CCD: "<slice>-<col>"}}`` of the 12 FPA blocks."""
        return {b: {c: self._pos[(b, c)].ccd_id for c in CCDS} for b in self.fpa_blocks}

    def cell(self, block: str, ccd: str, quadrant: str) -> tuple[int, int] | None:
        """``(row, column)`` of a quadrant in the 12 x 12 grid (row 0 = bottom), None off the FPA."""
        pos = self.position(block, ccd)
        if pos is None:
            return None
        x, y = (_CELL_ROTATED if pos.rotated else _CELL)[quadrant]
        return 2 * (pos.slice - 1) + y, 2 * (pos.col - 1) + x

    def grid(self, values: dict[str, dict[str, dict[str, float | None]]]) -> list[list[float | None]]:
        """12 x 12 list of lists (row 0 = bottom) of ``{block: {CCD: {Q: value}}}``; None where absent."""
        out: list[list[float | None]] = [[None] * GRID_SIZE for _ in range(GRID_SIZE)]
        for block, ccds in values.items():
            for ccd, quads in (ccds or {}).items():
                for q, value in (quads or {}).items():
                    cell = self.cell(block, ccd, q)
                    if cell is not None:
                        out[cell[0]][cell[1]] = value
        return out


@lru_cache(maxsize=1)
def fpa_layout() -> FPALayout:
    """The flight layout of ``reference-data.json``."""
    doc = reference_data()["fpa_layout"]
    return FPALayout(doc["slices"], doc.get("spares", []))


__all__ = ["CCDS", "FPALayout", "GRID_SIZE", "Position", "QUADRANTS", "fpa_layout"]
