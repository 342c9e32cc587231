"""Benchmark of the analysis engine v2 (full-size simulated frames), printed side by side:

- per family (test): extraction cost per exposure (or pair), solve time, offline wall time with
  ``--workers N`` local processes, against the time to only read the frames;
- live latency: last ``exposure.validated`` -> ``analysis.completed`` for BIAS01 with the real
  analyzer (``vison analyze --workers 2``; exposures published as they would arrive, one every
  ``--cadence`` s), and peak RSS of the analyzer processes.

Run: ``.venv/bin/python bench/analysis.py [--tests BIAS01,PTC01] [--workers 2] [--data DIR] [--no-live]``
(PTC01 simulates 92 x 3 full-size frames, 3.3 GB). The ccdproc / naive-script comparisons are in
the family developers' bench scripts.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the analyzer workers run

import argparse
import resource
import shutil
import socket
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Case:
    test: str
    sim_args: list[str]
    expected: int


CASES: dict[str, Case] = {
    "BIAS01": Case("BIAS01", ["--test", "BIAS01", "--frames", "10"], expected=10),
    "PTC01": Case("PTC01", ["--campaign", "full", "--tests", "PTC01"], expected=92),
}


def simulate(case: Case, root: Path) -> Path:
    from services.cli import main as vison

    data = root / f"data_{case.test}"
    if not (data / "truth.json").exists():
        t0 = time.perf_counter()
        if vison(["sim", "--out", str(data), "--block", "BENCH", "--seed", "1", *case.sim_args]):
            raise SystemExit(f"simulation of {case.test} failed")
        print(f"  (simulated in {time.perf_counter() - t0:.0f} s)")
    return data


def time_read(paths: list[str]) -> float:
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass
    return time.perf_counter() - t0


def offline(case: Case, data: Path, out: Path, workers: int) -> dict:
    """The two stages as ``vison analyze`` runs them; timings of each."""
    from services.analyzer import planner, registry
    from services.analyzer.execute import file_sha256
    from services.analyzer.local import run_extractions, solve
    from services.analyzer.selection import select_test

    fam = registry.get(case.test)
    frames = select_test(data, case.test).complete_frames()
    t0 = time.perf_counter()
    frames = [f.model_copy(update={"sha256": file_sha256(f.path)}) for f in frames]
    t_hash = time.perf_counter() - t0
    jobs = planner.extract_jobs(fam, "BENCH", case.test, frames, {}, [])
    t1 = time.perf_counter()
    done = run_extractions(jobs, data, out, workers, progress=False)
    t_extract = time.perf_counter() - t1
    sjob = planner.solve_job(fam, "BENCH", case.test, frames, done, {}, [], case.expected)
    reply = solve(sjob, data, out, figures=True)
    wall = time.perf_counter() - t0
    if reply.status != "completed":
        raise SystemExit(f"{case.test} failed: {reply.error}")
    per_unit = [d.duration_s for d in done]
    return {"family": fam.name, "frames": [f.path for f in frames], "units": len(done), "hash": t_hash,
            "extract_wall": t_extract, "extract_per_unit": sum(per_unit) / len(per_unit) if per_unit else 0.0,
            "solve": reply.duration_s, "wall": wall}


def _broker_up(url: str) -> bool:
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 5672), timeout=2):
            return True
    except OSError:
        return False


def live_latency(case: Case, data: Path, root: Path, workers: int, cadence: float) -> dict:
    """Last exposure.validated published -> analysis.completed received, real analyzer."""
    import hashlib

    from services.analyzer.coordinator import BINDINGS
    from services.tools.stack import Stack, free_port
    from shared.bus import Publisher, Subscription, ensure_queue
    from shared.config import Settings
    from shared.events import AnalysisCompleted, CampaignDefined, ExposureValidated, FileRef, parse_event
    from shared.explog import merge_explogs, read_explog

    tag = f"bench-{uuid.uuid4().hex[:8]}"
    env = {"VISON_EXCHANGE": tag, "VISON_QUEUE_PREFIX": tag, "VISON_DATA_ROOT": str(data),
           "VISON_PRODUCTS_ROOT": str(root / f"products_{tag}"), "VISON_STATE_DIR": str(root / f"state_{tag}")}
    settings = Settings(**{k[6:].lower(): v for k, v in env.items()})
    rows = merge_explogs([read_explog(p, complete=True) for p in sorted(data.rglob("EXP_LOG_*.txt"))]).rows
    events = []
    for obsid in sorted({r.obsid for r in rows if r.test == case.test}):
        mine = [r for r in rows if r.obsid == obsid]
        files = []
        for r in mine:
            path = next(data.rglob(f"{r.file_name}.fits"))
            files.append(FileRef(ccd=r.ccd, path=path.relative_to(data).as_posix(),
                                 sha256=hashlib.sha256(path.read_bytes()).hexdigest(), size=path.stat().st_size))
        events.append(ExposureValidated(obsid=obsid, block="BENCH", test=case.test, files=files,
                                        explog=[{**r.values, "ccd": r.ccd} for r in mine], passed=True, flags=0,
                                        flag_names=[], compliance={}, stats={}, producer="bench"))
    ensure_queue(settings, "analyzer", BINDINGS)
    stack = Stack(["analyzer"], env=env, ports={"analyzer": free_port()}, log_dir=root / f"logs_{tag}", restart=False,
                  extra_args={"analyzer": ["--workers", str(workers)]})
    peak = 0.0
    try:
        with Subscription(settings, ["analysis.completed.#"]) as sub, Publisher(settings) as pub:
            stack.start()
            time.sleep(5.0)  # workers up (imports), as in a running service
            pub.publish(CampaignDefined(block="BENCH", definition={"tests": [{"name": case.test, "expected_frames": case.expected}]}))
            for ev in events:
                pub.publish(ev)
                t_last = time.perf_counter()
                peak = max(peak, _rss_tree())
                time.sleep(cadence)
            latency = None
            while latency is None and time.perf_counter() - t_last < 1800:
                peak = max(peak, _rss_tree())
                for rk, _, body in sub.messages(timeout=0.2):
                    ev = parse_event(body, rk)
                    if isinstance(ev, AnalysisCompleted):
                        latency = time.perf_counter() - t_last
                        break
    finally:
        stack.stop()
        for p in root.glob(f"*_{tag}"):
            shutil.rmtree(p, ignore_errors=True)
    return {"latency": latency, "peak_rss_mb": peak}


def _rss_tree() -> float:
    """Largest RSS (MB) among this process's descendants (the service and its workers), /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, float] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = dict(line.split(":", 1) for line in (d / "status").read_text().splitlines() if ":" in line)
            parents[int(d.name)] = int(fields["PPid"])
            rss[int(d.name)] = float(fields.get("VmRSS", "0 kB").split()[0]) / 1e3
        except (OSError, KeyError, ValueError):
            continue
    mine, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier and p not in mine}
        mine |= frontier
    return max((rss.get(p, 0.0) for p in mine), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", default="BIAS01", help=f"comma separated, of: {', '.join(CASES)}")
    parser.add_argument("--workers", type=int, default=2, help="offline processes / live workers (2)")
    parser.add_argument("--cadence", type=float, default=1.0, help="live: seconds between exposures (1.0)")
    parser.add_argument("--data", type=Path, default=None, help="keep / reuse simulated data in this folder")
    parser.add_argument("--no-live", action="store_true", help="skip the live latency run")
    args = parser.parse_args()
    from shared.config import get_settings

    root = Path(args.data) if args.data else Path(tempfile.mkdtemp(prefix="vison-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for name in [t.strip() for t in args.tests.split(",") if t.strip()]:
            case = CASES[name]
            data = simulate(case, root)
            out = root / f"products_{name}"
            shutil.rmtree(out, ignore_errors=True)
            r = offline(case, data, out, args.workers)
            r["read"] = time_read(r["frames"])
            again = offline(case, data, out, args.workers)  # unchanged inputs: stored extractions re-used
            r["rerun"] = again["wall"]
            if name == "BIAS01" and not args.no_live and _broker_up(get_settings().amqp_url):
                r.update(live_latency(case, data, root, args.workers, args.cadence))
            rows.append((name, r))
    finally:
        if not args.data:
            shutil.rmtree(root, ignore_errors=True)
    self_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    child_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e3
    print(f"\n{os.cpu_count()} CPUs, {args.workers} worker process(es)")
    print(f"{'test':8} {'family':8} {'units':>5} {'extract/unit':>12} {'solve':>7} {'read':>7} {'offline':>8} {'x read':>6} "
          f"{'re-run':>7} {'live latency':>12}")
    for name, r in rows:
        live = f"{r['latency']:.1f} s" if r.get("latency") is not None else "-"
        print(f"{name:8} {r['family']:8} {r['units']:5d} {r['extract_per_unit']:10.2f} s {r['solve']:5.1f} s {r['read']:5.1f} s "
              f"{r['wall']:6.1f} s {r['wall'] / r['read']:6.1f} {r['rerun']:5.1f} s {live:>12}")
    print(f"peak RSS: this process {self_rss:.0f} MB, largest child (pool / service worker) {child_rss:.0f} MB"
          + "".join(f", live analyzer process {r['peak_rss_mb']:.0f} MB" for _, r in rows if r.get("peak_rss_mb")))


if __name__ == "__main__":
    main()
