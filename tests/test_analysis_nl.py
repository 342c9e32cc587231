"""NL01/02 analysis: drift correction from stability frames, background, non-linearity curve.
Target: a 1 % quadratic non-linearity recovered within 0.1 % (absolute) over 0.5-90 % of full
well (fast tests on fluence arrays; one full-size test on simulated frames)."""

from __future__ import annotations

import numpy as np
import pytest

from services.analyzer.analysis import nl
from services.analyzer.analysis.common import FrameInput
from shared.fitsio import to_uint16
from shared.geometry import Geometry

FULL = 65536.0
T_FWC = 4.0
NL_FLUENCES = [0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 85.0, 90.0, 95.0, 100.0, 110.0]


def _sequence(frames_per_fluence=4, nd_below=0.0, n_background=3):
    """(percent, comment, wave) of the NL script: background, then STAB + FLU per fluence, STAB."""
    seq = [(1.0, "BGD", 4)] * n_background
    for f in NL_FLUENCES:
        seq.append((50.0, "STAB", 4))
        seq += [(f, "FLU", 6 if f < nd_below else 4)] * frames_per_fluence
    seq.append((50.0, "STAB", 4))
    return seq


def _synthetic(beta, drift_per_h=0.03, background=2.0, nd_below=0.0, rel_noise=2e-5, roles=True, seed=0):
    """FrameInputs (no pixels) and the fluences the quadrant would show."""
    rng = np.random.default_rng(seed)
    rate = {4: FULL / T_FWC, 6: FULL / (8 * T_FWC)}  # the ND filter is 8x slower
    frames, flu = [], []
    t = 0.0
    for k, (pct, c, wave) in enumerate(_sequence(nd_below=nd_below)):
        et = pct / 100 * T_FWC * (8 if wave == 6 else 1)
        s = 0.0 if c == "BGD" else rate[wave] * et * (1 + drift_per_h * t / 3600)
        f = s * (1 + beta * s) + background
        f = min(f, 62000.0)
        flu.append(f * (1 + rel_noise * rng.standard_normal()) + 0.02 * rng.standard_normal())
        meta = {"comments": c} if roles else {}
        frames.append(FrameInput(quads={}, exptime=et, obsid=k + 1, ccd="CCD1", wave=wave, time=t, meta=meta))
        t += et + 93.5
    return frames, np.array(flu)


def _check_curve(result, beta, lo=0.005 * FULL, hi=0.9 * FULL, tol=0.1):
    grid = np.linspace(lo, hi, 200)
    err = nl.nl_at(result, grid) - 100 * beta * grid
    assert np.max(np.abs(err)) < tol, np.max(np.abs(err))
    return float(np.max(np.abs(err)))


@pytest.mark.parametrize("nd_below", [0.0, 20.0])
def test_nl_curve_drift_and_background(nd_below):
    beta = 0.01 / (0.9 * FULL)  # 1 % at 90 % of full scale
    frames, flu = _synthetic(beta, nd_below=nd_below)
    pile = np.where(flu >= 61999.0, 1.0, 0.0)
    a = nl.analyse_nl_quadrant(frames, flu, pile, "CCD1", "E", nl.NLParams())
    r = a.result
    assert r.fit_ok and r.n_stability == 22 and r.n_background == 3
    assert r.background_adu == pytest.approx(2.0, abs=0.05)
    assert r.drift_pct == pytest.approx(3.0 * (a.frames[-1].time_s - a.frames[3].time_s) / 3600, rel=0.05)
    err = _check_curve(r, beta, tol=0.02)
    assert err < 0.02
    assert r.max_nl_pct == pytest.approx(100 * beta * r.max_nl_fluence_adu, abs=0.02)
    assert r.max_nl_fluence_adu > 0.85 * FULL
    assert len(r.rates_adu_s) == (2 if nd_below else 1)
    # per-frame NL of fitted frames close to truth
    for fr in a.frames:
        if fr.fitted:
            assert fr.nl_pct == pytest.approx(100 * beta * fr.fluence_lin_adu, abs=0.02)


def test_nl_without_roles_and_without_drift_correction_is_worse():
    beta = -0.012 / FULL
    frames, flu = _synthetic(beta, drift_per_h=0.04, roles=False)
    pile = np.where(flu >= 61999.0, 1.0, 0.0)
    a = nl.analyse_nl_quadrant(frames, flu, pile, "CCD1", "E", nl.NLParams())
    assert a.result.n_stability == 26  # the most repeated exposure time (22 STAB + 4 at 50 %)
    assert a.result.n_background == 3  # below background_max_adu
    _check_curve(a.result, beta, tol=0.02)
    # same data, stability frames unknown: the 4 %/h drift is not removed and NL is wrong
    b = nl.analyse_nl_quadrant(frames, flu, pile, "CCD1", "E", nl.NLParams(stability_exptime=999.0))
    assert b.result.n_stability == 0
    grid = np.linspace(0.005, 0.9, 50) * FULL
    assert np.max(np.abs(nl.nl_at(b.result, grid) - 100 * beta * grid)) > 0.1


def test_nl_linear_detector_gives_zero():
    frames, flu = _synthetic(0.0)
    a = nl.analyse_nl_quadrant(frames, flu, np.where(flu >= 61999.0, 1.0, 0.0), "CCD1", "E", nl.NLParams())
    assert abs(a.result.max_nl_pct) < 0.01


@pytest.mark.fullsize
def test_nl01_simulated_frames_recover_one_percent():
    """One full-size quadrant, the NL01 script with 1 frame per fluence (46 frames), 1 % NL at
    90 % of 2^16 ADU, 2 %/h source drift: NL within 0.1 % over 0.5-90 % of full well."""
    from services.sim.physics import FULL_SCALE_ADU, REFERENCE_GAIN, DetectorModel, Exposure, PhysicsConfig

    model = DetectorModel(PhysicsConfig(nl_pct=1.0, nl_at_fraction=0.9, drift_pct_per_hour=2.0), seed=31)
    ccd, q = "CCD3", "H"
    geo = Geometry()
    flux = FULL_SCALE_ADU * REFERENCE_GAIN / T_FWC
    frames, t = [], 0.0
    for k, (pct, c, _) in enumerate(_sequence(frames_per_fluence=1)):
        et = pct / 100 * T_FWC
        on = c != "BGD"

        def load(k=k, et=et, on=on, t=t):
            e = Exposure(kind="flat" if on else "bias", exptime=et, flux_e_per_s=flux * (1 + 0.02 * t / 3600) * on)
            return {q: to_uint16(model.simulate_quadrant(ccd, q, e, model.rng("nl", k), geo).data).astype(np.float32)}

        frames.append(FrameInput(quads=load, exptime=et, obsid=k + 1, ccd=ccd, wave=800, time=t, meta={"comments": c}))
        t += et + 93.5
    an = nl.analyse_nl(frames, quadrants=[q])
    r = an.quads[ccd][q].result
    truth = model.truth[ccd].quadrants[q]
    assert r.fit_ok and r.n_stability == 22
    full_well = min(FULL, truth.full_well_adu, 65535 - truth.offset_adu)
    _check_curve(r, truth.nl.beta_per_adu, lo=0.005 * full_well, hi=0.9 * full_well, tol=0.1)
    assert r.max_nl_pct == pytest.approx(100 * truth.nl.beta_per_adu * r.max_nl_fluence_adu, abs=0.1)
    stab_t = [f.time_s for f in an.quads[ccd][q].frames if f.role == "stability"]
    assert r.drift_pct == pytest.approx(2.0 * (max(stab_t) - min(stab_t)) / 3600, rel=0.1)
