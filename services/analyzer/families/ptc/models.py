"""PTC models and their fits (pure): the exponential model (Astier et al. 2019 eq. 16) with the
turnoff cut and iterative outlier rejection, the plain quadratic of the original campaign
software, and (from :mod:`services.analyzer.science.covariance`, shared with BF01) the full
covariance model (eq. 20: a, b = c / a, noise matrices and the gain, fitted together). mu in ADU, g in e-/ADU, a and b in 1/e-, noise in e-^2, variances in ADU^2."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.analyzer.families.ptc.params import PTCParams
from services.analyzer.science.covariance import (  # noqa: F401  (the eq. 20 model is shared with BF01)
    FullCovFit,
    fit_full_covariance,
    full_covariance_jacobian,
    full_covariance_model,
    symmetric_plane_periodic,
)
from services.analyzer.science.fitting import iterative_fit
from services.analyzer.science.stats import group_by



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
