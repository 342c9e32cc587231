"""Benchmark: the validator's quick-look PNG of one exposure (3 full-size frames), median of N.

- from memory: bin the 3 frames already in memory (8 x 8), equalise, compose, write the PNG;
- from files: the fallback when the worker gives no binned copy: strided read of the 3 files
  (every 8th row, memory-mapped), bin along the rows, equalise, compose, write.
Target: < 0.3 s per exposure. Run: ``.venv/bin/python bench/quicklook.py [--repeat N]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from services.catalogue import synthetic as syn
from services.validator import quicklook
from shared.fitsio import read_frame, to_uint16, write_frame
from shared.geometry import Geometry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    geometry = Geometry()
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ev = syn.exposure(1)
        frames = {}
        for ref in ev.files:
            data = (2500 + 5 * rng.standard_normal(geometry.shape, dtype=np.float32)).astype(np.float32)
            path = root / ref.path
            path.parent.mkdir(parents=True, exist_ok=True)
            write_frame(path, to_uint16(data), ccd=ref.ccd)
            frames[ref.ccd] = read_frame(path).data
        t_bin, t_mem, t_file = [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            results = {c: {"thumb": quicklook.bin_frame(d)} for c, d in frames.items()}
            t1 = time.perf_counter()
            quicklook.write_quicklook(ev, quicklook.thumbnails(ev, results, root), root / "products")
            t2 = time.perf_counter()
            quicklook.write_quicklook(ev, quicklook.thumbnails(ev, {}, root), root / "products")
            t3 = time.perf_counter()
            t_bin.append(t1 - t0)
            t_mem.append(t2 - t0)
            t_file.append(t3 - t2)
        png = quicklook.quicklook_path(root / "products", ev.block, ev.obsid)
        size = png.stat().st_size / 1e3
    import os

    print(f"quick-look of one exposure (3 frames {geometry.shape[1]} x {geometry.shape[0]}), {args.repeat} runs, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs: median / best")
    for label, t in (("bin 3 frames in memory (8 x 8)   ", t_bin), ("from memory: bin + PNG           ", t_mem),
                     ("from files: strided read + PNG   ", t_file)):
        print(f"  {label} {statistics.median(t) * 1e3:7.1f} / {min(t) * 1e3:6.1f} ms   (target < 300 ms)")
    print(f"  PNG {size:.0f} kB")


if __name__ == "__main__":
    main()
