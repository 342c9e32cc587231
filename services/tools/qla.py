"""``vison qla FILE.fits [--json]``: quick-look statistics per CCD quadrant (canonical
orientation) of the prescan, image and overscan, inside a border trim."""

from __future__ import annotations

import argparse
import json
import sys

from shared.fitsio import FrameError, read_frame
from shared.qla import QLA_REGIONS, frame_qla


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="FITS frame (the last HDU is read unless --hdu)")
    parser.add_argument("--hdu", default=-1, type=int, help="HDU index (default: last)")
    parser.add_argument("--border", default=3, type=int, help="pixels trimmed on every side of each region (3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    try:
        frame = read_frame(args.file, hdu=args.hdu)
    except FrameError as exc:
        print(f"vison qla: {exc}", file=sys.stderr)
        return 2
    vstart = int(frame.header.get("VSTART", 0))
    vend = int(frame.header.get("VEND", 2086))
    report = frame_qla(frame.data, border=args.border, vstart=vstart, vend=vend)
    if args.json:
        out = dict(report)
        out["_file"] = args.file
        out["_geometry"] = {"naxis1": frame.data.shape[1], "naxis2": frame.data.shape[0],
                            "overscan": frame.geometry.overscan, "vstart": vstart, "vend": vend}
        print(json.dumps(out, indent=1))
        return 0
    print(f"{args.file}  ({frame.data.shape[1]} x {frame.data.shape[0]}, overscan {frame.geometry.overscan}, rows {vstart}..{vend})")
    print(f"{'Q':<2} {'region':<6} {'mean':>10} {'std':>8} {'min':>8} {'max':>8} {'p25':>9} {'p50':>9} {'p75':>9}")
    for q, regions in report.items():
        for name in QLA_REGIONS:
            s = regions[name]
            print(f"{q:<2} {name:<6} {s['mean']:10.2f} {s['std']:8.3f} {s['min']:8.0f} {s['max']:8.0f} "
                  f"{s['p25']:9.1f} {s['p50']:9.1f} {s['p75']:9.1f}")
    return 0
