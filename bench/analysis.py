"""Benchmark: analysis time of a test at its nominal data volume (full-size simulated frames),
beside the time to only read those frames, and the analyzer's throughput with 1 and 2 worker
processes (the real service on the broker: ``vison analyzer --workers N``, K test runs enqueued
at once, analyses per hour).

Run: ``.venv/bin/python bench/analysis.py [--tests BIAS01,PTC01] [--jobs 2] [--workers 1,2] [--data DIR]``
(``--workers 0``: analysis time only, no throughput runs; PTC01 simulates 92 x 3 frames, 3.3 GB).
Without a broker the throughput is measured with a plain process pool (said so in the output).

Add a test: one entry in ``CASES`` (simulator arguments and the expected exposures).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the analyzer workers run

import argparse
import shutil
import socket
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Case:
    """A benchmarked test: how to simulate its data and how many exposures it has."""

    test: str
    sim_args: list[str]
    expected: int
    params: dict = field(default_factory=dict)


CASES: dict[str, Case] = {
    "BIAS01": Case("BIAS01", ["--test", "BIAS01", "--frames", "10"], expected=10),
    # PTC01 at its nominal volume: 92 exposures (11 fluences, 10 or 4 frames each), 800 nm
    "PTC01": Case("PTC01", ["--campaign", "full", "--tests", "PTC01"], expected=92),
}


def simulate(case: Case, root: Path) -> Path:
    from services.cli import main as vison

    data = root / f"data_{case.test}"
    if not (data / "truth.json").exists():
        t0 = time.perf_counter()
        code = vison(["sim", "--out", str(data), "--block", "BENCH", "--seed", "1", *case.sim_args])
        if code:
            raise SystemExit(f"simulation of {case.test} failed ({code})")
        print(f"  (simulated in {time.perf_counter() - t0:.0f} s)")
    return data


def frames_of(case: Case, data: Path):
    from services.analyzer.selection import select_test

    sel = select_test(data, case.test)
    frames = sel.complete_frames()
    if len({f.obsid for f in frames}) != case.expected:
        raise SystemExit(f"{data}: {len(frames)} frames of {case.test}, expected {case.expected} exposures")
    return frames


def time_read(frames) -> float:
    from shared.fitsio import read_frame

    t0 = time.perf_counter()
    for f in frames:
        read_frame(f.path)
    return time.perf_counter() - t0


def _analyse(args) -> float:
    test, frames, out, params = args
    from services.analyzer.runner import run_analysis

    t0 = time.perf_counter()
    run_analysis(test, "BENCH", frames, out, params=params, expected_frames=None, verify=True)
    return time.perf_counter() - t0


def _broker_up(url: str) -> bool:
    from urllib.parse import urlparse

    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 5672), timeout=2):
            return True
    except OSError:
        return False


def throughput_service(case: Case, data: Path, frames, workers: int, jobs: int, root: Path) -> float:
    """Wall time for ``jobs`` runs of the test (repeats .1 .. .K on the same frames) through the
    real analyzer with ``workers`` processes; returns seconds."""
    import pika

    from services.analyzer.collector import BINDINGS
    from services.tools.stack import Stack, free_port
    from shared.bus import Publisher, Subscription, connection_parameters, ensure_queue
    from shared.config import Settings
    from shared.events import AnalysisCompleted, CampaignDefined, ExposureValidated, FileRef, parse_event

    tag = f"bench-{uuid.uuid4().hex[:8]}"
    env = {"VISON_EXCHANGE": tag, "VISON_QUEUE_PREFIX": tag, "VISON_DATA_ROOT": str(data),
           "VISON_PRODUCTS_ROOT": str(root / f"products_{tag}"), "VISON_STATE_DIR": str(root / f"state_{tag}")}
    settings = Settings(**{k[6:].lower(): v for k, v in env.items()})
    labels = [f"{case.test}.{k}" for k in range(1, jobs + 1)]
    events = []
    by_obsid: dict[int, list] = {}
    for f in frames:
        by_obsid.setdefault(f.obsid, []).append(f)
    for label in labels:
        for obsid, fs in sorted(by_obsid.items()):
            files = [FileRef(ccd=f.ccd, path=Path(f.path).relative_to(data).as_posix(), sha256=f.sha256 or "", size=0) for f in fs]
            events.append(ExposureValidated(obsid=obsid, block="BENCH", test=label, files=files,
                                            explog=[{**f.values, "ccd": f.ccd} for f in fs], passed=True, flags=0,
                                            flag_names=[], compliance={}, stats={}, producer="bench"))
    ensure_queue(settings, "analyzer", BINDINGS)
    stack = Stack(["analyzer"], env=env, ports={"analyzer": free_port()}, log_dir=root / f"logs_{tag}", restart=False,
                  extra_args={"analyzer": ["--workers", str(workers)]})
    done: set[str] = set()
    try:
        with Subscription(settings, ["analysis.completed.#"]) as sub, Publisher(settings) as pub:
            stack.start()
            time.sleep(3.0)  # workers up (imports), as in a running service
            pub.publish(CampaignDefined(block="BENCH", definition={"tests": [{"name": l, "expected_frames": case.expected}
                                                                             for l in labels]}))
            t0 = time.perf_counter()
            for ev in events:
                pub.publish(ev)
            while len(done) < jobs and time.perf_counter() - t0 < 3600:
                for rk, _, body in sub.messages(timeout=1.0):
                    ev = parse_event(body, rk)
                    if isinstance(ev, AnalysisCompleted):
                        if ev.status != "completed":
                            raise SystemExit(f"analysis failed: {ev.error}")
                        done.add(f"{ev.test}.{ev.repeat}")
            wall = time.perf_counter() - t0
    finally:
        stack.stop()
        conn = pika.BlockingConnection(connection_parameters(settings.amqp_url))
        ch = conn.channel()
        for q in (f"{tag}.analyzer", f"{tag}.analyzer.jobs", f"{tag}.dead"):
            ch.queue_delete(q)
        for x in (tag, f"{tag}.dlx"):
            ch.exchange_delete(x)
        conn.close()
        for p in root.glob(f"*_{tag}"):
            shutil.rmtree(p, ignore_errors=True)
    return wall


def throughput_pool(case: Case, frames, workers: int, jobs: int, root: Path) -> float:
    out = root / f"products_pool{workers}"
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_analyse, [(f"{case.test}.{k}", frames, out, case.params) for k in range(1, jobs + 1)]))
    wall = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", default="BIAS01", help=f"comma separated, of: {', '.join(CASES)}")
    parser.add_argument("--jobs", type=int, default=2, help="test runs enqueued at once for the throughput (2)")
    parser.add_argument("--workers", default="1,2", help="worker counts for the throughput (1,2)")
    parser.add_argument("--data", type=Path, default=None, help="keep / reuse simulated data in this folder")
    parser.add_argument("--no-service", action="store_true", help="measure the throughput with a process pool")
    args = parser.parse_args()
    from shared.config import get_settings

    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="vison-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    use_service = not args.no_service and _broker_up(get_settings().amqp_url)
    try:
        for name in [t.strip() for t in args.tests.split(",") if t.strip()]:
            case = CASES[name]
            data = simulate(case, root)
            frames = frames_of(case, data)
            size = sum(Path(f.path).stat().st_size for f in frames) / 1e9
            print(f"{case.test}: {case.expected} exposures x 3 CCDs = {len(frames)} full-size frames ({size:.2f} GB on disk), "
                  f"{os.cpu_count()} CPUs")
            t_read = time_read(frames)
            print(f"  read frames only (page cache warm)   {t_read:7.1f} s  ({t_read / len(frames):.2f} s/frame)")
            t_an = _analyse((case.test, frames, root / "products_single", case.params))
            products = sum(p.stat().st_size for p in (root / "products_single").rglob("*") if p.is_file()) / 1e6
            print(f"  analysis, one process                {t_an:7.1f} s  ({t_an / t_read:.1f} x the read; "
                  f"checksums, products {products:.0f} MB and figures included)")
            shutil.rmtree(root / "products_single", ignore_errors=True)
            how = "service on the broker" if use_service else "process pool (no broker)"
            base = None
            for w in [int(x) for x in args.workers.split(",") if x.strip() and int(x) > 0]:
                wall = (throughput_service(case, data, frames, w, args.jobs, root) if use_service
                        else throughput_pool(case, frames, w, args.jobs, root))
                rate = args.jobs / wall * 3600
                base = base or rate
                print(f"  throughput, {w} worker(s) [{how}]  {args.jobs} runs in {wall:6.1f} s = {rate:5.1f} analyses/h"
                      f"  (x{rate / base:.2f})")
    finally:
        if not args.data:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
