"""Shared preprocessing and robust statistics for the analyses (pure functions, no I/O).

Everything works on *canonical* quadrant arrays (``shared.geometry.quadrant``): columns 0..50
prescan, 51..2098 image, 2099.. serial overscan; rows 0..2065 image, 2066.. parallel overscan.
Values are ADU. Functions return new arrays (float32 images, float64 statistics) and never
modify their inputs.

Main entry points
- :func:`row_offsets` / :func:`subtract_offset`: bias level from the prescan (per-row median of
  the trimmed prescan, default) or a global median; optional overscan.
- :func:`preprocess_quadrant`: offset subtraction + optional master bias / master flat / mask
  (masked pixels become NaN).
- :func:`clipped_stats`: iterative sigma clipping with the Gaussian correction of the variance
  lost to clipping (``var_corrected``).
- :func:`fit_smooth_2d`: smooth 2-D model of an image (binned medians fitted by a Legendre
  polynomial of total degree ``degree`` or a smoothing spline), evaluated on the full grid.
- :func:`mad_std`, :func:`robust_mean`, :func:`iterative_fit` (scipy.optimize with n-sigma
  outlier rejection).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence, TypeVar

import numpy as np
from scipy import optimize, special

from pydantic import BaseModel

from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, STANDARD_TRIMS, region

P = TypeVar("P", bound=BaseModel)

OffsetMethod = Literal["row", "global", "mean", "none"]
OffsetRegion = Literal["pre", "ove"]

#: Image-area column span in canonical orientation.
IMG_COLS = slice(PRESCAN_COLS, PRESCAN_COLS + IMAGE_COLS)


# --------------------------------------------------------------------------------------------
# Frame input of the pure analyses
# --------------------------------------------------------------------------------------------


@dataclass
class FrameInput:
    """One CCD frame as the pure analyses (flat, ptc, nl, bf) take it.

    ``quads``: ``{quadrant: canonical float32 array}`` (full quadrant, prescan and overscan
    included) or a zero-argument callable returning it (lazy: the analysis loads a frame only
    when it needs it and drops it after). ``time``: seconds (any origin) or a datetime.
    ``meta``: other exposure-log values (``vstart``, ``vend``, ``role`` = ``"stability"`` /
    ``"background"`` for NL, ...)."""

    quads: Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]]
    exptime: float
    obsid: int = 0
    ccd: str = "CCD1"
    wave: float | None = None
    time: float | datetime | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Mapping[str, np.ndarray]:
        """The canonical quadrants (calls the loader when ``quads`` is lazy)."""
        return self.quads() if callable(self.quads) else self.quads

    @property
    def t_seconds(self) -> float:
        """``time`` as float seconds (POSIX for a datetime); NaN when unknown."""
        if self.time is None:
            return float("nan")
        if isinstance(self.time, datetime):
            return self.time.timestamp()
        return float(self.time)


def params_of(model: type[P], params: P | Mapping[str, Any] | None) -> P:
    """An analysis' parameters as its pydantic ``model``: an instance as is, else the model built
    from the keys of ``params`` it knows (others, e.g. campaign parameters, are ignored)."""
    if isinstance(params, model):
        return params
    return model(**{k: v for k, v in (params or {}).items() if k in model.model_fields})


def ccd_label(ccd: int | str) -> str:
    """``1 -> "CCD1"``; ``"ccd2" -> "CCD2"``."""
    if isinstance(ccd, str) and ccd.upper().startswith("CCD"):
        return ccd.upper()
    return f"CCD{int(ccd)}"


def as_frames(frames: Iterable[Any]) -> list[FrameInput]:
    """Normalise frames given as :class:`FrameInput`, as dicts (``{"quads": {...}, "exptime":
    ..., ...}`` or quadrant keys E/F/G/H at top level beside the metadata) or as objects with
    the same attributes."""
    out: list[FrameInput] = []
    for f in frames:
        if isinstance(f, FrameInput):
            out.append(f)
            continue
        get = f.get if isinstance(f, Mapping) else (lambda k, d=None, _f=f: getattr(_f, k, d))
        quads = get("quads")
        if quads is None and isinstance(f, Mapping):
            quads = {q: f[q] for q in ("E", "F", "G", "H") if q in f}
        meta = dict(get("meta") or {})
        out.append(
            FrameInput(
                quads=quads,
                exptime=float(get("exptime", 0.0) or 0.0),
                obsid=int(get("obsid", 0) or 0),
                ccd=ccd_label(get("ccd", 1) or 1),
                wave=get("wave"),
                time=get("time"),
                meta=meta,
            )
        )
    return out


def frame_inputs(data: Any, frames: Iterable[Any] | None = None) -> list[FrameInput]:
    """Lazy :class:`FrameInput` s from an analyzer ``TestData`` (``services.analyzer.model``):
    pixels through ``data.load_quadrants(meta)`` when an analysis asks for them; exposure-log
    values (``wave``, ``comments``, ``vstart`` ...) in ``meta``; ``time`` = the frame date.
    Uses ``data.frame_inputs()`` when the TestData provides it."""
    if frames is None and callable(getattr(data, "frame_inputs", None)):
        return list(data.frame_inputs())
    out = []
    for m in frames if frames is not None else data.frames:
        values = dict(getattr(m, "values", {}) or {})
        wave = values.get("wave")
        try:
            wave = float(wave) if wave not in (None, "") else None
        except (TypeError, ValueError):
            wave = None
        out.append(FrameInput(quads=(lambda m=m: data.load_quadrants(m)), exptime=float(m.exptime), obsid=int(m.obsid),
                              ccd=ccd_label(m.ccd), wave=wave, time=getattr(m, "date", None), meta=values))
    return out


def group_by(values: Sequence[float], rel_tol: float = 1e-3, abs_tol: float = 1e-6) -> list[list[int]]:
    """Indices of ``values`` grouped by equality within ``rel_tol`` (sorted by value; each group
    in input order)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    groups: list[list[int]] = []
    for i in order:
        if groups:
            ref = values[groups[-1][0]]
            if abs(values[i] - ref) <= max(abs_tol, rel_tol * abs(ref)):
                groups[-1].append(i)
                continue
        groups.append([i])
    return [sorted(g) for g in groups]


# --------------------------------------------------------------------------------------------
# Offsets (bias level) and preprocessing
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Robust statistics
# --------------------------------------------------------------------------------------------


def truncated_variance_fraction(k: float | np.ndarray) -> float | np.ndarray:
    """Fraction of a Gaussian's variance kept when it is truncated symmetrically at +/- k sigma:
    ``1 - 2 k phi(k) / (2 Phi(k) - 1)``."""
    k = np.asarray(k, dtype=np.float64)
    pdf = np.exp(-0.5 * k * k) / np.sqrt(2 * np.pi)
    kept = special.erf(k / np.sqrt(2))
    out = 1.0 - 2.0 * k * pdf / np.where(kept > 0, kept, np.inf)
    return float(out) if out.ndim == 0 else out


def clip_variance_correction(threshold: float, std_clipped: float, iterations: int = 50) -> float:
    """Factor by which to multiply the variance of a sample clipped at ``+/- threshold`` (ADU)
    to recover the variance of the Gaussian parent (``std_clipped`` = std of the kept sample).

    Solves ``std_clipped^2 = sigma^2 f(threshold/sigma)`` (f: :func:`truncated_variance_fraction`)
    for sigma by fixed-point iteration. 1 when nothing could have been clipped."""
    if not np.isfinite(threshold) or std_clipped <= 0 or threshold <= 0:
        return 1.0
    sigma = std_clipped
    for _ in range(iterations):
        f = truncated_variance_fraction(threshold / sigma)
        if f <= 0:
            return 1.0
        new = std_clipped / np.sqrt(f)
        if abs(new - sigma) < 1e-12 * sigma:
            sigma = new
            break
        sigma = new
    return float((sigma / std_clipped) ** 2)


@dataclass(frozen=True)
class ClippedStats:
    """Sigma-clipped statistics (ADU). ``var_corrected`` includes the Gaussian correction of the
    variance lost to clipping; ``std_corrected`` its square root."""

    mean: float
    median: float
    std: float
    var: float
    var_corrected: float
    std_corrected: float
    n: int
    n_rejected: int
    lo: float
    hi: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _clip_bounds(x: np.ndarray, nsigma: float, maxiters: int, center: str) -> tuple[float, float, np.ndarray]:
    """Iterate symmetric clipping on the 1-D finite sample ``x``: (centre, half-width, kept)."""
    keep = x
    c, threshold = float("nan"), np.inf
    for _ in range(maxiters):
        c = float(np.median(keep)) if center == "median" else float(keep.mean())
        s = float(keep.std())
        if s == 0:
            break
        threshold = nsigma * s
        new = x[(x >= c - threshold) & (x <= c + threshold)]
        if new.size == keep.size:
            keep = new
            break
        keep = new
    return c, threshold, keep


def clipped_stats(
    values: np.ndarray,
    nsigma: float = 4.0,
    maxiters: int = 10,
    mask: np.ndarray | None = None,
    center: Literal["median", "mean"] = "median",
    subsample: int | None = None,
) -> ClippedStats:
    """Iterative symmetric sigma clipping of ``values`` (NaN ignored; ``mask`` True = excluded).

    Each iteration keeps ``|x - c| <= nsigma * std`` with ``c`` the median (default) or mean of
    the kept sample; stops when nothing changes. The returned ``var_corrected`` is the variance of
    the kept sample divided by the fraction a Gaussian keeps at the final threshold
    (:func:`clip_variance_correction`): unbiased for Gaussian data, which matters whenever a
    variance is the measurement (PTC, RON).

    ``subsample=k`` (fast mode for multi-megapixel arrays): the clipping bounds are iterated on
    every k-th value, then mean / variance are computed in one pass over all values inside the
    bounds (the correction uses the bound actually applied; ``median`` is the subsample's)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    good = np.isfinite(x)
    if mask is not None:
        good &= ~np.asarray(mask, dtype=bool).ravel()
    if not good.all():
        x = x[good]
    n0 = x.size
    if n0 == 0:
        nan = float("nan")
        return ClippedStats(nan, nan, nan, nan, nan, nan, 0, 0, nan, nan)
    if subsample and subsample > 1 and n0 > 1000 * subsample:
        c, threshold, ksub = _clip_bounds(x[::subsample], nsigma, maxiters, center)
        keep = x[(x >= c - threshold) & (x <= c + threshold)] if np.isfinite(threshold) else x
        median = float(np.median(ksub))
    else:
        c, threshold, keep = _clip_bounds(x, nsigma, maxiters, center)
        median = float(np.median(keep))
    lo, hi = (c - threshold, c + threshold) if np.isfinite(threshold) else (-np.inf, np.inf)
    mean = float(keep.mean())
    var = float(keep.var(ddof=1)) if keep.size > 1 else float("nan")
    corr = clip_variance_correction(threshold, np.sqrt(var)) if np.isfinite(threshold) and var > 0 else 1.0
    var_c = var * corr
    return ClippedStats(
        mean=mean,
        median=median,
        std=float(np.sqrt(var)),
        var=var,
        var_corrected=var_c,
        std_corrected=float(np.sqrt(var_c)),
        n=int(keep.size),
        n_rejected=int(n0 - keep.size),
        lo=float(lo),
        hi=float(hi),
    )


def clip_mask(
    values: np.ndarray, nsigma: float = 4.0, maxiters: int = 10, mask: np.ndarray | None = None, subsample: int | None = None
) -> np.ndarray:
    """Boolean array (same shape as ``values``): True where a pixel survives iterative
    sigma clipping (see :func:`clipped_stats`, same ``subsample`` fast mode) and is finite and
    not masked."""
    x = np.asarray(values, dtype=np.float64)
    good = np.isfinite(x)
    if mask is not None:
        good &= ~np.asarray(mask, dtype=bool)
    sample = x[good] if not good.all() else x.ravel()
    if sample.size == 0:
        return good
    if subsample and subsample > 1 and sample.size > 1000 * subsample:
        sample = sample[::subsample]
    c, threshold, _ = _clip_bounds(sample, nsigma, maxiters, "median")
    if not np.isfinite(threshold):
        return good
    return good & (np.abs(x - c) <= threshold)


def mad_std(values: np.ndarray) -> float:
    """Robust standard deviation: 1.4826 x median absolute deviation (NaN ignored)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    return float(1.482602218505602 * np.median(np.abs(x - np.median(x))))


def robust_mean(values: np.ndarray, nsigma: float = 4.0) -> float:
    """Sigma-clipped mean (:func:`clipped_stats`)."""
    return clipped_stats(values, nsigma).mean


# --------------------------------------------------------------------------------------------
# Smooth 2-D models
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BinnedImage:
    """Block statistics of an image: ``values[iy, ix]`` (NaN for empty bins) at centres
    ``yc`` (rows) and ``xc`` (columns), pixel coordinates of the input image."""

    values: np.ndarray
    yc: np.ndarray
    xc: np.ndarray


def bin_image(image: np.ndarray, nbins: tuple[int, int] = (32, 32), stat: Literal["median", "mean"] = "median") -> BinnedImage:
    """Median (or mean) of the image in ``nbins`` = (rows, cols) blocks; NaN ignored.

    Blocks have ``n // nbins`` pixels along each axis, the last block of an axis also takes the
    remainder. Vectorised (one reshape per band); the NaN-aware (slower) path only when the
    image has NaN."""
    img = np.asarray(image, dtype=np.float32)
    ny, nx = img.shape
    nby, nbx = max(1, min(nbins[0], ny)), max(1, min(nbins[1], nx))
    by, bx = ny // nby, nx // nbx
    has_nan = not np.isfinite(img).all()
    import warnings

    def block_stat(a: np.ndarray, h: int, w: int) -> np.ndarray:
        r, c = a.shape[0] // h, a.shape[1] // w
        blocks = a.reshape(r, h, c, w).transpose(0, 2, 1, 3).reshape(r, c, h * w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            if stat == "median":
                return np.nanmedian(blocks, axis=2) if has_nan else np.median(blocks, axis=2)
            return np.nanmean(blocks, axis=2) if has_nan else blocks.mean(axis=2)

    r_edges = [0, (nby - 1) * by, ny]
    c_edges = [0, (nbx - 1) * bx, nx]
    vals = np.empty((nby, nbx))
    for i in range(2):
        r0, r1 = r_edges[i], r_edges[i + 1]
        if r1 <= r0:
            continue
        h = by if i == 0 else r1 - r0
        for j in range(2):
            c0, c1 = c_edges[j], c_edges[j + 1]
            if c1 <= c0:
                continue
            w = bx if j == 0 else c1 - c0
            vals[(r0 // by if i == 0 else nby - 1) : (r1 // by if i == 0 else nby), (c0 // bx if j == 0 else nbx - 1) : (c1 // bx if j == 0 else nbx)] = block_stat(img[r0:r1, c0:c1], h, w)
    yc = np.array([(i * by + (ny if i == nby - 1 else (i + 1) * by) - 1) / 2 for i in range(nby)])
    xc = np.array([(i * bx + (nx if i == nbx - 1 else (i + 1) * bx) - 1) / 2 for i in range(nbx)])
    return BinnedImage(vals, yc, xc)


def _legendre_basis(coord: np.ndarray, n: int, degree: int) -> np.ndarray:
    """Legendre polynomials 0..degree of coordinates scaled from [0, n-1] to [-1, 1]."""
    u = 2.0 * np.asarray(coord, dtype=np.float64) / max(n - 1, 1) - 1.0
    return np.polynomial.legendre.legvander(u, degree)


@dataclass(frozen=True)
class Smooth2DModel:
    """A smooth 2-D model: ``model`` (float32, image shape), the method and its parameters,
    the binned data it was fitted to and the rms of the bin residuals (same units as the image)."""

    model: np.ndarray
    method: str
    degree: int
    nbins: tuple[int, int]
    coeffs: np.ndarray | None
    binned: BinnedImage
    rms_resid: float


def fit_smooth_2d(
    image: np.ndarray,
    method: Literal["poly", "spline"] = "poly",
    degree: int = 5,
    nbins: tuple[int, int] = (32, 32),
    nsigma: float = 5.0,
    maxiters: int = 3,
    spline_smoothing: float | None = None,
) -> Smooth2DModel:
    """Fit a smooth 2-D model to an image (ADU or normalised): the image is binned into
    ``nbins`` block medians (NaN pixels ignored, so masks are honoured), then

    - ``poly``: a Legendre polynomial of total degree ``degree`` in (row, col) fitted by least
      squares to the bin medians, with ``nsigma`` iterative rejection of outlying bins;
    - ``spline``: a bicubic smoothing spline (scipy RectBivariateSpline) through the bin
      medians (empty bins filled by the polynomial first); ``spline_smoothing`` is the
      scipy ``s`` (default: number of bins x residual variance of the polynomial fit).

    The model is evaluated on the full pixel grid (separably, fast) and returned as float32.
    """
    img = np.asarray(image)
    ny, nx = img.shape
    binned = bin_image(img, nbins)
    vals = binned.values
    vy = _legendre_basis(binned.yc, ny, degree)
    vx = _legendre_basis(binned.xc, nx, degree)
    ij = [(i, j) for i in range(degree + 1) for j in range(degree + 1 - i)]
    design = np.stack([np.outer(vy[:, i], vx[:, j]).ravel() for i, j in ij], axis=1)
    target = vals.ravel()
    use = np.isfinite(target)
    if use.sum() < len(ij):
        raise ValueError(f"too few valid bins ({int(use.sum())}) for a degree-{degree} 2-D polynomial")
    coef = np.zeros(len(ij))
    for _ in range(max(maxiters, 1)):
        coef, *_ = np.linalg.lstsq(design[use], target[use], rcond=None)
        resid = target - design @ coef
        s = mad_std(resid[use])
        new = np.isfinite(target) & (np.abs(resid) <= nsigma * s) if s > 0 else use
        if new.sum() < len(ij) or np.array_equal(new, use):
            break
        use = new
    cmat = np.zeros((degree + 1, degree + 1))
    for c, (i, j) in zip(coef, ij):
        cmat[i, j] = c
    poly_bins = (design @ coef).reshape(vals.shape)
    rms = float(np.sqrt(np.mean((target[use] - (design @ coef)[use]) ** 2)))
    fy = _legendre_basis(np.arange(ny), ny, degree)
    fx = _legendre_basis(np.arange(nx), nx, degree)
    if method == "poly":
        model = (fy @ cmat @ fx.T).astype(np.float32)
        return Smooth2DModel(model, "poly", degree, tuple(nbins), cmat, binned, rms)
    if method != "spline":
        raise ValueError(f"unknown smooth model {method!r} (poly, spline)")
    from scipy.interpolate import RectBivariateSpline

    filled = np.where(np.isfinite(vals), vals, poly_bins)
    bad = ~use.reshape(vals.shape)
    filled[bad] = poly_bins[bad]
    kx = min(3, len(binned.yc) - 1)
    ky = min(3, len(binned.xc) - 1)
    s = spline_smoothing if spline_smoothing is not None else filled.size * rms**2
    spl = RectBivariateSpline(binned.yc, binned.xc, filled, kx=kx, ky=ky, s=s)
    model = spl(np.arange(ny), np.arange(nx)).astype(np.float32)
    resid = (filled - spl(binned.yc, binned.xc))[~bad]
    return Smooth2DModel(model, "spline", degree, tuple(nbins), None, binned, float(np.sqrt(np.mean(resid**2))))


# --------------------------------------------------------------------------------------------
# Fitting helpers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitResult:
    """A least-squares fit: parameters, their 1-sigma errors, covariance, reduced chi^2, the
    boolean array of points kept after outlier rejection and the success flag."""

    params: np.ndarray
    errors: np.ndarray
    cov: np.ndarray
    chi2_red: float
    kept: np.ndarray
    success: bool
    message: str = ""


def iterative_fit(
    func: Callable[..., np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    p0: Sequence[float],
    sigma: np.ndarray | None = None,
    nsigma: float = 5.0,
    maxiters: int = 10,
    min_points: int | None = None,
    bounds: tuple = (-np.inf, np.inf),
    absolute_sigma: bool = False,
) -> FitResult:
    """``scipy.optimize.curve_fit`` with iterative ``nsigma`` outlier rejection.

    Residuals are normalised by ``sigma`` (1 when None) and by their robust scale (MAD std of
    the kept points; with ``sigma`` given the scale is at least 1, so ``sigma`` acts as a
    floor); points beyond ``nsigma`` are dropped and the fit repeated until nothing changes.
    Parameter errors are scaled by the reduced chi^2 unless ``absolute_sigma``."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    sig = np.ones_like(y) if sigma is None else np.asarray(sigma, dtype=np.float64)
    kept = np.isfinite(x) & np.isfinite(y) & np.isfinite(sig) & (sig > 0)
    npar = len(p0)
    min_points = min_points or npar + 1
    p = np.asarray(p0, dtype=np.float64)
    cov = np.full((npar, npar), np.nan)
    ok, msg = False, ""
    for _ in range(max(maxiters, 1)):
        if kept.sum() < min_points:
            msg = f"only {int(kept.sum())} points left"
            ok = False
            break
        try:
            p, cov = optimize.curve_fit(
                func, x[kept], y[kept], p0=p, sigma=sig[kept], absolute_sigma=absolute_sigma and sigma is not None,
                bounds=bounds, maxfev=20000,
            )
            ok = True
        except (RuntimeError, ValueError) as exc:
            ok, msg = False, str(exc)
            break
        r = (y - func(x, *p)) / sig
        scale = mad_std(r[kept])
        if sigma is not None:
            scale = max(scale, 1.0)
        if not np.isfinite(scale) or scale <= 0:
            break
        new = kept & (np.abs(r) <= nsigma * scale)
        if new.sum() == kept.sum():
            break
        kept = new
    r = (y - func(x, *p)) / sig
    dof = max(int(kept.sum()) - npar, 1)
    chi2 = float(np.sum(r[kept] ** 2) / dof)
    err = np.sqrt(np.clip(np.diag(cov), 0, None)) if np.all(np.isfinite(cov)) else np.full(npar, np.nan)
    return FitResult(p, err, cov, chi2, kept, ok, msg)


def weighted_polyfit(x: np.ndarray, y: np.ndarray, degree: int, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Polynomial fit (coefficients highest power first, as ``np.polyval``) and their covariance
    (scaled by the reduced chi^2)."""
    coef, cov = np.polyfit(np.asarray(x, float), np.asarray(y, float), degree, w=w, cov="unscaled" if w is not None else True)
    return coef, cov


__all__ = [
    "IMG_COLS",
    "FrameInput",
    "as_frames",
    "frame_inputs",
    "ccd_label",
    "group_by",
    "BinnedImage",
    "ClippedStats",
    "FitResult",
    "Smooth2DModel",
    "bin_image",
    "clip_mask",
    "clip_variance_correction",
    "clipped_stats",
    "fit_smooth_2d",
    "image_area",
    "iterative_fit",
    "mad_std",
    "preprocess_quadrant",
    "robust_mean",
    "row_offsets",
    "subtract_offset",
    "truncated_variance_fraction",
    "weighted_polyfit",
]
