"""Benchmark of the NL family (engine v2): extraction cost per exposure (fluence and pile-up of
every quadrant), solve time (drift, linear reference, NL curve of every quadrant, tables), beside
what a user would script: astropy ``sigma_clipped_stats`` of each quadrant's image area minus its
prescan median, then a cubic ``np.polyfit``; with the peak RSS.

Run: ``.venv/bin/python bench/family_nl.py [--frames-per-fluence 1] [--ccds 3] [--data DIR]``
(nominal NL01: 4 frames per fluence, 109 exposures). Full-size frames are simulated in-process
(``services.sim.physics``: 1 % NL at 90 % of 2^16 ADU, 2 %/h drift) into ``--data`` (default a
temporary folder, removed after). Figures are printed, never asserted.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NL_FLUENCES = [0.5, 1.0, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 85.0, 90.0, 95.0, 100.0, 110.0]
T_FWC = 4.0


def sequence(per_fluence: int) -> list[tuple[float, str]]:
    seq = [(1.0, "BGD")] * 3
    for f in NL_FLUENCES:
        seq.append((50.0, "STAB"))
        seq += [(f, "FLU")] * per_fluence
    return seq + [(50.0, "STAB")]


def simulate(data: Path, per_fluence: int, n_ccds: int):
    """FITS frames of the NL01 script and their FrameMeta (exposure-log comments STAB/BGD/FLU)."""
    import numpy as np

    from services.analyzer.model import FrameMeta
    from services.sim.physics import FULL_SCALE_ADU, REFERENCE_GAIN, DetectorModel, Exposure, PhysicsConfig
    from shared.fitsio import write_frame
    from shared.geometry import QUADRANTS, Geometry, assemble

    data.mkdir(parents=True, exist_ok=True)
    model = DetectorModel(PhysicsConfig(nl_pct=1.0, nl_at_fraction=0.9, drift_pct_per_hour=2.0), seed=31)
    geo = Geometry()
    flux = FULL_SCALE_ADU * REFERENCE_GAIN / T_FWC
    t0 = datetime(2026, 12, 1, 10, 0, 0)
    metas, t = [], 0.0
    start = time.perf_counter()
    for k, (pct, c) in enumerate(sequence(per_fluence), start=1):
        et = pct / 100 * T_FWC if c != "BGD" else 0.0
        for ccd in range(1, n_ccds + 1):
            path = data / f"EUC_{k}_CCD{ccd}.fits"
            if not path.exists():
                e = Exposure(kind="flat" if c != "BGD" else "bias", exptime=et, flux_e_per_s=flux * (1 + 0.02 * t / 3600) * (c != "BGD"))
                quads = {q: model.simulate_quadrant(f"CCD{ccd}", q, e, model.rng("nl", k, ccd, q), geo).data for q in QUADRANTS}
                write_frame(path, np.asarray(assemble(quads)), ccd)
            metas.append(FrameMeta(obsid=k, ccd=ccd, path=str(path), exptime=et, date=t0 + timedelta(seconds=t), test="NL01",
                                   values={"comments": c, "wave": 4}))
        t += et + 93.5
    print(f"({len(metas)} frames ready in {time.perf_counter() - start:.0f} s)")
    return metas


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames-per-fluence", type=int, default=1, help="frames per fluence (nominal 4)")
    ap.add_argument("--ccds", type=int, default=3, choices=(1, 2, 3))
    ap.add_argument("--data", type=Path, help="frame folder (kept)")
    args = ap.parse_args(argv)

    import numpy as np

    from services.analyzer.family import Calibrations, TestRun, exposures_of
    from services.analyzer.families import nl
    from services.analyzer.model import ListSink
    from shared.fitsio import read_frame
    from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, quadrants

    tmp = None
    data = args.data
    if data is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench_nl_"))
        data = tmp
    try:
        metas = simulate(data, args.frames_per_fluence, args.ccds)
        exposures = exposures_of(metas, "BENCH")
        p = nl.FAMILY.parameters({})
        costs, ex = [], []
        for e in exposures:
            t0 = time.perf_counter()
            ex.append(nl.FAMILY.run_extraction((e,), Calibrations(), p))
            costs.append(time.perf_counter() - t0)
            e.release()
        print(f"NL01: {len(exposures)} exposures x {args.ccds} CCDs")
        print(f"extraction per exposure: median {statistics.median(costs):.2f} s, max {max(costs):.2f} s, total {sum(costs):.1f} s")
        t0 = time.perf_counter()
        out = nl.FAMILY.solve(ex, Calibrations(), p, TestRun.of("NL01", "BENCH", metas), ListSink())
        t_solve = time.perf_counter() - t0
        print(f"solve (all quadrants, from the extractions only): {t_solve:.2f} s")
        for ccd, qs in out.results.items():
            print(f"  {ccd}: " + ", ".join(f"{q} max NL {v['max_nl_pct']:+.3f} % at {v['max_nl_fluence_adu']:.0f} ADU, "
                                           f"dt {1e3 * v['shutter_offset_s']:+.1f} ms" for q, v in qs.items()))

        # what a user would script: astropy sigma-clipped stats per quadrant, then a cubic polyfit
        from astropy.stats import sigma_clipped_stats

        t0 = time.perf_counter()
        flu = []
        for m in metas:
            data_ = read_frame(m.path).data
            for q, quad in quadrants(data_).items():
                off = float(np.median(quad[:IMAGE_ROWS, 25:PRESCAN_COLS - 5]))
                mean, _, _ = sigma_clipped_stats(quad[:IMAGE_ROWS, PRESCAN_COLS + 5 : PRESCAN_COLS + IMAGE_COLS - 5], sigma=4.0)
                flu.append((m.exptime, mean - off))
        t_naive = time.perf_counter() - t0
        arr = np.array(flu)
        np.polyfit(arr[:, 0], arr[:, 1], 3)
        print(f"astropy sigma_clipped_stats per quadrant + polyfit: {t_naive / len(exposures):.2f} s per exposure, "
              f"{t_naive:.1f} s total (vison extraction: {sum(costs):.1f} s total)")
        print(f"peak RSS: {rss_mb():.0f} MB")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
