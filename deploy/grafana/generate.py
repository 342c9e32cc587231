#!/usr/bin/env python3
"""Generate the Grafana dashboards (``dashboards/*.json``) of the vison lab stack.

Run from the repository root::

    python deploy/grafana/generate.py          # rewrite deploy/grafana/dashboards/*.json
    python deploy/grafana/generate.py --check  # exit 1 if a committed dashboard differs

Three boards, every query on the provisioned Prometheus data source (uid ``vison-prometheus``,
``provisioning/datasources/vison.yml``); metric names from docs/dev/CONTRACTS.md:

- **HK** (``vison-hk``): every HK parameter of ELVIS 7.5.X grouped as the old Eyegore monitor
  (CCD temperatures, ROE temperatures, bias voltages, ROE supplies, RPSU, status flags), one
  small plot per parameter with its safe (S) limits drawn as threshold bands and the ingest's
  performance (P) limits as dashed lines; a status grid of the out-of-limit flags, latched over
  the ``$latch`` window (default 1 h) like Eyegore's flags.
- **Exposure QA** (``vison-exposure-qa``): offsets and noise per CCD / quadrant / region over
  time, the latest exposure's values, flags per exposure, exposures validated, validation latency.
- **Pipeline** (``vison-pipeline``): services up, events/s per service, failures, queue depths
  (consumers and broker), dead letters, processing and analysis durations, analysis failures.

Three boards on the results catalogue (PostgreSQL data source uid ``vison-catalogue``, tables of
services/catalogue/models.py), written to ``dashboards/catalogue/`` (the file provider reads
sub-folders):

- **Exposure log** (``vison-exposure-log``): the latest exposures of ``$block`` (ObsID, time,
  test, prescan offset per CCD, verdict, flags in colour), filterable by ``$test``; exposures per
  verdict per test.
- **Results** (``vison-results``): ``$quantity`` of ``$test`` per CCD / quadrant (latest
  analysis) and its history across tests.
- **FPA** (``vison-fpa``): 12 x 12 quadrant grids of gain, RON (e-), dark current and PRNU from the
  metatest aggregates, and which blocks each family holds.

Every SQL query is run against a real PostgreSQL by tests/test_dashboards_sql.py.

Limits come from ``shared/spec/elvis-formats.json`` (the package copy of the spec).
:func:`must_have_data` lists the panels that a running simulated stack must fill (the integration
test in tests/test_dashboards_live.py checks them against a real Prometheus).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SPEC = REPO / "shared" / "spec" / "elvis-formats.json"
OUT_DIR = HERE / "dashboards"

DATASOURCE_UID = "vison-prometheus"
DS = {"type": "prometheus", "uid": DATASOURCE_UID}
HK_VERSION = "7.5.X"
SCHEMA_VERSION = 39
VISON_JOBS = "ingest|validator|analyzer|metatest|scriptgen|catalogue"
CCDS = ("CCD1", "CCD2", "CCD3")

#: HK groups in display order: (title, predicate on the parameter name, unit).
HK_GROUPS: list[tuple[str, str, str]] = [
    ("CCD temperatures", r"^CCD\d_TEMP_[TB]$", "celsius"),
    ("ROE temperatures", r"^(VID|FPGA)_PCB_TEMP_[TB]$", "celsius"),
    ("Bias voltages", r"^(CCD\d_(OD|IG1)_[TB]|COMM_(RD|IG2)_[TB]|FPGA_BIAS_.*)$", "volt"),
    ("ROE supplies", r"^FPGA_.*_V$", "volt"),
    ("RPSU", r"^RPSU_.*$", ""),
]
STATUS_GROUP = "Status flags"


# --------------------------------------------------------------------------- HK grouping
def load_spec(path: Path = SPEC) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def hk_params(spec: dict[str, Any]) -> list[str]:
    """HK parameters of the current ELVIS version in file order (TimeStamp excluded)."""
    return [c for c in spec["hk_columns"][HK_VERSION] if c != "TimeStamp"]


def hk_group_of(param: str, spec: dict[str, Any]) -> str:
    """Eyegore group of an HK parameter: identity-typed (I) keys are status flags."""
    safe = spec[f"hk_limits_{HK_VERSION}"]["S"]
    if param in safe and safe[param][0] == "I":
        return STATUS_GROUP
    for title, pattern, _ in HK_GROUPS:
        if re.match(pattern, param):
            return title
    return "Other"


def hk_unit(param: str, group: str) -> str:
    if group == "RPSU":
        if param.endswith("_I"):
            return "amp"
        if "TEMP" in param:
            return "celsius"
        return "volt"
    return next((u for t, _, u in HK_GROUPS if t == group), "")


# --------------------------------------------------------------------------- panel helpers
def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False, fmt: str = "time_series") -> dict:
    return {
        "refId": ref,
        "datasource": dict(DS),
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
        "format": fmt,
        "editorMode": "code",
    }


def thresholds(steps: list[tuple[str, float | None]]) -> dict:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}


def limit_steps(lim: list) -> list[tuple[str, float | None]]:
    """Grafana threshold steps of a limit: red outside, green inside (value <= lo or >= hi fails)."""
    if lim[0] == "I":
        v = float(lim[1])
        return [("red", None), ("green", v), ("red", v + 1)]
    return [("red", None), ("green", float(lim[1])), ("red", float(lim[2]))]


class Board:
    """Accumulates panels with unique ids and a left-to-right, top-to-bottom layout."""

    def __init__(self, uid: str, title: str, description: str, tags: list[str]):
        self.uid, self.title, self.description, self.tags = uid, title, description, tags
        self.panels: list[dict] = []
        self.variables: list[dict] = []
        self.must_have_data: list[str] = []
        self._id = 0
        self.x = self.y = self.row_h = 0

    def _next_id(self) -> int:
        self._id += 1
        return self._id

    def _place(self, w: int, h: int) -> dict:
        if self.x + w > 24:
            self.x, self.y = 0, self.y + self.row_h
            self.row_h = 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def row(self, title: str) -> None:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        self.panels.append({"id": self._next_id(), "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"x": 0, "y": self.y, "w": 24, "h": 1}, "panels": []})
        self.y += 1

    def add(self, kind: str, title: str, targets: list[dict], *, w: int = 12, h: int = 8, unit: str = "",
            description: str = "", steps: list | None = None, options: dict | None = None,
            custom: dict | None = None, mappings: list | None = None, overrides: list | None = None,
            decimals: int | None = None, data: bool = False, extra_defaults: dict | None = None,
            datasource: dict | None = None) -> dict:
        defaults: dict[str, Any] = {
            "unit": unit or "short",
            "color": {"mode": "palette-classic" if kind in ("timeseries", "barchart") else "thresholds"},
            "thresholds": thresholds(steps or [("green", None)]),
            "mappings": mappings or [],
            "custom": custom or {},
        }
        if decimals is not None:
            defaults["decimals"] = decimals
        defaults.update(extra_defaults or {})
        panel = {
            "id": self._next_id(),
            "type": kind,
            "title": title,
            "description": description,
            "datasource": dict(datasource or DS),
            "gridPos": self._place(w, h),
            "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
            "options": options or {},
        }
        self.panels.append(panel)
        if data:
            self.must_have_data.append(title)
        return panel

    def query_variable(self, name: str, label: str, query: str) -> None:
        self.variables.append({
            "type": "query", "name": name, "label": label, "datasource": dict(DS),
            "definition": query,
            "query": {"query": query, "refId": f"{name}-variable", "qryType": 1},
            "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*", "sort": 1,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [], "hide": 0, "regex": "",
        })

    def custom_variable(self, name: str, label: str, values: list[str], default: str) -> None:
        self.variables.append({
            "type": "custom", "name": name, "label": label, "query": ",".join(values),
            "current": {"selected": True, "text": default, "value": default},
            "options": [{"selected": v == default, "text": v, "value": v} for v in values],
            "multi": False, "includeAll": False, "hide": 0,
        })

    def model(self, refresh: str = "10s", time_from: str = "now-6h") -> dict:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": self.tags,
            "timezone": "utc",
            "editable": False,
            "graphTooltip": 1,
            "refresh": refresh,
            "schemaVersion": SCHEMA_VERSION,
            "version": 1,
            "time": {"from": time_from, "to": "now"},
            "timepicker": {},
            "fiscalYearStartMonth": 0,
            "liveNow": False,
            "annotations": {"list": [{
                "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
                "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
            }]},
            "links": [{"title": "vison boards", "type": "dashboards", "tags": ["vison"], "asDropdown": True,
                       "includeVars": False, "keepTime": True}],
            "templating": {"list": self.variables},
            "panels": self.panels,
        }


STAT_OPTIONS = {
    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
    "colorMode": "background", "graphMode": "none", "justifyMode": "auto",
    "orientation": "auto", "textMode": "value_and_name", "wideLayout": True,
    "showPercentChange": False,
}
OOL_MAPPINGS = [{"type": "value", "options": {"0": {"text": "OK", "color": "green", "index": 0},
                                              "1": {"text": "OUT", "color": "red", "index": 1}}}]
TS_CUSTOM = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 0, "showPoints": "never",
             "spanNulls": False, "axisBorderShow": False}
LEGEND = {"displayMode": "list", "placement": "bottom", "showLegend": True}
TOOLTIP = {"mode": "multi", "sort": "none"}


def ts_options(legend: bool = True) -> dict:
    return {"legend": dict(LEGEND, showLegend=legend), "tooltip": dict(TOOLTIP)}


# --------------------------------------------------------------------------- HK board
def hk_board(spec: dict[str, Any]) -> Board:
    b = Board("vison-hk", "vison / HK", "Housekeeping of the block under test: every ELVIS HK parameter with its "
              "safe (S) limits as threshold bands and performance (P) limits as dashed lines; out-of-limit flags "
              "latched over $latch (replaces the Eyegore HK monitor).", ["vison", "hk"])
    b.query_variable("block", "Block", "label_values(vison_hk_value, block)")
    b.custom_variable("latch", "Latch flags over", ["15m", "1h", "6h", "24h", "7d"], "1h")
    safe = spec[f"hk_limits_{HK_VERSION}"]["S"]
    params = hk_params(spec)
    groups: dict[str, list[str]] = {}
    for p in sorted(params):
        groups.setdefault(hk_group_of(p, spec), []).append(p)

    b.row("Out-of-limit flags (latched over $latch)")
    b.add("stat", "HK sample age", [target(
        'time() - max by (block, roe) (vison_hk_last_sample_timestamp_seconds{block=~"$block"})', "{{block}} ROE{{roe}}")],
        w=12, h=4, unit="s", steps=[("green", None), ("orange", 60), ("red", 300)],
        options=dict(STAT_OPTIONS), description="Seconds since the latest HK row.", data=True)
    b.add("stat", "HK alerts firing", [target(
        'count by (severity) (ALERTS{alertname=~"HKCriticalLimit|HKSafeLimit", alertstate="firing"})', "{{severity}}")],
        w=12, h=4, steps=[("green", None), ("red", 1)], options=dict(STAT_OPTIONS),
        description="Alerts of deploy/prometheus/rules/hk.rules.yml currently firing (latched 10 min); "
                    "no value = none firing.")
    for kind, word in (("S", "Safe (S) limits"), ("P", "Performance (P) limits")):
        b.add("stat", word, [target(
            f'max by (param) (max_over_time(vison_hk_out_of_limits{{kind="{kind}"}}[$latch]))', "{{param}}")],
            w=24, h=9, mappings=OOL_MAPPINGS, steps=[("green", None), ("red", 1)],
            options=dict(STAT_OPTIONS, textMode="name"), data=True,
            description=f"Red = the parameter left its {word.lower()} at least once within $latch "
                        "(ingest's verdict, including limits relative to the commanded bias voltages).")

    for title, _, _ in HK_GROUPS:
        members = groups.get(title, [])
        if not members:
            continue
        b.row(title)
        for p in members:
            lim = safe.get(p)
            unit = hk_unit(p, title)
            desc = f"{p}; safe limits {lim[1]} .. {lim[2]} ({'absolute' if lim[0] == 'A' else lim[0]})" if lim else p
            b.add("timeseries", p, [
                target(f'vison_hk_value{{block=~"$block", param="{p}"}}', "{{block}} ROE{{roe}}", "A"),
                target(f'max by (bound) (vison_hk_limit{{param="{p}", kind="P"}})', "P {{bound}}", "B"),
            ], w=6, h=7, unit=unit, description=desc,
                steps=limit_steps(lim) if lim else None,
                custom=dict(TS_CUSTOM, thresholdsStyle={"mode": "line+area" if lim else "off"}),
                overrides=[{"matcher": {"id": "byFrameRefID", "options": "B"}, "properties": [
                    {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                    {"id": "color", "value": {"mode": "fixed", "fixedColor": "orange"}},
                ]}],
                options=ts_options(), data=title == "CCD temperatures")

    flags = groups.get(STATUS_GROUP, [])
    if flags:
        b.row(STATUS_GROUP)
        zero = [p for p in flags if float(safe[p][1]) == 0]
        other = [p for p in flags if float(safe[p][1]) != 0]
        b.add("stat", "Status flags (expected 0)", [target(
            f'vison_hk_value{{block=~"$block", param=~"{"|".join(zero)}"}}', "{{param}}")],
            w=24 - 6 * len(other), h=9, steps=[("green", None), ("red", 1)], options=dict(STAT_OPTIONS),
            description="ROE / RPSU status and error flags and counters; red = not 0.")
        for p in other:
            b.add("stat", p, [target(f'vison_hk_value{{block=~"$block", param="{p}"}}', "{{block}} ROE{{roe}}")],
                  w=6, h=9, steps=limit_steps(safe[p]), options=dict(STAT_OPTIONS, textMode="value"),
                  description=f"{p}; expected {safe[p][1]:g}.", decimals=0)
        b.add("state-timeline", "Status flags history", [target(
            f'vison_hk_value{{block=~"$block", param=~"{"|".join(flags)}"}}', "{{param}}")],
            w=24, h=10, steps=[("green", None), ("red", 1)],
            options={"showValue": "never", "mergeValues": True, "rowHeight": 0.8, "alignValue": "left",
                     "legend": dict(LEGEND, showLegend=False), "tooltip": dict(TOOLTIP, mode="single")},
            custom={"fillOpacity": 80, "lineWidth": 0},
            overrides=[{"matcher": {"id": "byName", "options": p}, "properties": [
                {"id": "thresholds", "value": thresholds(limit_steps(safe[p]))}]} for p in other],
            description="Flag values over time (red = not the expected value).")
    return b


# --------------------------------------------------------------------------- Exposure QA board
def exposure_board() -> Board:
    b = Board("vison-exposure-qa", "vison / Exposure QA", "Validation of every exposure: offsets and noise per "
              "CCD / quadrant / region, flags, throughput and latency (file complete -> exposure.validated).",
              ["vison", "qa"])
    b.query_variable("block", "Block", "label_values(vison_quadrant_offset_adu, block)")
    b.query_variable("test", "Test", "label_values(vison_exposures_validated_total, test)")
    b.custom_variable("region", "Region", ["pre", "img", "ove"], "pre")
    for metric, word in (("vison_quadrant_offset_adu", "Offset"), ("vison_quadrant_noise_adu", "Noise")):
        b.row(f"{word} per quadrant (region $region)")
        for ccd in CCDS:
            b.add("timeseries", f"{word} {ccd}", [target(
                f'{metric}{{block=~"$block", ccd="{ccd}", region="$region"}}', "{{block}} {{quadrant}}")],
                w=8, h=8, unit="none", decimals=2, custom=dict(TS_CUSTOM, showPoints="always", pointSize=4),
                options=ts_options(), data=True,
                description=f"{word} (ADU) of quadrants E F G H of {ccd} in the {{pre|img|ove}}scan region "
                            "of each validated exposure.")
    b.row("Latest exposure")
    for metric, word in (("vison_quadrant_offset_adu", "Offset"), ("vison_quadrant_noise_adu", "Noise")):
        b.add("stat", f"Latest {word.lower()} (ADU)", [target(
            f'{metric}{{block=~"$block", region="$region"}}', "{{ccd}} {{quadrant}}", instant=True)],
            w=12, h=7, decimals=2, unit="none", options=dict(STAT_OPTIONS, colorMode="none"),
            steps=[("green", None)], data=True)
    b.row("Flags and throughput")
    b.add("timeseries", "Flagged exposures by flag", [target(
        'sum by (flag) (increase(vison_exposure_flag_total{block=~"$block", test=~"$test"}[$__rate_interval]))', "{{flag}}")],
        w=12, h=8, custom=dict(TS_CUSTOM, drawStyle="bars", fillOpacity=80, stacking={"mode": "normal", "group": "A"}),
        options=ts_options(), description="Validated exposures carrying each flag, per interval.")
    b.add("table", "Flags per test (total)", [target(
        'sum by (test, flag) (vison_exposure_flag_total{block=~"$block", test=~"$test"})', "", instant=True, fmt="table")],
        w=12, h=8, options={"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"], "fields": ""}},
        description="Exposures flagged since the validator started, by test and flag.")
    b.add("timeseries", "Exposures validated / 5 min", [target(
        'sum by (test) (increase(vison_exposures_validated_total{block=~"$block", test=~"$test"}[5m]))', "{{test}}")],
        w=12, h=8, custom=dict(TS_CUSTOM, drawStyle="bars", fillOpacity=70, stacking={"mode": "normal", "group": "A"}),
        options=ts_options(), data=True)
    b.add("stat", "Exposures validated (range)", [target(
        'sum by (test) (increase(vison_exposures_validated_total{block=~"$block", test=~"$test"}[$__range]))',
        "{{test}}", instant=True)], w=12, h=8, decimals=0, options=dict(STAT_OPTIONS, colorMode="none"))
    b.row("Validation latency (file complete -> exposure.validated)")
    quant = 'histogram_quantile({q}, sum by (le) (rate(vison_validation_latency_seconds_bucket[$__rate_interval])))'
    b.add("timeseries", "Validation latency", [
        target(quant.format(q=0.5), "median", "A"),
        target(quant.format(q=0.95), "p95", "B"),
    ], w=12, h=8, unit="s", steps=[("green", None), ("red", 2)],
        custom=dict(TS_CUSTOM, thresholdsStyle={"mode": "dashed"}), options=ts_options(), data=True,
        description="Target: median under 2 s (dashed line).")
    b.add("stat", "Median latency (range)", [target(
        'histogram_quantile(0.5, sum by (le) (increase(vison_validation_latency_seconds_bucket[$__range])))', "median",
        instant=True)], w=6, h=8, unit="s", decimals=2, steps=[("green", None), ("orange", 2), ("red", 5)],
        options=dict(STAT_OPTIONS, textMode="value"), data=True)
    b.add("heatmap", "Latency distribution", [target(
        'sum by (le) (increase(vison_validation_latency_seconds_bucket[$__rate_interval]))', "{{le}}", fmt="heatmap")],
        w=6, h=8, unit="s",
        options={"calculate": False, "yAxis": {"unit": "s"}, "cellGap": 1, "color": {"mode": "scheme", "scheme": "Oranges"},
                 "legend": {"show": False}, "tooltip": {"mode": "single", "yHistogram": False}})
    return b


# --------------------------------------------------------------------------- Pipeline board
def pipeline_board() -> Board:
    b = Board("vison-pipeline", "vison / Pipeline", "Health of the vison services and the bus: events per "
              "second, failures, queue depths, dead letters, processing and analysis durations.", ["vison", "pipeline"])
    b.row("Services")
    b.add("stat", "Up", [target(f'up{{job=~"{VISON_JOBS}|rabbitmq"}}', "{{job}} {{instance}}")],
          w=12, h=5, steps=[("red", None), ("green", 1)],
          mappings=[{"type": "value", "options": {"0": {"text": "DOWN", "color": "red", "index": 0},
                                                  "1": {"text": "UP", "color": "green", "index": 1}}}],
          options=dict(STAT_OPTIONS), data=True)
    b.add("stat", "Dead-letter queue", [target(
        'max by (queue) (vison_queue_depth{queue=~".*[.]dead"})', "{{queue}}")],
        w=6, h=5, steps=[("green", None), ("red", 1)], decimals=0, options=dict(STAT_OPTIONS), data=True,
        description="Messages waiting in the dead-letter queue (sampled by the consumers). Not 0: inspect them "
                    "in the RabbitMQ management UI (x-vison-reason header).")
    b.add("stat", "Failed analyses (24 h)", [target(
        'sum(increase(vison_analyses_total{status="failed"}[24h])) or vector(0)', "failed")],
        w=6, h=5, steps=[("green", None), ("red", 1)], decimals=0, options=dict(STAT_OPTIONS, textMode="value"))
    b.row("Events")
    for verb, metric in (("published", "vison_events_published_total"), ("consumed", "vison_events_consumed_total")):
        b.add("timeseries", f"Events {verb} / s by service", [target(
            f'sum by (service) (rate({metric}[$__rate_interval]))', "{{service}}")],
            w=8, h=8, unit="ops", custom=dict(TS_CUSTOM), options=ts_options(), data=True)
    b.add("timeseries", "Failed events / s", [target(
        'sum by (service, kind) (rate(vison_events_failed_total[$__rate_interval]))', "{{service}} {{kind}}")],
        w=8, h=8, unit="ops", custom=dict(TS_CUSTOM), options=ts_options(),
        description="Events a service could not handle (retried, then dead-lettered).")
    b.row("Queues")
    b.add("timeseries", "Queue depth (consumers)", [target(
        'max by (queue) (vison_queue_depth)', "{{queue}}")], w=8, h=8, custom=dict(TS_CUSTOM), options=ts_options(),
        data=True, description="Messages ready per queue, sampled by each queue's consumer.")
    b.add("timeseries", "Queue depth (broker)", [target(
        'sum by (vhost, queue) (rabbitmq_queue_messages)', "{{queue}}")], w=8, h=8, custom=dict(TS_CUSTOM),
        options=ts_options(), description="Ready + unacknowledged messages per queue (rabbitmq_prometheus plugin).")
    b.add("timeseries", "Dead-lettered / 15 min by service", [target(
        'sum by (service) (increase(vison_dead_lettered_total[15m]))', "{{service}}")],
        w=8, h=8, custom=dict(TS_CUSTOM, drawStyle="bars", fillOpacity=80), options=ts_options())
    b.row("Processing")
    b.add("timeseries", "Processing time p95 by service / step", [target(
        'histogram_quantile(0.95, sum by (le, service, step) (rate(vison_processing_seconds_bucket[$__rate_interval])))',
        "{{service}} {{step}}")], w=12, h=8, unit="s", custom=dict(TS_CUSTOM), options=ts_options(), data=True)
    b.add("timeseries", "Files seen / s by kind (ingest)", [target(
        'sum by (kind) (rate(vison_files_seen_total[$__rate_interval]))', "{{kind}}")],
        w=6, h=8, unit="ops", custom=dict(TS_CUSTOM), options=ts_options(), data=True)
    b.add("timeseries", "Exposures / 5 min", [
        target('sum(increase(vison_exposures_ingested_total[5m]))', "ingested", "A"),
        target('sum(increase(vison_exposures_validated_total[5m]))', "validated", "B"),
    ], w=6, h=8, custom=dict(TS_CUSTOM), options=ts_options(), data=True)
    b.row("Analyses")
    aq = 'histogram_quantile({q}, sum by (le, test) (rate(vison_analysis_duration_seconds_bucket[$__rate_interval])))'
    b.add("timeseries", "Analysis duration by test", [
        target(aq.format(q=0.5), "{{test}} median", "A"),
        target(aq.format(q=0.95), "{{test}} p95", "B"),
    ], w=12, h=8, unit="s", custom=dict(TS_CUSTOM, showPoints="always"), options=ts_options())
    b.add("barchart", "Analyses by test and status (range)", [target(
        'sum by (test, status) (increase(vison_analyses_total[$__range]))', "{{test}} {{status}}", instant=True,
        fmt="table")], w=12, h=8,
        options={"orientation": "horizontal", "showValue": "auto", "stacking": "none", "legend": dict(LEGEND),
                 "tooltip": dict(TOOLTIP, mode="single"), "xTickLabelRotation": 0, "barWidth": 0.8, "groupWidth": 0.7},
        overrides=[{"matcher": {"id": "byRegexp", "options": ".*failed.*"},
                    "properties": [{"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}}]}])
    b.add("timeseries", "Analyzer test runs by state", [target(
        'sum by (state) (vison_analyzer_runs)', "{{state}}")], w=8, h=8, custom=dict(TS_CUSTOM), options=ts_options(),
        description="Test runs per state in the analyzer's coordinator: collecting, extracting, waiting (for a "
                    "calibration), queued, solving, completed, failed (vison analyzer status lists them).")
    b.add("table", "Solves waiting for a calibration", [target(
        'max by (block, test, need) (vison_analyzer_waiting_needs) == 1', "{{block}} {{test}} {{need}}", instant=True,
        fmt="table")], w=8, h=8,
        description="Test runs whose solve waits for a declared calibration (e.g. DARK01 for BIAS01's master bias).")
    eq = 'histogram_quantile(0.95, sum by (le, family) (rate(vison_{stage}_seconds_bucket[$__rate_interval])))'
    b.add("timeseries", "Extraction and solve time p95 by family", [
        target(eq.format(stage="extraction"), "{{family}} extraction", "A"),
        target(eq.format(stage="solve"), "{{family}} solve", "B"),
    ], w=8, h=8, unit="s", custom=dict(TS_CUSTOM), options=ts_options())
    return b


# --------------------------------------------------------------------------- SQL boards (results catalogue)
#: The catalogue on PostgreSQL (services/catalogue/models.py tables), provisioned in datasources/vison.yml.
SQL_DATASOURCE_UID = "vison-catalogue"
SQL_DS = {"type": "grafana-postgresql-datasource", "uid": SQL_DATASOURCE_UID}
SQL_DIR = "catalogue"  # sub-folder of dashboards/ holding the boards on the SQL data source
#: Quadrant columns of the 12 x 12 FPA grid, left to right (2 per CCD column).
FPA_COLUMNS = [f"C{c} {side}" for c in range(1, 7) for side in ("L", "R")]
#: (title, metatest family, quantity, unit, decimals) of the FPA maps
FPA_MAPS = [("Gain", "ptc", "gain", "e-/ADU", 3), ("Read noise (image area)", "bias", "ron_img_e", "e-", 2),
            ("Dark current", "dark", "dark_current_e_s", "e-/s", 4), ("PRNU", "flat", "prnu_pct", "%", 2)]
TABLE_OPTIONS = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False, "reducer": ["sum"], "fields": ""}}


def sql_target(sql: str, ref: str = "A", fmt: str = "table") -> dict:
    """A raw-SQL query (Grafana macros ``$__timeFilter(col)``; variables ``$block`` single value,
    ``($test)`` multi-value: a quoted, comma-separated list)."""
    return {"refId": ref, "datasource": dict(SQL_DS), "rawSql": " ".join(sql.split()), "format": fmt,
            "rawQuery": True, "editorMode": "code"}


def sql_variable(b: Board, name: str, label: str, sql: str, multi: bool = False) -> None:
    b.variables.append({
        "type": "query", "name": name, "label": label, "datasource": dict(SQL_DS),
        "definition": " ".join(sql.split()), "query": " ".join(sql.split()),
        "refresh": 2, "multi": multi, "includeAll": multi, "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]} if multi else {},
        "options": [], "hide": 0, "regex": "",
    })


VERDICT_MAPPINGS = [{"type": "value", "options": {"PASS": {"text": "PASS", "color": "green", "index": 0},
                                                  "FAIL": {"text": "FAIL", "color": "red", "index": 1}}}]
FLAG_MAPPINGS = [
    {"type": "value", "options": {"": {"text": "-", "color": "green", "index": 0}}},
    {"type": "regex", "options": {"pattern": ".*(BADDATA|SUBTASKCRASH|MISSDATA).*", "result": {"color": "red", "index": 1}}},
    {"type": "regex", "options": {"pattern": ".+", "result": {"color": "orange", "index": 2}}},
]


def exposure_log_board() -> Board:
    b = Board("vison-exposure-log", "vison / Exposure log", "The latest exposures of a block from the results "
              "catalogue (replaces Eyegore's live exposure-log window): ObsID, time, test, prescan offsets per CCD, "
              "verdict and flags; exposures per verdict per test.", ["vison", "catalogue", "exposures"])
    sql_variable(b, "block", "Block", "SELECT DISTINCT block FROM exposures ORDER BY 1")
    sql_variable(b, "test", "Test", "SELECT DISTINCT test FROM exposures WHERE block = '$block' ORDER BY 1", multi=True)
    where = "block = '$block' AND test IN ($test) AND $__timeFilter(obs_time)"
    b.add("stat", "Exposures by verdict", [sql_target(
        f"SELECT verdict AS metric, COUNT(*) AS value FROM exposures WHERE {where} GROUP BY verdict ORDER BY verdict")],
        w=8, h=6, datasource=SQL_DS, decimals=0, mappings=VERDICT_MAPPINGS,
        options=dict(STAT_OPTIONS, reduceOptions={"calcs": ["lastNotNull"], "fields": "", "values": True}),
        overrides=[{"matcher": {"id": "byName", "options": "value"}, "properties": [
            {"id": "color", "value": {"mode": "fixed", "fixedColor": "blue"}}]}],
        description="Validated exposures in the time range, PASS and FAIL.")
    b.add("barchart", "Exposures per verdict per test", [sql_target(
        f"SELECT test AS \"test\", SUM(CASE WHEN passed THEN 1 ELSE 0 END) AS \"PASS\", "
        f"SUM(CASE WHEN passed THEN 0 ELSE 1 END) AS \"FAIL\" FROM exposures WHERE {where} GROUP BY test ORDER BY test")],
        w=16, h=6, datasource=SQL_DS,
        options={"orientation": "horizontal", "showValue": "auto", "stacking": "normal", "legend": dict(LEGEND),
                 "tooltip": dict(TOOLTIP, mode="multi"), "xTickLabelRotation": 0, "barWidth": 0.8,
                 "groupWidth": 0.7, "xField": "test"},
        overrides=[{"matcher": {"id": "byName", "options": name}, "properties": [
            {"id": "color", "value": {"mode": "fixed", "fixedColor": color}}]} for name, color in
            (("PASS", "green"), ("FAIL", "red"))])
    b.add("table", "Latest exposures", [sql_target(
        f"SELECT obs_time AS \"time\", obsid AS \"ObsID\", test AS \"test\", "
        f"offset_ccd1 AS \"CCD1 offset\", offset_ccd2 AS \"CCD2 offset\", offset_ccd3 AS \"CCD3 offset\", "
        f"verdict AS \"verdict\", flag_names AS \"flags\" FROM exposures WHERE {where} "
        f"ORDER BY obs_time DESC, obsid DESC LIMIT 500")],
        w=24, h=14, datasource=SQL_DS, decimals=1, options=dict(TABLE_OPTIONS, sortBy=[]),
        description="Newest first. Offsets: mean prescan offset (ADU) of the 4 quadrants of each CCD.",
        overrides=[
            {"matcher": {"id": "byName", "options": "verdict"}, "properties": [
                {"id": "mappings", "value": VERDICT_MAPPINGS},
                {"id": "custom.cellOptions", "value": {"type": "color-background", "mode": "basic"}}]},
            {"matcher": {"id": "byName", "options": "flags"}, "properties": [
                {"id": "mappings", "value": FLAG_MAPPINGS},
                {"id": "custom.cellOptions", "value": {"type": "color-text"}}]},
            {"matcher": {"id": "byName", "options": "ObsID"}, "properties": [{"id": "decimals", "value": 0}]},
            {"matcher": {"id": "byName", "options": "time"}, "properties": [
                {"id": "unit", "value": "dateTimeAsIso"}]},
        ])
    b.add("timeseries", "Prescan offset per CCD", [sql_target(
        f"SELECT obs_time AS \"time\", offset_ccd1 AS \"CCD1\", offset_ccd2 AS \"CCD2\", offset_ccd3 AS \"CCD3\" "
        f"FROM exposures WHERE {where} ORDER BY obs_time", fmt="time_series")],
        w=24, h=8, datasource=SQL_DS, unit="none", decimals=1,
        custom=dict(TS_CUSTOM, showPoints="always", pointSize=4), options=ts_options(),
        description="Mean prescan offset (ADU) of each CCD per exposure.")
    return b


def results_board() -> Board:
    b = Board("vison-results", "vison / Results", "Analysis results from the catalogue: per test and quantity, "
              "the per-quadrant values of a block's latest analysis and the quantity's history across tests.",
              ["vison", "catalogue", "results"])
    sql_variable(b, "block", "Block", "SELECT DISTINCT block FROM results ORDER BY 1")
    sql_variable(b, "test", "Test", "SELECT DISTINCT test FROM results WHERE block = '$block' ORDER BY 1")
    sql_variable(b, "quantity", "Quantity", "SELECT DISTINCT quantity FROM results WHERE block = '$block' "
                 "AND test = '$test' ORDER BY 1")
    latest = ("event_id = (SELECT event_id FROM analyses WHERE block = '$block' AND test = '$test' "
              "AND status = 'completed' ORDER BY produced_at DESC LIMIT 1)")
    b.add("table", "$quantity per quadrant ($test, latest analysis)", [sql_target(
        "SELECT ccd AS \"CCD\", " + ", ".join(f"MAX(CASE WHEN quadrant = '{q}' THEN value END) AS \"{q}\""
                                             for q in "EFGH") +
        f", MAX(unit) AS \"unit\" FROM results WHERE {latest} AND quantity = '$quantity' GROUP BY ccd ORDER BY ccd")],
        w=10, h=7, datasource=SQL_DS, decimals=4, options=dict(TABLE_OPTIONS),
        custom={"cellOptions": {"type": "color-background", "mode": "gradient"}},
        steps=[("blue", None)], extra_defaults={"color": {"mode": "continuous-BlYlRd"}},
        overrides=[{"matcher": {"id": "byName", "options": name}, "properties": [
            {"id": "custom.cellOptions", "value": {"type": "auto"}}]} for name in ("CCD", "unit")],
        description="One row per CCD, one column per quadrant (E F G H).")
    b.add("table", "$quantity values ($test, latest analysis)", [sql_target(
        "SELECT ccd AS \"CCD\", quadrant AS \"Q\", value AS \"value\", error AS \"error\", unit AS \"unit\", "
        "repeat AS \"repeat\", software_version AS \"version\", produced_at AS \"produced\" "
        f"FROM results WHERE {latest} AND quantity = '$quantity' ORDER BY ccd, quadrant")],
        w=14, h=7, datasource=SQL_DS, decimals=4, options=dict(TABLE_OPTIONS),
        overrides=[{"matcher": {"id": "byName", "options": "produced"}, "properties": [
            {"id": "unit", "value": "dateTimeAsIso"}]}, {"matcher": {"id": "byName", "options": "repeat"},
                                                         "properties": [{"id": "decimals", "value": 0}]}])
    b.add("timeseries", "History of $quantity (every test)", [sql_target(
        "SELECT produced_at AS \"time\", ccd || '.' || quadrant AS metric, value FROM results "
        "WHERE block = '$block' AND quantity = '$quantity' AND ccd <> '' AND value IS NOT NULL "
        "AND $__timeFilter(produced_at) ORDER BY 1, 2", fmt="time_series")],
        w=24, h=9, datasource=SQL_DS, decimals=4, custom=dict(TS_CUSTOM, showPoints="always", pointSize=5),
        options=ts_options(), description="Each quadrant's value at each analysis (any test giving the quantity).")
    b.add("table", "Analyses of $quantity", [sql_target(
        "SELECT MAX(produced_at) AS \"produced\", test AS \"test\", repeat AS \"repeat\", "
        "software_version AS \"version\", AVG(value) AS \"mean\", MIN(value) AS \"min\", MAX(value) AS \"max\", "
        "COUNT(value) AS \"quadrants\" FROM results WHERE block = '$block' AND quantity = '$quantity' "
        "AND $__timeFilter(produced_at) GROUP BY event_id, test, repeat, software_version ORDER BY 1 DESC")],
        w=24, h=8, datasource=SQL_DS, decimals=4, options=dict(TABLE_OPTIONS),
        overrides=[{"matcher": {"id": "byName", "options": "produced"}, "properties": [
            {"id": "unit", "value": "dateTimeAsIso"}]}] + [
            {"matcher": {"id": "byName", "options": n}, "properties": [{"id": "decimals", "value": 0}]}
            for n in ("repeat", "quadrants")])
    return b


def fpa_grid_sql(family: str, quantity: str) -> str:
    """12 rows (slice 6 top .. slice 1 bottom, 2 quadrant rows each) x 12 quadrant columns of one
    family's map (a quantity may be in several families: a00 in ptc and bf)."""
    cols = ", ".join(f"MAX(CASE WHEN v.x = {i} THEN v.value END) AS \"{name}\"" for i, name in enumerate(FPA_COLUMNS))
    return (f"SELECT 'S' || (g.y / 2 + 1) || CASE WHEN g.y % 2 = 1 THEN ' top' ELSE ' bottom' END AS \"row\", {cols} "
            f"FROM generate_series(0, 11) AS g(y) LEFT JOIN fpa_values v ON v.y = g.y AND v.family = '{family}' "
            f"AND v.quantity = '{quantity}' "
            f"GROUP BY g.y ORDER BY g.y DESC")


def fpa_board() -> Board:
    b = Board("vison-fpa", "vison / FPA", "The focal plane from the metatest aggregates: 12 x 12 quadrant maps of "
              "gain, read noise (e-), dark current and PRNU (slice 6 at the top, CCD columns 1-6 with 2 quadrants "
              "each; columns 4-6 rotated), blank where a block is missing; which blocks each family holds.",
              ["vison", "catalogue", "fpa"])
    b.add("table", "Blocks in", [sql_target(
        "SELECT b.family AS \"family\", COUNT(*) FILTER (WHERE b.present) AS \"blocks in\", "
        "COALESCE(STRING_AGG(b.block, ' ' ORDER BY b.slice, b.block) FILTER (WHERE b.present), '') AS \"in\", "
        "COALESCE(STRING_AGG(b.block, ' ' ORDER BY b.slice, b.block) FILTER (WHERE NOT b.present), '') AS \"missing\", "
        "MAX(f.produced_at) AS \"updated\" FROM fpa_blocks b JOIN fpa_families f ON f.family = b.family "
        "GROUP BY b.family ORDER BY b.family")],
        w=24, h=6, datasource=SQL_DS, decimals=0, options=dict(TABLE_OPTIONS),
        steps=[("red", None), ("orange", 1), ("green", 12)],
        overrides=[{"matcher": {"id": "byName", "options": "blocks in"}, "properties": [
            {"id": "custom.cellOptions", "value": {"type": "color-background", "mode": "basic"}}]},
            {"matcher": {"id": "byName", "options": "updated"}, "properties": [
                {"id": "unit", "value": "dateTimeAsIso"}]}])
    for title, family, quantity, unit, decimals in FPA_MAPS:
        b.add("table", f"{title} ({unit})", [sql_target(fpa_grid_sql(family, quantity))], w=12, h=11,
              datasource=SQL_DS, decimals=decimals, options=dict(TABLE_OPTIONS, showHeader=True),
              custom={"cellOptions": {"type": "color-background", "mode": "gradient"}, "align": "center"},
              extra_defaults={"color": {"mode": "continuous-BlYlRd"}, "noValue": ""},
              overrides=[{"matcher": {"id": "byName", "options": "row"}, "properties": [
                  {"id": "custom.cellOptions", "value": {"type": "auto"}}, {"id": "custom.width", "value": 80}]}],
              description=f"{quantity} per quadrant on the FPA layout (metatest family {family}); blank = no value.")
    return b


def build_sql_boards() -> dict[str, Board]:
    """The boards on the catalogue (file names relative to dashboards/)."""
    return {f"{SQL_DIR}/vison-exposure-log.json": exposure_log_board(), f"{SQL_DIR}/vison-results.json": results_board(),
            f"{SQL_DIR}/vison-fpa.json": fpa_board()}


def build_sql_dashboards() -> dict[str, dict]:
    """File name (under dashboards/) -> JSON model of every board on the SQL catalogue."""
    return {name: board.model(refresh="30s", time_from="now-7d") for name, board in build_sql_boards().items()}


# --------------------------------------------------------------------------- output
def build_boards(spec: dict[str, Any] | None = None) -> dict[str, Board]:
    spec = spec or load_spec()
    return {"vison-hk.json": hk_board(spec), "vison-exposure-qa.json": exposure_board(),
            "vison-pipeline.json": pipeline_board()}


def build_dashboards(spec: dict[str, Any] | None = None) -> dict[str, dict]:
    """File name -> dashboard JSON model."""
    return {name: board.model() for name, board in build_boards(spec).items()}


def must_have_data(spec: dict[str, Any] | None = None) -> dict[str, list[str]]:
    """Dashboard uid -> titles of the panels a running simulated stack must fill."""
    return {board.uid: list(board.must_have_data) for board in build_boards(spec).values()}


def render(model: dict) -> str:
    return json.dumps(model, indent=2, sort_keys=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--check", action="store_true", help="compare with the committed files, do not write")
    args = parser.parse_args(argv)
    stale = []
    for name, model in {**build_dashboards(), **build_sql_dashboards()}.items():
        path = args.out / name
        text = render(model)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path} ({len(model['panels'])} panels)")
    if stale:
        print("out of date (run python deploy/grafana/generate.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
