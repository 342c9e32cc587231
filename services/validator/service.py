"""The validator service: ``exposure.ingested`` -> checks -> ``exposure.validated``.

For each exposure: verify the SHA-256 of the 3 CCD frames, read them, compute per-quadrant
offsets / noise / saturated and lost pixels (the 3 CCDs in parallel: a thread pool by default,
numpy and hashlib release the GIL), check HK over the exposure (its per-exposure HK file), the
offsets against the block reference, the script structure (when the block's campaign definition
is known), and publish the compliance tree and flags. Bad files give ``processing.failed``
events (one per file, naming it and the reason) and no ``exposure.validated``.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from services.validator import quicklook
from services.validator.checks import all_passed, assess_hk, assess_image, failed_leaves
from services.validator.specific import assess_test_specific, injection_registers
from services.validator.structure import ValidatorStore, check_exposure_structure, finish_test_structure
from services.validator.worker import process_ccd
from shared.bus import Delivery, Reject
from shared.config import Settings
from shared.events import (
    CampaignDefined,
    ExposureIngested,
    ExposureValidated,
    ProcessingFailed,
    TestClose,
    TestStructureChecked,
    derived_event_id,
)
from shared.flags import Flag, flag_names
from shared.metrics import (
    EXPOSURE_FLAG,
    EXPOSURES_VALIDATED,
    PROCESSING_SECONDS,
    QUADRANT_NOISE,
    QUADRANT_OFFSET,
    VALIDATION_LATENCY,
)
from shared.paths import PathError, resolve_under
from shared.refdata import block_offsets, chamber_profile, elvis_formats
from shared.storage import StorageBlocked, storage_guard

log = logging.getLogger("vison.validator")

SERVICE = "validator"
BINDINGS = ["exposure.ingested.#", "campaign.defined.#", "test.close.#"]


def make_pool(kind: str, workers: int) -> Executor | None:
    """``thread`` (default), ``process`` or ``serial`` (None)."""
    if kind == "serial" or workers <= 1 and kind != "process":
        return None
    if kind == "process":
        import multiprocessing

        # forkserver: workers do not inherit the broker connection; they ignore SIGINT / SIGTERM
        # (the service finishes its current exposure, then shuts the pool down)
        return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver"),
                                   initializer=_ignore_signals)
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ccd")


def _ignore_signals() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Validator:
    """Event handler of the validator (state: campaign definitions, structure history)."""

    def __init__(self, settings: Settings, pool: str = "thread", workers: int = 3):
        self.settings = settings
        self.data_root = Path(settings.data_root).resolve()
        self.state_dir = Path(settings.state_dir)
        self._store: ValidatorStore | None = None
        try:
            self.store  # noqa: B018 - open it now when the state folder allows
        except StorageBlocked as exc:  # read-only / full: opened by the first message that needs it
            log.error("validator: %s; the store is opened once the folder is writable", exc)
        self.pool = make_pool(pool, workers)
        self.hk_keys = list(elvis_formats()["validator_hk_keys"])
        self.chamber = _chamber(settings.chamber)

    @property
    def store(self) -> ValidatorStore:
        """The state store, opened on first use (StorageBlocked while the state folder refuses it)."""
        if self._store is None:
            with storage_guard("state", self.state_dir):
                self._store = ValidatorStore(self.state_dir / "validator.sqlite")
        return self._store

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        if self._store is not None:
            self._store.close()

    # ---------------------------------------------------------------- dispatch
    def __call__(self, event: Any, delivery: Delivery) -> None:
        if isinstance(event, CampaignDefined):
            with storage_guard("state", self.state_dir):
                self.store.save_campaign(event.block, event.definition)
            log.info("campaign definition of block %s stored (%s)", event.block, event.campaign or "-")
            return
        if isinstance(event, TestClose):
            with storage_guard("state", self.state_dir):
                out = self.test_over(event.block, event.test, "closed by operator")
            delivery.publish(out)
            return
        if isinstance(event, ExposureIngested):
            outputs = self.validate(event)
            for out in outputs:
                delivery.publish(out)
                if isinstance(out, ExposureValidated):
                    self.observe_latency(out)
            refused = [o for o in outputs if isinstance(o, ProcessingFailed) and o.what == "path"]
            if refused:  # reported above; the message itself goes to the dead letters
                raise Reject("; ".join(f"path {o.where!r} refused: {o.why}" for o in refused))
            return
        log.debug("ignoring %s", delivery.routing_key)

    # ---------------------------------------------------------------- checks
    def test_over(self, block: str, test: str, reason: str) -> TestStructureChecked:
        """The whole-test structure verdict of a test that is over (ended early -> MISSDATA)."""
        fields = finish_test_structure(self.store, block, test)
        out = TestStructureChecked(
            event_id=derived_event_id("test.checked", block, test, sorted(fields.get("frames_seen", {}).items())),
            producer=SERVICE, reason=reason, **fields,
        )
        if out.ended_early or not out.passed:
            log.warning("test %s of block %s is over (%s): %s, frames %s of %s", test, block, reason,
                        out.flag_names or out.status, out.frames_seen, out.frames_expected)
        return out

    def _resolve(self, rel: str) -> Path:
        """A path of a message under the data root (PathError: absolute, '..', symlink out)."""
        return resolve_under(self.data_root, rel)

    def _failure(self, ev: ExposureIngested, what: str, where: str, why: str) -> ProcessingFailed:
        return ProcessingFailed(
            event_id=derived_event_id("processing.failed", SERVICE, ev.event_id, where, what),
            what=what, where=where, why=why, service=SERVICE, producer=SERVICE,
            obsid=ev.obsid, test=ev.test, block=ev.block,
        )

    def validate(self, ev: ExposureIngested) -> list[Any]:
        """The events to publish for one ingested exposure (validated, or failures)."""
        t0 = time.perf_counter()
        rows = {self._ccd_of(r, i): r for i, r in enumerate(ev.explog)}
        failures: list[ProcessingFailed] = []
        jobs: dict[int, Any] = {}
        for ref in [*(() if ev.hk_file is None else (ev.hk_file,)), *sorted(ev.files, key=lambda f: f.ccd or 0)]:
            try:
                path = self._resolve(ref.path)
            except PathError as exc:
                failures.append(self._failure(ev, "path", ref.path, f"outside the data root: refused ({exc.reason})"))
                continue
            if ref is ev.hk_file:
                continue
            row = rows.get(ref.ccd or 0, {})
            vstart, vend = int(_num(row.get("vstart"), 0)), int(_num(row.get("vend"), 2086))
            args = (str(path), ref.sha256, vstart, vend, injection_registers(row))
            jobs[ref.ccd or 0] = self.pool.submit(process_ccd, *args) if self.pool else args
        results = {}
        for ccd, job in jobs.items():
            results[ccd] = job.result() if self.pool else process_ccd(*job)
        for ccd, res in sorted(results.items()):
            if not res["ok"]:
                ref = next(f for f in ev.files if (f.ccd or 0) == ccd)
                failures.append(self._failure(ev, res["what"], ref.path, res["why"]))
        if failures:
            for f in failures:
                log.warning("ObsID %s: %s %s: %s", ev.obsid, f.what, f.where, f.why)
            return failures
        t1 = time.perf_counter()
        for key in ("checksum", "read", "stats"):
            PROCESSING_SECONDS.labels(service=SERVICE, step=key).observe(
                max(r["seconds"][key] for r in results.values()))

        stats = {f"CCD{ccd}": res["stats"] for ccd, res in sorted(results.items())}
        rows_by_ccd = {f"CCD{ccd}": row for ccd, row in rows.items()}
        injection = {f"CCD{ccd}": res["injection"] for ccd, res in sorted(results.items()) if res.get("injection")}
        image_tree, flags = assess_image(ev.test, block_offsets(ev.block), stats, rows_by_ccd)
        compliance: dict[str, Any] = dict(image_tree)
        notes: list[str] = []
        specific_tree, specific_flags, specific_notes = assess_test_specific(ev.test, stats, rows_by_ccd, self.chamber, injection)
        if specific_tree:
            compliance["test"] = specific_tree
        flags |= specific_flags
        notes += specific_notes

        hk_tree, hk_flags, hk_note = self._hk(ev, rows)
        if hk_tree:
            compliance["hk"] = hk_tree
        if hk_note:
            notes.append(hk_note)
        flags |= hk_flags

        with storage_guard("state", self.state_dir):
            previous = self.store.switch_test(ev.block, ev.test, ev.obsid)
        over = [self.test_over(ev.block, previous, "next test started")] if previous else []
        try:
            with storage_guard("state", self.state_dir):
                status, structure_tree, structure_flags = check_exposure_structure(self.store, ev.block, ev.test, ev.obsid, rows)
        except StorageBlocked:
            raise  # retried (the message stays unacknowledged) until the state folder is writable
        except Exception as exc:  # the exposure's verdict must not depend on the campaign code working
            log.exception("structure check of ObsID %s failed", ev.obsid)
            status, structure_tree, structure_flags = f"not checked: {exc.__class__.__name__}: {exc}", {}, Flag(0)
        if structure_tree:
            compliance["structure"] = structure_tree
        flags |= structure_flags
        t2 = time.perf_counter()

        passed = all_passed(compliance)
        out = ExposureValidated(
            event_id=derived_event_id("exposure.validated", ev.event_id),
            producer=SERVICE,
            obsid=ev.obsid, block=ev.block, roe=ev.roe, test=ev.test, date=ev.date,
            ingested_event_id=ev.event_id, files=ev.files, explog=ev.explog,
            passed=passed, flags=int(flags), flag_names=flag_names(int(flags)),
            compliance=compliance, stats=stats, structure=status, complete_at=ev.complete_at,
            processing_seconds=round(t2 - t0, 4), notes=notes,
        )
        self._metrics(out, t1 - t0, t2 - t1)
        quicklook.write_safely(out, results, self.data_root, self.settings.products_root)  # logs, never raises
        if not passed:
            log.info("ObsID %s %s: flags %s; failing %s", ev.obsid, ev.test, out.flag_names, failed_leaves(compliance)[:8])
        return [*over, out]

    @staticmethod
    def _ccd_of(row: dict[str, Any], index: int) -> int:
        value = row.get("CCD")
        if isinstance(value, int):
            return value
        text = str(value or "").upper().removeprefix("CCD")
        return int(text) if text.isdigit() else index + 1

    def _hk(self, ev: ExposureIngested, rows: dict[int, Any]) -> tuple[dict[str, Any], Flag, str]:
        """HK checks over the exposure from its per-exposure HK file."""
        from shared.hk import HKFormatError, check_hk_limits, read_hk

        try:
            path = self._resolve(ev.hk_file.path) if ev.hk_file else self._find_hk(ev)
        except PathError as exc:
            return {}, Flag(0), f"HK not checked: {exc}"
        if path is None or not path.is_file():
            return {}, Flag(0), "HK not checked: no per-exposure HK file"
        try:
            table = read_hk(path, complete=True)
        except (HKFormatError, OSError, ValueError) as exc:
            return {}, Flag(0), f"HK not checked: {exc}"
        commanded = rows.get(1) or next(iter(rows.values()), {})
        verdicts = check_hk_limits(table, commanded, kinds=("P", "S"), keys=self.hk_keys)
        tree, flags = assess_hk(verdicts)
        return tree, flags, ""

    def _find_hk(self, ev: ExposureIngested) -> Path | None:
        """``HK_<ObsID>_*_ROE<r>.txt`` beside the frames (when ingest did not see it)."""
        if not ev.files:
            return None
        folder = self._resolve(str(Path(ev.files[0].path).parent))
        if not folder.is_dir():
            return None
        for candidate in sorted(folder.glob(f"HK_{ev.obsid}_*_ROE{ev.roe}.txt")):
            try:
                return self._resolve(str(candidate.relative_to(self.data_root)))
            except PathError:
                continue
        return None

    def _metrics(self, out: ExposureValidated, t_frames: float, t_checks: float) -> None:
        PROCESSING_SECONDS.labels(service=SERVICE, step="frames").observe(t_frames)
        PROCESSING_SECONDS.labels(service=SERVICE, step="checks").observe(t_checks)
        for ccd, quads in out.stats.items():
            for q, s in quads.items():
                for region in ("pre", "img", "ove"):
                    r = getattr(s, region)
                    QUADRANT_OFFSET.labels(block=out.block, ccd=ccd, quadrant=q, region=region).set(r.offset)
                    QUADRANT_NOISE.labels(block=out.block, ccd=ccd, quadrant=q, region=region).set(r.noise)
        EXPOSURES_VALIDATED.labels(block=out.block, test=out.test).inc()
        for name in out.flag_names:
            EXPOSURE_FLAG.labels(block=out.block, test=out.test, flag=name).inc()

    @staticmethod
    def observe_latency(out: ExposureValidated) -> float | None:
        """Seconds from 'last frame complete' (ingest) to now."""
        if out.complete_at is None:
            return None
        latency = (datetime.now(timezone.utc) - out.complete_at).total_seconds()
        VALIDATION_LATENCY.observe(max(latency, 0.0))
        return latency


def _chamber(name: str) -> dict[str, Any]:
    """The chamber (OGSE) profile of ``VISON_CHAMBER`` (exposure times to full well), {} when
    unknown (the fluence checks then say so in each verdict's notes)."""
    try:
        return dict(chamber_profile(name))
    except Exception as exc:
        log.error("VISON_CHAMBER=%s: no such chamber profile (%s); test-specific fluence checks disabled", name, exc)
        return {}


def _num(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def default_workers() -> int:
    return 3 if (os.cpu_count() or 1) > 1 else 1
