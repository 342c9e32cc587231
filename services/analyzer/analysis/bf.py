"""BF01: brighter-fatter effect from the PTC01 / PTC02 flat pairs (no new frames).

Per quadrant (pairs measured exactly as in :mod:`ptc`, lags 0..``max_lag``):

- covariance maps vs fluence: ``C_ij(mu)`` of every accepted pair, and the normalised
  ``C_ij / C00`` (i serial, j parallel);
- the a-matrix (and b) of the full covariance model (Astier et al. 2019 eq. 20), gain from the
  same fit, on the pairs below the PTC turnoff;
- a brighter-fatter kernel K with ``laplacian(K) = a`` (discrete 5-point Laplacian solved by FFT
  on a ``kernel_size`` plane; the zero mode, i.e. a residual sum of a, is dropped): the kernel of
  the Coulton et al. (2018) / Broughton et al. (2023) correction
  ``I_corr = I - 1/2 div(I grad(K * I))``;
- PSF broadening: a pixel-integrated Gaussian spot (``spot_fwhm`` px) is exposed with the
  charge-conserving model ``dQ/dt = f + div(f grad(K * Q))`` (which is the pixel-area model
  ``dQ_i/dt = f_i (1 + sum_j a_(i-j) Q_j)`` behind the covariances for a flat) up to a peak of
  ``peak_frac`` x 2^16 ADU (half well by default); second-moment FWHM x / y and ellipticity
  ``(s_x^2 - s_y^2) / (s_x^2 + s_y^2)`` are compared with the faint spot; the kernel correction
  is applied to the bright spot as a check (``kernel_residual_pct``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from pydantic import BaseModel, Field
from scipy.special import erf

from services.analyzer.analysis.common import as_frames, params_of
from services.analyzer.analysis.ptc import PairMeasurement, PTCParams, fit_quadrant, measure_all_pairs
from shared.geometry import QUADRANTS

TESTS = ("BF01",)
FULL_SCALE = 65536.0
FWHM_PER_SIGMA = 2.3548200450309493


class BFParams(BaseModel):
    """Analysis parameters of BF01 (the PTC measurement parameters apply too)."""

    max_lag: int = Field(5, ge=1, le=16, description="largest covariance lag (campaign parameter)")
    spot_fwhm: float = Field(1.5, gt=0, description="FWHM (px) of the test spot")
    peak_frac: float = Field(0.5, gt=0, le=1.5, description="peak of the bright spot (fraction of 2^16 ADU)")
    steps: int = Field(200, ge=10, description="time steps of the spot exposure")
    stamp: int = Field(41, ge=11, description="stamp size (px, odd)")
    kernel_size: int = Field(65, ge=15, description="plane on which the kernel is solved (px, odd)")
    ptc: dict[str, Any] = Field(default_factory=dict, description="PTC measurement / fit parameters (ptc.PTCParams)")


class BFQuadResult(BaseModel):
    """Per CCD quadrant result of BF01 (a in 1/e-, FWHM in px)."""

    gain: float
    a00: float
    a10: float = Field(description="a, serial lag 1")
    a01: float = Field(description="a, parallel lag 1")
    a11: float
    a_sum: float = Field(description="sum of a over the measured plane (0 for charge conservation)")
    fwhm_x_faint: float
    fwhm_y_faint: float
    fwhm_x_half: float
    fwhm_y_half: float
    fwhm_x_growth_pct: float
    fwhm_y_growth_pct: float
    ellipticity_faint: float
    ellipticity_half: float
    ellipticity_growth: float
    peak_e: float
    kernel_residual_pct: float = Field(description="FWHM growth (%, mean of x and y) left after the kernel correction")
    n_pairs: int
    n_fit: int
    fit_ok: bool


@dataclass
class BFQuadAnalysis:
    result: BFQuadResult
    a: np.ndarray
    b: np.ndarray
    kernel: np.ndarray
    mu: np.ndarray
    cov_maps: np.ndarray  # (n, L, L), ADU^2, accepted pairs
    pairs: list[PairMeasurement]


@dataclass
class BFAnalysis:
    """Output of :func:`analyse_bf`."""

    quads: dict[str, dict[str, BFQuadAnalysis]]
    warnings: list[str] = field(default_factory=list)
    params: BFParams = field(default_factory=BFParams)

    def results(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {c: {q: a.result.model_dump() for q, a in qs.items()} for c, qs in self.quads.items()}


# ----------------------------------------------------------------------------- kernel and spots


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


# ----------------------------------------------------------------------------- analysis


def analyse_bf(frames: Iterable[Any], definition: Any = None, params: BFParams | dict | None = None,
               quadrants: Sequence[str] = QUADRANTS) -> BFAnalysis:
    """BF01 analysis of PTC flats (all CCDs mixed; :class:`~common.FrameInput` or dicts)."""
    p = params_of(BFParams, params)
    ptc_kw = {**p.ptc, "max_lag": p.max_lag, "fit_lag": p.max_lag, "full_fit": True}
    pp = params_of(PTCParams, ptc_kw)
    fr = as_frames(frames)
    pairs, fstats = measure_all_pairs(fr, pp, quadrants)
    out: dict[str, dict[str, BFQuadAnalysis]] = {}
    warn: list[str] = []
    for ccd in sorted(pairs):
        for q in quadrants:
            if q not in pairs[ccd]:
                continue
            qa = fit_quadrant(pairs[ccd][q], [f for f in fstats if f.ccd == ccd and f.quadrant == q], pp)
            acc = [m for m, u in zip(qa.pairs, qa.used) if u]
            mu = np.array([m.mu for m in acc])
            covs = np.stack([m.cov for m in acc]) if acc else np.zeros((0, p.max_lag + 1, p.max_lag + 1))
            full = qa.full
            ok = bool(full is not None and full.success and np.isfinite(full.gain))
            if ok:
                a, b, gain = full.a, full.b, full.gain
            else:
                warn.append(f"{ccd} {q}: full covariance fit failed; a-matrix from a00 only")
                a = np.zeros((p.max_lag + 1, p.max_lag + 1))
                a[0, 0] = qa.exp.a00 if np.isfinite(qa.exp.a00) else 0.0
                b = np.zeros_like(a)
                gain = qa.exp.gain
            spot = spot_broadening(a, gain if np.isfinite(gain) else 3.3, p)
            kern = bf_kernel(a, p.kernel_size)
            a_sum = float(symmetric_plane(a, 2 * a.shape[0] + 1).sum())
            res = BFQuadResult(
                gain=float(gain), a00=float(a[0, 0]), a10=float(a[1, 0]), a01=float(a[0, 1]), a11=float(a[1, 1]), a_sum=a_sum,
                **spot, n_pairs=len(qa.pairs), n_fit=qa.result.n_fit, fit_ok=ok,
            )
            out.setdefault(ccd, {})[q] = BFQuadAnalysis(result=res, a=a, b=b, kernel=kern, mu=mu, cov_maps=covs, pairs=qa.pairs)
    return BFAnalysis(quads=out, warnings=warn, params=p)


# ----------------------------------------------------------------------------- analyzer plug-in

PARAMS = BFParams


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


def run_test(data: Any, sink: Any) -> Any:
    """Analyzer plug-in: BF01 on the PTC01 / PTC02 frames."""
    from services.analyzer.analysis.common import frame_inputs
    from services.analyzer.model import AnalysisOutput, FigureProduct, ImageProduct, TableProduct
    from shared.flags import Flag

    raw = dict(data.params)
    ptc_keys = set(PTCParams.model_fields) - {"max_lag", "fit_lag"}
    raw.setdefault("ptc", {k: v for k, v in data.params.items() if k in ptc_keys})
    p = params_of(BFParams, raw)
    an = analyse_bf(frame_inputs(data), params=p)
    if not an.quads:
        raise ValueError(f"{data.label}: no pairs of flats at equal exposure time")
    flags = Flag(0)
    for ccd, quads in an.quads.items():
        if any(not qa.result.fit_ok for qa in quads.values()):
            flags |= Flag.BADFIT
        ext = {}
        for q, qa in quads.items():
            ext[f"A_{q}"] = qa.a.T.astype(np.float64)  # image rows = parallel lag, columns = serial lag
            ext[f"B_{q}"] = qa.b.T.astype(np.float64)
            ext[f"KERNEL_{q}"] = qa.kernel
        sink.add(ImageProduct(name=f"bf_kernels_{ccd}", ccd=ccd, extensions=ext,
                              header={"BUNIT": "1/electron", "AXIS1": "serial lag", "AXIS2": "parallel lag"},
                              description="a and b matrices (Astier 2019 eq. 20) and BF kernel (laplacian K = a) per quadrant"))
        sink.add(FigureProduct(f"bf_{ccd}", (lambda fig, quads=quads, ccd=ccd: _draw_bf(fig, quads, ccd)), ccd=ccd, size=(16, 10),
                               description="covariances vs fluence, a-matrix and kernel per quadrant"))
    rows = [(c, q, qa, k) for c, qs in an.quads.items() for q, qa in qs.items() for k in range(qa.mu.size)]
    if rows:
        sink.add(TableProduct("bf_covariances", {
            "ccd": [c for c, *_ in rows], "quadrant": [q for _, q, *_ in rows], "mu": [qa.mu[k] for *_, qa, k in rows],
            "cov": np.stack([qa.cov_maps[k] for *_, qa, k in rows])}, units={"mu": "ADU", "cov": "ADU2"},
            description="covariance maps C[i serial, j parallel] vs fluence (accepted pairs)"))
    summary = [f"{'CCD':<5}{'Q':<2} {'a00':>10} {'a10':>10} {'a01':>10} {'dFWHMx%':>8} {'dFWHMy%':>8} {'de':>9}"]
    for ccd, quads in an.quads.items():
        for q, qa in quads.items():
            r = qa.result
            summary.append(f"{ccd:<5}{q:<2} {r.a00:10.3e} {r.a10:10.3e} {r.a01:10.3e} {r.fwhm_x_growth_pct:8.3f} "
                           f"{r.fwhm_y_growth_pct:8.3f} {r.ellipticity_growth:9.2e}")
    summary += [f"warning: {w}" for w in an.warnings]
    return AnalysisOutput(results=an.results(), flags=int(flags), parameters=p.model_dump(mode="json"), summary=summary)
