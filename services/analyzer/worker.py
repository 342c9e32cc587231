"""An analyzer worker: a stateless competing consumer of ``<prefix>.analyzer.jobs`` on the bus's
long-job mode (prefetch 1, the handler on a worker thread, heartbeats go on during a 10-minute
job). Per job: run the stage (:mod:`services.analyzer.execute`; a job whose output is already
stored under its id is answered from it at once), send the :class:`JobDone` to the job's
``reply_to`` queue once the outputs are durable, then ack. Its only durable outputs are files
under the products root. A worker killed mid-job leaves its message unacked: the broker hands it
to another worker, which overwrites the same files. Disk full / permission denied on the
outputs: :class:`shared.storage.StorageBlocked` (a ``shared.bus.Retry``), the job is retried later.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

from services.analyzer.execute import run_job
from services.analyzer.jobs import jobs_queue, parse_job
from shared.bus import Consumer, Reject
from shared.config import Settings

log = logging.getLogger("vison.analyzer.worker")


class JobHandler:
    """The worker's bus handler (raw bodies: jobs are not events)."""

    def __init__(self, settings: Settings, report: Any = None):
        self.settings = settings
        self.report = report  # multiprocessing queue to the parent (metrics), or None
        self.handled = 0

    def __call__(self, body: bytes, delivery: Any) -> None:
        try:
            job = parse_job(body)
        except Exception as exc:
            raise Reject(f"malformed analyzer job: {exc}") from None
        log.info("job %s: %s %s %s %s (attempt %d)", job.job_id, job.kind, job.block, job.label,
                 getattr(job, "unit", ""), delivery.attempt)
        done = run_job(job, self.settings.data_root, self.settings.products_root)
        if job.reply_to:
            delivery.send(job.reply_to, done, message_id=f"{job.job_id}.done")
        self.handled += 1
        log.info("job %s %s in %.2f s%s", job.job_id, done.status, done.duration_s, " (stored output re-used)" if done.reused else "")
        if self.report is not None:
            try:
                self.report.put_nowait((done.job_kind, done.family, done.status, done.duration_s))
            except Exception:  # pragma: no cover - parent gone
                pass


def make_consumer(settings: Settings, report: Any = None, parent_pid: int | None = None) -> Consumer:
    """The worker's consumer; with ``parent_pid`` it stops (finishing its job) once that process is
    gone, so that the workers of a killed analyzer never linger as orphans taking jobs."""

    def watch_parent(consumer: Consumer) -> None:
        if parent_pid is not None and os.getppid() != parent_pid:
            log.warning("worker: the analyzer process %d is gone; stopping after the current job", parent_pid)
            consumer.stop()

    return Consumer(settings, "analyzer", [], JobHandler(settings, report), long_jobs=True, queue=jobs_queue(settings),
                    model=bytes, idempotent=False, prefetch=1, tick=watch_parent if parent_pid is not None else None)


def worker_main(index: int, env: dict[str, str] | None = None, report: Any = None) -> None:
    """Process entry point (multiprocessing, spawn): own settings, logging, signals."""
    if env:
        os.environ.update(env)
    from shared.config import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s worker-{index}[%(process)d]: %(message)s")
    consumer = make_consumer(settings, report, parent_pid=os.getppid())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards Ctrl-C as SIGTERM
    signal.signal(signal.SIGTERM, consumer.stop)
    consumer.run(install_signals=False)
