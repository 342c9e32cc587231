"""BIAS01 family (engine v2) speed on full-size frames, side by side with ccdproc.

Prints: the time to read the frames (bytes -> float32, nothing else), the per-exposure extraction
cost, the solve time (3 master biases stacked band by band from the files, frame-difference RON,
tables; no figures), the total, the peak RSS, and what a user would run instead: ccdproc's
``Combiner.median_combine`` per CCD + astropy ``sigma_clipped_stats`` of the prescan, image and
overscan of every quadrant of every frame (the same frames). Goals (issue 10): total within
10 x the read time, never slower than ccdproc.

    .venv/bin/python bench/family_bias.py                 # simulates BIAS01 (10 exposures) first
    .venv/bin/python bench/family_bias.py --data DIR      # an existing data folder
    .venv/bin/python bench/family_bias.py --workers 2     # extraction on a process pool
    .venv/bin/python bench/family_bias.py --no-ccdproc
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.analyzer.family import Calibrations, TestRun, exposures_of  # noqa: E402
from services.analyzer.selection import select_test  # noqa: E402
from shared.fitsio import read_frame  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def simulate(test: str, frames: int, extra: list[str]) -> Path:
    from services.cli import main as vison

    data = Path(tempfile.mkdtemp(prefix=f"bench_{test.lower()}_")) / "data"
    t0 = time.perf_counter()
    assert vison(["sim", "--out", str(data), "--block", "BENCH", "--seed", "7", "--test", test, "--frames", str(frames), *extra]) == 0
    print(f"simulated {test} x {frames} in {time.perf_counter() - t0:.1f} s -> {data}")
    return data


class Clock:
    """Wall and CPU (this process) time of a block: the machine is shared, so the CPU time is the
    figure that compares runs made under different loads."""

    def __enter__(self) -> "Clock":
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.w0, time.process_time() - self.c0

    def __str__(self) -> str:
        return f"{self.wall:8.2f} s wall {self.cpu:8.2f} s cpu"


class NullSink:
    """Products are dropped as they come (as the writer frees them once written)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add(self, product) -> None:
        self.names.append(product.name)


def read_only(frames) -> Clock:
    with Clock() as c:
        for f in frames:
            read_frame(f.path).data.sum(dtype="float64")  # touch every byte
    return c


def _extract_one(args):
    family_module, frames, block = args
    import importlib

    fam = importlib.import_module(family_module).FAMILY
    exp = exposures_of(frames, block)[0]
    with Clock() as c:
        ex = fam.run_extraction([exp], Calibrations(), fam.parameters({}))
    return ex, (c.wall, c.cpu)


def run_family(family_module: str, test: str, data: Path, workers: int, calib: Calibrations | None = None) -> dict:
    """Extraction (sequential or on a pool) + solve of one family; timings in s."""
    import importlib

    fam = importlib.import_module(family_module).FAMILY
    frames = select_test(data, test).complete_frames()
    if not frames:
        raise SystemExit(f"no {test} frames in {data}")
    block = "BENCH"
    by_obsid: dict[int, list] = {}
    for f in frames:
        by_obsid.setdefault(f.obsid, []).append(f)
    jobs = [(family_module, v, block) for _, v in sorted(by_obsid.items())]
    with Clock() as ce:
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                done = list(pool.map(_extract_one, jobs))
        else:
            done = [_extract_one(j) for j in jobs]
    extractions = [d[0] for d in done]
    per = [d[1] for d in done]
    run = TestRun.of(test, block, frames)
    with Clock() as cs:
        out = fam.solve(extractions, calib or Calibrations(), fam.parameters({}), run, NullSink())
    return {"frames": frames, "n_exposures": len(jobs), "extract": ce, "per_exposure": per, "solve": cs,
            "total_wall": ce.wall + cs.wall, "total_cpu": sum(p[1] for p in per) + cs.cpu, "out": out}


def ccdproc_equivalent(frames) -> Clock:
    """ccdproc median combine per CCD + astropy sigma-clipped stats per frame / quadrant / region."""
    import numpy as np
    from astropy import units as u
    from astropy.nddata import CCDData
    from astropy.stats import sigma_clipped_stats
    from ccdproc import Combiner

    from shared.geometry import QUADRANTS, quadrant, standard_region

    clock = Clock().__enter__()
    for ccd in sorted({f.ccd for f in frames}):
        mine = [f for f in frames if f.ccd == ccd]
        datas = []
        for f in mine:
            data = read_frame(f.path).data
            for q in QUADRANTS:
                quad = quadrant(data, q)
                for region in ("pre", "img", "ove"):
                    sigma_clipped_stats(standard_region(quad, region), sigma=4.0, maxiters=10)
            datas.append(CCDData(np.asarray(data, dtype=np.float32), unit=u.adu))
        Combiner(datas, dtype=np.float32).median_combine()
        del datas
    clock.__exit__()
    return clock


def report(name: str, res: dict, t_read: Clock) -> None:
    per_w = [p[0] for p in res["per_exposure"]]
    per_c = [p[1] for p in res["per_exposure"]]
    print(f"{name}: {res['n_exposures']} exposures, {len(res['frames'])} frames; load average {os.getloadavg()[0]:.1f}")
    print(f"  read only (all frames)          {t_read}")
    print(f"  extraction per exposure         {sum(per_w) / len(per_w):8.2f} s wall {sum(per_c) / len(per_c):8.2f} s cpu")
    print(f"  extraction (all)                {res['extract']}")
    print(f"  solve                           {res['solve']}")
    print(f"  total                           {res['total_wall']:8.2f} s wall {res['total_cpu']:8.2f} s cpu"
          f"  = {res['total_wall'] / t_read.wall:.1f} x read wall, {res['total_cpu'] / t_read.cpu:.1f} x read cpu")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="data folder with a BIAS01 (default: simulate 10 exposures)")
    ap.add_argument("--frames", type=int, default=10, help="exposures to simulate (default 10, nominal)")
    ap.add_argument("--workers", type=int, default=1, help="extraction processes (default 1)")
    ap.add_argument("--no-ccdproc", action="store_true", help="skip the ccdproc comparison")
    args = ap.parse_args(argv)
    data = args.data or simulate("BIAS01", args.frames, [])
    frames = select_test(data, "BIAS01").complete_frames()
    read_only(frames[:3])  # warm the page cache like a live run (frames just written)
    t_read = read_only(frames)
    res = run_family("services.analyzer.families.bias", "BIAS01", data, args.workers)
    report("BIAS01 family (engine v2)", res, t_read)
    print(f"  peak RSS                        {peak_rss_mb():8.0f} MB", flush=True)
    if not args.no_ccdproc:
        cp = ccdproc_equivalent(frames)
        print(f"ccdproc Combiner.median_combine + sigma_clipped_stats: {cp}  (family total / ccdproc: "
              f"{res['total_wall'] / cp.wall:.2f} wall, {res['total_cpu'] / cp.cpu:.2f} cpu); peak RSS {peak_rss_mb():.0f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
