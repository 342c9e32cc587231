"""Point-source measurement (families.md, "Point sources"): detection with photutils, background
annulus, unweighted second moments and a 2D Gaussian fit per spot; matching of a frame's spots
to a locked pattern. Pure functions on offset-subtracted canonical image areas (ADU; ``x`` =
image column, ``y`` = image row, pixel centres at integers).

photutils (Astropy-affiliated, actively released) does the detection: :func:`find_peaks` on a
4 x 4-binned copy of the image (16 times fewer pixels to filter), refined on full-resolution
cut-outs; the measurements themselves are small numpy / scipy steps on 20-40 px stamps.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
from pydantic import BaseModel, Field
from scipy.optimize import least_squares

FWHM_SIGMA = 2.3548200450309493
DETECT_BIN = 4
BAD_COLUMN_FRACTION = 0.15  # a column sum through the core this far from the fitted profile: a bad column


class SpotMeasure(BaseModel):
    """One spot of one frame (ADU, px; canonical image-area coordinates)."""

    x: float = Field(description="fitted centre, image column (px)")
    y: float = Field(description="fitted centre, image row (px)")
    peak_adu: float | None = Field(None, description="fitted Gaussian amplitude above the background (ADU)")
    fluence_adu: float = Field(description="background-subtracted sum inside the aperture (ADU)")
    bgd_adu: float = Field(description="clipped median of the background annulus (ADU, offset-subtracted)")
    fwhm_x_px: float | None = Field(None, description="pixel-sampled FWHM along x (serial), 2.3548 sigma_x of the fit")
    fwhm_y_px: float | None = Field(None, description="pixel-sampled FWHM along y (parallel)")
    e1: float = Field(description="(Ixx - Iyy) / (Ixx + Iyy), unweighted moments in the aperture")
    e2: float = Field(description="2 Ixy / (Ixx + Iyy)")
    r2_px2: float = Field(description="Ixx + Iyy (px^2)")
    max_adu: float = Field(description="highest pixel (ADU, offset-subtracted)")
    saturated: bool = Field(False, description="a pixel of the spot reached the ADC ceiling")
    bad_column: bool = Field(False, description="a column through the core departs from the fitted profile by > 15 %")
    fit_ok: bool = False

    @property
    def fwhm_px(self) -> float | None:
        """``sqrt((FWHM_x^2 + FWHM_y^2) / 2)``."""
        if self.fwhm_x_px is None or self.fwhm_y_px is None:
            return None
        return math.sqrt((self.fwhm_x_px**2 + self.fwhm_y_px**2) / 2.0)


def background_noise(img: np.ndarray, step: int = 7) -> tuple[float, float]:
    """Robust level and noise (ADU) of an image: median and MAD std of a subsample."""
    sub = np.asarray(img[::step, ::step], dtype=np.float64).ravel()
    med = float(np.median(sub))
    mad = float(np.median(np.abs(sub - med))) * 1.4826
    return med, max(mad, 1e-3)


def detect_spots(img: np.ndarray, nsigma: float = 15.0, max_spots: int = 50, min_separation_px: float = 20.0) -> list[tuple[float, float]]:
    """Candidate spot centres (x, y) of an offset-subtracted image area, brightest first: peaks of
    the 4 x 4-binned image above ``level + nsigma x noise`` (photutils ``find_peaks``), refined to
    the brightest full-resolution pixel and its 3 x 3 centre of mass."""
    from photutils.detection import find_peaks
    from photutils.utils.exceptions import NoDetectionsWarning

    b = DETECT_BIN
    rows, cols = (img.shape[0] // b) * b, (img.shape[1] // b) * b
    binned = np.asarray(img[:rows, :cols], dtype=np.float32).reshape(rows // b, b, cols // b, b).sum(axis=(1, 3))
    level, noise = background_noise(binned, step=3)
    with warnings.catch_warnings():  # an empty frame (source off) is an answer, not a warning
        warnings.simplefilter("ignore", NoDetectionsWarning)
        table = find_peaks(binned - np.float32(level), threshold=nsigma * noise, box_size=5, n_peaks=max_spots * 4)
    if table is None or len(table) == 0:
        return []
    order = np.argsort(-np.asarray(table["peak_value"], dtype=float))
    out: list[tuple[float, float]] = []
    for i in order:
        xb, yb = int(table["x_peak"][i]), int(table["y_peak"][i])
        r0, r1 = max(yb * b - b, 0), min(yb * b + 2 * b, img.shape[0])
        c0, c1 = max(xb * b - b, 0), min(xb * b + 2 * b, img.shape[1])
        cut = img[r0:r1, c0:c1]
        rr, cc = np.unravel_index(int(np.argmax(cut)), cut.shape)
        y, x = r0 + rr, c0 + cc
        if any((x - a) ** 2 + (y - c) ** 2 < min_separation_px**2 for a, c in out):
            continue
        out.append((float(x), float(y)))
        if len(out) >= max_spots:
            break
    return out


def _gauss(p: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    a, x0, y0, sx, sy, bg = p
    return a * np.exp(-0.5 * (((xx - x0) / sx) ** 2 + ((yy - y0) / sy) ** 2)) + bg


def measure_spot(img: np.ndarray, x: float, y: float, noise: float, saturation_adu: float = np.inf,
                 size_guess_px: float = 2.0) -> SpotMeasure | None:
    """Measure one spot near (x, y) (module docstring): annulus background (``r_in = max(6, 3 x
    size)``, 6 px wide), moments and sum inside ``r_in``, axis-aligned Gaussian + constant fitted
    to the square stamp of half-size ``r_in``. None if the stamp leaves the image."""
    r_in = max(6.0, 3.0 * size_guess_px)
    r_out = r_in + 6.0
    half = int(math.ceil(r_out)) + 1
    xi, yi = int(round(x)), int(round(y))
    if xi - half < 0 or yi - half < 0 or xi + half >= img.shape[1] or yi + half >= img.shape[0]:
        return None
    stamp = np.asarray(img[yi - half: yi + half + 1, xi - half: xi + half + 1], dtype=np.float64)
    yy, xx = np.mgrid[yi - half: yi + half + 1, xi - half: xi + half + 1].astype(np.float64)
    r = np.hypot(xx - x, yy - y)
    ann = stamp[(r >= r_in) & (r < r_out)]
    med = float(np.median(ann))
    s = 1.4826 * float(np.median(np.abs(ann - med))) or noise
    bgd = float(np.median(ann[np.abs(ann - med) < 4 * s])) if ann.size else 0.0
    ap = r < r_in
    sig = stamp - bgd
    w = np.where(ap, sig, 0.0)
    tot = float(w.sum())
    if tot <= 0:
        return None
    xc, yc = float((w * xx).sum() / tot), float((w * yy).sum() / tot)
    ixx = float((w * (xx - xc) ** 2).sum() / tot)
    iyy = float((w * (yy - yc) ** 2).sum() / tot)
    ixy = float((w * (xx - xc) * (yy - yc)).sum() / tot)
    r2 = ixx + iyy
    e1, e2 = ((ixx - iyy) / r2, 2 * ixy / r2) if r2 > 0 else (0.0, 0.0)
    raw_max = float(stamp[ap].max())
    saturated = raw_max >= saturation_adu
    # Gaussian fit on the square inside r_in (saturated pixels excluded)
    k = int(math.ceil(r_in))
    sl = (slice(half - k, half + k + 1), slice(half - k, half + k + 1))
    fx, fy, fz = xx[sl].ravel(), yy[sl].ravel(), stamp[sl].ravel()
    keep = fz < saturation_adu
    sx0 = math.sqrt(max(ixx, 0.3)) if ixx > 0 else 1.0
    sy0 = math.sqrt(max(iyy, 0.3)) if iyy > 0 else 1.0
    p0 = np.array([max(raw_max - bgd, 1.0), xc, yc, sx0, sy0, bgd])
    lo = [0.0, x - 3, y - 3, 0.2, 0.2, bgd - 50 * s - 10]
    hi = [np.inf, x + 3, y + 3, 3 * r_in, 3 * r_in, bgd + 50 * s + 10]
    p0 = np.clip(p0, np.array(lo) + 1e-6, np.where(np.isfinite(hi), np.array(hi) - 1e-6, p0 + 1))
    out = SpotMeasure(x=xc, y=yc, fluence_adu=tot, bgd_adu=bgd, e1=e1, e2=e2, r2_px2=r2, max_adu=raw_max, saturated=saturated)
    if keep.sum() < 10:
        return out
    try:
        fit = least_squares(lambda p: _gauss(p, fx[keep], fy[keep]) - fz[keep], p0, bounds=(lo, hi), x_scale="jac", max_nfev=200)
    except ValueError:
        return out
    if not fit.success:
        return out
    a, x0, y0, sx, sy, bg = fit.x
    out.x, out.y, out.peak_adu = float(x0), float(y0), float(a)
    out.fwhm_x_px, out.fwhm_y_px = float(FWHM_SIGMA * sx), float(FWHM_SIGMA * sy)
    out.fit_ok = True
    # a dead or hot column through the core: the column sums depart from the fitted profile
    model = _gauss(fit.x, xx[sl], yy[sl]) - bg
    data = stamp[sl] - bg
    colm, cold = model.sum(axis=0), data.sum(axis=0)
    strong = colm > max(0.1 * colm.max(), 20 * noise)
    if strong.any() and not saturated:
        out.bad_column = bool(np.any(np.abs(cold[strong] - colm[strong]) > BAD_COLUMN_FRACTION * colm[strong]))
    return out


def match_to_pattern(pattern: Sequence[tuple[float, float]], found: Sequence[tuple[float, float]], radius_px: float) -> list[int | None]:
    """For each pattern position, the index of the nearest found position within ``radius_px``
    (each found position used once), else None."""
    out: list[int | None] = []
    used: set[int] = set()
    f = np.asarray(found, dtype=float).reshape(-1, 2)
    for px, py in pattern:
        if f.size == 0:
            out.append(None)
            continue
        d = np.hypot(f[:, 0] - px, f[:, 1] - py)
        for i in np.argsort(d):
            if d[i] > radius_px:
                break
            if int(i) not in used:
                used.add(int(i))
                out.append(int(i))
                break
        else:
            out.append(None)
    return out


def robust_line(x: np.ndarray, y: np.ndarray, nsigma: float = 4.0, iterations: int = 5) -> tuple[float, float, float, float, int]:
    """Robust straight line ``y = a + b x``: least squares with iterative rejection of points
    beyond ``nsigma`` MAD-sigmas; returns (a, b, err_a, err_b, points kept)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    a = b = ea = eb = float("nan")
    for _ in range(iterations):
        if keep.sum() < 3:
            break
        A = np.vstack([np.ones(keep.sum()), x[keep]]).T
        coef, *_ = np.linalg.lstsq(A, y[keep], rcond=None)
        res = y - (coef[0] + coef[1] * x)
        s = 1.4826 * float(np.median(np.abs(res[keep] - np.median(res[keep])))) or float(np.std(res[keep])) or 1e-12
        new = np.isfinite(x) & np.isfinite(y) & (np.abs(res) <= nsigma * s)
        a, b = float(coef[0]), float(coef[1])
        dof = max(int(keep.sum()) - 2, 1)
        var = float((res[keep] ** 2).sum()) / dof
        cov = var * np.linalg.inv(A.T @ A)
        ea, eb = float(math.sqrt(cov[0, 0])), float(math.sqrt(cov[1, 1]))
        if np.array_equal(new, keep):
            break
        keep = new
    return a, b, ea, eb, int(keep.sum())
