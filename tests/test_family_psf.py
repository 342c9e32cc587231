"""FOCUS00 / PSF01 / PSF02 (issue 13) against the simulator's truth (families.md targets: best
focus within 0.02 mm, FWHM within 3 %, brighter-fatter slope within 15 %, crosstalk within 10 %
or 5 x its statistical error with the verdict right for every victim). Cheap tests simulate
single quadrants in memory and solve from their extractions (the solve sees only extractions);
one full-size test runs the whole family on 3 CCDs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.analyzer import extractions as X
from services.analyzer.families.psf import (
    FAMILY, LABELS, PSFExtraction, PSFParams, QuadSpots, fit_focus, quadrant_spots, requirement_met,
)
from services.analyzer.family import Calibrations, ExposureFrames, TestRun, run_inprocess
from services.analyzer.model import FrameMeta, ListSink
from services.sim import crosstalk as xtalk
from services.sim.campaign import test_frames as catalogue_frames
from services.sim.frames import exposure_conditions, frame_kind
from services.sim.physics import DetectorModel, PhysicsConfig
from shared.flags import Flag
from shared.geometry import CCDS, QUADRANTS, Geometry, assemble
from shared.refdata import chamber_profile

CHAMBER = "CHAMBER_A_JUN18"


def _specs(test: str, params: dict | None = None):
    frames, _ = catalogue_frames([test], CHAMBER, params={test: params} if params else None)
    return [f.registers() for f in frames]


def _quad_exts(model: DetectorModel, regs_list, ccd="CCD1", q="E", test="PSF01_800", start=1):
    """Simulate one quadrant per exposure; extraction with only that quadrant."""
    chamber = chamber_profile(CHAMBER)
    out, truth = [], []
    for k, regs in enumerate(regs_list):
        exp = exposure_conditions(regs, frame_kind(regs), chamber)
        res = model.simulate_quadrant(ccd, q, exp, model.rng("t", test, k, ccd, q), Geometry())
        qs, _ = quadrant_spots(np.clip(np.rint(res.data), 0, 65535), PSFParams())
        e = PSFExtraction(family="psf", unit=f"e{start + k}", obsids=[start + k], ccds=[ccd], exptime=exp.exptime,
                          mirr_pos=float(regs["mirr_pos"]), wave=float(regs["wave"]), quads={ccd: {q: qs}})
        for other in QUADRANTS:
            e.quads[ccd].setdefault(other, QuadSpots(offset_adu=0, bgd_adu=0, noise_adu=1))
        out.append(e)
        truth.append(res.info)
    return out, truth


def test_focus00_best_focus_and_fwhm_against_truth():
    model = DetectorModel(PhysicsConfig(), "BORN", seed=31)
    regs = _specs("FOCUS00_800")
    assert len(regs) == 9
    exts, truth = _quad_exts(model, regs, test="FOCUS00_800")
    sink = ListSink()
    out = FAMILY.solve(exts, Calibrations(), PSFParams(), TestRun.of("FOCUS00_800", "BORN"), sink)
    r = out.results["CCD1"]["E"]
    z_best = truth[0]["z_best_mm"]
    assert r["n_spots"] == 5
    assert r["best_focus_mm"] == pytest.approx(z_best, abs=0.02)
    assert 0 < r["best_focus_err_mm"] < 0.02
    # the fitted curve at focus vs the pixel-sampled FWHM of an in-focus spot (~ BF at that peak)
    f_focus = 2.3548200450309493 * math.sqrt((1.5 / 2.3548200450309493) ** 2 + 1 / 12)
    assert r["fwhm_at_focus_px"] == pytest.approx(f_focus, rel=0.06)
    assert out.results["best_focus_mm"] == pytest.approx(z_best, abs=0.02)
    assert "FOCUS00_800_spots" in sink.names()
    cat = sink.get("FOCUS00_800_spots").columns
    assert {"CCD", "QUAD", "SPOT", "X", "Y", "FRAME_OBSID", "PEAK_ADU", "FLUENCE_ADU", "FWHM_X_PX", "FWHM_Y_PX", "E1", "E2"} <= set(cat)
    # positions come from detection, matched to the simulator's (never assumed)
    pos = model.truth["CCD1"].point.quadrants["E"]
    for x, y in zip(cat["X"][:5], cat["Y"][:5]):
        assert min(math.hypot(x - a, y - b) for a, b in zip(pos.x, pos.y)) < 0.3
    # the empty quadrants are said, never given numbers
    assert out.results["CCD1"]["F"]["best_focus_mm"] is None and "no spot" in out.results["CCD1"]["F"]["reason"]
    assert Flag.SOURCEOFF in Flag(out.flags)


def test_focus_sweep_with_too_few_positions_gives_no_number():
    model = DetectorModel(PhysicsConfig(), "BORN", seed=32)
    regs = _specs("FOCUS00_800")[3:5]
    exts, _ = _quad_exts(model, regs, test="FOCUS00_800")
    out = FAMILY.solve(exts, Calibrations(), PSFParams(), TestRun.of("FOCUS00_800", "BORN"), ListSink())
    r = out.results["CCD1"]["E"]
    assert r["best_focus_mm"] is None and r["n_spots"] == 0 and "usable mirror positions" in r["reason"]
    assert Flag.BADFIT in Flag(out.flags) and out.results["best_focus_mm"] is None
    fit, why = fit_focus(np.array([1.0, 2.0]), np.array([2.0, 2.0]))
    assert fit is None and "2 usable" in why


def test_psf01_fwhm_and_brighter_fatter_slope_against_truth():
    model = DetectorModel(PhysicsConfig(), "BORN", seed=33)
    regs = _specs("PSF01_800", {"fluences": [5, 25, 50, 75, 90], "frames": [2, 1, 2, 1, 2]})
    exts, truth = _quad_exts(model, regs)
    out = FAMILY.solve(exts, Calibrations(), PSFParams(), TestRun.of("PSF01_800", "BORN"), ListSink())
    r = out.results["CCD1"]["E"]
    spots = model.truth["CCD1"].point.quadrants["E"]
    assert r["n_spots"] == 5
    half = next(t for t, g in zip(truth, regs) if abs(float(g["exptime"]) - 0.5 * 1.6) < 1e-6)["spots"][0]
    assert r["fwhm_x_px"] == pytest.approx(half["fwhm_x_px"], rel=0.03)
    assert r["fwhm_y_px"] == pytest.approx(half["fwhm_y_px"], rel=0.03)
    assert r["e1"] == pytest.approx(half["e1"], abs=0.02) and abs(r["e2"]) < 0.02
    assert r["fwhm_slope_px"] == pytest.approx(spots.bf_slope_px_per_10k, rel=0.15)
    assert 0 < r["fwhm_slope_err_px"] < 0.15 * spots.bf_slope_px_per_10k
    assert r["bf01_fwhm_slope_px"] is None  # no BF01 result known
    # with BF01's prediction (the bf_kernel calibration) the measured slope is compared with it
    from services.analyzer.family import Calibration

    predicted = 0.5 * spots.bf_slope_px_per_10k
    bf01 = Calibration(name="bf_kernel", block="BORN", test="BF01", values={"fwhm_slope_px": {"CCD1": {"E": predicted}}})
    out = FAMILY.solve(exts, Calibrations([bf01]), PSFParams(), TestRun.of("PSF01_800", "BORN"), ListSink())
    r = out.results["CCD1"]["E"]
    assert r["bf01_fwhm_slope_px"] == pytest.approx(predicted)
    assert r["bf01_slope_ratio"] == pytest.approx(r["fwhm_slope_px"] / predicted) and 1.7 < r["bf01_slope_ratio"] < 2.3


def test_bad_spots_are_left_out_and_said():
    model = DetectorModel(PhysicsConfig(), "BORN", seed=34)
    regs = _specs("PSF01_800", {"fluences": [25, 50, 90], "frames": [1, 1, 1]})
    chamber = chamber_profile(CHAMBER)
    pos = model.truth["CCD1"].point.quadrants["E"]
    exts = []
    for k, g in enumerate(regs):
        exp = exposure_conditions(g, frame_kind(g), chamber)
        quad = np.clip(np.rint(model.simulate_quadrant("CCD1", "E", exp, model.rng("b", k), Geometry()).data), 0, 65535)
        x0, y0 = int(round(pos.x[0])) + 51, int(round(pos.y[0]))
        quad[:, x0 + 1] = np.minimum(quad[:, x0 + 1], 2700 + 0.3 * (quad[:, x0 + 1] - 2700))  # a dead column through spot 0's core
        x1, y1 = int(round(pos.x[1])) + 51, int(round(pos.y[1]))
        if k == 1:
            quad[y1 - 1:y1 + 2, x1 - 1:x1 + 2] = 65535  # spot 1 saturated in the bright frame
        qs, _ = quadrant_spots(quad, PSFParams())
        exts.append(PSFExtraction(family="psf", unit=f"e{k}", obsids=[k + 1], ccds=["CCD1"], exptime=exp.exptime,
                                  quads={"CCD1": {"E": qs}}))
    out = FAMILY.solve(exts, Calibrations(), PSFParams(), TestRun.of("PSF01_800", "BORN"), ListSink())
    r = out.results["CCD1"]["E"]
    assert "on a bad column" in r["reason"] and "saturated in 1 frame" in r["reason"]
    assert r["n_spots"] == 4  # the bad-column spot is left out; the saturated one keeps its other frames
    assert r["fwhm_slope_px"] is not None


def test_no_spots_and_missing_spots_are_flagged():
    model = DetectorModel(PhysicsConfig(), "BORN", seed=35)
    regs = _specs("PSF01_800", {"fluences": [50], "frames": [1]})
    closed = [{**regs[0], "shuttr": 0}]  # shutter closed: a dark, no spot
    exts, _ = _quad_exts(model, closed)
    out = FAMILY.solve(exts, Calibrations(), PSFParams(), TestRun.of("PSF01_800", "BORN"), ListSink())
    assert Flag.SOURCEOFF in Flag(out.flags)
    r = out.results["CCD1"]["E"]
    assert r["n_spots"] == 0 and r["fwhm_x_px"] is None and "no spot" in r["reason"]
    exts, _ = _quad_exts(model, regs)
    exts[0].quads["CCD1"]["E"].spots = exts[0].quads["CCD1"]["E"].spots[:3]
    out = FAMILY.solve(exts, Calibrations(), PSFParams(), TestRun.of("PSF01_800", "BORN"), ListSink())
    assert Flag.STARS_MISSING in Flag(out.flags) and "3 spots found, 5 expected" in out.results["CCD1"]["E"]["reason"]


def test_requirement_rule_counts_secondary_couplings():
    assert requirement_met({"a": 5e-4, "b": 8e-5, "c": 1e-5})
    assert not requirement_met({"a": 5e-4, "b": 8e-5, "c": 7.7e-5})  # two secondaries: the original's bug let it pass
    assert not requirement_met({"a": 6.5e-4})
    m = xtalk.draw_crosstalk(np.random.default_rng(3))
    verdict = {v: xtalk.requirement_met({s: c[v] for s, c in m.items() if v in c}) for v in LABELS}
    assert sum(not ok for ok in verdict.values()) == 3 and len(verdict) == 12
    assert all(1e-6 <= c <= 6e-4 for row in m.values() for c in row.values())


def _full_exposures(model: DetectorModel, regs_list, test="PSF01_800"):
    chamber = chamber_profile(CHAMBER)
    store: dict[tuple[int, str], np.ndarray] = {}
    out = []
    for k, regs in enumerate(regs_list, start=1):
        exp = exposure_conditions(regs, frame_kind(regs), chamber)
        quads, infos = {}, {}
        for ccd in CCDS:
            quads[ccd], infos[ccd] = {}, {}
            for q in QUADRANTS:
                res = model.simulate_quadrant(ccd, q, exp, model.rng("full", k, ccd, q), Geometry())
                quads[ccd][q], infos[ccd][q] = res.data, res.info
        xtalk.apply_point_crosstalk(model, quads, infos)
        metas = []
        for ccd in CCDS:
            store[(k, ccd)] = np.clip(np.rint(assemble(quads[ccd], Geometry())), 0, 65535).astype(np.float32)
            metas.append(FrameMeta(obsid=k, ccd=int(ccd[-1]), path=f"/mem/{k}_{ccd}.fits", test=test, exptime=float(regs["exptime"]),
                                   values=dict(regs)))
        out.append(ExposureFrames.from_frames(metas, "BORN", loader=lambda m: store[(m.obsid, m.ccd_name)]))
    return out


@pytest.mark.fullsize
def test_psf01_crosstalk_matrix_and_verdict_on_three_ccds():
    model = DetectorModel(PhysicsConfig(), "BORN", seed=36)
    regs = _specs("PSF01_800", {"fluences": [90], "frames": [2]})
    exposures = _full_exposures(model, regs)
    ext = FAMILY.run_extraction((exposures[0],), Calibrations(), PSFParams())
    back = X.loads(X.dumps(ext), PSFExtraction)
    assert np.array_equal(back.xtalk_sums, ext.xtalk_sums) and back.quads["CCD2"]["G"].spots == ext.quads["CCD2"]["G"].spots
    sink = ListSink()
    out = run_inprocess(FAMILY, exposures, TestRun.of("PSF01_800", "BORN"), sink=sink)
    xt, err, verdict = out.results["crosstalk"], out.results["crosstalk_err"], out.results["crosstalk_requirement_met"]
    worst = 0.0
    for s, row in model.crosstalk.items():
        for v, c in row.items():
            tol = max(0.1 * c, 5 * err[s][v])
            assert err[s][v] < 1.5e-5
            assert abs(xt[s][v] - c) <= tol, (s, v, xt[s][v], c, err[s][v])
            worst = max(worst, abs(xt[s][v] - c) / err[s][v])
    truth_verdict = {v: xtalk.requirement_met({s: c[v] for s, c in model.crosstalk.items() if v in c}) for v in LABELS}
    assert verdict == truth_verdict and not all(verdict.values())
    assert Flag.REQNOTMET in Flag(out.flags)
    assert worst < 6  # honest errors
    for ccd in CCDS:
        for q in QUADRANTS:
            assert out.results[ccd][q]["n_spots"] == 5
            assert out.results[ccd][q]["crosstalk_requirement_met"] == truth_verdict[f"{ccd}.{q}"]
    assert {"PSF01_800_spots", "PSF01_800_crosstalk"} <= set(sink.names())
