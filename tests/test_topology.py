"""The broker topology: one prefix-derived naming rule, a table that agrees with every service's
bindings and with deploy/rabbitmq/definitions.json, ``declare_all``, and a declaration refused by
the broker (queues of an earlier run) turned into exit status 78 with one clear message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pika
import pytest

from services.tools.stack import Stack, free_port
from shared.bus import DELIVERY_LIMIT_MARGIN, BrokerConfigError, connection_parameters, mask_url
from shared.config import Settings, get_settings
from shared.topology import (
    SERVICES,
    all_queues,
    consumers_of,
    dead_letter_exchange,
    dead_queue_name,
    declare_all,
    fed_services,
    service,
    topic_matches,
    work_queue_name,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def vison_env(vison_env_shared):
    """One vhost for the module (vhost creation costs seconds), own exchange and queue prefix per test."""
    return vison_env_shared


def test_naming_rule_is_prefix_derived():
    s = Settings(_env_file=None, exchange="events-x", queue_prefix="lab2")
    assert dead_letter_exchange(s) == "lab2.dlx"  # not "events-x.dlx": the exchange may change alone
    assert dead_queue_name(s) == "lab2.dead"
    assert work_queue_name(s, "analyzer.jobs") == "lab2.analyzer.jobs"
    names = [q for q, _ in all_queues(s)]
    assert names == ["lab2.validator", "lab2.analyzer", "lab2.analyzer.jobs", "lab2.analyzer.done", "lab2.metatest",
                     "lab2.catalogue", "lab2.scriptgen"]
    assert all(n.startswith("lab2.") for n in names)


def test_topic_matching():
    assert topic_matches("exposure.ingested.#", "exposure.ingested.BIAS01.BORN")
    assert topic_matches("exposure.ingested.#", "exposure.ingested")
    assert topic_matches("a.*.c", "a.b.c") and not topic_matches("a.*.c", "a.b.b.c")
    assert not topic_matches("exposure.ingested.#", "exposure.validated.BIAS01.BORN")
    assert [s.service for s in consumers_of("test.close.BIAS01.BORN")] == ["validator", "analyzer"]
    assert consumers_of("hk.samples.BORN") == [] and consumers_of("processing.failed.fits") == []


def _bindings_in(path: Path) -> tuple[str, ...]:
    """The ``BINDINGS = [...]`` of a service module, read from its source (no import needed)."""
    import ast

    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "BINDINGS" for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise AssertionError(f"no BINDINGS in {path}")


def test_table_agrees_with_the_services_bindings():
    assert service("validator").bindings == _bindings_in(REPO / "services" / "validator" / "service.py")
    for svc, candidates in {"analyzer": ("coordinator.py", "collector.py"), "metatest": ("service.py", "main.py"),
                            "catalogue": ("main.py", "service.py")}.items():
        paths = [REPO / "services" / svc / c for c in candidates if (REPO / "services" / svc / c).is_file()
                 and "BINDINGS =" in (REPO / "services" / svc / c).read_text()]
        if paths:  # services being written may not have their consumer yet
            assert service(svc).bindings == _bindings_in(paths[0]), svc
    assert "scriptgen.request.#" in (REPO / "services" / "scriptgen" / "main.py").read_text()
    assert service("scriptgen").bindings == ("scriptgen.request.#",)
    assert service("ingest").bindings == ()  # publishes only
    assert [s.service for s in fed_services("ingest")] == ["validator"]
    assert [s.service for s in fed_services("validator")] == ["analyzer", "catalogue"]
    assert [s.service for s in fed_services("analyzer")] == ["metatest", "catalogue"]
    assert [s.service for s in fed_services("metatest")] == ["catalogue"]


def test_definitions_json_follows_the_table():
    s = Settings(_env_file=None)
    d = json.loads((REPO / "deploy" / "rabbitmq" / "definitions.json").read_text())
    queues = {q["name"]: q for q in d["queues"]}
    args = {"x-queue-type": "quorum", "x-dead-letter-exchange": "vison.dlx",
            "x-delivery-limit": s.max_redeliveries + DELIVERY_LIMIT_MARGIN}
    expected = dict(all_queues(s))
    assert set(queues) == set(expected) | {"vison.dead"}
    for name in expected:
        assert queues[name]["durable"] and queues[name]["arguments"] == args, name
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in d["bindings"]}
    want = {("vison", q, p) for q, patterns in expected.items() for p in patterns} | {("vison.dlx", "vison.dead", "")}
    assert bindings == want
    assert {e["name"]: e["type"] for e in d["exchanges"]} == {"vison": "topic", "vison.dlx": "fanout"}


@pytest.mark.broker
def test_declare_all_creates_every_queue_with_its_bindings(vison_env):
    settings = get_settings()
    names = declare_all(settings)
    assert names == [q for q, _ in all_queues(settings)]
    conn = pika.BlockingConnection(connection_parameters(settings.amqp_url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(settings.exchange, "exposure.ingested.BIAS01.BORN", b"{}", mandatory=True)
        ch.basic_publish(settings.exchange, "analysis.completed.BIAS01.BORN", b"{}", mandatory=True)
        want = {f"{settings.queue_prefix}.{n}": c for n, c in [("validator", 1), ("analyzer", 0), ("analyzer.jobs", 0),
                                             ("analyzer.done", 0), ("metatest", 1), ("catalogue", 1), ("scriptgen", 0)]}
        for _ in range(100):  # quorum-queue counts are updated asynchronously
            depth = {q: ch.queue_declare(q, passive=True).method.message_count for q in names}
            if depth == want:
                break
            time.sleep(0.1)
    finally:
        conn.close()
    assert depth == want
    assert declare_all(settings) == names  # idempotent


def _earlier_run_queues(url: str, old_exchange: str, prefix: str) -> None:
    """Queues as the previous release declared them: dead-lettered to ``<exchange>.dlx``."""
    conn = pika.BlockingConnection(connection_parameters(url))
    try:
        ch = conn.channel()
        ch.exchange_declare(f"{old_exchange}.dlx", "fanout", durable=True)
        for svc in ("validator", "analyzer"):
            ch.queue_declare(f"{prefix}.{svc}", durable=True, arguments={
                "x-queue-type": "quorum", "x-dead-letter-exchange": f"{old_exchange}.dlx", "x-delivery-limit": 13})
    finally:
        conn.close()


@pytest.mark.broker
def test_refused_declaration_exits_78_with_one_clear_message(vison_env, tmp_path):
    """The issue's hot loop: queues of an earlier run, VISON_EXCHANGE changed -> the validator exits
    78 within seconds, one message naming the queue, the argument and the way out, no retries."""
    _earlier_run_queues(vison_env["VISON_AMQP_URL"], "vison-old", vison_env["VISON_QUEUE_PREFIX"])
    env = {**os.environ, **vison_env, "VISON_EXCHANGE": "vison-new", "VISON_LOG_LEVEL": "INFO"}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "services.cli", "validator", "--metrics-port", "0"], env=env,
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    elapsed = time.monotonic() - t0
    text = out.stdout + out.stderr
    assert out.returncode == 78, text[-3000:]
    lines = [line for line in text.splitlines() if "configuration error" in line]
    assert len(lines) == 1, text[-3000:]  # said once, no loop
    assert f"'{vison_env['VISON_QUEUE_PREFIX']}.validator'" in lines[0] and "'x-dead-letter-exchange'" in lines[0]
    assert "delete the queue" in lines[0] and "VISON_QUEUE_PREFIX" in lines[0]
    assert "reconnecting" not in text
    assert "guest:guest" not in text  # the URL, if shown, is masked
    assert elapsed < 50  # bounded by the subprocess timeout above, not a speed assertion


@pytest.mark.broker
def test_stack_up_refuses_and_does_not_restart_a_service_that_exited_78(vison_env, tmp_path):
    _earlier_run_queues(vison_env["VISON_AMQP_URL"], "vison-old", vison_env["VISON_QUEUE_PREFIX"])
    env = {**vison_env, "VISON_EXCHANGE": "vison-new"}
    # `vison stack up` declares the topology first: refused before any service starts
    out = subprocess.run([sys.executable, "-m", "services.cli", "stack", "up", "--services", "validator"],
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 78, out.stderr[-2000:]
    assert "x-dead-letter-exchange" in out.stderr and "started validator" not in out.stderr
    # a service that exits 78 by itself is not restarted
    stack = Stack(["validator"], env=env, ports={"validator": free_port()}, log_dir=tmp_path / "logs")
    with pytest.raises(BrokerConfigError):
        stack.start()
    stack.start(declare=False)
    try:
        first = stack.children[0].proc
        first.wait(60)
        assert first.returncode == 78
        for _ in range(6):  # restarts would be due after 1 s
            stack.poll()
            time.sleep(0.5)
        assert stack.children[0].proc is first and stack.config_failures() == ["validator"]
        assert stack.children[0].restarts == 0
    finally:
        stack.stop()
    log_text = (tmp_path / "logs" / "validator.log").read_text()
    assert log_text.count("configuration error") == 1


def test_mask_url():
    assert mask_url("amqp://svc:s3cret@rabbitmq:5672/%2F") == "amqp://svc:***@rabbitmq:5672/%2F"
    assert mask_url("amqps://host/vh") == "amqps://host/vh"
    assert mask_url("amqp://u@h/") == "amqp://u@h/"


@pytest.mark.broker
def test_exposure_ingested_before_the_validator_ever_ran_is_not_lost(vison_env, tmp_path):
    """The cause of the flaky ``test_broker_restart_mid_stream``: ingest published
    ``exposure.ingested`` before the validator had declared its queue, and the event was dropped.
    Now ingest declares the queue it feeds on connect (here without the stack's own
    declaration): the validator, started only afterwards, still gets the exposure."""
    from shared.bus import Subscription
    from shared.events import ExposureIngested, parse_event
    from tests.test_ingest_data import write_exposure

    settings = get_settings()
    fast = ["--rescan-interval", "0.5", "--stable-seconds", "0.1"]
    stack = Stack(["ingest"], env={**vison_env, "VISON_BLOCK": "BORN"}, ports={"ingest": free_port()},
                  log_dir=tmp_path / "logs", extra_args={"ingest": fast})
    validator = Stack(["validator"], env={**vison_env, "VISON_BLOCK": "BORN"}, ports={"validator": free_port()},
                      log_dir=tmp_path / "logs")
    with Subscription(settings, ["exposure.#", "processing.failed.#"]) as sub:
        stack.start(declare=False)  # nothing declared beforehand: only ingest's own publisher
        try:
            write_exposure(Path(settings.data_root), 1, size="tiny", block="BORN")
            ingested = None
            for rk, _, body in sub.messages(timeout=60):
                ev = parse_event(body, rk)
                if isinstance(ev, ExposureIngested) and ev.obsid == 1:
                    ingested = ev
                    break
            assert ingested is not None, "ingest never published the exposure"
            conn = pika.BlockingConnection(connection_parameters(settings.amqp_url))
            try:  # quorum-queue counts are updated asynchronously: wait for it
                depth = 0
                for _ in range(100):
                    depth = conn.channel().queue_declare(f"{settings.queue_prefix}.validator",
                                                         passive=True).method.message_count
                    if depth:
                        break
                    time.sleep(0.1)
                assert depth == 1, "exposure.ingested is not waiting in the validator's queue"
            finally:
                conn.close()
            validator.start(declare=False)
            answer = None
            for rk, _, body in sub.messages(timeout=60):
                ev = parse_event(body, rk)
                if getattr(ev, "producer", "") == "validator" and getattr(ev, "obsid", None) == 1:
                    answer = ev
                    break
        finally:
            codes = {**validator.stop(), **stack.stop()}
    assert answer is not None, "the validator never handled the exposure ingested before it started"
    assert codes == {"ingest": 0, "validator": 0}


@pytest.mark.broker
def test_ingest_exits_78_at_start_on_a_refused_declaration(vison_env, tmp_path):
    _earlier_run_queues(vison_env["VISON_AMQP_URL"], "vison-old", vison_env["VISON_QUEUE_PREFIX"])
    env = {**os.environ, **vison_env, "VISON_EXCHANGE": "vison-new"}
    out = subprocess.run([sys.executable, "-m", "services.cli", "ingest", "--metrics-port", "0"], env=env,
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    text = out.stdout + out.stderr
    assert out.returncode == 78, text[-3000:]
    assert text.count("configuration error") == 1 and f"'{vison_env['VISON_QUEUE_PREFIX']}.validator'" in text


def test_refusal_message_masks_the_password():
    from shared.bus import _refusal

    exc = pika.exceptions.ChannelClosedByBroker(403, "ACCESS_REFUSED - write access to topic 'x' refused")
    err = _refusal(exc, "queue", "vison.validator", Settings(_env_file=None, amqp_url="amqp://svc:Zq81secret@h:5672/%2F"))
    assert isinstance(err, BrokerConfigError) and err.code == 78
    assert "Zq81secret" not in err.message and "svc:***@h" in err.message and "vison.validator" in err.message
