"""BF01 analysis: a-matrix from PTC pairs, kernel, PSF broadening at half well."""

from __future__ import annotations

import numpy as np
import pytest

from services.analyzer.analysis import bf
from services.analyzer.analysis.common import FrameInput
from shared.fitsio import to_uint16
from shared.geometry import Geometry

T_FWC = 4.0


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


@pytest.mark.fullsize
def test_bf01_a_matrix_and_psf_growth_from_simulated_ptc():
    """4 frames at each PTC01 fluence up to 90 % (16 pairs) of one full-size quadrant: a00, a10,
    a01 of the full covariance fit and the half-well FWHM growth versus truth."""
    from services.sim.physics import FULL_SCALE_ADU, REFERENCE_GAIN, DetectorModel, Exposure, PhysicsConfig

    model = DetectorModel(PhysicsConfig(bf_a00=-1.5e-6, bf_anisotropy=1.5), seed=41)
    ccd, q = "CCD1", "F"
    geo = Geometry()
    flux = FULL_SCALE_ADU * REFERENCE_GAIN / T_FWC
    frames, k = [], 0
    for frac in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9):
        for _ in range(4):
            k += 1

            def load(k=k, t=frac * T_FWC):
                res = model.simulate_quadrant(ccd, q, Exposure(kind="flat", exptime=t, flux_e_per_s=flux), model.rng("bf", k), geo)
                return {q: to_uint16(res.data).astype(np.float32)}

            frames.append(FrameInput(quads=load, exptime=frac * T_FWC, obsid=k, ccd=ccd, wave=800))
    an = bf.analyse_bf(frames, quadrants=[q])
    r = an.quads[ccd][q].result
    t = model.truth[ccd].quadrants[q]
    assert r.fit_ok and r.n_pairs == 16
    assert abs(r.a00 / t.bf.a00 - 1) < 0.10
    assert abs(r.a10 / t.bf.a10 - 1) < 0.15 and abs(r.a01 / t.bf.a01 - 1) < 0.15
    assert abs(r.gain / t.gain_e_per_adu - 1) < 0.01
    a_true = np.zeros((6, 6))
    a_true[0, 0], a_true[1, 0], a_true[0, 1] = t.bf.a00, t.bf.a10, t.bf.a01
    expect = bf.spot_broadening(a_true, t.gain_e_per_adu, bf.BFParams())
    assert r.fwhm_y_growth_pct == pytest.approx(expect["fwhm_y_growth_pct"], rel=0.2)
    assert r.fwhm_x_growth_pct == pytest.approx(expect["fwhm_x_growth_pct"], rel=0.2)
    assert r.ellipticity_growth < 0
    qa = an.quads[ccd][q]
    assert qa.cov_maps.shape == (int(np.sum(qa.mu > 0)), 6, 6) and qa.cov_maps.shape[0] >= 14 and qa.kernel.shape == (65, 65)
    # normalised nearest-neighbour covariance grows with fluence (BF)
    rho = qa.cov_maps[:, 1, 0] / qa.cov_maps[:, 0, 0]
    order = np.argsort(qa.mu)
    assert rho[order][-1] > 3 * rho[order][2] > 0
