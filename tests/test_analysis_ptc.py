"""PTC01/02 analysis: pair measurement, covariances, rejection, fits, and the accuracy target
(gain within 0.5 % and a00 within 10 % of truth on a PTC01-sized data set of one quadrant,
simulated at full size with ``services.sim.physics``)."""

from __future__ import annotations

import numpy as np
import pytest

from services.analyzer.analysis import ptc
from services.analyzer.analysis.common import FrameInput, clipped_stats
from shared.fitsio import to_uint16
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, Geometry

PTC01_FLUENCES = [0.05, 0.10, 0.20, 0.30, 0.50, 0.70, 0.80, 0.90, 1.00, 1.10, 1.20]
PTC01_FRAMES = [10] * 8 + [4] * 3
T_FWC = 4.0  # s to reach 2^16 ADU at the reference gain


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
    cov, npairs = ptc.masked_covariances(img, mask, 3)
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
    assert cov[1, 0] > 0.25 and cov[0, 1] > 0.1 and cov[1, 0] > cov[0, 1]  # i = serial lag
    assert npairs[0, 0] == mask.sum()


def test_pair_counts_direct_equal_fft(monkeypatch):
    rng = np.random.default_rng(2)
    img = rng.normal(size=(64, 50))
    mask = rng.random(img.shape) > 0.05
    direct = ptc.masked_covariances(img, mask, 4)
    monkeypatch.setattr(ptc, "_pair_counts", lambda m, L: None)
    via_fft = ptc.masked_covariances(img, mask, 4)
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
    np.testing.assert_allclose(ptc.exponential_model(mu, 0.0, 3.3, 20.0), mu / 3.3 + 20.0 / 3.3**2)
    # small a00: first order mu/g + a00 mu^2
    v = ptc.exponential_model(np.array([1000.0]), -1e-9, 3.0, 0.0)[0]
    assert v == pytest.approx(1000.0 / 3.0 - 1e-9 * 1000.0**2, rel=1e-6)
    assert ptc.exponential_model(np.array([30000.0]), -2e-6, 3.3, 0.0)[0] < 30000.0 / 3.3


def test_fit_exponential_and_quadratic_on_synthetic_curve():
    g, a00, n00 = 3.25, -1.5e-6, 20.0
    texp = np.repeat(np.arange(1, 13, dtype=float), 3)
    mu = texp * 5000.0
    var = ptc.exponential_model(mu, a00, g, n00)
    rng = np.random.default_rng(4)
    err = var * np.sqrt(2.0 / 4e6)
    var = var + err * rng.standard_normal(var.size)
    var[-6:] = np.linspace(500, 100, 6)  # beyond the turnoff: variance collapses
    var[10] *= 1.05  # one outlier
    ex = ptc.fit_exponential(mu, var, err, texp)
    assert ex.success
    assert ex.gain == pytest.approx(g, rel=1e-3)
    assert ex.a00 == pytest.approx(a00, rel=0.03)
    assert not ex.kept[10] and not ex.kept[-6:].any()
    assert ex.turnoff_adu == pytest.approx(mu[-7])
    quad = ptc.fit_quadratic(mu, var, err, ex.kept)
    assert abs(quad["gain_quad"] / g - 1) > 0.003  # the plain quadratic is biased by BF


def test_full_covariance_model_matches_fourier_exponential():
    """Eq. 20 is the expansion of C(k) = (exp(2 a(k) x) - 1) / (2 a(k)): check it against the
    exact Fourier-domain covariance at a moderate fluence (4th-order truncation)."""
    r, g = 4, 3.3
    a = np.zeros((r, r))
    a[0, 0], a[1, 0], a[0, 1], a[1, 1] = -1e-6, 2e-7, 3e-7, 2e-8
    size = 64
    fa = np.fft.fft2(ptc._symmetric_plane(a, size)).real
    mu = 20000.0
    x = mu * g
    ck = np.expm1(2 * fa * x) / (2 * fa)
    exact = np.fft.ifft2(ck).real[:r, :r] / g**2
    model = ptc.full_covariance_model(np.array([mu]), a, np.zeros((r, r)), np.zeros((r, r)), g)[0]
    assert np.max(np.abs(model - exact)) / exact[0, 0] < 2e-5
    assert model[1, 0] == pytest.approx(a[1, 0] * x**2 / g**2, rel=0.1)


def test_find_bloom_and_lower_limit():
    p = ptc.PTCParams()
    mu = np.array([1e4, 2e4, 3e4, 4e4, 5e4, 6e4])
    model = mu / 3.3
    err = model * 1e-3
    var = model.copy()
    level, lower = ptc.find_bloom(mu, var, model, err, mu, p)
    assert lower and level == 6e4
    var[4:] *= 0.5
    level, lower = ptc.find_bloom(mu, var, model, err, mu, p)
    assert not lower and level == 5e4
    var = model.copy()
    var[2] *= 0.5  # a single low point is not blooming
    assert ptc.find_bloom(mu, var, model, err, mu, p)[1]


def test_pair_frames_groups_by_exptime_in_obsid_order():
    frames = [FrameInput(quads={}, exptime=t, obsid=i, ccd=c) for i, (t, c) in enumerate(
        [(1.0, "CCD1"), (2.0, "CCD1"), (1.0, "CCD1"), (1.0, "CCD1"), (2.0, "CCD1"), (1.0, "CCD2"), (1.0, "CCD2"), (1.0, "CCD1")])]
    pairs = ptc.pair_frames(frames)
    assert sorted(pairs) == sorted([(0, 2), (3, 7), (1, 4), (5, 6)])


def test_measure_pair_rejects_mismatch_and_non_gaussian_pairs():
    rng = np.random.default_rng(5)
    p = ptc.PTCParams(max_lag=2)
    q1 = _gaussian_quad(rng, 20000.0)
    q2 = _gaussian_quad(rng, 20000.0)
    good = ptc.measure_pair(q1, q2, p)
    assert not good.rejected and good.ks_p > 0.01
    assert good.var == pytest.approx(20000.0 / 3.3 + 1.4**2 + 1 / 12, rel=0.01)
    assert abs(good.cov[1, 0]) < 0.01 * good.var and abs(good.cov[0, 1]) < 0.01 * good.var
    bright = _gaussian_quad(rng, 23000.0)
    bad = ptc.measure_pair(q1, bright, p)
    assert bad.rejected and "mismatch" in bad.reason
    # same variance, Laplace-distributed: not Gaussian
    s = np.sqrt(20000.0 / 3.3)
    lap = _gaussian_quad(rng, 20000.0, noise=lambda shape: rng.laplace(0.0, s / np.sqrt(2), shape))
    lap2 = _gaussian_quad(rng, 20000.0, noise=lambda shape: rng.laplace(0.0, s / np.sqrt(2), shape))
    ng = ptc.measure_pair(lap, lap2, p)
    assert ng.rejected and "non-Gaussian" in ng.reason and ng.ks_p < 0.01


# ----------------------------------------------------------------------------- accuracy target


def _ptc01_frames(model, ccd, q, fluences=PTC01_FLUENCES, nframes=PTC01_FRAMES):
    """Lazily simulated PTC01 flats of one quadrant (simulated when the analysis loads them)."""
    from services.sim.physics import FULL_SCALE_ADU, REFERENCE_GAIN, Exposure

    geo = Geometry()
    flux = FULL_SCALE_ADU * REFERENCE_GAIN / T_FWC
    frames, k = [], 0
    for frac, n in zip(fluences, nframes):
        for _ in range(n):
            k += 1

            def load(k=k, t=frac * T_FWC):
                res = model.simulate_quadrant(ccd, q, Exposure(kind="flat", exptime=t, flux_e_per_s=flux), model.rng("ptc", k, ccd, q), geo)
                return {q: to_uint16(res.data).astype(np.float32)}

            frames.append(FrameInput(quads=load, exptime=frac * T_FWC, obsid=k, ccd=ccd, wave=800))
    return frames


@pytest.mark.fullsize
def test_ptc01_gain_and_a00_within_targets():
    """Full PTC01 volume (92 frames, 46 pairs) of one full-size quadrant: gain within 0.5 %
    (exponential and full-covariance fits), a00 within 10 %, blooming found near full well."""
    from services.sim.physics import DetectorModel, PhysicsConfig

    model = DetectorModel(PhysicsConfig(bf_a00=-1.5e-6), seed=11)
    ccd, q = "CCD2", "G"
    an = ptc.analyse_ptc(_ptc01_frames(model, ccd, q), quadrants=[q])
    truth = model.truth[ccd].quadrants[q]
    r = an.quads[ccd][q].result
    assert r.n_pairs == 46 and r.fit_ok
    # only pairs with saturated pixels (ADC or full well) fail the normality test
    pairs = an.quads[ccd][q].pairs
    assert all(m.sat_frac > 0.01 or m.mu > 0.95 * min(truth.full_well_adu, 65535 - truth.offset_adu) for m in pairs if m.rejected)
    assert abs(r.gain / truth.gain_e_per_adu - 1) < 0.005
    assert abs(r.gain_full / truth.gain_e_per_adu - 1) < 0.005
    assert r.gain_err / r.gain < 0.005
    assert abs(r.a00 / truth.bf.a00 - 1) < 0.10
    assert abs(r.a10_full / truth.bf.a10 - 1) < 0.15 and abs(r.a01_full / truth.bf.a01 - 1) < 0.15
    # saturation (full well or ADC): turnoff below it, blooming at the first fluence reaching it
    sat = min(truth.full_well_adu, 65535 - truth.offset_adu)
    assert r.turnoff_adu < sat
    assert not r.bloom_is_lower_limit
    assert 0.85 * sat < r.bloom_adu <= 1.01 * sat
    assert r.ron_ove_adu == pytest.approx(truth.ron_adu, rel=0.03)
    assert abs(r.her) < 1.5e-3
    assert r.n_fit >= 35
