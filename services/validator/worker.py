"""Per-CCD work of the validator (a top-level function so that it runs in threads or processes):
checksum, read, per-quadrant statistics."""

from __future__ import annotations

import time
from typing import Any

from services.validator.checks import frame_stats
from services.validator.specific import injection_stats
from services.validator.specific_psf import add_spot_stats, is_point_frame
from shared.checksum import sha256_file
from shared.fitsio import FrameError, read_frame


def process_ccd(path: str, expected_sha256: str | None, vstart: int, vend: int,
                injection: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{"ok": True, "stats": {Q: quadrant_stats}, "shape": [rows, cols], "seconds": {...}}`` or
    ``{"ok": False, "what": "checksum" | "fits", "why": reason}`` for a bad file."""
    t0 = time.perf_counter()
    try:
        digest = sha256_file(path)
    except FileNotFoundError:
        return {"ok": False, "what": "fits", "why": "file not found (removed after ingest?)"}
    t1 = time.perf_counter()
    if expected_sha256 and digest != expected_sha256:
        return {"ok": False, "what": "checksum",
                "why": f"SHA-256 mismatch: ingest saw {expected_sha256[:12]}..., the file now has {digest[:12]}..."}
    try:
        frame = read_frame(path)
    except FrameError as exc:
        return {"ok": False, "what": "fits", "why": exc.reason}
    t2 = time.perf_counter()
    # 16-bit frames hold whole ADU in [0, 65535]: medians from histograms
    integer = int(frame.header.get("BITPIX", -32)) in (8, 16)
    stats = frame_stats(frame.data, vstart, vend, integer=integer)
    if is_point_frame(frame.header):  # point-source frames: a few spot sizes for the FOCUS00 / PSF checks
        add_spot_stats(frame.data, stats)
    extra: dict[str, Any] = {}
    if injection is not None:  # charge-injection frames: statistics of the injected lines
        extra["injection"] = injection_stats(frame.data, injection, stats)
    t3 = time.perf_counter()
    return {"ok": True, "stats": stats, "shape": list(frame.data.shape), **extra,
            "seconds": {"checksum": t1 - t0, "read": t2 - t1, "stats": t3 - t2}}
