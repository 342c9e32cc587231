"""The collector: consumes ``exposure.validated.#``, ``campaign.defined.#`` and ``test.close.#``,
records frames per (block, test run) in the store and enqueues one analysis job when a test run's
data set is complete (its expected exposures, from the campaign definition or the catalogue) or
an operator closes it. Enqueueing is idempotent (job id = block, test run, frame set) and
restart-safe (a job is stored ``pending`` before it is published, re-published on start)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from services.analyzer import registry
from services.analyzer.definitions import derived_tests, plans_from_definition
from services.analyzer.jobs import AnalysisJob, JobPublisher
from services.analyzer.model import FrameMeta, run_label
from services.analyzer.store import AnalyzerStore, frame_set_hash
from shared.config import Settings
from shared.events import CampaignDefined, ExposureValidated, ProcessingFailed, TestClose

log = logging.getLogger("vison.analyzer")

BINDINGS = ["exposure.validated.#", "campaign.defined.#", "test.close.#"]


def _row_for(explog: list[dict[str, Any]], ccd: int | None) -> dict[str, Any]:
    """The exposure-log row of a CCD (rows may be flat value dicts or ExpLogRow dumps)."""
    for row in explog or []:
        values = row.get("values") if isinstance(row.get("values"), dict) else row
        row_ccd = row.get("ccd", values.get("CCD", values.get("ccd")))
        try:
            if ccd is not None and int(str(row_ccd).upper().replace("CCD", "")) == int(ccd):
                return {**values, **{k: v for k, v in row.items() if k != "values"}}
        except (TypeError, ValueError):
            continue
    return {}


def frames_of_event(event: ExposureValidated, data_root: str | Path) -> list[FrameMeta]:
    """The CCD frames of a validated exposure (absolute paths under the data root)."""
    out = []
    for f in event.files:
        if f.ccd is None:
            continue
        row = _row_for(event.explog, f.ccd)
        try:
            exptime = float(row.get("exptime", 0.0) or 0.0)
        except (TypeError, ValueError):
            exptime = 0.0
        values = {k: v for k, v in row.items() if isinstance(v, (int, float, str)) or v is None}
        out.append(FrameMeta(obsid=event.obsid, ccd=f.ccd, path=str(Path(data_root) / f.path), sha256=f.sha256,
                             exptime=exptime, date=event.date, test=event.test, flags=event.flags, values=values))
    return out


class Collector:
    """Event handler of the analyzer's main process (see the module docstring)."""

    def __init__(self, settings: Settings, store: AnalyzerStore, publisher: JobPublisher, ccds: int = 3):
        self.settings = settings
        self.store = store
        self.jobs = publisher
        self.ccds = ccds
        self._warned: set[tuple[str, str]] = set()

    # -- startup
    def republish_pending(self) -> int:
        """Publish the jobs stored ``pending`` (created before a crash, maybe never published)."""
        n = 0
        for job in self.store.jobs(status="pending"):
            self.jobs.publish(job["message"], job["job_id"])
            self.store.mark_queued(job["job_id"])
            n += 1
        if n:
            log.info("re-published %d pending job(s)", n)
        return n

    # -- events
    def handle(self, event: Any, delivery: Any = None) -> None:
        if isinstance(event, ExposureValidated):
            self.on_exposure(event, delivery)
        elif isinstance(event, CampaignDefined):
            self.on_campaign(event)
        elif isinstance(event, TestClose):
            self.on_close(event, delivery)

    def on_exposure(self, event: ExposureValidated, delivery: Any = None) -> None:
        frames = frames_of_event(event, self.settings.data_root)
        if not frames:
            log.warning("exposure %s of %s carries no CCD frame; ignored", event.obsid, event.test)
            return
        label = event.test.strip()
        self.store.add_frames(event.block, label, frames, str(event.event_id))
        self.maybe_enqueue(event.block, label, "complete", delivery)

    def on_campaign(self, event: CampaignDefined) -> None:
        plans = plans_from_definition(event.definition)
        self.store.set_plans(event.block, plans)
        log.info("campaign definition of %s: %d tests", event.block, len(plans))
        for block, label in self.store.runs():
            if block == event.block:
                self.maybe_enqueue(block, label, "complete")

    def on_close(self, event: TestClose, delivery: Any = None) -> None:
        label = run_label(event.test, event.repeat or 0) if event.repeat else event.test.strip()
        if not self.store.frames(event.block, label):
            self._fail(delivery, event.block, label, f"test.close for {label} of {event.block}: no frames received")
            return
        self.maybe_enqueue(event.block, label, "closed", delivery)

    # -- jobs
    def maybe_enqueue(self, block: str, label: str, reason: str, delivery: Any = None) -> str | None:
        """Enqueue the analysis of a test run when its data set is complete (``reason
        "complete"``) or unconditionally (``"closed"``); returns the job id when one was created."""
        if registry.find(label) is None:
            log.debug("no analysis for %s: frames recorded only", label)
            return None
        plan = self.store.plan(block, label)
        complete = self.store.complete_exposures(block, label, self.ccds)
        n = len(complete)
        if reason == "complete":
            if plan.expected_frames is None or n < plan.expected_frames:
                return None
            if n > plan.expected_frames and self.store.has_job(block, label, ("complete",)):
                if (block, label) not in self._warned:
                    self._warned.add((block, label))
                    log.warning("%s %s: %d exposures, %d expected; extra frames not analysed (send test.close to re-analyse)",
                                block, label, n, plan.expected_frames)
                return None
        keep = set(complete)
        frames = [f for f in self.store.frames(block, label) if f.obsid in keep]
        if not frames:
            self._fail(delivery, block, label, f"{label} of {block}: no complete exposure (all {self.ccds} CCDs) to analyse")
            return None
        job_id = self._enqueue(block, label, reason, frames, plan.expected_frames, dict(plan.params or {}))
        for derived in derived_tests(label, self.store.plans(block) or None):
            if registry.find(derived) is not None:
                dplan = self.store.plan(block, derived)
                self._enqueue(block, derived, "derived", frames, None, dict(dplan.params or {}))
        return job_id

    def _enqueue(self, block: str, label: str, reason: str, frames: list[FrameMeta], expected: int | None,
                 params: dict[str, Any]) -> str | None:
        fh = frame_set_hash(frames)

        def message(job_id: str) -> str:
            return AnalysisJob(job_id=job_id, block=block, test=label, reason=reason, frame_hash=fh, frames=frames,
                               expected_frames=expected, params=params).model_dump_json()

        job_id, created = self.store.create_job(block, label, fh, reason, message, rerun_failed=reason == "closed")
        if not created:
            log.info("%s %s: job %s already exists (%s); not enqueued again", block, label, job_id, reason)
            return None
        self.jobs.publish(self.store.job(job_id)["message"], job_id)
        self.store.mark_queued(job_id)
        log.info("%s %s: enqueued job %s (%s, %d exposures)", block, label, job_id, reason, len({f.obsid for f in frames}))
        return job_id

    def _fail(self, delivery: Any, block: str, label: str, why: str) -> None:
        log.warning(why)
        if delivery is not None:
            delivery.publish(ProcessingFailed(what="analysis", where=f"{block}/{label}", why=why, service="analyzer",
                                              test=label, block=block, producer="analyzer"))
