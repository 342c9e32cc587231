"""Benchmark of the live spine on the configured broker (VISON_AMQP_URL), with its own exchange and
queues (deleted at the end):

1. latency, per exposure of 3 full-size CCD frames, from "the exposure is complete on disk"
   (3 FITS renamed into the watched day folder, then the per-exposure HK file and the 3
   exposure-log rows written, as ELVIS does) to "``exposure.validated`` received", with ingest and
   validator running as processes (``vison stack``); median and p95 over ``--exposures`` (20);
2. validator throughput (exposures/s) with 1 and 2 validator processes consuming one queue
   (competing consumers) on a backlog of ``--backlog`` ingested exposures;
3. one exposure in-process with the 3 CCDs processed serially, by 3 threads, by 3 processes.

Run: ``.venv/bin/python bench/latency.py [--exposures 20] [--interval 2.5] [--backlog 8]``.
Target: median latency under 2 s on the 2-core machine. Prints the figures; exits 0 (also when
no broker is reachable: the benchmark is then skipped with a message).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.tools.demo import _broker_ok, _cleanup_broker  # noqa: E402
from services.tools.stack import Stack, free_port  # noqa: E402
from shared.bus import Publisher, Subscription, dead_queue_name, ensure_queue, queue_name  # noqa: E402
from shared.config import get_settings  # noqa: E402
from shared.events import ExposureIngested, ExposureValidated, FileRef, parse_event  # noqa: E402
from shared.explog import explog_header, format_explog_row  # noqa: E402
from shared.filenames import day_folder_name, explog_name, format_fits_name, hk_exposure_name  # noqa: E402
from shared.fitsio import write_frame  # noqa: E402
from shared.geometry import QUADRANTS, Geometry, assemble  # noqa: E402
from shared.hk import format_hk_row, hk_header  # noqa: E402
from shared.refdata import block_offsets  # noqa: E402

BLOCK = "BORN"
FAST_INGEST = ["--rescan-interval", "2", "--stable-seconds", "0.2"]


def _frames(rng: np.random.Generator) -> dict[int, np.ndarray]:
    g = Geometry()
    ref = block_offsets(BLOCK)
    noise = rng.standard_normal(g.shape, dtype=np.float32) * np.float32(1.3)
    out = {}
    for c in (1, 2, 3):
        quads = {q: np.full((g.quad_rows, g.quad_cols), ref[f"CCD{c}"][q], dtype=np.float32) for q in QUADRANTS}
        out[c] = assemble(quads, g) + noise
    return out


def _stage(staging: Path, obsid: int, date: datetime, frames: dict[int, np.ndarray]) -> dict[int, Path]:
    files = {}
    for c, data in frames.items():
        path = staging / format_fits_name(obsid, date, 1, c)
        write_frame(path, data, c, header={"OBSID": obsid, "vstart": 0, "vend": 2086})
        files[c] = path
    return files


def _explog_rows(obsid: int, date: datetime) -> str:
    rows = []
    for c in (1, 2, 3):
        rows.append(format_explog_row({
            "ObsID": obsid, "CCD": c, "ROE": 1, "date": date, "program": "BENCH", "test": "BIAS01",
            "exptime": 0.0, "vstart": 0, "vend": 2086, "chinj": 0, "operator": "bench",
        }))
    return "".join(rows)


def _hk(date: datetime) -> str:
    values = {f"CCD{c}_TEMP_{s}": -120.0 for c in (1, 2, 3) for s in "TB"}
    return hk_header() + "".join(format_hk_row(date + timedelta(seconds=s), values) for s in (0, 5, 10))


def _deliver(root: Path, staged: dict[int, Path], obsid: int, date: datetime) -> float:
    """Move an exposure into the watched folder like ELVIS; returns the time it was complete."""
    folder = root / day_folder_name(date.date())
    folder.mkdir(exist_ok=True)
    for path in staged.values():
        os.replace(path, folder / path.name)
    (folder / hk_exposure_name(obsid, date, 1)).write_text(_hk(date))
    log = folder / explog_name(date.date())
    new = not log.exists()
    with open(log, "a") as fh:
        fh.write((explog_header() if new else "") + _explog_rows(obsid, date))
    return time.time()


def pct(values: list[float], p: float) -> float:
    return float(np.percentile(values, p))


def latency_run(settings, env: dict, tmp: Path, n: int, interval: float) -> dict:
    root = Path(env["VISON_DATA_ROOT"])
    staging = tmp / "staging"
    staging.mkdir()
    stack = Stack(["ingest", "validator"], env=env, ports={"ingest": free_port(), "validator": free_port()},
                  log_dir=tmp / "logs", extra_args={"ingest": FAST_INGEST})
    rng = np.random.default_rng(1)
    frames = _frames(rng)
    start = datetime(2026, 6, 1, 8, 0, 0)
    complete: dict[int, float] = {}
    received: dict[int, float] = {}
    internal: dict[int, float] = {}
    ingest_part: dict[int, float] = {}
    processing: dict[int, float] = {}
    with Subscription(settings, ["exposure.validated.#", "exposure.ingested.#"]) as sub:
        stack.start()
        time.sleep(3.0)  # services up
        for i in range(1, n + 1):
            date = start + timedelta(seconds=100 * i)
            staged = _stage(staging, i, date, frames)
            target = time.monotonic() + interval
            complete[i] = _deliver(root, staged, i, date)
            while time.monotonic() < target or (i == n and len(received) < n and time.monotonic() < target + 60):
                for rk, _, body in sub.messages(timeout=0.1):
                    now = time.time()
                    ev = parse_event(body, rk)
                    if isinstance(ev, ExposureIngested):
                        ingest_part[ev.obsid] = (ev.produced_at - ev.complete_at).total_seconds()
                    if isinstance(ev, ExposureValidated) and ev.obsid not in received:
                        received[ev.obsid] = now
                        internal[ev.obsid] = (datetime.now(timezone.utc) - ev.complete_at).total_seconds()
                        processing[ev.obsid] = ev.processing_seconds or 0.0
                    break
    stack.stop()
    lat = [received[i] - complete[i] for i in sorted(received)]
    return {"n": len(lat), "expected": n, "latency": lat, "internal": [internal[i] for i in sorted(internal)],
            "ingest": list(ingest_part.values()), "processing": list(processing.values())}


def throughput_run(settings, env: dict, tmp: Path, backlog: int, processes: int) -> float:
    """Exposures/s of ``processes`` validator processes draining a backlog."""
    root = Path(env["VISON_DATA_ROOT"])
    rng = np.random.default_rng(2)
    frames = _frames(rng)
    date = datetime(2026, 6, 2, 8, 0, 0)
    folder = root / day_folder_name(date.date())
    folder.mkdir(exist_ok=True)
    refs = []
    for c, data in frames.items():
        path = folder / format_fits_name(900, date, 1, c)
        write_frame(path, data, c)
        refs.append(FileRef(ccd=c, path=path.relative_to(root).as_posix(),
                            sha256=hashlib.sha256(path.read_bytes()).hexdigest(), size=path.stat().st_size))
    rows = [{"ObsID": 900 + k, "CCD": f"CCD{c}", "test": "BIAS01", "exptime": 0.0, "vstart": 0, "vend": 2086}
            for k in range(1) for c in (1, 2, 3)]
    ensure_queue(settings, "validator", ["exposure.ingested.#", "campaign.defined.#"])
    with Publisher(settings, "bench") as pub:
        for k in range(backlog):
            pub.publish(ExposureIngested(obsid=1000 * processes + k, block=BLOCK, test="BIAS01", files=refs, explog=rows))
    stacks = [Stack(["validator"], env={**env, "VISON_STATE_DIR": str(tmp / f"state-v{processes}-{j}")},
                    ports={"validator": free_port()}, log_dir=tmp / f"logs-v{processes}-{j}") for j in range(processes)]
    got = 0
    with Subscription(settings, ["exposure.validated.#"]) as sub:
        t0 = time.monotonic()
        for s in stacks:
            s.start()
        end = t0 + 300
        first = None
        while got < backlog and time.monotonic() < end:
            for rk, _, body in sub.messages(timeout=0.5):
                got += 1
                first = first or time.monotonic()
                break
        t1 = time.monotonic()
    for s in stacks:
        s.stop()
    # time from the first result (processes started, connected) to the last, over backlog - 1 exposures
    return (got - 1) / (t1 - first) if first and got > 1 else 0.0


def in_process(tmp: Path) -> dict[str, float]:
    from services.validator.service import Validator
    from shared.config import Settings

    root = tmp / "inproc"
    root.mkdir()
    frames = _frames(np.random.default_rng(3))
    refs = []
    for c, data in frames.items():
        path = root / format_fits_name(1, datetime(2026, 6, 3), 1, c)
        write_frame(path, data, c)
        refs.append(FileRef(ccd=c, path=path.name, sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                            size=path.stat().st_size))
    ev = ExposureIngested(obsid=1, block=BLOCK, test="BIAS01", files=refs,
                          explog=[{"CCD": f"CCD{c}", "exptime": 0.0, "vstart": 0, "vend": 2086} for c in (1, 2, 3)])
    out = {}
    for pool, workers in (("serial", 1), ("thread", 3), ("process", 3)):
        v = Validator(Settings(data_root=root, state_dir=tmp / f"state-{pool}"), pool=pool, workers=workers)
        v.validate(ev)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            v.validate(ev)
            times.append(time.perf_counter() - t)
        v.close()
        out[f"{pool} x{workers}"] = statistics.median(times)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exposures", type=int, default=20, help="exposures in the latency run (20)")
    parser.add_argument("--interval", type=float, default=2.5, help="seconds between exposures (2.5)")
    parser.add_argument("--backlog", type=int, default=8, help="exposures in each throughput run (8)")
    args = parser.parse_args()
    base = get_settings()
    problem = _broker_ok(base.amqp_url)
    if problem:
        print(f"bench/latency.py: skipped, no broker at VISON_AMQP_URL ({problem})")
        return 0
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start")
    for_cleanup = []
    tmp = Path(tempfile.mkdtemp(prefix="vison-bench-"))
    try:
        results = {}
        for phase in ("latency", "throughput1", "throughput2"):
            tag = uuid.uuid4().hex[:8]
            env = {
                "VISON_EXCHANGE": f"vison-bench-{tag}", "VISON_QUEUE_PREFIX": f"vison-bench-{tag}",
                "VISON_DATA_ROOT": str(tmp / phase / "data"), "VISON_PRODUCTS_ROOT": str(tmp / phase / "products"),
                "VISON_STATE_DIR": str(tmp / phase / "state"), "VISON_BLOCK": BLOCK,
            }
            for key in ("data", "products", "state"):
                (tmp / phase / key).mkdir(parents=True)
            settings = base.model_copy(update={"exchange": env["VISON_EXCHANGE"], "queue_prefix": env["VISON_QUEUE_PREFIX"]})
            for_cleanup.append(settings)
            if phase == "latency":
                results[phase] = latency_run(settings, env, tmp / phase, args.exposures, args.interval)
            else:
                results[phase] = throughput_run(settings, env, tmp / phase, args.backlog, int(phase[-1]))
        inproc = in_process(tmp)
    finally:
        for settings in for_cleanup:
            _cleanup_broker(settings, [queue_name(settings, "ingest"), queue_name(settings, "validator"),
                                       dead_queue_name(settings)])
        shutil.rmtree(tmp, ignore_errors=True)
    lat = results["latency"]
    print(f"latency, exposure complete on disk -> exposure.validated received ({lat['n']} of {lat['expected']} "
          f"exposures of 3 x 4238x4172 frames, one every {args.interval:g} s):")
    if lat["latency"]:
        print(f"  median {statistics.median(lat['latency']):.2f} s, p95 {pct(lat['latency'], 95):.2f} s, "
              f"min {min(lat['latency']):.2f} s, max {max(lat['latency']):.2f} s  (target: median < 2 s)")
        print(f"  of which ingest-complete -> validated: median {statistics.median(lat['internal']):.2f} s, "
              f"p95 {pct(lat['internal'], 95):.2f} s; ingest-complete -> exposure.ingested published: median "
              f"{statistics.median(lat['ingest']):.2f} s; validator processing: median "
              f"{statistics.median(lat['processing']):.2f} s")
    print(f"validator throughput on a backlog of {args.backlog}: 1 process {results['throughput1']:.2f} exposures/s, "
          f"2 processes {results['throughput2']:.2f} exposures/s")
    print("one exposure in-process (checksums + read + statistics + checks of 3 CCDs): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in inproc.items()))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
