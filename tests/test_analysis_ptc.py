"""PTC01/02 family (engine v2): pair measurement, covariances, rejection, fits, and the accuracy
target (gain within 0.5 % and a00 within 10 % of truth on a PTC01-sized data set of one
quadrant, simulated at full size with ``services.sim.physics``, through ``run_inprocess``)."""

from __future__ import annotations

import numpy as np
import pytest

from services.analyzer.families.ptc import FAMILY, measure, models, solve
from services.analyzer.families.ptc.params import PTCParams
from services.analyzer.family import Calibrations, TestRun, run_inprocess
from services.analyzer.science.stats import clipped_stats
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS
from ptc_sim import PTC01_FLUENCES, PTC01_FRAMES, array_exposure, sim_exposures


def _gaussian_quad(rng, mu_adu, gain=3.3, ron=1.4, offset=1000.0, shape=(2086, 2119), noise=None):
    """A canonical quadrant: offset + read noise, a flat of mean mu (shot noise at ``gain``) in
    the image area (optionally with another noise law), digitised."""
    q = offset + ron * rng.standard_normal(shape, dtype=np.float32)
    img = q[:IMAGE_ROWS, PRESCAN_COLS : PRESCAN_COLS + IMAGE_COLS]
    if noise is None:
        img += np.float32(mu_adu) + np.float32(np.sqrt(mu_adu / gain)) * rng.standard_normal(img.shape, dtype=np.float32)
    else:
        img += np.float32(mu_adu) + noise(img.shape).astype(np.float32)
    return np.rint(q).astype(np.float32)


# ----------------------------------------------------------------------------- small pieces


def test_masked_covariances_match_brute_force():
    rng = np.random.default_rng(1)
    img = rng.normal(size=(120, 90))
    img[:, 1:] += 0.4 * img[:, :-1]  # serial correlation
    img[1:, :] += 0.2 * img[:-1, :]  # parallel correlation
    mask = rng.random(img.shape) > 0.02
    cov, npairs = measure.masked_covariances(img, mask, 3, dtype=np.float64)
    cov32, _ = measure.masked_covariances(img, mask, 3)  # the float32 default
    x = np.where(mask, img, 0.0)
    x = (x - x.sum() / mask.sum()) * mask

    def lagged(dx, dy):
        a = x[: x.shape[0] - dy, max(0, -dx) : x.shape[1] - max(0, dx)]
        b = x[dy:, max(0, dx) : x.shape[1] + min(0, dx) if dx < 0 else None]
        wa = mask[: x.shape[0] - dy, max(0, -dx) : x.shape[1] - max(0, dx)]
        wb = mask[dy:, max(0, dx) : x.shape[1] + min(0, dx) if dx < 0 else None]
        return (a * b).sum() / (wa & wb).sum()

    for i, j in [(0, 0), (1, 0), (0, 1), (2, 3), (3, 1)]:
        expected = 0.5 * (lagged(i, j) + lagged(-i, j))
        assert cov[i, j] == pytest.approx(expected, rel=1e-10)
        assert cov32[i, j] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert cov[1, 0] > 0.25 and cov[0, 1] > 0.1 and cov[1, 0] > cov[0, 1]  # i = serial lag
    assert npairs[0, 0] == mask.sum()


def test_pair_counts_direct_equal_fft(monkeypatch):
    rng = np.random.default_rng(2)
    img = rng.normal(size=(64, 50))
    mask = rng.random(img.shape) > 0.05
    direct = measure.masked_covariances(img, mask, 4, dtype=np.float64)
    monkeypatch.setattr(measure, "_pair_counts", lambda m, L, **kw: None)
    via_fft = measure.masked_covariances(img, mask, 4, dtype=np.float64)
    np.testing.assert_allclose(direct[0], via_fft[0], rtol=1e-12)
    np.testing.assert_array_equal(direct[1], via_fft[1])


def test_clipping_correction_recovers_variance():
    x = np.random.default_rng(3).normal(0.0, 2.0, 2_000_000)
    for k in (2.5, 3.0, 4.0):
        st = clipped_stats(x, k)
        assert st.var < x.var() * (0.99 if k < 3.5 else 1.0)
        assert st.var_corrected == pytest.approx(x.var(), rel=2e-3)


def test_exponential_model_limits():
    mu = np.array([0.0, 1000.0, 30000.0])
    np.testing.assert_allclose(models.exponential_model(mu, 0.0, 3.3, 20.0), mu / 3.3 + 20.0 / 3.3**2)
    # small a00: first order mu/g + a00 mu^2
    v = models.exponential_model(np.array([1000.0]), -1e-9, 3.0, 0.0)[0]
    assert v == pytest.approx(1000.0 / 3.0 - 1e-9 * 1000.0**2, rel=1e-6)
    assert models.exponential_model(np.array([30000.0]), -2e-6, 3.3, 0.0)[0] < 30000.0 / 3.3


def test_fit_exponential_and_quadratic_on_synthetic_curve():
    g, a00, n00 = 3.25, -1.5e-6, 20.0
    texp = np.repeat(np.arange(1, 13, dtype=float), 3)
    mu = texp * 5000.0
    var = models.exponential_model(mu, a00, g, n00)
    rng = np.random.default_rng(4)
    err = var * np.sqrt(2.0 / 4e6)
    var = var + err * rng.standard_normal(var.size)
    var[-6:] = np.linspace(500, 100, 6)  # beyond the turnoff: variance collapses
    var[10] *= 1.05  # one outlier
    ex = models.fit_exponential(mu, var, err, texp)
    assert ex.success
    assert ex.gain == pytest.approx(g, rel=1e-3)
    assert ex.a00 == pytest.approx(a00, rel=0.03)
    assert not ex.kept[10] and not ex.kept[-6:].any()
    assert ex.turnoff_adu == pytest.approx(mu[-7])
    quad = models.fit_quadratic(mu, var, err, ex.kept)
    assert abs(quad["gain_quad"] / g - 1) > 0.003  # the plain quadratic is biased by BF


def test_full_covariance_model_matches_fourier_exponential():
    """Eq. 20 is the expansion of C(k) = (exp(2 a(k) x) - 1) / (2 a(k)): check it against the
    exact Fourier-domain covariance at a moderate fluence (4th-order truncation)."""
    r, g = 4, 3.3
    a = np.zeros((r, r))
    a[0, 0], a[1, 0], a[0, 1], a[1, 1] = -1e-6, 2e-7, 3e-7, 2e-8
    size = 64
    fa = np.fft.fft2(models.symmetric_plane_periodic(a, size)).real
    mu = 20000.0
    x = mu * g
    ck = np.expm1(2 * fa * x) / (2 * fa)
    exact = np.fft.ifft2(ck).real[:r, :r] / g**2
    model = models.full_covariance_model(np.array([mu]), a, np.zeros((r, r)), np.zeros((r, r)), g)[0]
    assert np.max(np.abs(model - exact)) / exact[0, 0] < 2e-5
    assert model[1, 0] == pytest.approx(a[1, 0] * x**2 / g**2, rel=0.1)


def test_full_covariance_jacobian_matches_finite_differences():
    r, g = 4, 3.3
    a = np.zeros((r, r))
    a[0, 0], a[1, 0], a[0, 1], a[1, 1], a[2, 0] = -1.5e-6, 2.6e-7, 3.4e-7, 3e-8, 2e-8
    c = np.zeros((r, r))
    c[0, 0], c[1, 0] = 1e-12, 3e-13
    noise = np.zeros((r, r))
    noise[0, 0] = 20.0
    mu = np.array([3000.0, 20000.0, 50000.0])
    J = models.full_covariance_jacobian(mu, a, c, noise, g, True)
    n = r * r

    def f(x):
        return models.full_covariance_model(mu, x[:n].reshape(r, r), x[n:2 * n].reshape(r, r), x[2 * n:3 * n].reshape(r, r), x[-1]).ravel()

    x0 = np.concatenate([a.ravel(), c.ravel(), noise.ravel(), [g]])
    h = np.concatenate([np.full(n, 1e-9), np.full(n, 1e-15), np.full(n, 1e-3), [1e-6]])
    for k in range(x0.size):
        xp, xm = x0.copy(), x0.copy()
        xp[k] += h[k]
        xm[k] -= h[k]
        num = (f(xp) - f(xm)) / (2 * h[k])
        assert np.max(np.abs(J[:, k] - num)) <= 1e-6 * max(np.max(np.abs(num)), 1e-30), k


def test_full_covariance_fit_recovers_a_and_gain():
    r, g = 9, 3.3
    a = np.zeros((r, r))
    a[0, 0], a[1, 0], a[0, 1], a[1, 1] = -1.5e-6, 2.6e-7, 3.4e-7, 3e-8
    noise = np.zeros((r, r))
    noise[0, 0] = 20.0
    mu = np.repeat(np.array([0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9]) * 60000, 5)
    cov = models.full_covariance_model(mu, a, np.zeros((r, r)), noise, g)
    npix = np.full(mu.size, 4.1e6)
    sig = cov[:, :1, :1] / np.sqrt(npix)[:, None, None] * np.ones((1, r, r))
    sig[:, 0, 0] *= np.sqrt(2)
    cov = cov + sig * np.random.default_rng(1).standard_normal(cov.shape)
    f = models.fit_full_covariance(mu, cov, npix, 3.2, -1e-6, True, 5.0)
    assert f.success and f.chi2_red == pytest.approx(1.0, abs=0.1)
    assert f.gain == pytest.approx(g, rel=3e-3) and abs(f.gain - g) < 3 * f.gain_err
    assert f.a[0, 0] == pytest.approx(a[0, 0], rel=0.05)
    assert f.a[1, 0] == pytest.approx(a[1, 0], rel=0.05) and f.a[0, 1] == pytest.approx(a[0, 1], rel=0.05)
    fixed = models.fit_full_covariance(mu, cov, npix, 3.2, -1e-6, True, 5.0, gain_fixed=g)
    assert fixed.gain == g and fixed.a[0, 0] == pytest.approx(a[0, 0], rel=0.05)


def test_find_bloom_and_lower_limit():
    p = PTCParams()
    mu = np.array([1e4, 2e4, 3e4, 4e4, 5e4, 6e4])
    model = mu / 3.3
    err = model * 1e-3
    var = model.copy()
    level, lower = solve.find_bloom(mu, var, model, err, mu, p)
    assert lower and level == 6e4
    var[4:] *= 0.5
    level, lower = solve.find_bloom(mu, var, model, err, mu, p)
    assert not lower and level == 5e4
    var = model.copy()
    var[2] *= 0.5  # a single low point is not blooming
    assert solve.find_bloom(mu, var, model, err, mu, p)[1]


def test_pairs_group_by_exptime_in_obsid_order():
    quad = np.zeros((4, 4), np.float32)
    times = [1.0, 2.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0]
    exps = [array_exposure(i, quad, exptime=t) for i, t in enumerate(times)]
    units = FAMILY.units(exps)
    pairs = sorted(tuple(e.obsid for e in inputs) for _, inputs in units)
    assert pairs == sorted([(0, 2), (3, 5), (6, 7), (1, 4)])
    assert {u for u, _ in units} == {"p0-2", "p3-5", "p6-7", "p1-4"}


def test_measure_pair_rejects_mismatch_and_non_gaussian_pairs():
    rng = np.random.default_rng(5)
    p = PTCParams(max_lag=2)
    q1 = _gaussian_quad(rng, 20000.0)
    q2 = _gaussian_quad(rng, 20000.0)
    good = measure.measure_pair(q1, q2, p)
    assert solve.pair_rejection(good, p) == "" and good.ks_p > 0.01
    assert good.var == pytest.approx(20000.0 / 3.3 + 1.4**2 + 1 / 12, rel=0.01)
    assert abs(good.cov[1, 0]) < 0.01 * good.var and abs(good.cov[0, 1]) < 0.01 * good.var
    bright = _gaussian_quad(rng, 23000.0)
    bad = measure.measure_pair(q1, bright, p)
    assert "mismatch" in solve.pair_rejection(bad, p)
    # same variance, Laplace-distributed: not Gaussian
    s = np.sqrt(20000.0 / 3.3)
    lap = _gaussian_quad(rng, 20000.0, noise=lambda shape: rng.laplace(0.0, s / np.sqrt(2), shape))
    lap2 = _gaussian_quad(rng, 20000.0, noise=lambda shape: rng.laplace(0.0, s / np.sqrt(2), shape))
    ng = measure.measure_pair(lap, lap2, p)
    assert "non-Gaussian" in solve.pair_rejection(ng, p) and ng.ks_p < 0.01


# ----------------------------------------------------------------------------- accuracy target


@pytest.mark.fullsize
def test_ptc01_gain_and_a00_within_targets():
    """Full PTC01 volume (92 frames, 46 pairs) of one full-size quadrant through the family's
    two stages: gain within 0.5 % (exponential and full-covariance fits), a00 within 10 %, the
    curve ending near saturation (full well or ADC, whichever is reached first)."""
    from services.sim.physics import DetectorModel, PhysicsConfig

    model = DetectorModel(PhysicsConfig(bf_a00=-1.5e-6), seed=11)
    ccd, q = "CCD2", "G"
    exps = sim_exposures(model, ccd, q, PTC01_FLUENCES, PTC01_FRAMES)
    out = run_inprocess(FAMILY, exps, TestRun.of("PTC01", "SIM"), calib=Calibrations())
    truth = model.truth[ccd].quadrants[q]
    r = out.results[ccd][q]
    assert r["n_pairs"] == 46 and r["fit_ok"]
    # only pairs with saturated pixels (ADC or full well) fail the normality test
    sat = min(truth.full_well_adu, 65535 - truth.offset_adu)
    pairs = out.frames  # per-frame rows
    assert len(pairs) == 92
    assert abs(r["gain"] / truth.gain_e_per_adu - 1) < 0.005
    assert abs(r["gain_full"] / truth.gain_e_per_adu - 1) < 0.005
    assert r["gain_err"] / r["gain"] < 0.005
    assert abs(r["a00"] / truth.bf.a00 - 1) < 0.10
    assert abs(r["a10_full"] / truth.bf.a10 - 1) < 0.15 and abs(r["a01_full"] / truth.bf.a01 - 1) < 0.15
    # saturation (full well or ADC): turnoff below it, the curve ends at the first limit reached
    assert r["turnoff_adu"] < sat
    assert r["saturation_limit"] in ("full_well", "adc")
    assert 0.85 * sat < r["saturation_adu"] <= 1.01 * sat
    assert r["adc_saturation_adu"] == pytest.approx(65535 - truth.offset_adu, abs=1.0)
    assert r["ron_ove_adu"] == pytest.approx(truth.ron_adu, rel=0.03)
    assert abs(r["her"]) < 1.5e-3 and r["her_ok"]
    assert r["n_fit"] >= 35
    # the provided calibrations: the gain and the covariance dataset
    assert out.provides["gain"]["values"]["gain"][ccd][q] == r["gain"]
    assert out.provides["ptc_covariances"]["files"] == {"ALL": "ptc_covariances.fits"}
