"""The coordinator: the analyzer's single stateful part (one per deployment; ``vison reprocess``
runs its own for one reprocessing run).

It consumes ``exposure.validated.#``, ``campaign.defined.#``, ``test.close.#`` and the workers'
:class:`~services.analyzer.jobs.JobDone` replies, keeps the store, and:

- records each validated exposure, and puts the extraction jobs of the units it completes on
  the jobs queue (a unit = an exposure, or a pair once both members are validated);
- when a test run is complete (expected exposures) or closed and every unit is settled, decides
  its declared needs (:func:`services.analyzer.planner.resolve_needs`): waits, or puts the solve
  job on the queue;
- on a solve's reply publishes ``analysis.completed.<test>.<block>`` (event id derived from the
  solve job id: a redelivery re-sends the same id) and, when failed, ``processing.failed``;
  records what the result provides and wakes the runs waiting for it, or re-analyses those
  whose ``rerun`` need it satisfies (new solve -> new event id, ``reanalysis`` set);
- an extraction that failed (frame unreadable) -> ``processing.failed`` naming the file; the unit
  is failed and the solve proceeds without it (MISSDATA).

Every handler runs under one lock (two consumer threads share the coordinator). Jobs are stored
before they are sent (outbox) and re-sent on start when still ``pending``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol

from services.analyzer import metrics as am
from services.analyzer import planner
from services.analyzer.definitions import plans_from_definition
from services.analyzer.execute import provided_calibrations
from services.analyzer.family import Calibration, Family
from services.analyzer.jobs import ExtractionRef, ExtractJob, JobDone, SolveJob, jobs_queue
from services.analyzer.model import FrameMeta, run_label, split_test_name
from services.analyzer.store import AnalyzerStore
from shared.config import Settings
from shared.events import AnalysisCompleted, CampaignDefined, ExposureValidated, ProcessingFailed, Reanalysis, TestClose, derived_event_id
from shared.flags import Flag, flag_names

log = logging.getLogger("vison.analyzer")

BINDINGS = ["exposure.validated.#", "campaign.defined.#", "test.close.#"]


class Outbox(Protocol):
    """Where the coordinator sends jobs (a queue) and publishes events (the exchange)."""

    def send(self, queue: str, body: bytes, message_id: str) -> None: ...

    def publish(self, event: Any) -> None: ...


def _row_for(explog: list[dict[str, Any]], ccd: int | None) -> dict[str, Any]:
    """The exposure-log row of a CCD (rows may be flat value dicts or ExpLogRow dumps)."""
    for row in explog or []:
        row = row if isinstance(row, dict) else row.model_dump()
        values = row.get("values") if isinstance(row.get("values"), dict) else row
        row_ccd = row.get("ccd", values.get("CCD", values.get("ccd")))
        try:
            if ccd is not None and int(str(row_ccd).upper().replace("CCD", "")) == int(ccd):
                return {**values, **{k: v for k, v in row.items() if k != "values"}}
        except (TypeError, ValueError):
            continue
    return {}


def frames_of_event(event: ExposureValidated) -> list[FrameMeta]:
    """The CCD frames of a validated exposure (paths relative to the data root, SHA-256 verified
    by the validator)."""
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
        out.append(FrameMeta(obsid=event.obsid, ccd=f.ccd, path=f.path, sha256=f.sha256, exptime=exptime, date=event.date,
                             test=event.test, flags=event.flags, values=values))
    return out


class Coordinator:
    """See the module docstring. ``outbox()`` gives the :class:`Outbox` of the calling thread."""

    def __init__(self, settings: Settings, store: AnalyzerStore, outbox: Callable[[], Outbox], reply_to: str, *,
                 ccds: int = 3, reprocess: str | None = None, clock: Callable[[], float] = time.time):
        self.settings = settings
        self.store = store
        self.outbox = outbox
        self.reply_to = reply_to
        self.ccds = ccds
        self.reprocess = reprocess
        self.clock = clock
        self.lock = threading.RLock()
        self.published: list[AnalysisCompleted] = []  # this process's analysis.completed (reprocess progress)
        self.failed_events: list[ProcessingFailed] = []

    # ------------------------------------------------------------------ events
    def handle(self, event: Any, delivery: Any = None) -> None:
        with self.lock:
            if isinstance(event, ExposureValidated):
                self.on_exposure(event)
            elif isinstance(event, CampaignDefined):
                self.on_campaign(event)
            elif isinstance(event, TestClose):
                self.on_close(event)

    def on_exposure(self, event: ExposureValidated) -> None:
        frames = frames_of_event(event)
        if not frames:
            log.warning("exposure %s of %s carries no CCD frame; ignored", event.obsid, event.test)
            return
        self.add_frames(event.block, event.test.strip(), frames, str(event.event_id))

    def add_frames(self, block: str, label: str, frames: list[FrameMeta], event_id: str | None = None) -> None:
        with self.lock:
            self.store.add_frames(block, label, frames, event_id)
            self.advance(block, label)
            for derived in planner.derived_runs(label, self.store.plans(block)):
                self.advance(block, derived)

    def on_campaign(self, event: CampaignDefined) -> None:
        plans = plans_from_definition(event.definition)
        self.store.set_plans(event.block, plans)
        log.info("campaign definition of %s: %d tests", event.block, len(plans))
        for block, label in self.store.frame_runs():
            if block == event.block:
                self.advance(block, label)
                for derived in planner.derived_runs(label, self.store.plans(block)):
                    self.advance(block, derived)

    def on_close(self, event: TestClose) -> None:
        label = run_label(event.test, event.repeat or 0) if event.repeat else event.test.strip()
        self.close(event.block, label)

    def close(self, block: str, label: str) -> None:
        with self.lock:
            fam = planner.family_for(label)
            plan = self.store.plan(block, label)
            source = plan.data_from or label
            if not self.store.frames(block, source):
                self._failed(block, label, f"test.close for {label} of {block}: no frames received", what="analysis",
                             where=f"{block}/{label}", event_id=derived_event_id("processing.failed", "close", block, label, self.clock()))
                return
            if fam is None:
                log.info("%s %s closed: no analysis for it", block, label)
                return
            self.store.update_run(block, label, fam.name, closed=1)
            self.advance(block, label, closed_now=True)
            for derived in planner.derived_runs(label, self.store.plans(block)):
                dfam = planner.family_for(derived)
                if dfam is not None:
                    self.store.update_run(block, derived, dfam.name, closed=1)
                    self.advance(block, derived, closed_now=True)

    # ------------------------------------------------------------------ planning
    def _calibrations(self, block: str) -> list[Calibration]:
        return self.store.calibrations(block)

    def advance(self, block: str, label: str, closed_now: bool = False) -> None:
        """Queue the run's new extraction units; solve it when it is ready."""
        fam = planner.family_for(label)
        if fam is None:
            return
        plan = self.store.plan(block, label)
        source = plan.data_from or label
        frames = self.store.frames(block, source)
        params = dict(plan.params or {})
        if fam.unit != "none":
            available = self._calibrations(block)
            xcal = [c for c in (planner.pick_calibration(planner.Need(n, "rerun"), available) for n in fam.extract_needs) if c]
            for unit, ufr in planner.extraction_units(fam, frames, block, self.ccds):
                job_id = ExtractJob.make_id(block, label, fam.name, fam.version, unit, ufr, params, xcal)
                job = ExtractJob(job_id=job_id, block=block, label=label, family=fam.name, family_version=fam.version,
                                 unit=unit, frames=ufr, params=params, calibrations=xcal, reply_to=self.reply_to,
                                 reprocess=self.reprocess)
                if self.store.put_unit(block, label, fam.name, unit, job_id, job.model_dump_json()):
                    self._send(job_id, job.model_dump_json(), "extract")
        self.maybe_solve(block, label, fam, closed_now=closed_now)

    def maybe_solve(self, block: str, label: str, fam: Family, closed_now: bool = False) -> str | None:
        run = self.store.run(block, label, fam.name)
        plan = self.store.plan(block, label)
        source = plan.data_from or label
        expected = plan.expected_frames if not plan.data_from else self.store.plan(block, source).expected_frames
        complete = planner.complete_frames(self.store.frames(block, source), self.ccds)
        n = len({f.obsid for f in complete})
        closed = bool(run.get("closed"))
        if not planner.is_complete(n, expected, closed) or n == 0:
            return None
        units = self.store.units(block, label, fam.name) if fam.unit != "none" else []
        current = {u for u, _ in planner.extraction_units(fam, complete, block, self.ccds)}
        units = [u for u in units if u["unit"] in current]
        if run.get("solve_id") and not closed_now:
            # solved already: extra frames are analysed once an operator closed the test (the
            # close may come before their extraction ends); calibrations re-run elsewhere
            prev = self.store.solve(run["solve_id"])
            if not closed or prev is None:
                return None
            pjob = SolveJob.model_validate_json(prev["message"])
            if {e.unit for e in pjob.extractions} == current and {f.obsid for f in pjob.frames} == {f.obsid for f in complete}:
                return None
            closed_now = True
        if any(u["status"] in ("pending", "queued") for u in units) or len(units) < len(current):
            return None  # extractions still running
        now = self.clock()
        decision = planner.resolve_needs(fam.needs, self._calibrations(block), run.get("waiting_since"), now,
                                         float(self.settings.calib_wait_s))
        if not decision.ready:
            if run.get("waiting") != json.dumps(decision.waiting) or run.get("waiting_since") is None:
                self.store.update_run(block, label, fam.name, waiting=decision.waiting,
                                      waiting_since=run.get("waiting_since") or now)
                log.info("%s %s waits for %s", block, label, ", ".join(decision.waiting))
            return None
        prev = self.store.solve(run["solve_id"]) if run.get("solve_id") else None
        reason = "closed" if closed_now and prev is not None else ("complete" if not closed else "closed")
        job = self._solve_job(block, label, fam, complete, units, expected, decision.use, decision.flags, decision.notes,
                              n, reanalysis_of=prev["event_id"] if prev else None,
                              reanalysis_reason="test closed by an operator" if prev else None)
        if prev is not None and job.job_id == prev["job_id"]:
            return None
        return self._queue_solve(job, reason)

    def _solve_job(self, block: str, label: str, fam: Family, complete: list[FrameMeta], units: list[dict[str, Any]],
                   expected: int | None, cals: list[Calibration], flags: int, notes: list[str], n: int, *,
                   reanalysis_of: str | None = None, reanalysis_reason: str | None = None) -> SolveJob:
        plan = self.store.plan(block, label)
        params = dict(plan.params or {})
        refs = []
        notes = list(notes)
        for u in units:
            if u["status"] == "done" and u["ref"]:
                refs.append(ExtractionRef.model_validate(json.loads(u["ref"])))
            else:
                refs.append(ExtractionRef(unit=u["unit"], failed=True, error=u["error"], job_id=u["job_id"]))
                notes.append(f"unit {u['unit']} not analysed: {u['error']}")
                flags |= int(Flag.MISSDATA)
        if expected is not None and n != expected:
            flags |= int(Flag.MISSDATA)
            notes.append(f"{n} exposure(s) analysed, {expected} expected")
        job_id = SolveJob.make_id(block, label, fam.name, fam.version, refs, complete, params, cals, flags, expected)
        return SolveJob(job_id=job_id, block=block, label=label, family=fam.name, family_version=fam.version,
                        extractions=refs, frames=complete, params=params, calibrations=cals, reply_to=self.reply_to,
                        expected_exposures=expected, flags=flags, notes=notes, reanalysis_of=reanalysis_of,
                        reanalysis_reason=reanalysis_reason, reprocess=self.reprocess)

    def _queue_solve(self, job: SolveJob, reason: str) -> str | None:
        event_id = str(derived_event_id("analysis.completed", job.job_id))
        created = self.store.put_solve(job.job_id, job.block, job.label, job.family, reason, job.model_dump_json(), event_id,
                                       job.reanalysis_of)
        self.store.update_run(job.block, job.label, job.family, solve_id=job.job_id, waiting=None, waiting_since=None)
        if created:
            self._send(job.job_id, job.model_dump_json(), "solve")
            log.info("%s %s: solve %s queued (%s, %d unit(s)%s)", job.block, job.label, job.job_id, reason,
                     len(job.extractions), f", re-analysis of {job.reanalysis_of}" if job.reanalysis_of else "")
        return job.job_id

    def _send(self, job_id: str, message: str, kind: str) -> None:
        self.outbox().send(jobs_queue(self.settings), message.encode(), message_id=job_id)
        if kind == "extract":
            self.store.mark_unit_queued(job_id)
        else:
            self.store.mark_solve_queued(job_id)

    def resend_pending(self) -> int:
        """Send the jobs stored ``pending`` (recorded before a crash, maybe never sent)."""
        with self.lock:
            items = self.store.pending_messages()
            for kind, job_id, message in items:
                self._send(job_id, message, kind)
            if items:
                log.info("re-sent %d pending job(s)", len(items))
            return len(items)

    def tick(self) -> None:
        """Runs waiting for a ``wait`` need whose time is up; the status gauges."""
        with self.lock:
            now = self.clock()
            for run in self.store.runs():
                if run.get("waiting") and run.get("waiting_since") is not None:
                    fam = planner.family_for(run["test"])
                    if fam is not None and any(n.mode == "wait" for n in fam.needs) \
                            and now - run["waiting_since"] >= float(self.settings.calib_wait_s):
                        self.maybe_solve(run["block"], run["test"], fam)
            am.update_status_gauges(self.status())

    # ------------------------------------------------------------------ replies
    def handle_done(self, done: JobDone | dict | Any, delivery: Any = None) -> None:
        if not isinstance(done, JobDone):
            from services.analyzer.jobs import parse_done

            done = parse_done(done)
        with self.lock:
            if done.job_kind == "extract":
                self.on_extracted(done)
            else:
                self.on_solved(done)

    def on_extracted(self, done: JobDone) -> None:
        row = self.store.unit_by_job(done.job_id)
        if row is None or row["status"] in ("done", "failed"):
            return  # a stale unit (pairs re-formed) or a duplicate reply
        am.EXTRACTION_SECONDS.labels(family=done.family).observe(done.duration_s)
        if done.status == "completed" and done.extraction is not None:
            self.store.set_unit(done.job_id, "done", ref=done.extraction.model_dump(), seconds=done.duration_s)
        else:
            self.store.set_unit(done.job_id, "failed", error=done.error or "extraction failed", seconds=done.duration_s)
            where = done.failed_file or f"{done.block}/{done.label}/{done.unit}"
            if done.failed_file:
                try:
                    where = Path(done.failed_file).resolve().relative_to(Path(self.settings.data_root).resolve()).as_posix()
                except ValueError:
                    pass
            self._failed(done.block, done.label, done.error or "extraction failed", what="fits" if done.failed_file else "analysis",
                         where=where, event_id=derived_event_id("processing.failed", done.job_id),
                         details={"job_id": done.job_id, "unit": done.unit, "family": done.family, "file": done.failed_file})
        self.advance(row["block"], row["test"])

    def on_solved(self, done: JobDone) -> None:
        row = self.store.solve(done.job_id)
        if row is None or row["published"]:
            return
        doc = done.results
        base, repeat = split_test_name(row["test"])
        job = SolveJob.model_validate_json(row["message"])
        flags = int(doc.flags) if doc else int(Flag.SUBTASKCRASH)
        am.SOLVE_SECONDS.labels(family=done.family).observe(done.duration_s)
        am.ANALYSES.labels(test=base, status=done.status).inc()
        am.ANALYSIS_DURATION.labels(test=base).observe(done.duration_s)
        if done.status == "failed":
            self._failed(row["block"], row["test"], done.error or "analysis failed", what="analysis",
                         where=f"{row['block']}/{row['test']}", event_id=derived_event_id("processing.failed", done.job_id),
                         details={"job_id": done.job_id, "traceback": ((doc.traceback if doc else "") or "")[-4000:],
                                  "flags": flags, "flag_names": flag_names(flags), "obsids": doc.obsids if doc else []})
        provenance = dict(doc.provenance) if doc else {}
        provenance.pop("inputs", None)
        provenance.update(job_id=done.job_id, duration_s=round(done.duration_s, 3), reused=done.reused)
        if doc:
            provenance["results_json"] = next((p for p in doc.products if p.endswith("results.json")), None)
        if self.reprocess:
            provenance["reprocess"] = self.reprocess
        fields: dict[str, Any] = dict(event_id=row["event_id"], producer="analyzer", provenance=json.loads(json.dumps(provenance, default=str)))
        if doc is not None:
            event = AnalysisCompleted.of_results(doc, **fields)
            event.test, event.repeat = base, repeat or None
        else:
            event = AnalysisCompleted(test=base, block=row["block"], repeat=repeat or None, status="failed", flags=flags,
                                      flag_names=flag_names(flags), error=done.error, **fields)
        if job.reanalysis_of and event.reanalysis is None:
            event.reanalysis = Reanalysis(of=job.reanalysis_of, reason=job.reanalysis_reason or "re-analysis")
        self.outbox().publish(event)
        self.published.append(event)
        self.store.mark_published(done.job_id)
        self.store.set_solve(done.job_id, done.status, error=done.error, seconds=done.duration_s)
        log.info("%s %s: %s (%s) event %s", row["block"], row["test"], done.status, ", ".join(event.flag_names) or "no flags",
                 row["event_id"])
        if done.status == "completed" and doc is not None:
            cals = provided_calibrations(doc, row["event_id"], event.produced_at)
            for cal in cals:
                self.store.add_calibration(cal)
            if cals:
                self.on_calibrations(row["block"], {c.name for c in cals}, row["test"])
        fam = planner.family_for(row["test"])
        if fam is not None and self.store.run(row["block"], row["test"], fam.name).get("solve_id") == done.job_id:
            self.rerun_if_needed(row["block"], row["test"], fam)  # a calibration came while it ran

    def on_calibrations(self, block: str, names: set[str], provider: str) -> None:
        """New calibrations of a block: wake the runs waiting for them; re-analyse the runs whose
        ``rerun`` need they satisfy."""
        available = self._calibrations(block)
        for run in self.store.runs():
            if run["block"] != block or run["test"] == provider:
                continue
            fam = planner.family_for(run["test"])
            if fam is None or not any(n.name in names for n in fam.needs):
                continue
            if run.get("waiting"):
                self.maybe_solve(block, run["test"], fam)
                continue
            self.rerun_if_needed(block, run["test"], fam, available)

    def rerun_if_needed(self, block: str, label: str, fam: Family, available: list[Calibration] | None = None) -> str | None:
        """Re-analyse a run whose last published solve lacks a ``rerun`` calibration available
        now (it arrived later, or while that solve was running)."""
        run = self.store.run(block, label, fam.name)
        prev = self.store.solve(run["solve_id"]) if run.get("solve_id") else None
        if prev is None or prev["status"] not in ("completed", "failed"):
            return None  # not solved yet, or in flight: checked again when its reply comes
        available = self._calibrations(block) if available is None else available
        pjob = SolveJob.model_validate_json(prev["message"])
        todo = planner.rerun_needed(fam.needs, pjob.calibrations, available)
        if not todo:
            return None
        decision = planner.resolve_needs(fam.needs, available, None, self.clock(), float(self.settings.calib_wait_s))
        why = "; ".join(f"calibration {need.name} from {cal.test} arrived" for need, cal in todo)
        units = [u for u in self.store.units(block, label, fam.name) if u["unit"] in {e.unit for e in pjob.extractions}]
        flags = pjob.flags & ~int(Flag.MISSDATA)  # re-derived: failed units / count (_solve_job), missing needs (decision)
        job = self._solve_job(block, label, fam, pjob.frames, units, pjob.expected_exposures, decision.use,
                              flags | decision.flags, decision.notes, len({f.obsid for f in pjob.frames}),
                              reanalysis_of=prev["event_id"], reanalysis_reason=why)
        if job.job_id == prev["job_id"]:
            return None
        return self._queue_solve(job, "reanalysis")

    def _failed(self, block: str, label: str, why: str, *, what: str, where: str, event_id: Any,
                details: dict[str, Any] | None = None) -> None:
        log.warning("%s %s: %s", block, label, why)
        event = ProcessingFailed(event_id=event_id, producer="analyzer", what=what, where=where, why=why, service="analyzer",
                                 test=label, block=block, details=details or {})
        self.outbox().publish(event)
        self.failed_events.append(event)

    # ------------------------------------------------------------------ status
    def status(self) -> list[dict[str, Any]]:
        """Per (block, test run, family): exposures, units, solve state, re-analyses."""
        with self.lock:
            return status_rows(self.store, self.ccds, self.settings.calib_wait_s)


def status_rows(store: AnalyzerStore, ccds: int = 3, wait_s: float = 1800.0) -> list[dict[str, Any]]:
    """The rows of ``vison analyzer status`` from a store."""
    out = []
    seen: set[tuple[str, str]] = set()
    keys = [(r["block"], r["test"]) for r in store.runs()] + store.frame_runs()
    for block, label in keys:
        if (block, label) in seen:
            continue
        seen.add((block, label))
        fam = planner.family_for(label)
        plan = store.plan(block, label)
        source = plan.data_from or label
        expected = plan.expected_frames if not plan.data_from else store.plan(block, source).expected_frames
        row: dict[str, Any] = {"block": block, "test": label, "family": fam.name if fam else None,
                               "exposures": len(store.complete_exposures(block, source, ccds)), "expected": expected}
        if fam is None:
            row["state"] = "no analysis"
            out.append(row)
            continue
        units = store.units(block, label, fam.name)
        row["units"] = {s: sum(1 for u in units if u["status"] == s) for s in ("done", "pending", "queued", "failed")}
        run = store.run(block, label, fam.name)
        solves = store.solves(block, label, fam.name)
        row["closed"] = bool(run.get("closed"))
        row["reanalyses"] = sum(1 for s in solves if s["reanalysis_of"])
        if run.get("waiting"):
            row["state"] = "waiting"
            row["waiting"] = json.loads(run["waiting"])
            row["waiting_since"] = run.get("waiting_since")
        elif run.get("solve_id"):
            s = store.solve(run["solve_id"])
            row["state"] = {"pending": "queued", "queued": "queued"}.get(s["status"], s["status"]) if s else "queued"
            row["event_id"] = s["event_id"] if s and s["published"] else None
            row["solve_job"] = run["solve_id"]
        else:
            row["state"] = "collecting" if not units or row["units"]["queued"] + row["units"]["pending"] == 0 else "extracting"
        out.append(row)
    return out
