"""The one-AMQP-layer API against the real broker (one vhost per test): long-job consumers keep
their connection through a handler longer than the heartbeat timeout, named queues, ``send``,
``Delivery.dead_letter``, ``Retry`` (no ack, no nack, delivery count unchanged, gauge), returned
messages re-published after the topology is re-declared."""

from __future__ import annotations

import threading
import time

import pika
import pytest
from prometheus_client import REGISTRY
from pydantic import BaseModel

from shared.bus import (
    Consumer,
    Publisher,
    Retry,
    connection_parameters,
    dead_letters,
    declare_queue,
    queue_name,
)
from shared.config import get_settings
from shared.events import ProcessingFailed, TestClose
from shared.topology import work_queue_name

pytestmark = pytest.mark.broker


class Job(BaseModel):
    job_id: str
    n: int


@pytest.fixture
def settings(vison_env_shared):
    return get_settings().model_copy(update={"max_redeliveries": 3})


def _run(consumer: Consumer) -> threading.Thread:
    thread = threading.Thread(target=consumer.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    assert consumer.ready.wait(10), "consumer did not connect"
    return thread


def _wait(predicate, timeout=15.0, step=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def _counts(settings, queue: str) -> tuple[int, int]:
    """(ready, consumers) of a queue."""
    conn = pika.BlockingConnection(connection_parameters(settings.amqp_url))
    try:
        ok = conn.channel().queue_declare(queue, passive=True).method
        return ok.message_count, ok.consumer_count
    finally:
        conn.close()


def _gauge(name: str, **labels) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_long_job_keeps_connection_beyond_heartbeat_timeout(settings):
    """heartbeat 2 s (the broker drops a silent connection after ~4 s), a 10 s handler: the
    connection survives, the outputs are published from the worker thread, the message is acked."""
    jobs = work_queue_name(settings, "analyzer.jobs")
    threads, got = [], []

    def handler(job: Job, d):
        threads.append(threading.current_thread().name)
        time.sleep(10.0)
        d.publish(ProcessingFailed(what="test", where=job.job_id, why="done after 10 s"))
        d.send(work_queue_name(settings, "analyzer.done"), Job(job_id=job.job_id, n=job.n + 1), message_id=f"done-{job.job_id}")
        got.append(job.n)

    consumer = Consumer(settings, "analyzer", [], handler, long_jobs=True, queue=jobs, model=Job, heartbeat=2)
    thread = _run(consumer)
    with Publisher(settings, "analyzer") as pub:
        pub.send(jobs, Job(job_id="j1", n=1), message_id="j1")
    assert _wait(lambda: got == [1], timeout=40)
    assert _wait(lambda: _counts(settings, jobs) == (0, 1))  # acked, consumer still attached
    consumer.stop()
    thread.join(15)
    assert not thread.is_alive()
    assert consumer.connections == 1, "the connection was lost during the long handler"
    assert threads and threads[0] != "MainThread" and threads[0].endswith("-handler")
    done = pika.BlockingConnection(connection_parameters(settings.amqp_url))
    try:
        method, props, body = done.channel().basic_get(work_queue_name(settings, "analyzer.done"), auto_ack=True)
    finally:
        done.close()
    assert method is not None and props.message_id == "done-j1" and props.delivery_mode == 2
    assert Job.model_validate_json(body) == Job(job_id="j1", n=2)


def test_long_job_stop_finishes_current_message(settings):
    started, finished = threading.Event(), []

    def slow(ev, d):
        started.set()
        time.sleep(1.5)
        finished.append(ev.test)

    consumer = Consumer(settings, "svc", ["test.close.#"], slow, long_jobs=True)
    thread = _run(consumer)
    with Publisher(settings, "tester") as pub:
        pub.publish(TestClose(test="FIRST", block="BORN"))
        pub.publish(TestClose(test="SECOND", block="BORN"))
    assert started.wait(10)
    consumer.stop()
    thread.join(15)
    assert finished == ["FIRST"]
    assert _wait(lambda: _counts(settings, queue_name(settings, "svc")) == (1, 0))  # SECOND back in the queue


def test_named_queue_without_bindings_and_malformed_message(settings):
    """queue= with model=: a body that does not validate is dead-lettered with the standard headers."""
    q = work_queue_name(settings, "analyzer.jobs")
    got = []
    consumer = Consumer(settings, "analyzer", [], lambda job, d: got.append((job.job_id, d.message_id)), queue=q, model=Job)
    thread = _run(consumer)
    with Publisher(settings, "analyzer") as pub:
        pub.send(q, b'{"job_id": "bad"}', message_id="bad")
        pub.send(q, Job(job_id="good", n=3), message_id="good")
        pub.send(q, Job(job_id="good", n=3), message_id="good")  # duplicate message id: skipped
    assert _wait(lambda: got == [("good", "good")] and _counts(settings, q)[0] == 0)
    time.sleep(0.3)
    consumer.stop()
    thread.join(10)
    assert got == [("good", "good")]
    dead = dead_letters(settings)
    assert len(dead) == 1
    rk, headers, body = dead[0]
    assert body == b'{"job_id": "bad"}' and rk == q
    assert headers["x-vison-error"] == "schema" and headers["x-vison-queue"] == q
    assert headers["x-vison-service"] == "analyzer" and headers["x-vison-attempts"] == 1
    assert set(headers) >= {"x-vison-reason", "x-vison-error", "x-vison-service", "x-vison-queue",
                            "x-vison-routing-key", "x-vison-attempts", "x-vison-dead-at"}


@pytest.mark.parametrize("long_jobs", [False, True])
def test_delivery_dead_letter_from_handler(settings, long_jobs):
    calls = []

    def handler(ev, d):
        calls.append(ev.test)
        if ev.test == "BAD":
            d.dead_letter("frames of BAD are unreadable", error="data")

    consumer = Consumer(settings, "svc", ["test.close.#"], handler, long_jobs=long_jobs)
    thread = _run(consumer)
    with Publisher(settings, "tester") as pub:
        pub.publish(TestClose(test="BAD", block="BORN"))
        pub.publish(TestClose(test="OK", block="BORN"))
    assert _wait(lambda: calls == ["BAD", "OK"] and _counts(settings, queue_name(settings, "svc"))[0] == 0)
    time.sleep(0.3)
    consumer.stop()
    thread.join(10)
    assert calls == ["BAD", "OK"]  # not retried
    dead = dead_letters(settings)
    assert len(dead) == 1
    rk, headers, _ = dead[0]
    assert rk == "test.close.BAD.BORN" and headers["x-vison-reason"] == "frames of BAD are unreadable"
    assert headers["x-vison-error"] == "data" and headers["x-vison-routing-key"] == rk


@pytest.mark.parametrize("long_jobs", [False, True])
def test_retry_keeps_message_without_redelivery_and_reports_once(settings, long_jobs, caplog):
    """Retry: the handler is called again in place (delivery count stays 0: attempt 1 every time),
    logged once when blocked and once when cleared; the gauge is 1 meanwhile, 0 after."""
    service = f"blocky{int(long_jobs)}"
    disk_full = {"left": 4}
    seen = []
    gauge_while_blocked = []

    def handler(ev, d):
        seen.append((d.attempt, d.redelivered))
        if disk_full["left"] > 0:
            disk_full["left"] -= 1
            gauge_while_blocked.append(_gauge("vison_service_blocked", service=service, reason="disk full"))
            raise Retry("disk full", "[Errno 28] No space left on device: products/BORN")

    consumer = Consumer(settings, service, ["test.close.#"], handler, long_jobs=long_jobs, heartbeat=2,
                        retry_initial=0.5, retry_max=2.0)
    thread = _run(consumer)
    with caplog.at_level("INFO", logger="vison.bus"):
        with Publisher(settings, "tester") as pub:
            pub.publish(TestClose(test="BIAS01", block="BORN"))
        assert _wait(lambda: len(seen) == 5, timeout=30)
        assert _wait(lambda: _counts(settings, queue_name(settings, service))[0] == 0)
        time.sleep(0.3)
    consumer.stop()
    thread.join(10)
    assert seen == [(1, False)] * 5  # never nacked nor redelivered
    assert gauge_while_blocked[1:] == [1.0, 1.0, 1.0]
    assert _gauge("vison_service_blocked", service=service, reason="disk full") == 0.0
    blocked = [r for r in caplog.records if "blocked (disk full)" in r.getMessage() and "unblocked" not in r.getMessage()]
    cleared = [r for r in caplog.records if "unblocked (disk full)" in r.getMessage()]
    assert len(blocked) == 1 and "No space left on device" in blocked[0].getMessage()
    assert len(cleared) == 1
    assert consumer.connections == 1
    assert dead_letters(settings) == []


def test_returned_message_is_republished_after_redeclaring(settings):
    """A routed kind whose queue vanished: the publisher is told (mandatory), counts it,
    re-declares the topology and publishes again; nothing is lost."""
    with Publisher(settings, "scriptgen") as pub:
        # scriptgen feeds the validator and the analyzer (campaign.defined): declared on connect
        pub.publish(TestClose(test="ONE", block="BORN"))
        conn = pika.BlockingConnection(connection_parameters(settings.amqp_url))
        try:
            ch = conn.channel()
            for svc in ("validator", "analyzer"):
                ch.queue_delete(queue_name(settings, svc))
        finally:
            conn.close()
        before = _gauge("vison_events_unroutable_total", service="scriptgen", kind="test.close") or 0.0
        pub.publish(TestClose(test="TWO", block="BORN"))
        after = _gauge("vison_events_unroutable_total", service="scriptgen", kind="test.close") or 0.0
    assert after == before + 1
    # TWO, re-declared and routed (quorum-queue counts are updated asynchronously: wait for them)
    assert _wait(lambda: _counts(settings, queue_name(settings, "validator")) == (1, 0))
    assert _wait(lambda: _counts(settings, queue_name(settings, "analyzer")) == (1, 0))


def test_publisher_declares_the_queues_it_feeds_before_publishing(settings):
    """ingest publishes exposure.ingested before any validator ran: the validator queue holds it."""
    from shared.events import ExposureIngested

    fields = ExposureIngested.model_json_schema()["required"]
    assert "obsid" in fields
    with Publisher(settings, "ingest") as pub:
        pub.tick()
        pub._ensure()  # connect: declares the queues ingest feeds
    assert _counts(settings, queue_name(settings, "validator")) == (0, 0)
    conn = pika.BlockingConnection(connection_parameters(settings.amqp_url))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            conn.channel().queue_declare(queue_name(settings, "catalogue"), passive=True)  # not fed by ingest
    finally:
        if conn.is_open:
            conn.close()


def test_declare_queue_is_the_one_declaration(settings):
    conn = pika.BlockingConnection(connection_parameters(settings.amqp_url))
    try:
        ch = conn.channel()
        name = declare_queue(ch, settings, f"{settings.queue_prefix}.x", ["a.#"])
        declare_queue(ch, settings, name, ["a.#"])  # idempotent
        ok = ch.queue_declare(name, passive=True)
        assert ok.method.queue == name
    finally:
        conn.close()
