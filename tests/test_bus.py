"""The bus client against the real broker (one vhost per test): confirms, ack after the handler,
dead-lettering with reasons, bounded redelivery, idempotency, reconnect, clean stop."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pika
import pytest

from shared.bus import (
    Consumer,
    Publisher,
    Reject,
    Subscription,
    connection_parameters,
    dead_letters,
    ensure_queue,
    queue_name,
)
from shared.config import get_settings
from shared.events import ProcessingFailed, TestClose, parse_event

pytestmark = pytest.mark.broker


@pytest.fixture
def settings(vison_env_shared):
    s = get_settings()
    return s.model_copy(update={"max_redeliveries": 3})


def _run(consumer: Consumer) -> threading.Thread:
    thread = threading.Thread(target=consumer.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    assert consumer.ready.wait(10), "consumer did not connect"
    return thread


def _wait(predicate, timeout=10.0, step=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def _depth(settings, queue: str) -> int:
    conn = pika.BlockingConnection(connection_parameters(settings.amqp_url))
    try:
        return conn.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        conn.close()


def _close(test: str = "BIAS01") -> TestClose:
    return TestClose(test=test, block="BORN", operator="tester")


def test_roundtrip_and_ack(settings):
    got = []
    consumer = Consumer(settings, "svc", ["test.close.#"], lambda ev, d: got.append((ev, d.routing_key, d.attempt)))
    thread = _run(consumer)
    with Publisher(settings, "tester") as pub:
        sent = _close()
        key = pub.publish(sent)
        pub.publish(TestClose(test="PTC01", block="CURIE"))
        # not bound: never delivered to svc
        pub.publish(ProcessingFailed(what="fits", where="x.fits", why="truncated"))
    assert key == "test.close.BIAS01.BORN"
    assert _wait(lambda: len(got) == 2)
    consumer.stop()
    thread.join(10)
    assert not thread.is_alive()
    event, rk, attempt = got[0]
    assert isinstance(event, TestClose) and event.event_id == sent.event_id and event.operator == "tester"
    assert event.producer == "tester" and rk == key and attempt == 1
    assert got[1][1] == "test.close.PTC01.CURIE"
    assert _wait(lambda: _depth(settings, queue_name(settings, "svc")) == 0)  # acked (counts lag a little)


def test_malformed_and_schema_error_dead_lettered_queue_not_blocked(settings):
    got = []
    ensure_queue(settings, "svc", ["test.close.#"])
    with Subscription(settings, ["processing.failed.#"]) as failures, Publisher(settings, "tester") as pub:
        pub.publish_raw(b"{not json", "test.close.BIAS01.BORN")
        pub.publish_raw(json.dumps({"kind": "test.close", "block": "BORN"}).encode(), "test.close.X.BORN")
        pub.publish(_close("GOOD"))
        consumer = Consumer(settings, "svc", ["test.close.#"], lambda ev, d: got.append(ev.test))
        thread = _run(consumer)
        assert _wait(lambda: got == ["GOOD"])
        reports = [parse_event(body, rk) for rk, _, body in failures.messages(timeout=3)]
    consumer.stop()
    thread.join(10)
    dead = dead_letters(settings)
    assert len(dead) == 2
    (rk1, h1, b1), (rk2, h2, b2) = dead
    assert b1 == b"{not json" and rk1 == "test.close.BIAS01.BORN"
    assert h1["x-vison-reason"].startswith("json: malformed JSON")
    assert h1["x-vison-queue"] == queue_name(settings, "svc") and h1["x-vison-service"] == "svc"
    assert h2["x-vison-reason"].startswith("schema: schema error in test.close") and "test" in h2["x-vison-reason"]
    assert len(reports) == 2 and all(isinstance(r, ProcessingFailed) and r.what == "message" for r in reports)
    assert "malformed JSON" in reports[0].why and "test.close.BIAS01.BORN" in reports[0].where


def test_handler_failure_bounded_redelivery_then_dead_letter(settings):
    attempts = []
    done = []

    def handler(ev, d):
        if ev.test == "POISON":
            attempts.append(d.attempt)
            raise RuntimeError("cannot handle this one")
        done.append(ev.test)

    consumer = Consumer(settings, "svc", ["test.close.#"], handler)
    thread = _run(consumer)
    with Publisher(settings, "tester") as pub:
        pub.publish(_close("POISON"))
        pub.publish(_close("AFTER"))
    assert _wait(lambda: "AFTER" in done and len(attempts) >= 3)
    time.sleep(0.5)
    consumer.stop()
    thread.join(10)
    assert attempts == [1, 2, 3]  # max_redeliveries = 3
    dead = dead_letters(settings)
    assert len(dead) == 1
    rk, headers, body = dead[0]
    assert rk == "test.close.POISON.BORN"
    assert "handler failed 3 times: RuntimeError: cannot handle this one" in headers["x-vison-reason"]
    assert parse_event(body, rk).test == "POISON"  # the original message


def test_transient_failure_retried_and_reject_is_immediate(settings):
    calls = {"FLAKY": 0, "BAD": 0}

    def handler(ev, d):
        calls[ev.test] += 1
        if ev.test == "FLAKY" and d.attempt == 1:
            raise OSError("disk not mounted yet")
        if ev.test == "BAD":
            raise Reject("no such test")

    consumer = Consumer(settings, "svc", ["test.close.#"], handler)
    thread = _run(consumer)
    with Publisher(settings, "tester") as pub:
        pub.publish(_close("FLAKY"))
        pub.publish(_close("BAD"))
    assert _wait(lambda: calls["FLAKY"] == 2 and calls["BAD"] == 1)
    time.sleep(0.3)
    consumer.stop()
    thread.join(10)
    assert calls == {"FLAKY": 2, "BAD": 1}
    dead = dead_letters(settings)
    assert [h["x-vison-reason"] for _, h, _ in dead] == ["rejected: no such test"]


def test_idempotent_consumer_skips_duplicates_across_restarts(settings):
    got = []
    event = _close("ONCE")
    ensure_queue(settings, "svc", ["test.close.#"])
    with Publisher(settings, "tester") as pub:
        pub.publish(event)
        pub.publish(event)
    consumer = Consumer(settings, "svc", ["test.close.#"], lambda ev, d: got.append(ev.event_id))
    thread = _run(consumer)
    assert _wait(lambda: _depth(settings, queue_name(settings, "svc")) == 0 and len(got) >= 1)
    consumer.stop()
    thread.join(10)
    # a new consumer process (same state dir) still knows the event
    with Publisher(settings, "tester") as pub:
        pub.publish(event)
    consumer = Consumer(settings, "svc", ["test.close.#"], lambda ev, d: got.append(ev.event_id))
    thread = _run(consumer)
    assert _wait(lambda: _depth(settings, queue_name(settings, "svc")) == 0)
    time.sleep(0.3)
    consumer.stop()
    thread.join(10)
    assert got == [event.event_id]


def test_stop_finishes_current_message(settings):
    started, finished = threading.Event(), []

    def slow(ev, d):
        started.set()
        time.sleep(1.0)
        finished.append(ev.test)

    consumer = Consumer(settings, "svc", ["test.close.#"], slow, prefetch=1)
    thread = _run(consumer)
    with Publisher(settings, "tester") as pub:
        pub.publish(_close("FIRST"))
        pub.publish(_close("SECOND"))
    assert started.wait(10)
    consumer.stop()
    thread.join(10)
    assert finished == ["FIRST"]
    assert _wait(lambda: _depth(settings, queue_name(settings, "svc")) == 1)  # SECOND is back in the queue, FIRST acked


def test_consumer_reconnects_after_connection_loss(settings, amqp_module_url):
    from tests.conftest import broker_controllable

    if not broker_controllable():
        pytest.skip("rabbitmqctl unavailable: cannot close connections on the broker")
    vhost = amqp_module_url.rsplit("/", 1)[1]
    got = []
    consumer = Consumer(settings, "svc", ["test.close.#"], lambda ev, d: got.append(ev.test))
    thread = _run(consumer)
    with Publisher(settings, "tester") as pub:
        pub.publish(_close("BEFORE"))
        assert _wait(lambda: got == ["BEFORE"])
        subprocess.run(["rabbitmqctl", "-q", "close_all_connections", "-p", vhost, "test: connection loss"],
                       check=True, capture_output=True, timeout=60)
        assert _wait(lambda: not consumer.ready.is_set() or consumer.connections > 1, timeout=10)
        pub.publish(_close("AFTER"))  # the publisher reconnects too
    assert _wait(lambda: got == ["BEFORE", "AFTER"], timeout=20)
    assert consumer.connections >= 2
    consumer.stop()
    thread.join(10)
