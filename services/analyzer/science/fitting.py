"""Least-squares fitting helpers (pure): curve_fit with iterative outlier rejection, weighted
polynomial fits with covariances."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import optimize

from services.analyzer.science.stats import mad_std


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
