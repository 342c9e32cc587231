"""``vison ingest``: watch the data root (VISON_DATA_ROOT) and publish ``exposure.ingested``,
``hk.samples`` and ``processing.failed`` events; HK gauges on /metrics."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from services.ingest.service import SERVICE, IngestOptions, IngestService, open_ingest
from shared.config import get_settings
from shared.metrics import start_metrics_server

log = logging.getLogger("vison.ingest")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = IngestOptions()
    parser.add_argument("--data", default=None, help="data root (default VISON_DATA_ROOT)")
    parser.add_argument("--rescan-interval", type=float, default=d.rescan_interval, help=f"s between full rescans ({d.rescan_interval:g})")
    parser.add_argument("--stable-seconds", type=float, default=d.stable_seconds, help=f"s a FITS size must stay unchanged ({d.stable_seconds:g})")
    parser.add_argument("--incomplete-timeout", type=float, default=d.incomplete_timeout, help=f"s before an incomplete FITS is reported ({d.incomplete_timeout:g})")
    parser.add_argument("--exposure-timeout", type=float, default=d.exposure_timeout, help=f"s before an incomplete exposure is reported ({d.exposure_timeout:g})")
    parser.add_argument("--no-watch", action="store_true", help="rescans only (no watchdog)")
    parser.add_argument("--metrics-port", type=int, default=None, help="override VISON_METRICS_PORT")


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    if args.data:
        settings = settings.model_copy(update={"data_root": args.data})
    port = settings.metrics_port if args.metrics_port is None else args.metrics_port
    start_metrics_server(port, SERVICE)
    options = IngestOptions(
        rescan_interval=args.rescan_interval, stable_seconds=args.stable_seconds,
        incomplete_timeout=args.incomplete_timeout, exposure_timeout=args.exposure_timeout,
        watch=not args.no_watch,
    )
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    service = open_ingest(settings, options, stop)  # waits while the state folder is read-only / full
    if service is None:
        return 0
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, service.stop)
        signal.signal(signal.SIGINT, service.stop)
    if stop.is_set():  # a signal between the two handlers
        service.stop()
    service.run()
    return 0
