"""``vison reprocess --data DIR [--tests T1,T2] [--block B] [--workers-local N]``: re-analyse every
analysable test of a data root on the shared jobs queue.

It finds the tests through the exposure logs, hashes the frames (the SHA-256 ingest would give,
so job ids equal the live ones), and acts as a coordinator (:class:`Coordinator`, its own store
and reply queue ``<prefix>.reprocess.<run id>``) for this run: the extraction jobs then the solves
go to ``<prefix>.analyzer.jobs``, where any number of ``vison analyzer --no-collector --workers N``
processes on any hosts (one broker, one shared data / products volume) share them; it shows
progress and ETA and publishes the ``analysis.completed`` of each test (``provenance.reprocess``
= the run id). Running it again with unchanged inputs and parameters does nothing new: the same
job ids are answered from the stored outputs at once, and the events keep their ids.

``DIR`` must be the data root as the workers see it (``VISON_DATA_ROOT``): jobs carry paths
relative to it. Calibrations provided by tests that are not reprocessed come from the
``results.json`` of the block's earlier analyses in the products root. ``--campaign FILE``: the
expected exposures and parameters of each test (as ``campaign.defined`` gives them live; the
same plan gives the same job and event ids), else the catalogue's.
Exit status: 0 every test analysed, 1 some failed, 2 usage, 3 no data, 5 timed out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import logging
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from services.analyzer import registry
from services.analyzer.coordinator import Coordinator
from services.analyzer.definitions import load_definition, plans_from_definition
from services.analyzer.execute import file_sha256
from services.analyzer.jobs import parse_done, reprocess_queue
from services.analyzer.local import Progress
from services.analyzer.main import ThreadPublishers, WorkerPool
from services.analyzer.model import FrameMeta
from services.analyzer.offline import _block_of, block_calibrations
from services.analyzer.selection import find_explogs, select_test
from services.analyzer.store import AnalyzerStore
from shared.bus import Consumer, broker_connection, declare_queue
from shared.config import get_settings
from shared.explog import merge_explogs, read_explog

log = logging.getLogger("vison.reprocess")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="data root (as the workers see it: VISON_DATA_ROOT)")
    parser.add_argument("--tests", default=None, help="only these test runs (comma separated), e.g. BIAS01,PTC01")
    parser.add_argument("--block", default=None, help="block name (default: the frames' BLOCK header, else VISON_BLOCK)")
    parser.add_argument("--campaign", type=Path, default=None, help="campaign configuration or definition (YAML/JSON): "
                        "expected exposures and parameters of each test (default: the catalogue)")
    parser.add_argument("--workers-local", type=int, default=0, help="also run N analyzer workers in this process group")
    parser.add_argument("--timeout", type=float, default=None, help="give up after S seconds (exit 5)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar / lines")


def analysable_tests(data: Path) -> list[str]:
    """Test run labels of the exposure logs that a family analyses, in exposure order."""
    logs = find_explogs(data)
    if not logs:
        return []
    rows = merge_explogs([read_explog(p, complete=True) for p in logs]).rows
    seen: dict[str, int] = {}
    for r in rows:
        seen.setdefault(r.test, r.obsid)
    return [t for t, _ in sorted(seen.items(), key=lambda kv: kv[1]) if registry.find(t) is not None]


def _relative(frames: list[FrameMeta], root: Path) -> list[FrameMeta]:
    base = root.resolve()
    return [f.model_copy(update={"path": Path(f.path).resolve().relative_to(base).as_posix()}) for f in frames]


def _hashed(frames: list[FrameMeta], threads: int = 4) -> list[FrameMeta]:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        digests = list(pool.map(lambda f: file_sha256(f.path), frames))
    return [f.model_copy(update={"sha256": d}) for f, d in zip(frames, digests)]


def _delete_queue(settings: Any, name: str) -> None:
    try:
        conn = broker_connection(settings)
        try:
            conn.channel().queue_delete(name)
        finally:
            conn.close()
    except Exception as exc:  # noqa: BLE001 - a leftover empty queue is harmless
        log.warning("reply queue %s not deleted: %s", name, exc)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    data = args.data
    if not data.is_dir():
        print(f"vison reprocess: data folder {data} does not exist", file=sys.stderr)
        return 2
    tests = analysable_tests(data)
    if args.tests:
        wanted = [t.strip() for t in args.tests.split(",") if t.strip()]
        unknown = [t for t in wanted if registry.find(t) is None]
        if unknown:
            print(f"vison reprocess: no analysis for {', '.join(unknown)}", file=sys.stderr)
            return 2
        tests = [t for t in tests if t in wanted]
    if not tests:
        print(f"vison reprocess: no analysable test in the exposure logs of {data}", file=sys.stderr)
        return 3
    selections = {t: select_test(data, t) for t in tests}
    frames_of = {t: s.complete_frames() for t, s in selections.items() if s.complete_frames()}
    if not frames_of:
        print("vison reprocess: no complete exposure", file=sys.stderr)
        return 3
    first = next(iter(frames_of.values()))[0]
    block = args.block or _block_of(first.path) or settings.block
    run_id = uuid.uuid4().hex[:10]
    reply = reprocess_queue(settings, run_id)
    print(f"reprocess {run_id}: block {block}, {len(frames_of)} test(s): {', '.join(frames_of)}", flush=True)
    t0 = time.monotonic()
    frames_of = {t: _relative(_hashed(fs), data) for t, fs in frames_of.items()}
    print(f"  {sum(len(f) for f in frames_of.values())} frames hashed in {time.monotonic() - t0:.1f} s", flush=True)

    state = Path(tempfile.mkdtemp(prefix=f"vison-reprocess-{run_id}-"))
    store = AnalyzerStore(state / "reprocess.sqlite")
    if args.campaign:
        try:
            store.set_plans(block, plans_from_definition(load_definition(args.campaign)))
        except Exception as exc:
            print(f"vison reprocess: cannot read the campaign file {args.campaign}: {exc}", file=sys.stderr)
            return 2
    outbox = ThreadPublishers(settings)
    coord = Coordinator(settings, store, outbox, reply, reprocess=run_id)
    labels = set(frames_of)
    for t in frames_of:  # calibrations of tests not reprocessed: the block's earlier results
        fam = registry.find(t)
        for need in fam.needs:
            if not any(s in {registry.base_test(x) for x in labels} for s in need.sources):
                for cal in block_calibrations(Path(settings.products_root), block, fam):
                    store.add_calibration(cal)
    conn = broker_connection(settings)
    try:
        declare_queue(conn.channel(), settings, reply)
    finally:
        conn.close()
    pool = WorkerPool(args.workers_local) if args.workers_local else None
    if pool:
        pool.start()
    bar = None
    result = {"code": 0}
    try:
        def on_done(body: bytes, delivery: Any) -> None:
            coord.handle_done(parse_done(body), delivery)

        def tick(consumer: Consumer) -> None:
            nonlocal bar
            if pool:
                pool.check()
                pool.drain()
            rows = [r for r in coord.status() if r["test"] in labels]
            units = sum(sum((r.get("units") or {}).values()) for r in rows)
            settled = sum((r.get("units") or {}).get("done", 0) + (r.get("units") or {}).get("failed", 0) for r in rows)
            solved = sum(1 for r in rows if r["state"] in ("completed", "failed"))
            if bar is None and units:
                bar = Progress(units + len(rows), f"reprocess {run_id}", enabled=not args.no_progress)
            if bar is not None:
                while bar.n < min(settled + solved, bar.total):
                    bar.update()
            if rows and all(r["state"] in ("completed", "failed") for r in rows):
                consumer.stop()
            if args.timeout and time.monotonic() - t0 > args.timeout:
                result["code"] = 5
                consumer.stop()
            for p in outbox.all:
                p.tick()

        consumer = Consumer(settings, "reprocess", [], on_done, queue=reply, model=bytes, idempotent=False, tick=tick,
                            tick_interval=0.5)
        starter = threading.Thread(target=lambda: (consumer.ready.wait(60), _feed(coord, block, frames_of)), daemon=True)
        starter.start()
        consumer.run(install_signals=True)
        starter.join(5)
    finally:
        if bar is not None:
            bar.close()
        if pool:
            pool.stop()
        outbox.close()
        _delete_queue(settings, reply)
    rows = [r for r in status_list(coord) if r["test"] in labels]
    failed = 0
    for r in rows:
        print(f"  {r['test']:14} {r['state']:10} {r.get('event_id') or ''}")
        failed += r["state"] == "failed"
    print(f"reprocess {run_id}: {len(coord.published)} analysis.completed published in {time.monotonic() - t0:.1f} s")
    store.close()
    if result["code"]:
        return result["code"]
    return 1 if failed else 0


def status_list(coord: Coordinator) -> list[dict[str, Any]]:
    return coord.status()


def _feed(coord: Coordinator, block: str, frames_of: dict[str, list[FrameMeta]]) -> None:
    """Every test's frames, then close it (solve what is there once the units are extracted)."""
    try:
        for label, frames in frames_of.items():
            coord.add_frames(block, label, frames)
        for label in frames_of:
            coord.close(block, label)
    except Exception:  # noqa: BLE001
        log.exception("reprocess: could not queue the jobs")
