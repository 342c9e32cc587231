"""Benchmark: time to read and quick-look one full-size frame, beside the time to only read its
bytes (printed as a ratio). Run: ``.venv/bin/python bench/qla.py [--repeat N]``."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from shared.fitsio import read_frame, write_frame
from shared.geometry import Geometry
from shared.qla import frame_qla


def _frame(geometry: Geometry, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (2500 + 1.4 * rng.standard_normal(geometry.shape, dtype=np.float32)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    geometry = Geometry()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_frame(Path(tmp) / "EUC_1_010125D120000T_ROE1_CCD1.fits", _frame(geometry), ccd=1)
        size_mb = path.stat().st_size / 1e6
        t_bytes, t_read, t_qla = [], [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            path.read_bytes()
            t1 = time.perf_counter()
            frame = read_frame(path)
            t2 = time.perf_counter()
            frame_qla(frame.data)
            t3 = time.perf_counter()
            t_bytes.append(t1 - t0)
            t_read.append(t2 - t1)
            t_qla.append(t3 - t2)
    b, r, q = (statistics.median(t) for t in (t_bytes, t_read, t_qla))
    print(f"frame {geometry.shape[1]} x {geometry.shape[0]} ({size_mb:.1f} MB), median of {args.repeat}")
    print(f"  read bytes only         {b * 1e3:8.1f} ms")
    print(f"  read_frame (float32)    {r * 1e3:8.1f} ms")
    print(f"  quick-look statistics   {q * 1e3:8.1f} ms")
    print(f"  read + quick-look       {(r + q) * 1e3:8.1f} ms  = {(r + q) / b:.1f} x the bytes-only read")


if __name__ == "__main__":
    main()
