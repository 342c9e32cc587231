"""The full covariance model of flat-field pairs (Astier et al. 2019 eq. 20) and its fit (pure):
PTC01 (gain, a and b matrices) and BF01 (the a-matrix of the brighter-fatter kernel) use it.
mu in ADU, g in e-/ADU, a and b in 1/e-, noise in e-^2, covariances in ADU^2; matrices indexed
[i serial lag, j parallel lag]."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from services.analyzer.science.stats import mad_std


def symmetric_plane_periodic(m: np.ndarray, size: int) -> np.ndarray:
    """The quadrant array ``m[i, j]`` (i, j >= 0) mirrored onto a periodic ``size x size`` plane
    (origin at [0, 0]) so that m(-i, j) = m(i, -j) = m(i, j)."""
    r = m.shape[0]
    plane = np.zeros((size, size))
    ii = np.arange(r)
    for si in (ii, (-ii) % size):
        for sj in (ii, (-ii) % size):
            plane[np.ix_(si, sj)] = m
    return plane


def _plane_size(r: int) -> int:
    return int(2 ** np.ceil(np.log2(6 * r)))


def _convolutions(a: np.ndarray, c: np.ndarray) -> dict[str, np.ndarray]:
    """Full periodic planes of a, c, a*a, a*a*a, a*c (``*``: 2-D convolution of the symmetric
    planes, by FFT)."""
    size = _plane_size(a.shape[0])
    pa, pc = symmetric_plane_periodic(a, size), symmetric_plane_periodic(c, size)
    fa, fc = np.fft.rfft2(pa), np.fft.rfft2(pc)
    s = (size, size)
    return {"a": pa, "c": pc, "a2": np.fft.irfft2(fa * fa, s=s), "a3": np.fft.irfft2(fa * fa * fa, s=s),
            "ac": np.fft.irfft2(fa * fc, s=s)}


def full_covariance_model(mu: np.ndarray, a: np.ndarray, c: np.ndarray, noise: np.ndarray, gain: float) -> np.ndarray:
    """Astier et al. 2019 eq. 20: ``C_ij(mu)`` (ADU^2), shape (len(mu), r, r)::

        C_ij = mu/g [delta_ij + a_ij mu g + 2/3 (a*a + c)_ij (mu g)^2 + (1/3 a*a*a + 5/6 a*c)_ij (mu g)^3]
               + n_ij / g^2

    with ``*`` the 2-D discrete convolution over the symmetric plane, ``c = a b`` (element-wise),
    a, b in 1/e-, n in e-^2, mu in ADU."""
    r = a.shape[0]
    cv = _convolutions(a, c)
    a2, a3, ac = cv["a2"][:r, :r], cv["a3"][:r, :r], cv["ac"][:r, :r]
    x = np.asarray(mu, dtype=np.float64)[:, None, None] * gain
    model = x / gain**2 * (a[None] * x + 2.0 / 3.0 * (a2 + c)[None] * x**2 + (a3 / 3.0 + 5.0 / 6.0 * ac)[None] * x**3)
    model = model + noise[None] / gain**2
    model[:, 0, 0] += np.asarray(mu, dtype=np.float64) / gain
    return model


@lru_cache(maxsize=8)
def _mirror_index(r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index arrays (r^2, r^2, 4) into the periodic plane and weights (r^2, 4): for output lag
    ij and parameter kl, the plane points (i - sk k, j - sl l) of the distinct mirror images
    (sk k, sl l) of kl; ``(S(e_kl) * X)_ij = sum_m w[kl, m] X[ii[ij, kl, m], jj[ij, kl, m]]``."""
    size = _plane_size(r)
    i = np.repeat(np.arange(r), r)  # ij flattened: i * r + j
    j = np.tile(np.arange(r), r)
    signs = [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    ii = np.empty((r * r, r * r, 4), dtype=np.intp)
    jj = np.empty_like(ii)
    w = np.zeros((r * r, 4))
    for m, (sk, sl) in enumerate(signs):
        ii[:, :, m] = (i[:, None] - sk * i[None, :]) % size
        jj[:, :, m] = (j[:, None] - sl * j[None, :]) % size
    for kl in range(r * r):
        seen = set()
        for m, (sk, sl) in enumerate(signs):
            pt = ((sk * i[kl]) % size, (sl * j[kl]) % size)
            if pt not in seen:
                seen.add(pt)
                w[kl, m] = 1.0
    return ii, jj, w


def _conv_matrix(plane: np.ndarray, r: int) -> np.ndarray:
    """``M[ij, kl] = (S(e_kl) * X)_ij`` for the periodic plane of X: the derivative of
    ``(S(a) * X)_ij`` with respect to a_kl."""
    ii, jj, w = _mirror_index(r)
    return np.einsum("pqm,qm->pq", plane[ii, jj], w)


def full_covariance_jacobian(mu: np.ndarray, a: np.ndarray, c: np.ndarray, noise: np.ndarray, gain: float,
                             fit_b: bool = True) -> np.ndarray:
    """Analytic Jacobian of :func:`full_covariance_model` (flattened to (n r^2,)) with respect to
    (a (r^2), c (r^2, when ``fit_b``), noise (r^2), gain): shape (n r^2, 2 or 3 r^2 + 1)."""
    r = a.shape[0]
    nA = r * r
    cv = _convolutions(a, c)
    Ma, Ma2 = _conv_matrix(cv["a"], r), _conv_matrix(cv["a2"], r)
    mu = np.asarray(mu, dtype=np.float64)
    g = float(gain)
    m2, m3, m4 = (mu**2)[:, None, None], (mu**3)[:, None, None], (mu**4)[:, None, None]
    eye = np.eye(nA)[None]
    Ja = m2 * eye + (4.0 / 3.0) * g * m3 * Ma[None] + g * g * m4 * Ma2[None]
    blocks = []
    if fit_b:
        Mc = _conv_matrix(cv["c"], r)
        Ja = Ja + (5.0 / 6.0) * g * g * m4 * Mc[None]
        Jc = (2.0 / 3.0) * g * m3 * eye + (5.0 / 6.0) * g * g * m4 * Ma[None]
        blocks = [Ja, Jc]
    else:
        blocks = [Ja]
    n = mu.size
    Jn = np.broadcast_to(eye / g**2, (n, nA, nA))
    a2, a3, ac = cv["a2"][:r, :r], cv["a3"][:r, :r], cv["ac"][:r, :r]
    Jg = (2.0 / 3.0) * (a2 + c)[None] * m3 + 2.0 * g * (a3 / 3.0 + 5.0 / 6.0 * ac)[None] * m4 - 2.0 * noise[None] / g**3
    Jg = Jg.reshape(n, nA).copy()
    Jg[:, 0] -= mu / g**2
    J = np.concatenate([b.reshape(n, nA, nA) for b in blocks] + [Jn, Jg[:, :, None]], axis=2)
    return J.reshape(n * nA, -1)


@dataclass
class FullCovFit:
    """Full covariance fit of one quadrant: a, b (1/e-), noise (e-^2) matrices [i serial, j
    parallel], gain (e-/ADU) and errors (``a_err`` 1/e-), reduced chi^2. ``b = c / a`` where ``|a|`` exceeds
    ``a_min_for_b``, NaN elsewhere (b is undetermined where a vanishes)."""

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
    kept: np.ndarray | None = None  # points kept (index into the fitted points)
    nfev: int = 0


def levenberg_marquardt(resid, jac, x0: np.ndarray, max_iter: int = 50, ftol: float = 1e-8):
    """Minimise ``|resid(x)|^2`` by Levenberg-Marquardt on the normal equations (Marquardt's
    diagonal scaling; one Jacobian and one small linear solve per step: far cheaper than the SVD
    of a trust-region solver when there are many residuals and a few hundred parameters).
    Returns ``(x, residuals, jacobian, converged, message, evaluations)``."""
    x = np.asarray(x0, dtype=np.float64).copy()
    r = resid(x)
    cost = float(r @ r)
    lam = 1e-6
    nfev = 1
    J = jac(x)
    for it in range(max_iter):
        A = J.T @ J
        grad = J.T @ r
        diag = np.diag(A).copy()
        diag[diag <= 0] = 1.0
        improved = False
        for _ in range(20):
            try:
                step = np.linalg.solve(A + lam * np.diag(diag), -grad)
            except np.linalg.LinAlgError:
                lam *= 10.0
                continue
            x_new = x + step
            r_new = resid(x_new)
            nfev += 1
            cost_new = float(r_new @ r_new)
            if np.isfinite(cost_new) and cost_new <= cost:
                improved = True
                break
            lam *= 10.0
        if not improved:
            return x, r, J, True, "no further decrease", nfev
        rel = (cost - cost_new) / max(cost, 1e-300)
        x, r, cost = x_new, r_new, cost_new
        lam = max(lam / 10.0, 1e-12)
        J = jac(x)
        if rel < ftol:
            return x, r, J, True, f"converged in {it + 1} steps", nfev
    return x, r, J, False, f"not converged in {max_iter} steps", nfev


def fit_full_covariance(
    mu: np.ndarray, cov: np.ndarray, npix: np.ndarray, gain0: float, a00_0: float = -1e-6, fit_b: bool = True, nsigma: float = 5.0,
    a_min_for_b: float = 1e-9, gain_fixed: float | None = None,
) -> FullCovFit:
    """Fit eq. 20 to covariances ``cov`` (n, r, r) at means ``mu`` (n,) from ``npix`` pixels.

    Weights: sigma(C_ij) = C00 sqrt((1 + delta_ij) / npix). Initialisation: per-lag parabolas of
    the data minus the current model (Astier's scheme), then ``least_squares`` on all a_ij,
    c_ij, n_ij and the gain with the analytic Jacobian (:func:`full_covariance_jacobian`);
    points whose C00 residual exceeds ``nsigma`` (robust) are dropped once and the fit
    repeated. ``gain_fixed``: hold the gain at this value (e.g. BF01 at PTC01's gain, so that
    both report one gain); ``gain_err`` is then 0."""
    mu = np.asarray(mu, dtype=np.float64)
    cov = np.asarray(cov, dtype=np.float64)
    n, r, _ = cov.shape
    sig = cov[:, :1, :1] * np.sqrt(1.0 / np.asarray(npix, dtype=np.float64))[:, None, None] * np.ones((1, r, r))
    sig[:, 0, 0] *= np.sqrt(2.0)
    a = np.zeros((r, r))
    a[0, 0] = a00_0
    c = np.zeros((r, r))
    noise = np.zeros((r, r))
    gain = float(gain0 if gain_fixed is None else gain_fixed)
    # --- per-lag parabola initialisation
    # (the weights of all lags are proportional per point: one weighted design for every lag)
    w = 1.0 / sig[:, 0, 1] if r > 1 else 1.0 / sig[:, 0, 0]
    design = np.stack([mu**2, mu, np.ones_like(mu)], axis=1) * w[:, None]
    for _ in range(5):
        model = full_covariance_model(mu, a, c, noise, gain)
        rhs = ((cov - model) * w[:, None, None]).reshape(n, r * r)
        pf = np.linalg.lstsq(design, rhs, rcond=None)[0].reshape(3, r, r)
        a += pf[0]
        noise += pf[2] * gain * gain
        if gain_fixed is None:
            gain = 1.0 / (1.0 / gain + pf[1, 0, 0])
    keep = np.ones(n, bool)
    nA = r * r
    # parameters scaled to O(1) for the optimiser: x = params / scale
    scale = np.concatenate([np.full(nA, 1e-6)] + ([np.full(nA, 1e-12)] if fit_b else []) + [np.ones(nA), [1.0]])

    def unpack(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        y = x * scale
        aa = y[:nA].reshape(r, r)
        cc = y[nA : 2 * nA].reshape(r, r) if fit_b else np.zeros((r, r))
        off = 2 * nA if fit_b else nA
        return aa, cc, y[off : off + nA].reshape(r, r), float(y[-1])

    def pack(aa, cc, nn, g):
        return np.concatenate([aa.ravel()] + ([cc.ravel()] if fit_b else []) + [nn.ravel(), [g]]) / scale

    nfree = scale.size - (gain_fixed is not None)

    def full(x):
        return x if gain_fixed is None else np.concatenate([x, [gain_fixed]])

    def resid(x, sel):
        aa, cc, nn, g = unpack(full(x))
        m = full_covariance_model(mu[sel], aa, cc, nn, g)
        return ((cov[sel] - m) / sig[sel]).ravel()

    def jac(x, sel):
        aa, cc, nn, g = unpack(full(x))
        J = full_covariance_jacobian(mu[sel], aa, cc, nn, g, fit_b)[:, :nfree]
        J *= -scale[None, :nfree]
        J /= sig[sel].reshape(-1, 1)
        return J

    x = pack(a, c, noise, gain)[:nfree]
    nfev = 0
    ok, msg = False, ""
    fun = jmat = None
    for _ in range(2):
        x, fun, jmat, ok, msg, nf = levenberg_marquardt(lambda v: resid(v, keep), lambda v: jac(v, keep), x)
        nfev += nf
        rr = resid(x, np.ones(n, bool)).reshape(n, r, r)[:, 0, 0]
        s = max(mad_std(rr[keep]), 1.0)
        new = np.abs(rr) <= nsigma * s
        if new.sum() == keep.sum() or new.sum() < 4:
            break
        keep = new
    aa, cc, nn, g = unpack(full(x))
    dof = max(keep.sum() * r * r - x.size, 1)
    chi2 = float(np.sum(fun**2) / dof)
    try:
        pcov = np.linalg.pinv(jmat.T @ jmat) * max(chi2, 1.0)
        perr = np.sqrt(np.clip(np.diag(pcov), 0, None)) * scale[:nfree]
    except np.linalg.LinAlgError:  # pragma: no cover
        perr = np.full(x.size, np.nan)
    if gain_fixed is not None:
        perr = np.concatenate([perr, [0.0]])
    with np.errstate(invalid="ignore", divide="ignore"):
        b = np.where(np.abs(aa) > a_min_for_b, cc / np.where(aa == 0, 1.0, aa), np.nan)
    return FullCovFit(
        a=aa, b=b, c=cc, noise=nn, gain=g, gain_err=float(perr[-1]), a_err=perr[:nA].reshape(r, r), chi2_red=chi2,
        success=bool(ok), message=msg, kept=keep, nfev=nfev,
    )
