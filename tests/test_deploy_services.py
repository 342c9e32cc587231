"""deploy/: the service image (Dockerfile), the broker definitions and set-up job, and the
Alertmanager configuration rendered from the environment (checked with amtool)."""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import subprocess
import threading
import time
import tomllib
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
AMTOOL = shutil.which("amtool")


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------- Dockerfile
def test_dockerfile_pins_python_311_and_runs_as_non_root():
    text = (DEPLOY / "Dockerfile").read_text()
    base = next(line for line in text.splitlines() if line.startswith("ARG PYTHON_IMAGE="))
    tag = base.split("=", 1)[1]
    assert tag.startswith("python:3.11.") and tag.split(":")[1].count(".") == 2, tag
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert "useradd --uid" in text


def test_dockerfile_copies_everything_the_package_build_needs():
    text = (DEPLOY / "Dockerfile").read_text()
    copied = set()
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            copied.update(p.rstrip("/").removeprefix("./") for p in line.split()[1:-1])
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "pyproject.toml" in copied and project["project"]["readme"] in copied
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("**") + 1:][:4] == ["!pyproject.toml", "!README.md", "!shared/**", "!services/**"]


# ----------------------------------------------------------------- broker definitions
def _definitions() -> dict:
    return json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text())


def test_definitions_match_the_bus_topology():
    from shared.bus import DELIVERY_LIMIT_MARGIN
    from shared.config import Settings

    s = Settings(_env_file=None)
    d = _definitions()
    ex = {e["name"]: e for e in d["exchanges"]}
    assert ex["vison"]["type"] == "topic" and ex["vison"]["durable"]
    assert ex["vison.dlx"]["type"] == "fanout"
    queues = {q["name"]: q for q in d["queues"]}
    assert queues["vison.dead"]["arguments"] == {} and queues["vison.dead"]["durable"]
    for name in ("validator", "analyzer", "analyzer.jobs", "analyzer.done", "metatest", "catalogue", "scriptgen"):
        assert queues[f"vison.{name}"]["arguments"] == {
            "x-queue-type": "quorum", "x-dead-letter-exchange": "vison.dlx",
            "x-delivery-limit": s.max_redeliveries + DELIVERY_LIMIT_MARGIN}
    assert "vison.ingest" not in queues  # ingest publishes only
    assert {"source": "vison.dlx", "vhost": "/", "destination": "vison.dead", "destination_type": "queue",
            "routing_key": "", "arguments": {}} in d["bindings"]
    # the service bindings themselves: tests/test_topology.py::test_definitions_json_follows_the_table
    (policy,) = d["policies"]
    assert policy["definition"] == {"dead-letter-exchange": "vison.dlx"} and policy["apply-to"] == "queues"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    assert "VISON_MAX_REDELIVERIES" not in compose["validator"]["environment"]  # would change x-delivery-limit


@pytest.mark.broker
def test_definitions_import_into_rabbitmq_and_agree_with_the_bus(amqp_url):
    """Import the definitions into this test's vhost with rabbitmqctl, then let shared/bus.py
    declare its queues on top (a PRECONDITION_FAILED would mean they disagree) and dead-letter."""
    import pika

    from conftest import broker_controllable
    from shared.bus import ensure_queue
    from shared.config import Settings

    if not broker_controllable():
        pytest.skip("rabbitmqctl cannot manage the local broker: definitions import not testable here")
    vhost = amqp_url.rsplit("/", 1)[1]
    from urllib.parse import unquote

    vhost = unquote(vhost)
    d = _definitions()
    for key in ("exchanges", "queues", "bindings", "policies"):
        for item in d[key]:
            item["vhost"] = vhost
    path = Path(f"/tmp/vison-defs-{uuid.uuid4().hex}.json")
    path.write_text(json.dumps(d))
    try:
        out = subprocess.run(["rabbitmqctl", "-q", "import_definitions", str(path)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
    finally:
        path.unlink()
    deadline = time.monotonic() + 20  # the import is asynchronous
    while True:
        out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "type", "policy"],
                             capture_output=True, text=True, timeout=60)
        rows = {line.split("\t")[0]: line.split("\t")[1:] for line in out.stdout.splitlines()[1:]}
        if len(rows) >= 8 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert rows["vison.validator"] == ["quorum", "vison-dead-letter"]
    assert rows["vison.dead"][0] == "classic" and rows["vison.dead"][1] == ""
    settings = Settings(_env_file=None, amqp_url=amqp_url)
    for service in ("validator", "analyzer", "metatest", "catalogue", "scriptgen"):
        assert ensure_queue(settings, service, ["exposure.ingested.#"]) == f"vison.{service}"
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("vison.dlx", "anything", b'{"x": 1}')
        for _ in range(50):
            if ch.queue_declare("vison.dead", passive=True).method.message_count == 1:
                break
            time.sleep(0.1)
        assert ch.queue_declare("vison.dead", passive=True).method.message_count == 1
    finally:
        conn.close()


# ----------------------------------------------------------------- broker set-up job
class _FakeManagement(BaseHTTPRequestHandler):
    calls: list[tuple[str, str, str, object]] = []

    def _handle(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        auth = base64.b64decode(self.headers.get("Authorization", "Basic ").split()[1]).decode()
        self.calls.append((self.command, self.path, auth, body))
        if auth != "admin:adminpw":
            self.send_response(401)
            self.end_headers()
            return
        payload = b'{"rabbitmq_version": "3.13.7"}' if self.path == "/api/overview" else b""
        self.send_response(200 if payload else 204)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = _handle

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_management():
    _FakeManagement.calls = []
    server = HTTPServer(("127.0.0.1", 0), _FakeManagement)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", _FakeManagement.calls
    server.shutdown()
    server.server_close()


def test_setup_broker_creates_users_then_definitions(fake_management, monkeypatch, capsys):
    url, calls = fake_management
    mod = _load(DEPLOY / "rabbitmq" / "setup_broker.py", "vison_setup_broker")
    services = ("ingest", "validator", "analyzer", "metatest", "catalogue", "scriptgen")
    env = {"RABBITMQ_ADMIN_USER": "admin", "RABBITMQ_ADMIN_PASSWORD": "adminpw", "BROKER_ANALYST_PASSWORD": "anapw",
           **{f"BROKER_{s.upper()}_PASSWORD": f"{s}pw" for s in services if s != "catalogue"}}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("BROKER_CATALOGUE_PASSWORD", raising=False)  # not deployed: skipped
    assert mod.main(["--url", url, "--wait", "5"]) == 0
    got = [(m, p) for m, p, _, _ in calls]
    expected = [("GET", "/api/overview")]
    for s in services:
        if s != "catalogue":
            expected += [("PUT", f"/api/users/vison-{s}"), ("PUT", f"/api/permissions/%2F/vison-{s}"),
                         ("PUT", f"/api/topic-permissions/%2F/vison-{s}")]
    expected += [("PUT", "/api/users/analyst"), ("PUT", "/api/permissions/%2F/analyst"), ("POST", "/api/definitions")]
    assert got == expected
    bodies = {p: b for _, p, _, b in calls}
    assert bodies["/api/users/vison-ingest"] == {"password": "ingestpw", "tags": ""}
    assert bodies["/api/users/analyst"]["password"] == "anapw"
    import re

    ingest = bodies["/api/permissions/%2F/vison-ingest"]
    assert re.fullmatch(ingest["configure"], "vison.validator") and not re.fullmatch(ingest["read"], "vison.validator")
    topic = bodies["/api/topic-permissions/%2F/vison-ingest"]
    assert topic["exchange"] == "vison" and re.fullmatch(topic["write"], "exposure.ingested.BIAS01.BORN")
    assert not re.fullmatch(topic["write"], "exposure.validated.BIAS01.BORN")
    analyst = bodies["/api/permissions/%2F/analyst"]
    assert re.fullmatch(analyst["read"], "vison") and not re.fullmatch(analyst["write"], "vison")
    assert not re.fullmatch(analyst["configure"], "vison.validator")
    assert bodies["/api/definitions"] == _definitions()
    out = capsys.readouterr().out
    assert "definitions: 2 exchanges, 8 queues, 1 policies" in out and "vison-catalogue skipped" in out


def test_setup_broker_fails_clearly(fake_management, monkeypatch, capsys):
    url, calls = fake_management
    mod = _load(DEPLOY / "rabbitmq" / "setup_broker.py", "vison_setup_broker")
    monkeypatch.setenv("RABBITMQ_ADMIN_USER", "admin")
    monkeypatch.setenv("RABBITMQ_ADMIN_PASSWORD", "wrong")
    assert mod.main(["--url", url, "--wait", "5"]) == 1
    assert "HTTP 401" in capsys.readouterr().err
    assert len(calls) == 1  # no waiting on bad credentials
    monkeypatch.delenv("RABBITMQ_ADMIN_PASSWORD")
    assert mod.main(["--url", url]) == 2


# ----------------------------------------------------------------- Alertmanager
AM_ENV = {
    "ALERT_EMAIL_TO": "ops@lab.example, night@lab.example", "ALERT_EMAIL_FROM": "vison@lab.example",
    "ALERT_SMTP_SMARTHOST": "smtp.lab.example:587", "ALERT_SMTP_USERNAME": "vison", "ALERT_SMTP_PASSWORD": "smtppw",
    "ALERT_PAGER_WEBHOOK_URL": "https://pager.lab.example/hook", "ALERT_PAGER_BEARER_TOKEN": "tok",
}


def _render_mod():
    return _load(DEPLOY / "alertmanager" / "render_config.py", "vison_render_am")


def test_alertmanager_config_routes_by_severity_with_env_endpoints():
    cfg = _render_mod().build_config(AM_ENV)
    routes = cfg["route"]["routes"]
    assert routes[0] == {"matchers": ['severity="page"'], "receiver": "pager", "group_wait": "10s",
                         "repeat_interval": "30m", "continue": True}
    receivers = {r["name"]: r for r in cfg["receivers"]}
    (email,) = receivers["email"]["email_configs"]
    assert email["to"] == "ops@lab.example, night@lab.example" and email["smarthost"] == "smtp.lab.example:587"
    assert email["auth_password"] == "smtppw" and email["send_resolved"] is True
    (hook,) = receivers["pager"]["webhook_configs"]
    assert hook["url"] == "https://pager.lab.example/hook" and hook["send_resolved"] is True
    assert hook["http_config"]["authorization"]["credentials"] == "tok"


@pytest.mark.parametrize("missing", ["ALERT_EMAIL_TO", "ALERT_PAGER_WEBHOOK_URL", "ALERT_SMTP_SMARTHOST"])
def test_alertmanager_config_refuses_missing_endpoints(missing):
    mod = _render_mod()
    env = dict(AM_ENV, **{missing: ""})
    with pytest.raises(mod.ConfigError, match=missing):
        mod.build_config(env)
    with pytest.raises(mod.ConfigError, match="http"):
        mod.build_config(dict(AM_ENV, ALERT_PAGER_WEBHOOK_URL="pager.lab:80"))


def test_alertmanager_render_writes_a_readable_file(tmp_path, monkeypatch):
    mod = _render_mod()
    for k, v in AM_ENV.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "rendered" / "alertmanager.yml"
    assert mod.main(["--out", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o644
    assert yaml.safe_load(out.read_text()) == mod.build_config(AM_ENV)


@pytest.mark.skipif(AMTOOL is None, reason="amtool not installed (Debian package prometheus-alertmanager: make system-deps)")
def test_amtool_accepts_config_and_routes_severities(tmp_path):
    path = tmp_path / "alertmanager.yml"
    path.write_text(_render_mod().render(AM_ENV))
    out = subprocess.run([AMTOOL, "check-config", str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    expected = {"page": "pager,email", "warning": "email", "info": "none"}
    for severity, receivers in expected.items():
        out = subprocess.run([AMTOOL, "config", "routes", "test", f"--config.file={path}", f"severity={severity}",
                              "alertname=HKCriticalLimit"], capture_output=True, text=True, timeout=30)
        assert out.stdout.strip() == receivers, (severity, out.stdout, out.stderr)
