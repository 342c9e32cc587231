"""Prometheus metrics of every vison service (names fixed in docs/dev/CONTRACTS.md so that the
dashboards and alert rules agree) and the ``/metrics`` HTTP endpoint."""

from __future__ import annotations

import logging

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# --- every service
EVENTS_PUBLISHED = Counter("vison_events_published_total", "Events published (confirmed by the broker)", ["service", "kind"])
EVENTS_CONSUMED = Counter("vison_events_consumed_total", "Events consumed and acknowledged", ["service", "kind"])
EVENTS_FAILED = Counter("vison_events_failed_total", "Events whose handling failed (retried or dead-lettered)", ["service", "kind"])
DEAD_LETTERED = Counter("vison_dead_lettered_total", "Messages sent to the dead-letter queue", ["service"])
QUEUE_DEPTH = Gauge("vison_queue_depth", "Messages ready in a queue (sampled by its consumer)", ["queue"])
PROCESSING_SECONDS = Histogram(
    "vison_processing_seconds",
    "Time spent in one processing step (s)",
    ["service", "step"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
SERVICE_INFO = Gauge("vison_service_info", "Running service (value 1)", ["service", "version"])
EVENTS_UNROUTABLE = Counter("vison_events_unroutable_total", "Messages returned by the broker (no queue bound); published again", ["service", "kind"])
SERVICE_BLOCKED = Gauge("vison_service_blocked", "1 while a service is blocked on a transient condition (disk full...)", ["service", "reason"])

# --- ingest
HK_VALUE = Gauge("vison_hk_value", "Latest value of an HK parameter", ["block", "roe", "param"])
HK_LIMIT = Gauge("vison_hk_limit", "HK limit of a parameter (absolute value)", ["param", "kind", "bound"])
HK_OUT_OF_LIMITS = Gauge("vison_hk_out_of_limits", "1 when the latest HK value is outside its limits", ["param", "kind"])
FILES_SEEN = Counter("vison_files_seen_total", "Files seen complete by ingest", ["kind"])
EXPOSURES_INGESTED = Counter("vison_exposures_ingested_total", "Exposures published by ingest", ["block", "test"])
HK_LAST_SAMPLE = Gauge("vison_hk_last_sample_timestamp_seconds", "Unix time of the latest HK sample", ["block", "roe"])

# --- validator
QUADRANT_OFFSET = Gauge("vison_quadrant_offset_adu", "Offset (median, ADU) of the latest exposure", ["block", "ccd", "quadrant", "region"])
QUADRANT_NOISE = Gauge("vison_quadrant_noise_adu", "Noise (std, ADU) of the latest exposure", ["block", "ccd", "quadrant", "region"])
EXPOSURE_FLAG = Counter("vison_exposure_flag_total", "Validated exposures carrying a flag", ["block", "test", "flag"])
EXPOSURES_VALIDATED = Counter("vison_exposures_validated_total", "Exposures validated", ["block", "test"])
VALIDATION_LATENCY = Histogram(
    "vison_validation_latency_seconds",
    "File complete (seen by ingest) -> exposure.validated published (s)",
    buckets=(0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 300),
)

# --- analyzer
ANALYSIS_DURATION = Histogram(
    "vison_analysis_duration_seconds",
    "Duration of one test analysis (s)",
    ["test"],
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1200, 3600),
)
ANALYSES = Counter("vison_analyses_total", "Test analyses run", ["test", "status"])

_started: dict[int, bool] = {}


def start_metrics_server(port: int, service: str | None = None, version: str | None = None,
                         bind: str | None = None) -> int:
    """Serve ``/metrics`` on ``port`` (0: disabled; returns the port) at ``bind`` (default
    ``VISON_METRICS_BIND``, itself 127.0.0.1: the loopback only). Sets ``vison_service_info``."""
    if service:
        SERVICE_INFO.labels(service=service, version=version or _version()).set(1)
    if not port:
        return 0
    if port not in _started:
        if bind is None:
            from shared.config import get_settings

            bind = get_settings().metrics_bind
        start_http_server(port, addr=bind)
        _started[port] = True
        log.info("metrics on http://%s:%d/metrics", bind, port)
    return port


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("vison")
    except Exception:  # pragma: no cover - not installed
        return "0"


__all__ = [
    "ANALYSES",
    "ANALYSIS_DURATION",
    "DEAD_LETTERED",
    "EVENTS_CONSUMED",
    "EVENTS_FAILED",
    "EVENTS_PUBLISHED",
    "EVENTS_UNROUTABLE",
    "EXPOSURES_INGESTED",
    "EXPOSURES_VALIDATED",
    "EXPOSURE_FLAG",
    "FILES_SEEN",
    "HK_LAST_SAMPLE",
    "HK_LIMIT",
    "HK_OUT_OF_LIMITS",
    "HK_VALUE",
    "PROCESSING_SECONDS",
    "QUADRANT_NOISE",
    "QUADRANT_OFFSET",
    "QUEUE_DEPTH",
    "REGISTRY",
    "SERVICE_BLOCKED",
    "SERVICE_INFO",
    "VALIDATION_LATENCY",
    "start_metrics_server",
]
