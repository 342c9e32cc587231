"""FLAT01 / FLAT02: normalised flats, master flats, PRNU, photo-response defect mask.

Per frame and canonical quadrant (image area, 2066 x 2048):

- offset subtraction (per-row median of the trimmed prescan);
- smooth 2-D illumination model (bicubic smoothing spline through 32 x 32 binned medians by
  default, or a Legendre polynomial) and the normalised flat ``image / model``;
- fluence (clipped mean, ADU) and raw PRNU = clipped std of the normalised image (standard
  image trim [5, 5], 4-sigma clipping with the variance correction).

Per column of the script (frames at one exposure time / wavelength) and quadrant:

- master flat = per-pixel median of the normalised flats, error map = f(n) x std / sqrt(n)
  (f: std of a median / std of a mean of n Gaussian samples, 1.2533 for large n);
- shot noise measured from frame pairs, ``var(n_a - n_b) / 2`` (clipped, corrected), so no gain
  is needed; with one frame only, the expected ``(mu / g + RON^2) / mu^2`` (gain from params);
- PRNU % = 100 sqrt(raw variance - shot variance) (``prnu_pct``) beside the raw value
  (``prnu_raw_pct``) and the master-based ``sqrt(var(master) - mean(err^2))``.

Per CCD: master flat = inverse-variance weighted mean of the column masters (+ error), and the
photo-response defect mask of the master / its smooth model: bit 1 below ``defect_lo`` (0.5),
bit 2 above ``defect_hi`` (1.5), bit 4 beyond ``defect_nsigma`` robust sigmas.

Product arrays are canonical full quadrants (image area filled; prescan / overscan = 1 for
flats, 0 for errors and masks): ``shared.geometry.assemble`` turns them into raw-frame
orientation. Normalised flats are stacked as float16 deviations (precision < 1e-5) in row
chunks; a quadrant at a time when the stack of all four would exceed ``stack_memory_mb``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Sequence

import numpy as np
from pydantic import BaseModel, Field

from services.analyzer.analysis.common import (
    params_of,
    FrameInput,
    as_frames,
    clipped_stats,
    fit_smooth_2d,
    group_by,
    mad_std,
    subtract_offset,
)
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, QUADRANTS, STANDARD_TRIMS, region

TESTS = ("FLAT01", "FLAT02")

MASK_LOW = 1
MASK_HIGH = 2
MASK_NSIGMA = 4


@lru_cache(maxsize=None)
def median_error_factor(n: int) -> float:
    """std of the median of ``n`` Gaussian samples / std of their mean (1 for n <= 2, tends to
    sqrt(pi / 2) = 1.2533); Monte Carlo with a fixed seed (precision ~0.3 %)."""
    if n <= 2:
        return 1.0
    if n > 200:
        return float(np.sqrt(np.pi / 2))
    rng = np.random.default_rng(n)
    x = rng.standard_normal((max(20000, 400000 // n), n))
    return float(np.std(np.median(x, axis=1)) / np.std(x.mean(axis=1)))


class FlatParams(BaseModel):
    """Analysis parameters of FLAT01/02."""

    offset_method: str = Field("row", description="offset subtraction: row (per-row prescan median) | global")
    model: str = Field("spline", description="smooth illumination model: spline | poly")
    degree: int = Field(5, description="degree of the polynomial model (also the spline's fallback)")
    nbins: tuple[int, int] = Field((32, 32), description="bins (rows, cols) of the smooth model")
    nsigma: float = Field(4.0, description="clipping of fluence / PRNU statistics")
    defect_lo: float = Field(0.5, description="master / model below this: defect (bit 1)")
    defect_hi: float = Field(1.5, description="master / model above this: defect (bit 2)")
    defect_nsigma: float = Field(6.0, description="|master / model - 1| beyond this many robust sigmas: defect (bit 4)")
    bad_column_min: int = Field(100, description="defects in one column from which it counts as a bad column")
    stack_memory_mb: float = Field(1024.0, description="memory bound of the normalised-flat stack")
    chunk_rows: int = Field(128, description="rows per chunk of the median stack")
    stat_stride: int = Field(2, ge=1, description="PRNU / shot-noise statistics use every n-th row (speed; 1 = all)")
    gain: float | dict | None = Field(None, description="gain (e-/ADU), scalar or {CCD: {Q: g}}: shot noise of single frames")


class FlatFrameQuad(BaseModel):
    """Per frame and quadrant."""

    obsid: int
    ccd: str
    quadrant: str
    exptime: float
    column: int
    fluence_adu: float
    prnu_raw_pct: float
    model_rms: float = Field(description="rms of the binned residuals of the smooth model (ADU)")
    model_p2p_pct: float = Field(description="peak-to-peak of the illumination model / its mean (%)")


class FlatColumnQuad(BaseModel):
    """Per script column (fluence group) and quadrant."""

    column: int
    exptime: float
    wave: float | None
    n_frames: int
    fluence_adu: float
    flux_adu_s: float
    prnu_raw_pct: float
    shot_pct: float
    shot_method: str
    prnu_pct: float
    prnu_master_pct: float


class FlatQuadResult(BaseModel):
    """Per CCD quadrant result of FLAT01/02."""

    n_frames: int
    n_columns: int
    prnu_pct: float = Field(description="PRNU (%), shot noise removed: frame-weighted mean over columns")
    prnu_raw_pct: float = Field(description="PRNU (%) as the raw clipped std of the normalised frames")
    prnu_master_pct: float = Field(description="PRNU (%) from the CCD master flat (its noise removed)")
    shot_pct: float
    fluence_adu: list[float]
    column_prnu_pct: list[float]
    n_defects: int
    n_defects_low: int
    n_defects_high: int
    n_defects_nsigma: int
    n_bad_columns: int
    master_std_pct: float = Field(description="clipped std of the CCD master flat (%)")


@dataclass
class FlatAnalysis:
    """Output of :func:`analyse_flat`."""

    results: dict[str, dict[str, FlatQuadResult]]
    columns: dict[str, dict[str, list[FlatColumnQuad]]]
    frames: list[FlatFrameQuad]
    #: ``masters[CCD][name][Q]``: names ``col<k>``, ``col<k>_err`` per column, and ``master``,
    #: ``master_err``, ``mask`` for the CCD (canonical full-quadrant arrays).
    masters: dict[str, dict[str, dict[str, np.ndarray]]]
    figures: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    params: FlatParams = field(default_factory=FlatParams)

    def results_dict(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {c: {q: r.model_dump() for q, r in qs.items()} for c, qs in self.results.items()}


# ----------------------------------------------------------------------------- per frame


def normalise_quadrant(quad: np.ndarray, params: FlatParams) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(normalised image area float32, offset-subtracted image area float32, model rms (ADU),
    model peak-to-peak / mean (%)) of one canonical quadrant of a flat."""
    method = "global" if params.offset_method == "global" else "row"
    img = subtract_offset(quad, method)[:IMAGE_ROWS, PRESCAN_COLS : PRESCAN_COLS + IMAGE_COLS]
    sm = fit_smooth_2d(img, method="spline" if params.model == "spline" else "poly", degree=params.degree, nbins=params.nbins)
    model = sm.model
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(model > 0, img / model, np.nan).astype(np.float32)
    mean = float(model.mean())
    p2p = 100.0 * float(model.max() - model.min()) / mean if mean > 0 else float("nan")
    return norm, img, sm.rms_resid, p2p


def _trimmed(img: np.ndarray, stride: int = 1) -> np.ndarray:
    lead, trail = STANDARD_TRIMS["img"]
    return img[::stride, lead : img.shape[1] - trail]


def _gain_of(params: FlatParams, ccd: str, q: str) -> float | None:
    g = params.gain
    if isinstance(g, (int, float)):
        return float(g)
    if isinstance(g, dict):
        v = (g.get(ccd) or {}).get(q)
        return float(v) if v else None
    return None


def _stack_stats(stack: np.ndarray, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Median and error of the median (f(n) std / sqrt(n), :func:`median_error_factor`) along
    axis 0 of a float16 stack of deviations (n, rows, cols); float32, the median as 1 + median."""
    n, ny, nx = stack.shape
    med = np.empty((ny, nx), dtype=np.float32)
    err = np.zeros((ny, nx), dtype=np.float32)
    for r0 in range(0, ny, chunk_rows):
        block = stack[:, r0 : r0 + chunk_rows].astype(np.float32)
        med[r0 : r0 + chunk_rows] = 1.0 + np.nanmedian(block, axis=0) if np.isnan(block).any() else 1.0 + np.median(block, axis=0)
        if n > 1:
            err[r0 : r0 + chunk_rows] = median_error_factor(n) * np.nanstd(block, axis=0, ddof=1) / np.sqrt(n)
    return med, err


def _full_quadrant(image: np.ndarray, shape: tuple[int, int], fill: float, dtype=np.float32) -> np.ndarray:
    out = np.full(shape, fill, dtype=dtype)
    out[:IMAGE_ROWS, PRESCAN_COLS : PRESCAN_COLS + IMAGE_COLS] = image
    return out


def defect_mask(master: np.ndarray, params: FlatParams) -> tuple[np.ndarray, dict[str, int]]:
    """Photo-response defect mask (uint8 bits) of a master flat image area and the counts."""
    sm = fit_smooth_2d(master, method="poly", degree=params.degree, nbins=params.nbins)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(sm.model > 0, master / sm.model, np.nan)
    sig = mad_std(ratio)
    mask = np.zeros(master.shape, dtype=np.uint8)
    finite = np.isfinite(ratio)
    mask[finite & (ratio < params.defect_lo)] |= MASK_LOW
    mask[finite & (ratio > params.defect_hi)] |= MASK_HIGH
    if sig > 0:
        mask[finite & (np.abs(ratio - 1.0) > params.defect_nsigma * sig)] |= MASK_NSIGMA
    mask[~finite] |= MASK_LOW
    per_col = np.count_nonzero(mask, axis=0)
    counts = {
        "n_defects": int(np.count_nonzero(mask)),
        "n_defects_low": int(np.count_nonzero(mask & MASK_LOW)),
        "n_defects_high": int(np.count_nonzero(mask & MASK_HIGH)),
        "n_defects_nsigma": int(np.count_nonzero(mask & MASK_NSIGMA)),
        "n_bad_columns": int(np.count_nonzero(per_col >= params.bad_column_min)),
    }
    return mask, counts


def flat_columns(frames: Sequence[FrameInput]) -> list[list[int]]:
    """Frame indices per script column: ``meta["column"]`` when given, else groups of equal
    exposure time and wavelength, in order of first ObsID."""
    if frames and all("column" in f.meta for f in frames):
        cols: dict[Any, list[int]] = {}
        for i, f in enumerate(frames):
            cols.setdefault(f.meta["column"], []).append(i)
        groups = list(cols.values())
    else:
        by_wave: dict[Any, list[int]] = {}
        for i, f in enumerate(frames):
            by_wave.setdefault(f.wave, []).append(i)
        groups = []
        for idx in by_wave.values():
            groups += [[idx[k] for k in g] for g in group_by([frames[i].exptime for i in idx], rel_tol=1e-3)]
    return sorted((sorted(g, key=lambda i: frames[i].obsid) for g in groups), key=lambda g: frames[g[0]].obsid)


# ----------------------------------------------------------------------------- per CCD


def analyse_flat_ccd(ccd: str, frames: Sequence[FrameInput], params: FlatParams, quadrants: Sequence[str] = QUADRANTS):
    """All FLAT quantities of one CCD: (per-quadrant results, column rows, frame rows, masters)."""
    p = params
    columns = flat_columns(frames)
    frame_rows: list[FlatFrameQuad] = []
    col_rows: dict[str, list[FlatColumnQuad]] = {q: [] for q in quadrants}
    masters: dict[str, dict[str, np.ndarray]] = {}
    col_masters: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {q: [] for q in quadrants}
    quad_shape: tuple[int, int] | None = None
    img_bytes = IMAGE_ROWS * IMAGE_COLS * 2
    for k, col in enumerate(columns):
        n = len(col)
        per_pass = max(1, int(p.stack_memory_mb * 2**20 // max(n * img_bytes, 1)))
        passes = [list(quadrants)] if per_pass >= len(quadrants) else [list(quadrants[i : i + per_pass]) for i in range(0, len(quadrants), per_pass)]
        for qset in passes:
            stacks = {q: np.empty((n, IMAGE_ROWS, IMAGE_COLS), dtype=np.float16) for q in qset}
            raw_var = {q: [] for q in qset}
            shot_var = {q: [] for q in qset}
            flu = {q: [] for q in qset}
            ron = {q: [] for q in qset}
            prev: dict[str, np.ndarray] = {}
            for j, fi in enumerate(col):
                f = frames[fi]
                quads = f.load()
                for q in qset:
                    quad = quads[q]
                    quad_shape = quad.shape
                    norm, img, rms, mod_p2p = normalise_quadrant(quad, p)
                    st_img = clipped_stats(_trimmed(img, p.stat_stride), p.nsigma, subsample=7)
                    st_n = clipped_stats(_trimmed(norm, p.stat_stride), p.nsigma, subsample=7)
                    raw_var[q].append(st_n.var_corrected)
                    flu[q].append(st_img.mean)
                    ron[q].append(clipped_stats(region(quad, "ove", STANDARD_TRIMS["ove"]), p.nsigma).std_corrected)
                    stacks[q][j] = norm - 1.0
                    if j % 2 == 1:
                        other = prev.pop(q)
                        dst = clipped_stats(_trimmed(norm, p.stat_stride) - _trimmed(other, p.stat_stride), p.nsigma, subsample=7)
                        shot_var[q].append(dst.var_corrected / 2.0)
                    else:
                        prev[q] = norm
                    frame_rows.append(FlatFrameQuad(obsid=f.obsid, ccd=ccd, quadrant=q, exptime=f.exptime, column=k + 1,
                                                    fluence_adu=st_img.mean, prnu_raw_pct=100 * np.sqrt(st_n.var_corrected),
                                                    model_rms=rms, model_p2p_pct=mod_p2p))
                del quads
            for q in qset:
                med, err = _stack_stats(stacks[q], p.chunk_rows)
                del stacks[q]
                col_masters[q].append((med, err))
                masters.setdefault(f"col{k + 1}", {})[q] = med
                masters.setdefault(f"col{k + 1}_err", {})[q] = err
                mu = float(np.mean(flu[q]))
                rv = float(np.mean(raw_var[q]))
                if shot_var[q]:
                    sv, method = float(np.mean(shot_var[q])), "pairs"
                else:
                    g = _gain_of(p, ccd, q)
                    r = float(np.mean(ron[q]))
                    sv, method = ((mu / g + r * r) / mu**2, "gain") if g and mu > 0 else (float("nan"), "none")
                st_m = clipped_stats(_trimmed(med), p.nsigma, subsample=7)
                noise_m = float(np.mean(_trimmed(err).astype(np.float64) ** 2)) if n > 1 else float("nan")
                texp = frames[col[0]].exptime
                col_rows[q].append(FlatColumnQuad(
                    column=k + 1, exptime=texp, wave=frames[col[0]].wave, n_frames=n, fluence_adu=mu,
                    flux_adu_s=mu / texp if texp > 0 else float("nan"),
                    prnu_raw_pct=100 * np.sqrt(rv), shot_pct=100 * np.sqrt(sv) if sv >= 0 else float("nan"), shot_method=method,
                    prnu_pct=100 * np.sqrt(rv - sv) if np.isfinite(sv) and rv > sv else float("nan"),
                    prnu_master_pct=100 * np.sqrt(st_m.var_corrected - noise_m) if np.isfinite(noise_m) and st_m.var_corrected > noise_m else float("nan"),
                ))
    if quad_shape is None:
        raise ValueError(f"{ccd}: no frames")
    results: dict[str, FlatQuadResult] = {}
    for q in quadrants:
        meds = [m for m, _ in col_masters[q]]
        errs = [e for _, e in col_masters[q]]
        if len(meds) == 1 or any(not np.any(e) for e in errs):
            master = np.mean(meds, axis=0).astype(np.float32)
            merr = (np.sqrt(np.sum([e.astype(np.float64) ** 2 for e in errs], axis=0)) / len(errs)).astype(np.float32)
        else:
            w = [1.0 / np.maximum(e.astype(np.float64), 1e-6) ** 2 for e in errs]
            wsum = np.sum(w, axis=0)
            master = (np.sum([wi * m for wi, m in zip(w, meds)], axis=0) / wsum).astype(np.float32)
            merr = (1.0 / np.sqrt(wsum)).astype(np.float32)
        mask, counts = defect_mask(master, p)
        st = clipped_stats(_trimmed(master), p.nsigma, subsample=7)
        rows = col_rows[q]
        nf = np.array([r.n_frames for r in rows], dtype=float)

        def wmean(vals):
            v = np.array(vals, dtype=float)
            ok = np.isfinite(v)
            return float(np.sum(v[ok] * nf[ok]) / np.sum(nf[ok])) if ok.any() else float("nan")

        noise_m = float(np.mean(_trimmed(merr).astype(np.float64) ** 2))
        results[q] = FlatQuadResult(
            n_frames=int(nf.sum()), n_columns=len(rows),
            prnu_pct=wmean([r.prnu_pct for r in rows]), prnu_raw_pct=wmean([r.prnu_raw_pct for r in rows]),
            prnu_master_pct=100 * float(np.sqrt(st.var_corrected - noise_m)) if st.var_corrected > noise_m else float("nan"),
            shot_pct=wmean([r.shot_pct for r in rows]),
            fluence_adu=[r.fluence_adu for r in rows], column_prnu_pct=[r.prnu_pct for r in rows],
            master_std_pct=100 * st.std_corrected, **counts,
        )
        masters.setdefault("master", {})[q] = master
        masters.setdefault("master_err", {})[q] = merr
        masters.setdefault("mask", {})[q] = mask
    # expand to full canonical quadrants
    full: dict[str, dict[str, np.ndarray]] = {}
    for name, quads in masters.items():
        is_err = name.endswith("_err")
        for q, arr in quads.items():
            if name == "mask":
                full.setdefault(name, {})[q] = _full_quadrant(arr, quad_shape, 0, np.uint8)
            else:
                full.setdefault(name, {})[q] = _full_quadrant(arr, quad_shape, 0.0 if is_err else 1.0)
    return results, col_rows, frame_rows, full


def figure_data(masters: dict[str, dict[str, dict[str, np.ndarray]]], bins: int = 64) -> dict[str, Any]:
    """Thumbnails (binned 32 x 32 means of the image area) and histograms of the CCD masters."""
    out: dict[str, Any] = {}
    edges = np.linspace(0.9, 1.1, bins + 1)
    for ccd, names in masters.items():
        for q, arr in names.get("master", {}).items():
            img = arr[:IMAGE_ROWS, PRESCAN_COLS : PRESCAN_COLS + IMAGE_COLS]
            ny, nx = img.shape
            th = img[: ny // 64 * 64, : nx // 64 * 64].reshape(ny // 64, 64, nx // 64, 64).mean(axis=(1, 3))
            hist, _ = np.histogram(img, bins=edges)
            out.setdefault(ccd, {})[q] = {"thumb": th, "hist": hist, "edges": edges}
    return out


def analyse_flat(frames: Iterable[Any], definition: Any = None, params: FlatParams | dict | None = None,
                 quadrants: Sequence[str] = QUADRANTS) -> FlatAnalysis:
    """FLAT01 / FLAT02 analysis of a list of flats (all CCDs mixed; :class:`FrameInput` or dicts)."""
    p = params_of(FlatParams, params)
    fr = as_frames(frames)
    results: dict[str, dict[str, FlatQuadResult]] = {}
    columns: dict[str, dict[str, list[FlatColumnQuad]]] = {}
    frame_rows: list[FlatFrameQuad] = []
    masters: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    warn: list[str] = []
    for ccd in sorted({f.ccd for f in fr}):
        sub = [f for f in fr if f.ccd == ccd]
        res, cols, rows, full = analyse_flat_ccd(ccd, sub, p, quadrants)
        results[ccd], columns[ccd], masters[ccd] = res, cols, full
        frame_rows += rows
        for q, r in res.items():
            if not np.isfinite(r.prnu_pct):
                warn.append(f"{ccd} {q}: shot-noise-corrected PRNU unavailable (single frames and no gain)")
            if r.n_bad_columns:
                warn.append(f"{ccd} {q}: {r.n_bad_columns} bad column(s) in the photo-response mask")
    return FlatAnalysis(results=results, columns=columns, frames=frame_rows, masters=masters, figures=figure_data(masters),
                        warnings=warn, params=p)


# ----------------------------------------------------------------------------- analyzer plug-in

PARAMS = FlatParams


def _draw_masters(fig: Any, figs: dict[str, Any]) -> None:
    """Binned master flats (rows: CCDs, columns: quadrants in canonical orientation)."""
    ccds = sorted(figs)
    axes = np.atleast_2d(fig.subplots(max(len(ccds), 1), 4))
    for i, ccd in enumerate(ccds):
        for j, q in enumerate(QUADRANTS):
            ax = axes[i, j]
            d = figs[ccd].get(q)
            ax.set_title(f"{ccd} {q}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
            if d is None:
                continue
            th = d["thumb"]
            im = ax.imshow(th, origin="lower", cmap="viridis", vmin=np.percentile(th, 1), vmax=np.percentile(th, 99))
            fig.colorbar(im, ax=ax, fraction=0.046)


def _draw_prnu(fig: Any, columns: dict[str, dict[str, list[FlatColumnQuad]]], figs: dict[str, Any]) -> None:
    """PRNU (raw and corrected) vs fluence per CCD/quadrant, and histograms of the masters."""
    ax1, ax2 = fig.subplots(1, 2)
    for ccd, quads in columns.items():
        for q, rows in quads.items():
            f = [r.fluence_adu for r in rows]
            line = ax1.plot(f, [r.prnu_pct for r in rows], "o-", ms=3, label=f"{ccd} {q}")[0]
            ax1.plot(f, [r.prnu_raw_pct for r in rows], "x:", ms=3, color=line.get_color())
            d = figs.get(ccd, {}).get(q)
            if d is not None:
                centres = 0.5 * (d["edges"][1:] + d["edges"][:-1])
                ax2.semilogy(centres, np.maximum(d["hist"], 0.5), drawstyle="steps-mid", color=line.get_color())
    ax1.set_xlabel("fluence (ADU)")
    ax1.set_ylabel("PRNU (%)  (o corrected, x raw)")
    ax1.legend(fontsize=6, ncol=2)
    ax2.set_xlabel("master flat")
    ax2.set_ylabel("pixels")


def run_test(data: Any, sink: Any) -> Any:
    """Analyzer plug-in: FLAT01 / FLAT02, one CCD at a time (products written and dropped)."""
    from services.analyzer.analysis.common import frame_inputs
    from services.analyzer.model import AnalysisOutput, FigureProduct, ImageProduct, TableProduct
    from shared.geometry import assemble

    raw = dict(data.params)
    if raw.get("gain") is None and getattr(data, "calib", {}).get("gain"):
        raw["gain"] = data.calib["gain"]
    p = params_of(FlatParams, raw)
    frames = frame_inputs(data)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    columns: dict[str, dict[str, list[FlatColumnQuad]]] = {}
    frame_rows: list[FlatFrameQuad] = []
    figs: dict[str, Any] = {}
    warn: list[str] = []
    for ccd in sorted({f.ccd for f in frames}):
        sub = [f for f in frames if f.ccd == ccd]
        res, cols, rows, full = analyse_flat_ccd(ccd, sub, p, QUADRANTS)
        results[ccd] = {q: r.model_dump() for q, r in res.items()}
        columns[ccd] = cols
        frame_rows += rows
        figs.update(figure_data({ccd: full}))
        ext = {"FLAT": assemble(full["master"]), "ERR": assemble(full["master_err"]), "MASK": assemble(full["mask"])}
        k = 1
        while f"col{k}" in full:
            ext[f"COL{k}"] = assemble(full[f"col{k}"])
            ext[f"COL{k}_ERR"] = assemble(full[f"col{k}_err"])
            k += 1
        sink.add(ImageProduct(name=f"master_flat_{ccd}", ccd=ccd, extensions=ext,
                              header={"BUNIT": "relative", "NCOMBINE": len(sub), "MASKBIT1": "flat/model < defect_lo",
                                      "MASKBIT2": "flat/model > defect_hi", "MASKBIT4": "beyond defect_nsigma"},
                              description="master flat (FLAT, ERR, MASK) and per-column masters (COLk, COLk_ERR); raw-frame orientation"))
        del full
        for q, r in res.items():
            if not np.isfinite(r.prnu_pct):
                warn.append(f"{ccd} {q}: shot-noise-corrected PRNU unavailable")
    sink.add(TableProduct("flat_frames", {k: [getattr(r, k) for r in frame_rows] for k in FlatFrameQuad.model_fields},
                          units={"fluence_adu": "ADU", "prnu_raw_pct": "%"}, description="per frame and quadrant"))
    col_rows = [(c, q, r) for c, qs in columns.items() for q, rs in qs.items() for r in rs]
    sink.add(TableProduct("flat_columns", {"ccd": [c for c, _, _ in col_rows], "quadrant": [q for _, q, _ in col_rows],
                                           **{k: [getattr(r, k) for *_, r in col_rows] for k in FlatColumnQuad.model_fields if k != "wave"}},
                          description="per script column and quadrant: fluence, PRNU raw / corrected / master, shot noise"))
    sink.add(FigureProduct("flat_masters", lambda fig: _draw_masters(fig, figs), size=(14, 3.2 * max(len(figs), 1)),
                           description="binned master flats per CCD and quadrant"))
    sink.add(FigureProduct("flat_prnu", lambda fig: _draw_prnu(fig, columns, figs), size=(12, 5),
                           description="PRNU vs fluence and master-flat histograms"))
    summary = [f"{'CCD':<5}{'Q':<2} {'PRNU%':>7} {'raw%':>7} {'master%':>8} {'shot%':>7} {'defects':>8} {'badcols':>7}"]
    for ccd, quads in results.items():
        for q, v in quads.items():
            summary.append(f"{ccd:<5}{q:<2} {v['prnu_pct']:7.3f} {v['prnu_raw_pct']:7.3f} {v['prnu_master_pct']:8.3f} "
                           f"{v['shot_pct']:7.3f} {v['n_defects']:8d} {v['n_bad_columns']:7d}")
    summary += [f"warning: {w}" for w in warn]
    return AnalysisOutput(results=results, frames=[r.model_dump() for r in frame_rows], parameters=p.model_dump(mode="json"),
                          summary=summary)
