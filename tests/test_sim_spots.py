"""Simulator point sources, optical crosstalk and persistence (issue 13): the pure models and
one run of the Simulator (a saturating point-source exposure followed by a dark)."""

from __future__ import annotations

import json
import math
from datetime import datetime

import numpy as np
import pytest

from services.sim import persistence as simpersist
from services.sim import spots
from services.sim.frames import FrameSpec
from services.sim.physics import shot_noise_sparse
from services.sim.runner import SimOptions, Simulator
from shared.campaign import get_test
from shared.fitsio import read_frame
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, QUADRANTS, Geometry, quadrant


def test_spot_profile_focus_law_and_brighter_fatter():
    assert spots.fwhm_optical(1.5, 86.0, 86.0) == 1.5
    assert spots.fwhm_optical(1.5, 86.2, 86.0) == pytest.approx(1.5 * math.sqrt(2))
    p0 = spots.spot_profile(1.5, 0.05, 0.0, 1e5)
    assert p0["fwhm_px"] == pytest.approx(spots.pixel_fwhm(1.5)) and p0["fwhm_x_px"] > p0["fwhm_px"] > p0["fwhm_y_px"]
    assert math.sqrt((p0["fwhm_x_px"] ** 2 + p0["fwhm_y_px"] ** 2) / 2) == pytest.approx(p0["fwhm_px"])
    p = spots.spot_profile(1.5, 0.05, 0.015, 1e5)  # self-consistent: F = F0 + k A / 1e4
    assert p["fwhm_px"] == pytest.approx(p0["fwhm_px"] + 0.015 * p["amplitude_adu"] / 1e4, rel=1e-9)
    rs, cs, stamp = spots.elliptical_stamp((100, 100), 50.1, 49.9, p["sigma_x"], p["sigma_y"], 1000.0)
    assert stamp.sum() == pytest.approx(1000.0, rel=1e-4)


def test_spot_positions_are_separated_and_inside():
    pos = spots.draw_positions(np.random.default_rng(5))
    assert pos.shape == (12, 5, 2)
    flat = pos.reshape(-1, 2)
    d = np.hypot(*(flat[:, None, :] - flat[None, :, :]).transpose(2, 0, 1))
    assert d[~np.eye(60, dtype=bool)].min() >= spots.SPOT_SEPARATION_PX
    assert flat[:, 0].min() >= 199 and flat[:, 0].max() <= IMAGE_COLS - 200 and flat[:, 1].max() <= IMAGE_ROWS - 200
    assert np.abs(flat - np.round(flat)).max() <= spots.SUBPIXEL_JITTER + 1e-9


def test_persistence_excess_and_sparse_shot_noise():
    t = simpersist.PersistenceTruth(rate0_e_per_s=0.3, tau_s=600.0)
    assert simpersist.excess_e(t, 100, 665) == pytest.approx(0.3 * 600 * (math.exp(-100 / 600) - math.exp(-665 / 600)))
    assert simpersist.excess_e(t, -10, -1) == 0.0
    lam = np.full((500, 500), 0.4, np.float32)
    lam[100:110, 100:110] = 50.0
    dev = shot_noise_sparse(lam, np.random.default_rng(2))
    n = dev + lam
    assert np.allclose(n, np.rint(n), atol=1e-4) and n.min() >= 0  # whole electrons
    assert dev[200:].var() == pytest.approx(0.4, rel=0.02) and dev[100:110, 100:110].var() == pytest.approx(50, rel=0.3)


def test_runner_persistence_and_crosstalk_logic(tmp_path):
    """The runner's point-frame effects on a few quadrants (CCD1 E and F): crosstalk at the same
    canonical position, the saturation mask, and the excess it leaves in the next dark."""
    from services.sim.frames import exposure_conditions, frame_kind

    cols = {c.values["comments"]: c.values for c in get_test("PERSIST01").script(chamber="CHAMBER_B_BORN").columns}
    sim = Simulator(SimOptions(out=tmp_path, block="BORN", seed=7, chamber="CHAMBER_B_BORN"))
    model = sim.model
    t0 = datetime(2026, 12, 1, 10)
    regs = FrameSpec(test="PERSIST01", values=cols["SATUR"]).registers()
    exp = exposure_conditions(regs, frame_kind(regs), sim.chamber)
    parts = {"CCD1": ({}, {})}
    for q in ("E", "F"):
        res = model.simulate_quadrant("CCD1", q, exp, model.rng("x", q), Geometry())
        parts["CCD1"][0][q], parts["CCD1"][1][q] = res.data, res.info
    before = parts["CCD1"][0]["F"].copy()
    sim._point_effects(parts, exp, t0)
    c = model.crosstalk["CCD1.E"]["CCD1.F"]
    src = parts["CCD1"][0]["E"] - model.truth["CCD1"].quadrants["E"].offset_adu
    ok = (src > 5000) & (parts["CCD1"][0]["E"] < 60000)
    ok[:, :PRESCAN_COLS] = False
    added = (parts["CCD1"][0]["F"] - before)[ok]
    assert np.allclose(added, c * src[ok], rtol=1e-3, atol=1e-3)
    n_sat = parts["CCD1"][1]["E"]["n_saturated"]
    assert n_sat == simpersist.saturated_indices(parts["CCD1"][0]["E"]).size > 0.002 * IMAGE_ROWS * IMAGE_COLS
    dregs = FrameSpec(test="PERSIST01", values=cols["LATENT"]).registers()
    dark = exposure_conditions(dregs, frame_kind(dregs), sim.chamber)
    t1 = datetime(2026, 12, 1, 10, 12)
    t_mid = sim._persistence_for(dark, t1)
    idx, e_px = dark.persistence[("CCD1", "E")]
    pt = model.truth["CCD1"].persistence["E"]
    gap = (t1 - t0).total_seconds() - exp.exptime
    assert e_px == pytest.approx(simpersist.excess_e(pt, gap, gap + dark.exptime)) and idx.size == n_sat
    assert t_mid[("CCD1", "E")] == pytest.approx(gap + dark.exptime / 2) and ("CCD1", "G") not in dark.persistence
    res = model.simulate_quadrant("CCD1", "E", dark, model.rng("d"), Geometry())
    img = res.data[:IMAGE_ROWS, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS].reshape(-1)
    inside = np.zeros(img.size, bool)
    inside[idx] = True
    assert float(np.median(img[inside]) - np.median(img[~inside])) == pytest.approx(res.info["persistence_adu"], abs=0.5)


@pytest.mark.fullsize
def test_simulator_writes_crosstalk_truth_and_point_records(tmp_path):
    frames = [FrameSpec(test="PSF01_800", values=get_test("PSF01_800").script(chamber="CHAMBER_A_JUN18").columns[-1].values)]
    sim = Simulator(SimOptions(out=tmp_path, block="BORN", seed=7, chamber="CHAMBER_A_JUN18", start=datetime(2026, 12, 1, 10)))
    rec = sim.play(frames)[0]
    truth = json.loads((tmp_path / "truth.json").read_text())
    assert truth["crosstalk"] == sim.model.crosstalk and sum(not v for v in truth["crosstalk_requirement_met"].values()) == 3
    assert rec["kind"] == "point" and rec["mirror_mm"] == rec["mirror_nominal_mm"]
    t = truth["ccds"]["CCD2"]
    for q in QUADRANTS:
        info = rec["ccds"]["CCD2"][q]
        assert info["n_saturated"] == 0 and len(info["spots"]) == 5
        assert [s["x"] for s in info["spots"]] == t["point"]["quadrants"][q]["x"]
    # crosstalk in the written file: CCD2.F's dominant source is CCD2.E
    data = read_frame(tmp_path / rec["files"][1]).data
    e, f = quadrant(data, "E", Geometry()), quadrant(data, "F", Geometry())
    sig = e - t["quadrants"]["E"]["offset_adu"]
    ok = sig > 3000
    ok[:, :PRESCAN_COLS] = False
    excess = f[ok] - t["quadrants"]["F"]["offset_adu"]
    slope = float((excess * sig[ok]).sum() / (sig[ok] ** 2).sum())
    c = truth["crosstalk"]["CCD2.E"]["CCD2.F"]
    assert slope == pytest.approx(c, rel=0.1, abs=1e-5)
