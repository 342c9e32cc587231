"""Trap pumping (issue 12): dipoles found against the simulator's trap population (position,
polarity), tau and Pc recovered (families.md: >= 95 % of the traps above 7 x the noise found,
< 5 % false dipoles, for 90 % of the traps seen at >= 3 phase times tau within 10 % and Pc
within 20 %), and the bad inputs (no reference, unknown mode) flagged, never crashing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.analyzer import extractions as X
from services.analyzer.families.tp import FAMILY, TPExtraction, TPParams, fit_dipole, vertical_amplitude
from services.analyzer.family import Calibration, Calibrations, ExposureFrames, TestRun, run_inprocess
from services.analyzer.model import FrameMeta, ListSink
from services.sim import injection as inj
from services.sim.campaign import test_frames as catalogue_frames
from services.sim.frames import exposure_conditions, frame_kind
from services.sim.physics import DetectorModel, PhysicsConfig
from shared.flags import Flag
from shared.geometry import QUADRANTS, Geometry, assemble
from shared.refdata import chamber_profile

CHAMBER = "CHAMBER_A_JUN18"


def _exposures(test, params, model, quadrants, ccd="CCD1", drop=lambda regs: False):
    frames, _ = catalogue_frames([test], CHAMBER, params={test: params})
    chamber = chamber_profile(CHAMBER)
    store, out = {}, []
    geo = Geometry()
    for obsid, spec in enumerate(frames, start=1):
        regs = spec.registers()
        if drop(regs):
            continue
        exp = exposure_conditions(regs, frame_kind(regs), chamber)
        quads = {q: model.simulate_quadrant(ccd, q, exp, model.rng("tp", obsid, q), geo).data if q in quadrants
                 else np.full((geo.quad_rows, geo.quad_cols), model.truth[ccd].quadrants[q].offset_adu, np.float32) for q in QUADRANTS}
        store[obsid] = np.clip(np.rint(assemble(quads, geo)), 0, 65535).astype(np.float32)
        meta = FrameMeta(obsid=obsid, ccd=int(ccd[-1]), path=f"/mem/{obsid}.fits", test=test, values=dict(regs))
        out.append(ExposureFrames.from_frames([meta], "BORN", loader=lambda m: store[m.obsid]))
    return out


@pytest.fixture(scope="module")
def tp01():
    """TP01 at one injection delay (quadrant G injects well), 20000 cycles, with hot pixels and
    cosmic rays that must not be taken for dipoles."""
    model = DetectorModel(PhysicsConfig(traps_vertical=150, traps_serial=0, hot_pixels=40, cosmic_rate=0.02), "BORN", seed=31)
    # modes 123 and 234 pump every phase once (1 and 3, 2 and 4): half the frames of the full set
    exposures = _exposures("TP01", {"cycles": 20000, "id_delays": [1250.0], "modes": [123, 234]}, model, ("G",))
    gain = model.truth["CCD1"].quadrants["G"].gain_e_per_adu
    calib = Calibrations([Calibration(name="gain", block="BORN", test="PTC01", values={"gain": {"CCD1": {q: gain for q in QUADRANTS}}})])
    sink = ListSink()
    out = run_inprocess(FAMILY, exposures, TestRun.of("TP01", "BORN"), calib=calib, sink=sink)
    return model, out, sink, exposures


@pytest.mark.fullsize
def test_vertical_dipoles_found_and_fitted_against_truth(tp01):
    model, out, sink, _ = tp01
    truth = model.truth["CCD1"]
    res = out.results["CCD1"]["G"]
    noise_e = res["injection_noise_adu"] * res["gain_used"]
    cat = sink.get("TP01_dipoles").columns
    rows = [dict(zip(cat, vals)) for vals in zip(*cat.values())]
    rows = [r for r in rows if r["QUAD"] == "G"]
    tois = [50, 200, 1000, 2000, 4000, 8000]
    detectable, found, fits = 0, 0, []
    matched_rows = set()
    for t in truth.vertical_traps["G"]:
        for mode in (123, 234):
            pol = inj.vertical_polarity(mode, t.phase)
            if pol is None:
                continue
            ylow = t.y - 1 if pol == "S" else t.y
            real = [i for i, r in enumerate(rows) if r["MODE"] == mode and r["X"] == t.x and abs(r["Y"] - ylow) <= 1 and r["POLARITY"] == pol]
            matched_rows.update(real)  # a trap's dipole, detectable at 7 sigma or not, is no false dipole
            amps = [20000 * inj.vertical_probability(toi, t.tau_us, t.pc) for toi in tois]
            if max(amps) < 7 * noise_e:
                continue
            detectable += 1
            hit = real
            if hit:
                found += 1
                if sum(a > 7 * noise_e for a in amps) >= 3 and math.isfinite(rows[hit[0]]["TAU_US"]):
                    fits.append((rows[hit[0]]["TAU_US"] / t.tau_us, rows[hit[0]]["PC"] / t.pc))
    assert detectable > 30
    assert found >= 0.95 * detectable
    false = [r for i, r in enumerate(rows) if i not in matched_rows]
    assert len(false) < 0.05 * len(rows)  # hot pixels and cosmic rays are not dipoles
    good = [abs(a - 1) < 0.10 and abs(b - 1) < 0.20 for a, b in fits]
    assert len(fits) > 20 and sum(good) >= 0.9 * len(fits)
    assert res["n_dipoles"] > 0 and set(res["n_dipoles_by_mode"]) == {"123", "234"}
    assert not res["gain_is_nominal"] and not res["notes"]
    assert "reference without injection" in " ".join(out.results["CCD1"]["H"]["notes"])  # H was left uninjected here


def test_bad_inputs_are_flagged(tp01):
    model, _, _, exposures = tp01
    no_ref = [e for e in exposures if float(e.values().get("v_tpump", 0)) == 1][:3]
    out = run_inprocess(FAMILY, no_ref, TestRun.of("TP01", "BORN"))
    res = out.results["CCD1"]["G"]
    assert Flag.MISSDATA in Flag(out.flags) and Flag.UNKNOWN in Flag(out.flags)  # no reference; no PTC01 gain
    assert res["n_dipoles"] == 0 and "no unpumped reference" in " ".join(res["notes"])
    ext = FAMILY.run_extraction((exposures[1],), Calibrations(), TPParams())
    ext.quads["CCD1"]["G"].mode = 999
    ref = FAMILY.run_extraction((exposures[0],), Calibrations(), TPParams())
    out = FAMILY.solve([ref, ext], Calibrations(), TPParams(), TestRun.of("TP01", "BORN"), ListSink())
    assert "unknown pumping mode 999" in " ".join(out.results["CCD1"]["G"]["notes"])
    back = X.loads(X.dumps(ref), TPExtraction)
    assert back.quads["CCD1"]["G"].level_adu == ref.quads["CCD1"]["G"].level_adu
    assert np.array_equal(back.quads["CCD1"]["G"].row_profile, ref.quads["CCD1"]["G"].row_profile)


def test_serial_pumping_against_truth():
    model = DetectorModel(PhysicsConfig(traps_vertical=0, traps_serial=25), "BORN", seed=32)
    exposures = _exposures("TP02", {"cycles": 5000, "id_delays": [1250.0]}, model, ("G",))
    out = run_inprocess(FAMILY, exposures, TestRun.of("TP02", "BORN"))
    res = out.results["CCD1"]["G"]
    assert Flag.UNKNOWN in Flag(out.flags) and res["gain_is_nominal"]  # amplitudes with the nominal 3.5 e-/ADU
    truth = model.truth["CCD1"].serial_traps["G"]
    pumped = [t for t in truth if any(inj.serial_polarity(m, t.phase) for m in (23, 31))]
    assert res["n_dipoles"] >= 0.8 * len(pumped)
    scale = model.truth["CCD1"].quadrants["G"].gain_e_per_adu / 3.5  # Pc scales with the gain used
    assert res["tau_median_us"] == pytest.approx(np.median([t.tau_us for t in pumped]), rel=0.35)


def test_fit_bounds_in_the_right_order():
    t = np.array([50, 200, 1000, 2000, 4000, 8000.0])
    n = np.full(t.size, 20000.0)
    a = vertical_amplitude(t, n, math.log10(0.4), 1500.0)
    fit = fit_dipole(t, a, n, False, (50.0, 8000.0))
    assert fit["tau_us"] == pytest.approx(1500, rel=1e-3) and fit["pc"] == pytest.approx(0.4, rel=1e-3)


def test_modes_read_from_the_exposure_log_names(tp01):
    """The exposure log calls the modes v_tp_mod / s_tp_mod (the scripts v_tpmod / s_tpmod):
    with only the log's names a pumped frame keeps its mode (it was 'unknown mode 0')."""
    _, _, _, exposures = tp01
    pumped = next(e for e in exposures if float(e.values().get("v_tpump", 0)) == 1)
    meta = pumped.frames["CCD1"]
    values = {k: v for k, v in meta.values.items() if k != "v_tpmod"}
    values["v_tp_mod"] = meta.values["v_tpmod"]
    logged = ExposureFrames.from_frames([meta.model_copy(update={"values": values})], "BORN", loader=pumped.loader)
    ext = FAMILY.run_extraction((logged,), Calibrations(), TPParams())
    assert ext.quads["CCD1"]["G"].mode == int(meta.values["v_tpmod"]) and ext.quads["CCD1"]["G"].pumped == "v"
