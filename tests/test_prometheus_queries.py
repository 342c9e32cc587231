"""Every Grafana panel query and every alert expression against a real Prometheus (Debian's
``prometheus`` binary, started by the test on a free port with its own config and storage).

1. Synthetic exporter: an HTTP /metrics endpoint in this process with the contract metrics
   (names and label names taken from shared/metrics.py, so a renamed metric or label fails
   here), scraped every second with the committed alert rules loaded. Every query must be
   valid PromQL; the panels listed by deploy/grafana/generate.py ``must_have_data`` must return
   series; an HK value pushed out of its safe limits must make its alert pending.
2. Live stack (integration): ``vison stack up`` + a short ``vison sim`` on a temporary folder,
   Prometheus scraping 127.0.0.1:9101..9105, then the same panel checks on real service metrics.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from shared.refdata import elvis_formats

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = shutil.which("prometheus")
pytestmark = [
    pytest.mark.prometheus,
    pytest.mark.skipif(PROMETHEUS is None,
                       reason="prometheus not installed (Debian package prometheus: make system-deps, as root)"),
]

#: Grafana variables -> values for running a panel query directly against Prometheus.
GRAFANA_VARS = [("$__rate_interval", "1m"), ("$__interval", "15s"), ("$__range", "1h"), ("$block", ".*"),
                ("$test", ".*"), ("$latch", "1h"), ("$region", "pre")]
SERVICE_PORTS = {"ingest": 9101, "validator": 9102, "analyzer": 9103, "metatest": 9104, "scriptgen": 9105}


def substitute(expr: str) -> str:
    for var, value in GRAFANA_VARS:
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr}"
    return expr


def _generator():
    spec = importlib.util.spec_from_file_location("vison_grafana_generate_q", REPO / "deploy" / "grafana" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expr) of every panel target and query variable."""
    out = []
    for model in _generator().build_dashboards().values():
        stack = list(model["panels"])
        while stack:
            p = stack.pop(0)
            stack.extend(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((model["uid"], p["title"], t["expr"]))
    return out


def alert_expressions() -> list[tuple[str, str]]:
    out = []
    for path in sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.rules.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                out.append((rule.get("alert") or rule.get("record"), rule["expr"]))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    """A throw-away Prometheus: temp config + storage, free port, 1 s scrape/evaluation."""

    def __init__(self, workdir: Path, jobs: dict[str, list[str]], rule_files: list[Path] = ()):
        self.dir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": targets}]} for job, targets in jobs.items()],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> "PrometheusServer":
        log = open(self.dir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("prometheus exited: " + (self.dir / "prometheus.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("prometheus not ready in time")

    def query(self, expr: str) -> dict:
        data = urllib.parse.urlencode({"query": expr}).encode()
        try:
            with urllib.request.urlopen(self.url + "/api/v1/query", data=data, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:  # 400 for a PromQL syntax error
            return json.loads(exc.read())

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- synthetic exporter
class SyntheticExporter:
    """The contract metrics (cloned from shared/metrics.py into a private registry) with plausible
    values, updated by a thread so that rate() / increase() have something to work on."""

    def __init__(self, out_of_limits: dict[str, float] | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        import shared.metrics as m

        self.registry = CollectorRegistry()
        self.m = {}
        for name in m.__all__:
            obj = getattr(m, name)
            kind = type(obj)
            if kind not in (Counter, Gauge, Histogram):
                continue
            kwargs = {"labelnames": obj._labelnames, "registry": self.registry}
            if kind is Histogram:
                kwargs["buckets"] = obj._upper_bounds
            metric_name = obj._name.removesuffix("_total") if kind is Counter else obj._name
            self.m[name] = kind(metric_name, obj._documentation, **kwargs)
        self.out_of_limits = out_of_limits or {}
        self._stop = threading.Event()
        self.server = None

    def _static(self) -> None:
        spec = elvis_formats()
        safe, perf = spec["hk_limits_7.5.X"]["S"], spec["hk_limits_7.5.X"]["P"]
        m = self.m
        for param in [c for c in spec["hk_columns"]["7.5.X"] if c != "TimeStamp"]:
            lim = safe[param]
            value = lim[1] if lim[0] == "I" else (lim[1] + lim[2]) / 2
            value = self.out_of_limits.get(param, value)
            m["HK_VALUE"].labels(block="BORN", roe="1", param=param).set(value)
            for kind in ("S", "P"):
                m["HK_OUT_OF_LIMITS"].labels(param=param, kind=kind).set(1 if param in self.out_of_limits else 0)
            p = perf.get(param)
            if p and p[0] != "I":
                m["HK_LIMIT"].labels(param=param, kind="P", bound="lo").set(p[1])
                m["HK_LIMIT"].labels(param=param, kind="P", bound="hi").set(p[2])
        m["HK_LAST_SAMPLE"].labels(block="BORN", roe="1").set(time.time())
        for ccd in ("CCD1", "CCD2", "CCD3"):
            for q in "EFGH":
                for region in ("pre", "img", "ove"):
                    m["QUADRANT_OFFSET"].labels(block="BORN", ccd=ccd, quadrant=q, region=region).set(1000 + ord(q))
                    m["QUADRANT_NOISE"].labels(block="BORN", ccd=ccd, quadrant=q, region=region).set(1.4)
        for service in ("ingest", "validator", "analyzer"):
            m["SERVICE_INFO"].labels(service=service, version="0.1.0").set(1)
        for queue in ("vison.validator", "vison.analyzer", "vison.dead"):
            m["QUEUE_DEPTH"].labels(queue=queue).set(0)

    def _tick(self) -> None:
        m = self.m
        m["EVENTS_PUBLISHED"].labels(service="ingest", kind="exposure.ingested").inc()
        m["EVENTS_PUBLISHED"].labels(service="validator", kind="exposure.validated").inc()
        m["EVENTS_CONSUMED"].labels(service="validator", kind="exposure.ingested").inc()
        m["EVENTS_CONSUMED"].labels(service="analyzer", kind="exposure.validated").inc()
        m["EVENTS_FAILED"].labels(service="validator", kind="exposure.ingested").inc(0)
        m["DEAD_LETTERED"].labels(service="validator").inc(0)
        m["PROCESSING_SECONDS"].labels(service="validator", step="frames").observe(0.4)
        m["FILES_SEEN"].labels(kind="fits").inc(3)
        m["FILES_SEEN"].labels(kind="hk").inc()
        m["EXPOSURES_INGESTED"].labels(block="BORN", test="BIAS01").inc()
        m["EXPOSURES_VALIDATED"].labels(block="BORN", test="BIAS01").inc()
        m["EXPOSURE_FLAG"].labels(block="BORN", test="BIAS01", flag="POORQUALDATA").inc()
        m["VALIDATION_LATENCY"].observe(0.8)
        m["ANALYSIS_DURATION"].labels(test="BIAS01").observe(12)
        m["ANALYSES"].labels(test="BIAS01", status="completed").inc()
        m["ANALYSES"].labels(test="PTC01", status="failed").inc(0)
        m["HK_LAST_SAMPLE"].labels(block="BORN", roe="1").set(time.time())

    def start(self) -> "SyntheticExporter":
        from prometheus_client import start_http_server

        self._static()
        self._tick()
        server, _ = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        self.server = server
        self.port = server.server_port

        def loop():
            while not self._stop.wait(0.3):
                self._tick()

        threading.Thread(target=loop, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.server:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture(scope="module")
def synthetic_prometheus(tmp_path_factory):
    exporter = SyntheticExporter(out_of_limits={"RPSU_VCCD_V": 30.0, "CCD2_TEMP_B": 40.0}).start()
    workdir = tmp_path_factory.mktemp("prometheus")
    rules = sorted((REPO / "deploy" / "prometheus" / "rules").glob("*.rules.yml"))
    prom = PrometheusServer(workdir, {"ingest": [f"127.0.0.1:{exporter.port}"]}, rules).start()
    try:
        yield prom
    finally:
        prom.stop()
        exporter.stop()


def _wait_for(prom: PrometheusServer, exprs: list[str], timeout: float = 30) -> dict[str, int]:
    """Series count per expr once all are non-empty (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = {}
        for e in exprs:
            res = prom.query(e)
            assert res["status"] == "success", (e, res)
            counts[e] = len(res["data"]["result"])
        if all(counts.values()) or time.monotonic() > deadline:
            return counts
        time.sleep(0.5)


def test_every_panel_query_is_valid_promql(synthetic_prometheus):
    queries = panel_queries()
    assert len(queries) > 150
    bad = []
    for uid, title, expr in queries:
        res = synthetic_prometheus.query(substitute(expr))
        if res.get("status") != "success":
            bad.append((uid, title, expr, res.get("error")))
    assert not bad, bad


def test_every_alert_expression_is_valid_promql(synthetic_prometheus):
    exprs = alert_expressions()
    assert len(exprs) == 100  # 92 HK rules generated from elvis-formats.json + 8 pipeline rules (incl. VisonServiceBlocked)
    bad = [(name, e, r.get("error")) for name, e in exprs if (r := synthetic_prometheus.query(e)).get("status") != "success"]
    assert not bad, bad


def test_a_broken_query_is_reported(synthetic_prometheus):
    res = synthetic_prometheus.query('sum by (le (rate(vison_validation_latency_seconds_bucket[1m]))')
    assert res["status"] == "error" and res["errorType"] == "bad_data"


def test_panels_that_must_show_data_return_series(synthetic_prometheus):
    wanted = _generator().must_have_data()
    queries = [(uid, title, substitute(expr)) for uid, title, expr in panel_queries() if title in wanted.get(uid, [])]
    assert len({(u, t) for u, t, _ in queries}) == sum(len(v) for v in wanted.values())
    counts = _wait_for(synthetic_prometheus, [e for _, _, e in queries])
    empty = [(u, t, e) for u, t, e in queries if not counts[e]]
    assert not empty, empty
    # values, not just series: the HK temperature panel shows the exported value
    res = synthetic_prometheus.query('vison_hk_value{block=~".*", param="CCD1_TEMP_T"}')["data"]["result"]
    assert [float(r["value"][1]) for r in res] == [(-133.0 + 35.0) / 2]
    res = synthetic_prometheus.query('max by (param) (max_over_time(vison_hk_out_of_limits{kind="S"}[1h]))')
    flagged = {r["metric"]["param"] for r in res["data"]["result"] if r["value"][1] == "1"}
    assert flagged == {"RPSU_VCCD_V", "CCD2_TEMP_B"}


def test_alert_rules_evaluate_on_scraped_hk(synthetic_prometheus):
    """Out-of-limit HK values from the exporter make their rules pending (for: 1m) with the
    severity of the spec: RPSU_VCCD_V (not critical) warning, CCD2_TEMP_B above 35 C page."""
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(synthetic_prometheus.url + "/api/v1/alerts", timeout=10) as r:
            alerts = json.loads(r.read())["data"]["alerts"]
        hk = [a for a in alerts if a["labels"]["alertname"] in ("HKSafeLimit", "HKCriticalLimit")]
        if len(hk) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    got = {(a["labels"]["hk_key"], a["labels"]["severity"], a["labels"].get("side", ""), a["labels"]["block"]) for a in hk}
    assert got == {("RPSU_VCCD_V", "warning", "", "BORN"), ("CCD2_TEMP_B", "page", "above", "BORN")}
    assert all(a["state"] == "pending" for a in hk)
    crit = next(a for a in hk if a["labels"]["hk_key"] == "CCD2_TEMP_B")
    assert crit["annotations"]["summary"] == "CCD2_TEMP_B at or above its safe upper limit 35 (block BORN ROE 1)"


# --------------------------------------------------------------------------- live stack
def _stack_available() -> str | None:
    if importlib.util.find_spec("services.tools.stack") is None:
        return "services/tools/stack.py (vison stack up) is not in the repository yet"
    if importlib.util.find_spec("services.sim.cli") is None:
        return "services/sim/cli.py (vison sim) is not in the repository yet"
    return None


@pytest.mark.broker
@pytest.mark.skipif(_stack_available() is not None, reason=str(_stack_available()))
def test_live_stack_fills_the_panels(tmp_path, amqp_url):
    """A real Prometheus scraping a running simulated stack: the panels that must show data
    (HK, exposure QA, pipeline) return series from the services' own metrics."""
    data = tmp_path / "data"
    data.mkdir()
    env = dict(os.environ)
    env.update({
        "VISON_AMQP_URL": amqp_url,
        "VISON_EXCHANGE": f"vison-{uuid.uuid4().hex[:8]}",
        "VISON_DATA_ROOT": str(data),
        "VISON_PRODUCTS_ROOT": str(tmp_path / "products"),
        "VISON_STATE_DIR": str(tmp_path / "state"),
        "VISON_BLOCK": "BORN",
    })
    vison = [sys.executable, "-m", "services.cli"]
    busy = [p for p in SERVICE_PORTS.values() if _port_open(p)]
    if busy:
        pytest.skip(f"metrics ports {busy} already in use (another stack is running)")
    log = open(tmp_path / "stack.log", "w")
    stack = subprocess.Popen([*vison, "stack", "up", "--data", str(data)], env=env, cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    prom = None
    try:
        deadline = time.monotonic() + 60
        while not all(_port_open(SERVICE_PORTS[s]) for s in ("ingest", "validator")):
            assert stack.poll() is None, (tmp_path / "stack.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "stack services did not open their metrics ports"
            time.sleep(0.5)
        jobs = {s: [f"127.0.0.1:{p}"] for s, p in SERVICE_PORTS.items()}
        workdir = tmp_path / "prom"
        workdir.mkdir()
        prom = PrometheusServer(workdir, jobs).start()
        sim = subprocess.run([*vison, "sim", "--out", str(data), "--block", "BORN", "--seed", "7", "--test", "BIAS01",
                              "--frames", "3", "--realtime", "--speedup", "50", "--atomic", "--hk-period", "1"],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert sim.returncode == 0, sim.stderr[-3000:]
        wanted = _generator().must_have_data()
        # services the stack runs today (metatest/scriptgen/analyzer may not be there yet)
        running = {s for s, p in SERVICE_PORTS.items() if _port_open(p)}
        queries = [(u, t, substitute(e)) for u, t, e in panel_queries() if t in wanted.get(u, [])
                   and not (t.startswith("Analysis") and "analyzer" not in running)]
        assert len(queries) >= 25
        counts = _wait_for(prom, [e for _, _, e in queries], timeout=90)
        empty = [(u, t, e) for u, t, e in queries if not counts[e]]
        assert not empty, empty
        res = prom.query('vison_hk_value{param="CCD1_TEMP_T"}')["data"]["result"]
        assert res and all(-133 < float(r["value"][1]) < 35 for r in res)
        res = prom.query('up{job=~"ingest|validator"}')["data"]["result"]
        assert {r["metric"]["job"] for r in res if r["value"][1] == "1"} == {"ingest", "validator"}
        res = prom.query('vison_quadrant_offset_adu{ccd="CCD1", region="pre"}')["data"]["result"]
        assert {r["metric"]["quadrant"] for r in res} == set("EFGH")
        assert all(500 < float(r["value"][1]) < 10000 for r in res)
    finally:
        if prom:
            prom.stop()
        if stack.poll() is None:
            os.killpg(stack.pid, signal.SIGINT)
            try:
                stack.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(stack.pid, signal.SIGKILL)
                stack.wait()


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
