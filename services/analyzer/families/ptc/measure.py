"""PTC pair measurement (pure: canonical quadrants in, typed measurements out).

Per pair of flats at equal exposure time, per canonical quadrant (image area minus an edge of
``edge`` pixels), all in float32 (the statistics accumulate in float64):

- offset: clipped mean of the trimmed prescan (default; row-by-row offsets would add the
  prescan noise to every row of the difference image, a median is biased on digitised data);
- symmetric difference ``D = (mu2 I1 - mu1 I2) / ((mu1 + mu2) / 2)`` (cancels illumination and
  PRNU, and a flux mismatch between the two frames), weighted with preliminary clipped means;
- **one pixel mask** for everything: valid pixels (not at the ADC ceiling in either frame, not
  in the cosmetic defect mask when given) that survive the ``diff_nsigma`` clipping of D. The
  means ``mu1``, ``mu2``, the variance and the covariances all come from these pixels;
- covariances ``C_ij`` of D / 2 for lags 0..``max_lag`` by FFT (float32 ``rfft2``, zero
  padded to a fast length, scipy ``workers``) over the mask, averaged over the (+i, -i) lags,
  with the Gaussian correction of the variance lost to clipping; ``cov[i, j]``: **i = serial
  (x, along a row), j = parallel (y, along a column)** (Astier et al. 2019), ``cov[0, 0]`` is
  the variance;
- Kolmogorov-Smirnov test (as cp_pipe): every valid pixel of D (no clipping, no subsample),
  dithered by U(-1/2, 1/2) per frame to remove the ADU lattice, against the Gaussian fitted to
  its histogram (``ks_bins`` bins over +/- 8 sigma); the statistic from a fine histogram
  (O(n), no sort) and the p-value for the effective number of independent pixels (the measured
  covariances shrink it: ``n_eff = n / (1 + 2/pi sum_{lag != 0} rho)``).

Per frame and quadrant (:func:`frame_quad_stats`): fluence, ADC-saturated fraction, overscan
RON, hard-edge response.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import fft as sfft
from scipy import optimize, special, stats

from services.analyzer.family import Extraction
from services.analyzer.families.ptc.params import ADC_MAX, FULL_SCALE, PTCParams
from services.analyzer.science.preprocess import row_offsets
from services.analyzer.science.stats import clip_variance_correction, clipped_stats, mad_std
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, STANDARD_TRIMS, region

MIN_PIXELS = 1000  # fewer valid pixels in a quadrant pair: not measured (saturated or masked)
FFT_WORKERS = 1  # scipy.fft threads per transform (1: the analyzer runs one extraction per core)


# ----------------------------------------------------------------------------- models


class FrameQuadStats(BaseModel):
    """Per-frame, per-quadrant quantities that need only one frame."""

    obsid: int
    ccd: str
    quadrant: str
    exptime: float = Field(description="exposure time (s)")
    fluence: float = Field(description="mean signal above the offset (ADU)")
    offset_adu: float = Field(description="offset (bias level) from the prescan (ADU)")
    sat_frac: float = Field(description="fraction of image pixels at the ADC ceiling (raw 65535)")
    ron_ove_adu: float = Field(description="overscan read noise (ADU, clipped std with the clipping correction)")
    her: float = Field(description="hard-edge response (O_1 - O_far) / (I_last - O_far) at the image -> serial overscan edge")


class PairQuadMeasurement(BaseModel):
    """One pair of flats, one quadrant. Means in ADU above the offset, variance / covariances
    in ADU^2 (per frame, i.e. of D / 2); ``cov[i, j]``: i serial lag, j parallel lag."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    ccd: str
    quadrant: str
    mu1: float
    mu2: float
    mu: float = Field(description="(mu1 + mu2) / 2 over the pair's pixel mask (ADU)")
    var: float = Field(description="variance of D / 2 over the same pixels, clipping-corrected (ADU^2) = cov[0, 0]")
    var_err: float
    cov: np.ndarray = Field(description="covariances C[i serial, j parallel] of D / 2 (ADU^2), float64")
    npix: int = Field(description="pixels in the mask")
    n_defect: int = Field(0, description="pixels excluded by the cosmetic defect mask")
    ks_p: float = Field(description="KS p-value of D against the Gaussian fitted to its histogram")
    ks_d: float = Field(float("nan"), description="KS statistic")
    ks_sigma: float = Field(float("nan"), description="sigma of the Gaussian fitted to the histogram of D (ADU)")
    mismatch: float = Field(description="|mu1 - mu2| / mu")
    adc_frac: float = Field(description="fraction of image pixels at the ADC ceiling in either frame")
    plateau_frac: float = Field(description="fraction of pixels within 6 RON of the image maximum when that is above "
                                "half the ADC scale (a full-well or ADC plateau)")
    plateau_level: float = Field(float("nan"), description="level of that plateau above the offset when it is below the ADC "
                                 "ceiling (ADU): the full well of bloomed pixels; NaN when none")
    offset1: float
    offset2: float

    @property
    def sat_frac(self) -> float:
        """Saturated fraction (ADC ceiling or plateau), what the fit selection uses."""
        return max(self.adc_frac, self.plateau_frac)


class PTCPairExtraction(Extraction):
    """Extraction of one pair of PTC flats: per CCD and quadrant the measurement, and the
    per-frame statistics of both frames."""

    exptime: float = Field(description="exposure time of the pair (s)")
    wave: float | None = None
    pairs: dict[str, dict[str, PairQuadMeasurement]] = Field(default_factory=dict, description="{CCD: {Q: measurement}}")
    frames: list[FrameQuadStats] = Field(default_factory=list)
    defect_masked: bool = Field(False, description="the cosmetic defect mask was applied")


# ----------------------------------------------------------------------------- covariances


def _pair_counts(mask: np.ndarray, L: int, max_masked: int = 50000, excluded: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray | None:
    """Number of pixel pairs (p, p + (dy, dx)) with both pixels valid, for dy in 0..L-1 and
    dx in -(L-1)..L-1 (array [dy, dx + L - 1]), counted directly from the few masked pixels
    (rectangle count minus pairs touching a masked pixel); None when too many are masked."""
    ny, nx = mask.shape
    ry, rx = np.nonzero(~mask) if excluded is None else excluded
    if ry.size > max_masked:
        return None
    out = np.empty((L, 2 * L - 1))
    for dy in range(L):
        for k, dx in enumerate(range(-(L - 1), L)):
            n = (ny - dy) * (nx - abs(dx))
            if ry.size:
                y2, x2 = ry + dy, rx + dx
                inside2 = (y2 < ny) & (x2 >= 0) & (x2 < nx)
                y0, x0 = ry - dy, rx - dx
                inside0 = (y0 >= 0) & (x0 >= 0) & (x0 < nx)
                both = np.count_nonzero(~mask[y2[inside2], x2[inside2]])
                n -= np.count_nonzero(inside2) + np.count_nonzero(inside0) - both
            out[dy, k] = n
    return out


def masked_covariances(img: np.ndarray, mask: np.ndarray, max_lag: int, dtype: type = np.float32,
                       excluded: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Covariances of ``img`` over the pixels where ``mask`` is True, for lags 0..max_lag, by FFT
    (``dtype`` float32 by default, zero-padded to a fast length: no wrap-around). Returns
    ``(cov[i, j], npairs[i, j])`` (float64) with i the serial (column) lag and j the parallel
    (row) lag, each the mean of the (+i, +j) and (-i, +j) estimates. The mean of the masked
    pixels is subtracted first. Pair counts come directly from the few masked pixels, or from
    the FFT of the mask when many are masked. ``excluded``: ``np.nonzero(~mask)`` if known."""
    L = max_lag + 1
    if excluded is None:
        excluded = np.nonzero(~mask)
    ny, nx = img.shape
    n = ny * nx - excluded[0].size
    if n <= 0:
        return np.full((L, L), np.nan), np.zeros((L, L))
    total = float(np.sum(np.asarray(img).sum(axis=1, dtype=dtype), dtype=np.float64))  # pairwise along rows
    mean = (total - float(np.sum(img[excluded], dtype=np.float64))) / n
    shape = (sfft.next_fast_len(ny + max_lag, real=True), sfft.next_fast_len(nx + max_lag, real=True))
    buf = np.zeros(shape, dtype=dtype)  # the zero padding, written in place (no padded copy)
    np.subtract(img, dtype(mean), out=buf[:ny, :nx], casting="unsafe")
    buf[excluded] = 0
    fx = sfft.rfft2(buf, workers=FFT_WORKERS)
    del buf
    np.multiply(fx, np.conj(fx), out=fx)
    sxx = sfft.irfft2(fx, s=shape, workers=FFT_WORKERS)
    del fx
    counts = _pair_counts(mask, L, excluded=excluded)
    if counts is None:
        fw = sfft.rfft2(mask.astype(dtype), s=shape, workers=FFT_WORKERS)
        np.multiply(fw, np.conj(fw), out=fw)
        sww = np.rint(sfft.irfft2(fw, s=shape, workers=FFT_WORKERS).astype(np.float64))
        counts = np.concatenate([sww[:L, -(L - 1) :] if L > 1 else sww[:L, :0], sww[:L, :L]], axis=1)
    # autocorrelation index [dy, dx]: dx >= 0 at columns 0..L-1, dx < 0 at the end of the axis
    pos_s = sxx[:L, :L].astype(np.float64)
    neg_s = (np.concatenate([sxx[:L, :1], sxx[:L, -1 : -L : -1]], axis=1) if L > 1 else sxx[:L, :1]).astype(np.float64)
    pos_n = counts[:, L - 1 :]
    neg_n = counts[:, L - 1 :: -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        c = 0.5 * (pos_s / pos_n + neg_s / neg_n)
    npairs = pos_n + neg_n
    npairs[:, 0] = pos_n[:, 0]
    return c.T.copy(), npairs.T.copy()  # [dy, dx] -> [i = dx (serial), j = dy (parallel)]


# ----------------------------------------------------------------------------- KS normality


@lru_cache(maxsize=4)
def _dither(shape: tuple[int, int], seed: int) -> np.ndarray:
    """U1 - U2 of two independent U(-1/2, 1/2) (float32, read-only, cached per shape): the
    dither of a difference of two digitised frames."""
    rng = np.random.default_rng(seed)
    t = rng.random(shape, dtype=np.float32)
    t -= rng.random(shape, dtype=np.float32)
    t.setflags(write=False)
    return t


def _gaussian_hist_fit(counts: np.ndarray, centres: np.ndarray, width: float) -> tuple[float, float]:
    """(centre, sigma) of a Gaussian fitted to a histogram (weights 1 / sqrt(counts))."""
    y = counts.astype(np.float64)
    err = np.sqrt(np.where(y > 0, y, 1.0))
    tot = y.sum()
    m0 = float((y * centres).sum() / tot)
    s0 = float(np.sqrt(max((y * (centres - m0) ** 2).sum() / tot, width**2)))

    def resid(p: np.ndarray) -> np.ndarray:
        amp, m, s = p
        return (amp * np.exp(-0.5 * ((centres - m) / s) ** 2) - y) / err

    amp0 = tot * width / (np.sqrt(2 * np.pi) * s0)
    res = optimize.least_squares(resid, [amp0, m0, s0], x_scale=[amp0, s0, s0], method="lm")
    return float(res.x[1]), float(abs(res.x[2]))


def ks_gaussian(d: np.ndarray, valid: np.ndarray | None, sigma0: float, nbins: int = 100, n_eff_factor: float = 1.0,
                fine: int = 400) -> tuple[float, float, float]:
    """KS test of the (dithered, continuous) values ``d`` at the ``valid`` pixels against the
    Gaussian fitted to their histogram (``nbins`` bins over +/- 8 ``sigma0`` about the median,
    as cp_pipe). The empirical CDF comes from a histogram ``fine`` times finer (O(n), no sort;
    its edges resolve the CDF to 0.4 / (fine x nbins / 16) of its slope at the peak), compared
    with the fitted Gaussian at every fine edge. The p-value is the asymptotic Kolmogorov one
    for ``n x n_eff_factor`` independent pixels. Returns ``(p, D, sigma_fit)``."""
    nb = nbins * fine
    lo = -8.0 * sigma0
    w = 16.0 * sigma0 / nb
    centre = float(np.median(d[::97])) if d.size > 10000 else float(np.median(d))
    idx = d - np.float32(centre + lo - w)  # bin k + 1 holds [lo + k w, lo + (k + 1) w): 0 under, nb + 1 over
    idx *= np.float32(1.0 / w)
    np.clip(idx, 0.0, nb + 1, out=idx)
    bins = idx.astype(np.int32)
    if valid is not None and not valid.all():
        bins[~valid] = nb + 2  # ignored
    counts = np.bincount(bins.ravel(), minlength=nb + 3)[: nb + 2].astype(np.float64)
    n = counts.sum()
    if n < 100:
        return float("nan"), float("nan"), float("nan")
    inner = counts[1 : nb + 1]
    coarse = inner.reshape(nbins, fine).sum(axis=1)
    edges_c = centre + lo + w * fine * np.arange(nbins + 1)
    m, s = _gaussian_hist_fit(coarse, 0.5 * (edges_c[1:] + edges_c[:-1]), w * fine)
    edges = centre + lo + w * np.arange(nb + 1)
    ecdf = (counts[0] + np.concatenate([[0.0], np.cumsum(inner)])) / n  # F_n at each fine edge
    model = special.ndtr((edges - m) / s)
    dstat = float(np.max(np.abs(ecdf - model)))
    n_eff = max(n * n_eff_factor, 1.0)
    p = float(stats.kstwobign.sf(dstat * np.sqrt(n_eff))) if n_eff > 5000 else float(stats.kstwo.sf(dstat, int(n_eff)))
    return p, dstat, s


def _neff_factor(cov: np.ndarray) -> float:
    """1 / (1 + 2/pi sum_{lag != 0} rho): the fraction of independent pixels for the variance of
    an empirical CDF of a correlated Gaussian field (indicator covariance arcsin(rho) / 2 pi vs
    1 / 4 at the median), from the measured covariances over the whole lag plane."""
    c = np.nan_to_num(np.asarray(cov, dtype=np.float64))
    if not c[0, 0] > 0:
        return 1.0
    rho = c / c[0, 0]
    plane = rho[1:, 0].sum() * 2 + rho[0, 1:].sum() * 2 + rho[1:, 1:].sum() * 4
    return float(1.0 / max(1.0 + 2.0 / np.pi * plane, 0.1))


# ----------------------------------------------------------------------------- pair


def image_area(quad: np.ndarray, edge: int) -> np.ndarray:
    """Image area of a canonical quadrant minus ``edge`` pixels on every side (a view)."""
    return quad[edge : IMAGE_ROWS - edge, PRESCAN_COLS + edge : PRESCAN_COLS + IMAGE_COLS - edge]


def _offsets(quad: np.ndarray, method: str, edge: int) -> np.ndarray | float:
    """Offset of the image rows (a float for the constant methods, else a column vector)."""
    m = method if method in ("row", "global", "mean", "none") else "mean"
    off = row_offsets(quad, m)
    if m == "row":
        return off[edge : IMAGE_ROWS - edge, None]
    return float(off[0])


def plateau_fraction(raw: np.ndarray, offset: float, ron: float, top: float | None = None) -> float:
    """Fraction of pixels within 6 RON of the image maximum ``top`` when that maximum is above
    half the ADC scale over the offset (a full-well or ADC plateau); 0 otherwise."""
    top = float(np.max(raw)) if top is None else top
    if not top - offset > 0.5 * FULL_SCALE:
        return 0.0
    return float(np.count_nonzero(raw >= top - 6.0 * max(ron if np.isfinite(ron) else 0.0, 0.5)) / raw.size)


def _mean_over(raw: np.ndarray, excluded: tuple[np.ndarray, np.ndarray], n: int, offset: np.ndarray | float) -> float:
    """Mean of ``raw - offset`` over all pixels but the ``excluded`` ones (n pixels left): the
    float32 pairwise sums of the rows in float64, minus the few excluded pixels."""
    rows = raw.sum(axis=1, dtype=np.float32).astype(np.float64)
    bad = raw[excluded].astype(np.float64)
    if isinstance(offset, float):
        return (float(rows.sum()) - float(bad.sum())) / n - offset
    off = offset[:, 0]
    return (float((rows - raw.shape[1] * off).sum()) - float((bad - off[excluded[0]]).sum())) / n


def measure_pair(
    q1: np.ndarray,
    q2: np.ndarray,
    params: PTCParams | None = None,
    *,
    ccd: str = "CCD1",
    quadrant: str = "E",
    defect: np.ndarray | None = None,
) -> PairQuadMeasurement:
    """Means, variance, covariances and KS test of one pair of canonical quadrants (raw ADU).
    ``defect``: optional bool mask of the canonical quadrant (True = bad pixel)."""
    p = params or PTCParams()
    e = p.edge
    r1, r2 = image_area(q1, e), image_area(q2, e)
    if r1.dtype != np.float32:
        r1, r2 = r1.astype(np.float32), r2.astype(np.float32)
    off1, off2 = _offsets(q1, p.offset_method, e), _offsets(q2, p.offset_method, e)
    o1 = off1 if isinstance(off1, float) else float(np.mean(off1))
    o2 = off2 if isinstance(off2, float) else float(np.mean(off2))
    ron = mad_std(region(q1, "pre", STANDARD_TRIMS["pre"])[::8])
    # valid pixels: not at the ADC ceiling in either frame, not a known defect
    valid = None
    adc_frac = 0.0
    top1, top2 = float(np.max(r1)), float(np.max(r2))
    if max(top1, top2) >= ADC_MAX:
        valid = (r1 < ADC_MAX) & (r2 < ADC_MAX)
        adc_frac = 1.0 - np.count_nonzero(valid) / valid.size
    plateau, plateau_level = 0.0, float("nan")
    for raw, top, o in ((r1, top1, o1), (r2, top2, o2)):
        if top - o > 0.5 * FULL_SCALE:
            frac = plateau_fraction(raw, o, ron, top)
            if frac > plateau:
                plateau, plateau_level = frac, (top - o if top < ADC_MAX else float("nan"))
    n_defect = 0
    if defect is not None:
        bad = image_area(np.asarray(defect, dtype=bool), e)
        n_defect = int(np.count_nonzero(bad))
        if n_defect:
            valid = ~bad if valid is None else valid & ~bad
    nl = p.max_lag + 1
    nan = float("nan")
    # preliminary clipped means (the weights of D), from a subsample
    s1 = clipped_stats(r1[::8, ::8], p.mean_nsigma, maxiters=5, mask=None if valid is None else ~valid[::8, ::8])
    s2 = clipped_stats(r2[::8, ::8], p.mean_nsigma, maxiters=5, mask=None if valid is None else ~valid[::8, ::8])
    m1p, m2p = s1.mean - o1, s2.mean - o2
    mup = 0.5 * (m1p + m2p)
    base = dict(ccd=ccd, quadrant=quadrant, adc_frac=float(adc_frac), plateau_frac=float(plateau), plateau_level=float(plateau_level),
                offset1=o1, offset2=o2,
                n_defect=n_defect)
    if not (np.isfinite(mup) and mup > 0):
        return PairQuadMeasurement(**base, mu1=m1p, mu2=m2p, mu=mup, var=nan, var_err=nan, cov=np.full((nl, nl), nan), npix=0,
                                   ks_p=nan, mismatch=nan)
    a, b = np.float32(m2p / mup), np.float32(m1p / mup)
    d = r1 * a
    d -= r2 * b
    if isinstance(off1, float):
        d += np.float32((-m2p * off1 + m1p * off2) / mup)
    else:
        d += ((-m2p * off1 + m1p * off2) / mup).astype(np.float32)
    # the one pixel mask: valid and inside the clipping bounds of D (bounds from a subsample)
    sample = d[::29] if valid is None else d[::29][valid[::29]]
    cs = clipped_stats(sample, p.diff_nsigma, maxiters=10)
    centre, thr = 0.5 * (cs.lo + cs.hi), 0.5 * (cs.hi - cs.lo)
    tmp = np.subtract(d, np.float32(centre))
    np.abs(tmp, out=tmp)
    keep = tmp <= np.float32(thr)
    del tmp
    if valid is not None:
        keep &= valid
    excluded = np.nonzero(~keep)
    npix = keep.size - excluded[0].size
    if npix < MIN_PIXELS:  # (nearly) everything at the ADC ceiling or masked
        return PairQuadMeasurement(**base, mu1=m1p, mu2=m2p, mu=mup, var=nan, var_err=nan, cov=np.full((nl, nl), nan), npix=npix,
                                   ks_p=nan, mismatch=abs(m1p - m2p) / mup)
    mu1 = _mean_over(r1, excluded, npix, off1)
    mu2 = _mean_over(r2, excluded, npix, off2)
    mu = 0.5 * (mu1 + mu2)
    mismatch = abs(mu1 - mu2) / mu if mu > 0 else float("nan")
    cov, _ = masked_covariances(d, keep, p.max_lag, excluded=excluded)
    c00 = float(cov[0, 0])
    corr = clip_variance_correction(thr, np.sqrt(c00)) if c00 > 0 and np.isfinite(thr) else 1.0
    cov = cov * (corr / 2.0)
    var = float(cov[0, 0])
    # KS on every valid pixel of the dithered D (no clipping)
    d += _dither(d.shape, p.seed) * np.float32(0.5 * (a + b))
    ks_p, ks_d, ks_s = ks_gaussian(d, valid, np.sqrt(max(c00, 1e-6)), p.ks_bins, _neff_factor(cov))
    return PairQuadMeasurement(
        **base, mu1=mu1, mu2=mu2, mu=mu, var=var, var_err=var * np.sqrt(2.0 / max(npix, 1)), cov=cov, npix=npix,
        ks_p=ks_p, ks_d=ks_d, ks_sigma=ks_s, mismatch=mismatch,
    )


# ----------------------------------------------------------------------------- frame


def frame_quad_stats(quad: np.ndarray, *, obsid: int = 0, ccd: str = "CCD1", quadrant: str = "E", exptime: float = 0.0,
                     fluence: float | None = None, offset: float | None = None) -> FrameQuadStats:
    """Fluence, ADC saturation, overscan RON and HER of one canonical quadrant of a flat.

    HER = (O_1 - O_far) / (I_last - O_far): O_1 = mean of the first serial-overscan column,
    O_far = mean of the overscan columns beyond the 5th, I_last = mean of the last image column
    (all over the image rows; the offset cancels). ``fluence`` / ``offset``: already measured
    (the pair's mean and offset), else the median of a subsample above the prescan median."""
    off = float(np.median(region(quad, "pre", STANDARD_TRIMS["pre"]))) if offset is None else float(offset)
    img = quad[:IMAGE_ROWS, PRESCAN_COLS : PRESCAN_COLS + IMAGE_COLS]
    sat = float(np.count_nonzero(img >= ADC_MAX) / img.size)
    if fluence is None:
        fluence = float(np.median(img[::4, ::4])) - off
    ove0 = PRESCAN_COLS + IMAGE_COLS
    o1 = float(np.mean(quad[:IMAGE_ROWS, ove0], dtype=np.float64))
    ofar = float(np.mean(quad[:IMAGE_ROWS, ove0 + 5 :], dtype=np.float64))
    ilast = float(np.mean(quad[:IMAGE_ROWS, ove0 - 1], dtype=np.float64))
    her = (o1 - ofar) / (ilast - ofar) if ilast - ofar > 0 else float("nan")
    ron = clipped_stats(region(quad, "ove", STANDARD_TRIMS["ove"]), 4.0, maxiters=5).std_corrected
    return FrameQuadStats(obsid=obsid, ccd=ccd, quadrant=quadrant, exptime=float(exptime), fluence=float(fluence),
                          offset_adu=off, sat_frac=sat, ron_ove_adu=float(ron), her=float(her))
