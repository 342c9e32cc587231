"""Charge injection and trap pumping in the simulator (families.md): injected lines and the
well-injected half from the registers, the per-quadrant injection response, and dipoles made
by the recorded trap population in pumped frames only."""

from __future__ import annotations

import numpy as np
import pytest

from services.sim import injection as inj
from services.sim.physics import DetectorModel, Exposure, PhysicsConfig
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, Geometry

PUMP = {"chinj": 1, "chinj_on": 2066, "chinj_of": 0, "IDL": 11, "IDH": 18, "id_wid": 100, "id_dly": 1250, "toi_ch": 1000,
        **{f"IG1_{c}_{s}": 4 for c in (1, 2, 3) for s in "TB"}, "IG2_T": 6, "IG2_B": 6, "v_tp_cnt": 5000}


def test_lines_half_and_response():
    lines = inj.injected_lines({"chinj_on": 30, "chinj_of": 100, "vstart": 0})
    assert lines[:30].all() and not lines[30:130].any() and lines[130:160].all()
    assert inj.well_injected({"id_dly": 1250, "toi_ch": 500}) == ("E", "F")  # ratio 2.5
    assert inj.well_injected({"id_dly": 750, "toi_ch": 500}) == ("G", "H")  # ratio 1.5
    truth = inj.InjectionTruth(dx_threshold_v=0.1, dx_notch_v=-0.1, slope_adu_per_v=6200.0)
    v = {"IDL": 11, "IG2_T": 6, "id_wid": 100}
    above = inj.injection_level_adu({**v, "IG1_1_T": 4.0}, "E", 1, truth)
    assert above == pytest.approx(600 + 6200 * (5.9 - 4.0), rel=5e-3)  # expit(15 x 0.4) = 0.9975
    assert inj.injection_level_adu({**v, "IG1_1_T": 6.5}, "E", 1, truth) == pytest.approx(600, rel=1e-3)  # above the notch
    assert inj.injection_level_adu({**v, "IG1_1_T": 3.0}, "E", 1, truth) < 10  # below the threshold 3.6 V


def test_vertical_pumping_makes_dipoles_at_the_recorded_traps():
    model = DetectorModel(PhysicsConfig(traps_vertical=300, traps_serial=0), "BORN", seed=11)
    q, truth = "G", model.truth["CCD1"]
    gain = truth.quadrants[q].gain_e_per_adu
    ref = model.simulate_quadrant("CCD1", q, Exposure(kind="chinj", values={**PUMP, "v_tpump": 0}), model.rng("r"), Geometry())
    pumped = model.simulate_quadrant("CCD1", q, Exposure(kind="chinj", values={**PUMP, "v_tpump": 1, "v_tpmod": 123, "toi_tp": 1000}),
                                     model.rng("p"), Geometry())
    assert pumped.info["v_traps_pumped"] == sum(inj.vertical_polarity(123, t.phase) is not None for t in truth.vertical_traps[q])
    diff = (pumped.data - ref.data)[:IMAGE_ROWS, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS]
    measured, expected, unpumped = [], [], []
    for t in truth.vertical_traps[q]:
        pol = inj.vertical_polarity(123, t.phase)
        amp = 5000 * inj.vertical_probability(1000, t.tau_us, t.pc) / gain  # ADU
        if pol is None:
            unpumped.append((diff[t.y - 1, t.x] - diff[t.y + 1, t.x]) / 2)
            continue
        dest = t.y - 1 if pol == "S" else t.y + 1
        measured.append((diff[dest, t.x] - diff[t.y, t.x]) / 2)
        expected.append(amp)
    m, e = np.array(measured), np.array(expected)
    assert len(m) > 100 and float((m * e).sum() / (e * e).sum()) == pytest.approx(1.0, abs=0.08)  # dipole amplitude
    assert abs(np.mean(unpumped)) < 15 and np.std(unpumped) < 100  # traps not pumped by mode 123: no dipole
    assert np.count_nonzero(np.abs(diff) > 500) < 200  # no dipoles elsewhere


def test_serial_pumping_moves_charge_along_rows():
    model = DetectorModel(PhysicsConfig(traps_vertical=0, traps_serial=30), "BORN", seed=12)
    q, truth = "H", model.truth["CCD2"]
    values = {**PUMP, "s_tpump": 1, "s_tpmod": 23, "dwell_s": 14.3, "s_tp_cnt": 5000, "vend": 100}
    exp = Exposure(kind="chinj", values=values, vend=100)
    ref = model.simulate_quadrant("CCD2", q, Exposure(kind="chinj", values={**values, "s_tpump": 0}, vend=100), model.rng("r"), Geometry())
    res = model.simulate_quadrant("CCD2", q, exp, model.rng("s"), Geometry())
    prof = (res.data - ref.data)[:100, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS].mean(axis=0)  # row-averaged profile
    gain = truth.quadrants[q].gain_e_per_adu
    measured, expected = [], []
    for t in truth.serial_traps[q]:
        pol = inj.serial_polarity(23, t.phase)
        if pol is None:
            assert abs(prof[t.x]) < 40
            continue
        dest = t.x - 1 if pol == "W" else t.x + 1
        measured.append((prof[dest] - prof[t.x]) / 2)
        expected.append(5000 * inj.serial_probability(14.3, t.tau_us, t.pc) / gain)
    m, e = np.array(measured), np.array(expected)
    assert len(m) >= 8 and float((m * e).sum() / (e * e).sum()) == pytest.approx(1.0, abs=0.05)
