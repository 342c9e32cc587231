"""Benchmark of the FLAT family (engine v2): extraction cost per exposure, solve time per script
column (``families.flat.solve_column``: the band-by-band stack of the column's frames) and of the
whole solve, beside ccdproc's median ``combine`` of the same frames (normalised by their median,
one CCD), with the peak RSS.

Run: ``.venv/bin/python bench/family_flat.py [--frames 8,6,4] [--data DIR] [--ccdproc-ccds 1]``
(``--frames 80,60,30`` is the nominal FLAT01: 170 exposures x 3 CCDs, 18 GB of frames; the
default is a reduced volume). Frames are simulated once into ``--data`` (default a temporary
folder) with ``vison sim``; ccdproc is in the ``bench`` extra (``pip install -e .[bench]``).
Figures are printed, never asserted.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the analyzer workers run

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def simulate(data: Path, frames: str) -> None:
    from services.cli import main as vison

    if (data / "truth.json").exists():
        return
    t0 = time.perf_counter()
    code = vison(["sim", "--out", str(data), "--block", "BENCH", "--seed", "1", "--test", "FLAT01", "--fluence", "0.25,0.5,0.75",
                  "--frames", frames, "--wave", "4", "--prnu", "1.5"])
    if code:
        raise SystemExit(f"simulation failed ({code})")
    print(f"(simulated {frames} frames per column in {time.perf_counter() - t0:.0f} s)")


class DropSink:
    """Products are counted and dropped (the analyzer's writer writes and frees them)."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add(self, product) -> None:
        self.names.append(product.name)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", default="8,6,4", help="frames per column (25/50/75 %% of 2^16 ADU); nominal 80,60,30")
    ap.add_argument("--data", type=Path, help="data root (kept; simulated when empty)")
    ap.add_argument("--ccdproc-ccds", type=int, default=1, help="CCDs combined with ccdproc (0: skip)")
    args = ap.parse_args(argv)

    from services.analyzer.family import Calibrations, TestRun, exposures_of
    from services.analyzer.families import flat
    from services.analyzer.selection import select_test

    tmp = None
    data = args.data
    if data is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench_flat_"))
        data = tmp / "data"
    try:
        simulate(data, args.frames)
        metas = select_test(data, "FLAT01").complete_frames()
        exposures = exposures_of(metas, "BENCH")
        p = flat.FAMILY.parameters({})
        calib = Calibrations()
        print(f"FLAT01: {len(exposures)} exposures, {len(metas)} frames")

        # extraction, per exposure (3 CCDs x 4 quadrants each); the read alone beside
        from shared.fitsio import read_frame

        t0 = time.perf_counter()
        for m in metas[: min(6, len(metas))]:
            read_frame(m.path)
        t_read = (time.perf_counter() - t0) / min(6, len(metas))
        costs, ex = [], []
        for e in exposures:
            t0 = time.perf_counter()
            ex.append(flat.FAMILY.run_extraction((e,), calib, p))
            costs.append(time.perf_counter() - t0)
            e.release()
        n_ccd = len(exposures[0].ccds())
        print(f"extraction per exposure ({n_ccd} CCDs): median {statistics.median(costs):.2f} s, max {max(costs):.2f} s, "
              f"total {sum(costs):.1f} s (reading one frame: {t_read:.2f} s, i.e. {n_ccd * t_read:.2f} s per exposure)")

        # solve per column (what can run as soon as a column is extracted), CCD by CCD
        run = TestRun.of("FLAT01", "BENCH", metas)
        columns = flat.column_groups(ex)
        per_col: dict[int, float] = {}
        for ccd in run.ccds():
            paths = {f.obsid: f.path for f in run.frames_of(ccd)}
            for k, col in enumerate(columns, start=1):
                t0 = time.perf_counter()
                sol = flat.solve_column(ccd, k, col, [paths[e.obsids[0]] for e in col], p, calib)
                per_col[k] = per_col.get(k, 0.0) + time.perf_counter() - t0
                del sol
        for k, col in enumerate(columns, start=1):
            print(f"solve_column {k} ({len(col)} frames x {len(run.ccds())} CCDs): {per_col[k]:.1f} s")
        t0 = time.perf_counter()
        out = flat.FAMILY.solve(ex, calib, p, run, DropSink())
        t_solve = time.perf_counter() - t0
        print(f"whole solve (all columns, CCD masters, masks, tables): {t_solve:.1f} s; "
              f"after the last exposure, with columns solved as they complete: ~{per_col[len(columns)] + max(0.0, t_solve - sum(per_col.values())):.1f} s "
              f"(last column + the CCD masters; load varies between the two measurements)")
        first = next(iter(out.results.values()))
        print("PRNU %: " + ", ".join(f"{q} {v['prnu_pct']:.3f}" for q, v in first.items()))
        print(f"peak RSS so far: {rss_mb():.0f} MB")

        if args.ccdproc_ccds:
            import logging
            import warnings

            warnings.filterwarnings("ignore")
            logging.getLogger("astropy").setLevel(logging.ERROR)
            try:
                import ccdproc  # noqa: F401
                from astropy import units as u
                import numpy as np
            except ImportError:
                print("ccdproc not installed (pip install -e .[bench]): comparison skipped")
                return 0
            for ccd in run.ccds()[: args.ccdproc_ccds]:
                paths = {f.obsid: f.path for f in run.frames_of(ccd)}
                for k, col in enumerate(columns, start=1):
                    files = [paths[e.obsids[0]] for e in col]
                    t0 = time.perf_counter()
                    ccdproc.combine(files, method="median", unit=u.adu, hdu=1, scale=lambda a: 1.0 / np.median(a),
                                    mem_limit=1.0e9, dtype=np.float32)
                    dt = time.perf_counter() - t0
                    print(f"ccdproc.combine median of column {k} ({len(files)} frames, {ccd}): {dt:.1f} s "
                          f"(vison solve_column, 3 CCDs: {per_col[k]:.1f} s)")
            print(f"peak RSS: {rss_mb():.0f} MB")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
