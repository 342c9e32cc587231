"""docker-compose.yml and .env.example: accepted by a compose implementation without an engine
(Debian's docker-compose 1.29 ``config``, installed by deploy/scripts/install-system-deps.sh) and
the invariants of the lab deployment (healthchecks, secrets only from .env, broker behind a
login, acquisition folder read-only, scalable analyzer)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKER_COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    DOCKER_COMPOSE is None,
    reason="docker-compose (Debian package docker-compose, no engine needed for `config`) not installed: "
           "make system-deps, as root")

VISON_SERVICES = {"ingest": 9101, "validator": 9102, "analyzer": 9103, "metatest": 9104, "scriptgen": 9105}
ONE_SHOT = {"broker-setup", "alertmanager-config"}
REQUIRED = ["VISON_ACQUISITION_DIR", "RABBITMQ_ADMIN_USER", "RABBITMQ_ADMIN_PASSWORD",
            *[f"BROKER_{s}_PASSWORD" for s in ("INGEST", "VALIDATOR", "ANALYZER", "METATEST", "SCRIPTGEN", "CATALOGUE")],
            "BROKER_ANALYST_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "ALERT_EMAIL_TO", "ALERT_EMAIL_FROM",
            "ALERT_SMTP_SMARTHOST", "ALERT_PAGER_WEBHOOK_URL", "POSTGRES_USER", "POSTGRES_PASSWORD"]
FILLED = {
    "VISON_ACQUISITION_DIR": "/srv/elvis/data", "RABBITMQ_ADMIN_PASSWORD": "adminpw0123",
    **{f"BROKER_{s}_PASSWORD": f"{s.lower()}pw0123" for s in ("INGEST", "VALIDATOR", "ANALYZER", "METATEST", "SCRIPTGEN",
                                                            "CATALOGUE")},
    "BROKER_ANALYST_PASSWORD": "analystpw0123",
    "GRAFANA_ADMIN_PASSWORD": "grafanapw0123", "ALERT_EMAIL_TO": "ops@lab.example", "ALERT_EMAIL_FROM": "vison@lab.example",
    "ALERT_SMTP_SMARTHOST": "smtp.lab.example:587", "ALERT_PAGER_WEBHOOK_URL": "https://pager.lab.example/hook",
    "POSTGRES_PASSWORD": "postgrespw0123",
}


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # safe_load resolves the << merge keys


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _config(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    clean = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}  # no stray VISON_*/ALERT_*
    return subprocess.run([DOCKER_COMPOSE, "--project-directory", str(REPO), "--env-file", str(env_file), "-f",
                           str(COMPOSE), "config"], capture_output=True, text=True, env=clean, timeout=60)


def _ports(service: dict) -> list[str]:
    return [str(p) for p in service.get("ports", [])]


# ----------------------------------------------------------------- compose implementation
@needs_compose
def test_compose_config_accepts_the_file_with_a_complete_env(tmp_path):
    env = dict(_env_example(), **FILLED)
    out = _config(tmp_path, env)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert set(cfg["services"]) >= {"rabbitmq", "broker-setup", "ingest", "validator", "analyzer", "scriptgen",
                                    "prometheus", "alertmanager-config", "alertmanager", "grafana"}
    ingest = cfg["services"]["ingest"]
    assert "/srv/elvis/data:/data:ro" in ingest["volumes"]
    assert ingest["environment"]["VISON_AMQP_URL"] == "amqp://vison-ingest:ingestpw0123@rabbitmq:5672/%2F"
    assert cfg["services"]["rabbitmq"]["environment"]["RABBITMQ_DEFAULT_PASS"] == "adminpw0123"
    assert "127.0.0.1:9090:9090/tcp" in cfg["services"]["prometheus"]["ports"]


@needs_compose
@pytest.mark.parametrize("missing", REQUIRED)
def test_compose_config_refuses_a_missing_secret(tmp_path, missing):
    env = dict(_env_example(), **FILLED)
    env[missing] = ""
    out = _config(tmp_path, env)
    assert out.returncode != 0
    assert f"set {missing}" in out.stderr


@needs_compose
def test_env_example_alone_is_refused(tmp_path):
    """The committed example holds no secret, so compose must refuse to start with it as is."""
    out = _config(tmp_path, _env_example())
    assert out.returncode != 0 and "in .env" in out.stderr


# ----------------------------------------------------------------- invariants
def test_env_example_has_no_secret_values():
    env = _env_example()
    for key in REQUIRED:
        assert key in env, key
    for key, value in env.items():
        if re.search(r"PASSWORD|TOKEN|SECRET|_PASS$", key):
            assert value == "", f"{key} must be empty in .env.example"
    assert ".env" in (REPO / ".gitignore").read_text().split()


def test_every_long_running_service_has_healthcheck_and_restart():
    services = _compose()["services"]
    for name, svc in services.items():
        if name in ONE_SHOT:
            assert svc["restart"] == "no", name
            assert "healthcheck" not in svc
            continue
        assert svc.get("restart") in ("unless-stopped", "always"), name
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"


def test_vison_services_run_the_one_image_with_their_command_and_metrics_check():
    services = _compose()["services"]
    images = set()
    for name, port in VISON_SERVICES.items():
        svc = services[name]
        images.add(svc["image"])
        assert svc["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
        assert svc["command"][:2] == ["vison", name]
        assert svc["environment"]["VISON_METRICS_PORT"] == str(port)
        check = " ".join(svc["healthcheck"]["test"])
        assert "/metrics" in check and "VISON_METRICS_PORT" in check and "urllib" in check
        deps = svc["depends_on"]
        assert deps["rabbitmq"]["condition"] == "service_healthy"
        assert deps["broker-setup"]["condition"] == "service_completed_successfully"
    assert services["analyzer"]["command"] == ["vison", "analyzer", "--workers", "${VISON_ANALYZER_WORKERS:-2}"]
    assert services["scriptgen"]["command"] == ["vison", "scriptgen", "--serve"]
    assert len(images) == 1 and services["broker-setup"]["image"] in images


def test_healthcheck_command_is_valid_python():
    svc = _compose()["services"]["ingest"]
    cmd = svc["healthcheck"]["test"]
    assert cmd[:3] == ["CMD", "python", "-c"]
    compile(cmd[3], "<healthcheck>", "exec")


def test_analyzer_workers_can_be_scaled():
    services = _compose()["services"]
    svc = services["analyzer-worker"]
    assert "container_name" not in svc and not svc.get("ports"), "replicas would clash"
    assert svc["command"] == ["vison", "analyzer", "--no-collector", "--workers", "${VISON_ANALYZER_WORKERS:-2}"]
    assert svc["volumes"] == services["analyzer"]["volumes"]  # the same data and products as the coordinator


def test_acquisition_folder_is_mounted_read_only_everywhere():
    services = _compose()["services"]
    mounts = [(n, v) for n, s in services.items() for v in s.get("volumes", []) if "VISON_ACQUISITION_DIR" in str(v)]
    assert {n for n, _ in mounts} == {"ingest", "validator", "analyzer", "analyzer-worker"}
    for name, volume in mounts:
        assert volume.endswith(":/data:ro"), (name, volume)


def test_named_volumes_for_state_and_products_and_monitoring():
    cfg = _compose()
    assert {"broker", "prometheus", "grafana", "state", "products", "alertmanager"} <= set(cfg["volumes"])
    used = {str(v).split(":")[0] for s in cfg["services"].values() for v in s.get("volumes", [])}
    assert set(cfg["volumes"]) <= used
    assert "broker:/var/lib/rabbitmq" in cfg["services"]["rabbitmq"]["volumes"]
    assert "products:/var/lib/vison/products" in cfg["services"]["analyzer"]["volumes"]


def test_secrets_only_from_the_environment():
    text = COMPOSE.read_text()
    for name, svc in _compose()["services"].items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"PASS|PASSWORD|TOKEN|SECRET", key):
                assert re.fullmatch(r"\$\{[A-Z_]+:(\?[^}]+|-)\}", str(value)), f"{name}.{key} = {value!r}"
            if key == "VISON_AMQP_URL":
                # one broker user per service (least privilege, deploy/rabbitmq/setup_broker.py); the
                # analyzer's workers are the analyzer's user
                user = "analyzer" if name == "analyzer-worker" else name
                assert value.startswith(f"amqp://vison-{user}:${{BROKER_{user.upper()}_PASSWORD:?"), (name, value)
    assert "guest" not in text.lower()


def test_broker_is_not_exposed_without_authentication():
    services = _compose()["services"]
    rabbit = services["rabbitmq"]
    env = rabbit["environment"]
    assert env["RABBITMQ_DEFAULT_USER"].startswith("${RABBITMQ_ADMIN_USER:?")
    assert env["RABBITMQ_DEFAULT_PASS"].startswith("${RABBITMQ_ADMIN_PASSWORD:?")
    published = [p.rsplit(":", 1)[-1] for p in _ports(rabbit)]
    assert sorted(published) == ["15672", "5672"]  # AMQP + management, both need a login
    for name, svc in services.items():
        for port in _ports(svc):
            assert "15692" not in port, f"{name}: the unauthenticated broker metrics must stay internal"
    conf = (REPO / "deploy" / "rabbitmq" / "rabbitmq.conf").read_text()
    assert "loopback_users.guest = true" in conf
    # services without a login of their own are published on the loopback by default
    for name in ("prometheus", "alertmanager"):
        for port in _ports(services[name]):
            assert port.startswith("${VISON_BIND:-127.0.0.1}:"), (name, port)


def test_third_party_images_are_pinned():
    for name, svc in _compose()["services"].items():
        image = svc["image"]
        if image.startswith("vison:"):
            continue
        repo, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+(\.\d+)?", tag), f"{name}: {image}"


def test_grafana_and_alertmanager_wiring():
    services = _compose()["services"]
    graf = services["grafana"]
    assert graf["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in graf["volumes"]
    assert graf["depends_on"]["prometheus"]["condition"] == "service_healthy"
    am = services["alertmanager"]
    assert am["depends_on"]["alertmanager-config"]["condition"] == "service_completed_successfully"
    assert "alertmanager-config:/etc/alertmanager/rendered:ro" in am["volumes"]
    render = services["alertmanager-config"]
    assert "alertmanager-config:/var/lib/vison/alertmanager" in render["volumes"]
    assert render["command"][-1] == "/var/lib/vison/alertmanager/alertmanager.yml"
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
