"""Broker security against the real broker:

- AMQP over TLS (``amqps://`` + ``VISON_AMQP_CA_FILE`` / ``_CERT_FILE`` / ``_KEY_FILE``) with a
  test CA made here (trustme). The machine's RabbitMQ has no TLS listener and cannot be
  reconfigured while others test, so the TLS end is a local TLS terminator started by the test
  (Python ``ssl``, requiring a client certificate of the test CA) relaying to the broker's 5672:
  the client side (pika ``SSLOptions``, certificate checks, client certificate) is the real one;
- least privilege: the per-service users of deploy/rabbitmq/setup_broker.py (permissions computed
  by :func:`shared.topology.service_permissions`) created on a fresh vhost with ``rabbitmqctl``:
  a service cannot publish another service's events (topic permission) nor consume another
  service's queue, and still does its own job through the vison bus client.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import socket
import ssl
import subprocess
import threading
import uuid
from pathlib import Path
from urllib.parse import quote

import pika
import pytest

from shared.bus import BrokerConfigError, Consumer, Publisher, Subscription, connection_parameters
from shared.config import Settings
from shared.events import ProcessingFailed, TestClose
from shared.topology import declare_all, queue_name, service_permissions, work_queue_name

pytestmark = pytest.mark.broker

trustme = pytest.importorskip("trustme")
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- TLS


class TLSRelay:
    """A TLS server on a free local port relaying each connection to ``upstream`` (plain TCP)."""

    def __init__(self, context: ssl.SSLContext, upstream: tuple[str, int]):
        self.context, self.upstream = context, upstream
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.handshakes = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            tls = self.context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.failures.append(str(exc))
            raw.close()
            return
        self.handshakes += 1
        up = socket.create_connection(self.upstream)

        def pipe(src, dst):
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        threading.Thread(target=pipe, args=(up, tls), daemon=True).start()
        pipe(tls, up)

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def tls(tmp_path, amqp_module_url):
    from tests.conftest import AMQP_HOST, AMQP_PORT

    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("vison-validator@lab")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.configure_cert(ctx)
    ca.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: a client certificate of the test CA
    relay = TLSRelay(ctx, (AMQP_HOST, AMQP_PORT))
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "client.pem", "key": tmp_path / "client.key"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    client.cert_chain_pems[0].write_to_path(str(files["cert"]))
    client.private_key_pem.write_to_path(str(files["key"]))
    plain = amqp_module_url.split("@", 1)
    url = f"amqps://{plain[0].split('://', 1)[1]}@localhost:{relay.port}/{amqp_module_url.rsplit('/', 1)[1]}"
    yield url, files, relay
    relay.close()


def test_amqps_with_test_ca_and_client_certificate(tls, tmp_path):
    url, files, relay = tls
    settings = Settings(_env_file=None, amqp_url=url, exchange=f"tls-{uuid.uuid4().hex[:6]}", queue_prefix="tls",
                        state_dir=tmp_path / "state", amqp_ca_file=files["ca"], amqp_cert_file=files["cert"],
                        amqp_key_file=files["key"])
    params = connection_parameters(url, settings=settings)
    assert params.ssl_options is not None and params.ssl_options.server_hostname == "localhost"
    assert params.port == relay.port
    got = []
    consumer = Consumer(settings, "validator", ["test.close.#"], lambda ev, d: got.append(ev.test))
    thread = threading.Thread(target=consumer.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    assert consumer.ready.wait(20), relay.failures
    with Subscription(settings, ["processing.failed.#"]) as sub, Publisher(settings, "tester") as pub:
        pub.publish(TestClose(test="TLS01", block="BORN"))
        pub.publish(ProcessingFailed(what="x", where="tls", why="over TLS"))
        events = list(sub.events(timeout=5))
    end = threading.Event()
    for _ in range(100):
        if got:
            break
        end.wait(0.1)
    consumer.stop()
    thread.join(10)
    assert got == ["TLS01"]
    assert [e.where for e in events] == ["tls"]
    assert relay.handshakes >= 3 and not relay.failures


def test_amqps_refuses_an_unknown_ca_and_a_missing_client_certificate(tls, tmp_path):
    url, files, relay = tls
    other = trustme.CA()
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    wrong = Settings(_env_file=None, amqp_url=url, amqp_ca_file=tmp_path / "other-ca.pem",
                     amqp_cert_file=files["cert"], amqp_key_file=files["key"])
    with pytest.raises((pika.exceptions.AMQPConnectionError, ssl.SSLError)) as untrusted:
        pika.BlockingConnection(connection_parameters(url, settings=wrong))  # the server is not trusted
    assert "certificate verify failed" in str(untrusted.value) or isinstance(untrusted.value, pika.exceptions.AMQPConnectionError)
    no_cert = Settings(_env_file=None, amqp_url=url, amqp_ca_file=files["ca"])
    with pytest.raises((pika.exceptions.AMQPConnectionError, OSError)):
        pika.BlockingConnection(connection_parameters(url, settings=no_cert))  # the relay wants a client cert
    assert relay.failures  # refused at the TLS handshake
    missing = Settings(_env_file=None, amqp_url=url, amqp_ca_file=tmp_path / "nope.pem")
    with pytest.raises(BrokerConfigError, match="VISON_AMQP_CA_FILE"):
        connection_parameters(url, settings=missing)


# ----------------------------------------------------------------------------- least privilege


def _ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=120)


def _password_hash(password: str) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


@pytest.fixture(scope="module")
def service_users():
    """A vhost with the compose topology and one user per service holding the permissions of
    setup_broker.py (one ``rabbitmqctl import_definitions``: each rabbitmqctl call costs seconds)."""
    from tests.conftest import AMQP_HOST, AMQP_PASSWORD, AMQP_PORT, AMQP_USER, broker_available, broker_controllable

    if not broker_available() or not broker_controllable():
        pytest.skip("rabbitmqctl cannot manage the local broker: users cannot be created")
    tag = uuid.uuid4().hex[:8]
    vhost = f"vison-test-sec-{tag}"
    admin = Settings(_env_file=None, amqp_url=f"amqp://{AMQP_USER}:{AMQP_PASSWORD}@{AMQP_HOST}:{AMQP_PORT}/{quote(vhost, safe='')}")
    perms = service_permissions(admin)
    spec = importlib.util.spec_from_file_location("vison_setup_broker_sec", REPO / "deploy" / "rabbitmq" / "setup_broker.py")
    setup_broker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_broker)
    perms["analyst"] = dict(setup_broker.ANALYST)  # read-only subscriber, as deployed
    passwords = {svc: uuid.uuid4().hex for svc in perms}
    users = {svc: f"vison-{svc}-{tag}" for svc in perms}
    defs = {
        "vhosts": [{"name": vhost}],
        "users": [{"name": users[s], "password_hash": _password_hash(passwords[s]),
                   "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []} for s in perms],
        "permissions": [{"user": AMQP_USER, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*"}]
                       + [{"user": users[s], "vhost": vhost, **{k: perms[s][k] for k in ("configure", "write", "read")}}
                          for s in perms],
        "topic_permissions": [{"user": users[s], "vhost": vhost, "exchange": admin.exchange, **perms[s]["topic"]}
                              for s in perms if "topic" in perms[s]],
    }
    path = Path(f"/tmp/vison-sec-{tag}.json")
    path.write_text(json.dumps(defs))
    try:
        out = _ctl("import_definitions", str(path))
        assert out.returncode == 0, out.stderr
    finally:
        path.unlink()
    try:
        declare_all(admin)  # as the compose broker-setup job does
        yield {s: Settings(_env_file=None, amqp_url=f"amqp://{users[s]}:{passwords[s]}@{AMQP_HOST}:{AMQP_PORT}/"
                                                    f"{quote(vhost, safe='')}") for s in perms}, admin
    finally:
        procs = [subprocess.Popen(["rabbitmqctl", "-q", "delete_user", u], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for u in users.values()]
        procs.append(subprocess.Popen(["rabbitmqctl", "-q", "delete_vhost", vhost], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        for proc in procs:
            proc.wait(120)


def test_a_service_cannot_publish_another_services_events(service_users, tmp_path):
    users, admin = service_users
    ingest = users["ingest"].model_copy(update={"state_dir": tmp_path / "s"})
    with Publisher(ingest, "ingest", max_retry_seconds=5) as pub:
        try:
            pub.publish(ProcessingFailed(what="fits", where="x.fits", why="truncated"))  # its own kind: allowed
        except BaseException as exc:  # pragma: no cover - printed on failure
            pytest.fail(f"ingest could not publish processing.failed: {exc}")
    conn = pika.BlockingConnection(connection_parameters(ingest.amqp_url))
    try:
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            ch.basic_publish(admin.exchange, "exposure.validated.BIAS01.BORN", b"{}")
            ch.queue_declare(queue_name(admin, "validator"), passive=True)  # forces the round trip
        assert refused.value.reply_code == 403 and "topic" in refused.value.reply_text.lower()
    finally:
        if conn.is_open:
            conn.close()
    # through the vison bus: a configuration error (exit 78), not a retry loop
    with Publisher(ingest, "ingest", max_retry_seconds=5) as pub:
        with pytest.raises(BrokerConfigError, match="refused access"):
            pub.publish_raw(b"{}", "analysis.completed.BIAS01.BORN")


def test_a_service_cannot_consume_another_services_queue(service_users):
    users, admin = service_users
    conn = pika.BlockingConnection(connection_parameters(users["validator"].amqp_url))
    try:
        ch = conn.channel()
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            ch.basic_consume(queue_name(admin, "analyzer"), lambda *a: None)
        assert refused.value.reply_code == 403
        ch = conn.channel()
        ch.basic_consume(queue_name(admin, "validator"), lambda *a: None)  # its own: allowed
    finally:
        if conn.is_open:
            conn.close()


def test_each_service_user_runs_its_own_bus_client(service_users, tmp_path):
    """Connect as every service with the vison client (declarations on connect included)."""
    users, admin = service_users
    for svc, settings in users.items():
        if svc == "analyst":
            continue
        settings = settings.model_copy(update={"state_dir": tmp_path / svc})
        c = Consumer(settings, svc, admin_bindings(svc), lambda ev, d: None)
        if svc == "ingest":
            with Publisher(settings, svc) as pub:
                pub._ensure()
            continue
        if svc == "analyzer":  # the work queues, through the default exchange
            with Publisher(settings, svc, max_retry_seconds=5) as pub:
                pub.send(work_queue_name(admin, "analyzer.jobs"), b"{}", message_id="j1")
        thread = threading.Thread(target=c.run, kwargs={"install_signals": False}, daemon=True)
        thread.start()
        ok = c.ready.wait(15)
        c.stop()
        thread.join(10)
        assert ok and c.config_error is None, (svc, c.config_error)


def admin_bindings(svc: str) -> list[str]:
    from shared.topology import service

    return list(service(svc).bindings)


def test_service_logs_never_show_the_broker_password(service_users, tmp_path):
    """ingest and the validator run as processes with their own users through start-up, a
    connection loss and reconnection: their logs never contain the passwords they used."""
    from services.tools.stack import Stack, free_port
    from urllib.parse import unquote, urlsplit

    users, admin = service_users
    env = {"VISON_DATA_ROOT": str(tmp_path / "data"), "VISON_STATE_DIR": str(tmp_path / "state"),
           "VISON_PRODUCTS_ROOT": str(tmp_path / "products"), "VISON_LOG_LEVEL": "DEBUG"}
    (tmp_path / "data").mkdir()
    stacks = [Stack([svc], env={**env, "VISON_AMQP_URL": users[svc].amqp_url}, ports={svc: free_port()},
                    log_dir=tmp_path / "logs") for svc in ("ingest", "validator")]
    vhost = unquote(urlsplit(admin.amqp_url).path[1:])
    try:
        for stack in stacks:
            stack.start(declare=False)
        deadline = threading.Event()
        for _ in range(120):  # both connected: the validator's consumer is attached to its queue
            conn = pika.BlockingConnection(connection_parameters(admin.amqp_url))
            try:
                consumers = conn.channel().queue_declare(queue_name(admin, "validator"), passive=True).method.consumer_count
            finally:
                conn.close()
            if consumers:
                break
            deadline.wait(0.5)
        assert consumers == 1
        assert _ctl("close_all_connections", "-p", vhost, "test: connection loss").returncode == 0
        for _ in range(120):
            if "connection lost" in (tmp_path / "logs" / "validator.log").read_text():
                break
            deadline.wait(0.5)
    finally:
        codes = {}
        for stack in stacks:
            codes.update(stack.stop())
    logs = {p.name: p.read_text() for p in (tmp_path / "logs").glob("*.log")}
    assert "connection lost" in logs["validator.log"]
    for svc in ("ingest", "validator"):
        password = urlsplit(users[svc].amqp_url).password
        for name, text in logs.items():
            assert password not in text, f"{svc}'s broker password appears in {name}"
    assert codes == {"ingest": 0, "validator": 0}


def test_the_analyst_can_follow_events_but_not_publish(service_users, tmp_path):
    users, admin = service_users
    analyst = users["analyst"]
    with Subscription(analyst, ["exposure.validated.#"]) as sub:
        with Publisher(users["validator"].model_copy(update={"state_dir": tmp_path / "v"}), "validator") as pub:
            pub.publish(ProcessingFailed(what="x", where="y", why="z"))  # a kind the analyst does not follow
        assert list(sub.messages(timeout=1)) == []
    conn = pika.BlockingConnection(connection_parameters(analyst.amqp_url))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            ch = conn.channel()
            ch.basic_publish(admin.exchange, "test.close.BIAS01.BORN", b"{}")
            ch.queue_declare(queue_name(admin, "validator"), passive=True)
        assert refused.value.reply_code == 403
    finally:
        if conn.is_open:
            conn.close()
