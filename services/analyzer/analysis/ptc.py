"""PTC01 / PTC02: photon transfer curve, gain, brighter-fatter a-matrix, turnoff, blooming, HER.

Per pair of flats at equal exposure time (same CCD, same wavelength; frames paired in ObsID
order), per canonical quadrant (image area minus an edge of ``edge`` pixels):

- offset: clipped mean of the trimmed prescan (default; row-by-row offsets would add the
  prescan noise to every row of the difference image, a median is biased on digitised data);
- clipped means ``mu1``, ``mu2`` (ADU); pairs with ``|mu1 - mu2| / mean > 10 %`` are rejected;
- symmetric difference ``D = (mu2 I1 - mu1 I2) / ((mu1 + mu2) / 2)`` (cancels illumination and
  PRNU, and a flux mismatch between the two frames);
- variance ``var(D) / 2`` from the sigma-clipped D with the Gaussian clipping correction;
- covariances ``C_ij`` of D / 2 for lags 0..``max_lag`` by FFT (float64) with the pixel mask
  (clipped pixels, NaN), averaged over the (+j, -j) lags; ``cov[i, j]``: **i = serial (x,
  along a row), j = parallel (y, along a column)** (Astier et al. 2019 convention);
- Kolmogorov-Smirnov test of D (random subsample, standardised): pairs with p < 0.01 rejected.

Per quadrant fits of the accepted pairs:

(a) exponential model ``C00 = (exp(2 a00 g mu) - 1) / (2 a00 g^2) + n00 / g^2`` (Astier 2019
    eq. 16; mu ADU, g e-/ADU, a00 1/e-, n00 e-^2) with 5-sigma iterative outlier rejection
    after cutting the points beyond the turnoff (where the binned variance starts to fall);
    ``turnoff_adu`` = highest retained mean. ``gain``, ``gain_err``, ``a00``, ``noise_e``.
(b) full covariance model (Astier 2019 eq. 20) on all lags 0..``fit_lag``: a_ij, b_ij
    (from the fitted c = a b), noise matrix and gain (``gain_full``), fitted together
    (scipy ``least_squares``) from a per-lag parabola initialisation.
(c) the plain quadratic ``C00 = c0 + mu / g + c2 mu^2`` (the original campaign software's).

Also: blooming level (first fluence group whose variance falls below the model by more than
``bloom_rel_drop`` and ``bloom_nsigma`` for ``bloom_consecutive`` consecutive groups; a lower
limit at the highest fluence when not reached), hard-edge response
``HER = (O_1 - O_far) / (I_last - O_far)`` (first serial-overscan column vs last image column,
row means, offset-subtracted), overscan RON and the PTC noise cross-check (warn > 5 %).

Pure functions: :func:`measure_pair`, :func:`fit_exponential`, :func:`fit_full_covariance`,
:func:`fit_quadratic`, :func:`analyse_ptc`; :func:`run_test` is the analyzer plug-in.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from pydantic import BaseModel, Field
from scipy import fft as sfft
from scipy import optimize, stats

from services.analyzer.analysis.common import (
    params_of,
    FrameInput,
    as_frames,
    clip_mask,
    clip_variance_correction,
    clipped_stats,
    group_by,
    iterative_fit,
    mad_std,
    row_offsets,
)
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, QUADRANTS, STANDARD_TRIMS, region

TESTS = ("PTC01", "PTC02")
ADC_MAX = 65535.0
FULL_SCALE = 65536.0


class PTCParams(BaseModel):
    """Analysis parameters of PTC01/02 (and BF01, which re-analyses PTC data)."""

    offset_method: str = Field("mean", description="offset subtraction: mean (clipped mean of the trimmed prescan) | global (its median) | row")
    edge: int = Field(5, ge=0, description="pixels dropped at every edge of the image area")
    mean_nsigma: float = Field(5.0, description="clipping of the frame means mu1, mu2")
    diff_nsigma: float = Field(5.0, description="clipping of the difference image (mask and variance)")
    max_lag: int = Field(8, ge=0, le=32, description="largest covariance lag measured")
    fit_lag: int = Field(8, ge=0, le=32, description="largest lag in the full covariance fit (<= max_lag)")
    max_mismatch: float = Field(0.10, description="reject pairs whose fluences differ by more than this fraction")
    ks_pmin: float = Field(0.01, description="reject pairs whose difference image fails the KS normality test below this p")
    ks_nsample: int = Field(20000, description="pixels drawn for the KS test")
    max_sat_frac: float = Field(1e-4, description="pairs with a larger fraction of saturated pixels (ADC 65535 or a full-well "
                                "plateau) are measured but not fitted")
    outlier_nsigma: float = Field(5.0, description="iterative outlier rejection of the PTC fits")
    turnoff_rel_drop: float = Field(0.005, description="relative drop of the binned variance that marks the turnoff")
    bloom_rel_drop: float = Field(0.02, description="relative variance deficit vs the model that marks blooming")
    bloom_nsigma: float = Field(5.0, description="... and its significance")
    bloom_consecutive: int = Field(2, ge=1, description="consecutive fluence groups below the model")
    her_range: tuple[float, float] = Field((0.2, 0.8), description="fluence range (fraction of 2^16 ADU) of frames used for HER")
    ron_tolerance: float = Field(0.05, description="PTC noise vs overscan RON: warn beyond this relative difference")
    full_fit: bool = Field(True, description="run the full covariance (Astier eq. 20) fit")
    fit_b: bool = Field(True, description="fit the b matrix in the full model (else b = 0)")
    seed: int = Field(12345, description="seed of the KS subsample")


# ----------------------------------------------------------------------------- pair level


@dataclass
class PairMeasurement:
    """One pair of flats, one quadrant. Means in ADU, variance / covariances in ADU^2 (per
    frame, i.e. of D / 2); ``cov[i, j]``: i serial lag, j parallel lag; ``cov[0, 0] == var``."""

    ccd: str
    quadrant: str
    obsids: tuple[int, int]
    exptime: float
    wave: float | None
    mu1: float
    mu2: float
    mu: float
    var: float
    var_err: float
    cov: np.ndarray
    npix: int
    ks_p: float
    mismatch: float
    sat_frac: float
    rejected: bool = False
    reason: str = ""

    def row(self) -> dict[str, Any]:
        """Table row (JSON-able)."""
        return {
            "ccd": self.ccd,
            "quadrant": self.quadrant,
            "obsid1": self.obsids[0],
            "obsid2": self.obsids[1],
            "exptime": self.exptime,
            "mu1": self.mu1,
            "mu2": self.mu2,
            "mu": self.mu,
            "var": self.var,
            "var_err": self.var_err,
            "cov01": float(self.cov[0, 1]) if self.cov.shape[1] > 1 else float("nan"),
            "cov10": float(self.cov[1, 0]) if self.cov.shape[0] > 1 else float("nan"),
            "npix": self.npix,
            "ks_p": self.ks_p,
            "mismatch": self.mismatch,
            "sat_frac": self.sat_frac,
            "rejected": self.rejected,
            "reason": self.reason,
        }


def _image(quad: np.ndarray, offset_method: str, edge: int) -> np.ndarray:
    """Offset-subtracted image area (float64) minus ``edge`` pixels on every side."""
    off = row_offsets(quad, offset_method if offset_method in ("row", "global", "mean", "none") else "mean")
    img = np.asarray(quad[edge : IMAGE_ROWS - edge, PRESCAN_COLS + edge : PRESCAN_COLS + IMAGE_COLS - edge], dtype=np.float64)
    return img - off[edge : IMAGE_ROWS - edge, None]


def _pair_counts(mask: np.ndarray, L: int, max_masked: int = 50000) -> np.ndarray | None:
    """Number of pixel pairs (p, p + (dy, dx)) with both pixels valid, for dy in 0..L-1 and
    dx in -(L-1)..L-1 (array [dy, dx + L - 1]), counted directly from the few masked pixels
    (rectangle count minus pairs touching a masked pixel); None when too many are masked."""
    ny, nx = mask.shape
    ry, rx = np.nonzero(~mask)
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


def pileup_fraction(img: np.ndarray, ron: float) -> float:
    """Fraction of pixels within 6 RON of the image maximum when that maximum is above half the
    ADC scale (a full-well or ADC plateau); 0 otherwise (the maximum is then just the tail)."""
    top = float(np.max(img))
    if not top > 0.5 * FULL_SCALE:
        return 0.0
    return float(np.mean(img >= top - 6.0 * max(ron if np.isfinite(ron) else 0.0, 0.5)))


def masked_covariances(img: np.ndarray, mask: np.ndarray, max_lag: int) -> tuple[np.ndarray, np.ndarray]:
    """Covariances of ``img`` over the pixels where ``mask`` is True, for lags 0..max_lag, by FFT
    (float64, zero-padded: no wrap-around). Returns ``(cov[i, j], npairs[i, j])`` with i the
    serial (column) lag and j the parallel (row) lag, each the mean of the (+i, +j) and
    (-i, +j) estimates. The mean of the masked pixels is subtracted first. Pair counts come from
    the FFT of the mask, or directly when few pixels are masked (faster)."""
    L = max_lag + 1
    w = mask.astype(np.float64)
    n = w.sum()
    if n == 0:
        return np.full((L, L), np.nan), np.zeros((L, L))
    x = np.where(mask, img, 0.0)
    x = (x - x.sum() / n) * w
    ny, nx = x.shape
    shape = (sfft.next_fast_len(ny + max_lag, real=True), sfft.next_fast_len(nx + max_lag, real=True))
    fx = sfft.rfft2(x, s=shape)
    fx *= np.conj(fx)
    sxx = sfft.irfft2(fx, s=shape)
    del fx
    counts = _pair_counts(mask, L)
    if counts is None:
        fw = sfft.rfft2(w, s=shape)
        fw *= np.conj(fw)
        sww = np.rint(sfft.irfft2(fw, s=shape))
        counts = np.concatenate([sww[:L, -(L - 1) :] if L > 1 else sww[:L, :0], sww[:L, :L]], axis=1)
    # autocorrelation index [dy, dx]: dx >= 0 at columns 0..L-1, dx < 0 at the end of the axis
    pos_s = sxx[:L, :L]
    neg_s = np.concatenate([sxx[:L, :1], sxx[:L, -1 : -L : -1]], axis=1) if L > 1 else sxx[:L, :1]
    pos_n = counts[:, L - 1 :]
    neg_n = counts[:, L - 1 :: -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        c = 0.5 * (pos_s / pos_n + neg_s / neg_n)
    npairs = pos_n + neg_n
    npairs[:, 0] = pos_n[:, 0]
    return c.T.copy(), npairs.T.copy()  # [dy, dx] -> [i = dx (serial), j = dy (parallel)]


def ks_normality(values: np.ndarray, n: int, rng: np.random.Generator) -> float:
    """p-value of a Kolmogorov-Smirnov test of normality of a random subsample of ``values``
    (standardised by its own mean and std; jittered by U(-0.5, 0.5) to smooth ADU
    quantisation)."""
    v = values[np.isfinite(values)]
    if v.size < 50:
        return float("nan")
    take = v if v.size <= n else v[rng.integers(0, v.size, n)]
    take = take + rng.uniform(-0.5, 0.5, take.size)
    s = take.std()
    if s <= 0:
        return 0.0
    return float(stats.kstest((take - take.mean()) / s, "norm").pvalue)


def measure_pair(
    q1: np.ndarray,
    q2: np.ndarray,
    params: PTCParams | None = None,
    *,
    ccd: str = "CCD1",
    quadrant: str = "E",
    obsids: tuple[int, int] = (0, 0),
    exptime: float = 0.0,
    wave: float | None = None,
    rng: np.random.Generator | None = None,
) -> PairMeasurement:
    """Mean, variance and covariances of one pair of canonical quadrants (raw ADU)."""
    p = params or PTCParams()
    rng = rng or np.random.default_rng(p.seed)
    e = p.edge
    raw_sat = (
        np.asarray(q1[e : IMAGE_ROWS - e, PRESCAN_COLS + e : PRESCAN_COLS + IMAGE_COLS - e]) >= ADC_MAX
    ) | (np.asarray(q2[e : IMAGE_ROWS - e, PRESCAN_COLS + e : PRESCAN_COLS + IMAGE_COLS - e]) >= ADC_MAX)
    i1 = _image(q1, p.offset_method, e)
    i2 = _image(q2, p.offset_method, e)
    ron = mad_std(region(q1, "pre", STANDARD_TRIMS["pre"])[::8])
    sat_frac = max(float(raw_sat.mean()), pileup_fraction(i1, ron), pileup_fraction(i2, ron))
    s1 = clipped_stats(i1, p.mean_nsigma, maxiters=5, subsample=7)
    s2 = clipped_stats(i2, p.mean_nsigma, maxiters=5, subsample=7)
    mu1, mu2 = s1.mean, s2.mean
    mu = 0.5 * (mu1 + mu2)
    mismatch = abs(mu1 - mu2) / mu if mu > 0 else float("inf")
    nl = p.max_lag + 1
    base = dict(ccd=ccd, quadrant=quadrant, obsids=tuple(obsids), exptime=float(exptime), wave=wave, mu1=mu1, mu2=mu2, mu=mu,
                mismatch=mismatch, sat_frac=sat_frac)
    if not mu > 0:
        return PairMeasurement(**base, var=float("nan"), var_err=float("nan"), cov=np.full((nl, nl), np.nan), npix=0,
                               ks_p=float("nan"), rejected=True, reason="no signal")
    d = (mu2 * i1 - mu1 * i2) / mu
    del i1, i2
    keep = clip_mask(d, p.diff_nsigma, maxiters=10, subsample=7)
    # clipping correction for the half-width actually applied (diff_nsigma x the subsample std)
    sd = float(np.std(d[keep]))
    med = float(np.median(d[::7]))
    half = float(np.max(np.abs(d[keep] - med))) if keep.any() else 0.0
    corr = clip_variance_correction(half, sd) if half > 0 else 1.0
    cov, npairs = masked_covariances(d, keep, p.max_lag)
    cov = cov * corr / 2.0
    var = float(cov[0, 0])
    npix = int(keep.sum())
    ks_p = ks_normality(d[keep], p.ks_nsample, rng)
    reason = ""
    if mismatch > p.max_mismatch:
        reason = f"fluence mismatch {100 * mismatch:.1f} %"
    elif np.isfinite(ks_p) and ks_p < p.ks_pmin:
        reason = f"non-Gaussian difference (KS p = {ks_p:.2g})"
    return PairMeasurement(
        **base,
        var=var,
        var_err=var * np.sqrt(2.0 / max(npix, 1)),
        cov=cov,
        npix=npix,
        ks_p=ks_p,
        rejected=bool(reason),
        reason=reason,
    )


@dataclass
class FrameQuadStats:
    """Per-frame, per-quadrant quantities that need only one frame: fluence (ADU), saturated
    fraction, overscan RON (ADU) and hard-edge response."""

    obsid: int
    ccd: str
    quadrant: str
    exptime: float
    fluence: float
    sat_frac: float
    ron_ove_adu: float
    her: float


def frame_quad_stats(quad: np.ndarray, *, obsid: int = 0, ccd: str = "CCD1", quadrant: str = "E", exptime: float = 0.0) -> FrameQuadStats:
    """Fluence, saturation, overscan RON and HER of one canonical quadrant of a flat.

    HER = (O_1 - O_far) / (I_last - O_far): O_1 = mean of the first serial-overscan column,
    O_far = mean of the overscan columns beyond the 5th, I_last = mean of the last image column
    (all over the image rows, offset-subtracted with the prescan)."""
    off = float(np.median(region(quad, "pre", STANDARD_TRIMS["pre"])))
    img = np.asarray(quad[:IMAGE_ROWS, PRESCAN_COLS : PRESCAN_COLS + IMAGE_COLS], dtype=np.float32)
    sat = float(np.mean(img >= ADC_MAX))
    fluence = float(np.median(img[::4, ::4])) - off
    ove0 = PRESCAN_COLS + IMAGE_COLS
    o1 = float(np.mean(quad[:IMAGE_ROWS, ove0], dtype=np.float64)) - off
    ofar = float(np.mean(quad[:IMAGE_ROWS, ove0 + 5 :], dtype=np.float64)) - off
    ilast = float(np.mean(quad[:IMAGE_ROWS, ove0 - 1], dtype=np.float64)) - off
    her = (o1 - ofar) / (ilast - ofar) if ilast - ofar > 0 else float("nan")
    ron = clipped_stats(region(quad, "ove", STANDARD_TRIMS["ove"]), 4.0, maxiters=5).std_corrected
    return FrameQuadStats(obsid, ccd, quadrant, float(exptime), fluence, sat, float(ron), float(her))


# ----------------------------------------------------------------------------- models


def exponential_model(mu: np.ndarray, a00: float, gain: float, n00: float) -> np.ndarray:
    """C00 (ADU^2) of Astier 2019 eq. 16: ``(exp(2 a00 g mu) - 1) / (2 a00 g^2) + n00 / g^2``
    (mu ADU, a00 1/e-, g e-/ADU, n00 e-^2); ``mu / g + n00 / g^2`` when a00 = 0."""
    mu = np.asarray(mu, dtype=np.float64)
    x = 2.0 * a00 * gain * mu
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.where(np.abs(x) > 1e-12, np.expm1(x) / np.where(x == 0, 1, x), 1.0 + 0.5 * x)
    return mu / gain * f + n00 / gain**2


@dataclass
class ExpFit:
    """Exponential PTC fit of one quadrant."""

    gain: float
    gain_err: float
    a00: float
    a00_err: float
    n00: float
    n00_err: float
    chi2_red: float
    kept: np.ndarray
    turnoff_adu: float
    success: bool


def _groups(mu: np.ndarray, exptime: np.ndarray) -> list[np.ndarray]:
    """Indices grouped by exposure time (rel 1e-3), sorted by median mean."""
    gs = [np.asarray(g) for g in group_by(list(exptime), rel_tol=1e-3)]
    return sorted(gs, key=lambda g: float(np.median(mu[g])))


def find_turnoff(mu: np.ndarray, var: np.ndarray, exptime: np.ndarray, rel_drop: float = 0.005) -> np.ndarray:
    """Boolean mask of points at or below the PTC turnoff: points are grouped by exposure time
    (median mean and variance per group, in order of fluence) and everything from the first group
    whose variance is lower than its predecessor's by more than ``rel_drop`` is cut."""
    good = np.isfinite(mu) & np.isfinite(var)
    out = good.copy()
    idx = np.flatnonzero(good)
    if idx.size < 3:
        return out
    groups = _groups(mu[idx], exptime[idx])
    gvar = [float(np.median(var[idx][g])) for g in groups]
    for k in range(1, len(groups)):
        if gvar[k] < gvar[k - 1] * (1.0 - rel_drop):
            for g in groups[k:]:
                out[idx[g]] = False
            break
    return out


def fit_exponential(
    mu: np.ndarray, var: np.ndarray, var_err: np.ndarray, exptime: np.ndarray, params: PTCParams | None = None
) -> ExpFit:
    """Exponential-model fit (eq. 16) with turnoff cut and 5-sigma iterative rejection."""
    p = params or PTCParams()
    mu, var, var_err, exptime = (np.asarray(a, dtype=np.float64) for a in (mu, var, var_err, exptime))
    use = find_turnoff(mu, var, exptime, p.turnoff_rel_drop)
    if use.sum() < 4:
        nan = float("nan")
        return ExpFit(nan, nan, nan, nan, nan, nan, nan, use, nan, False)
    # initial values from a quadratic fit
    c2, c1, c0 = np.polyfit(mu[use], var[use], 2)
    g0 = 1.0 / c1 if c1 > 0 else 3.0
    # to first order C00 = mu / g + a00 mu^2 + n00 / g^2
    p0 = [float(np.clip(c2, -1e-4, 1e-4)), g0, max(c0, 0.0) * g0 * g0]
    sig = np.where(use, var_err, np.inf)
    sig = np.where(np.isfinite(sig) & (sig > 0), sig, np.inf)
    yin = np.where(use, var, np.nan)
    fr = iterative_fit(exponential_model, mu, yin, p0, sigma=np.where(np.isfinite(sig), sig, 1.0), nsigma=p.outlier_nsigma,
                       bounds=([-1e-3, 1e-3, -1e6], [1e-3, 1e3, 1e7]))
    kept = fr.kept & use
    a00, g, n00 = fr.params
    ea, eg, en = fr.errors
    turnoff = float(np.max(mu[kept])) if kept.any() else float("nan")
    return ExpFit(float(g), float(eg), float(a00), float(ea), float(n00), float(en), fr.chi2_red, kept, turnoff, fr.success)


def fit_quadratic(mu: np.ndarray, var: np.ndarray, var_err: np.ndarray, kept: np.ndarray) -> dict[str, float]:
    """Plain quadratic ``var = c0 + c1 mu + c2 mu^2`` on the kept points: gain = 1 / c1."""
    mu, var, var_err = (np.asarray(a, dtype=np.float64) for a in (mu, var, var_err))
    if kept.sum() < 4:
        return {"gain_quad": float("nan"), "gain_quad_err": float("nan"), "c2_quad": float("nan"), "c0_quad": float("nan")}
    coef, cov = np.polyfit(mu[kept], var[kept], 2, w=1.0 / var_err[kept], cov=True)
    c2, c1, c0 = coef
    g = 1.0 / c1
    return {"gain_quad": float(g), "gain_quad_err": float(np.sqrt(cov[1, 1]) / c1**2), "c2_quad": float(c2), "c0_quad": float(c0)}


# ----------------------------------------------------------------------------- full covariance model


def _symmetric_plane(m: np.ndarray, size: int) -> np.ndarray:
    """The quadrant array ``m[i, j]`` (i, j >= 0) mirrored onto a periodic ``size x size`` plane
    (origin at [0, 0]) so that m(-i, j) = m(i, -j) = m(i, j)."""
    r = m.shape[0]
    plane = np.zeros((size, size))
    ii = np.arange(r)
    for si in (ii, (-ii) % size):
        for sj in (ii, (-ii) % size):
            plane[np.ix_(si, sj)] = m
    return plane


def full_covariance_model(mu: np.ndarray, a: np.ndarray, c: np.ndarray, noise: np.ndarray, gain: float) -> np.ndarray:
    """Astier et al. 2019 eq. 20: ``C_ij(mu)`` (ADU^2), shape (len(mu), r, r)::

        C_ij = mu/g [delta_ij + a_ij mu g + 2/3 (a*a + c)_ij (mu g)^2 + (1/3 a*a*a + 5/6 a*c)_ij (mu g)^3]
               + n_ij / g^2

    with ``*`` the 2-D discrete convolution over the symmetric plane, ``c = a b`` (element-wise),
    a, b in 1/e-, n in e-^2, mu in ADU."""
    r = a.shape[0]
    size = int(2 ** np.ceil(np.log2(6 * r)))
    fa = np.fft.rfft2(_symmetric_plane(a, size))
    fc = np.fft.rfft2(_symmetric_plane(c, size))
    a2 = np.fft.irfft2(fa * fa, s=(size, size))[:r, :r]
    a3 = np.fft.irfft2(fa * fa * fa, s=(size, size))[:r, :r]
    ac = np.fft.irfft2(fa * fc, s=(size, size))[:r, :r]
    x = np.asarray(mu, dtype=np.float64)[:, None, None] * gain
    model = x / gain**2 * (a[None] * x + 2.0 / 3.0 * (a2 + c)[None] * x**2 + (a3 / 3.0 + 5.0 / 6.0 * ac)[None] * x**3)
    model = model + noise[None] / gain**2
    model[:, 0, 0] += np.asarray(mu, dtype=np.float64) / gain
    return model


@dataclass
class FullCovFit:
    """Full covariance fit of one quadrant: a, b (1/e-), noise (e-^2) matrices [i serial, j
    parallel], gain (e-/ADU) and errors, reduced chi^2."""

    a: np.ndarray
    b: np.ndarray
    c: np.ndarray
    noise: np.ndarray
    gain: float
    gain_err: float
    a_err: np.ndarray
    chi2_red: float
    success: bool
    message: str = ""


def fit_full_covariance(
    mu: np.ndarray, cov: np.ndarray, npix: np.ndarray, gain0: float, a00_0: float = -1e-6, fit_b: bool = True, nsigma: float = 5.0
) -> FullCovFit:
    """Fit eq. 20 to covariances ``cov`` (n, r, r) at means ``mu`` (n,) from ``npix`` pixels.

    Weights: sigma(C_ij) = C00 sqrt((1 + delta_ij) / npix). Initialisation: per-lag parabolas of
    the data minus the current model (Astier's scheme), then ``least_squares`` on all a_ij,
    c_ij, n_ij and the gain; points whose C00 residual exceeds ``nsigma`` (robust) are dropped
    once and the fit repeated."""
    mu = np.asarray(mu, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    n, r, _ = cov.shape
    sig = cov[:, :1, :1] * np.sqrt(1.0 / np.asarray(npix, dtype=np.float64))[:, None, None] * np.ones((1, r, r))
    sig[:, 0, 0] *= np.sqrt(2.0)
    a = np.zeros((r, r))
    a[0, 0] = a00_0
    c = np.zeros((r, r))
    noise = np.zeros((r, r))
    gain = float(gain0)
    # --- per-lag parabola initialisation
    for _ in range(5):
        model = full_covariance_model(mu, a, c, noise, gain)
        for i in range(r):
            for j in range(r):
                pf = np.polyfit(mu, cov[:, i, j] - model[:, i, j], 2, w=1.0 / sig[:, i, j])
                a[i, j] += pf[0]
                noise[i, j] += pf[2] * gain * gain
                if i == 0 and j == 0:
                    gain = 1.0 / (1.0 / gain + pf[1])
    keep = np.ones(n, bool)
    nA = r * r

    def unpack(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        aa = x[:nA].reshape(r, r)
        cc = x[nA : 2 * nA].reshape(r, r) if fit_b else np.zeros((r, r))
        off = 2 * nA if fit_b else nA
        nn = x[off : off + nA].reshape(r, r)
        return aa, cc, nn, float(x[-1])

    # scale parameters to O(1) for the optimiser
    sa, sc, sn = 1e-6, 1e-12, 1.0

    def pack(aa, cc, nn, g):
        parts = [aa.ravel() / sa] + ([cc.ravel() / sc] if fit_b else []) + [nn.ravel() / sn, [g]]
        return np.concatenate(parts)

    def unscale(x):
        y = x.copy()
        y[:nA] *= sa
        if fit_b:
            y[nA : 2 * nA] *= sc
            y[2 * nA : 3 * nA] *= sn
        else:
            y[nA : 2 * nA] *= sn
        return y

    def resid(x, sel):
        aa, cc, nn, g = unpack(unscale(x))
        m = full_covariance_model(mu[sel], aa, cc, nn, g)
        return ((cov[sel] - m) / sig[sel]).ravel()

    x0 = pack(a, c, noise, gain)
    res = None
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = optimize.least_squares(resid, x0, args=(keep,), method="trf", x_scale="jac", max_nfev=200)
        rr = resid(res.x, np.ones(n, bool)).reshape(n, r, r)[:, 0, 0]
        scale = max(mad_std(rr[keep]), 1.0)
        new = np.abs(rr) <= nsigma * scale
        if new.sum() == keep.sum() or new.sum() < 4:
            break
        keep = new
        x0 = res.x
    aa, cc, nn, g = unpack(unscale(res.x))
    dof = max(keep.sum() * r * r - res.x.size, 1)
    chi2 = float(np.sum(res.fun**2) / dof)
    try:
        jtj = res.jac.T @ res.jac
        pcov = np.linalg.pinv(jtj) * max(chi2, 1.0)
        perr = unscale(np.sqrt(np.clip(np.diag(pcov), 0, None)))
    except np.linalg.LinAlgError:  # pragma: no cover
        perr = np.full(res.x.size, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.where(aa != 0, cc / aa, 0.0)
    return FullCovFit(
        a=aa, b=b, c=cc, noise=nn, gain=g, gain_err=float(perr[-1]), a_err=perr[:nA].reshape(r, r), chi2_red=chi2,
        success=bool(res.success), message=str(res.message),
    )


# ----------------------------------------------------------------------------- results


class PTCQuadResult(BaseModel):
    """Per CCD quadrant result of PTC01/02 (gain e-/ADU, means ADU, a / b in 1/e-)."""

    gain: float = Field(description="gain from the exponential model (e-/ADU)")
    gain_err: float
    a00: float = Field(description="brighter-fatter a00 from the exponential model (1/e-)")
    a00_err: float
    noise_e: float = Field(description="PTC read-noise term sqrt(n00) (e-); NaN if n00 < 0")
    n00_e2: float
    noise_e_err: float
    chi2_red: float
    turnoff_adu: float = Field(description="highest mean retained in the exponential fit (ADU)")
    bloom_adu: float = Field(description="blooming level: first fluence below the model (ADU), or the highest fluence measured")
    bloom_is_lower_limit: bool
    her: float = Field(description="hard-edge response at the image -> serial overscan transition")
    gain_quad: float = Field(description="gain of the plain quadratic fit (original method)")
    gain_quad_err: float
    gain_full: float | None = Field(None, description="gain of the full covariance model (Astier eq. 20)")
    gain_full_err: float | None = None
    a00_full: float | None = None
    a10_full: float | None = Field(None, description="a (serial lag 1) of the full model (1/e-)")
    a01_full: float | None = Field(None, description="a (parallel lag 1) of the full model (1/e-)")
    full_chi2_red: float | None = None
    ron_ove_adu: float = Field(description="overscan RON (ADU), median over frames")
    ron_ove_e: float
    noise_ron_ratio: float = Field(description="PTC noise / overscan RON (e-)")
    noise_check_ok: bool
    n_pairs: int
    n_rejected: int = Field(description="pairs rejected (fluence mismatch, non-Gaussian difference)")
    n_saturated: int = Field(0, description="accepted pairs not fitted because of saturated pixels")
    n_fit: int
    fit_ok: bool


@dataclass
class PTCQuadAnalysis:
    """Everything measured for one quadrant (results + arrays for figures / BF01)."""

    result: PTCQuadResult
    pairs: list[PairMeasurement]
    exp: ExpFit
    full: FullCovFit | None
    used: np.ndarray  # pairs entering the fits (not rejected, not saturated), index into pairs


@dataclass
class PTCAnalysis:
    """Output of :func:`analyse_ptc`: per CCD / quadrant analyses, per-frame stats, warnings."""

    quads: dict[str, dict[str, PTCQuadAnalysis]]
    frames: list[FrameQuadStats]
    warnings: list[str] = field(default_factory=list)
    params: PTCParams = field(default_factory=PTCParams)

    def results(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``results[CCD][Q]`` as JSON-able dicts."""
        return {ccd: {q: a.result.model_dump() for q, a in qs.items()} for ccd, qs in self.quads.items()}


def pair_frames(frames: Sequence[FrameInput]) -> list[tuple[int, int]]:
    """Index pairs of frames at equal exposure time and wavelength (same CCD), in ObsID order:
    (1st, 2nd), (3rd, 4th), ... of each group; an odd frame out is left unpaired."""
    keys: dict[tuple[str, Any], list[int]] = {}
    for i, f in enumerate(frames):
        keys.setdefault((f.ccd, f.wave), []).append(i)
    out: list[tuple[int, int]] = []
    for (_, _), idx in keys.items():
        for g in group_by([frames[i].exptime for i in idx], rel_tol=1e-3):
            members = sorted((idx[k] for k in g), key=lambda i: (frames[i].obsid, i))
            out += [(members[k], members[k + 1]) for k in range(0, len(members) - 1, 2)]
    return sorted(out, key=lambda ab: (frames[ab[0]].ccd, frames[ab[0]].exptime, frames[ab[0]].obsid))


def measure_all_pairs(
    frames: Sequence[FrameInput], params: PTCParams, quadrants: Sequence[str] = QUADRANTS
) -> tuple[dict[str, dict[str, list[PairMeasurement]]], list[FrameQuadStats]]:
    """Measure every pair (loads two frames at a time) and per-frame stats."""
    rng = np.random.default_rng(params.seed)
    pairs: dict[str, dict[str, list[PairMeasurement]]] = {}
    fstats: list[FrameQuadStats] = []
    for ia, ib in pair_frames(frames):
        fa, fb = frames[ia], frames[ib]
        qa, qb = fa.load(), fb.load()
        for q in quadrants:
            if q not in qa or q not in qb:
                continue
            m = measure_pair(qa[q], qb[q], params, ccd=fa.ccd, quadrant=q, obsids=(fa.obsid, fb.obsid),
                             exptime=fa.exptime, wave=fa.wave, rng=rng)
            pairs.setdefault(fa.ccd, {}).setdefault(q, []).append(m)
            for f, qq in ((fa, qa), (fb, qb)):
                fstats.append(frame_quad_stats(qq[q], obsid=f.obsid, ccd=f.ccd, quadrant=q, exptime=f.exptime))
        del qa, qb
    return pairs, fstats


def find_bloom(mu, var, model, var_err, exptime, params: PTCParams) -> tuple[float, bool]:
    """Blooming level: first exposure-time group (by fluence) that starts a run of
    ``bloom_consecutive`` groups whose median variance lies below the model by more than
    ``bloom_rel_drop`` (relative) and ``bloom_nsigma`` errors (a shorter run at the end of the
    curve counts when its variance is below half the model). Returns (mean ADU, is_lower_limit)."""
    ok = np.isfinite(mu) & np.isfinite(var) & np.isfinite(model)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return float("nan"), True
    groups = _groups(mu[idx], exptime[idx])
    below = []
    gmu = []
    for g in groups:
        ii = idx[g]
        v, m, e = np.median(var[ii]), np.median(model[ii]), np.median(var_err[ii]) / np.sqrt(len(ii))
        below.append(bool((m - v) > params.bloom_rel_drop * m and (m - v) > params.bloom_nsigma * e))
        gmu.append(float(np.median(mu[ii])))
    k = params.bloom_consecutive
    for s in range(len(groups) - k + 1):
        if all(below[s : s + k]):
            return gmu[s], False
    # a trailing run shorter than k counts when the variance has collapsed (below half the model)
    s = len(groups)
    while s > 0 and below[s - 1]:
        s -= 1
    if s < len(groups) and s > 0:
        ii = idx[groups[s]]
        if np.median(var[ii]) < 0.5 * np.median(model[ii]):
            return gmu[s], False
    return float(np.max(mu[idx])), True


def fit_quadrant(pairs: list[PairMeasurement], frames: list[FrameQuadStats], params: PTCParams) -> PTCQuadAnalysis:
    """All fits of one quadrant from its pair measurements and frame stats."""
    p = params
    used = np.array([not m.rejected and m.sat_frac <= p.max_sat_frac for m in pairs], dtype=bool)
    mu = np.array([m.mu for m in pairs])
    var = np.array([m.var for m in pairs])
    err = np.array([m.var_err for m in pairs])
    texp = np.array([m.exptime for m in pairs])
    ex = fit_exponential(mu[used], var[used], err[used], texp[used], p)
    kept_all = np.zeros(len(pairs), bool)
    kept_all[np.flatnonzero(used)] = ex.kept
    quad = fit_quadratic(mu, var, err, kept_all)
    full = None
    if p.full_fit and kept_all.sum() >= 6 and np.isfinite(ex.gain):
        L = min(p.fit_lag, p.max_lag) + 1
        covs = np.stack([m.cov[:L, :L] for m in pairs])[kept_all]
        npix = np.array([m.npix for m in pairs])[kept_all]
        try:
            full = fit_full_covariance(mu[kept_all], covs, npix, ex.gain, ex.a00 if np.isfinite(ex.a00) else -1e-6, p.fit_b,
                                       p.outlier_nsigma)
        except (ValueError, np.linalg.LinAlgError) as exc:  # pragma: no cover - reported
            full = FullCovFit(np.full((L, L), np.nan), np.full((L, L), np.nan), np.full((L, L), np.nan),
                              np.full((L, L), np.nan), float("nan"), float("nan"), np.full((L, L), np.nan), float("nan"), False, str(exc))
    if np.isfinite(ex.gain):
        model = exponential_model(mu, ex.a00, ex.gain, ex.n00)
        # saturated pairs fail the KS test but do show where the variance falls off the model
        bloom_use = np.array([not (m.rejected and m.reason.startswith("fluence mismatch")) for m in pairs])
        bloom, lower = find_bloom(np.where(bloom_use, mu, np.nan), var, model, err, texp, p)
    else:
        bloom, lower = (float(np.nanmax(mu)) if len(mu) else float("nan")), True
    # frame-level: HER from unsaturated frames in the fluence range, overscan RON
    lo, hi = p.her_range
    hers = [f.her for f in frames if lo * FULL_SCALE <= f.fluence <= hi * FULL_SCALE and f.sat_frac < 1e-4 and np.isfinite(f.her)]
    her = float(np.median(hers)) if hers else float("nan")
    rons = [f.ron_ove_adu for f in frames if np.isfinite(f.ron_ove_adu)]
    ron = float(np.median(rons)) if rons else float("nan")
    g = ex.gain
    noise_e = float(np.sqrt(ex.n00)) if ex.n00 > 0 else float("nan")
    noise_err = float(0.5 * ex.n00_err / noise_e) if noise_e > 0 else float("nan")
    ron_e = ron * g if np.isfinite(g) else float("nan")
    ratio = noise_e / ron_e if ron_e and np.isfinite(ron_e) else float("nan")
    res = PTCQuadResult(
        gain=g, gain_err=ex.gain_err, a00=ex.a00, a00_err=ex.a00_err, noise_e=noise_e, n00_e2=ex.n00, noise_e_err=noise_err,
        chi2_red=ex.chi2_red, turnoff_adu=ex.turnoff_adu, bloom_adu=bloom, bloom_is_lower_limit=lower, her=her,
        gain_quad=quad["gain_quad"], gain_quad_err=quad["gain_quad_err"],
        gain_full=full.gain if full else None, gain_full_err=full.gain_err if full else None,
        a00_full=float(full.a[0, 0]) if full else None,
        a10_full=float(full.a[1, 0]) if full and full.a.shape[0] > 1 else None,
        a01_full=float(full.a[0, 1]) if full and full.a.shape[0] > 1 else None,
        full_chi2_red=full.chi2_red if full else None,
        ron_ove_adu=ron, ron_ove_e=ron_e, noise_ron_ratio=ratio,
        noise_check_ok=_noise_agrees(noise_e, noise_err, ron_e, p.ron_tolerance),
        n_pairs=len(pairs), n_rejected=int(sum(m.rejected for m in pairs)),
        n_saturated=int(sum(m.sat_frac > p.max_sat_frac and not m.rejected for m in pairs)), n_fit=int(kept_all.sum()),
        fit_ok=bool(ex.success and np.isfinite(g)),
    )
    return PTCQuadAnalysis(result=res, pairs=pairs, exp=ex, full=full, used=used)


def _noise_agrees(noise_e: float, noise_err: float, ron_e: float, tolerance: float) -> bool:
    """PTC noise vs overscan RON (e-): agreement within ``tolerance`` (relative), or a difference
    that the PTC intercept cannot resolve (under 2 sigma of its error: the intercept of a PTC fit
    is poorly constrained, so only a significant disagreement is worth a warning)."""
    if not (np.isfinite(noise_e) and np.isfinite(ron_e) and ron_e > 0):
        return False
    diff = abs(noise_e - ron_e)
    return bool(diff <= tolerance * ron_e or (np.isfinite(noise_err) and diff <= 2.0 * noise_err))


def analyse_ptc(frames: Iterable[Any], definition: Any = None, params: PTCParams | dict | None = None,
                quadrants: Sequence[str] = QUADRANTS) -> PTCAnalysis:
    """PTC01 / PTC02 analysis of a list of flats (:class:`FrameInput` or equivalent dicts; all
    CCDs mixed). ``definition`` is accepted for the common signature and not needed."""
    p = params_of(PTCParams, params)
    fr = as_frames(frames)
    pairs, fstats = measure_all_pairs(fr, p, quadrants)
    out: dict[str, dict[str, PTCQuadAnalysis]] = {}
    warn: list[str] = []
    for ccd in sorted(pairs):
        for q in quadrants:
            if q not in pairs[ccd]:
                continue
            qa = fit_quadrant(pairs[ccd][q], [f for f in fstats if f.ccd == ccd and f.quadrant == q], p)
            out.setdefault(ccd, {})[q] = qa
            r = qa.result
            if not r.fit_ok:
                warn.append(f"{ccd} {q}: PTC fit failed")
            elif not r.noise_check_ok:
                warn.append(f"{ccd} {q}: PTC noise {r.noise_e:.2f} +/- {r.noise_e_err:.2f} e- differs from the overscan RON "
                            f"{r.ron_ove_e:.2f} e- by more than {100 * p.ron_tolerance:.0f} % and 2 sigma")
            if r.n_rejected:
                reasons = sorted({m.reason for m in qa.pairs if m.rejected})
                warn.append(f"{ccd} {q}: {r.n_rejected} pair(s) rejected ({'; '.join(reasons)})")
    return PTCAnalysis(quads=out, frames=fstats, warnings=warn, params=p)


# ----------------------------------------------------------------------------- analyzer plug-in

PARAMS = PTCParams


def _draw_ptc(fig: Any, quads: dict[str, PTCQuadAnalysis], ccd: str) -> None:
    """Variance vs mean per quadrant: accepted / rejected / beyond-turnoff points, the
    exponential and quadratic models, residuals."""
    axes = fig.subplots(2, 4, sharex="col", gridspec_kw={"height_ratios": [3, 1]})
    for k, q in enumerate(QUADRANTS):
        ax, axr = axes[0, k], axes[1, k]
        qa = quads.get(q)
        ax.set_title(f"{ccd} {q}")
        if qa is None:
            continue
        mu = np.array([m.mu for m in qa.pairs])
        var = np.array([m.var for m in qa.pairs])
        kept = np.zeros(len(qa.pairs), bool)
        kept[np.flatnonzero(qa.used)] = qa.exp.kept
        ax.plot(mu[kept], var[kept], "o", ms=3, label="fitted")
        rej = np.array([m.rejected for m in qa.pairs], dtype=bool)
        ax.plot(mu[~kept & ~rej], var[~kept & ~rej], "s", ms=3, mfc="none", label="not fitted (outlier, turnoff, saturated)")
        ax.plot(mu[rej], var[rej], "x", ms=4, label="rejected (mismatch, KS)")
        r = qa.result
        if np.isfinite(r.gain):
            grid = np.linspace(0, np.nanmax(mu) if mu.size else 1, 200)
            ax.plot(grid, exponential_model(grid, r.a00, r.gain, r.n00_e2), "-", lw=1,
                    label=f"exp: g={r.gain:.4f} a00={r.a00:.2e}")
            ax.plot(grid, grid / r.gain_quad if np.isfinite(r.gain_quad) else grid * np.nan, ":", lw=1, label=f"linear, quad g={r.gain_quad:.4f}")
            model = exponential_model(mu, r.a00, r.gain, r.n00_e2)
            axr.plot(mu[kept], 100 * (var[kept] / model[kept] - 1), "o", ms=3)
            axr.axhline(0, color="k", lw=0.5)
        if not r.bloom_is_lower_limit:
            ax.axvline(r.bloom_adu, color="r", lw=0.7, ls="--", label=f"bloom {r.bloom_adu:.0f}")
        ax.legend(fontsize=6)
        axr.set_xlabel("mean (ADU)")
    axes[0, 0].set_ylabel("variance (ADU$^2$)")
    axes[1, 0].set_ylabel("resid (%)")


def run_test(data: Any, sink: Any) -> Any:
    """Analyzer plug-in: PTC01 / PTC02 of a whole test (see :mod:`services.analyzer.model`)."""
    from services.analyzer.analysis.common import frame_inputs
    from services.analyzer.model import AnalysisOutput, FigureProduct, TableProduct
    from shared.flags import Flag

    params = params_of(PTCParams, data.params)
    an = analyse_ptc(frame_inputs(data), params=params)
    if not an.quads:
        raise ValueError(f"{data.label}: no pairs of flats at equal exposure time")
    flags = Flag(0)
    rows = []
    for ccd, quads in an.quads.items():
        for q, qa in quads.items():
            rows += [m.row() for m in qa.pairs]
            if not qa.result.fit_ok:
                flags |= Flag.BADFIT
        sink.add(FigureProduct(f"ptc_{ccd}", (lambda fig, quads=quads, ccd=ccd: _draw_ptc(fig, quads, ccd)), ccd=ccd, size=(16, 7),
                               description="photon transfer curve per quadrant"))
    sink.add(TableProduct("ptc_pairs", {k: [r[k] for r in rows] for k in rows[0]}, units={"mu": "ADU", "var": "ADU2"},
                          description="per pair and quadrant: means, variance, nearest covariances, KS p, rejection"))
    cov_rows = [(ccd, q, m) for ccd, qs in an.quads.items() for q, qa in qs.items() for m in qa.pairs]
    sink.add(TableProduct("ptc_covariances", {
        "ccd": [c for c, _, _ in cov_rows], "quadrant": [q for _, q, _ in cov_rows], "mu": [m.mu for *_, m in cov_rows],
        "cov": np.stack([m.cov for *_, m in cov_rows]), "rejected": [m.rejected for *_, m in cov_rows]},
        units={"mu": "ADU", "cov": "ADU2"}, description="covariances C[i serial, j parallel] of D/2 per pair"))
    fr = an.frames
    sink.add(TableProduct("ptc_frames", {k: [getattr(f, k) for f in fr] for k in FrameQuadStats.__dataclass_fields__},
                          description="per frame and quadrant: fluence, saturation, overscan RON, HER"))
    for ccd, quads in an.quads.items():
        fits_ = {q: qa.full for q, qa in quads.items() if qa.full is not None}
        if fits_:
            sink.add(TableProduct(f"ptc_fullcov_{ccd}", {
                "quadrant": list(fits_), "a": np.stack([f.a for f in fits_.values()]), "b": np.stack([f.b for f in fits_.values()]),
                "noise": np.stack([f.noise for f in fits_.values()]), "gain": [f.gain for f in fits_.values()]},
                ccd=ccd, units={"a": "1/electron", "b": "1/electron", "noise": "electron2", "gain": "electron/adu"},
                description="full covariance model (Astier 2019 eq. 20): a, b, noise matrices [i serial, j parallel]"))
    summary = [f"{'CCD':<5}{'Q':<2} {'gain':>7} {'err':>7} {'a00':>10} {'noise_e':>7} {'turnoff':>8} {'bloom':>9} {'g_full':>7} {'g_quad':>7}"]
    for ccd, quads in an.quads.items():
        for q, qa in quads.items():
            r = qa.result
            bloom = f"{'>' if r.bloom_is_lower_limit else ''}{r.bloom_adu:.0f}"
            summary.append(f"{ccd:<5}{q:<2} {r.gain:7.4f} {r.gain_err:7.4f} {r.a00:10.3e} {r.noise_e:7.2f} {r.turnoff_adu:8.0f} "
                           f"{bloom:>9} {r.gain_full or float('nan'):7.4f} {r.gain_quad:7.4f}")
    summary += [f"warning: {w}" for w in an.warnings]
    from dataclasses import asdict

    return AnalysisOutput(results=an.results(), flags=int(flags), frames=[asdict(f) for f in an.frames],
                          parameters=params.model_dump(mode="json"), summary=summary,
                          test_values={"pairs": len(rows), "rejected_pairs": sum(r["rejected"] for r in rows)})
