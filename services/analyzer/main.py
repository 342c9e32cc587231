"""``vison analyzer [--workers N] [--no-collector]`` and ``vison analyzer status [--json]``.

The main process is the **coordinator** (one per deployment, :mod:`.coordinator`): it consumes
``exposure.validated.#``, ``campaign.defined.#``, ``test.close.#`` (queue ``<prefix>.analyzer``)
and the workers' replies (``<prefix>.analyzer.done``), keeps the store, and publishes every
``analysis.completed`` / ``processing.failed`` of analyses. It supervises N worker processes
(stateless competing consumers of ``<prefix>.analyzer.jobs``; a worker that dies is restarted).
``--no-collector``: workers only (more workers on another host, ``docker compose --scale``).
Metrics on ``VISON_METRICS_PORT`` (``--metrics-port``). SIGTERM / Ctrl-C: the coordinator
finishes its message, workers finish... or leave their job to the queue (it is re-run).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from datetime import datetime, timezone
from typing import Any

from services.analyzer import metrics as am
from services.analyzer import registry
from services.analyzer.coordinator import BINDINGS, Coordinator, status_rows
from services.analyzer.jobs import done_queue, parse_done
from services.analyzer.store import AnalyzerStore
from services.analyzer.worker import worker_main
from shared.bus import Consumer, Publisher
from shared.config import get_settings
from shared.metrics import start_metrics_server

log = logging.getLogger("vison.analyzer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=["run", "status"], default="run",
                        help="run the service (default) or print the state of every test run (status)")
    parser.add_argument("--workers", type=int, default=1, help="analysis worker processes (default 1; 0 = coordinator only)")
    parser.add_argument("--no-collector", action="store_true", help="run workers only (more workers on another host/process)")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default VISON_METRICS_PORT)")
    parser.add_argument("--json", action="store_true", help="status: print JSON")


class WorkerPool:
    """N worker processes (spawned), restarted when they die; durations reported through a queue."""

    def __init__(self, n: int, restart_delay: float = 1.0, observe: bool = True):
        self.ctx = mp.get_context("spawn")
        self.n = n
        self.report = self.ctx.Queue()
        self.procs: list[Any] = [None] * n
        self.restart_delay = restart_delay
        self.restarts = 0
        self.observe = observe  # workers-only host: the durations go to this host's metrics
        self._dead_since: dict[int, float] = {}

    def _spawn(self, i: int) -> None:
        p = self.ctx.Process(target=worker_main, args=(i, None, self.report), name=f"vison-analyzer-worker-{i}", daemon=False)
        p.start()
        self.procs[i] = p
        log.info("worker %d started (pid %d)", i, p.pid)

    def start(self) -> None:
        for i in range(self.n):
            self._spawn(i)

    def check(self) -> None:
        now = time.monotonic()
        for i, p in enumerate(self.procs):
            if p is None or p.is_alive():
                continue
            first = self._dead_since.setdefault(i, now)
            if now - first < self.restart_delay:
                continue
            log.warning("worker %d (pid %d) exited with code %s; restarting", i, p.pid, p.exitcode)
            self._dead_since.pop(i, None)
            self.restarts += 1
            self._spawn(i)

    def drain(self) -> None:
        while True:
            try:
                kind, family, _status, seconds = self.report.get_nowait()
            except queue.Empty:
                return
            except (EOFError, OSError, ValueError):  # pragma: no cover
                return
            if self.observe:
                (am.EXTRACTION_SECONDS if kind == "extract" else am.SOLVE_SECONDS).labels(family=family).observe(seconds)

    def stop(self, timeout: float = 15.0) -> None:
        for p in self.procs:
            if p is not None and p.is_alive():
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            if p is None:
                continue
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("worker pid %d did not stop; killing it (its job goes back to the queue)", p.pid)
                p.kill()
                p.join(2)
        self.drain()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.is_alive()]


class ThreadPublishers:
    """One :class:`Publisher` per thread (the coordinator's outbox)."""

    def __init__(self, settings: Any):
        self.settings = settings
        self.local = threading.local()
        self.all: list[Publisher] = []

    def __call__(self) -> Publisher:
        pub = getattr(self.local, "pub", None)
        if pub is None:
            pub = Publisher(self.settings, service="analyzer")
            self.local.pub = pub
            self.all.append(pub)
        return pub

    def close(self) -> None:
        for p in self.all:
            p.close()


def _status(args: argparse.Namespace) -> int:
    settings = get_settings()
    path = settings.state_dir / "analyzer.sqlite"
    if not path.exists():  # the coordinator has not started yet (or another state dir)
        print("[]" if args.json else f"no analyzer state in {settings.state_dir} yet")
        return 0
    store = AnalyzerStore(path)
    try:
        rows = status_rows(store, wait_s=settings.calib_wait_s)
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
        return 0
    print(f"{'block':8} {'test':14} {'exposures':>9} {'units done/pend/fail':>21}  state")
    for r in rows:
        u = r.get("units") or {}
        exp = f"{r['exposures']}/{r['expected'] if r['expected'] is not None else '?'}"
        units = f"{u.get('done', 0)}/{u.get('pending', 0) + u.get('queued', 0)}/{u.get('failed', 0)}" if u else "-"
        state = r["state"]
        if state == "waiting":
            since = datetime.fromtimestamp(r["waiting_since"], timezone.utc).strftime("%H:%M:%S") if r.get("waiting_since") else "?"
            state += f" for {', '.join(r['waiting'])} since {since} UTC"
        elif r.get("event_id"):
            state += f" (event {r['event_id']})"
        if r.get("reanalyses"):
            state += f", {r['reanalyses']} re-analysis(es)"
        print(f"{r['block']:8} {r['test']:14} {exp:>9} {units:>21}  {state}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "status":
        return _status(args)
    settings = get_settings()
    os.makedirs(settings.state_dir, exist_ok=True)
    os.makedirs(settings.products_root, exist_ok=True)
    start_metrics_server(args.metrics_port if args.metrics_port is not None else settings.metrics_port, "analyzer")
    table, broken = registry.plugins()
    log.info("analyses available: %s%s", ", ".join(sorted(table)), f" (not loaded: {', '.join(broken)})" if broken else "")
    pool = WorkerPool(max(args.workers, 0), observe=args.no_collector)
    pool.start()
    try:
        if args.no_collector:
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            while not stop.wait(0.5):
                pool.check()
                pool.drain()
            return 0
        store = AnalyzerStore.in_state_dir(settings.state_dir)
        outbox = ThreadPublishers(settings)
        coord = Coordinator(settings, store, outbox, done_queue(settings))

        def tick(_consumer: Consumer) -> None:
            pool.check()
            pool.drain()
            try:
                coord.tick()
            except Exception:  # the broker away: next time
                log.exception("coordinator tick failed")
            for p in outbox.all:
                p.tick()

        def on_done(body: bytes, delivery: Any) -> None:
            coord.handle_done(parse_done(body), delivery)

        events = Consumer(settings, "analyzer", BINDINGS, coord.handle, tick=tick, tick_interval=0.5)
        replies = Consumer(settings, "analyzer", [], on_done, queue=done_queue(settings), model=bytes, idempotent=False)
        replies_thread = threading.Thread(target=replies.run, kwargs={"install_signals": False}, name="analyzer-replies", daemon=True)
        replies_thread.start()
        try:
            coord.resend_pending()
        except Exception:
            log.exception("pending jobs not re-sent yet")

        def _stop(*_: Any) -> None:
            events.stop()
            replies.stop()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        events.run(install_signals=False)
        replies.stop()
        replies_thread.join(10)
        outbox.close()
        store.close()
        return 0
    finally:
        pool.stop()
