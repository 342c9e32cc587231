"""Security outside the broker: nothing unauthenticated is published beyond the loopback
(docker-compose.yml; the metrics endpoints default to 127.0.0.1 through VISON_METRICS_BIND) and a
broker password never reaches a log (a ``vison demo --keep`` run with a random password, every
log file and the output grepped)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VISON_SERVICES = {"ingest", "validator", "analyzer", "metatest", "scriptgen", "catalogue"}
METRICS_PORTS = {"9101", "9102", "9103", "9104", "9105", "15692"}
UNAUTHENTICATED = {"prometheus", "alertmanager"}


def _host_address(port: str) -> str | None:
    """The host address of a compose port mapping with every ``${VAR:-default}`` at its default."""
    text = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", port)
    parts = text.split(":")
    return parts[0] if len(parts) == 3 else None


def test_compose_publishes_nothing_unauthenticated_beyond_the_loopback():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    for name, svc in services.items():
        for port in map(str, svc.get("ports", [])):
            host = _host_address(port)
            assert host is not None, f"{name}: port {port} has no host address (would bind every interface)"
            assert port.rsplit(":", 1)[-1].split("/")[0] not in METRICS_PORTS, f"{name} publishes a metrics port {port}"
            if name in UNAUTHENTICATED:
                assert host == "127.0.0.1", f"{name}: {port} is not bound to the loopback by default"
        if name in VISON_SERVICES:
            assert not svc.get("ports"), f"{name} publishes ports {svc['ports']}"
            assert svc["environment"]["VISON_METRICS_BIND"] == "0.0.0.0"  # the compose network only


def test_metrics_endpoint_binds_the_loopback_by_default(monkeypatch):
    from shared.config import Settings, get_settings
    from shared.metrics import start_metrics_server
    from services.tools.stack import free_port

    monkeypatch.delenv("VISON_METRICS_BIND", raising=False)
    assert Settings().metrics_bind == "127.0.0.1"
    get_settings.cache_clear()
    port = free_port()
    start_metrics_server(port, "test")
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True)
    if out.returncode == 0:
        assert f"127.0.0.1:{port}" in out.stdout and f"0.0.0.0:{port}" not in out.stdout, out.stdout
    assert b"vison_service_info" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def secret_broker_url():
    """A broker user with a random password on a fresh vhost (both deleted afterwards)."""
    from tests.conftest import AMQP_HOST, AMQP_PORT, broker_available, broker_controllable

    if not broker_available() or not broker_controllable():
        pytest.skip("needs the local RabbitMQ broker and rabbitmqctl (to create a user)")
    user, vhost = f"vison-secret-{uuid.uuid4().hex[:8]}", f"vison-secret-{uuid.uuid4().hex[:8]}"
    password = secrets.token_urlsafe(18)
    assert _rabbitmqctl("add_vhost", vhost).returncode == 0
    try:
        assert _rabbitmqctl("add_user", user, password).returncode == 0
        assert _rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*").returncode == 0
        yield f"amqp://{user}:{password}@{AMQP_HOST}:{AMQP_PORT}/{quote(vhost, safe='')}", password
    finally:
        _rabbitmqctl("delete_user", user)
        _rabbitmqctl("delete_vhost", vhost)


@pytest.mark.broker
def test_demo_never_logs_the_broker_password(secret_broker_url, tmp_path):
    url, password = secret_broker_url
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISON_")}
    env.update(VISON_AMQP_URL=url, VISON_LOG_LEVEL="DEBUG", TMPDIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "services.cli", "demo", "--keep", "--bias", "2", "--flats", "1",
                          "--no-analysis", "--speedup", "40", "--timeout", "150"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    folders = list(tmp_path.glob("vison-demo-*"))
    try:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        assert "3 of 3 exposures validated" in out.stdout  # the services did log in with that password
        assert len(folders) == 1 and (folders[0] / "logs").is_dir()
        logs = sorted(p for p in folders[0].rglob("*") if p.is_file() and p.suffix in (".log", ".txt", ".json", ""))
        assert any(p.name == "validator.log" and p.stat().st_size > 0 for p in logs)
        for text, where in [(out.stdout, "stdout"), (out.stderr, "stderr")] + [
                (p.read_bytes().decode("utf-8", "replace"), str(p)) for p in logs]:
            assert password not in text, f"the broker password appears in {where}"
            assert quote(password, safe="") not in text
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
