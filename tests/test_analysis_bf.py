"""BF01 family (engine v2): a-matrix from PTC01's covariance dataset (no frame read again),
kernel, PSF broadening at half well."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.analyzer.families import bf
from services.analyzer.families.bf import FAMILY as FAMILY_BF
from services.analyzer.families.ptc import FAMILY as FAMILY_PTC
from services.analyzer.family import PTC_COVARIANCES, Calibration, Calibrations, TestRun, run_inprocess
from services.analyzer.model import ListSink
from services.analyzer.products import ProductWriter


def _a(a00=-1.5e-6, anis=1.3, r=6):
    a = np.zeros((r, r))
    a10 = -a00 / (2 * (1 + anis))
    a[0, 0], a[1, 0], a[0, 1] = a00, a10, anis * a10
    return a


def test_kernel_laplacian_equals_a():
    a = _a()
    a[2, 1] = 1e-8
    k = bf.bf_kernel(a, 33)
    lap = np.roll(k, 1, 0) + np.roll(k, -1, 0) + np.roll(k, 1, 1) + np.roll(k, -1, 1) - 4 * k
    plane = bf.symmetric_plane(a, 33)
    np.testing.assert_allclose(lap, plane - plane.mean(), atol=1e-12)
    assert k.shape == (33, 33) and k[16, 16] > 0  # a00 < 0: the kernel peaks at the centre


def test_spot_broadening_physics():
    p = bf.BFParams()
    none = bf.spot_broadening(np.zeros((6, 6)), 3.3, p)
    assert abs(none["fwhm_x_growth_pct"]) < 1e-9 and abs(none["ellipticity_growth"]) < 1e-12
    s = bf.spot_broadening(_a(), 3.3, p)
    assert s["fwhm_x_growth_pct"] > 0.3 and s["fwhm_y_growth_pct"] > s["fwhm_x_growth_pct"]  # a01 > a10
    assert s["ellipticity_growth"] < 0  # elongated along the parallel direction
    assert abs(s["kernel_residual_pct"]) < 0.05 * s["fwhm_x_growth_pct"]
    double = bf.spot_broadening(2 * _a(), 3.3, p)
    assert double["fwhm_x_growth_pct"] == pytest.approx(2 * s["fwhm_x_growth_pct"], rel=0.1)
    # charge is conserved and a flat stays flat inside
    f = np.full((25, 25), 1e5)
    q = bf.expose_spot(f, _a(), 50)
    assert q.sum() == pytest.approx(f.sum(), rel=1e-12)
    assert q[12, 12] == pytest.approx(1e5, rel=1e-9)


def test_bf01_without_the_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="ptc_covariances"):
        run_inprocess(FAMILY_BF, [], TestRun.of("BF01", "SIM"), calib=Calibrations(), extractions=[])
    cal = Calibration(name=PTC_COVARIANCES, block="SIM", test="PTC01", files={"ALL": "/nonexistent/ptc_covariances.fits"})
    with pytest.raises(ValueError, match="no such file"):
        run_inprocess(FAMILY_BF, [], TestRun.of("BF01", "SIM"), calib=Calibrations([cal]), extractions=[])


@pytest.mark.fullsize
def test_bf01_a_matrix_and_psf_growth_from_the_ptc01_dataset(tmp_path: Path):
    """4 frames at each PTC01 fluence up to 90 % (16 pairs) of one full-size quadrant: PTC01 is
    solved and writes its covariance dataset; BF01 is solved from that file alone (no frames):
    a00, a10, a01 of the full covariance fit and the half-well FWHM growth versus truth, and
    one gain for both tests."""
    from ptc_sim import sim_exposures
    from services.sim.physics import DetectorModel, PhysicsConfig

    model = DetectorModel(PhysicsConfig(bf_a00=-1.5e-6, bf_anisotropy=1.5), seed=41)
    ccd, q = "CCD1", "F"
    exps = sim_exposures(model, ccd, q, (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9), [4] * 8, tag="bf",
                         rng_key=lambda k: ("bf", k))
    writer = ProductWriter(tmp_path / "PTC01", {"block": "SIM", "test": "PTC01"}, figures=False)
    ptc = run_inprocess(FAMILY_PTC, exps, TestRun.of("PTC01", "SIM"), calib=Calibrations(), sink=writer)
    dataset = tmp_path / "PTC01" / ptc.provides[PTC_COVARIANCES]["files"]["ALL"]
    assert dataset.is_file()
    cal = Calibration(name=PTC_COVARIANCES, block="SIM", test="PTC01", values=ptc.provides[PTC_COVARIANCES]["values"],
                      files={"ALL": str(dataset)})
    sink = ListSink()
    out = run_inprocess(FAMILY_BF, [], TestRun.of("BF01", "SIM"), calib=Calibrations([cal]), extractions=[], sink=sink)
    r = out.results[ccd][q]
    t = model.truth[ccd].quadrants[q]
    assert r["fit_ok"] and r["n_pairs"] == 16
    assert abs(r["a00"] / t.bf.a00 - 1) < 0.10
    assert abs(r["a10"] / t.bf.a10 - 1) < 0.15 and abs(r["a01"] / t.bf.a01 - 1) < 0.15
    assert abs(r["gain"] / t.gain_e_per_adu - 1) < 0.01
    assert r["gain"] == ptc.results[ccd][q]["gain"]  # one gain: PTC01's (issue 11)
    a_true = np.zeros((6, 6))
    a_true[0, 0], a_true[1, 0], a_true[0, 1] = t.bf.a00, t.bf.a10, t.bf.a01
    expect = bf.spot_broadening(a_true, t.gain_e_per_adu, bf.BFParams())
    assert r["fwhm_y_growth_pct"] == pytest.approx(expect["fwhm_y_growth_pct"], rel=0.2)
    assert r["fwhm_x_growth_pct"] == pytest.approx(expect["fwhm_x_growth_pct"], rel=0.2)
    assert r["ellipticity_growth"] < 0
    covs = sink.get("bf_covariances")
    mu, cmaps = np.asarray(covs.columns["mu"]), np.asarray(covs.columns["cov"])
    assert cmaps.shape == (mu.size, 6, 6) and mu.size >= 14 and (mu > 0).all()
    kernels = sink.get(f"bf_kernels_{ccd}")
    assert kernels.extensions[f"KERNEL_{q}"].shape == (65, 65)
    # normalised nearest-neighbour covariance grows with fluence (BF)
    rho = cmaps[:, 1, 0] / cmaps[:, 0, 0]
    order = np.argsort(mu)
    assert rho[order][-1] > 3 * rho[order][2] > 0
    assert out.provides["bf_kernel"]["files"] == {ccd: f"bf_kernels_{ccd}.fits"}
    # BF01's prediction of the spot brighter-fatter slope, for PSF01 to compare with
    slope = out.provides["bf_kernel"]["values"]["fwhm_slope_px"][ccd][q]
    r = out.results[ccd][q]
    faint = np.hypot(r["fwhm_x_faint"], r["fwhm_y_faint"]) / np.sqrt(2)
    bright = np.hypot(r["fwhm_x_half"], r["fwhm_y_half"]) / np.sqrt(2)
    assert slope == pytest.approx((bright - faint) / (0.5 * 65536 / 1e4)) and slope > 0
