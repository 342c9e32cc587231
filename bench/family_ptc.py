"""Benchmark of the PTC family (engine v2) on full-size simulated frames (3 CCDs per exposure).

Prints, side by side on the same pairs:

- the read floor (reading every frame once);
- a naive pair-difference + quadratic script (what a user would write: prescan-median offset
  subtraction, difference of the two frames, var / 2, mean, ``numpy.polyfit`` of degree 2 per
  quadrant);
- the family: extraction per pair (means, symmetric difference, one pixel mask, FFT covariances
  to lag 8, KS on every pixel, frame statistics, 12 quadrants) and the solve (each fit timed:
  exponential, full covariance eq. 20, quadratic), serially and with the extractions on a pool
  of worker processes;
- PTC01 at its nominal 92 exposures (46 pairs: the simulated pairs reused under new ObsIDs)
  with the extractions on ``--workers`` processes + the solve: wall time and peak RSS.

Run: ``.venv/bin/python bench/family_ptc.py [--data DIR] [--workers 2] [--pairs 46]``. The data
(22 exposures: 11 fluences x 2 frames, as PTC01's fluences) are simulated once into
``--data`` (default /tmp/vison-bench-ptc) with ``vison sim`` and reused.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the analyzer workers run

import argparse
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLUENCES = "0.05,0.10,0.20,0.30,0.50,0.70,0.80,0.90,1.00,1.10,1.20"


def simulate(data: Path) -> None:
    from services.cli import main as vison

    if (data / "truth.json").exists():
        return
    t0 = time.perf_counter()
    code = vison(["sim", "--out", str(data), "--block", "BENCH", "--seed", "1", "--test", "PTC01", "--frames", "2",
                  "--fluence", FLUENCES, "--wave", "4", "--threads", "2"])
    if code:
        raise SystemExit(f"simulation failed ({code})")
    print(f"# simulated 22 exposures x 3 CCDs in {time.perf_counter() - t0:.0f} s into {data}")


def frames_of(data: Path):
    from services.analyzer.selection import select_test

    return select_test(data, "PTC01").complete_frames()


def read_floor(frames) -> float:
    from shared.fitsio import read_frame

    t0 = time.perf_counter()
    for f in frames:
        read_frame(f.path)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- the naive script


def naive(exposures, pairs) -> tuple[float, float, dict]:
    """Prescan-median offset, difference, var / 2, mean; np.polyfit per quadrant. Returns
    (wall s, CPU s, {(ccd, q): gain})."""
    from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS

    t0, c0 = time.perf_counter(), time.process_time()
    pts: dict = {}
    by = {e.obsid: e for e in exposures}
    for a, b in pairs:
        ea, eb = by[a], by[b]
        for ccd in ea.ccds():
            qa, qb = ea.quadrants(ccd), eb.quadrants(ccd)
            for q in qa:
                i1 = qa[q][:IMAGE_ROWS, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS] - np.median(qa[q][:IMAGE_ROWS, 25:46])
                i2 = qb[q][:IMAGE_ROWS, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS] - np.median(qb[q][:IMAGE_ROWS, 25:46])
                pts.setdefault((ccd, q), []).append((0.5 * (i1.mean() + i2.mean()), np.var(i1 - i2) / 2))
            ea.release(ccd)
            eb.release(ccd)
    gains = {}
    for key, v in pts.items():
        mu, var = np.array(v).T
        ok = mu < 0.9 * 65535 - 2000  # the naive cut: below the saturation
        _, c1, _ = np.polyfit(mu[ok], var[ok], 2)
        gains[key] = 1.0 / c1
    return time.perf_counter() - t0, time.process_time() - c0, gains


# ----------------------------------------------------------------------------- the family


def _extract(args):
    """Worker: one pair extraction from frame metadata (reads the frames itself)."""
    metas_a, metas_b, obsids, params = args
    from services.analyzer.families.ptc import FAMILY, measure
    from services.analyzer.family import Calibrations, ExposureFrames

    measure.FFT_WORKERS = 1  # one thread per process: the pool fills the cores
    ea = ExposureFrames.from_frames(metas_a, "BENCH")
    eb = ExposureFrames.from_frames(metas_b, "BENCH")
    ea.obsid, eb.obsid = obsids
    t0, c0 = time.perf_counter(), time.process_time()
    ex = FAMILY.run_extraction((ea, eb), Calibrations(), FAMILY.parameters(params))
    return ex, time.perf_counter() - t0, time.process_time() - c0


def timed_solve(extractions, params):
    """The solve with each fit timed (wrapping the solve module's fit functions)."""
    from services.analyzer.families.ptc import FAMILY
    from services.analyzer.families.ptc import solve as S
    from services.analyzer.family import Calibrations, TestRun
    from services.analyzer.model import ListSink

    spent = {"exponential": 0.0, "full covariance": 0.0, "quadratic": 0.0}
    names = {"fit_exponential": "exponential", "fit_full_covariance": "full covariance", "fit_quadratic": "quadratic"}
    originals = {n: getattr(S, n) for n in names}

    def wrap(n, f):
        def g(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                spent[names[n]] += time.perf_counter() - t
        return g

    for n, f in originals.items():
        setattr(S, n, wrap(n, f))
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        out = FAMILY.solve(extractions, Calibrations(), FAMILY.parameters(params), TestRun.of("PTC01", "BENCH"), ListSink())
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        for n, f in originals.items():
            setattr(S, n, f)
    return out, total, cpu, spent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/vison-bench-ptc")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=46, help="pairs of the nominal-volume run (PTC01: 46)")
    ap.add_argument("--skip-serial", action="store_true", help="skip the serial family run on the 11 pairs")
    args = ap.parse_args()
    from services.analyzer.families.ptc import FAMILY
    from services.analyzer.family import exposures_of, pair_exposures

    data = Path(args.data)
    simulate(data)
    frames = frames_of(data)
    exposures = exposures_of(frames, "BENCH")
    pairs = pair_exposures([(e.obsid, e.exptime, e.wave) for e in exposures])
    print(f"# {len(exposures)} exposures ({len(frames)} frames, full size), {len(pairs)} pairs; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    c0 = time.process_time()
    t_read = read_floor(frames)
    c_read = time.process_time() - c0
    print(f"read floor                         {t_read:7.1f} s wall {c_read:7.1f} s CPU ({t_read / len(exposures):.2f} s / exposure)")
    t_naive, c_naive, gains = naive(exposures, pairs)
    print(f"naive pair-difference + quadratic  {t_naive:7.1f} s wall {c_naive:7.1f} s CPU ({c_naive / len(pairs):.2f} s CPU / pair, "
          "read included)")
    params: dict = {}
    by = {e.obsid: e for e in exposures}
    metas = {e.obsid: sorted(e.frames.values(), key=lambda m: m.ccd) for e in exposures}
    if not args.skip_serial:
        t0 = time.perf_counter()
        exts, costs, cpus = [], [], []
        for a, b in pairs:
            ex, dt, dc = _extract((metas[a], metas[b], (a, b), params))
            exts.append(ex)
            costs.append(dt)
            cpus.append(dc)
        t_ext = time.perf_counter() - t0
        out, t_solve, c_solve, spent = timed_solve(exts, params)
        total, ctotal = t_ext + t_solve, sum(cpus) + c_solve
        print(f"family, serial: extraction         {t_ext:7.1f} s wall {sum(cpus):7.1f} s CPU ({np.median(cpus):.2f} s CPU / pair "
              f"median, {np.median(cpus) / 12:.3f} s / quadrant pair; read included)")
        print(f"family, serial: solve              {t_solve:7.1f} s wall {c_solve:7.1f} s CPU (" + ", ".join(f"{k} {v:.2f} s" for k, v in spent.items()) + ")")
        print(f"family, serial: total              {total:7.1f} s wall {ctotal:7.1f} s CPU = {total / t_naive:.2f} x the naive script "
              f"in wall time, {ctotal / c_naive:.2f} x in CPU time (goal <= 2)")
        g_fam = [out.results[c][q]["gain"] for c, q in gains]
        g_nai = [gains[k] for k in gains]
        print(f"  gain family vs naive: median ratio {np.median(np.array(g_nai) / np.array(g_fam)):.4f} (naive is biased by BF)")
    # nominal volume: the pairs reused under new ObsIDs, extractions on a process pool
    jobs = []
    for k in range(args.pairs):
        a, b = pairs[k % len(pairs)]
        jobs.append((metas[a], metas[b], (10000 + 2 * k, 10001 + 2 * k), params))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        results = list(pool.map(_extract, jobs))
    t_ext = time.perf_counter() - t0
    exts = [r[0] for r in results]
    out, t_solve, c_solve, spent = timed_solve(exts, params)
    wall = time.perf_counter() - t0
    rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    print(f"PTC01 nominal ({2 * args.pairs} exposures, {args.pairs} pairs) on {args.workers} workers: extraction {t_ext:.1f} s "
          f"({np.median([r[1] for r in results]):.2f} s wall, {np.median([r[2] for r in results]):.2f} s CPU / pair median; "
          f"{sum(r[2] for r in results):.0f} s CPU in all), solve {t_solve:.1f} s -> wall {wall:.1f} s (goal < 60 s); "
          f"peak RSS {rss:.0f} MB per process")
    print(f"  solve fits: " + ", ".join(f"{k} {v:.2f} s" for k, v in spent.items()))
    print(f"# load average now {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
