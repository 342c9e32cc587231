"""``vison catalogue``: fill the results catalogue from the bus (queue ``<prefix>.catalogue``,
bindings ``exposure.validated.#``, ``analysis.completed.#``, ``metatest.completed.#``).

    vison catalogue                          # the consumer (VISON_CATALOGUE_URL, metrics :9106 in the stack)
    vison catalogue rebuild [--products DIR] # refill analyses, results, FPA maps from the products folder
    vison catalogue info                     # rows per table

Idempotent by event id in the database itself (upserts; a redelivered or repeated event changes
nothing), so the database alone is the state: it can be dropped and rebuilt. Content that cannot
be catalogued is dead-lettered with a ``processing.failed`` naming the field (never a crash).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from services.catalogue.records import RecordError
from services.catalogue.store import Catalogue, catalogue_url
from shared.bus import Consumer, Delivery, Reject
from shared.config import Settings, get_settings

log = logging.getLogger("vison.catalogue")

SERVICE = "catalogue"
BINDINGS = ["exposure.validated.#", "analysis.completed.#", "metatest.completed.#"]


class CatalogueHandler:
    """Consumer handler: one event -> the catalogue (bad content -> :class:`Reject`). While the
    database is unreachable it waits for it (up to ``db_wait_s`` per delivery, backoff 0.5 ->
    5 s), then lets the delivery fail (requeued, dead-lettered after VISON_MAX_REDELIVERIES)."""

    def __init__(self, catalogue: Catalogue, db_wait_s: float = 20.0):
        self.catalogue = catalogue
        self.db_wait_s = db_wait_s
        self.added = 0

    def __call__(self, event: Any, delivery: Delivery) -> None:
        from sqlalchemy.exc import InterfaceError, OperationalError

        deadline = time.monotonic() + self.db_wait_s
        delay = 0.5
        while True:
            try:
                if self.catalogue.add(event):
                    self.added += 1
                return
            except RecordError as exc:
                raise Reject(f"{delivery.routing_key}: {exc}") from None
            except (OperationalError, InterfaceError) as exc:
                if time.monotonic() + delay > deadline or delivery.consumer.stopping:
                    raise
                log.warning("catalogue database unreachable (%s); waiting for the database, retry in %.1f s",
                            str(exc).splitlines()[0][:200], delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)


def make_consumer(settings: Settings, catalogue: Catalogue) -> Consumer:
    # idempotent=False: duplicates are detected in the database (one state, rebuildable)
    return Consumer(settings, SERVICE, BINDINGS, CatalogueHandler(catalogue), idempotent=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", default="run", choices=["run", "rebuild", "info"],
                        help="run: consume events (default); rebuild: from the products folder; info: row counts")
    parser.add_argument("--products", type=Path, default=None, help="products folder (default VISON_PRODUCTS_ROOT)")
    parser.add_argument("--url", default=None, help="database URL (default VISON_CATALOGUE_URL or the SQLite file)")
    parser.add_argument("--keep", action="store_true", help="rebuild: add to the catalogue without clearing it first")
    parser.add_argument("--metrics-port", type=int, default=None, help="override VISON_METRICS_PORT")


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    url = args.url or catalogue_url(settings)
    try:
        catalogue = Catalogue(url)
    except Exception as exc:
        print(f"vison catalogue: cannot open {url.split('@')[-1]}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.action == "info":
            for table, n in catalogue.counts().items():
                print(f"{table:<20} {n}")
            return 0
        if args.action == "rebuild":
            from services.catalogue.rebuild import rebuild

            products = args.products or settings.products_root
            try:
                report = rebuild(catalogue, products, clear=not args.keep)
            except FileNotFoundError as exc:
                print(f"vison catalogue: {exc}", file=sys.stderr)
                return 2
            print(f"rebuilt from {products}: {report.analyses} analyses, {report.families} FPA families, "
                  f"{len(report.skipped)} files skipped")
            for line in report.skipped:
                print(f"  skipped {line}")
            return 0
        from shared.metrics import start_metrics_server

        start_metrics_server(settings.metrics_port if args.metrics_port is None else args.metrics_port, SERVICE)
        log.info("catalogue: %s", url.split("@")[-1])
        make_consumer(settings, catalogue).run()
        return 0
    finally:
        catalogue.close()
