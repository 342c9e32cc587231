"""``vison validator``: consume ``exposure.ingested.#`` (and ``campaign.defined.#``), publish
``exposure.validated.<test>.<block>`` (or ``processing.failed`` for bad files)."""

from __future__ import annotations

import argparse
import logging

from services.validator.service import BINDINGS, SERVICE, Validator, default_workers
from shared.bus import Consumer
from shared.config import get_settings
from shared.metrics import start_metrics_server

log = logging.getLogger("vison.validator")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pool", choices=("thread", "process", "serial"), default="thread",
                        help="how the 3 CCD frames of an exposure are processed in parallel (thread)")
    parser.add_argument("--workers", type=int, default=default_workers(), help="parallel CCD workers (3)")
    parser.add_argument("--metrics-port", type=int, default=None, help="override VISON_METRICS_PORT")


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    port = settings.metrics_port if args.metrics_port is None else args.metrics_port
    start_metrics_server(port, SERVICE)
    validator = Validator(settings, pool=args.pool, workers=args.workers)
    consumer = Consumer(settings, SERVICE, BINDINGS, validator)
    log.info("validator: data root %s, pool %s x %d", validator.data_root, args.pool, args.workers)
    try:
        consumer.run()
    finally:
        validator.close()
    return 0
