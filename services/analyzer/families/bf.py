"""BF01: brighter-fatter effect from the PTC01 covariance dataset (engine v2; BF01 measures
nothing again: no extraction, its solve reads ``ptc_covariances.fits`` of the PTC01 solve).

Per quadrant, from the pairs PTC01 fitted (its turnoff and outlier cuts, the ``fitted``
column), lags 0..``max_lag``:

- covariance maps vs fluence: ``C_ij(mu)`` and the normalised ``C_ij / C00`` (i serial, j
  parallel);
- the a-matrix (and b) of the full covariance model (Astier et al. 2019 eq. 20) with the gain
  held at PTC01's gain (one gain for both tests: issue 11), :mod:`services.analyzer.science.covariance`;
- a brighter-fatter kernel K with ``laplacian(K) = a`` (discrete 5-point Laplacian solved by FFT
  on a ``kernel_size`` plane; the zero mode, i.e. a residual sum of a, is dropped): the kernel of
  the Coulton et al. (2018) / Broughton et al. (2023) correction
  ``I_corr = I - 1/2 div(I grad(K * I))``;
- PSF broadening: a pixel-integrated Gaussian spot (``spot_fwhm`` px) is exposed with the
  charge-conserving model ``dQ/dt = f + div(f grad(K * Q))`` (the pixel-area model
  ``dQ_i/dt = f_i (1 + sum_j a_(i-j) Q_j)`` behind the covariances for a flat) up to a peak of
  ``peak_frac`` x 2^16 ADU (half well by default); second-moment FWHM x / y and ellipticity
  ``(s_x^2 - s_y^2) / (s_x^2 + s_y^2)`` are compared with the faint spot; the kernel correction
  is applied to the bright spot as a check (``kernel_residual_pct``).
"""

from __future__ import annotations

import math

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field
from scipy.special import erf

from services.analyzer.family import BF_KERNEL, PTC_COVARIANCES, Calibrations, Family, Need, TestRun
from services.analyzer.model import AnalysisOutput, FigureProduct, ImageProduct, ProductSink, TableProduct
from services.analyzer.science.covariance import fit_full_covariance
from shared.flags import Flag
from shared.geometry import QUADRANTS

TESTS = ("BF01",)
FULL_SCALE = 65536.0
FWHM_PER_SIGMA = 2.3548200450309493


class BFParams(BaseModel):
    """Analysis parameters of BF01."""

    max_lag: int = Field(5, ge=1, le=16, description="largest covariance lag of the a-matrix fit (campaign parameter; "
                         "at most the lags of the PTC01 dataset)")
    outlier_nsigma: float = Field(5.0, description="outlier rejection of the full covariance fit")
    fit_b: bool = Field(True, description="fit the b matrix too (else b = 0)")
    a_min_for_b: float = Field(1e-9, description="b = c / a only where |a| exceeds this (1/e-); NaN elsewhere")
    spot_fwhm: float = Field(1.5, gt=0, description="FWHM (px) of the test spot")
    peak_frac: float = Field(0.5, gt=0, le=1.5, description="peak of the bright spot (fraction of 2^16 ADU)")
    steps: int = Field(200, ge=10, description="time steps of the spot exposure")
    stamp: int = Field(41, ge=11, description="stamp size (px, odd)")
    kernel_size: int = Field(65, ge=15, description="plane on which the kernel is solved (px, odd)")


class BFQuadResult(BaseModel):
    """Per CCD quadrant result of BF01 (a in 1/e-, FWHM in px, growth in % of the faint spot's)."""

    gain: float = Field(description="PTC01's gain of the quadrant (e-/ADU): the a-matrix is fitted at it")
    a00: float = Field(description="a00 of the full covariance model (1/e-, < 0: the pixel shrinks as it fills)")
    a10: float = Field(description="a, serial lag 1 (1/e-)")
    a01: float = Field(description="a, parallel lag 1 (1/e-)")
    a11: float = Field(description="a, lag (1, 1) (1/e-)")
    a_sum: float = Field(description="sum of a over the measured plane (0 for charge conservation)")
    fwhm_x_faint: float = Field(description="serial FWHM of the faint spot (px)")
    fwhm_y_faint: float = Field(description="parallel FWHM of the faint spot (px)")
    fwhm_x_half: float = Field(description="serial FWHM of the bright (peak_frac x 2^16 ADU) spot (px)")
    fwhm_y_half: float = Field(description="parallel FWHM of the bright spot (px)")
    fwhm_x_growth_pct: float = Field(description="serial FWHM growth bright vs faint (%; > 0: broader)")
    fwhm_y_growth_pct: float = Field(description="parallel FWHM growth bright vs faint (%)")
    ellipticity_faint: float = Field(description="(s_x^2 - s_y^2) / (s_x^2 + s_y^2) of the faint spot")
    ellipticity_half: float = Field(description="same for the bright spot")
    ellipticity_growth: float = Field(description="ellipticity_half - ellipticity_faint (< 0: elongated along the parallel direction)")
    peak_e: float = Field(description="peak of the bright spot (e-)")
    kernel_residual_pct: float = Field(description="FWHM growth (%, mean of x and y) left after the kernel correction")
    n_pairs: int = Field(description="pairs of the quadrant in the PTC01 dataset")
    n_fit: int = Field(description="pairs in the a-matrix fit (PTC01's fitted pairs less outliers)")
    fit_ok: bool = Field(description="the full covariance fit converged")


def symmetric_plane(a: np.ndarray, size: int) -> np.ndarray:
    """``a[i, j]`` (i serial, j parallel, i, j >= 0) mirrored onto a centred ``size x size`` plane
    indexed [row = parallel, col = serial] with the origin at [size // 2, size // 2]."""
    r = a.shape[0]
    c = size // 2
    plane = np.zeros((size, size))
    for si in (1, -1):
        for sj in (1, -1):
            ii = c + si * np.arange(r)
            jj = c + sj * np.arange(r)
            plane[np.ix_(jj, ii)] = a.T
    return plane


def bf_kernel(a: np.ndarray, size: int = 65) -> np.ndarray:
    """Kernel K (centred ``size x size`` plane, [parallel, serial], size made odd) with
    ``laplacian(K) = a`` (periodic 5-point Laplacian solved by FFT; the k = 0 mode, i.e. the sum
    of a, is dropped)."""
    size = int(size) | 1
    plane = symmetric_plane(a, size)
    fa = np.fft.fft2(np.fft.ifftshift(plane))
    ky = 2 * np.pi * np.fft.fftfreq(size)[:, None]
    kx = 2 * np.pi * np.fft.fftfreq(size)[None, :]
    lap = 2 * np.cos(kx) + 2 * np.cos(ky) - 4.0
    lap[0, 0] = 1.0
    fk = fa / lap
    fk[0, 0] = 0.0
    return np.fft.fftshift(np.fft.ifft2(fk).real)


def gaussian_stamp(size: int, fwhm: float, flux: float = 1.0) -> np.ndarray:
    """Pixel-integrated circular Gaussian centred on the central pixel of a size x size stamp,
    total ``flux``."""
    s = fwhm / FWHM_PER_SIGMA
    edges = np.arange(size + 1) - size / 2
    prof = 0.5 * np.diff(erf(edges / (np.sqrt(2) * s)))
    return flux * np.outer(prof, prof)


def _convolve_same(img: np.ndarray, plane: np.ndarray) -> np.ndarray:
    """Linear 'same' convolution of img with a centred plane (FFT, zero padding)."""
    from scipy.signal import fftconvolve

    return fftconvolve(img, plane, mode="same")


def div_flux(img: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Discrete ``div(I grad(phi))`` on the pixel lattice: for each pixel, the sum over its 4
    neighbours of the boundary intensity (mean of the two pixels) times the potential difference
    (zero outside the stamp). For a uniform I it is I x the 5-point Laplacian of phi."""
    out = np.zeros_like(img)
    for axis in (0, 1):
        dphi = np.diff(phi, axis=axis)
        ib = 0.5 * (img.take(range(1, img.shape[axis]), axis=axis) + img.take(range(0, img.shape[axis] - 1), axis=axis))
        flow = ib * dphi  # from pixel k to k+1 along the axis
        sl_lo = [slice(None)] * 2
        sl_hi = [slice(None)] * 2
        sl_lo[axis] = slice(0, -1)
        sl_hi[axis] = slice(1, None)
        out[tuple(sl_lo)] += flow
        out[tuple(sl_hi)] -= flow
    return out


def expose_spot(f: np.ndarray, a: np.ndarray, steps: int = 200, kernel_size: int = 65) -> np.ndarray:
    """Charge (e-) collected from a flux map ``f`` (e- per unit exposure, image [parallel,
    serial]) with the charge-conserving brighter-fatter model ``dQ/dt = f + div(f grad(K * Q))``,
    ``laplacian(K) = a`` (for a flat it is the pixel-area model ``f (1 + a * Q)`` of the
    covariances), integrated from t = 0 to 1 (midpoint rule)."""
    kern = bf_kernel(a, kernel_size)
    q = np.zeros_like(f)
    dt = 1.0 / steps
    for _ in range(steps):
        mid = q + 0.5 * dt * (f + div_flux(f, _convolve_same(q, kern)))
        q = q + dt * (f + div_flux(f, _convolve_same(mid, kern)))
    return q


def coulton_correction(img: np.ndarray, kernel: np.ndarray, iterations: int = 10) -> np.ndarray:
    """``I_corr = I - 1/2 div(I_corr grad(K * I_corr))`` iterated (same lattice operator as
    :func:`div_flux`)."""
    corr = img.copy()
    for _ in range(iterations):
        corr = img - 0.5 * div_flux(corr, _convolve_same(corr, kernel))
    return corr


def moments(img: np.ndarray) -> tuple[float, float]:
    """Second moments (px^2) about the centroid along x (serial, columns) and y (rows)."""
    ny, nx = img.shape
    y, x = np.mgrid[0:ny, 0:nx]
    t = img.sum()
    xc, yc = (img * x).sum() / t, (img * y).sum() / t
    return float((img * (x - xc) ** 2).sum() / t), float((img * (y - yc) ** 2).sum() / t)


def spot_broadening(a: np.ndarray, gain: float, params: BFParams) -> dict[str, float]:
    """FWHM and ellipticity of a faint and a bright (``peak_frac`` x 2^16 ADU peak) spot under
    the a-matrix, and what is left after the kernel correction."""
    p = params
    unit = gaussian_stamp(p.stamp, p.spot_fwhm)
    peak_e = p.peak_frac * FULL_SCALE * gain
    f = unit * (peak_e / unit.max())
    faint = unit
    bright = expose_spot(f, a, p.steps, p.kernel_size)
    sx0, sy0 = moments(faint)
    sx1, sy1 = moments(bright)
    kern = bf_kernel(a, p.kernel_size)
    corrected = coulton_correction(bright, kern)
    sx2, sy2 = moments(corrected)

    def fw(s2: float) -> float:
        return FWHM_PER_SIGMA * np.sqrt(s2)

    def ell(sx: float, sy: float) -> float:
        return (sx - sy) / (sx + sy)

    gx, gy = 100 * (fw(sx1) / fw(sx0) - 1), 100 * (fw(sy1) / fw(sy0) - 1)
    rx, ry = 100 * (fw(sx2) / fw(sx0) - 1), 100 * (fw(sy2) / fw(sy0) - 1)
    return {
        "fwhm_x_faint": fw(sx0), "fwhm_y_faint": fw(sy0), "fwhm_x_half": fw(sx1), "fwhm_y_half": fw(sy1),
        "fwhm_x_growth_pct": gx, "fwhm_y_growth_pct": gy,
        "ellipticity_faint": ell(sx0, sy0), "ellipticity_half": ell(sx1, sy1),
        "ellipticity_growth": ell(sx1, sy1) - ell(sx0, sy0), "peak_e": peak_e,
        "kernel_residual_pct": 0.5 * (rx + ry),
    }


# ----------------------------------------------------------------------------- the PTC dataset


@dataclass
class QuadDataset:
    """The PTC01 covariance dataset of one quadrant (pairs PTC01 fitted, by mean)."""

    mu: np.ndarray  # (n,) ADU
    cov: np.ndarray  # (n, L, L) ADU^2
    npix: np.ndarray  # (n,)
    gain: float  # PTC01 gain (e-/ADU)
    n_pairs: int  # all pairs of the quadrant in the dataset


def read_dataset(path: str | Path, gains: dict[str, dict[str, float]] | None = None) -> dict[str, dict[str, QuadDataset]]:
    """Per CCD and quadrant, the pairs of ``ptc_covariances.fits`` that PTC01 fitted (the
    ``fitted`` column; ``used`` or not rejected for older files). ``gains``: PTC01's gains (the
    calibration's values) preferred over the file's ``gain`` column."""
    from astropy.table import Table

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"PTC covariance dataset {path}: no such file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ADU units are not FITS-standard
            t = Table.read(path, hdu="TABLE")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is a bad input
        raise ValueError(f"PTC covariance dataset {path}: unreadable ({exc.__class__.__name__}: {exc})") from exc
    missing = [c for c in ("ccd", "quadrant", "mu", "cov", "npix") if c not in t.colnames]
    if missing:
        raise ValueError(f"PTC covariance dataset {path}: missing columns {', '.join(missing)}")
    ccd = np.array([str(c).strip() for c in t["ccd"]])
    quad = np.array([str(q).strip() for q in t["quadrant"]])
    mu = np.asarray(t["mu"], dtype=np.float64)
    cov = np.asarray(t["cov"], dtype=np.float64)
    npix = np.asarray(t["npix"], dtype=np.float64)
    if "fitted" in t.colnames:
        sel = np.asarray(t["fitted"], dtype=bool)
    elif "used" in t.colnames:
        sel = np.asarray(t["used"], dtype=bool)
    else:
        sel = ~np.asarray(t["rejected"], dtype=bool) if "rejected" in t.colnames else np.ones(len(t), bool)
    gcol = np.asarray(t["gain"], dtype=np.float64) if "gain" in t.colnames else np.full(len(t), np.nan)
    out: dict[str, dict[str, QuadDataset]] = {}
    for c in sorted(set(ccd)):
        for q in QUADRANTS:
            here = (ccd == c) & (quad == q)
            if not here.any():
                continue
            idx = np.flatnonzero(here & sel & np.isfinite(mu))
            idx = idx[np.argsort(mu[idx])]
            g = (gains or {}).get(c, {}).get(q)
            if g is None or not np.isfinite(g):
                finite = gcol[here][np.isfinite(gcol[here])]
                g = float(finite[0]) if finite.size else float("nan")
            out.setdefault(c, {})[q] = QuadDataset(mu[idx], cov[idx], npix[idx], float(g), int(here.sum()))
    return out


# ----------------------------------------------------------------------------- solve


@dataclass
class BFQuadAnalysis:
    result: BFQuadResult
    a: np.ndarray
    b: np.ndarray
    kernel: np.ndarray
    mu: np.ndarray
    cov_maps: np.ndarray  # (n, L, L), ADU^2, fitted pairs


def analyse_quadrant(ds: QuadDataset, p: BFParams) -> BFQuadAnalysis:
    """a-matrix (at PTC01's gain), kernel and spot broadening of one quadrant."""
    L = min(p.max_lag + 1, ds.cov.shape[1]) if ds.cov.ndim == 3 else p.max_lag + 1
    covs = ds.cov[:, :L, :L] if ds.cov.ndim == 3 else np.zeros((0, L, L))
    gain = ds.gain
    a = np.zeros((L, L))
    b = np.zeros((L, L))
    ok, n_fit = False, 0
    if covs.shape[0] >= 6 and np.isfinite(gain) and gain > 0:
        full = fit_full_covariance(ds.mu, covs, ds.npix, gain, -1e-6, p.fit_b, p.outlier_nsigma, p.a_min_for_b, gain_fixed=gain)
        ok = bool(full.success and np.all(np.isfinite(full.a)))
        if ok:
            a, b = full.a, full.b
            n_fit = int(full.kept.sum()) if full.kept is not None else covs.shape[0]
    spot = spot_broadening(a, gain if np.isfinite(gain) else 3.3, p)
    kern = bf_kernel(a, p.kernel_size)
    a_sum = float(symmetric_plane(a, 2 * a.shape[0] + 1).sum())
    res = BFQuadResult(gain=float(gain), a00=float(a[0, 0]), a10=float(a[1, 0]), a01=float(a[0, 1]), a11=float(a[1, 1]),
                       a_sum=a_sum, **spot, n_pairs=ds.n_pairs, n_fit=n_fit, fit_ok=ok)
    return BFQuadAnalysis(result=res, a=a, b=b, kernel=kern, mu=ds.mu, cov_maps=covs)


def _draw_bf(fig: Any, quads: dict[str, BFQuadAnalysis], ccd: str) -> None:
    """Per quadrant: normalised covariances C_ij / mu vs mu (lags 10, 01, 11, 20, 02), the
    a-matrix and the kernel."""
    axes = fig.subplots(3, 4)
    for k, q in enumerate(QUADRANTS):
        qa = quads.get(q)
        axes[0, k].set_title(f"{ccd} {q}")
        if qa is None or qa.mu.size == 0:
            continue
        ax = axes[0, k]
        for i, j in ((1, 0), (0, 1), (1, 1), (2, 0), (0, 2)):
            if i < qa.cov_maps.shape[1] and j < qa.cov_maps.shape[2]:
                ax.plot(qa.mu, qa.cov_maps[:, i, j] / qa.mu, "o", ms=2, label=f"C{i}{j}/mu")
        ax.set_xlabel("mean (ADU)")
        ax.legend(fontsize=6)
        im = axes[1, k].imshow(qa.a.T, origin="lower", cmap="coolwarm")
        axes[1, k].set_xlabel("serial lag")
        axes[1, k].set_ylabel("parallel lag")
        fig.colorbar(im, ax=axes[1, k], fraction=0.046)
        c = qa.kernel.shape[0] // 2
        im = axes[2, k].imshow(qa.kernel[c - 8 : c + 9, c - 8 : c + 9], origin="lower", cmap="viridis")
        fig.colorbar(im, ax=axes[2, k], fraction=0.046)
        axes[2, k].set_title(f"kernel; FWHM +{qa.result.fwhm_x_growth_pct:.2f}/{qa.result.fwhm_y_growth_pct:.2f} %", fontsize=7)


def solve(extractions: list, calib: Calibrations, params: BFParams, run: TestRun, sink: ProductSink) -> AnalysisOutput:
    """BF01 from PTC01's covariance dataset (``calib`` ``ptc_covariances``); no frame is read."""
    p = params if isinstance(params, BFParams) else BFParams.model_validate(params or {})
    cal = calib.get(PTC_COVARIANCES)
    if cal is None or not cal.files.get("ALL"):
        raise ValueError(f"{run.label}: the PTC01 covariance dataset ({PTC_COVARIANCES}) is not available")
    gains = cal.values.get("gain") if isinstance(cal.values.get("gain"), dict) else None
    data = read_dataset(cal.files["ALL"], gains)
    if not data:
        raise ValueError(f"{run.label}: the PTC01 covariance dataset {cal.files['ALL']} holds no quadrant")
    notes = []
    lags = int(cal.values.get("lags", 0) or 0)
    if lags and p.max_lag + 1 > lags:
        notes.append(f"max_lag {p.max_lag} beyond the dataset's lags 0..{lags - 1}: fitted to {lags - 1}")
    out: dict[str, dict[str, BFQuadAnalysis]] = {}
    flags = Flag(run.flags)
    for ccd, quads in data.items():
        for q, ds in quads.items():
            qa = analyse_quadrant(ds, p)
            out.setdefault(ccd, {})[q] = qa
            if not qa.result.fit_ok:
                flags |= Flag.BADFIT
                notes.append(f"{ccd} {q}: full covariance fit failed ({ds.mu.size} fitted pairs, gain {ds.gain:.4f})")
    files: dict[str, str] = {}
    for ccd, quads in out.items():
        ext = {}
        for q, qa in quads.items():
            ext[f"A_{q}"] = qa.a.T.astype(np.float64)  # image rows = parallel lag, columns = serial lag
            ext[f"B_{q}"] = qa.b.T.astype(np.float64)
            ext[f"KERNEL_{q}"] = qa.kernel
        name = f"bf_kernels_{ccd}"
        sink.add(ImageProduct(name=name, ccd=ccd, extensions=ext,
                              header={"BUNIT": "1/electron", "AXIS1": "serial lag", "AXIS2": "parallel lag"},
                              description="a and b (= c / a, NaN where a ~ 0) matrices (Astier 2019 eq. 20) and BF kernel "
                              "(laplacian K = a) per quadrant"))
        files[ccd] = f"{name}.fits"
        sink.add(FigureProduct(f"bf_{ccd}", (lambda fig, quads=quads, ccd=ccd: _draw_bf(fig, quads, ccd)), ccd=ccd, size=(16, 10),
                               description="covariances vs fluence, a-matrix and kernel per quadrant"))
    rows = [(c, q, qa, k) for c, qs in out.items() for q, qa in qs.items() for k in range(qa.mu.size)]
    if rows:
        sink.add(TableProduct("bf_covariances", {
            "ccd": [c for c, *_ in rows], "quadrant": [q for _, q, *_ in rows], "mu": [qa.mu[k] for *_, qa, k in rows],
            "cov": np.stack([qa.cov_maps[k] for *_, qa, k in rows])}, units={"mu": "ADU", "cov": "ADU2"},
            description="covariance maps C[i serial, j parallel] vs fluence (the pairs PTC01 fitted)"))
    summary = [f"{'CCD':<5}{'Q':<2} {'gain':>7} {'a00':>10} {'a10':>10} {'a01':>10} {'dFWHMx%':>8} {'dFWHMy%':>8} {'de':>9}"]
    for ccd, quads in out.items():
        for q, qa in quads.items():
            r = qa.result
            summary.append(f"{ccd:<5}{q:<2} {r.gain:7.4f} {r.a00:10.3e} {r.a10:10.3e} {r.a01:10.3e} {r.fwhm_x_growth_pct:8.3f} "
                           f"{r.fwhm_y_growth_pct:8.3f} {r.ellipticity_growth:9.2e}")
    summary += [f"note: {n}" for n in notes]
    summary.append(f"input: {PTC_COVARIANCES} of {cal.test} ({Path(cal.files['ALL']).name})")
    a_values = {c: {q: {"a00": qa.result.a00, "a10": qa.result.a10, "a01": qa.result.a01} for q, qa in qs.items()} for c, qs in out.items()}
    slopes = {c: {q: predicted_fwhm_slope(qa.result, p) for q, qa in qs.items()} for c, qs in out.items()}
    return AnalysisOutput(results={c: {q: qa.result.model_dump() for q, qa in qs.items()} for c, qs in out.items()},
                          flags=int(flags), parameters=p.model_dump(mode="json"), summary=summary,
                          test_values={"ptc_source": cal.test},
                          provides={BF_KERNEL: {"values": {"a": a_values, "kernel_size": p.kernel_size, "fwhm_slope_px": slopes,
                                                           "spot_fwhm_px": p.spot_fwhm}, "files": files}})


def predicted_fwhm_slope(result: "BFQuadResult", params: BFParams) -> float | None:
    """BF01's prediction of the point-source brighter-fatter slope: FWHM (``sqrt((x^2 + y^2) / 2)``)
    growth from the faint to the bright model spot per 10 000 ADU of peak (px), as PSF01 measures it."""
    faint = math.sqrt((result.fwhm_x_faint**2 + result.fwhm_y_faint**2) / 2.0)
    bright = math.sqrt((result.fwhm_x_half**2 + result.fwhm_y_half**2) / 2.0)
    peak_adu = params.peak_frac * FULL_SCALE
    value = (bright - faint) / (peak_adu / 1e4)
    return float(value) if math.isfinite(value) else None


FAMILY = Family(
    name="bf",
    tests=TESTS,
    params=BFParams,
    solve=solve,
    unit="none",
    needs=(Need(PTC_COVARIANCES, "required", ("PTC01",)),),
    provides=(BF_KERNEL,),
    version="2",
    result=BFQuadResult,
)
