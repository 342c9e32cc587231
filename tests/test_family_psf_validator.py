"""The validator's FOCUS00 / PSF01 / PERSIST01 checks (issue 13, services/validator/specific_psf.py)
on simulated frames written as FITS files and read by the validator's per-CCD work."""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pytest

from services.sim.frames import FrameSpec, exposure_conditions, explog_values, fits_header, frame_kind
from services.sim.physics import DetectorModel, PhysicsConfig, readout
from services.validator.specific import assess_test_specific
from services.validator.specific_psf import assess_point_tests, quadrant_spots
from services.validator.worker import process_ccd
from shared.campaign import get_test
from shared.fitsio import write_frame
from shared.flags import Flag
from shared.geometry import QUADRANTS, Geometry, assemble
from shared.refdata import chamber_profile

CHAMBER = "CHAMBER_A_JUN18"


def _frame(tmp_path, model, test, column, lit=True):
    chamber = chamber_profile(CHAMBER)
    script = get_test(test).script(chamber=CHAMBER)
    regs = FrameSpec(test=test, values=script.columns[column].values).registers()
    exp = exposure_conditions(regs, frame_kind(regs), chamber)
    quads = {}
    for q in QUADRANTS:
        t = model.truth["CCD1"].quadrants[q]
        quads[q] = (model.simulate_quadrant("CCD1", q, exp, model.rng("v", test, column, q), Geometry()).data if lit
                    else readout(None, t.offset_adu, t.ron_analog_adu, model.rng("n", q), Geometry()))
    values = explog_values(regs, 1, 1, 1, datetime(2026, 12, 1), "EUC_1", {})
    path = tmp_path / f"{test}_{column}_{lit}.fits"
    write_frame(path, np.clip(np.rint(assemble(quads, Geometry())), 0, 65535), 1, header=fits_header(values, regs, "BORN", 0, "point"))
    res = process_ccd(str(path), None, 0, 2086)
    assert res["ok"]
    return res, values, chamber


def test_psf01_and_focus00_frames_pass_their_checks(tmp_path):
    model = DetectorModel(PhysicsConfig(), "BORN", seed=61)
    res, row, chamber = _frame(tmp_path, model, "PSF01_800", 2)  # 50 % of full well
    for q in QUADRANTS:
        s = res["stats"][q]["spots"]
        assert s["n"] == 5 and 1.5 < s["fwhm_px"] < 2.2
    tree, flags, notes = assess_test_specific("PSF01_800", {"CCD1": res["stats"]}, {"CCD1": row}, chamber)
    assert flags == Flag(0), (tree, notes)
    assert set(tree) >= {"background", "fwhm", "peak", "spots", "spot_fwhm"}
    assert len(tree["spot_fwhm"]["CCD1"]["E"]) == 5 and all(leaf["passed"] for leaf in tree["spot_fwhm"]["CCD1"]["E"].values())
    assert all(tree["peak"]["CCD1"][q]["passed"] and 0.75 < tree["peak"]["CCD1"][q]["value"] < 1.2 for q in QUADRANTS), tree["peak"]
    res, row, chamber = _frame(tmp_path, model, "FOCUS00_800", 0)  # 0.8 mm from nominal: FWHM ~ 6-7 px
    tree, flags, _ = assess_test_specific("FOCUS00_800", {"CCD1": res["stats"]}, {"CCD1": row}, chamber)
    assert flags == Flag(0) and all(4 < tree["fwhm"]["CCD1"][q]["value"] < 10 for q in QUADRANTS)
    # the same frame under PSF01's tighter FWHM range fails
    _, flags, _ = assess_test_specific("PSF01_800", {"CCD1": res["stats"]}, {"CCD1": row}, chamber)
    assert Flag.FOCUS_OOL in flags


def test_point_frame_without_spots_is_sourceoff(tmp_path):
    model = DetectorModel(PhysicsConfig(), "BORN", seed=62)
    res, row, chamber = _frame(tmp_path, model, "PSF01_800", 2, lit=False)
    assert all(res["stats"][q]["spots"]["n"] == 0 for q in QUADRANTS)
    tree, flags, _ = assess_test_specific("PSF01_800", {"CCD1": res["stats"]}, {"CCD1": row}, chamber)
    assert Flag.SOURCEOFF in flags and tree["spots"]["CCD1"]["E"]["passed"] is False


def test_persist01_saturated_fraction_and_dark_background():
    stats = {f"CCD{c}": {q: {"pre": {"offset": 2500.0}, "img": {"offset": 2500.5}, "ove": {"offset": 2500.0},
                             "saturated": 20000, "npix": 4_400_000} for q in QUADRANTS} for c in (1, 2, 3)}
    rows = {f"CCD{c}": {"exptime": 600.0, "shuttr": 1} for c in (1, 2, 3)}
    tree, notes = {}, []
    assert assess_point_tests("PERSIST01", stats, rows, None, tree, notes) == Flag(0)
    assert tree["saturation"]["value"] == pytest.approx(20000 / 4.4e6)
    for s in stats["CCD1"].values():
        s["saturated"] = 0
    for c in ("CCD2", "CCD3"):
        for s in stats[c].values():
            s["saturated"] = 0
    assert Flag.SATURATION in assess_point_tests("PERSIST01", stats, rows, None, {}, [])
    dark = {c: {"exptime": 565.0, "shuttr": 0} for c in rows}
    stats["CCD1"]["E"]["img"]["offset"] = 2800.0  # 300 ADU of dark background
    tree = {}
    flags = assess_point_tests("PERSIST01", stats, dark, None, tree, [])
    assert Flag.BGD_OOL in flags and tree["background"]["CCD1"]["E"]["passed"] is False and tree["background"]["CCD1"]["F"]["passed"]


def test_quadrant_spot_summary_is_cheap_numpy():
    img = np.random.default_rng(1).normal(0, 1.3, (2066, 2048)).astype(np.float32)
    yy, xx = np.mgrid[-8:9, -8:9]
    for y, x in ((300, 400), (900, 1500), (1700, 700)):
        img[y - 8:y + 9, x - 8:x + 9] += 20000 * np.exp(-0.5 * (xx**2 + yy**2) / 0.8**2)
    s = quadrant_spots(img, 1.3)
    assert s["n"] == 3 and s["fwhm_px"] == pytest.approx(2.3548 * 0.8, rel=0.05) and s["peak_adu"] == pytest.approx(20000, rel=0.01)
