"""CHINJ01 / CHINJ02 (issue 12): injection statistics per frame and the curve fits against the
simulator's per-quadrant truth (threshold within 0.05 V, notch within 0.1 V, slope and amplitude
within 3 %, families.md). Frames: the nominal scripts of the catalogue through the simulator's
physics (one CCD, the real geometry, kept in memory)."""

from __future__ import annotations

import numpy as np
import pytest

from services.analyzer import extractions as X
from services.analyzer.families.chinj import FAMILY, ChinjExtraction, fit_ramp, ramp_model, ChinjParams
from services.analyzer.family import Calibrations, ExposureFrames, TestRun, run_inprocess
from services.analyzer.model import FrameMeta, ListSink
from services.sim.campaign import test_frames as catalogue_frames
from services.sim.frames import exposure_conditions, frame_kind
from services.sim.injection import well_injected
from services.sim.physics import DetectorModel, PhysicsConfig
from shared.flags import Flag
from shared.geometry import QUADRANTS, Geometry, assemble
from shared.refdata import chamber_profile

CHAMBER = "CHAMBER_A_JUN18"


def _exposures(test: str, model: DetectorModel, ccd: str = "CCD1", keep=None):
    frames, _ = catalogue_frames([test], CHAMBER)
    chamber = chamber_profile(CHAMBER)
    store: dict[int, np.ndarray] = {}
    out = []
    for obsid, spec in enumerate(frames, start=1):
        regs = spec.registers()
        if keep is not None and not keep(regs):
            continue
        exp = exposure_conditions(regs, frame_kind(regs), chamber)
        good = well_injected(regs)  # the other half is never fitted: a flat bias there keeps the test fast
        quads = {q: model.simulate_quadrant(ccd, q, exp, model.rng("f", obsid, q), Geometry()).data if q in good
                 else np.full((Geometry().quad_rows, Geometry().quad_cols), model.truth[ccd].quadrants[q].offset_adu, np.float32)
                 for q in QUADRANTS}
        store[obsid] = np.clip(np.rint(assemble(quads, Geometry())), 0, 65535).astype(np.float32)
        meta = FrameMeta(obsid=obsid, ccd=int(ccd[-1]), path=f"/mem/{obsid}.fits", test=test, values=dict(regs))
        out.append(ExposureFrames.from_frames([meta], "BORN", loader=lambda m: store[m.obsid]))
    return out


@pytest.mark.fullsize
def test_chinj01_thresholded_ramp_against_truth():
    model = DetectorModel(PhysicsConfig(), "BORN", seed=21)
    exposures = _exposures("CHINJ01", model)
    assert len(exposures) == 36
    sink = ListSink()
    out = run_inprocess(FAMILY, exposures, TestRun.of("CHINJ01", "BORN"), sink=sink)
    assert out.flags == 0 and "chinj_lines" in sink.names()
    for q in QUADRANTS:
        t = model.truth["CCD1"].quadrants[q].injection
        r = out.results["CCD1"][q]
        assert r["fit_ok"] and r["n_points"] == 18  # only the well-injected delay of each half
        assert r["ig1_threshold_v"] == pytest.approx(11 - 7.5 + t.dx_threshold_v, abs=0.05)
        assert r["ig1_notch_v"] == pytest.approx(6 + t.dx_notch_v, abs=0.1)
        assert r["slope_adu_per_v"] == pytest.approx(t.slope_adu_per_v, rel=0.03)
        assert r["floor_adu"] == pytest.approx(t.floor_adu, rel=0.03)
        assert r["ig1_threshold_v_err"] > 0 and 0.05 < r["nonuniformity_max"] < 0.5
        assert abs(r["spill_max"]) < 0.02  # no CTI in this simulation: nothing spills into the first off line


@pytest.mark.fullsize
def test_chinj02_logistic_and_a_sweep_too_short_is_flagged():
    model = DetectorModel(PhysicsConfig(), "BORN", seed=22)
    exposures = _exposures("CHINJ02", model, keep=lambda r: float(r["id_dly"]) == 1250.0)  # E, F inject well
    out = run_inprocess(FAMILY, exposures, TestRun.of("CHINJ02", "BORN"))
    for q in ("E", "F"):
        t = model.truth["CCD1"].quadrants[q].injection
        r = out.results["CCD1"][q]
        assert r["fit_ok"], r["reason"]
        assert r["idl_threshold_v"] == pytest.approx(4 + 7.5 - t.dx_threshold_v, abs=0.05)
        assert r["amplitude_adu"] == pytest.approx(600 + t.slope_adu_per_v * (6 + t.dx_notch_v - 4), rel=0.03)
    for q in ("G", "H"):  # no well-injected frame at this delay: flagged, no number
        r = out.results["CCD1"][q]
        assert not r["fit_ok"] and r["idl_threshold_v"] is None and "usable points" in r["reason"]
    assert Flag.BADFIT in Flag(out.flags)
    ext = FAMILY.run_extraction((exposures[0],), Calibrations(), ChinjParams())
    back = X.loads(X.dumps(ext), ChinjExtraction)
    assert back.quads["CCD1"]["E"].median == ext.quads["CCD1"]["E"].median
    assert np.array_equal(back.quads["CCD1"]["E"].column_profile, ext.quads["CCD1"]["E"].column_profile)


def test_ramp_fit_needs_points_and_recovers_a_noiseless_curve():
    x = np.arange(2.5, 6.76, 0.25)
    y = ramp_model(x, 3.55, 6.1, 6100.0, 600.0, 15.0, 0.0)
    fit, reason = fit_ramp(x, y + np.random.default_rng(1).normal(0, 5, x.size), ChinjParams())
    assert reason == "" and fit["ig1_threshold_v"] == pytest.approx(3.55, abs=0.01)
    assert fit["slope_adu_per_v"] == pytest.approx(6100, rel=0.005)
    fit, reason = fit_ramp(x[:4], y[:4], ChinjParams())
    assert fit is None and "needs at least" in reason
