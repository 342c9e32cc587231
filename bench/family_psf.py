"""Cost of the point-source family (issue 13): extraction per exposure (3 full-size CCDs, 12
quadrants: detection, spot measurements, crosstalk sums) and the solve of a nominal PSF01 (53
exposures) and FOCUS00 (9), side by side with the detection a user would pick first (photutils
``DAOStarFinder`` on every full-resolution quadrant), plus the validator's per-CCD spot summary
and the accuracy against the simulated truth.

    .venv/bin/python bench/family_psf.py [--frames 2]

The frames are simulated in memory (a few exposures; the nominal 53-exposure solve re-uses their
extractions under other ObsIDs, which is what the solve's cost depends on)."""

from __future__ import annotations

import argparse
import time

import numpy as np

from services.analyzer.families.psf import FAMILY, LABELS, PSFParams, quadrant_spots
from services.analyzer.family import Calibrations, ExposureFrames, TestRun
from services.analyzer.model import FrameMeta, ListSink
from services.sim import crosstalk as xtalk
from services.sim.campaign import test_frames as catalogue_frames
from services.sim.frames import exposure_conditions, frame_kind
from services.sim.physics import DetectorModel, PhysicsConfig
from services.validator.specific_psf import add_spot_stats
from shared.geometry import CCDS, IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, QUADRANTS, Geometry, assemble
from shared.refdata import chamber_profile

CHAMBER = "CHAMBER_A_JUN18"


def simulate(model, regs_list):
    chamber = chamber_profile(CHAMBER)
    out = []
    for k, regs in enumerate(regs_list, start=1):
        exp = exposure_conditions(regs, frame_kind(regs), chamber)
        quads, infos = {c: {} for c in CCDS}, {c: {} for c in CCDS}
        for ccd in CCDS:
            for q in QUADRANTS:
                r = model.simulate_quadrant(ccd, q, exp, model.rng("bench", k, ccd, q), Geometry())
                quads[ccd][q], infos[ccd][q] = r.data, r.info
        xtalk.apply_point_crosstalk(model, quads, infos)
        frames = {c: np.clip(np.rint(assemble(quads[c], Geometry())), 0, 65535).astype(np.float32) for c in CCDS}
        metas = [FrameMeta(obsid=k, ccd=int(c[-1]), path=f"/mem/{k}", test="PSF01_800", exptime=float(regs["exptime"]), values=dict(regs))
                 for c in CCDS]
        out.append((ExposureFrames.from_frames(metas, "BORN", loader=lambda m, f=frames: f[m.ccd_name]), frames, infos))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=2, help="simulated bright exposures")
    args = ap.parse_args()
    model = DetectorModel(PhysicsConfig(), "BORN", seed=3)
    specs, _ = catalogue_frames(["PSF01_800"], CHAMBER, params={"PSF01_800": {"fluences": [90], "frames": [args.frames]}})
    t = time.perf_counter()
    sims = simulate(model, [s.registers() for s in specs])
    print(f"simulated {len(sims)} exposures (3 CCDs) in {time.perf_counter() - t:.1f} s")
    import photutils  # noqa: F401 - import cost (~2-3 s, once per process) kept out of the figures

    exts = []
    for exp, _, _ in sims:
        [exp.load(c) for c in exp.ccds()]
        t = time.perf_counter()
        exts.append(FAMILY.run_extraction((exp,), Calibrations(), PSFParams()))
        print(f"vison extraction, ObsID {exp.obsid}: {time.perf_counter() - t:.2f} s per exposure (12 quadrants)")
    # the alternative: DAOStarFinder on each full-resolution quadrant (detection only)
    from photutils.detection import DAOStarFinder

    exp, frames, _ = sims[0]
    t = time.perf_counter()
    n = 0
    for ccd in CCDS:
        for q, quad in exp.quadrants(ccd).items():
            img = np.asarray(quad[:IMAGE_ROWS, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS], dtype=np.float32)
            img = img - np.median(img[::7, ::7])
            found = DAOStarFinder(fwhm=1.8, threshold=50.0)(img)
            n += 0 if found is None else len(found)
    print(f"alternative (photutils DAOStarFinder, full resolution, detection only): {time.perf_counter() - t:.2f} s per exposure, "
          f"{n} sources")
    t = time.perf_counter()
    for q, quad in sims[0][0].quadrants("CCD1").items():
        quadrant_spots(quad, PSFParams())
    print(f"vison detection + measurement, 4 quadrants of one CCD: {time.perf_counter() - t:.2f} s")
    stats = {q: {"pre": {"noise": 1.3}} for q in QUADRANTS}
    t = time.perf_counter()
    add_spot_stats(frames["CCD1"], stats)
    print(f"validator spot summary (one CCD): {1e3 * (time.perf_counter() - t):.0f} ms; n = {[stats[q]['spots']['n'] for q in QUADRANTS]}")
    # nominal PSF01 solve: 53 extractions
    nominal = [e.model_copy(update={"obsids": [100 + i], "unit": f"e{100 + i}"}) for i, e in enumerate(exts * (53 // len(exts) + 1))][:53]
    t = time.perf_counter()
    out = FAMILY.solve(nominal, Calibrations(), PSFParams(), TestRun.of("PSF01_800", "BORN"), ListSink())
    print(f"solve of a nominal PSF01 (53 exposures): {time.perf_counter() - t:.2f} s")
    # accuracy vs truth (crosstalk from the simulated exposures)
    out = FAMILY.solve(exts, Calibrations(), PSFParams(), TestRun.of("PSF01_800", "BORN"), ListSink())
    dev, errs = [], []
    for s in LABELS:
        for v in LABELS:
            if s != v:
                c = model.crosstalk[s][v]
                dev.append(out.results["crosstalk"][s][v] - c)
                errs.append(out.results["crosstalk_err"][s][v])
    dev, errs = np.array(dev), np.array(errs)
    truth = {v: xtalk.requirement_met({s: model.crosstalk[s][v] for s in LABELS if s != v}) for v in LABELS}
    print(f"crosstalk ({len(exts)} exposures at 90 %): median |measured - truth| {np.median(np.abs(dev)):.2e}, max {np.abs(dev).max():.2e}, "
          f"median error {np.median(errs):.2e}, max |dev|/err {np.max(np.abs(dev) / errs):.1f}; verdicts right: "
          f"{sum(out.results['crosstalk_requirement_met'][v] == truth[v] for v in LABELS)}/12")
    pt = model.truth["CCD1"].point.quadrants["E"]
    spot = sims[0][2]["CCD1"]["E"]["spots"][0]
    r = out.results["CCD1"]["E"]
    print(f"FWHM x/y CCD1 E: {r['fwhm_x_px']:.4f}/{r['fwhm_y_px']:.4f} px vs truth {spot['fwhm_x_px']:.4f}/{spot['fwhm_y_px']:.4f} "
          f"(BF slope truth {pt.bf_slope_px_per_10k:.4f} px per 10 kADU: needs a fluence range, see tests/test_family_psf.py)")


if __name__ == "__main__":
    main()
