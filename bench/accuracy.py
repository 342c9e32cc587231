"""Benchmark: accuracy of the flat-field family analyses against simulated truth at full size.

- PTC01 at its nominal volume (11 fluences, 92 frames) for 3 CCDs x 4 quadrants: gain of the
  exponential fit (target 0.5 %), of the full covariance fit and of the plain quadratic; a00
  (target 10 %); a10 / a01 (full fit); noise; blooming level; BF01 FWHM growth at half well
  from the fitted a-matrix vs the one from the true a-matrix.
- NL01 script (21 fluences x 4 frames + 22 stability + 3 background = 109 frames), 1 % NL at
  90 % of 2^16 ADU and 2 %/h source drift, one CCD: max |NL error| over 0.5-90 % of full well
  (target 0.1 % absolute).
- FLAT01-like flats (25 % x 20, 75 % x 10 frames; 1 % PRNU), one CCD: PRNU (target 5 % relative).

Frames come from ``services.sim.physics`` (the simulator's detector model), digitised to 16 bits,
generated lazily when the analysis loads them. Run:
``.venv/bin/python bench/accuracy.py [--quick] [--only ptc,nl,flat] [--ccds 3] [--seed N]``
(``--quick``: 1 CCD, 2 quadrants, fewer frames; the full run takes ~20-30 min on one core).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.analyzer.families import bf  # noqa: E402
from services.analyzer.families.ptc import FAMILY as PTC  # noqa: E402
from services.analyzer.families.ptc.solve import solve_quadrants  # noqa: E402
from services.analyzer.family import Calibrations, ExposureFrames  # noqa: E402
from services.analyzer.model import FrameMeta  # noqa: E402
from services.sim.physics import FULL_SCALE_ADU, REFERENCE_GAIN, DetectorModel, Exposure, PhysicsConfig  # noqa: E402
from shared.fitsio import to_uint16  # noqa: E402
from shared.geometry import CCDS, QUADRANTS, Geometry  # noqa: E402

T_FWC = 4.0  # s to 2^16 ADU at the reference gain (800 nm, typical chamber)
PTC01 = ([0.05, 0.10, 0.20, 0.30, 0.50, 0.70, 0.80, 0.90, 1.00, 1.10, 1.20], [10] * 8 + [4] * 3)
NL_FLUENCES = [0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 85.0, 90.0, 95.0, 100.0, 110.0]

ROWS: list[tuple] = []


def report(quantity: str, where: str, measured: float, truth: float, error: float, unit: str, target: float | None) -> None:
    ok = "" if target is None else ("ok" if abs(error) <= target else "FAIL")
    ROWS.append((quantity, where, measured, truth, error, unit, target, ok))
    tgt = "" if target is None else f"<= {target:g}"
    print(f"{quantity:<22} {where:<8} {measured:>13.6g} {truth:>13.6g} {error:>+10.4f} {unit:<4} {tgt:<9} {ok}", flush=True)


class SimExposure(ExposureFrames):
    """An exposure of the CCDs ``ccds`` whose canonical quadrants ``quads`` are simulated when
    the extraction asks for them (one CCD at a time)."""

    def __init__(self, model: DetectorModel, obsid: int, exptime: float, ccds: list[str], quads: list[str], tag: str,
                 drift: float = 1.0):
        metas = {c: FrameMeta(obsid=obsid, ccd=int(c[-1]), path=f"/sim/{tag}_{obsid}_{c}.fits", exptime=exptime, test="PTC01",
                              values={"wave": 800}) for c in ccds}
        super().__init__(obsid=obsid, block="BENCH", test="PTC01", frames=metas)
        self.model, self.quads, self.tag, self.drift = model, quads, tag, drift

    def quadrants(self, ccd: str) -> dict[str, np.ndarray]:
        flux = FULL_SCALE_ADU * REFERENCE_GAIN / T_FWC * self.drift
        e = Exposure(kind="flat" if self.exptime > 0 else "bias", exptime=self.exptime, flux_e_per_s=flux)
        geo = Geometry()
        return {q: to_uint16(self.model.simulate_quadrant(ccd, q, e, self.model.rng(self.tag, self.obsid - 1, ccd, q), geo).data)
                .astype(np.float32) for q in self.quads}


def bench_ptc(args, ccds: list[str], quads: list[str]) -> None:
    """PTC01 through the PTC family's two stages (pair extractions, then the solve)."""
    fluences, nframes = PTC01
    if args.quick:
        nframes = [6] * 8 + [2] * 3
    model = DetectorModel(PhysicsConfig(), block="BENCH", seed=args.seed)
    plan = [f for f, n in zip(fluences, nframes) for _ in range(n)]
    exposures = [SimExposure(model, k + 1, f * T_FWC, ccds, quads, "ptc") for k, f in enumerate(plan)]
    t0 = time.perf_counter()
    params = PTC.parameters({})
    exts = []
    for _, inputs in PTC.units(exposures):
        exts.append(PTC.run_extraction(inputs, Calibrations(), params))
    sol, _ = solve_quadrants(exts, params)
    dt = time.perf_counter() - t0
    print(f"# PTC01: {len(plan)} exposures ({len(exts)} pairs), {len(ccds)} CCD x {len(quads)} quadrants, "
          f"simulation + extraction + solve {dt:.0f} s")
    bfp = bf.BFParams()
    for ccd in ccds:
        for q in quads:
            t = model.truth[ccd].quadrants[q]
            qa = sol[ccd][q]
            r = qa.result
            w = f"{ccd} {q}"
            report("gain (exp)", w, r.gain, t.gain_e_per_adu, 100 * (r.gain / t.gain_e_per_adu - 1), "%", 0.5)
            if r.gain_full is not None:
                report("gain (full cov)", w, r.gain_full, t.gain_e_per_adu, 100 * (r.gain_full / t.gain_e_per_adu - 1), "%", 0.5)
            report("gain (quadratic)", w, r.gain_quad, t.gain_e_per_adu, 100 * (r.gain_quad / t.gain_e_per_adu - 1), "%", None)
            report("a00 (exp)", w, r.a00, t.bf.a00, 100 * (r.a00 / t.bf.a00 - 1), "%", 10.0)
            if r.a00_full is not None:
                report("a00 (full cov)", w, r.a00_full, t.bf.a00, 100 * (r.a00_full / t.bf.a00 - 1), "%", None)
                report("a10 (full cov)", w, r.a10_full, t.bf.a10, 100 * (r.a10_full / t.bf.a10 - 1), "%", None)
                report("a01 (full cov)", w, r.a01_full, t.bf.a01, 100 * (r.a01_full / t.bf.a01 - 1), "%", None)
            report("noise (PTC)", w, r.noise_e, t.ron_e, 100 * (r.noise_e / t.ron_e - 1), "%", None)
            report("RON overscan", w, r.ron_ove_adu, t.ron_adu, 100 * (r.ron_ove_adu / t.ron_adu - 1), "%", None)
            adc = 65535 - t.offset_adu
            report("ADC ceiling", w, r.adc_saturation_adu, adc, 100 * (r.adc_saturation_adu / adc - 1), "%", None)
            if not r.full_well_is_lower_limit:
                report("full well", w, r.full_well_adu, t.full_well_adu, 100 * (r.full_well_adu / t.full_well_adu - 1), "%", 2.0)
            else:
                print(f"{'full well':<22} {w:<8} {'>' + format(r.full_well_adu, '.6g'):>13} {t.full_well_adu:>13.6g} "
                      f"(lower limit; limit reached: {r.saturation_limit})")
            sat = min(t.full_well_adu, adc)
            report("saturation level", w, r.saturation_adu, sat, 100 * (r.saturation_adu / sat - 1), "%", None)
            if qa.full is not None:
                a_true = np.zeros_like(qa.full.a)
                a_true[0, 0], a_true[1, 0], a_true[0, 1] = t.bf.a00, t.bf.a10, t.bf.a01
                got = bf.spot_broadening(qa.full.a, qa.full.gain, bfp)
                exp = bf.spot_broadening(a_true, t.gain_e_per_adu, bfp)
                for key in ("fwhm_x_growth_pct", "fwhm_y_growth_pct"):
                    report(f"BF {key[:6]} growth", w, got[key], exp[key], got[key] - exp[key], "pt", None)


def bench_nl(args, ccds: list[str], quads: list[str]) -> None:
    """NL01 through the NL family's two stages on simulated frames (1 % quadratic NL, 2 %/h drift)."""
    from datetime import datetime, timedelta

    from services.analyzer.families import nl

    model = DetectorModel(PhysicsConfig(nl_pct=1.0, nl_at_fraction=0.9, drift_pct_per_hour=2.0), block="BENCH", seed=args.seed + 1)
    per = 2 if args.quick else 4
    plan = [(0.0, "BGD")] * 3
    for f in NL_FLUENCES:
        plan += [(0.5, "STAB")] + [(f / 100, "FLU")] * per
    plan += [(0.5, "STAB")]
    ccd = ccds[0]
    start, t = datetime(2024, 3, 1, 8), 0.0
    exposures = []
    for k, (frac, comment) in enumerate(plan):
        e = SimExposure(model, k + 1, frac * T_FWC, [ccd], quads, "nl", drift=1 + 0.02 * t / 3600)
        e.frames[ccd].values["comments"] = comment
        e.date = start + timedelta(seconds=t)
        exposures.append(e)
        t += frac * T_FWC + 93.5
    t0 = time.perf_counter()
    params = nl.FAMILY.parameters({})
    exts = [nl.FAMILY.run_extraction((e,), Calibrations(), params) for e in exposures]
    from services.analyzer.family import TestRun
    from services.analyzer.model import ListSink

    out = nl.FAMILY.solve(exts, Calibrations(), params, TestRun.of("NL01", "BENCH"), ListSink())
    print(f"# NL01: {len(exposures)} frames, {ccd} x {len(quads)} quadrants, 1 % NL at 90 % of 2^16 ADU, 2 %/h drift, "
          f"{time.perf_counter() - t0:.0f} s")
    for q in quads:
        t_ = model.truth[ccd].quadrants[q]
        r = out.results[ccd][q]
        full_well = min(FULL_SCALE_ADU, t_.full_well_adu, 65535 - t_.offset_adu)
        grid = np.linspace(0.005, 0.9, 300) * full_well
        err = nl.nl_at(r, grid) - 100 * t_.nl.beta_per_adu * grid
        k = int(np.argmax(np.abs(err)))
        report("NL curve max |err|", f"{ccd} {q}", float(nl.nl_at(r, grid[k:k + 1])[0]), 100 * t_.nl.beta_per_adu * grid[k], float(err[k]), "pt", 0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 CCD, 2 quadrants, fewer frames")
    parser.add_argument("--only", default="ptc,nl", help="comma list of ptc, nl (flats: bench/family_flat.py prints the PRNU against truth)")
    parser.add_argument("--ccds", type=int, default=3, help="CCDs in the PTC run (1..3)")
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()
    ccds = list(CCDS[: 1 if args.quick else max(1, min(args.ccds, 3))])
    quads = ["E", "H"] if args.quick else list(QUADRANTS)
    print(f"{'quantity':<22} {'where':<8} {'measured':>13} {'truth':>13} {'error':>10} {'unit':<4} {'target':<9}")
    t0 = time.perf_counter()
    only = {s.strip() for s in args.only.split(",")}
    if "ptc" in only:
        bench_ptc(args, ccds, quads)
    if "nl" in only:
        bench_nl(args, ccds, quads)
    print(f"# summary ({time.perf_counter() - t0:.0f} s): max |error| per quantity")
    fails = 0
    for quantity in dict.fromkeys(r[0] for r in ROWS):
        sel = [r for r in ROWS if r[0] == quantity]
        worst = max(sel, key=lambda r: abs(r[4]))
        bad = sum(r[7] == "FAIL" for r in sel)
        fails += bad
        tgt = f"target {worst[6]:g} {worst[5]}" if worst[6] is not None else "(no target)"
        print(f"  {quantity:<22} max |err| {abs(worst[4]):8.4f} {worst[5]:<3} ({worst[1]})  {tgt}  "
              f"{'FAIL x' + str(bad) if bad else ('ok' if worst[6] is not None else '')}")
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(main())
