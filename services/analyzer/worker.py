"""An analyzer worker process: a competing consumer of the job queue (prefetch 1), running one
analysis at a time in a thread while the main thread keeps the broker connection alive.

Per job: skip it if already completed (or running elsewhere and not redelivered); claim it in the
store; run :func:`services.analyzer.runner.run_analysis`; win the right to publish (only one
worker can); publish ``analysis.completed.<test>.<block>`` (event id derived from the job id, so
a re-publication is recognisable) - or, on failure, ``processing.failed`` and an
``analysis.completed`` with ``status: failed`` and flag SUBTASKCRASH; mark the job; ack. A worker
killed mid-analysis leaves its message unacked: the broker hands it to another worker, which
takes the job over. A job whose deliveries keep dying is failed after ``max_redeliveries``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any

import pika

from services.analyzer.jobs import AnalysisJob, declare_jobs_queue, jobs_queue
from services.analyzer.products import utc_now, write_json
from services.analyzer.runner import AnalysisFailed, DataError, products_dir, run_analysis
from services.analyzer.store import AnalyzerStore
from shared.bus import Backoff, CONNECTION_ERRORS, Publisher, connection_parameters
from shared.config import Settings
from shared.events import AnalysisCompleted, ProcessingFailed, derived_event_id
from shared.flags import Flag, flag_names

log = logging.getLogger("vison.analyzer.worker")


class Worker:
    """One worker (run it in its own process: :func:`worker_main`)."""

    def __init__(self, settings: Settings, index: int = 0, report: Any = None):
        self.settings = settings
        self.index = index
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.store = AnalyzerStore.in_state_dir(settings.state_dir)
        self.publisher = Publisher(settings, service="analyzer")
        self.report = report  # multiprocessing queue: (test, status, seconds) for the parent's metrics
        self.stop_event = threading.Event()
        self._conn = None
        self._chan = None
        self._pending: list[tuple[Any, Any, bytes]] = []
        self.handled = 0

    # -- control
    def stop(self, *_: Any) -> None:
        self.stop_event.set()

    def run(self) -> None:
        backoff = Backoff()
        while not self.stop_event.is_set():
            try:
                self._connect()
                backoff.reset()
                while not self.stop_event.is_set():
                    self._conn.process_data_events(time_limit=0.5)
                    while self._pending and not self.stop_event.is_set():
                        method, props, body = self._pending.pop(0)
                        self._handle(method, props, body)
                    self.publisher.tick()
            except CONNECTION_ERRORS as exc:
                self._drop()
                if self.stop_event.is_set():
                    break
                delay = backoff.next()
                log.warning("worker %d: connection lost (%s); reconnecting in %.1f s", self.index, exc, delay)
                self.stop_event.wait(delay)
        self._drop()
        self.publisher.close()
        log.info("worker %d stopped", self.index)

    def _connect(self) -> None:
        self._conn = pika.BlockingConnection(connection_parameters(self.settings.amqp_url))
        self._chan = self._conn.channel()
        declare_jobs_queue(self._chan, self.settings)
        self._chan.basic_qos(prefetch_count=1)
        self._chan.basic_consume(jobs_queue(self.settings), self._on_message, auto_ack=False)
        self._pending.clear()
        log.info("worker %d (%s) consuming %s", self.index, self.owner, jobs_queue(self.settings))

    def _drop(self) -> None:
        conn, self._conn, self._chan = self._conn, None, None
        self._pending.clear()
        if conn is not None:
            try:
                if conn.is_open:
                    conn.close()
            except Exception:
                pass

    def _on_message(self, channel, method, props, body) -> None:
        self._pending.append((method, props, body))

    def _ack(self, tag: int) -> None:
        try:
            self._chan.basic_ack(tag)
        except CONNECTION_ERRORS:
            log.warning("worker %d: ack of a job lost with the connection (the job is idempotent)", self.index)
            raise

    def _dead_letter(self, body: bytes, reason: str) -> None:
        from shared.bus import dead_letter_exchange

        headers = {"x-vison-reason": reason[:2000], "x-vison-service": "analyzer", "x-vison-queue": jobs_queue(self.settings),
                   "x-vison-routing-key": jobs_queue(self.settings), "x-vison-error": "job"}
        self._chan.basic_publish(dead_letter_exchange(self.settings), jobs_queue(self.settings), body,
                                 pika.BasicProperties(delivery_mode=2, headers=headers))

    # -- one job
    def _handle(self, method, props, body: bytes) -> None:
        tag = method.delivery_tag
        headers = dict(props.headers or {})
        attempt = int(headers.get("x-delivery-count", 0) or 0) + 1
        try:
            job = AnalysisJob.model_validate_json(body)
        except Exception as exc:
            log.error("worker %d: malformed job dead-lettered: %s", self.index, exc)
            self._dead_letter(body, f"malformed job: {exc}")
            self.publisher.publish(ProcessingFailed(what="message", where=jobs_queue(self.settings), why=f"malformed job: {exc}",
                                                    service="analyzer", producer="analyzer"))
            self._ack(tag)
            return
        row = self.store.job(job.job_id)
        if row is not None and row["status"] in ("completed", "failed"):
            log.info("worker %d: job %s already %s; acknowledged", self.index, job.job_id, row["status"])
            self._ack(tag)
            return
        takeover = bool(method.redelivered) or attempt > 1
        if takeover and self.store.attempts(job.job_id) >= self.settings.max_redeliveries:
            why = (f"{job.test} {job.block}: the analysis was interrupted {self.store.attempts(job.job_id)} times "
                   "(worker killed or out of memory); giving up")
            self.store.claim(job.job_id, self.owner, True, body.decode())
            self._finish_failed(job, why, "", 0.0)
            self._dead_letter(body, why)
            self._ack(tag)
            return
        claimed, before = self.store.claim(job.job_id, self.owner, takeover, body.decode())
        if not claimed:
            log.info("worker %d: job %s is %s elsewhere; duplicate message acknowledged", self.index, job.job_id, before)
            self._ack(tag)
            return
        log.info("worker %d: running %s %s (%d exposures, job %s, attempt %d)", self.index, job.test, job.block,
                 len(job.obsids), job.job_id, attempt)
        outcome: dict[str, Any] = {}
        thread = threading.Thread(target=self._run_job, args=(job, outcome), name=f"analysis-{job.job_id}", daemon=True)
        t0 = time.perf_counter()
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.5)
            if self.stop_event.is_set():
                # leave the job unacked: it returns to the queue when the connection closes
                log.warning("worker %d: stopping during %s; the job goes back to the queue", self.index, job.job_id)
                self.store.release(job.job_id, self.owner)
                return
            try:
                self._conn.process_data_events(time_limit=0)
            except CONNECTION_ERRORS:
                log.warning("worker %d: broker connection lost during %s; finishing the analysis", self.index, job.job_id)
                thread.join()
                self._conclude(job, outcome, time.perf_counter() - t0)
                raise
        self._conclude(job, outcome, time.perf_counter() - t0)
        self._ack(tag)

    def _run_job(self, job: AnalysisJob, outcome: dict[str, Any]) -> None:
        try:
            outcome["result"] = run_analysis(job.test, job.block, job.frames, self.settings.products_root,
                                             params=job.params, expected_frames=job.expected_frames, job_id=job.job_id)
        except AnalysisFailed as exc:
            outcome["error"] = (exc.summary, exc.trace)
            outcome["failure"] = exc
        except DataError as exc:
            outcome["error"] = (f"{job.test} {job.block}: {exc}", "")
        except Exception as exc:  # unknown test, bugs in the adapter: a failed analysis, the worker lives on
            import traceback

            outcome["error"] = (f"{job.test} {job.block}: {exc.__class__.__name__}: {exc}", traceback.format_exc(limit=4))

    def _conclude(self, job: AnalysisJob, outcome: dict[str, Any], seconds: float) -> None:
        if "result" in outcome:
            self._finish_completed(job, outcome["result"], seconds)
        else:
            summary, trace = outcome.get("error") or ("analysis ended without a result", "")
            self._finish_failed(job, summary, trace, seconds, outcome.get("failure"))

    def _finish_completed(self, job: AnalysisJob, result: Any, seconds: float) -> None:
        if not self.store.begin_publish(job.job_id, self.owner):
            log.info("worker %d: job %s was taken over by another worker; not published", self.index, job.job_id)
            return
        doc = result.doc
        event = AnalysisCompleted(
            event_id=derived_event_id("analysis.completed", job.job_id),
            producer="analyzer", test=job.base, block=job.block, repeat=job.repeat or None, status="completed",
            results=doc.get("results") or {}, products=result.products, obsids=job.obsids, flags=result.flags,
            flag_names=flag_names(result.flags), provenance=_event_provenance(doc, job, seconds),
        )
        self.publisher.publish(event)
        self.store.set_status(job.job_id, "completed", result={"results_path": str(result.results_path), "seconds": seconds})
        self._report(job.base, "completed", seconds)
        self.handled += 1
        log.info("worker %d: %s %s completed in %.1f s (%s)", self.index, job.test, job.block, seconds,
                 ", ".join(flag_names(result.flags)) or "no flags")

    def _finish_failed(self, job: AnalysisJob, summary: str, trace: str, seconds: float, failure: Any = None) -> None:
        if not self.store.begin_publish(job.job_id, self.owner):
            log.info("worker %d: failed job %s was taken over by another worker; not published", self.index, job.job_id)
            return
        flags = int(Flag.SUBTASKCRASH)
        if failure is not None:
            failure.write_results()  # results.json with status failed, SUBTASKCRASH, traceback
        else:  # failed before the analysis started (missing / changed input, unknown test)
            try:
                write_json(products_dir(self.settings.products_root, job.block, job.test) / "results.json", {
                    "schema": "vison.results/1", "test": job.base, "repeat": job.repeat, "label": job.test,
                    "block": job.block, "status": "failed", "flags": flags, "flag_names": flag_names(flags),
                    "error": summary, "traceback": trace, "obsids": job.obsids, "results": {},
                    "provenance": {"job_id": job.job_id, "created": utc_now()}})
            except OSError:
                log.exception("could not write the failed results.json of %s", job.job_id)
        self.publisher.publish(ProcessingFailed(
            event_id=derived_event_id("processing.failed", job.job_id), producer="analyzer", what="analysis",
            where=f"{job.block}/{job.test}", why=summary, service="analyzer", test=job.test, block=job.block,
            details={"job_id": job.job_id, "traceback": trace[-4000:], "flags": flags, "flag_names": flag_names(flags),
                     "obsids": job.obsids},
        ))
        self.publisher.publish(AnalysisCompleted(
            event_id=derived_event_id("analysis.completed", job.job_id), producer="analyzer", test=job.base,
            block=job.block, repeat=job.repeat or None, status="failed", obsids=job.obsids, flags=flags,
            flag_names=flag_names(flags), error=summary, provenance={"job_id": job.job_id},
        ))
        self.store.set_status(job.job_id, "failed", error=f"{summary}\n{trace}".strip())
        self._report(job.base, "failed", seconds)
        self.handled += 1
        log.error("worker %d: %s %s failed: %s", self.index, job.test, job.block, summary)

    def _report(self, test: str, status: str, seconds: float) -> None:
        """Tell the parent (which serves the metrics): the analysis, and the events published."""
        if self.report is not None:
            try:
                self.report.put_nowait(("analysis", test, status, seconds))
                kinds = ["analysis.completed"] + (["processing.failed"] if status == "failed" else [])
                for kind in kinds:
                    self.report.put_nowait(("published", kind))
            except Exception:  # pragma: no cover - parent gone
                pass


def _event_provenance(doc: dict[str, Any], job: AnalysisJob, seconds: float) -> dict[str, Any]:
    prov = dict(doc.get("provenance") or {})
    prov.pop("inputs", None)  # the checksums are in results.json / the FITS INPUTS tables
    prov["job_id"] = job.job_id
    prov["duration_s"] = round(seconds, 3)
    prov["results_json"] = next((p for p in doc.get("products") or [] if p.endswith("results.json")), None)
    return json.loads(json.dumps(prov, default=str))


def worker_main(index: int, env: dict[str, str] | None = None, report: Any = None) -> None:
    """Process entry point (multiprocessing, spawn): own settings, logging, signals."""
    if env:
        os.environ.update(env)
    from shared.config import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format=f"%(asctime)s %(levelname)s worker-{index}: %(message)s")
    worker = Worker(settings, index, report)
    signal.signal(signal.SIGTERM, worker.stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards Ctrl-C as SIGTERM
    worker.run()
