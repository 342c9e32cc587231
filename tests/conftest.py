"""Shared test fixtures: the ELVIS fixture files, an isolated RabbitMQ virtual host per test,
service settings pointing at temporary folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC_FIXTURES = REPO.parent / "shared" / "fixtures" / "elvis"
AMQP_HOST = os.environ.get("VISON_TEST_AMQP_HOST", "127.0.0.1")
AMQP_PORT = int(os.environ.get("VISON_TEST_AMQP_PORT", "5672"))
AMQP_USER = os.environ.get("VISON_TEST_AMQP_USER", "guest")
AMQP_PASSWORD = os.environ.get("VISON_TEST_AMQP_PASSWORD", "guest")


@pytest.fixture(scope="session")
def elvis_fixtures() -> Path:
    """Folder of the real ELVIS files (../shared/fixtures/elvis); skips where it is absent."""
    if not SPEC_FIXTURES.is_dir():
        pytest.skip(f"ELVIS fixture files not found at {SPEC_FIXTURES} (the read-only shared/ folder beside the repo)")
    return SPEC_FIXTURES


def _rabbitmqctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=60)


def broker_available() -> bool:
    """True when the AMQP port answers."""
    import socket

    try:
        with socket.create_connection((AMQP_HOST, AMQP_PORT), timeout=2):
            return True
    except OSError:
        return False


def broker_controllable() -> bool:
    """True when this process can manage the local broker with rabbitmqctl (vhosts, restarts)."""
    return shutil.which("rabbitmqctl") is not None and _rabbitmqctl("status").returncode == 0


def _fresh_vhost_url():
    """Generator: the AMQP URL of a new virtual host of the real broker, deleted after use (the
    default vhost where vhosts cannot be created: no rabbitmqctl)."""
    if not broker_available():
        pytest.skip(f"no RabbitMQ broker on {AMQP_HOST}:{AMQP_PORT} (start it with: rabbitmq-server -detached)")
    if not broker_controllable():
        yield f"amqp://{AMQP_USER}:{AMQP_PASSWORD}@{AMQP_HOST}:{AMQP_PORT}/%2F"
        return
    vhost = f"vison-test-{uuid.uuid4().hex[:12]}"
    assert _rabbitmqctl("add_vhost", vhost).returncode == 0
    assert _rabbitmqctl("set_permissions", "-p", vhost, AMQP_USER, ".*", ".*", ".*").returncode == 0
    try:
        yield f"amqp://{AMQP_USER}:{AMQP_PASSWORD}@{AMQP_HOST}:{AMQP_PORT}/{quote(vhost, safe='')}"
    finally:
        _rabbitmqctl("delete_vhost", vhost)


@pytest.fixture
def amqp_url() -> str:
    """An AMQP URL on a fresh virtual host of the real broker, deleted after the test.

    Each test sees only its own messages. Where vhosts cannot be created (no rabbitmqctl), the
    default vhost is used and tests must rely on unique exchange / queue names."""
    yield from _fresh_vhost_url()


@pytest.fixture
def vison_env(tmp_path: Path, amqp_url: str, monkeypatch) -> dict[str, str]:
    """Environment for running vison services in a test: own vhost, exchange and folders."""
    env = {
        "VISON_AMQP_URL": amqp_url,
        "VISON_EXCHANGE": f"vison-{uuid.uuid4().hex[:8]}",
        "VISON_DATA_ROOT": str(tmp_path / "data"),
        "VISON_PRODUCTS_ROOT": str(tmp_path / "products"),
        "VISON_STATE_DIR": str(tmp_path / "state"),
    }
    for key in ("data", "products", "state"):
        (tmp_path / key).mkdir(exist_ok=True)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from shared.config import get_settings

    get_settings.cache_clear()
    yield env
    get_settings.cache_clear()


PG_HOST = os.environ.get("VISON_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("VISON_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("VISON_TEST_PG_USER", "postgres")


def postgres_available() -> bool:
    """True when the PostgreSQL port answers."""
    import socket

    try:
        with socket.create_connection((PG_HOST, PG_PORT), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture
def pg_url() -> str:
    """A SQLAlchemy URL (psycopg 3) of a fresh database on the real PostgreSQL, dropped after
    the test (user postgres, trust auth on 127.0.0.1:5432)."""
    if not postgres_available():
        pytest.skip(f"no PostgreSQL on {PG_HOST}:{PG_PORT} (make system-deps starts it)")
    import psycopg

    name = f"vison_test_{uuid.uuid4().hex[:12]}"
    admin = f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def catalogue_db_url(request, tmp_path: Path) -> str:
    """The catalogue's database URL, once on SQLite (a file in tmp_path), once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalogue.sqlite'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture(scope="module")
def amqp_module_url() -> str:
    """One fresh virtual host for a whole test module, deleted after it (each rabbitmqctl call
    costs seconds on a loaded machine). Tests on it isolate themselves with their own exchange
    and queue prefix: use ``vison_env_shared``."""
    yield from _fresh_vhost_url()


@pytest.fixture
def vison_env_shared(tmp_path: Path, amqp_module_url: str, monkeypatch) -> dict[str, str]:
    """Like ``vison_env``, on the module's virtual host, with its own ``VISON_EXCHANGE`` and
    ``VISON_QUEUE_PREFIX`` (so its queues, dead letters and events are its own)."""
    tag = uuid.uuid4().hex[:8]
    env = {
        "VISON_AMQP_URL": amqp_module_url,
        "VISON_EXCHANGE": f"vison-{tag}",
        "VISON_QUEUE_PREFIX": f"t{tag}",
        "VISON_DATA_ROOT": str(tmp_path / "data"),
        "VISON_PRODUCTS_ROOT": str(tmp_path / "products"),
        "VISON_STATE_DIR": str(tmp_path / "state"),
    }
    for key in ("data", "products", "state"):
        (tmp_path / key).mkdir(exist_ok=True)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from shared.config import get_settings

    get_settings.cache_clear()
    yield env
    get_settings.cache_clear()
