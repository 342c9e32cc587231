"""Family-specific FPA products beyond the maps, under ``<root>/FPA/<family>/`` (atomic writes):

- nl: ``nl_curves.json`` (``{"layout", "curves": {TEST: {block: {CCD: {Q: {"fluence_adu": [...],
  "nl_pct": [...]}}}}}, "missing": {TEST: [blocks]}}``, from each block's ``nl_curves.fits``) and
  ``nl_curves_<TEST>.png`` (12 x 12 small panels, NL % vs fluence, FPA orientation, missing blank);
- bf: ``bf_matrices.json`` (``{"layout", "a": {TEST: {block: {CCD: {Q: [[a]]}}}}, "a_source":
  {TEST: {block: "bf_kernels" | "results"}}, "cov": {TEST: {block: {CCD: {Q: {"mu_adu", "cov_adu2"}}}}}}``;
  a[j parallel lag][i serial lag], 1/e-; cov at the highest fluence of ``bf_covariances.fits``) and
  ``bf_a_matrix_<TEST>.png`` (12 x 12 panels of log10 |a|);
- ptc: ``ptc_gain_conditions.json`` (``{block: {axis: {TEST: {"value", "gain": {CCD: {Q: g}}}}}}``,
  axes ``wavelength_nm`` (PTC01 = 800 nm, ``PTC02_<nm>``), ``temperature_K`` (``PTC02_<T>K``),
  ``rd_v`` (``PTC02_<RD>R``)), per block with a PTC02 ``ptc_gain_conditions_<block>.csv`` / ``.png``;
- psf: ``psf_crosstalk_matrices.json`` (``{TEST: {block: {"order": [12 "CCDn.Q"], "matrix": 12 x 12,
  row = source, column = victim, |coupling|, null on the diagonal / unmeasured}}}``),
  ``psf_crosstalk_matrix_<block>_<TEST>.png`` (log colour scale) and
  ``psf_crosstalk_requirement_<TEST>.png`` (the dominant coupling of every victim on the FPA,
  failing victims crossed);
- bias: ``bias_history_<block>.png`` (offsets and RON of every test run vs time);
- cosmetics: ``cosmetics_defect_mask.fits``, the mosaic of COSMETICS00's mask ORed with the
  DARK01 mask (bits 1 hot, 2 cold, 4 column) and the FLAT masks (flat bits 1 low, 2 high, 4
  n-sigma -> 8, 16, 32).

Data assembly is pure (``*_data`` functions); drawing uses matplotlib's Agg canvas (no pyplot).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np

from services.analyzer.products import atomic_write, write_json
from services.metatest.aggregate import XTALK_MAX, XTALK_SECONDARY, FamilyResult, ResultRecord
from services.metatest.families import FAMILIES
from services.metatest.layout import CCDS, GRID_SIZE, QUADRANTS, FPALayout
from services.metatest.mosaic import MosaicInput, write_mosaic
from shared.events import derived_event_id

log = logging.getLogger("vison.metatest")

QUADRANT_ORDER = [f"{c}.{q}" for c in CCDS for q in QUADRANTS]  # crosstalk rows / columns
#: mask bits of DARK01 (as COSMETICS00's dark bits) and of the FLAT masks in the merged defect mask
DARK_BITS: tuple[tuple[int, int], ...] = ()
FLAT_BITS: tuple[tuple[int, int], ...] = ((1, 8), (2, 16), (4, 32))
NOMINAL_WAVELENGTH_NM = 800.0  # PTC01


def safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text)


def find_product(root: Path, rec: ResultRecord, filename: str) -> Path | None:
    """``filename`` among the record's products, else in ``<root>/<block>/<test label>/``."""
    for rel in rec.products:
        if Path(rel).name == filename:
            path = Path(root) / rel
            if path.is_file():
                return path
    path = Path(root) / rec.block / rec.label / filename
    return path if path.is_file() else None


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _png(fig: Any, dpi: int = 72, signature: str = "") -> Callable[[Path], None]:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": "vison", "InputSig": signature} if signature else None)
    data = buf.getvalue()
    return lambda tmp: Path(tmp).write_bytes(data)


def signature_of(*parts: Any) -> str:
    """A short hash of the inputs of a per-block figure (its PNG's ``InputSig``)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _up_to_date(path: Path, signature: str) -> bool:
    """True when ``path`` is a PNG drawn from the same inputs (a per-block figure is redrawn only
    when that block's inputs changed: a recomputation for another block stays fast)."""
    if not path.is_file():
        return False
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.info.get("InputSig") == signature
    except Exception:  # unreadable: redraw
        return False


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _by_test(result: FamilyResult, pattern: str) -> dict[str, list[ResultRecord]]:
    import fnmatch

    out: dict[str, list[ResultRecord]] = {}
    for (block, test), rec in sorted(result.records.items()):
        if fnmatch.fnmatchcase(test, pattern):
            out.setdefault(test, []).append(rec)
    return out


def fpa_cells_axes(fig: Any, title: str) -> Any:
    """One axes spanning the 12 x 12 quadrant cells of the FPA (cell (row, col) = the unit square at
    x = col, y = row; row 0 at the bottom), CCD and block boundaries drawn, C1..C6 / S1..S6 ticks.
    Drawing every quadrant in one axes keeps a 144-panel figure fast."""
    ax = fig.add_subplot()
    for k in range(0, GRID_SIZE + 1):
        ax.axhline(k, color="0.85" if k % 2 else "0.3", lw=0.4 if k % 2 else 1.0, zorder=0)
        ax.axvline(k, color="0.85" if k % 2 else "0.3", lw=0.4 if k % 2 else 1.0, zorder=0)
    ax.axvline(6, color="black", lw=2.0)
    ax.set_xticks([2 * i + 1 for i in range(6)], [f"C{i + 1}" for i in range(6)])
    ax.set_yticks([2 * i + 1 for i in range(6)], [f"S{i + 1}" for i in range(6)])
    ax.set_xlim(0, GRID_SIZE)
    ax.set_ylim(0, GRID_SIZE)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=10)
    return ax


def _label_cells(ax: Any, layout: FPALayout, cells: list[tuple[str, str, str]]) -> None:
    for block, ccd, q in cells:
        r, c = layout.cell(block, ccd, q)
        ax.text(c + 0.04, r + 0.96, f"{block[:5]} {ccd[-1]}{q}", fontsize=3.5, va="top", color="0.3")


# --------------------------------------------------------------------------- nl: curves per quadrant


def nl_curve_table(path: Path, points: int = 60) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{CCD: {Q: {"fluence_adu", "nl_pct"}}}`` of an ``nl_curves.fits`` table (columns ccd,
    quadrant, fluence, nl_pct), each curve decimated to at most ``points`` points."""
    from astropy.table import Table

    t = Table.read(str(path), hdu="TABLE") if _has_hdu(path, "TABLE") else Table.read(str(path))
    for col in ("ccd", "quadrant", "fluence", "nl_pct"):
        if col not in t.colnames:
            raise ValueError(f"{path.name}: no column {col!r} (has {', '.join(t.colnames)})")
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for row in t:
        f = np.atleast_1d(np.asarray(row["fluence"], dtype=float))
        nl = np.atleast_1d(np.asarray(row["nl_pct"], dtype=float))
        idx = np.unique(np.linspace(0, f.size - 1, min(points, f.size)).round().astype(int)) if f.size else []
        ccd, q = str(row["ccd"]).strip(), str(row["quadrant"]).strip()
        out.setdefault(ccd, {})[q] = {"fluence_adu": [float(f[i]) for i in idx], "nl_pct": [float(nl[i]) for i in idx]}
    return out


def _has_hdu(path: Path, name: str) -> bool:
    from astropy.io import fits

    with fits.open(str(path)) as hdul:
        return name in hdul


def nl_curves_data(result: FamilyResult, products_root: Path, points: int = 60) -> dict[str, Any]:
    """``{"curves": {TEST: {block: {CCD: {Q: curve}}}}, "missing": {TEST: [FPA blocks without curves]}}``."""
    curves: dict[str, dict[str, Any]] = {}
    for test, recs in _by_test(result, "NL0*").items():
        for rec in recs:
            path = find_product(products_root, rec, "nl_curves.fits")
            if path is None:
                continue
            try:
                curves.setdefault(test, {})[rec.block] = nl_curve_table(path, points)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("%s %s: NL curves not read: %s", rec.block, test, exc)
    return {"curves": curves}


def _draw_nl(fig: Any, layout: FPALayout, per_block: dict[str, Any], title: str) -> None:
    """Each quadrant's NL % vs fluence in its FPA cell, on common axes (0..max fluence, NL range)."""
    from matplotlib.collections import LineCollection

    present = {(b, c, q): cv for b, ccds in per_block.items() if layout.on_fpa(b)
               for c, qs in ccds.items() for q, cv in qs.items() if cv["fluence_adu"]}
    ax = fpa_cells_axes(fig, title)
    if not present:
        ax.text(6, 6, "no curves", ha="center", va="center")
        return
    nl = np.array([v for cv in present.values() for v in cv["nl_pct"]], dtype=float)
    fmax = float(np.nanmax([v for cv in present.values() for v in cv["fluence_adu"]])) or 1.0
    lo, hi = float(np.nanmin(np.append(nl, 0.0))), float(np.nanmax(np.append(nl, 0.0)))
    pad = 0.1 * (hi - lo) or 0.1
    lo, hi = lo - pad, hi + pad
    lines, zeros = [], []
    for (b, c, q), cv in present.items():
        r, x0 = layout.cell(b, c, q)
        x = x0 + 0.05 + 0.9 * np.asarray(cv["fluence_adu"], dtype=float) / fmax
        y = r + 0.05 + 0.9 * (np.asarray(cv["nl_pct"], dtype=float) - lo) / (hi - lo)
        lines.append(np.column_stack([x, y]))
        y0 = r + 0.05 + 0.9 * (0.0 - lo) / (hi - lo)
        zeros.append([(x0 + 0.05, y0), (x0 + 0.95, y0)])
    ax.add_collection(LineCollection(zeros, colors="0.7", linewidths=0.4))
    ax.add_collection(LineCollection(lines, colors="tab:blue", linewidths=0.8))
    _label_cells(ax, layout, list(present))
    ax.text(GRID_SIZE, GRID_SIZE + 0.05, f"each cell: x fluence 0..{fmax:.0f} ADU, y NL {lo:.2f}..{hi:.2f} % "
            "(grey: 0 %)", ha="right", va="bottom", fontsize=7)


def nl_products(result: FamilyResult, layout: FPALayout, products_root: Path, out: Path, figures: bool) -> list[Path]:
    data = nl_curves_data(result, products_root)
    if not data["curves"]:
        return []
    data["missing"] = {t: [b for b in layout.fpa_blocks if b not in per] for t, per in data["curves"].items()}
    paths = [write_json(out / "nl_curves.json", {"layout": layout.layout_doc(), **data})]
    if figures:
        for test, per_block in data["curves"].items():
            fig = _figure((12, 12))
            fig.subplots_adjust(left=0.05, right=0.98, bottom=0.04, top=0.94)
            _draw_nl(fig, layout, per_block, f"FPA NL curves {test}: NL % vs measured fluence (ADU) per quadrant")
            paths.append(atomic_write(out / f"nl_curves_{safe_name(test)}.png", _png(fig)))
    return paths


# --------------------------------------------------------------------------- bf: a-matrices, covariances


def a_from_results(quad: dict[str, Any]) -> list[list[float | None]] | None:
    """The 2 x 2 a-matrix ``[[a00, a10], [a01, a11]]`` (rows parallel lag) of a quadrant's results."""
    vals = [_num(quad.get(k)) for k in ("a00", "a10", "a01", "a11")]
    if all(v is None for v in vals):
        return None
    return [[vals[0], vals[1]], [vals[2], vals[3]]]


def _matrix(arr: np.ndarray) -> list[list[float | None]]:
    return [[_num(v) for v in row] for row in np.asarray(arr, dtype=float)]


def bf_data(result: FamilyResult, products_root: Path) -> dict[str, Any]:
    """a-matrices (``bf_kernels_<CCD>.fits`` A_<Q>, else the results' a00/a10/a01/a11) and the
    covariance map at the highest fluence (``bf_covariances.fits``) of every block's BF01*."""
    from astropy.io import fits
    from astropy.table import Table

    a: dict[str, dict[str, Any]] = {}
    source: dict[str, dict[str, str]] = {}
    cov: dict[str, dict[str, Any]] = {}
    for test, recs in _by_test(result, "BF01*").items():
        for rec in recs:
            block_a: dict[str, dict[str, Any]] = {}
            kind = "results"
            for ccd in CCDS:
                path = find_product(products_root, rec, f"bf_kernels_{ccd}.fits")
                for q in QUADRANTS:
                    m = None
                    if path is not None:
                        try:
                            with fits.open(str(path)) as hdul:
                                if f"A_{q}" in hdul:
                                    m = _matrix(hdul[f"A_{q}"].data)
                                    kind = "bf_kernels"
                        except OSError as exc:
                            log.warning("%s: %s", path.name, exc)
                    if m is None:
                        m = a_from_results((rec.results.get(ccd) or {}).get(q) or {})
                    if m is not None:
                        block_a.setdefault(ccd, {})[q] = m
            if block_a:
                a.setdefault(test, {})[rec.block] = block_a
                source.setdefault(test, {})[rec.block] = kind
            path = find_product(products_root, rec, "bf_covariances.fits")
            if path is not None:
                try:
                    t = Table.read(str(path), hdu="TABLE") if _has_hdu(path, "TABLE") else Table.read(str(path))
                    best: dict[tuple[str, str], tuple[float, np.ndarray]] = {}
                    for row in t:
                        key = (str(row["ccd"]).strip(), str(row["quadrant"]).strip())
                        mu = float(row["mu"])
                        if key not in best or mu > best[key][0]:
                            best[key] = (mu, np.asarray(row["cov"], dtype=float))
                    for (ccd, q), (mu, c) in best.items():
                        cov.setdefault(test, {}).setdefault(rec.block, {}).setdefault(ccd, {})[q] = {
                            "mu_adu": mu, "cov_adu2": _matrix(c)}
                except (OSError, ValueError, KeyError) as exc:
                    log.warning("%s %s: covariances not read: %s", rec.block, test, exc)
    return {"a": a, "a_source": source, "cov": cov}


def _draw_bf(fig: Any, layout: FPALayout, per_block: dict[str, Any], title: str) -> None:
    """log10 |a| of each quadrant's a-matrix as an image in its FPA cell (x serial, y parallel lag)."""
    present = {(b, c, q): np.array([[np.nan if v is None else v for v in row] for row in m], dtype=float)
               for b, ccds in per_block.items() if layout.on_fpa(b) for c, qs in ccds.items() for q, m in qs.items()}
    ax = fpa_cells_axes(fig, title)
    if not present:
        return
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = {k: np.log10(np.abs(m)) for k, m in present.items()}
    finite = np.concatenate([v[np.isfinite(v)] for v in logs.values()])
    lo, hi = (float(np.percentile(finite, 2)), float(np.percentile(finite, 98))) if finite.size else (-9.0, -5.0)
    hi = hi if hi > lo else lo + 1.0
    image = None
    for (b, c, q), m in logs.items():  # each matrix fills its cell
        r, x = layout.cell(b, c, q)
        image = ax.imshow(np.ma.masked_invalid(m), origin="lower", cmap="magma", vmin=lo, vmax=hi,
                          interpolation="nearest", extent=(x + 0.04, x + 0.96, r + 0.04, r + 0.86), zorder=1)
    ax.set_xlim(0, GRID_SIZE)
    ax.set_ylim(0, GRID_SIZE)
    _label_cells(ax, layout, list(present))
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("log10 |a| (1/e-)")


def bf_products(result: FamilyResult, layout: FPALayout, products_root: Path, out: Path, figures: bool) -> list[Path]:
    data = bf_data(result, products_root)
    if not data["a"] and not data["cov"]:
        return []
    paths = [write_json(out / "bf_matrices.json", {"layout": layout.layout_doc(), **data})]
    if figures:
        for test, per_block in data["a"].items():
            fig = _figure((12, 11))
            fig.subplots_adjust(left=0.05, right=0.98, bottom=0.04, top=0.95)
            _draw_bf(fig, layout, per_block, f"FPA brighter-fatter a-matrices {test} (x: serial lag, y: parallel lag)")
            paths.append(atomic_write(out / f"bf_a_matrix_{safe_name(test)}.png", _png(fig)))
    return paths


# --------------------------------------------------------------------------- ptc: gain vs conditions

_COND = re.compile(r"^PTC02_(\d+(?:\.\d+)?)([KR]?)$")
AXES = {"": "wavelength_nm", "K": "temperature_K", "R": "rd_v"}
AXIS_LABELS = {"wavelength_nm": "wavelength (nm)", "temperature_K": "temperature (K)", "rd_v": "RD (V)"}


def condition_of(test: str) -> tuple[str, float] | None:
    """``(axis, value)`` of a PTC test: PTC01 -> wavelength 800 nm; ``PTC02_590`` -> wavelength,
    ``PTC02_150K`` -> temperature (K), ``PTC02_15.5R`` -> RD (V); None otherwise."""
    if test == "PTC01":
        return "wavelength_nm", NOMINAL_WAVELENGTH_NM
    m = _COND.match(test)
    return (AXES[m.group(2)], float(m.group(1))) if m else None


def gain_conditions_data(result: FamilyResult) -> dict[str, dict[str, dict[str, Any]]]:
    """``{block: {axis: {TEST: {"value": x, "gain": {CCD: {Q: g}}}}}}`` of the blocks with a PTC02."""
    family = FAMILIES[result.family]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (block, test) in sorted(result.records):
        cond = condition_of(test)
        values = result.values.get(family.quantity_name("gain", test), {}).get(block)
        if cond is None or values is None:
            continue
        axis, x = cond
        out.setdefault(block, {}).setdefault(axis, {})[test] = {
            "value": x, "gain": {c: {q: (values.get(c) or {}).get(q) for q in QUADRANTS} for c in CCDS}}
    return {b: axes for b, axes in out.items() if any(t != "PTC01" for per in axes.values() for t in per)}


def gain_condition_rows(block: str, axes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for axis, tests in axes.items():
        for test, item in sorted(tests.items(), key=lambda kv: kv[1]["value"]):
            for c in CCDS:
                for q in QUADRANTS:
                    rows.append({"BLOCK": block, "CCD": c, "QUAD": q, "TEST": test, "AXIS": axis,
                                 "VALUE": item["value"], "GAIN": item["gain"][c][q]})
    return rows


def _draw_gain(fig: Any, block: str, axes: dict[str, dict[str, Any]]) -> None:
    names = [a for a in AXIS_LABELS if a in axes]
    for k, axis in enumerate(names):
        ax = fig.add_subplot(1, len(names), k + 1)
        tests = sorted(axes[axis].values(), key=lambda item: item["value"])
        xs = [t["value"] for t in tests]
        for c in CCDS:
            for q in QUADRANTS:
                ys = [np.nan if t["gain"][c][q] is None else t["gain"][c][q] for t in tests]
                ax.plot(xs, ys, "o-", ms=3, lw=0.8, label=f"{c[-1]}{q}")
        ax.set_xlabel(AXIS_LABELS[axis])
        ax.set_ylabel("gain (e-/ADU)")
        ax.grid(alpha=0.3)
    if fig.axes:
        fig.axes[0].legend(fontsize=6, ncol=3)
    fig.suptitle(f"{block}: gain vs wavelength, temperature and RD (PTC01, PTC02_*)", fontsize=10)


def ptc_products(result: FamilyResult, layout: FPALayout, out: Path, figures: bool) -> list[Path]:
    data = gain_conditions_data(result)
    if not data:
        return []
    paths = [write_json(out / "ptc_gain_conditions.json", data)]
    for block, axes in data.items():
        rows = gain_condition_rows(block, axes)
        paths.append(write_csv(out / f"ptc_gain_conditions_{safe_name(block)}.csv", list(rows[0]), rows))
        path, sig = out / f"ptc_gain_conditions_{safe_name(block)}.png", signature_of(block, axes)
        if figures and not _up_to_date(path, sig):
            fig = _figure((4.5 * len(axes), 4.2))
            fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.88, wspace=0.3)
            _draw_gain(fig, block, axes)
            atomic_write(path, _png(fig, 80, sig))
        if figures:
            paths.append(path)
    return paths


def write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    text = buf.getvalue()
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# --------------------------------------------------------------------------- psf: crosstalk


def crosstalk_matrix(xt: dict[str, dict[str, Any]]) -> list[list[float | None]]:
    """12 x 12 ``|coupling|`` (row = source, column = victim, :data:`QUADRANT_ORDER`); None on the
    diagonal and where not measured."""
    m: list[list[float | None]] = [[None] * len(QUADRANT_ORDER) for _ in QUADRANT_ORDER]
    for i, src in enumerate(QUADRANT_ORDER):
        for j, vic in enumerate(QUADRANT_ORDER):
            v = _num(((xt or {}).get(src) or {}).get(vic)) if i != j else None
            m[i][j] = abs(v) if v is not None else None
    return m


def crosstalk_data(result: FamilyResult) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for (block, test), rec in sorted(result.records.items()):
        xt = rec.results.get("crosstalk")
        if isinstance(xt, dict):
            out.setdefault(test, {})[block] = {"order": QUADRANT_ORDER, "matrix": crosstalk_matrix(xt)}
    return out


def _draw_xt_matrix(fig: Any, matrix: list[list[float | None]], title: str) -> None:
    from matplotlib.colors import LogNorm

    arr = np.array([[np.nan if v is None or v <= 0 else v for v in row] for row in matrix], dtype=float)
    ax = fig.add_subplot()
    finite = arr[np.isfinite(arr)]
    lo = max(float(finite.min()), 1e-8) if finite.size else 1e-7
    hi = max(float(finite.max()), lo * 10) if finite.size else 1e-3
    image = ax.imshow(np.ma.masked_invalid(arr), cmap="viridis", norm=LogNorm(vmin=lo, vmax=hi), interpolation="nearest")
    labels = [s.replace("CCD", "") for s in QUADRANT_ORDER]
    ax.set_xticks(range(12), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(12), labels, fontsize=7)
    ax.set_xlabel("victim quadrant")
    ax.set_ylabel("source quadrant")
    for k in (4, 8):
        ax.axhline(k - 0.5, color="white", lw=1)
        ax.axvline(k - 0.5, color="white", lw=1)
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(image, ax=ax, shrink=0.85)
    bar.set_label("|coupling| (victim / source ADU)")


def _draw_xt_requirement(fig: Any, grid: np.ndarray, failing: np.ndarray, title: str) -> None:
    from matplotlib.colors import LogNorm

    ax = fig.add_subplot()
    finite = grid[np.isfinite(grid) & (grid > 0)]
    lo = min(float(finite.min()), XTALK_SECONDARY) if finite.size else XTALK_SECONDARY / 10
    hi = max(float(finite.max()), XTALK_MAX) if finite.size else XTALK_MAX
    image = ax.imshow(np.ma.masked_invalid(np.where(grid > 0, grid, np.nan)), origin="lower", cmap="viridis",
                      norm=LogNorm(vmin=lo, vmax=hi), interpolation="nearest", extent=(0, GRID_SIZE, 0, GRID_SIZE))
    for r, c in zip(*np.nonzero(failing)):
        ax.plot([c + 0.15, c + 0.85], [r + 0.15, r + 0.85], color="red", lw=1.5)
        ax.plot([c + 0.15, c + 0.85], [r + 0.85, r + 0.15], color="red", lw=1.5)
    for k in range(0, GRID_SIZE + 1, 2):
        ax.axhline(k, color="0.3", lw=1.0)
        ax.axvline(k, color="0.3", lw=1.0)
    ax.axvline(6, color="black", lw=2.0)
    ax.set_xticks([2 * i + 1 for i in range(6)], [f"C{i + 1}" for i in range(6)])
    ax.set_yticks([2 * i + 1 for i in range(6)], [f"S{i + 1}" for i in range(6)])
    ax.set_xlim(0, GRID_SIZE)
    ax.set_ylim(0, GRID_SIZE)
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(image, ax=ax, shrink=0.85)
    bar.set_label("dominant coupling into the victim")
    bar.ax.axhline(XTALK_MAX, color="red", lw=1)


def crosstalk_requirement_grid(result: FamilyResult, layout: FPALayout, test: str) -> tuple[np.ndarray, np.ndarray]:
    """(dominant coupling, failing) 12 x 12 of ``test`` (NaN / False where missing)."""
    family = FAMILIES[result.family]
    dom = np.full((GRID_SIZE, GRID_SIZE), np.nan)
    bad = np.zeros((GRID_SIZE, GRID_SIZE), dtype=bool)
    vmax = result.values.get(family.quantity_name("crosstalk_max", test), {})
    vok = result.values.get(family.quantity_name("crosstalk_ok", test), {})
    for block in layout.fpa_blocks:
        for c in CCDS:
            for q in QUADRANTS:
                cell = layout.cell(block, c, q)
                v = ((vmax.get(block) or {}).get(c) or {}).get(q)
                ok = ((vok.get(block) or {}).get(c) or {}).get(q)
                if v is not None:
                    dom[cell] = v
                if ok is not None and not ok:
                    bad[cell] = True
    return dom, bad


def psf_products(result: FamilyResult, layout: FPALayout, out: Path, figures: bool) -> list[Path]:
    data = crosstalk_data(result)
    if not data:
        return []
    paths = [write_json(out / "psf_crosstalk_matrices.json", data)]
    if figures:
        for test, per_block in data.items():
            for block, item in per_block.items():
                path = out / f"psf_crosstalk_matrix_{safe_name(block)}_{safe_name(test)}.png"
                sig = signature_of(block, test, item)
                if not _up_to_date(path, sig):
                    fig = _figure((6.4, 5.6))
                    fig.subplots_adjust(left=0.12, right=0.98, bottom=0.14, top=0.93)
                    _draw_xt_matrix(fig, item["matrix"], f"{block} {test}: optical crosstalk (log scale)")
                    atomic_write(path, _png(fig, 80, sig))
                paths.append(path)
            dom, bad = crosstalk_requirement_grid(result, layout, test)
            per = (result.summary.get("crosstalk") or {}).get(test, {})
            met = sum(1 for b in per.values() if b["requirement_met"])
            fig = _figure((6.4, 5.6))
            fig.subplots_adjust(left=0.08, right=0.98, bottom=0.07, top=0.9)
            _draw_xt_requirement(fig, dom, bad, f"{test}: crosstalk requirement (dominant <= {XTALK_MAX:g}, at most one "
                                 f"> {XTALK_SECONDARY:g})\n{met}/{len(per)} blocks met; {int(bad.sum())} failing "
                                 "victims (x)")
            paths.append(atomic_write(out / f"psf_crosstalk_requirement_{safe_name(test)}.png", _png(fig, 80)))
    return paths


# --------------------------------------------------------------------------- bias: offsets and RON vs time


def _draw_history(fig: Any, block: str, rows: list[dict[str, Any]], keys: list[list[str]]) -> None:
    for k, group in enumerate(keys):
        ax = fig.add_subplot(len(keys), 1, k + 1)
        for key in group:
            for c in CCDS:
                for q in QUADRANTS:
                    pts = [(datetime.fromisoformat(r["PRODUCED_AT"]), r[key]) for r in rows
                           if r["CCD"] == c and r["QUAD"] == q and r.get(key) is not None]
                    if pts:
                        ax.plot([t for t, _ in pts], [v for _, v in pts], "o-", ms=2.5, lw=0.7,
                                label=f"{key} {c[-1]}{q}" if len(group) > 1 else f"{c[-1]}{q}")
        ax.set_ylabel(", ".join(group) + " (ADU)", fontsize=8)
        ax.grid(alpha=0.3)
    tests: dict[str, datetime] = {}
    for r in rows:
        tests.setdefault(r["TEST"], datetime.fromisoformat(r["PRODUCED_AT"]))
    if fig.axes:
        top = fig.axes[0]
        for name, t in tests.items():
            top.axvline(t, color="0.8", lw=0.5)
            top.text(t, 1.0, name, transform=top.get_xaxis_transform(), rotation=45, fontsize=6, va="bottom")
        fig.axes[-1].legend(fontsize=5, ncol=6)
        fig.axes[-1].set_xlabel("analysis time (UTC)")
    fig.suptitle(f"{block}: offsets and RON across all tests (stability)", fontsize=10, y=0.995)


def bias_products(result: FamilyResult, out: Path, history: list[dict[str, Any]] | None, figures: bool) -> list[Path]:
    if not figures or not history:
        return []
    paths = []
    for block in sorted({r["BLOCK"] for r in history}):
        rows = [r for r in history if r["BLOCK"] == block]
        groups = [[k for k in ("offset_pre", "offset_img", "offset_ove") if any(r.get(k) is not None for r in rows)],
                  [k for k in ("ron_pre_adu", "ron_img_adu", "ron_ove_adu") if any(r.get(k) is not None for r in rows)]]
        groups = [g for g in groups if g]
        if not groups:
            continue
        path, sig = out / f"bias_history_{safe_name(block)}.png", signature_of(rows, groups)
        if not _up_to_date(path, sig):
            fig = _figure((10, 3.2 * len(groups) + 1))
            fig.subplots_adjust(left=0.09, right=0.98, bottom=0.1, top=0.85, hspace=0.25)
            _draw_history(fig, block, rows, groups)
            atomic_write(path, _png(fig, 80, sig))
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- cosmetics: merged defect mask


def defect_mask_inputs(result: FamilyResult, layout: FPALayout, products_root: Path) -> tuple[list[MosaicInput], list[str]]:
    """Per FPA CCD: COSMETICS00's ``cosmetics_masks_<CCD>.fits`` MASK ORed with the DARK01
    ``master_dark_<CCD>.fits`` MASK and every FLAT ``master_flat_<CCD>.fits`` MASK (flat bits remapped
    by :data:`FLAT_BITS`); the event ids used."""
    import fnmatch

    sources = (("COSMETICS00", "cosmetics_masks", ()), ("DARK01", "master_dark", DARK_BITS),
               ("FLAT0[12]*", "master_flat", FLAT_BITS))
    inputs, used = [], []
    for block in layout.fpa_blocks:
        recs = {t: r for (b, t), r in result.records.items() if b == block}
        for ccd in CCDS:
            found: list[tuple[str, Path, tuple[tuple[int, int], ...], str]] = []
            for pattern, stem, bits in sources:
                for test in sorted(t for t in recs if fnmatch.fnmatchcase(t, pattern)):
                    path = find_product(products_root, recs[test], f"{stem}_{ccd}.fits")
                    if path is not None:
                        found.append((test, path, bits, recs[test].event_id))
            if not found:
                continue
            (test, path, bits, _), rest = found[0], found[1:]
            inputs.append(MosaicInput(block, ccd, "+".join(t for t, *_ in found), path, "MASK",
                                      merge=tuple((p, "MASK", b) for _, p, b, _ in rest), bits=bits))
            used += [e for *_, e in found]
    return inputs, sorted(set(used))


def cosmetics_products(result: FamilyResult, layout: FPALayout, products_root: Path, out: Path) -> list[Path]:
    inputs, used = defect_mask_inputs(result, layout, products_root)
    if not inputs:
        return []
    path = out / "cosmetics_defect_mask.fits"
    signature = str(derived_event_id("metatest.mosaic", path.name, *used))
    write_mosaic(path, inputs, layout, title="FPA defect mask: COSMETICS00 | DARK01 | FLAT masks", signature=signature,
                 header={"FAMILY": "cosmetics", "MASKBIT1": "hot", "MASKBIT2": "cold", "MASKBIT4": "whole column",
                         "MASKBIT8": "flat low", "MASKBT16": "flat high", "MASKBT32": "flat n-sigma (FLAT masks)"})
    return [path]


# --------------------------------------------------------------------------- dispatch


def extra_products(result: FamilyResult, layout: FPALayout, products_root: Path, out: Path, *, figures: bool = True,
                   mosaics: bool = True, history: list[dict[str, Any]] | None = None) -> list[Path]:
    """The family-specific products of ``result`` (see the module docstring); a product that cannot
    be written is logged and left out, never losing the maps."""
    makers: dict[str, Callable[[], list[Path]]] = {
        "nl": lambda: nl_products(result, layout, products_root, out, figures),
        "bf": lambda: bf_products(result, layout, products_root, out, figures),
        "ptc": lambda: ptc_products(result, layout, out, figures),
        "psf": lambda: psf_products(result, layout, out, figures),
        "bias": lambda: bias_products(result, out, history, figures),
        "cosmetics": lambda: cosmetics_products(result, layout, products_root, out) if mosaics else [],
    }
    maker = makers.get(result.family)
    if maker is None:
        return []
    try:
        return maker()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("family %s: extra products not written: %s: %s", result.family, exc.__class__.__name__, exc)
        return []


__all__ = ["QUADRANT_ORDER", "a_from_results", "bf_data", "condition_of", "crosstalk_matrix", "crosstalk_data",
           "crosstalk_requirement_grid", "defect_mask_inputs", "extra_products", "find_product",
           "gain_conditions_data", "nl_curve_table", "nl_curves_data"]
