"""PNG heat map of one quantity on the FPA: 12 x 12 quadrant cells (x: CCD columns C1..C6 with 2
quadrants each, y: slices S1..S6 with 2 quadrants each, origin lower left), colour scale from the
2nd to the 98th percentile of the present values, colour bar in the quantity's unit, missing
cells blank. matplotlib's Agg canvas, no pyplot (no global state: safe in a service)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from services.metatest.layout import GRID_SIZE


def color_limits(grid: np.ndarray) -> tuple[float, float] | None:
    """(2nd, 98th) percentile of the finite values; widened when flat; None when there are none."""
    present = grid[np.isfinite(grid)]
    if present.size == 0:
        return None
    lo, hi = (float(v) for v in np.percentile(present, [2, 98]))
    if hi <= lo:
        pad = abs(lo) * 1e-3 or 1e-3
        lo, hi = lo - pad, hi + pad
    return lo, hi


def heatmap_png(grid: list[list[float | None]], title: str, unit: str, *, labels: dict[tuple[int, int], str] | None = None,
                dpi: int = 90, metadata: dict[str, str] | None = None) -> bytes:
    """PNG bytes of a 12 x 12 grid (row 0 = bottom; None = blank). ``labels``: (slice, col) ->
    text drawn in that CCD (block names)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    arr = np.array([[np.nan if v is None else float(v) for v in row] for row in grid], dtype=float)
    if arr.shape != (GRID_SIZE, GRID_SIZE):
        raise ValueError(f"grid must be {GRID_SIZE} x {GRID_SIZE}, got {arr.shape}")
    fig = Figure(figsize=(6.4, 5.6))
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.07, top=0.93)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    limits = color_limits(arr)
    cmap = _cmap()
    image = ax.imshow(np.ma.masked_invalid(arr), origin="lower", cmap=cmap, interpolation="nearest",
                      vmin=limits[0] if limits else None, vmax=limits[1] if limits else None,
                      extent=(0, GRID_SIZE, 0, GRID_SIZE))
    for k in range(0, GRID_SIZE + 1, 2):  # CCD boundaries
        ax.axhline(k, color="0.3", lw=1.0)
        ax.axvline(k, color="0.3", lw=1.0)
    ax.axvline(6, color="black", lw=2.0)  # left / right block
    ax.set_xticks([2 * i + 1 for i in range(6)], [f"C{i + 1}" for i in range(6)])
    ax.set_yticks([2 * i + 1 for i in range(6)], [f"S{i + 1}" for i in range(6)])
    ax.set_xlim(0, GRID_SIZE)
    ax.set_ylim(0, GRID_SIZE)
    for (s, c), text in (labels or {}).items():
        ax.text(2 * (c - 1) + 1, 2 * (s - 1) + 0.1, text, ha="center", va="bottom", fontsize=6, color="0.1",
                bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.6})
    ax.set_title(title, fontsize=10)
    bar = fig.colorbar(image, ax=ax, shrink=0.85)
    bar.set_label(unit or "value")
    if limits is None:
        ax.text(6, 6, "no values", ha="center", va="center")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata=metadata or {})
    return buf.getvalue()


def _cmap() -> Any:
    from matplotlib import colormaps

    return colormaps["viridis"].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))  # missing: blank


def text_grid(grid: list[list[float | None]], fmt: str = "{:5.2f}") -> str:
    """A text rendering of the 12 x 12 grid, top row first (slice 6), as seen on the FPA."""
    lines = []
    width = len(fmt.format(0.0))
    header = "      " + " ".join(f"C{c}".center(2 * width + 1) for c in range(1, 7))
    lines.append(header)
    for r in range(GRID_SIZE - 1, -1, -1):
        cells = []
        for x in range(GRID_SIZE):
            v = grid[r][x]
            cells.append(("." * width).rjust(width) if v is None else fmt.format(v))
        label = f"S{r // 2 + 1}" if r % 2 == 1 else "  "
        lines.append(f"{label:<5} " + " ".join(cells))
    return "\n".join(lines)


__all__ = ["color_limits", "heatmap_png", "text_grid"]
