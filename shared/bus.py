"""The vison message bus on RabbitMQ (pika ``BlockingConnection``).

Topology (declared by every client, idempotently):

- one durable **topic exchange** ``settings.exchange`` carrying every event, routing keys
  ``<kind>.<verb>[.<test>[.<block>]]``;
- one durable **quorum queue** per service ``<queue_prefix>.<service>`` bound with the service's
  patterns, ``x-dead-letter-exchange = <exchange>.dlx`` and ``x-delivery-limit`` (a backstop
  against messages that crash the process itself, see below);
- a **dead-letter** fanout exchange ``<exchange>.dlx`` and its durable queue
  ``<queue_prefix>.dead`` holding the original message body, its original headers and
  ``x-vison-reason`` / ``x-vison-error`` / ``x-vison-service`` / ``x-vison-queue`` /
  ``x-vison-routing-key`` / ``x-vison-attempts`` / ``x-vison-dead-at`` headers.

Delivery guarantees:

- messages are persistent (delivery mode 2) and published with **publisher confirms**
  (``publish`` returns only once the broker has the message);
- consumers ack **after** the handler returned (the handler writes and publishes its outputs
  first), so a crash redelivers; consumers are **idempotent** through a SQLite store of seen
  ``event_id`` in the state dir (a redelivered event already handled is acked and skipped);
- **poison messages**: malformed JSON or a schema error go straight to the dead-letter queue
  (with a ``processing.failed`` event); a handler exception is retried (nack + requeue) and
  dead-lettered once it has failed ``settings.max_redeliveries`` times. The attempt count is the
  quorum queue's ``x-delivery-count`` header (RabbitMQ >= 3.8), which also counts deliveries
  interrupted by a crash; the queue's own ``x-delivery-limit`` (``max_redeliveries + 10``) makes
  the broker dead-letter (``x-first-death-reason: delivery_limit``) a message that keeps killing
  its consumer before the handler can report;
- **reconnect** with exponential backoff (0.5 s doubling to 30 s) on connection loss (broker
  restart); **SIGTERM / SIGINT** finish the current message, then close cleanly (unacked
  prefetched messages return to the queue).
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import pika
import pika.exceptions as pex

from shared.config import Settings, get_settings
from shared.statedb import open_state_db
from shared.events import Event, EventError, ProcessingFailed, event_body, kind_of, parse_event
from shared.metrics import (
    DEAD_LETTERED,
    EVENTS_CONSUMED,
    EVENTS_FAILED,
    EVENTS_PUBLISHED,
    PROCESSING_SECONDS,
    QUEUE_DEPTH,
)

log = logging.getLogger("vison.bus")
logging.getLogger("pika").setLevel(logging.WARNING)  # pika logs every frame at INFO

#: Errors meaning "the connection or channel is gone": reconnect and retry.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pex.AMQPConnectionError,
    pex.ConnectionClosed,
    pex.StreamLostError,
    pex.ChannelClosed,
    pex.ChannelWrongStateError,
    pex.ConnectionWrongStateError,
    ConnectionError,
    OSError,
)
DELIVERY_LIMIT_MARGIN = 10


def queue_name(settings: Settings, service: str) -> str:
    """Durable queue of a service: ``<queue_prefix>.<service>``."""
    return f"{settings.queue_prefix}.{service}"


def dead_letter_exchange(settings: Settings) -> str:
    return f"{settings.exchange}.dlx"


def dead_queue_name(settings: Settings) -> str:
    """The dead-letter queue: ``<queue_prefix>.dead``."""
    return f"{settings.queue_prefix}.dead"


def connection_parameters(url: str, heartbeat: int = 60) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = 120
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.client_properties = {"connection_name": "vison"}
    return params


def declare_topology(channel, settings: Settings) -> None:
    """The event exchange, the dead-letter exchange and the dead-letter queue."""
    channel.exchange_declare(settings.exchange, "topic", durable=True)
    channel.exchange_declare(dead_letter_exchange(settings), "fanout", durable=True)
    channel.queue_declare(dead_queue_name(settings), durable=True)
    channel.queue_bind(dead_queue_name(settings), dead_letter_exchange(settings))


def declare_service_queue(channel, settings: Settings, service: str, bindings: Iterable[str]) -> str:
    """Declare ``<queue_prefix>.<service>`` (quorum, dead-lettered) and bind its patterns."""
    declare_topology(channel, settings)
    name = queue_name(settings, service)
    channel.queue_declare(
        name,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": dead_letter_exchange(settings),
            "x-delivery-limit": int(settings.max_redeliveries) + DELIVERY_LIMIT_MARGIN,
        },
    )
    for pattern in bindings:
        channel.queue_bind(name, settings.exchange, routing_key=pattern)
    return name


def ensure_queue(settings: Settings, service: str, bindings: Iterable[str]) -> str:
    """Declare a service queue now (so that events published before it starts are kept)."""
    conn = pika.BlockingConnection(connection_parameters(settings.amqp_url))
    try:
        return declare_service_queue(conn.channel(), settings, service, list(bindings))
    finally:
        conn.close()


class Backoff:
    """Exponential backoff with jitter: 0.5 s, 1 s, 2 s ... up to ``maximum``."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0):
        self.initial, self.maximum = initial, maximum
        self.reset()

    def reset(self) -> None:
        self.current = self.initial

    def next(self) -> float:
        delay = self.current * (0.8 + 0.4 * random.random())
        self.current = min(self.current * 2, self.maximum)
        return delay


def _headers_now() -> str:
    return datetime.now(timezone.utc).isoformat()


class _Channel:
    """A confirm-mode channel publishing events, raw bodies and dead letters."""

    def __init__(self, connection, settings: Settings, service: str):
        self.settings, self.service = settings, service
        self.channel = connection.channel()
        self.channel.confirm_delivery()
        declare_topology(self.channel, settings)

    def publish_raw(self, body: bytes, routing_key: str, headers: dict | None = None, exchange: str | None = None,
                    message_id: str | None = None) -> None:
        props = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            headers=headers or None,
            message_id=message_id,
            timestamp=int(time.time()),
            app_id=self.service,
        )
        self.channel.basic_publish(exchange=self.settings.exchange if exchange is None else exchange,
                                   routing_key=routing_key, body=body, properties=props)

    def publish(self, event: Event, routing_key: str | None = None, headers: dict | None = None) -> str:
        if not event.producer or event.producer == "vison":
            event.producer = self.service
        key = routing_key or event.routing_key()
        self.publish_raw(event_body(event), key, headers, message_id=str(event.event_id))
        EVENTS_PUBLISHED.labels(service=self.service, kind=event.kind).inc()
        log.debug("published %s %s", key, event.event_id)
        return key

    def dead_letter(self, body: bytes, routing_key: str, headers: dict | None, reason: str, *, queue: str = "",
                    error: str = "", attempts: int = 0) -> None:
        out = dict(headers or {})
        out.update({
            "x-vison-reason": reason[:2000],
            "x-vison-error": error,
            "x-vison-service": self.service,
            "x-vison-queue": queue,
            "x-vison-routing-key": routing_key,
            "x-vison-attempts": attempts,
            "x-vison-dead-at": _headers_now(),
        })
        self.publish_raw(body, routing_key, out, exchange=dead_letter_exchange(self.settings))
        DEAD_LETTERED.labels(service=self.service).inc()
        log.warning("dead-lettered %s from %s: %s", routing_key, queue or "-", reason)


class Publisher:
    """Publishes events with confirms; reconnects with backoff when the broker goes away.

    Not thread-safe: one per thread. Call :meth:`tick` now and then when idle (heartbeats)."""

    def __init__(self, settings: Settings | None = None, service: str = "vison", stop: threading.Event | None = None,
                 max_retry_seconds: float | None = None):
        self.settings = settings or get_settings()
        self.service = service
        self.stop_event = stop or threading.Event()
        self.max_retry_seconds = max_retry_seconds
        self._conn = None
        self._chan: _Channel | None = None

    def _ensure(self) -> _Channel:
        if self._conn is None or self._conn.is_closed or self._chan is None or self._chan.channel.is_closed:
            self._drop()
            self._conn = pika.BlockingConnection(connection_parameters(self.settings.amqp_url))
            self._chan = _Channel(self._conn, self.settings, self.service)
        return self._chan

    def _drop(self) -> None:
        conn, self._conn, self._chan = self._conn, None, None
        if conn is not None:
            try:
                if conn.is_open:
                    conn.close()
            except Exception:
                pass

    def _retrying(self, action: Callable[[_Channel], Any]) -> Any:
        backoff = Backoff()
        start = time.monotonic()
        while True:
            try:
                return action(self._ensure())
            except (pex.UnroutableError, pex.NackError):
                raise
            except CONNECTION_ERRORS as exc:
                self._drop()
                if self.max_retry_seconds is not None and time.monotonic() - start > self.max_retry_seconds:
                    raise
                delay = backoff.next()
                log.warning("broker unavailable (%s); retrying in %.1f s", exc.__class__.__name__, delay)
                if self.stop_event.wait(delay):
                    raise
                continue

    def publish(self, event: Event, routing_key: str | None = None, headers: dict | None = None) -> str:
        """Publish and wait for the broker's confirm; returns the routing key."""
        return self._retrying(lambda ch: ch.publish(event, routing_key, headers))

    def publish_raw(self, body: bytes, routing_key: str, headers: dict | None = None, exchange: str | None = None) -> None:
        """Publish any body (tests: malformed messages)."""
        self._retrying(lambda ch: ch.publish_raw(body, routing_key, headers, exchange))

    def tick(self) -> None:
        """Service heartbeats of an idle connection (cheap; never raises)."""
        if self._conn is not None and self._conn.is_open:
            try:
                self._conn.process_data_events(0)
            except Exception:
                self._drop()

    def close(self) -> None:
        self._drop()

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SeenStore:
    """Event ids already handled by a service (SQLite in the state dir): idempotent consumers."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._db = open_state_db(
            self.path, "CREATE TABLE IF NOT EXISTS seen (event_id TEXT PRIMARY KEY, kind TEXT, seen_at REAL);", "NORMAL"
        )
        self._lock = threading.Lock()

    def __contains__(self, event_id: object) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM seen WHERE event_id = ?", (str(event_id),)).fetchone()
        return row is not None

    def add(self, event_id: object, kind: str = "") -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?, ?)", (str(event_id), kind, time.time()))
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM seen").fetchone()[0]

    def close(self) -> None:
        self._db.close()


class Reject(Exception):
    """Raised by a handler for a message that can never succeed: dead-letter it now (no retry)."""


@dataclass
class Delivery:
    """What a handler gets beside the event: routing key, headers, attempt, and a way to publish."""

    routing_key: str
    headers: dict[str, Any]
    redelivered: bool
    attempt: int  # 1 for the first delivery
    body: bytes
    queue: str
    consumer: "Consumer" = field(repr=False)

    def publish(self, event: Event, routing_key: str | None = None) -> str:
        """Publish an output on the consumer's connection (confirmed before returning)."""
        return self.consumer.publish(event, routing_key)


Handler = Callable[[Any, Delivery], None]


class Consumer:
    """Consume a service queue: parse each message, call ``handler(event, delivery)``, then ack.

    ``parse=False`` hands the raw ``dict`` instead of the typed event. Runs until :meth:`stop`
    (SIGTERM / SIGINT when ``run(install_signals=True)`` in the main thread)."""

    def __init__(
        self,
        settings: Settings | None,
        service: str,
        bindings: Iterable[str],
        handler: Handler,
        *,
        parse: bool = True,
        idempotent: bool = True,
        prefetch: int | None = None,
        heartbeat: int = 60,
        tick: Callable[["Consumer"], None] | None = None,
        tick_interval: float = 1.0,
        depth_interval: float = 5.0,
    ):
        self.settings = settings or get_settings()
        self.service = service
        self.bindings = list(bindings)
        self.handler = handler
        self.parse = parse
        self.prefetch = prefetch or self.settings.prefetch
        self.heartbeat = heartbeat
        self.tick = tick
        self.tick_interval = tick_interval
        self.depth_interval = depth_interval
        self.queue = queue_name(self.settings, service)
        self.seen = SeenStore(Path(self.settings.state_dir) / f"{service}-seen.sqlite") if idempotent else None
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._conn = None
        self._chan = None
        self._pub: _Channel | None = None
        self._last_tick = 0.0
        self._last_depth = 0.0
        self.handled = 0
        self.connections = 0

    # -- control
    def stop(self, *_: Any) -> None:
        """Ask the consumer to finish the current message and close (signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def publish(self, event: Event, routing_key: str | None = None) -> str:
        if self._pub is None:
            raise pex.ConnectionWrongStateError("consumer not connected")
        return self._pub.publish(event, routing_key)

    def report_failure(self, what: str, where: str, why: str, **extra: Any) -> None:
        """Publish a ``processing.failed`` event (best effort: never raises on bad input)."""
        try:
            self.publish(ProcessingFailed(what=what, where=where, why=why, service=self.service, producer=self.service, **extra))
        except CONNECTION_ERRORS:
            raise
        except Exception:  # pragma: no cover
            log.exception("could not publish processing.failed")

    # -- loop
    def run(self, install_signals: bool = True) -> None:
        if install_signals and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        backoff = Backoff()
        while not self._stop.is_set():
            try:
                self._connect()
                backoff.reset()
                while not self._stop.is_set():
                    self._conn.process_data_events(time_limit=0.25)
                    self._periodic()
                self._close_clean()
            except CONNECTION_ERRORS as exc:
                self.ready.clear()
                self._drop()
                if self._stop.is_set():
                    break
                delay = backoff.next()
                log.warning("%s: connection lost (%s: %s); reconnecting in %.1f s", self.service,
                            exc.__class__.__name__, exc, delay)
                self._stop.wait(delay)
            except Exception:  # infrastructure trouble (state store, broker nack): never die on it
                self.ready.clear()
                self._drop()
                if self._stop.is_set():
                    break
                delay = backoff.next()
                log.exception("%s: unexpected error; unacknowledged messages return to the queue; "
                              "reconnecting in %.1f s", self.service, delay)
                self._stop.wait(delay)
        self._drop()
        if self.seen is not None:
            self.seen.close()
        log.info("%s: consumer stopped", self.service)

    def _connect(self) -> None:
        self._conn = pika.BlockingConnection(connection_parameters(self.settings.amqp_url, self.heartbeat))
        self._pub = _Channel(self._conn, self.settings, self.service)
        self._chan = self._conn.channel()
        declare_service_queue(self._chan, self.settings, self.service, self.bindings)
        self._chan.basic_qos(prefetch_count=self.prefetch)
        self._chan.basic_consume(self.queue, self._on_message, auto_ack=False)
        self.connections += 1
        self.ready.set()
        log.info("%s: consuming %s (bindings %s)", self.service, self.queue, ", ".join(self.bindings))

    def _close_clean(self) -> None:
        self.ready.clear()
        try:
            if self._chan is not None and self._chan.is_open:
                self._chan.close()
            if self._conn is not None and self._conn.is_open:
                self._conn.close()
        except Exception:
            pass
        self._conn = self._chan = self._pub = None

    def _drop(self) -> None:
        conn, self._conn, self._chan, self._pub = self._conn, None, None, None
        if conn is not None:
            try:
                if conn.is_open:
                    conn.close()
            except Exception:
                pass

    def _periodic(self) -> None:
        now = time.monotonic()
        if now - self._last_depth >= self.depth_interval:
            self._last_depth = now
            for name in (self.queue, dead_queue_name(self.settings)):
                ok = self._chan.queue_declare(name, passive=True)
                QUEUE_DEPTH.labels(queue=name).set(ok.method.message_count)
        if self.tick is not None and now - self._last_tick >= self.tick_interval:
            self._last_tick = now
            self.tick(self)

    def _on_message(self, channel, method, props, body: bytes) -> None:
        if self._stop.is_set():
            return  # left unacked: returned to the queue when the channel closes
        headers = dict(props.headers or {})
        rk = method.routing_key
        attempt = int(headers.get("x-delivery-count", 0) or 0) + 1
        kind = kind_of(rk)
        t0 = time.perf_counter()
        try:
            event: Any = parse_event(body, rk)
        except EventError as exc:
            EVENTS_FAILED.labels(service=self.service, kind=kind).inc()
            self._dead(body, rk, headers, f"{exc.kind}: {exc.reason}", error=exc.kind, attempts=attempt)
            self.report_failure("message", f"{self.queue} ({rk})", f"{exc.kind}: {exc.reason}")
            channel.basic_ack(method.delivery_tag)
            return
        event_id = str(event.event_id)
        if self.seen is not None and event_id in self.seen:
            log.info("%s: duplicate %s %s acknowledged without processing", self.service, rk, event_id)
            channel.basic_ack(method.delivery_tag)
            return
        delivery = Delivery(rk, headers, bool(method.redelivered), attempt, body, self.queue, self)
        payload = event if self.parse else event.model_dump(mode="json")
        try:
            self.handler(payload, delivery)
        except CONNECTION_ERRORS:
            raise
        except Reject as exc:
            EVENTS_FAILED.labels(service=self.service, kind=kind).inc()
            self._dead(body, rk, headers, f"rejected: {exc}", error="rejected", attempts=attempt)
            self.report_failure("message", f"{self.queue} ({rk})", f"rejected: {exc}", **_ids(event))
            channel.basic_ack(method.delivery_tag)
            return
        except Exception as exc:
            EVENTS_FAILED.labels(service=self.service, kind=kind).inc()
            why = f"{exc.__class__.__name__}: {exc}"
            if attempt >= self.settings.max_redeliveries:
                log.exception("%s: handler failed on %s (attempt %d, giving up)", self.service, rk, attempt)
                self._dead(body, rk, headers, f"handler failed {attempt} times: {why}", error="handler", attempts=attempt)
                self.report_failure("message", f"{self.queue} ({rk})", f"handler failed {attempt} times: {why}", **_ids(event))
                channel.basic_ack(method.delivery_tag)
            else:
                log.warning("%s: handler failed on %s (attempt %d of %d): %s; requeued", self.service, rk, attempt,
                            self.settings.max_redeliveries, why)
                time.sleep(min(0.2 * attempt, 2.0))
                channel.basic_nack(method.delivery_tag, requeue=True)
            return
        if self.seen is not None:
            self.seen.add(event_id, kind)
        channel.basic_ack(method.delivery_tag)
        self.handled += 1
        EVENTS_CONSUMED.labels(service=self.service, kind=kind).inc()
        PROCESSING_SECONDS.labels(service=self.service, step="handle").observe(time.perf_counter() - t0)

    def _dead(self, body: bytes, rk: str, headers: dict, reason: str, *, error: str, attempts: int) -> None:
        self._pub.dead_letter(body, rk, headers, reason, queue=self.queue, error=error, attempts=attempts)


def _ids(event: Any) -> dict[str, Any]:
    out = {}
    for key in ("obsid", "test", "block"):
        value = getattr(event, key, None)
        if value is not None:
            out[key] = value
    return out


class Subscription:
    """Follow events matching patterns (``results tail``, tests): an exclusive auto-delete queue,
    or a named durable one (``queue=``) that survives broker restarts."""

    def __init__(self, settings: Settings | None, patterns: Iterable[str], queue: str | None = None):
        self.settings = settings or get_settings()
        self.patterns = list(patterns)
        self.durable_name = queue
        self._conn = None
        self._chan = None
        self.queue = ""
        self._connect()

    def _connect(self) -> None:
        self._conn = pika.BlockingConnection(connection_parameters(self.settings.amqp_url))
        self._chan = self._conn.channel()
        declare_topology(self._chan, self.settings)
        if self.durable_name:
            self._chan.queue_declare(self.durable_name, durable=True)
            self.queue = self.durable_name
        else:
            self.queue = self._chan.queue_declare("", exclusive=True, auto_delete=True).method.queue
        for pattern in self.patterns:
            self._chan.queue_bind(self.queue, self.settings.exchange, routing_key=pattern)

    def messages(self, timeout: float | None = None, reconnect: bool = False) -> Iterator[tuple[str, dict, bytes]]:
        """Yield ``(routing_key, headers, body)``; stops after ``timeout`` s without a message."""
        while True:
            try:
                for method, props, body in self._chan.consume(self.queue, auto_ack=True, inactivity_timeout=timeout):
                    if method is None:
                        return
                    yield method.routing_key, dict(props.headers or {}), body
                return
            except CONNECTION_ERRORS:
                if not reconnect or not self.durable_name:
                    raise
                self._drop()
                while True:
                    time.sleep(1.0)
                    try:
                        self._connect()
                        break
                    except CONNECTION_ERRORS:
                        continue

    def events(self, timeout: float | None = None, reconnect: bool = False) -> Iterator[Event]:
        """Yield typed events (malformed messages are skipped with a warning)."""
        for rk, _, body in self.messages(timeout, reconnect):
            try:
                yield parse_event(body, rk)
            except EventError as exc:
                log.warning("skipping %s: %s", rk, exc)

    def _drop(self) -> None:
        try:
            if self._conn is not None and self._conn.is_open:
                self._conn.close()
        except Exception:
            pass
        self._conn = self._chan = None

    def close(self) -> None:
        try:
            if self._chan is not None and self._chan.is_open:
                self._chan.cancel()
        except Exception:
            pass
        self._drop()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def dead_letters(settings: Settings | None = None, limit: int = 1000) -> list[tuple[str, dict, bytes]]:
    """Drain (and return) the messages of the dead-letter queue: ``(routing_key, headers, body)``."""
    settings = settings or get_settings()
    conn = pika.BlockingConnection(connection_parameters(settings.amqp_url))
    out = []
    try:
        ch = conn.channel()
        declare_topology(ch, settings)
        for _ in range(limit):
            method, props, body = ch.basic_get(dead_queue_name(settings), auto_ack=True)
            if method is None:
                break
            headers = dict(props.headers or {})
            out.append((headers.get("x-vison-routing-key") or method.routing_key, headers, body))
    finally:
        conn.close()
    return out


__all__ = [
    "Backoff",
    "CONNECTION_ERRORS",
    "Consumer",
    "Delivery",
    "Publisher",
    "Reject",
    "SeenStore",
    "Subscription",
    "connection_parameters",
    "dead_letter_exchange",
    "dead_letters",
    "dead_queue_name",
    "declare_service_queue",
    "declare_topology",
    "ensure_queue",
    "queue_name",
]
