"""FLAT01 / FLAT02_<nm>: normalised flats, master flats, PRNU, photo-response defect mask
(engine v2 plug-in: extract per exposure, solve per test run).

**Extraction** (per exposure, per CCD and canonical quadrant; image area 2066 x 2048):

- per-row offsets (median of the trimmed prescan of each row, ADU), stored for the stack;
- smooth 2-D illumination model of the offset-subtracted image area (:class:`FlatModel`: the
  spline knots / coefficients or the Legendre coefficients, never the model image). Default: a
  bicubic spline through 64 x 64 block medians, smoothed only down to the noise of the block
  medians, so that it follows illumination structure down to ~100 px (a 300 px ripple);
- fluence (clipped mean, ADU), raw PRNU variance = clipped variance of ``image / model``
  (standard image trim [5, 5], every ``stat_stride``-th row, 4-sigma clipping with the variance
  correction), serial-overscan RON, model rms and peak-to-peak.

**Solve** (per script column = fluence group, and CCD; then per CCD):

- column master flat = :func:`~services.analyzer.science.stacking.stack_frames` of the column's
  frames, each band of rows normalised by its frame's offsets and model (evaluated for the band's
  rows only); error map = f(n) std / sqrt(n) (median error factor);
- shot noise from the frame pairs of the column, ``var(n_a - n_b) / 2`` (clipped, corrected,
  measured band by band in the same pass as the stack, so no gain is needed); with one frame
  only, the expected ``(mu / g + RON^2) / mu^2`` with the PTC01 gain (``Need("gain")``) or
  ``params.gain``;
- PRNU % = 100 sqrt(raw variance - shot variance) (``prnu_pct``) beside the raw value and the
  master-based ``sqrt(var(master) - mean(err^2))``;
- CCD master = inverse-variance weighted mean of the column masters; photo-response defect mask
  of the master / its smooth model (bit 1 below ``defect_lo``, bit 2 above ``defect_hi``, bit 4
  beyond ``defect_nsigma`` robust sigmas).

Products (raw-frame orientation, prescan / overscan = 1 for flats, 0 for errors and mask):
``master_flat_<CCD>.fits`` (FLAT, ERR, MASK, COLk, COLk_ERR), tables ``flat_frames``,
``flat_columns``, figures ``flat_masters``, ``flat_prnu``. Provides ``flat_mask`` (the MASK
extension of ``master_flat_<CCD>.fits``) and ``master_flat``.

:func:`solve_column` is the science of one column (stack + column statistics), callable as soon
as that column's exposures are extracted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from services.analyzer.family import (
    GAIN,
    Calibrations,
    ExposureFrames,
    Extraction,
    Family,
    Need,
    TestRun,
    exposure_unit,
)
from services.analyzer.model import AnalysisOutput, FigureProduct, ImageProduct, ProductSink, TableProduct
from services.analyzer.science.smooth import bin_image, fit_poly_bins, fit_smooth_2d
from services.analyzer.science.stacking import stack_frames
from services.analyzer.science.stats import clipped_stats, group_by, mad_std
from services.analyzer.science.preprocess import row_offsets
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, QUADRANTS, STANDARD_TRIMS, Geometry, quadrant, region

TESTS = ("FLAT01", "FLAT02")
MASTER_FLAT = "master_flat"
FLAT_MASK = "flat_mask"

MASK_LOW = 1
MASK_HIGH = 2
MASK_NSIGMA = 4
_IMG = slice(PRESCAN_COLS, PRESCAN_COLS + IMAGE_COLS)


class FlatParams(BaseModel):
    """Analysis parameters of FLAT01/02."""

    offset_method: Literal["row", "global"] = Field("row", description="offset subtraction: row (per-row prescan median) | global")
    model: Literal["spline", "poly"] = Field("spline", description="smooth illumination model: spline | poly")
    degree: int = Field(5, description="degree of the polynomial model (also the spline's first stage)")
    nbins: tuple[int, int] = Field((64, 64), description="bins (rows, cols) of the smooth model (64: 32-px blocks, follows a 300-px ripple)")
    smoothing: Literal["noise", "residual"] = Field(
        "noise", description="spline smoothing: noise (down to the noise of the block medians) | residual (the polynomial's "
        "residual variance: smooths structure away, the behaviour before issue 11)")
    nsigma: float = Field(4.0, description="clipping of fluence / PRNU statistics")
    defect_lo: float = Field(0.5, description="master / model below this: defect (bit 1)")
    defect_hi: float = Field(1.5, description="master / model above this: defect (bit 2)")
    defect_nsigma: float = Field(6.0, description="|master / model - 1| beyond this many robust sigmas: defect (bit 4)")
    defect_nbins: tuple[int, int] = Field((32, 32), description="bins of the smooth model of the master flat (defect mask)")
    bad_column_min: int = Field(100, description="defects in one column from which it counts as a bad column")
    chunk_rows: int = Field(128, description="rows per band of the median stack")
    stat_stride: int = Field(2, ge=1, description="PRNU / shot-noise statistics use every n-th row (speed; 1 = all)")
    pair_band_stride: int = Field(4, ge=1, description="pair-difference (shot noise) statistics on every n-th band of the stack (speed; 1 = all)")
    gain: float | dict | None = Field(None, description="gain (e-/ADU), scalar or {CCD: {Q: g}}: shot noise of single frames (default: PTC01)")
    quadrants: tuple[str, ...] = Field(QUADRANTS, description="quadrants analysed")


# ----------------------------------------------------------------------------- smooth model


class FlatModel(BaseModel):
    """Smooth 2-D model of one quadrant's image area (ADU), as coefficients: ``poly``
    (Legendre, ``coeffs[i, j]`` of rows^i cols^j on [-1, 1]) or ``spline`` (bicubic B-spline
    knots ``tx`` (rows), ``ty`` (cols) and coefficients ``c``). :meth:`evaluate` gives any rows."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    method: Literal["poly", "spline"]
    shape: tuple[int, int]
    coeffs: np.ndarray | None = None
    tx: np.ndarray | None = None
    ty: np.ndarray | None = None
    c: np.ndarray | None = None
    kx: int = 3
    ky: int = 3
    _col_basis: np.ndarray | None = PrivateAttr(default=None)

    def evaluate(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """The model (float32) at image-area ``rows`` (indices or a slice; all when None), all columns."""
        ny, nx = self.shape
        if rows is None:
            r = np.arange(ny)
        elif isinstance(rows, slice):
            r = np.arange(ny)[rows]
        else:
            r = np.asarray(rows)
        if self.method == "poly":
            deg = self.coeffs.shape[0] - 1
            fy = np.polynomial.legendre.legvander(2.0 * r / max(ny - 1, 1) - 1.0, deg)
            fx = np.polynomial.legendre.legvander(2.0 * np.arange(nx) / max(nx - 1, 1) - 1.0, deg)
            return (fy @ self.coeffs @ fx.T).astype(np.float32)
        if r.size == 0:
            return np.empty((0, nx), np.float32)
        # tensor-product B-spline: B_rows @ C @ B_cols^T (as FITPACK's bisplev: coordinates
        # outside the knot span are clamped to it); the column basis is computed once per model
        if self._col_basis is None:
            self._col_basis = np.ascontiguousarray(_bspline_basis(np.arange(nx, dtype=float), self.ty, self.ky).T)
        coef = self.c.reshape(len(self.tx) - self.kx - 1, len(self.ty) - self.ky - 1)
        return ((_bspline_basis(r.astype(float), self.tx, self.kx) @ coef) @ self._col_basis).astype(np.float32)


def _bspline_basis(x: np.ndarray, t: np.ndarray, k: int) -> np.ndarray:
    """B-spline basis functions of knots ``t``, degree ``k`` at ``x`` (clamped to the knot span):
    (len(x), len(t) - k - 1)."""
    from scipy.interpolate import BSpline

    return BSpline.design_matrix(np.clip(x, t[k], t[-k - 1]), t, k).toarray()


def fit_flat_model(img: np.ndarray, params: FlatParams) -> tuple[FlatModel, float]:
    """Smooth model of an offset-subtracted image area (ADU) and the rms of its block residuals.

    ``poly``: Legendre polynomial of total degree ``degree`` through ``nbins`` block medians.
    ``spline``: the polynomial first, then a bicubic smoothing spline through the block medians
    (empty blocks filled by the polynomial); ``smoothing="noise"`` sets the spline's
    ``s`` to (number of blocks) x (noise variance of a block median: 1.2533^2 x pixel variance /
    pixels per block, the pixel variance from adjacent-column differences), so it follows real
    structure (vignetting, a ripple) and not the noise; ``"residual"`` uses the polynomial's
    residual variance (the old default: it smooths structure smaller than the polynomial away)."""
    ny, nx = img.shape
    binned = bin_image(img, params.nbins)
    vals = binned.values
    vy = np.polynomial.legendre.legvander(2.0 * binned.yc / max(ny - 1, 1) - 1.0, params.degree)
    vx = np.polynomial.legendre.legvander(2.0 * binned.xc / max(nx - 1, 1) - 1.0, params.degree)
    fit = fit_poly_bins(vals, vy, vx, params.degree)
    cmat, rms_poly = fit.coeffs, fit.rms
    if params.model == "poly":
        return FlatModel(method="poly", shape=(ny, nx), coeffs=cmat), rms_poly
    from scipy.interpolate import RectBivariateSpline

    poly_bins = vy @ cmat @ vx.T
    filled = np.where(np.isfinite(vals), vals, poly_bins)
    if params.smoothing == "noise":
        sub = np.asarray(img[::16], dtype=np.float64)
        pix_sigma = mad_std(np.diff(sub, axis=1)) / np.sqrt(2.0)
        npix = (ny // vals.shape[0]) * (nx // vals.shape[1])
        s = filled.size * (1.2533 * pix_sigma) ** 2 / max(npix, 1)
    else:
        s = filled.size * rms_poly**2
    kx, ky = min(3, len(binned.yc) - 1), min(3, len(binned.xc) - 1)
    spl = RectBivariateSpline(binned.yc, binned.xc, filled, kx=kx, ky=ky, s=s)
    tx, ty = spl.get_knots()
    resid = filled - spl(binned.yc, binned.xc)
    rms = float(np.sqrt(np.mean(resid**2)))
    return FlatModel(method="spline", shape=(ny, nx), tx=np.asarray(tx), ty=np.asarray(ty), c=np.asarray(spl.get_coeffs()),
                     kx=kx, ky=ky), rms


# ----------------------------------------------------------------------------- extraction


class FlatQuadExtraction(BaseModel):
    """What the solve needs from one quadrant of one flat."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    offsets: np.ndarray = Field(description="offset (ADU) per canonical row, float32 (quadrant rows)")
    model: FlatModel
    fluence_adu: float = Field(description="clipped mean of the offset-subtracted image area (ADU)")
    prnu_raw_var: float = Field(description="clipped, corrected variance of image / model (relative^2)")
    ron_adu: float = Field(description="clipped std of the trimmed serial overscan (ADU)")
    model_rms: float = Field(description="rms of the block residuals of the smooth model (ADU)")
    model_p2p_pct: float = Field(description="peak-to-peak of the illumination model / its mean (%)")


class FlatExtraction(Extraction):
    """One flat exposure: per CCD and quadrant (:class:`FlatQuadExtraction`), and the exposure's
    exposure time, wavelength and script column (when the exposure log gives one)."""

    exptime: float
    wave: float | None = None
    column: str | None = Field(None, description="exposure-log 'column' value, if any (script column)")
    shapes: dict[str, tuple[int, int]] = Field(default_factory=dict, description="frame shape per CCD")
    quads: dict[str, dict[str, FlatQuadExtraction]] = Field(default_factory=dict)


def _trimmed(img: np.ndarray, stride: int = 1) -> np.ndarray:
    lead, trail = STANDARD_TRIMS["img"]
    return img[::stride, lead : img.shape[1] - trail]


def extract_quadrant(quad: np.ndarray, params: FlatParams) -> FlatQuadExtraction:
    """Offsets, smooth model and per-frame statistics of one canonical quadrant of a flat."""
    p = params
    off = row_offsets(quad, "global" if p.offset_method == "global" else "row")
    img = np.asarray(quad[:IMAGE_ROWS, _IMG], dtype=np.float32) - off[:IMAGE_ROWS, None].astype(np.float32)
    model, rms = fit_flat_model(img, p)
    rows = np.arange(0, IMAGE_ROWS, p.stat_stride)
    mod = model.evaluate(rows)
    sub = img[rows]
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(mod > 0, sub / mod, np.nan).astype(np.float32)
    st_img = clipped_stats(_trimmed(sub), p.nsigma, subsample=7)
    st_n = clipped_stats(_trimmed(norm), p.nsigma, subsample=7)
    ron = clipped_stats(region(quad, "ove", STANDARD_TRIMS["ove"]), p.nsigma).std_corrected
    mean = float(np.mean(mod))
    p2p = 100.0 * float(mod.max() - mod.min()) / mean if mean > 0 else float("nan")
    return FlatQuadExtraction(offsets=off.astype(np.float32), model=model, fluence_adu=st_img.mean, prnu_raw_var=st_n.var_corrected,
                              ron_adu=ron, model_rms=rms, model_p2p_pct=p2p)


def extract(exposure: ExposureFrames, calib: Calibrations, params: FlatParams) -> FlatExtraction:
    """Per-exposure extraction (its own frames only; no calibration)."""
    quads: dict[str, dict[str, FlatQuadExtraction]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for ccd in exposure.ccds():
        qv = exposure.quadrants(ccd)
        shapes[ccd] = tuple(exposure.load(ccd).shape)
        quads[ccd] = {q: extract_quadrant(qv[q], params) for q in params.quadrants if q in qv}
        exposure.release(ccd)
    col = exposure.values().get("column")
    return FlatExtraction(family="flat", unit=exposure_unit(exposure.obsid), obsids=[exposure.obsid], ccds=exposure.ccds(),
                          flags=exposure.flags, exptime=exposure.exptime, wave=exposure.wave,
                          column=None if col in (None, "") else str(col), shapes=shapes, quads=quads)


# ----------------------------------------------------------------------------- results


class FlatFrameQuad(BaseModel):
    """Per frame and quadrant (table ``flat_frames``)."""

    obsid: int
    ccd: str
    quadrant: str
    exptime: float = Field(description="exposure time (s)")
    column: int = Field(description="script column (1-based, order of first ObsID)")
    fluence_adu: float = Field(description="clipped mean of the offset-subtracted image area (ADU)")
    prnu_raw_pct: float = Field(description="clipped std of image / model (%), shot noise included")
    model_rms: float = Field(description="rms of the binned residuals of the smooth model (ADU)")
    model_p2p_pct: float = Field(description="peak-to-peak of the illumination model / its mean (%)")


class FlatColumnQuad(BaseModel):
    """Per script column (fluence group) and quadrant (table ``flat_columns``)."""

    column: int = Field(description="script column (1-based, order of first ObsID)")
    exptime: float = Field(description="exposure time (s)")
    wave: float | None = Field(None, description="wavelength (nm) or filter position of the exposure log")
    n_frames: int = Field(description="frames of the column")
    fluence_adu: float = Field(description="mean fluence of the column's frames (ADU)")
    flux_adu_s: float = Field(description="fluence / exposure time (ADU/s)")
    prnu_raw_pct: float = Field(description="PRNU (%) with shot noise (rms over the frames)")
    shot_pct: float = Field(description="relative shot noise (%) removed")
    shot_method: str = Field(description="pairs (frame differences) | gain (expected from the gain) | none")
    prnu_pct: float = Field(description="PRNU (%), shot noise removed")
    prnu_master_pct: float = Field(description="PRNU (%) from the column master (its noise removed)")


class FlatQuadResult(BaseModel):
    """Per CCD quadrant result of FLAT01/02 (``results[CCD][Q]``)."""

    n_frames: int = Field(description="frames analysed")
    n_columns: int = Field(description="script columns (fluence groups)")
    prnu_pct: float = Field(description="PRNU (%), shot noise removed: frame-weighted mean over columns")
    prnu_raw_pct: float = Field(description="PRNU (%) as the raw clipped std of the normalised frames (shot noise included)")
    prnu_master_pct: float = Field(description="PRNU (%) from the CCD master flat (its noise removed)")
    shot_pct: float = Field(description="relative shot noise (%) removed (frame-weighted mean over columns)")
    fluence_adu: list[float] = Field(description="mean fluence (ADU) per column")
    column_prnu_pct: list[float] = Field(description="shot-noise-corrected PRNU (%) per column")
    n_defects: int = Field(description="pixels in the photo-response defect mask")
    n_defects_low: int = Field(description="pixels with master / model < defect_lo (bit 1)")
    n_defects_high: int = Field(description="pixels with master / model > defect_hi (bit 2)")
    n_defects_nsigma: int = Field(description="pixels beyond defect_nsigma robust sigmas (bit 4)")
    n_bad_columns: int = Field(description="columns with >= bad_column_min defects")
    master_std_pct: float = Field(description="clipped std of the CCD master flat (%)")


def defect_mask(master: np.ndarray, params: FlatParams) -> tuple[np.ndarray, dict[str, int]]:
    """Photo-response defect mask (uint8 bits) of a master flat image area and the counts."""
    sm = fit_smooth_2d(master, method="poly", degree=params.degree, nbins=params.defect_nbins)
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


def flat_columns(items: Sequence[tuple[int, float, float | None, str | None]]) -> list[list[int]]:
    """Indices of ``(obsid, exptime, wave, column)`` items per script column: the exposure-log
    ``column`` when every item has one, else groups of equal exposure time and wavelength;
    columns in order of first ObsID, members by ObsID."""
    if items and all(c is not None for *_, c in items):
        cols: dict[Any, list[int]] = {}
        for i, (*_, c) in enumerate(items):
            cols.setdefault(c, []).append(i)
        groups = list(cols.values())
    else:
        by_wave: dict[Any, list[int]] = {}
        for i, (_, _, w, _) in enumerate(items):
            by_wave.setdefault(w, []).append(i)
        groups = []
        for idx in by_wave.values():
            groups += [[idx[k] for k in g] for g in group_by([items[i][1] for i in idx], rel_tol=1e-3)]
    return sorted((sorted(g, key=lambda i: items[i][0]) for g in groups), key=lambda g: items[g[0]][0])


def _gain_of(params: FlatParams, calib: Calibrations, ccd: str, q: str) -> float | None:
    g = params.gain
    if isinstance(g, (int, float)):
        return float(g)
    if isinstance(g, dict):
        v = (g.get(ccd) or {}).get(q)
        if v:
            return float(v)
    return calib.gain(ccd, q)


# ----------------------------------------------------------------------------- one column


@dataclass
class _PairStats:
    """Band-by-band variance of the normalised pair differences of one quadrant."""

    sums: dict[int, list[tuple[float, int]]] = field(default_factory=dict)  # pair index -> [(var, n)]

    def add(self, pair: int, var: float, n: int) -> None:
        if np.isfinite(var) and n > 1:
            self.sums.setdefault(pair, []).append((var, n))

    def shot_var(self) -> float | None:
        """Mean over pairs of var(n_a - n_b) / 2 (None without pairs)."""
        per_pair = [sum(v * n for v, n in vs) / sum(n for _, n in vs) / 2.0 for vs in self.sums.values() if vs]
        return float(np.mean(per_pair)) if per_pair else None


@dataclass
class ColumnSolution:
    """A column's master (raw-frame orientation, normalised; prescan / overscan = 1), its error
    map (0 outside the image area) and the per-quadrant column rows."""

    index: int
    ccd: str
    master: np.ndarray
    error: np.ndarray
    rows: dict[str, FlatColumnQuad]
    n_frames: int
    obsids: list[int] = field(default_factory=list)
    pair_var: dict[str, float | None] = field(default_factory=dict)  # var(n_a - n_b) / 2 per quadrant, None without pairs
    master_stats: dict[str, tuple[float, float]] = field(default_factory=dict)  # (clipped var of the master, mean err^2)


@lru_cache(maxsize=None)
def _flips(geo: Geometry) -> dict[str, tuple[bool, bool]]:
    """(rows flipped, columns flipped) of each quadrant's canonical view of a frame."""
    probe = np.empty(geo.shape, dtype=np.bool_)  # never written: only the views' strides are used
    return {q: (quadrant(probe, q, geo).strides[0] < 0, quadrant(probe, q, geo).strides[1] < 0) for q in QUADRANTS}


def _quad_windows(geo: Geometry, r0: int, r1: int):
    """For the raw rows [r0, r1) of a band: ``(q, band_row_slice, col_slice, flip_rows, flip_cols,
    canonical_row_start)`` of every quadrant the band crosses."""
    out = []
    for q in QUADRANTS:
        rs, cs = geo.quadrant_block(q)
        lo, hi = max(r0, rs.start), min(r1, rs.stop)
        if hi <= lo:
            continue
        fr, fc = _flips(geo)[q]
        c0 = (rs.stop - hi) if fr else (lo - rs.start)
        out.append((q, slice(lo - r0, hi - r0), cs, fr, fc, c0))
    return out


def solve_column(ccd: str, index: int, extractions: Sequence[FlatExtraction], paths: Sequence[str], params: FlatParams,
                 calib: Calibrations | None = None) -> ColumnSolution:
    """Master flat and statistics of one script column of one CCD from its frames' extractions
    (ObsID order, ``paths[i]`` the frame file of ``extractions[i]``): a median stack read band by
    band, each band normalised by its frame's offsets and smooth model; pair differences
    (frames 1-2, 3-4, ...) measured in the same pass."""
    p = params
    calib = calib or Calibrations()
    n = len(extractions)
    if n == 0 or len(paths) != n:
        raise ValueError(f"{ccd} column {index}: {n} extractions for {len(paths)} frame files")
    shape = tuple(extractions[0].shapes[ccd])
    geo = Geometry.from_shape(shape)
    qlist = [q for q in p.quadrants if q in extractions[0].quads[ccd]]
    lead, trail = STANDARD_TRIMS["img"]
    pairs = {q: _PairStats() for q in qlist}
    held: dict[str, np.ndarray] = {}

    def transform(i: int, band: np.ndarray, r0: int, r1: int) -> np.ndarray:
        out = np.ones_like(band)
        for q, bs, cs, fr, fc, c0 in _quad_windows(geo, r0, r1):
            if q not in qlist:
                continue
            src = band[bs, cs]
            dst = out[bs, cs]
            if fr:
                src, dst = src[::-1], dst[::-1]
            if fc:
                src, dst = src[:, ::-1], dst[:, ::-1]
            nrow = src.shape[0]
            crows = np.arange(c0, c0 + nrow)
            img_rows = crows < IMAGE_ROWS
            if not img_rows.any():
                continue
            qe = extractions[i].quads[ccd][q]
            k = int(img_rows.sum())  # image rows come first in canonical order
            mod = qe.model.evaluate(crows[:k])
            raw = src[:k, _IMG] - qe.offsets[crows[:k], None]
            with np.errstate(divide="ignore", invalid="ignore"):
                norm = np.where(mod > 0, raw / mod, np.nan).astype(np.float32)
            dst[:k, _IMG] = norm
            if (r0 // p.chunk_rows) % p.pair_band_stride:
                continue
            sel = (crows[:k] % p.stat_stride) == 0
            stat = norm[sel, lead : IMAGE_COLS - trail]
            if i % 2 == 0:
                held[q] = stat.copy() if i + 1 < n else stat
            elif q in held and held[q].shape == stat.shape and stat.size > 0:
                st = clipped_stats(stat - held.pop(q), p.nsigma, subsample=7)
                pairs[q].add(i // 2, st.var_corrected, st.n)
        return out

    master, err = stack_frames(list(paths), shape, transform, chunk_rows=p.chunk_rows)
    if n < 2:
        err[:] = 0.0
    pair_var = {q: pairs[q].shot_var() for q in qlist}
    master_stats = {}
    for q in qlist:
        st_m = clipped_stats(_trimmed(quadrant(master, q, geo)[:IMAGE_ROWS, _IMG]), p.nsigma, subsample=7)
        qerr = quadrant(err, q, geo)[:IMAGE_ROWS, _IMG]
        noise_m = float(np.mean(_trimmed(qerr).astype(np.float64) ** 2)) if n > 1 else float("nan")
        master_stats[q] = (st_m.var_corrected, noise_m)
    rows = column_rows(ccd, index, extractions, pair_var, master_stats, p, calib)
    # outside the analysed image areas: flat 1, error 0
    img_mask = np.zeros(shape, dtype=bool)
    for q in qlist:
        quadrant(img_mask, q, geo)[:IMAGE_ROWS, _IMG] = True
    master[~img_mask] = 1.0
    err[~img_mask] = 0.0
    return ColumnSolution(index=index, ccd=ccd, master=master, error=err, rows=rows, n_frames=n,
                          obsids=[e.obsids[0] for e in extractions], pair_var=pair_var, master_stats=master_stats)


def column_rows(ccd: str, index: int, extractions: Sequence[FlatExtraction], pair_var: dict[str, float | None],
                master_stats: dict[str, tuple[float, float]], params: FlatParams, calib: Calibrations) -> dict[str, FlatColumnQuad]:
    """The column's per-quadrant statistics from its extractions, the pair-difference shot
    variances (None: single frame, then the gain's expected shot noise) and the master's (variance,
    mean error^2): cheap, so a column is re-evaluated without a new stack when the gain arrives."""
    rows: dict[str, FlatColumnQuad] = {}
    n = len(extractions)
    texp = extractions[0].exptime
    for q, sv in pair_var.items():
        qes = [e.quads[ccd][q] for e in extractions]
        mu = float(np.mean([e.fluence_adu for e in qes]))
        rv = float(np.mean([e.prnu_raw_var for e in qes]))
        method = "pairs"
        if sv is None:
            g = _gain_of(params, calib, ccd, q)
            r = float(np.mean([e.ron_adu for e in qes]))
            sv, method = ((mu / g + r * r) / mu**2, "gain") if g and mu > 0 else (float("nan"), "none")
        var_m, noise_m = master_stats[q]
        rows[q] = FlatColumnQuad(
            column=index, exptime=texp, wave=extractions[0].wave, n_frames=n, fluence_adu=mu,
            flux_adu_s=mu / texp if texp > 0 else float("nan"),
            prnu_raw_pct=100 * np.sqrt(rv), shot_pct=100 * np.sqrt(sv) if sv >= 0 else float("nan"), shot_method=method,
            prnu_pct=100 * np.sqrt(rv - sv) if np.isfinite(sv) and rv > sv else float("nan"),
            prnu_master_pct=100 * np.sqrt(var_m - noise_m) if np.isfinite(noise_m) and var_m > noise_m else float("nan"),
        )
    return rows


def combine_columns(cols: Sequence[ColumnSolution]) -> tuple[np.ndarray, np.ndarray]:
    """CCD master flat and its error: inverse-variance weighted mean of the column masters
    (plain mean when a column has no error map)."""
    if len(cols) == 1 or any(not np.any(c.error) for c in cols):
        master = np.mean([c.master for c in cols], axis=0).astype(np.float32)
        err = (np.sqrt(np.sum([c.error.astype(np.float64) ** 2 for c in cols], axis=0)) / len(cols)).astype(np.float32)
        return master, err
    wsum = np.zeros(cols[0].master.shape, dtype=np.float32)
    acc = np.zeros_like(wsum)
    for c in cols:
        w = np.maximum(c.error, np.float32(1e-6))
        np.square(w, out=w)
        np.reciprocal(w, out=w)
        wsum += w
        w *= c.master
        acc += w
        del w
    acc /= wsum
    master = acc
    np.sqrt(wsum, out=wsum)
    err = np.reciprocal(wsum, out=wsum)
    err[cols[0].error == 0] = 0.0
    return master, err


# ----------------------------------------------------------------------------- solve


def column_groups(extractions: Sequence[FlatExtraction]) -> list[list[FlatExtraction]]:
    """The extractions per script column (:func:`flat_columns`), column k = item k - 1."""
    ex = sorted(extractions, key=lambda e: e.obsids[0])
    groups = flat_columns([(e.obsids[0], e.exptime, e.wave, e.column) for e in ex])
    return [[ex[i] for i in g] for g in groups]


def completed_columns(extractions: Sequence[FlatExtraction]) -> list[int]:
    """Columns (1-based) that can be solved before the test ends: the script acquires its columns
    in order, so a column is complete once an exposure of a later column has arrived (every
    column but the one holding the latest ObsID)."""
    groups = column_groups(extractions)
    if not groups:
        return []
    last = max(e.obsids[0] for e in extractions)
    return [k for k, g in enumerate(groups, start=1) if all(e.obsids[0] != last for e in g)]


def _thumb(img: np.ndarray, f: int = 64) -> np.ndarray:
    ny, nx = img.shape
    return img[: ny // f * f, : nx // f * f].reshape(ny // f, f, nx // f, f).mean(axis=(1, 3))


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


def solve(extractions: list[FlatExtraction], calib: Calibrations, params: FlatParams, run: TestRun, sink: ProductSink,
          columns_done: dict[tuple[str, int], ColumnSolution] | None = None) -> AnalysisOutput:
    """FLAT01 / FLAT02 from the extractions: per CCD, the column masters (band-by-band stacks of
    the frame files listed in ``run``), the CCD master, PRNU, defect mask; products to ``sink``.
    ``columns_done[(CCD, k)]``: column solutions already computed (:func:`solve_column` as soon
    as :func:`completed_columns` said so), re-used when they cover the same ObsIDs."""
    p = params
    if not extractions:
        raise ValueError(f"{run.label}: no flat extractions to solve")
    columns = column_groups(extractions)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    col_rows: dict[str, dict[str, list[FlatColumnQuad]]] = {}
    frame_rows: list[FlatFrameQuad] = []
    figs: dict[str, Any] = {}
    warn: list[str] = []
    files: dict[str, str] = {}
    edges = np.linspace(0.9, 1.1, 65)
    ccds = sorted({c for e in extractions for c in e.quads})
    for ccd in ccds:
        paths = {f.obsid: f.path for f in run.frames_of(ccd)}
        sols: list[ColumnSolution] = []
        for k, col in enumerate(columns, start=1):
            col = [e for e in col if ccd in e.quads]
            missing = [e.obsids[0] for e in col if e.obsids[0] not in paths]
            if missing:
                warn.append(f"{ccd}: no frame file for ObsID {missing}: left out of the stack")
                col = [e for e in col if e.obsids[0] in paths]
            if not col:
                continue
            done = (columns_done or {}).get((ccd, k))
            if done is not None and done.obsids == [e.obsids[0] for e in col]:
                done.rows = column_rows(ccd, k, col, done.pair_var, done.master_stats, p, calib)  # the current gain
                sols.append(done)
            else:
                sols.append(solve_column(ccd, k, col, [paths[e.obsids[0]] for e in col], p, calib))
            for e in col:
                for q, qe in e.quads[ccd].items():
                    frame_rows.append(FlatFrameQuad(obsid=e.obsids[0], ccd=ccd, quadrant=q, exptime=e.exptime, column=k,
                                                    fluence_adu=qe.fluence_adu, prnu_raw_pct=100 * np.sqrt(qe.prnu_raw_var),
                                                    model_rms=qe.model_rms, model_p2p_pct=qe.model_p2p_pct))
        if not sols:
            continue
        master, merr = combine_columns(sols)
        geo = Geometry.from_shape(master.shape)
        mask = np.zeros(master.shape, dtype=np.uint8)
        results[ccd], col_rows[ccd] = {}, {}
        for q in sols[0].rows:
            img = quadrant(master, q, geo)[:IMAGE_ROWS, _IMG]
            qerr = quadrant(merr, q, geo)[:IMAGE_ROWS, _IMG]
            qmask, counts = defect_mask(img, p)
            quadrant(mask, q, geo)[:IMAGE_ROWS, _IMG] = qmask
            st = clipped_stats(_trimmed(img), p.nsigma, subsample=7)
            rows = [s.rows[q] for s in sols]
            col_rows[ccd][q] = rows
            nf = np.array([r.n_frames for r in rows], dtype=float)

            def wmean(vals):
                v = np.array(vals, dtype=float)
                ok = np.isfinite(v)
                return float(np.sum(v[ok] * nf[ok]) / np.sum(nf[ok])) if ok.any() else float("nan")

            noise_m = float(np.mean(_trimmed(qerr).astype(np.float64) ** 2))
            r = FlatQuadResult(
                n_frames=int(nf.sum()), n_columns=len(rows),
                prnu_pct=wmean([r.prnu_pct for r in rows]), prnu_raw_pct=wmean([r.prnu_raw_pct for r in rows]),
                prnu_master_pct=100 * float(np.sqrt(st.var_corrected - noise_m)) if st.var_corrected > noise_m else float("nan"),
                shot_pct=wmean([r.shot_pct for r in rows]),
                fluence_adu=[r.fluence_adu for r in rows], column_prnu_pct=[r.prnu_pct for r in rows],
                master_std_pct=100 * st.std_corrected, **counts,
            )
            results[ccd][q] = r.model_dump()
            hist, _ = np.histogram(img, bins=edges)
            figs.setdefault(ccd, {})[q] = {"thumb": _thumb(img), "hist": hist, "edges": edges}
            if not np.isfinite(r.prnu_pct):
                warn.append(f"{ccd} {q}: shot-noise-corrected PRNU unavailable (single frames and no gain)")
            if r.n_bad_columns:
                warn.append(f"{ccd} {q}: {r.n_bad_columns} bad column(s) in the photo-response mask")
        ext = {"FLAT": master, "ERR": merr, "MASK": mask}
        for s in sols:
            ext[f"COL{s.index}"] = s.master
            ext[f"COL{s.index}_ERR"] = s.error
        name = f"master_flat_{ccd}"
        sink.add(ImageProduct(name=name, ccd=ccd, extensions=ext,
                              header={"BUNIT": "relative", "NCOMBINE": sum(s.n_frames for s in sols), "MASKBIT1": "flat/model < defect_lo",
                                      "MASKBIT2": "flat/model > defect_hi", "MASKBIT4": "beyond defect_nsigma"},
                              description="master flat (FLAT, ERR, MASK) and per-column masters (COLk, COLk_ERR); raw-frame orientation"))
        files[ccd] = f"{name}.fits"
        del ext, sols, master, merr, mask
    sink.add(TableProduct("flat_frames", {k: [getattr(r, k) for r in frame_rows] for k in FlatFrameQuad.model_fields},
                          units={"fluence_adu": "ADU", "prnu_raw_pct": "%"}, description="per frame and quadrant"))
    flat_rows = [(c, q, r) for c, qs in col_rows.items() for q, rs in qs.items() for r in rs]
    sink.add(TableProduct("flat_columns", {"ccd": [c for c, _, _ in flat_rows], "quadrant": [q for _, q, _ in flat_rows],
                                           **{k: [getattr(r, k) for *_, r in flat_rows] for k in FlatColumnQuad.model_fields if k != "wave"}},
                          description="per script column and quadrant: fluence, PRNU raw / corrected / master, shot noise"))
    sink.add(FigureProduct("flat_masters", lambda fig: _draw_masters(fig, figs), size=(14, 3.2 * max(len(figs), 1)),
                           description="binned master flats per CCD and quadrant"))
    sink.add(FigureProduct("flat_prnu", lambda fig: _draw_prnu(fig, col_rows, figs), size=(12, 5),
                           description="PRNU vs fluence and master-flat histograms"))
    summary = [f"{'CCD':<5}{'Q':<2} {'PRNU%':>7} {'raw%':>7} {'master%':>8} {'shot%':>7} {'defects':>8} {'badcols':>7}"]
    for ccd, quads in results.items():
        for q, v in quads.items():
            summary.append(f"{ccd:<5}{q:<2} {v['prnu_pct']:7.3f} {v['prnu_raw_pct']:7.3f} {v['prnu_master_pct']:8.3f} "
                           f"{v['shot_pct']:7.3f} {v['n_defects']:8d} {v['n_bad_columns']:7d}")
    summary += [f"warning: {w}" for w in warn]
    provides = {FLAT_MASK: {"values": {"extension": "MASK", "bits": {"1": "low", "2": "high", "4": "nsigma"}}, "files": dict(files)},
                MASTER_FLAT: {"values": {"extension": "FLAT"}, "files": dict(files)}} if files else {}
    return AnalysisOutput(results=results, frames=[r.model_dump() for r in frame_rows], parameters=p.model_dump(mode="json"),
                          summary=summary, provides=provides)


FAMILY = Family(
    name="flat",
    tests=TESTS,
    params=FlatParams,
    extract=extract,
    solve=solve,
    extraction=FlatExtraction,
    needs=(Need(GAIN, "rerun", ("PTC01",)),),
    provides=(FLAT_MASK, MASTER_FLAT),
    result=FlatQuadResult,
    version="2",
)
