"""Charge injection and trap pumping (issue 12): accuracy against the simulator's truth and the
cost of each stage, at the nominal volumes on full-size frames (one CCD, all four quadrants).

    .venv/bin/python bench/family_injection.py [--quick]

Prints, for CHINJ01 (36 frames) and TP01 (50 frames): the per-frame extraction cost, the solve
time, and the accuracy figures of families.md (thresholds within 0.05 V, notch 0.1 V, slope 3 %;
>= 95 % of the traps above 7 x the noise found, < 5 % false dipoles, tau within 10 % and Pc within
20 % for 90 % of those seen at >= 3 phase times). ``--quick``: TP01 with modes 123 and 234 only.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.analyzer.families import chinj, tp  # noqa: E402
from services.analyzer.family import Calibration, Calibrations, ExposureFrames, TestRun  # noqa: E402
from services.analyzer.model import FrameMeta, ListSink  # noqa: E402
from services.sim import injection as inj  # noqa: E402
from services.sim.campaign import test_frames  # noqa: E402
from services.sim.frames import exposure_conditions, frame_kind  # noqa: E402
from services.sim.physics import DetectorModel, PhysicsConfig  # noqa: E402
from shared.geometry import QUADRANTS, Geometry, assemble  # noqa: E402
from shared.refdata import chamber_profile  # noqa: E402

CHAMBER = "CHAMBER_A_JUN18"


def simulate(test: str, params: dict, model: DetectorModel) -> list[ExposureFrames]:
    frames, _ = test_frames([test], CHAMBER, params={test: params})
    chamber = chamber_profile(CHAMBER)
    store: dict[int, np.ndarray] = {}
    out = []
    for obsid, spec in enumerate(frames, start=1):
        regs = spec.registers()
        exp = exposure_conditions(regs, frame_kind(regs), chamber)
        quads = {q: model.simulate_quadrant("CCD1", q, exp, model.rng("b", obsid, q), Geometry()).data for q in QUADRANTS}
        store[obsid] = np.clip(np.rint(assemble(quads, Geometry())), 0, 65535).astype(np.float32)
        meta = FrameMeta(obsid=obsid, ccd=1, path=f"/mem/{obsid}", test=test, values=dict(regs))
        out.append(ExposureFrames.from_frames([meta], "BORN", loader=lambda m: store[m.obsid]))
    return out


def stages(family, exposures, run, calib):
    params = family.parameters(None)
    t0 = time.perf_counter()
    exts = [family.run_extraction((e,), calib, params) for e in exposures]
    t1 = time.perf_counter()
    sink = ListSink()
    out = family.solve(exts, calib, params, run, sink)
    t2 = time.perf_counter()
    return out, sink, (t1 - t0) / len(exposures), t2 - t1


def bench_chinj() -> None:
    model = DetectorModel(PhysicsConfig(), "BORN", seed=41)
    t = time.perf_counter()
    exposures = simulate("CHINJ01", {}, model)
    print(f"CHINJ01: {len(exposures)} frames simulated in {time.perf_counter() - t:.0f} s")
    out, _, per_frame, solve_s = stages(chinj.FAMILY, exposures, TestRun.of("CHINJ01", "BORN"), Calibrations())
    print(f"  extraction {per_frame:.2f} s / frame (4 quadrants), solve {solve_s:.2f} s")
    worst = {"x_T (V)": 0.0, "x_N (V)": 0.0, "S (%)": 0.0}
    for q in QUADRANTS:
        truth = model.truth["CCD1"].quadrants[q].injection
        r = out.results["CCD1"][q]
        if not r["fit_ok"]:
            print(f"  {q}: fit failed: {r['reason']}")
            continue
        worst["x_T (V)"] = max(worst["x_T (V)"], abs(r["ig1_threshold_v"] - (3.5 + truth.dx_threshold_v)))
        worst["x_N (V)"] = max(worst["x_N (V)"], abs(r["ig1_notch_v"] - (6.0 + truth.dx_notch_v)))
        worst["S (%)"] = max(worst["S (%)"], 100 * abs(r["slope_adu_per_v"] / truth.slope_adu_per_v - 1))
    print("  worst error over 4 quadrants: " + ", ".join(f"{k} {v:.3f}" for k, v in worst.items())
          + "   (targets 0.05 V, 0.1 V, 3 %)")


def bench_tp(quick: bool) -> None:
    model = DetectorModel(PhysicsConfig(traps_vertical=200, hot_pixels=40, cosmic_rate=0.02), "BORN", seed=42)
    # 20000 cycles: at the nominal 5000 no trap can exceed 7 sigma (N Pc / 4 <= 1250 e- against ~200 e- of shot noise)
    params = {"cycles": 20000, **({"modes": [123, 234]} if quick else {})}
    t = time.perf_counter()
    exposures = simulate("TP01", params, model)
    print(f"TP01: {len(exposures)} frames simulated in {time.perf_counter() - t:.0f} s")
    gain = {q: model.truth["CCD1"].quadrants[q].gain_e_per_adu for q in QUADRANTS}
    calib = Calibrations([Calibration(name="gain", block="BORN", test="PTC01", values={"gain": {"CCD1": gain}})])
    out, sink, per_frame, solve_s = stages(tp.FAMILY, exposures, TestRun.of("TP01", "BORN"), calib)
    print(f"  extraction {per_frame:.2f} s / frame (4 quadrants), solve {solve_s:.2f} s")
    cat = sink.get("TP01_dipoles").columns
    rows = [dict(zip(cat, v)) for v in zip(*cat.values())]
    modes = params.get("modes", [123, 234, 341, 412])
    tois = [50, 200, 1000, 2000, 4000, 8000]
    for half, quads in (("1250 us: G, H", ("G", "H")), ("750 us: E, F", ("E", "F"))):
        det = found = 0
        fits, matched = [], set()
        qrows = [(i, r) for i, r in enumerate(rows) if r["QUAD"] in quads]
        for q in quads:
            noise_e = out.results["CCD1"][q]["injection_noise_adu"] * gain[q]
            for t_ in model.truth["CCD1"].vertical_traps[q]:
                for mode in modes:
                    pol = inj.vertical_polarity(mode, t_.phase)
                    if pol is None:
                        continue
                    ylow = t_.y - 1 if pol == "S" else t_.y
                    hit = [i for i, r in qrows if r["QUAD"] == q and r["MODE"] == mode and r["X"] == t_.x and abs(r["Y"] - ylow) <= 1
                           and r["POLARITY"] == pol]
                    matched.update(hit)
                    amps = [20000 * inj.vertical_probability(x, t_.tau_us, t_.pc) for x in tois]
                    if max(amps) < 7 * noise_e:
                        continue
                    det += 1
                    if hit:
                        found += 1
                        r = rows[hit[0]]
                        if sum(a > 7 * noise_e for a in amps) >= 3 and math.isfinite(r["TAU_US"]):
                            fits.append((abs(r["TAU_US"] / t_.tau_us - 1) < 0.1, abs(r["PC"] / t_.pc - 1) < 0.2))
        false = len(qrows) - len(matched)
        print(f"  delay {half}: {det} dipoles above 7 sigma, found {found} ({100 * found / max(det, 1):.0f} %, target >= 95 %); "
              f"false {false} of {len(qrows)} ({100 * false / max(len(qrows), 1):.1f} %, target < 5 %); tau within 10 % and Pc within "
              f"20 %: {sum(a and b for a, b in fits)} of {len(fits)} fitted (target 90 %)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    bench_chinj()
    bench_tp(args.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
