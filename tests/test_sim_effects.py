"""The simulator's effects that differ from the analyses' models (services/sim/effects.py):
each produces what its docstring says, and the realistic profile records them in the truth."""

from __future__ import annotations

import numpy as np
import pytest

from services.sim import effects
from services.sim.physics import DetectorModel, Exposure, PhysicsConfig
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, Geometry


def _cov(d: np.ndarray, dy: int, dx: int) -> float:
    d = d - d.mean()
    return float((d[dy:, dx:] * d[: d.shape[0] - dy, : d.shape[1] - dx]).mean())


def test_boundary_shifts_conserve_charge_and_give_first_order_covariances():
    rng = np.random.default_rng(1)
    a10, a01, mu = 2.2e-7, 2.8e-7, 50000.0
    q = effects.deposit_boundary_shifts(np.full((2000, 2000), mu, np.float32), a10, a01, rng, steps=2)
    assert q.mean() == pytest.approx(mu, rel=2e-5)  # charge conserving
    # statistical precision of each ratio ~5 % (var / sqrt(N) against a mu^2); second order lowers it a few %
    assert _cov(q, 0, 1) / (a10 * mu * mu) == pytest.approx(0.97, abs=0.15)
    assert _cov(q, 1, 0) / (a01 * mu * mu) == pytest.approx(0.97, abs=0.15)
    assert q.var() < 0.99 * mu  # the variance is reduced (brighter-fatter)
    q0 = effects.deposit_boundary_shifts(np.full((500, 500), mu, np.float32), 0.0, 0.0, rng, steps=2)
    assert abs(_cov(q0, 0, 1)) < 0.01 * mu and q0.var() == pytest.approx(mu, rel=0.02)


def test_rolloff_nonlinearity_is_the_requested_percentage():
    at = 0.9 * 65536
    s_r = effects.rolloff_for(1.0, at)
    x = np.array([at, at / 2], np.float32)
    out = effects.rolloff_nonlinearity(x.copy(), s_r)
    assert 100 * (out[0] / at - 1) == pytest.approx(-1.0, abs=1e-3)
    assert 100 * (out[1] / (at / 2) - 1) == pytest.approx(effects.rolloff_nl_pct(at / 2, s_r), abs=1e-4)
    assert -0.3 < effects.rolloff_nl_pct(at / 2, s_r) < -0.2  # a quarter of it at half: quadratic to first order only


def test_cti_trails_and_hard_edge_response():
    img = np.full((400, IMAGE_COLS), 10000.0, np.float32)
    trail = effects.serial_overscan_trail(img, 4e-7)
    out = effects.apply_cti(img.copy(), 2e-6, 4e-7)
    her = trail[0] / out[0, -1]
    assert her == pytest.approx(4e-7 * (PRESCAN_COLS + IMAGE_COLS), rel=0.01)
    assert out.sum() + trail.sum() == pytest.approx(img.sum(), rel=1e-3)  # what leaves the image is in the trails
    edge = np.zeros((50, 50), np.float32)
    edge[10, :] = 1000.0
    trailed = effects.apply_cti(edge, 1e-3, 0.0)
    assert trailed[11, 0] == pytest.approx(1000.0 * 11e-3, rel=1e-3)  # row 10 after 11 transfers


def test_adc_dnl_code_widths():
    edges = effects.dnl_table(0.1, np.random.default_rng(2), codes=4096)
    ramp = np.random.default_rng(3).uniform(100, 4000, 2_000_000)
    codes = effects.apply_dnl(ramp, edges)
    hist = np.bincount(codes.astype(int))[200:3900]
    widths = hist / hist.mean()
    assert 0.08 < widths.std() < 0.12  # the code widths' rms, measured from a uniform ramp
    assert np.all(codes == np.floor(codes))


def test_readout_dark_and_nonlinear_drift():
    rows = effects.readout_dark_rows(0.002, 0.035)
    assert rows[0, 0] == 0 and rows[-1, 0] == pytest.approx(0.002 * 0.035 * (IMAGE_ROWS - 1), rel=1e-5)
    f = [effects.drift_factor(h, 0.0, 0.3, 2.0) for h in (0.0, 0.5, 1.0, 1.5)]
    assert f[0] == 1.0 and f[1] == pytest.approx(1.003) and f[2] == pytest.approx(1.0, abs=1e-9) and f[3] == pytest.approx(0.997)
    assert effects.shutter_exposure(10.0, 0.03) == pytest.approx(10.03) and effects.shutter_exposure(0.0, 0.03) == 0.0


def test_realistic_profile_truth_and_one_quadrant():
    """One flat quadrant at 50 % with every effect on: the truth says which limit comes first,
    the serial overscan carries the CTI trail (HER ~ her_expected) and the rows carry row noise."""
    model = DetectorModel(PhysicsConfig.realistic(cosmic_rate=0.0), "BORN", seed=5)
    t = model.truth["CCD1"].quadrants["E"]
    assert t.rolloff_adu and t.nl.pct == -1.0 and t.her_expected == pytest.approx(4e-7 * 2099)
    kinds = {q.saturation_first for c in model.truth.values() for q in c.quadrants.values()}
    assert kinds == {"full_well", "adc"}  # some quadrants bloom before the ADC clips, some after
    exp = Exposure(kind="flat", exptime=27.0, flux_e_per_s=65536 * 3.2 / 54.0, dark_time=27.0, readout_time=72.0)
    res = model.simulate_quadrant("CCD1", "E", exp, model.rng("frame", 1, "CCD1", "E"), Geometry())
    quad = res.data
    assert res.info["illumination_s"] == pytest.approx(27.03)
    off = np.median(quad[:IMAGE_ROWS, 10:45])
    last = quad[:IMAGE_ROWS, PRESCAN_COLS + IMAGE_COLS - 1].mean() - off
    o1 = quad[:IMAGE_ROWS, PRESCAN_COLS + IMAGE_COLS].mean() - off
    ofar = quad[:IMAGE_ROWS, PRESCAN_COLS + IMAGE_COLS + 5:].mean() - off
    assert (o1 - ofar) / (last - ofar) == pytest.approx(t.her_expected, rel=0.2)
    pre_rows = quad[:IMAGE_ROWS, 10:45].mean(axis=1)
    white = t.ron_adu / np.sqrt(35)
    assert pre_rows.std() > 1.5 * white  # row noise (0.3 ADU) dominates the mean of 35 prescan pixels
