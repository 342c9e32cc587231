"""DARK01 family (engine v2) speed and readout-dark accuracy on full-size frames.

Prints the time to read the frames, the per-exposure extraction cost, the solve time (3 master
darks stacked band by band from the files, defect masks, tables; no figures), the total and the
peak RSS; then the dark current against the simulated truth with the dark collected during
readout added to the frames (``rate x y x t_row``, which the simulator omits), with and without
the readout-time correction (mean and worst relative error over the 12 quadrants).

    .venv/bin/python bench/family_dark.py                 # simulates DARK01 (4 x 565 s) first
    .venv/bin/python bench/family_dark.py --data DIR [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.family_bias import peak_rss_mb, read_only, report, run_family, simulate  # noqa: E402
from services.analyzer.families.dark import FAMILY, row_time_s  # noqa: E402
from services.analyzer.family import GAIN, Calibration, Calibrations, TestRun, exposures_of  # noqa: E402
from services.analyzer.model import ListSink  # noqa: E402
from services.analyzer.selection import select_test  # noqa: E402
from shared.fitsio import read_frame  # noqa: E402
from shared.geometry import IMAGE_ROWS, PRESCAN_COLS, QUADRANTS, quadrant  # noqa: E402


def readout_dark_errors(data: Path) -> None:
    truth = json.loads((data / "truth.json").read_text())
    frames = select_test(data, "DARK01").complete_frames()
    gains = {c: {q: truth["ccds"][c]["quadrants"][q]["gain_e_per_adu"] for q in QUADRANTS} for c in truth["ccds"]}
    calib = Calibrations([Calibration(name=GAIN, block="BENCH", test="PTC01", values={"gain": gains})])

    def load(meta):
        arr = np.array(read_frame(meta.path).data)
        y = np.arange(IMAGE_ROWS, dtype=np.float64) * row_time_s(meta.values)
        for q in QUADRANTS:
            t = truth["ccds"][meta.ccd_name]["quadrants"][q]
            quadrant(arr, q)[:IMAGE_ROWS, PRESCAN_COLS:PRESCAN_COLS + 2048] += (
                t["dark_e_per_s"] / t["gain_e_per_adu"] * y).astype(np.float32)[:, None]
        return arr

    params = FAMILY.parameters({})
    exs = []
    for exp in exposures_of(frames, "BENCH", loader=load):
        exs.append(FAMILY.run_extraction([exp], Calibrations(), params))
        exp.release()
    run = TestRun.of("DARK01", "BENCH", frames)
    for mode in ("registers", "none"):
        out = FAMILY.solve(exs, calib, FAMILY.parameters({"readout_dark": mode}), run, ListSink())
        err = [out.results[c][q]["dark_current_e_s"] / truth["ccds"][c]["quadrants"][q]["dark_e_per_s"] - 1
               for c in out.results for q in QUADRANTS]
        print(f"  readout dark added, correction {mode:<9}: dark current error mean {100 * np.mean(err):+.2f} %, "
              f"worst {100 * max(err, key=abs):+.2f} %")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="data folder with a DARK01 (default: simulate 4 x 565 s)")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--no-accuracy", action="store_true", help="skip the readout-dark accuracy figures")
    args = ap.parse_args(argv)
    data = args.data or simulate("DARK01", args.frames, ["--exptime", "565", "--hot-pixels", "30", "--bad-columns", "4"])
    frames = select_test(data, "DARK01").complete_frames()
    read_only(frames[:3])
    t_read = read_only(frames)
    t0 = time.perf_counter()
    res = run_family("services.analyzer.families.dark", "DARK01", data, args.workers)
    report("DARK01 family (engine v2)", res, t_read)
    print(f"  peak RSS                        {peak_rss_mb():8.0f} MB")
    if not args.no_accuracy:
        readout_dark_errors(data)
    print(f"bench wall {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
