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
VISON_JOBS = "ingest|validator|analyzer|metatest|scriptgen"
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
            decimals: int | None = None, data: bool = False, extra_defaults: dict | None = None) -> dict:
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
            "datasource": dict(DS),
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
    return b


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
    for name, model in build_dashboards().items():
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
