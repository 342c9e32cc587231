"""``vison analyzer [--workers N]``: the analyzer service.

The main process runs the collector (a bus consumer of ``exposure.validated.#``,
``campaign.defined.#`` and ``test.close.#`` on the queue ``<prefix>.analyzer``) and supervises N
worker processes (competing consumers of ``<prefix>.analyzer.jobs``; a worker that dies is
restarted). Metrics on ``VISON_METRICS_PORT`` (``--metrics-port``): the bus metrics plus
``vison_analysis_duration_seconds{test}`` and ``vison_analyses_total{test,status}``.
SIGTERM / Ctrl-C: the collector finishes its message, workers stop (a job being analysed goes back
to the queue and is re-run at the next start).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import queue
import signal
import time
from typing import Any

from services.analyzer import registry
from services.analyzer.collector import BINDINGS, Collector
from services.analyzer.jobs import JobPublisher
from services.analyzer.store import AnalyzerStore
from services.analyzer.worker import worker_main
from shared.bus import Consumer
from shared.config import get_settings
from services.analyzer.jobs import jobs_queue
from shared.metrics import ANALYSES, ANALYSIS_DURATION, EVENTS_PUBLISHED, QUEUE_DEPTH, start_metrics_server

log = logging.getLogger("vison.analyzer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=1, help="analysis worker processes (default 1; 0 = collector only)")
    parser.add_argument("--no-collector", action="store_true", help="run workers only (more workers on another host/process)")
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (default VISON_METRICS_PORT)")


class WorkerPool:
    """N worker processes (spawned), restarted when they die; results reported through a queue."""

    def __init__(self, n: int, restart_delay: float = 1.0):
        self.ctx = mp.get_context("spawn")
        self.n = n
        self.report = self.ctx.Queue()
        self.procs: list[Any] = [None] * n
        self.restart_delay = restart_delay
        self.restarts = 0
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
        """Restart workers that exited (killed, crashed)."""
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
        """Metrics of finished analyses reported by the workers."""
        while True:
            try:
                item = self.report.get_nowait()
            except queue.Empty:
                return
            except (EOFError, OSError):  # pragma: no cover
                return
            if item[0] == "analysis":
                _, test, status, seconds = item
                ANALYSES.labels(test=test, status=status).inc()
                ANALYSIS_DURATION.labels(test=test).observe(seconds)
            elif item[0] == "published":
                EVENTS_PUBLISHED.labels(service="analyzer", kind=item[1]).inc()

    def stop(self, timeout: float = 10.0) -> None:
        for p in self.procs:
            if p is not None and p.is_alive():
                p.terminate()  # SIGTERM: the worker leaves its job to the queue and exits
        deadline = time.monotonic() + timeout
        for p in self.procs:
            if p is None:
                continue
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("worker pid %d did not stop; killing it", p.pid)
                p.kill()
                p.join(2)
        self.drain()

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.is_alive()]


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    os.makedirs(settings.state_dir, exist_ok=True)
    os.makedirs(settings.products_root, exist_ok=True)
    start_metrics_server(args.metrics_port if args.metrics_port is not None else settings.metrics_port, "analyzer")
    _, broken = registry.plugins()
    log.info("analyses available: %s%s", ", ".join(registry.known_tests()),
             f" (not loaded: {', '.join(broken)})" if broken else "")
    pool = WorkerPool(max(args.workers, 0))
    pool.start()
    try:
        if args.no_collector:
            stop = {"flag": False}

            def _stop(*_: Any) -> None:
                stop["flag"] = True

            signal.signal(signal.SIGTERM, _stop)
            signal.signal(signal.SIGINT, _stop)
            while not stop["flag"]:
                pool.check()
                pool.drain()
                time.sleep(0.5)
            return 0
        store = AnalyzerStore.in_state_dir(settings.state_dir)
        publisher = JobPublisher(settings)
        collector = Collector(settings, store, publisher)
        collector.republish_pending()

        last = {"depth": 0.0, "outbox": time.monotonic()}

        def tick(_consumer: Consumer) -> None:
            pool.check()
            pool.drain()
            publisher.tick()
            now = time.monotonic()
            if now - last["depth"] > 5.0:
                last["depth"] = now
                depth = publisher.depth()
                if depth is not None:
                    QUEUE_DEPTH.labels(queue=jobs_queue(settings)).set(depth)
            if now - last["outbox"] > 30.0:  # jobs whose publication failed (broker away): retry
                last["outbox"] = now
                try:
                    collector.republish_pending()
                except Exception as exc:  # broker still away: next time
                    log.warning("pending jobs not re-published yet: %s", exc)

        consumer = Consumer(settings, "analyzer", BINDINGS, collector.handle, tick=tick, tick_interval=0.5)
        consumer.run(install_signals=True)
        publisher.close()
        store.close()
        return 0
    finally:
        pool.stop()
