"""MOT_WARM (issue 13): the 8 frames recognised by their register values (also when shuffled),
against the simulator's truth (one quadrant simulated, the others read noise only)."""

from __future__ import annotations

import numpy as np
import pytest

from services.analyzer import extractions as X
from services.analyzer.families.warm import FAMILY, WarmExtraction, WarmParams, frame_kind
from services.analyzer.family import Calibrations, ExposureFrames, TestRun, run_inprocess
from services.analyzer.model import FrameMeta
from services.sim.campaign import test_frames as catalogue_frames
from services.sim.frames import exposure_conditions
from services.sim.frames import frame_kind as sim_kind
from services.sim.injection import injection_level_adu
from services.sim.physics import REFERENCE_GAIN, DetectorModel, PhysicsConfig, readout
from shared.flags import Flag
from shared.geometry import Geometry, assemble
from shared.refdata import chamber_profile

CHAMBER = "CHAMBER_A_JUN18"
Q = "G"  # injects well at MOT_WARM's default injection delay


def _exposures(model, keep=None):
    frames, _ = catalogue_frames(["MOT_WARM"], CHAMBER)
    chamber = chamber_profile(CHAMBER)
    regs_list = [f.registers() for f in frames][:keep]
    store, out = {}, []
    for obsid, regs in enumerate(regs_list, start=1):
        exp = exposure_conditions(regs, sim_kind(regs), chamber)
        quads = {Q: model.simulate_quadrant("CCD1", Q, exp, model.rng("w", obsid), Geometry()).data}
        for q in ("E", "F", "H"):
            t = model.truth["CCD1"].quadrants[q]
            quads[q] = readout(None, t.offset_adu, t.ron_analog_adu, model.rng("n", obsid, q), Geometry())
        store[obsid] = np.clip(np.rint(assemble(quads, Geometry())), 0, 65535).astype(np.float32)
        meta = FrameMeta(obsid=obsid, ccd=1, path=f"/mem/{obsid}", test="MOT_WARM", exptime=float(regs["exptime"]), values=dict(regs))
        out.append(ExposureFrames.from_frames([meta], "BORN", loader=lambda m: store[m.obsid]))
    return out, regs_list


def test_mot_warm_frames_by_registers_and_values_against_truth():
    model = DetectorModel(PhysicsConfig(), "BORN", seed=51)
    exposures, regs = _exposures(model)
    kinds = [frame_kind(r) for r in regs]
    assert kinds == ["bias_rwd_bas_v", "bias_rwd_bas_s", "ramp", "injection", "flat", "point", "point", "point"]
    # recognised by registers, not by position: shuffle the ObsIDs' registers
    shuffled = [exposures[i] for i in (7, 2, 5, 0, 4, 6, 3, 1)]
    for new_id, e in enumerate(shuffled, start=101):
        e.obsid = new_id
    out = run_inprocess(FAMILY, shuffled, TestRun.of("MOT_WARM", "BORN"))
    r = out.results["CCD1"][Q]
    t = model.truth["CCD1"].quadrants[Q]
    assert r["reason"] == "" and not (Flag.MISSDATA in Flag(out.flags))
    assert set(r["ron_adu"]) == {"rwd_bas_v", "rwd_bas_s", "fwd_bas"}
    for mode in r["ron_adu"]:
        assert r["ron_adu"][mode] == pytest.approx(t.ron_adu, rel=0.05)
        assert r["offset_adu"][mode] == pytest.approx(t.offset_adu, abs=0.2)
    cfg = model.config
    assert r["ramp_slope_adu_per_row"] == pytest.approx(cfg.ramp_slope_adu_per_row * (1 + cfg.ramp_nl_pct / 100), rel=0.01)
    assert r["ramp_nl_max_pct"] == pytest.approx(cfg.ramp_nl_pct / 6, rel=0.1)  # a quadratic's largest departure from its line
    level = injection_level_adu(regs[3], Q, 1, t.injection)
    assert r["injection_adu"] == pytest.approx(level, rel=0.05)
    expected_flat = float(regs[4]["exptime"]) / chamber_profile(CHAMBER)["tFWC_flat"]["nm800"] * 65536 * REFERENCE_GAIN / t.gain_e_per_adu
    assert r["flat_fluence_adu"] == pytest.approx(expected_flat, rel=0.05)
    assert r["n_spots"] == 5 and len(r["n_spots_by_wave"]) == 3
    assert abs(r["her"]) < 1.5e-3 and r["her_ok"]  # no serial CTI simulated by default
    assert out.results["CCD1"]["E"]["n_spots"] == 0 and Flag.STARS_MISSING in Flag(out.flags)


def test_mot_warm_missing_frames_are_said_and_extractions_round_trip():
    model = DetectorModel(PhysicsConfig(), "BORN", seed=52)
    exposures, _ = _exposures(model, keep=3)
    out = run_inprocess(FAMILY, exposures, TestRun.of("MOT_WARM", "BORN"))
    r = out.results["CCD1"][Q]
    assert Flag.MISSDATA in Flag(out.flags) and "flat: 0 of 1" in r["reason"] and r["flat_fluence_adu"] is None
    assert r["ramp_slope_adu_per_row"] is not None and set(r["ron_adu"]) == {"rwd_bas_v", "rwd_bas_s"}
    ext = FAMILY.run_extraction((exposures[2],), Calibrations(), WarmParams())
    back = X.loads(X.dumps(ext), WarmExtraction)
    assert back.kind == "ramp" and back.quads == ext.quads
