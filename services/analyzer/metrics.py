"""Analyzer metrics (engine v2) for the Pipeline board, beside the shared
``vison_analysis_duration_seconds{test}`` and ``vison_analyses_total{test,status}``:

- ``vison_analyzer_runs{state}``: test runs per state (collecting, extracting, waiting, queued,
  completed, failed);
- ``vison_analyzer_waiting_needs{block,test,need}``: 1 while a solve waits for a calibration;
- ``vison_extraction_seconds{family}``, ``vison_solve_seconds{family}``: job durations (as the
  workers report them in their replies, so that workers on other hosts count too).
"""

from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import Gauge, Histogram

from shared.metrics import ANALYSES, ANALYSIS_DURATION

RUNS = Gauge("vison_analyzer_runs", "Analyzer test runs per state", ["state"])
WAITING_NEEDS = Gauge("vison_analyzer_waiting_needs", "1 while a test run's solve waits for a calibration", ["block", "test", "need"])
EXTRACTION_SECONDS = Histogram("vison_extraction_seconds", "Duration of one extraction job (s)", ["family"],
                               buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300))
SOLVE_SECONDS = Histogram("vison_solve_seconds", "Duration of one solve job (s)", ["family"],
                          buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800))

STATES = ("collecting", "extracting", "waiting", "queued", "completed", "failed")
_waiting_seen: set[tuple[str, str, str]] = set()


def update_status_gauges(rows: Iterable[dict[str, Any]]) -> None:
    counts = dict.fromkeys(STATES, 0)
    waiting: set[tuple[str, str, str]] = set()
    for r in rows:
        state = r.get("state")
        if state in counts:
            counts[state] += 1
        for need in r.get("waiting") or []:
            waiting.add((r["block"], r["test"], need))
    for state, n in counts.items():
        RUNS.labels(state=state).set(n)
    for key in _waiting_seen - waiting:
        WAITING_NEEDS.labels(*key).set(0)
    for key in waiting:
        WAITING_NEEDS.labels(*key).set(1)
    _waiting_seen.clear()
    _waiting_seen.update(waiting)


__all__ = ["ANALYSES", "ANALYSIS_DURATION", "EXTRACTION_SECONDS", "RUNS", "SOLVE_SECONDS", "WAITING_NEEDS", "update_status_gauges"]
