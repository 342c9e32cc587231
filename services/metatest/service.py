"""The metatest service: ``analysis.completed`` -> the FPA families that use the test ->
``metatest.completed.<family>``.

The handler checks the result (known block, 3 CCDs x 4 quadrants, numeric values: otherwise a
``processing.failed``), keeps it in the state DB when it is the latest of its (block, test,
repeat) and marks the families using that test (every family converting to electrons for a
PTC01) as due; the message is acknowledged once that is committed. A :class:`Recomputer` thread
rebuilds the families due for ``batch_seconds`` from the state DB (inputs arriving together give
one recomputation), writes their products and publishes one event per family (its own confirmed
publisher: a long mosaic never holds up the consumer's heartbeats); the event id is derived from
the event ids of the inputs used, and an id already published is not published again. A crash
between the commit and the publication leaves the family due: it is recomputed after a restart.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
from pathlib import Path
from typing import Any, Callable

from services.analyzer.products import atomic_write, software_version, utc_now
from services.metatest.aggregate import (
    ResultError,
    ResultRecord,
    aggregate,
    check_result,
    family_keys,
    gains_of,
    history_rows,
    latest_per_test,
)
from services.metatest.families import FAMILIES, Family, families_of
from services.metatest.layout import FPALayout, fpa_layout
from services.metatest.products import family_dir, write_family_products
from services.metatest.state import MetatestStore
from shared.bus import CONNECTION_ERRORS, Delivery
from shared.config import Settings
from shared.events import AnalysisCompleted, MetatestCompleted, ProcessingFailed, derived_event_id, event_body

log = logging.getLogger("vison.metatest")

SERVICE = "metatest"
BINDINGS = ["analysis.completed.#"]
BATCH_SECONDS = 0.5  # inputs marked within this window are aggregated together
RETRY_SECONDS = 10.0  # a family whose products could not be written is retried after this


def metatest_event_id(family: str, inputs: list[str]) -> str:
    """The id of a family's event: derived from the event ids of its inputs (order-free)."""
    return str(derived_event_id("metatest.completed", family, *sorted(inputs)))


def build_family(family: Family, latest: dict[tuple[str, str], ResultRecord], layout: FPALayout, root: Path, *,
                 products_root: Path | None = None, figures: bool = True, mosaics: bool = True,
                 skip: Callable[[str], bool] | None = None, trigger: str = "",
                 records: list[ResultRecord] | None = None) -> MetatestCompleted | None:
    """Aggregate one family over the latest results, write its products under ``<root>/FPA/`` and
    return its event (None: no block has input, or ``skip(event_id)`` says it is already out).
    ``records``: every stored result (all repeats), for the families following keys over time."""
    result = aggregate(family, latest, gains_of(latest), layout)
    if result is None:
        return None
    event_id = metatest_event_id(family.name, result.inputs)
    if skip is not None and skip(event_id):
        return None
    products = write_family_products(result, layout, root, products_root=products_root, figures=figures,
                                     mosaics=mosaics, provenance={"event_id": event_id},
                                     history=history_rows(family, records or list(latest.values())))
    event_file = family_dir(root, family.name) / f"{family.name}_event.json"
    tests = sorted({t for _, t in result.records})
    event = MetatestCompleted(
        event_id=event_id, producer=SERVICE, family=family.name, blocks=result.blocks, missing=result.missing,
        results=result.maps(layout), spares={n: v for n, v in result.spare_values(layout).items() if v},
        units={n: i.unit for n, i in result.quantities.items()}, summary=result.summary,
        products=products + [event_file.resolve().relative_to(Path(root).resolve()).as_posix()], inputs=result.inputs,
        provenance={"software": {"name": "vison", "version": software_version(), "python": platform.python_version()},
                    "tests": tests, "n_inputs": len(result.inputs), "created": utc_now(), "trigger": trigger,
                    "description": family.description},
    )
    body = event_body(event)
    atomic_write(event_file, lambda tmp: Path(tmp).write_bytes(body))  # the event beside its products
    return event


class Metatest:
    """Event handler and periodic recomputation of the metatest service."""

    def __init__(self, settings: Settings, *, batch_seconds: float = BATCH_SECONDS, figures: bool = True,
                 mosaics: bool = True, layout: FPALayout | None = None):
        self.settings = settings
        self.products_root = Path(settings.products_root)
        self.layout = layout or fpa_layout()
        self.store = MetatestStore(Path(settings.state_dir) / "metatest.sqlite")
        self.batch_seconds = batch_seconds
        self.figures = figures
        self.mosaics = mosaics
        self._retry_at: dict[str, float] = {}
        self.n_published = 0

    def close(self) -> None:
        self.store.close()

    # ---------------------------------------------------------------- inputs
    def __call__(self, event: Any, delivery: Delivery) -> None:
        if not isinstance(event, AnalysisCompleted):
            log.debug("ignoring %s", delivery.routing_key)
            return
        failure = self.accept(event, delivery.routing_key)
        if failure is not None:
            delivery.publish(failure)

    def accept(self, event: AnalysisCompleted, routing_key: str = "") -> ProcessingFailed | None:
        """Store a completed result (when it is the latest of its test run) and mark its families
        due; a result that cannot be aggregated gives the ``processing.failed`` to publish."""
        if event.status != "completed":
            log.info("%s %s: analysis %s; the previous result (if any) is kept", event.test, event.block, event.status)
            return None
        families = families_of(event.test)
        keys = set().union(*(family_keys(f) for f in families)) if families else set()
        try:
            check_result(event.block, event.test, event.results, self.layout, keys)
        except ResultError as exc:
            log.warning("refused %s: %s", routing_key or event.routing_key(), exc)
            return ProcessingFailed(
                event_id=derived_event_id("processing.failed", SERVICE, event.event_id), producer=SERVICE,
                service=SERVICE, what="analysis", where=routing_key or event.routing_key(), why=str(exc),
                test=event.test, block=event.block, details={"input_event_id": str(event.event_id)},
            )
        record = ResultRecord(event.block, event.test, int(event.repeat or 0), str(event.event_id), event.produced_at,
                              event.results, list(event.products))
        status = self.store.put(record)
        if status == "older":
            log.info("%s %s: older than the stored result; nothing to recompute", event.test, event.block)
            return None
        # "same": a redelivery after a crash may have stored it without marking its families due;
        # marking them again is harmless (the same inputs give the same event id: not re-published)
        if families:
            self.store.mark_dirty([f.name for f in families])
            log.info("%s %s stored; due: %s", record.label, record.block, ", ".join(f.name for f in families))
        return None

    # ---------------------------------------------------------------- recomputation
    def flush(self, publish: Callable[[MetatestCompleted], Any], older_than: float = 0.0) -> list[MetatestCompleted]:
        """Recompute every family due for at least ``older_than`` s; publish new events."""
        now = time.monotonic()
        due = {f: seq for f, seq in self.store.due(older_than).items() if self._retry_at.get(f, 0.0) <= now}
        if not due:
            return []
        records = self.store.records()
        latest = latest_per_test(records)
        out = []
        for name, seq in sorted(due.items(), key=lambda item: item[0] != "ptc"):  # the gain matrix first
            family = FAMILIES.get(name)
            if family is None:
                self.store.clear_dirty(name)
                continue
            try:
                event = build_family(family, latest, self.layout, self.products_root, figures=self.figures,
                                     mosaics=self.mosaics, skip=self.store.was_published, trigger="analysis.completed",
                                     records=records)
            except CONNECTION_ERRORS:
                raise
            except Exception:  # products could not be written: keep the family due, retry later
                log.exception("family %s: recomputation failed; retrying in %.0f s", name, RETRY_SECONDS)
                self._retry_at[name] = now + RETRY_SECONDS
                continue
            if event is not None:
                publish(event)
                self.store.mark_published(str(event.event_id), name)
                self.n_published += 1
                out.append(event)
                log.info("metatest.completed.%s: %d blocks, missing %s, %d quantities, %d inputs", name,
                         len(event.blocks), ",".join(event.missing) or "-", len(event.results), len(event.inputs))
            self._retry_at.pop(name, None)
            self.store.clear_dirty(name, seq)  # marked again meanwhile: stays due for the next round
        return out


class Recomputer(threading.Thread):
    """The recomputation loop, beside the consumer: every ``interval`` s, the families due for
    ``batch_seconds`` are rebuilt and published with its own :class:`~shared.bus.Publisher`
    (confirmed, reconnecting), so that long products (mosaics of full-size masters) never hold up
    the consumer's connection. :meth:`stop` finishes the family in progress."""

    def __init__(self, service: Metatest, settings: Settings, interval: float = 0.25):
        super().__init__(name="metatest-recompute", daemon=True)
        self.service, self.settings, self.interval = service, settings, interval
        self.stop_event = threading.Event()
        self.errors = 0

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        from shared.bus import Publisher

        with Publisher(self.settings, SERVICE, stop=self.stop_event) as publisher:
            while not self.stop_event.is_set():
                try:
                    self.service.flush(publisher.publish, older_than=self.service.batch_seconds)
                except Exception as exc:  # broker gone while stopping, state DB trouble: retried
                    if self.stop_event.is_set():
                        break
                    self.errors += 1
                    log.warning("recomputation interrupted (%s: %s); the families stay due", exc.__class__.__name__, exc)
                    self.stop_event.wait(min(30.0, 0.5 * 2 ** min(self.errors, 6)))
                    continue
                self.errors = 0
                publisher.tick()
                self.stop_event.wait(self.interval)


__all__ = ["BINDINGS", "BATCH_SECONDS", "Metatest", "Recomputer", "SERVICE", "build_family", "metatest_event_id"]
