"""Smooth 2-D models of images (pure): block medians and a Legendre polynomial or a smoothing
spline through them, evaluated on the full pixel grid (float32)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from services.analyzer.science.stats import mad_std


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


@dataclass(frozen=True)
class PolyBinsFit:
    """A Legendre polynomial fitted to block medians: coefficients ``coeffs[i, j]`` (row degree i,
    column degree j, total <= degree), the fitted values at the blocks, the blocks kept after
    rejection and the rms of their residuals."""

    coeffs: np.ndarray
    fitted: np.ndarray
    used: np.ndarray
    rms: float


def fit_poly_bins(vals: np.ndarray, vy: np.ndarray, vx: np.ndarray, degree: int, nsigma: float = 5.0,
                  maxiters: int = 3) -> PolyBinsFit:
    """Least-squares Legendre polynomial of total degree ``degree`` through block medians ``vals``
    (NaN = empty block) with the basis values ``vy`` / ``vx`` at the block centres, rejecting
    blocks beyond ``nsigma`` robust sigmas (``maxiters`` passes)."""
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
    fitted = design @ coef
    rms = float(np.sqrt(np.mean((target[use] - fitted[use]) ** 2)))
    return PolyBinsFit(cmat, fitted.reshape(vals.shape), use.reshape(vals.shape), rms)


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
    fit = fit_poly_bins(vals, vy, vx, degree, nsigma, maxiters)
    cmat, rms, poly_bins, use = fit.coeffs, fit.rms, fit.fitted, fit.used.ravel()
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


def fit_poly_2d(
    image: np.ndarray, degree: int = 5, nbins: tuple[int, int] = (32, 32), nsigma: float = 5.0, maxiters: int = 3, step: int = 1
) -> Smooth2DModel:
    """The ``poly`` model of :func:`fit_smooth_2d`, cheaper on large images: the bin medians are
    taken on every ``step``-th row and column (``step=2``: a quarter of the pixels; bin centres
    in full-image pixel coordinates) and the model is evaluated in float32 (no float64 image)."""
    img = np.asarray(image)
    ny, nx = img.shape
    step = max(int(step), 1)
    binned = bin_image(img[::step, ::step], nbins)
    binned = BinnedImage(binned.values, binned.yc * step, binned.xc * step)
    vals = binned.values
    vy = _legendre_basis(binned.yc, ny, degree)
    vx = _legendre_basis(binned.xc, nx, degree)
    fit = fit_poly_bins(vals, vy, vx, degree, nsigma, maxiters)
    cmat, rms = fit.coeffs, fit.rms
    left = (_legendre_basis(np.arange(ny), ny, degree) @ cmat).astype(np.float32)
    model = left @ _legendre_basis(np.arange(nx), nx, degree).T.astype(np.float32)
    return Smooth2DModel(model, "poly", degree, tuple(nbins), cmat, binned, rms)
