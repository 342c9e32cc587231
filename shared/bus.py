"""The vison message bus on RabbitMQ (pika ``BlockingConnection``): one AMQP layer for every service.

Topology and names (:mod:`shared.topology`, ``P = VISON_QUEUE_PREFIX``, ``X = VISON_EXCHANGE``):

- durable **topic exchange** ``X`` carrying every event, routing keys
  ``<kind>.<verb>[.<test>[.<block>]]``;
- one durable **quorum queue** per consuming service ``P.<service>`` bound with the service's
  patterns, internal work queues ``P.analyzer.jobs`` / ``P.analyzer.done`` (no bindings, fed
  through the default exchange), all with ``x-dead-letter-exchange = P.dlx`` and
  ``x-delivery-limit = max_redeliveries + 10``: :func:`declare_queue` is the one declaration;
- **dead letters**: fanout exchange ``P.dlx`` and its durable queue ``P.dead``. Every dead letter
  (malformed message, :class:`Reject`, :meth:`Delivery.dead_letter`, handler failed
  ``max_redeliveries`` times) keeps the original body and headers and gets ``x-vison-reason``,
  ``x-vison-error``, ``x-vison-service``, ``x-vison-queue``, ``x-vison-routing-key``,
  ``x-vison-attempts``, ``x-vison-dead-at``.

API (what a service codes against):

- ``Publisher(settings, service, stop=None, max_retry_seconds=None)``: ``publish(event)`` to the
  exchange; ``send(queue, body, *, message_id, headers=None)`` to a named queue through the
  default exchange (``body``: bytes or a pydantic model, sent as its JSON). Persistent, publisher
  confirms (returns once the broker has it), reconnects with backoff. ``connect()`` at start-up
  declares the queues the service feeds (False when the broker is away). Not thread-safe: one
  per thread; call ``tick()`` when idle.
- ``Consumer(settings, service, bindings, handler, *, long_jobs=False, queue=None, model=None,
  parse=True, idempotent=True, prefetch=None, heartbeat=60, tick=None, ...)``; ``run()`` until
  ``stop()`` / SIGTERM. ``handler(payload, delivery)``; the message is acked after the handler
  returns. ``queue=`` consumes that named queue (``P.analyzer.jobs``) instead of ``P.<service>``;
  ``bindings`` may be empty. ``model=`` a pydantic class: the body is validated into it instead of
  an event (``model=bytes``: the raw body); idempotency then uses the AMQP ``message_id``.
  ``long_jobs=True``: the handler runs on a worker thread (one message at a time, prefetch 1 by
  default) while the connection thread keeps serving heartbeats; ack / nack / publishes go back to
  the connection thread (``add_callback_threadsafe``), so a 10-minute handler keeps its
  connection. On SIGTERM the current handler finishes, then the consumer closes.
- ``Delivery`` (the handler's second argument): ``routing_key``, ``headers``, ``attempt`` (1 for
  the first delivery), ``message_id``, ``body``, ``queue``; ``publish(event)``,
  ``send(queue, body, *, message_id, headers=None)`` (both confirmed before returning, from the
  handler's thread in either mode, or any thread in the long-jobs mode; in the default mode a
  call from another thread while the handler runs raises ``RuntimeError`` instead of
  deadlocking) and
  ``dead_letter(reason, *, error="handler", report=True)`` (dead-letter this message now with the
  standard headers and a ``processing.failed``; it is acked when the handler returns).
- a handler raises :class:`Reject` for a message that can never succeed (dead-lettered now);
  :class:`Retry` for a transient condition of the service (disk full, permission denied on an
  output folder): the message is neither acked nor nacked (its delivery count does not grow) and
  the handler is called again after 0.5 s, 1 s, ... 30 s while heartbeats go on; logged once when
  it starts and once when it clears, ``vison_service_blocked{service,reason}`` is 1 meanwhile.
  Any other exception: nack + requeue, dead-lettered at the ``max_redeliveries``-th attempt.
  (A message held unacknowledged longer than the broker's ``consumer_timeout``, 30 min by
  default, 4 h in deploy/rabbitmq/rabbitmq.conf, is taken back by the broker and redelivered.)
- :func:`declare_queue`, :func:`declare_topology`, :func:`shared.topology.declare_all`.
- :class:`BrokerConfigError` (a ``SystemExit`` with status 78, ``EX_CONFIG``): the broker refused
  a declaration (``PRECONDITION_FAILED`` inequivalent arguments) or an operation
  (``ACCESS_REFUSED``); the message names the queue, the argument and the way out. It is not
  retried: a service exits 78 and ``vison stack up`` does not restart it.

Delivery guarantees:

- messages are persistent and published with **publisher confirms**; before publishing an event,
  the queues of the topology that receive it are declared (once per connection; the queues a
  service feeds are declared on connect), and such events are published with ``mandatory``: a
  returned (unroutable) message is logged, counted (``vison_events_unroutable_total``) and
  published again after the topology is re-declared, never dropped. Events no service consumes
  (``hk.samples``, ``processing.failed``, ``test.checked``: for dashboards and subscribers) are
  published without ``mandatory``;
- consumers ack **after** the handler returned, so a crash redelivers; consumers are
  **idempotent** through a SQLite store of seen ids in the state dir;
- **poison messages**: malformed JSON or a schema error go straight to the dead-letter queue
  (with a ``processing.failed`` event); a handler exception is retried (nack + requeue) and
  dead-lettered once it has failed ``settings.max_redeliveries`` times (the quorum queue's
  ``x-delivery-count``; the queue's own ``x-delivery-limit`` makes the broker dead-letter a
  message that keeps killing its consumer);
- **reconnect** with exponential backoff (0.5 s doubling to 30 s) on connection loss; SIGTERM /
  SIGINT finish the current message, then close cleanly;
- ``amqps://`` URLs use TLS with ``VISON_AMQP_CA_FILE`` / ``VISON_AMQP_CERT_FILE`` /
  ``VISON_AMQP_KEY_FILE``; URLs are logged with the password masked (:func:`mask_url`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import queue as queue_mod
import re
import signal
import ssl
import threading
import time
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions as pex
from pydantic import BaseModel, ValidationError

from shared.config import Settings, get_settings
from shared.statedb import open_state_db
from shared.events import Event, EventError, ProcessingFailed, event_body, kind_of, parse_event
from shared.metrics import (
    DEAD_LETTERED,
    EVENTS_CONSUMED,
    EVENTS_FAILED,
    EVENTS_PUBLISHED,
    EVENTS_UNROUTABLE,
    PROCESSING_SECONDS,
    QUEUE_DEPTH,
    SERVICE_BLOCKED,
)
from shared.topology import (
    all_queues,
    consumers_of,
    dead_letter_exchange,
    dead_queue_name,
    fed_services,
    queue_name,
    service as service_topology,
    work_queue_name,
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
EX_CONFIG = 78  # sysexits.h: configuration error


# --------------------------------------------------------------------------- errors


class BrokerConfigError(SystemExit):
    """The broker refused a declaration or an operation: a configuration error, not retried.

    A ``SystemExit`` with status 78 (EX_CONFIG): uncaught, the process exits 78 (``vison stack
    up`` does not restart it); ``except Exception`` does not swallow it. ``str()`` is the message."""

    def __init__(self, message: str):
        super().__init__(EX_CONFIG)
        self.message = message
        self.code = EX_CONFIG

    def __str__(self) -> str:
        return self.message


class Reject(Exception):
    """Raised by a handler for a message that can never succeed: dead-letter it now (no retry)."""


class Retry(Exception):
    """Raised by a handler for a transient condition of the service itself (disk full, permission
    denied on an output folder): keep the message (no ack, no nack), call the handler again after
    a backoff (0.5 s doubling to 30 s). ``reason``: a short label (``disk full``), the gauge's
    ``reason``; ``detail``: the full text, logged once."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail or reason


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for logs and messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def _refusal(exc: BaseException, what: str, name: str, settings: Settings) -> BrokerConfigError | None:
    """A :class:`BrokerConfigError` for a broker refusal (406 / 403) of ``what name``, else None."""
    code = getattr(exc, "reply_code", None)
    text = str(getattr(exc, "reply_text", "") or exc)
    if code == 406:
        m = re.search(r"inequivalent arg '([^']+)'", text)
        arg = m.group(1) if m else "?"
        hint = {
            "x-dead-letter-exchange": "it was created by an earlier run with other names (before the "
                                      "prefix-derived <prefix>.dlx, or another VISON_QUEUE_PREFIX)",
            "x-delivery-limit": "it was created with another VISON_MAX_REDELIVERIES",
            "x-queue-type": "it was created as another queue type",
            "type": "it exists with another exchange type",
        }.get(arg, "it exists with other arguments")
        err = BrokerConfigError(
            f"configuration error: the broker refused to declare {what} {name!r}: argument {arg!r} differs "
            f"from the existing one ({hint}; broker says: {text}). Way out: delete the {what} "
            f"(rabbitmqctl delete_{'queue' if what == 'queue' else 'exchange'} {name} -p <vhost>, once it is "
            f"drained) or change VISON_QUEUE_PREFIX (and VISON_EXCHANGE) to start a fresh topology.")
    elif code == 403:
        err = BrokerConfigError(
            f"configuration error: the broker refused access to {what} {name!r} for the user of "
            f"{mask_url(settings.amqp_url)} ({text}). Way out: grant that user the permission (deploy/rabbitmq "
            f"setup_broker.py gives each service its own queues and routing keys) or use the right user / "
            f"VISON_QUEUE_PREFIX / VISON_EXCHANGE.")
    else:
        return None
    log.critical("%s", err.message)
    return err


# --------------------------------------------------------------------------- connections


def ssl_options(settings: Settings, host: str) -> pika.SSLOptions:
    """TLS for an ``amqps://`` URL: CA bundle ``VISON_AMQP_CA_FILE`` (system CAs when unset),
    client certificate ``VISON_AMQP_CERT_FILE`` + key ``VISON_AMQP_KEY_FILE`` (optional)."""
    ca = getattr(settings, "amqp_ca_file", None)
    cert = getattr(settings, "amqp_cert_file", None)
    key = getattr(settings, "amqp_key_file", None)
    for var, value in (("VISON_AMQP_CA_FILE", ca), ("VISON_AMQP_CERT_FILE", cert), ("VISON_AMQP_KEY_FILE", key)):
        if value and not Path(value).is_file():
            raise BrokerConfigError(f"configuration error: {var}={value} is not a readable file")
    if key and not cert:
        raise BrokerConfigError("configuration error: VISON_AMQP_KEY_FILE is set without VISON_AMQP_CERT_FILE")
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        if cert:
            context.load_cert_chain(str(cert), str(key) if key else None)
    except (ssl.SSLError, OSError) as exc:
        raise BrokerConfigError(f"configuration error: TLS files (VISON_AMQP_CA_FILE / _CERT_FILE / _KEY_FILE) "
                                f"unusable: {exc}") from None
    return pika.SSLOptions(context, server_hostname=host)


def connection_parameters(url: str, heartbeat: int = 60, settings: Settings | None = None) -> pika.URLParameters:
    """pika parameters for ``url`` (``amqps://``: TLS files from ``settings``, default the environment)."""
    params = pika.URLParameters(url)
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = 120
    params.connection_attempts = 1
    params.socket_timeout = 5
    params.client_properties = {"connection_name": "vison"}
    if url.lower().startswith("amqps://"):
        params.ssl_options = ssl_options(settings or get_settings(), params.host)
    return params


def broker_connection(settings: Settings, heartbeat: int = 60) -> pika.BlockingConnection:
    """A blocking connection to ``settings.amqp_url``."""
    return pika.BlockingConnection(connection_parameters(settings.amqp_url, heartbeat, settings))


# --------------------------------------------------------------------------- declarations


def declare_topology(channel, settings: Settings) -> None:
    """The event exchange, the dead-letter exchange ``<prefix>.dlx`` and queue ``<prefix>.dead``."""
    for name, kind in ((settings.exchange, "topic"), (dead_letter_exchange(settings), "fanout")):
        try:
            channel.exchange_declare(name, kind, durable=True)
        except pex.ChannelClosedByBroker as exc:
            raise (_refusal(exc, "exchange", name, settings) or exc) from exc
    dead = dead_queue_name(settings)
    try:
        channel.queue_declare(dead, durable=True)
        channel.queue_bind(dead, dead_letter_exchange(settings))
    except pex.ChannelClosedByBroker as exc:
        raise (_refusal(exc, "queue", dead, settings) or exc) from exc


def queue_arguments(settings: Settings) -> dict[str, Any]:
    """Arguments of every vison queue: quorum, dead-lettered to ``<prefix>.dlx``, delivery limit."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": dead_letter_exchange(settings),
        "x-delivery-limit": int(settings.max_redeliveries) + DELIVERY_LIMIT_MARGIN,
    }


def declare_queue(channel, settings: Settings, name: str, bindings: Iterable[str] = (), *, _topology: bool = True) -> str:
    """Declare the durable quorum queue ``name`` (dead-lettered, delivery limit) and bind it to the
    event exchange with ``bindings`` (idempotent). The one queue declaration of vison.

    Raises :class:`BrokerConfigError` when the broker refuses it (queue of an earlier run with
    other arguments, no permission)."""
    if _topology:
        declare_topology(channel, settings)
    try:
        channel.queue_declare(name, durable=True, arguments=queue_arguments(settings))
        for pattern in bindings:
            channel.queue_bind(name, settings.exchange, routing_key=pattern)
    except pex.ChannelClosedByBroker as exc:
        raise (_refusal(exc, "queue", name, settings) or exc) from exc
    return name


def declare_service_queue(channel, settings: Settings, service: str, bindings: Iterable[str]) -> str:
    """Declare ``<queue_prefix>.<service>`` (quorum, dead-lettered) and bind its patterns."""
    return declare_queue(channel, settings, queue_name(settings, service), list(bindings))


def ensure_queue(settings: Settings, service: str, bindings: Iterable[str]) -> str:
    """Declare a service queue now (so that events published before it starts are kept)."""
    conn = broker_connection(settings)
    try:
        return declare_service_queue(conn.channel(), settings, service, list(bindings))
    finally:
        if conn.is_open:
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


def _body_bytes(body: bytes | BaseModel) -> bytes:
    if isinstance(body, BaseModel):
        return body.model_dump_json().encode()
    if isinstance(body, (bytes, bytearray, memoryview)):
        return bytes(body)
    raise TypeError(f"message body must be bytes or a pydantic model, not {type(body).__name__}")


class _Unroutable(Exception):
    """A mandatory message came back (no queue bound): re-declare and publish again."""


class _Channel:
    """A confirm-mode channel publishing events, messages to named queues and dead letters.

    Declares on creation the queues its service feeds (:func:`shared.topology.fed_services`) and
    the service's own work queues; before publishing an event, the queues that receive it."""

    def __init__(self, connection, settings: Settings, service: str):
        self.settings, self.service = settings, service
        self.channel = connection.channel()
        self.channel.confirm_delivery()
        declare_topology(self.channel, settings)
        self.declared: set[str] = set()
        self._table = dict(all_queues(settings))
        for s in fed_services(service):
            self.ensure(queue_name(settings, s.service), s.bindings)
        me = service_topology(service)
        for suffix in (me.work_queues if me else ()):
            self.ensure(work_queue_name(settings, suffix), ())

    def ensure(self, name: str, bindings: Iterable[str] | None = None) -> None:
        """Declare ``name`` once per channel (bindings from the topology table by default)."""
        if name in self.declared:
            return
        declare_queue(self.channel, self.settings, name, self._table.get(name, ()) if bindings is None else bindings,
                      _topology=False)
        self.declared.add(name)

    def redeclare(self) -> None:
        """Forget what was declared (after a returned message): declare again before publishing."""
        self.declared.clear()
        declare_topology(self.channel, self.settings)

    def publish_raw(self, body: bytes, routing_key: str, headers: dict | None = None, exchange: str | None = None,
                    message_id: str | None = None, mandatory: bool = False) -> None:
        exchange = self.settings.exchange if exchange is None else exchange
        props = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            headers=headers or None,
            message_id=message_id,
            timestamp=int(time.time()),
            app_id=self.service,
        )
        try:
            self.channel.basic_publish(exchange=exchange, routing_key=routing_key, body=body, properties=props,
                                       mandatory=mandatory)
        except pex.UnroutableError:
            raise _Unroutable(routing_key) from None
        except pex.ChannelClosedByBroker as exc:
            target = f"exchange {exchange or '(default)'} routing key"
            raise (_refusal(exc, target, routing_key, self.settings) or exc) from exc

    def publish(self, event: Event, routing_key: str | None = None, headers: dict | None = None) -> str:
        if not event.producer or event.producer == "vison":
            event.producer = self.service
        key = routing_key or event.routing_key()
        consumers = consumers_of(key)
        for s in consumers:
            self.ensure(queue_name(self.settings, s.service), s.bindings)
        self.publish_raw(event_body(event), key, headers, message_id=str(event.event_id), mandatory=bool(consumers))
        EVENTS_PUBLISHED.labels(service=self.service, kind=event.kind).inc()
        log.debug("published %s %s", key, event.event_id)
        return key

    def send(self, queue: str, body: bytes | BaseModel, *, message_id: str, headers: dict | None = None) -> None:
        """Publish ``body`` to the named queue (default exchange, mandatory, confirmed)."""
        self.ensure(queue)
        self.publish_raw(_body_bytes(body), queue, headers, exchange="", message_id=message_id, mandatory=True)

    def dead_letter(self, body: bytes, routing_key: str, headers: dict | None, reason: str, *, queue: str = "",
                    error: str = "", attempts: int = 0) -> None:
        out = dict(headers or {})
        out.update(dead_letter_headers(self.service, reason, queue=queue, error=error, routing_key=routing_key,
                                       attempts=attempts))
        self.publish_raw(body, routing_key, out, exchange=dead_letter_exchange(self.settings))
        DEAD_LETTERED.labels(service=self.service).inc()
        log.warning("dead-lettered %s from %s: %s", routing_key, queue or "-", reason)


def dead_letter_headers(service: str, reason: str, *, queue: str, error: str, routing_key: str,
                        attempts: int) -> dict[str, Any]:
    """The ``x-vison-*`` headers of every dead letter."""
    return {
        "x-vison-reason": reason[:2000],
        "x-vison-error": error,
        "x-vison-service": service,
        "x-vison-queue": queue,
        "x-vison-routing-key": routing_key,
        "x-vison-attempts": int(attempts),
        "x-vison-dead-at": _headers_now(),
    }


def _note_unroutable(service: str, key: str, what: str) -> None:
    kind = kind_of(key) if what == "event" else f"queue:{key}"
    EVENTS_UNROUTABLE.labels(service=service, kind=kind).inc()
    log.error("%s: %s %s returned by the broker (no queue bound); re-declaring the topology and publishing "
              "again", service, what, key)


class Publisher:
    """Publishes events (``publish``) and queue messages (``send``) with confirms; reconnects with
    backoff when the broker goes away; re-declares and re-publishes a returned message.

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
            self._conn = broker_connection(self.settings)
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

    def _retrying(self, action: Callable[[_Channel], Any], what: str = "event") -> Any:
        backoff = Backoff()
        start = time.monotonic()
        while True:
            try:
                return action(self._ensure())
            except _Unroutable as exc:
                _note_unroutable(self.service, str(exc), what)
                chan = self._chan
                delay = backoff.next()
                if self.stop_event.wait(delay):
                    raise pex.UnroutableError([]) from None
                try:
                    if chan is not None:
                        chan.redeclare()
                except CONNECTION_ERRORS:
                    self._drop()
                continue
            except pex.NackError:
                delay = backoff.next()
                log.warning("%s: the broker refused (nack) a message; publishing again in %.1f s", self.service, delay)
                if self.stop_event.wait(delay):
                    raise
                continue
            except CONNECTION_ERRORS as exc:
                self._drop()
                if self.max_retry_seconds is not None and time.monotonic() - start > self.max_retry_seconds:
                    raise
                delay = backoff.next()
                log.warning("broker unavailable (%s); retrying in %.1f s", exc.__class__.__name__, delay)
                if self.stop_event.wait(delay):
                    raise
                continue

    def connect(self) -> bool:
        """Connect now and declare the queues this service feeds (start-up). Best effort: False when
        the broker is away (publishing retries later); a refusal raises :class:`BrokerConfigError`."""
        try:
            self._ensure()
            return True
        except CONNECTION_ERRORS as exc:
            self._drop()
            log.warning("%s: broker not reachable at %s yet (%s); will retry when publishing", self.service,
                        mask_url(self.settings.amqp_url), exc.__class__.__name__)
            return False

    def publish(self, event: Event, routing_key: str | None = None, headers: dict | None = None) -> str:
        """Publish and wait for the broker's confirm; returns the routing key."""
        return self._retrying(lambda ch: ch.publish(event, routing_key, headers))

    def send(self, queue: str, body: bytes | BaseModel, *, message_id: str, headers: dict | None = None) -> None:
        """Publish ``body`` to the named queue through the default exchange (persistent, confirmed,
        ``mandatory``; the queue is declared first). Returns once the broker has it."""
        self._retrying(lambda ch: ch.send(queue, body, message_id=message_id, headers=headers), what="queue message")

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


@dataclass
class Delivery:
    """What a handler gets beside the event: routing key, headers, attempt, and a way to publish,
    send to a queue, or dead-letter this message."""

    routing_key: str
    headers: dict[str, Any]
    redelivered: bool
    attempt: int  # 1 for the first delivery
    body: bytes
    queue: str
    consumer: "Consumer" = field(repr=False)
    message_id: str | None = None
    dead_lettered: bool = False

    def publish(self, event: Event, routing_key: str | None = None) -> str:
        """Publish an output on the consumer's connection (confirmed before returning)."""
        return self.consumer.publish(event, routing_key)

    def send(self, queue: str, body: bytes | BaseModel, *, message_id: str, headers: dict | None = None) -> None:
        """Publish ``body`` to a named queue (default exchange, mandatory, confirmed before returning)."""
        self.consumer.send(queue, body, message_id=message_id, headers=headers)

    def dead_letter(self, reason: str, *, error: str = "handler", report: bool = True) -> None:
        """Send this message to the dead-letter queue now (standard ``x-vison-*`` headers) and, with
        ``report``, publish a ``processing.failed``; the message is acked when the handler returns."""
        if self.dead_lettered:
            return
        self.consumer._dead(self.body, self.routing_key, self.headers, reason, error=error, attempts=self.attempt,
                            queue=self.queue)
        self.dead_lettered = True
        if report:
            self.consumer.report_failure("message", f"{self.queue} ({self.routing_key})", reason)


Handler = Callable[[Any, Delivery], None]


@dataclass
class _Message:
    conn: Any
    channel: Any
    tag: int
    routing_key: str
    props: Any
    body: bytes
    redelivered: bool


class Consumer:
    """Consume a queue: parse each message, call ``handler(payload, delivery)``, then ack.

    ``parse=False`` hands the raw ``dict`` instead of the typed event; ``model=`` a pydantic
    class (or ``bytes``) for queue messages that are not events. ``queue=`` a named queue instead
    of ``<prefix>.<service>``. ``long_jobs=True`` runs the handler on a worker thread while this
    thread serves the connection (heartbeats). Runs until :meth:`stop` (SIGTERM / SIGINT when
    ``run(install_signals=True)`` in the main thread). See the module docstring."""

    def __init__(
        self,
        settings: Settings | None,
        service: str,
        bindings: Iterable[str],
        handler: Handler,
        *,
        long_jobs: bool = False,
        queue: str | None = None,
        model: type | None = None,
        parse: bool = True,
        idempotent: bool = True,
        prefetch: int | None = None,
        heartbeat: int = 60,
        tick: Callable[["Consumer"], None] | None = None,
        tick_interval: float = 1.0,
        depth_interval: float = 5.0,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
    ):
        self.settings = settings or get_settings()
        self.service = service
        self.bindings = list(bindings)
        self.handler = handler
        self.long_jobs = long_jobs
        self.model = model
        self.parse = parse
        self.prefetch = prefetch or (1 if long_jobs else self.settings.prefetch)
        self.heartbeat = heartbeat
        self.tick = tick
        self.tick_interval = tick_interval
        self.depth_interval = depth_interval
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self.queue = queue or queue_name(self.settings, service)
        prefix = f"{self.settings.queue_prefix}."
        store = self.queue[len(prefix):] if self.queue.startswith(prefix) else self.queue
        self.seen = SeenStore(Path(self.settings.state_dir) / f"{store}-seen.sqlite") if idempotent else None
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._conn = None
        self._chan = None
        self._pub: _Channel | None = None
        self._conn_thread: int | None = None
        self._pending: collections.deque[_Message] = collections.deque()  # default mode
        self._jobs: "queue_mod.Queue[_Message]" = queue_mod.Queue()  # long-jobs mode
        self._requests: collections.deque = collections.deque()  # work for the connection thread
        self._lock = threading.Lock()
        self._inflight = False
        self._handling = False  # default mode: a handler is running on the connection thread
        self._worker: threading.Thread | None = None
        self._worker_exit = threading.Event()
        self._last_tick = 0.0
        self._last_depth = 0.0
        self.blocked: str | None = None
        self.config_error: BrokerConfigError | None = None
        self.handled = 0
        self.connections = 0

    # -- control
    def stop(self, *_: Any) -> None:
        """Ask the consumer to finish the current message and close (signal-safe)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _on_conn_thread(self) -> bool:
        return threading.get_ident() == self._conn_thread

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the connection thread (directly when already there) and return its result."""
        if self._on_conn_thread():
            return fn()
        if not self.long_jobs and self._handling:
            raise RuntimeError(f"{self.service}: publishing from another thread while the handler runs on the "
                               "connection thread would deadlock; publish from the handler, or use long_jobs=True")
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            conn = self._conn
            if conn is None or not conn.is_open:
                raise pex.ConnectionWrongStateError("consumer not connected")
            self._requests.append((future, fn))
        try:
            conn.add_callback_threadsafe(lambda: None)  # wake the connection thread up
        except Exception:  # noqa: BLE001 - connection closing: _drop fails the request
            pass
        return future.result()

    def _run_requests(self) -> None:
        while True:
            with self._lock:
                if not self._requests:
                    return
                future, fn = self._requests.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                future.set_exception(exc)
                if isinstance(exc, CONNECTION_ERRORS + (BrokerConfigError,)):
                    raise

    def _publishing(self, action: Callable[[_Channel], Any], what: str) -> Any:
        """Run a publishing ``action`` on the consumer's channel: on the connection thread directly
        (a lost connection propagates: the message is redelivered), from a worker thread through the
        connection thread, waiting for a reconnection. Returned messages are re-published."""
        backoff = Backoff()
        while True:
            try:
                def act() -> Any:
                    if self._pub is None:
                        raise pex.ConnectionWrongStateError("consumer not connected")
                    return action(self._pub)

                return self._call(act)
            except _Unroutable as exc:
                _note_unroutable(self.service, str(exc), what)
                self._wait(backoff.next(), serve=self._on_conn_thread())
                if self._stop.is_set():  # stopping: the input message is not acked and comes back
                    raise pex.UnroutableError([]) from None
                try:
                    self._call(lambda: self._pub.redeclare() if self._pub is not None else None)
                except CONNECTION_ERRORS:
                    pass
            except pex.NackError:
                self._wait(backoff.next(), serve=self._on_conn_thread())
                if self._stop.is_set():
                    raise
            except CONNECTION_ERRORS:
                if self._on_conn_thread():
                    raise
                if self._stop.is_set() and not self._inflight:
                    raise
                # worker thread: wait for the connection thread to reconnect, then publish again
                self.ready.wait(backoff.next())

    def publish(self, event: Event, routing_key: str | None = None) -> str:
        """Publish an event (confirmed) from the handler, in either mode."""
        return self._publishing(lambda pub: pub.publish(event, routing_key), "event")

    def send(self, queue: str, body: bytes | BaseModel, *, message_id: str, headers: dict | None = None) -> None:
        """Send to a named queue (confirmed) from the handler, in either mode."""
        self._publishing(lambda pub: pub.send(queue, body, message_id=message_id, headers=headers), "queue message")

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
        """Consume until stopped. A :class:`BrokerConfigError` (exit status 78) is not retried."""
        if install_signals and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        self._conn_thread = threading.get_ident()
        if self.long_jobs:
            self._worker_exit.clear()
            self._worker = threading.Thread(target=self._worker_loop, name=f"{self.service}-handler", daemon=True)
            self._worker.start()
        backoff = Backoff()
        try:
            while not self._finished():
                try:
                    self._connect()
                    backoff.reset()
                    while not self._finished():
                        self._conn.process_data_events(time_limit=0 if self._pending or self._requests else 0.25)
                        self._run_requests()
                        if not self.long_jobs:
                            self._dispatch_pending()
                        self._periodic()
                    self._close_clean()
                except CONNECTION_ERRORS as exc:
                    self.ready.clear()
                    self._drop()
                    if self._finished():
                        break
                    delay = backoff.next()
                    log.warning("%s: connection lost (%s: %s); reconnecting in %.1f s", self.service,
                                exc.__class__.__name__, exc, delay)
                    self._wait(delay, serve=False)
                except Exception:  # infrastructure trouble (state store, broker nack): never die on it
                    self.ready.clear()
                    self._drop()
                    if self._finished():
                        break
                    delay = backoff.next()
                    log.exception("%s: unexpected error; unacknowledged messages return to the queue; "
                                  "reconnecting in %.1f s", self.service, delay)
                    self._wait(delay, serve=False)
        except BrokerConfigError as exc:
            self.config_error = exc
            raise
        finally:
            self._stop.set()
            self._worker_exit.set()
            self.ready.clear()
            self._drop()
            if self._worker is not None:
                self._worker.join(5)
            if self.seen is not None:
                self.seen.close()
            log.info("%s: consumer stopped", self.service)
        if self.config_error is not None:  # raised on the handler's thread
            raise self.config_error

    def _finished(self) -> bool:
        """Stopping, and no handler in flight (long-jobs mode finishes the current message)."""
        with self._lock:
            return self._stop.is_set() and not self._inflight

    def _connect(self) -> None:
        self._conn = broker_connection(self.settings, self.heartbeat)
        self._chan = self._conn.channel()
        declare_queue(self._chan, self.settings, self.queue, self.bindings)  # its own queue first
        self._pub = _Channel(self._conn, self.settings, self.service)  # declares the queues it feeds
        self._chan.basic_qos(prefetch_count=self.prefetch)
        self._chan.basic_consume(self.queue, self._on_message, auto_ack=False)
        self.connections += 1
        self.ready.set()
        log.info("%s: consuming %s (bindings %s)%s", self.service, self.queue, ", ".join(self.bindings) or "-",
                 " [long jobs]" if self.long_jobs else "")

    def _close_clean(self) -> None:
        self.ready.clear()
        try:
            if self._chan is not None and self._chan.is_open:
                self._chan.close()
            if self._conn is not None and self._conn.is_open:
                self._conn.close()
        except Exception:
            pass
        self._drop()

    def _drop(self) -> None:
        with self._lock:
            conn, self._conn, self._chan, self._pub = self._conn, None, None, None
            requests, self._requests = self._requests, collections.deque()
        self._pending.clear()
        while True:  # prefetched messages of the old channel come back from the broker
            try:
                self._jobs.get_nowait()
            except queue_mod.Empty:
                break
        for future, _ in requests:  # waiting publishers see a connection error and retry
            if future.set_running_or_notify_cancel():
                future.set_exception(pex.ConnectionWrongStateError("connection lost"))
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

    def _wait(self, seconds: float, serve: bool) -> None:
        """Wait ``seconds`` (less when stopping); ``serve``: keep the connection's heartbeats going."""
        end = time.monotonic() + seconds
        while not self._stop.is_set():
            left = end - time.monotonic()
            if left <= 0:
                return
            if serve and self._conn is not None:
                self._conn.process_data_events(time_limit=min(left, 0.25))
            else:
                self._stop.wait(min(left, 0.25))

    def _on_message(self, channel, method, props, body: bytes) -> None:
        msg = _Message(self._conn, channel, method.delivery_tag, method.routing_key, props, body, bool(method.redelivered))
        if self.long_jobs:
            self._jobs.put(msg)
        else:
            self._pending.append(msg)

    def _dispatch_pending(self) -> None:
        while self._pending and not self._stop.is_set():
            self._handling = True
            try:
                self._process(self._pending.popleft())
            finally:
                self._handling = False

    def _worker_loop(self) -> None:
        while not self._worker_exit.is_set():
            try:
                msg = self._jobs.get(timeout=0.2)
            except queue_mod.Empty:
                continue
            with self._lock:
                if self._stop.is_set() or msg.channel is not self._chan:
                    continue  # left unacked: returned to the queue when the channel closes
                self._inflight = True
            try:
                self._process(msg)
            except CONNECTION_ERRORS as exc:
                log.warning("%s: connection lost while handling %s (%s); the message will be redelivered",
                            self.service, msg.routing_key, exc)
            except BrokerConfigError as exc:
                self.config_error = exc
                self._stop.set()
            except Exception:  # pragma: no cover - _process handles the handler's exceptions
                log.exception("%s: unexpected error while handling %s", self.service, msg.routing_key)
            finally:
                with self._lock:
                    self._inflight = False
                conn = self._conn
                if conn is not None:
                    try:
                        conn.add_callback_threadsafe(lambda: None)
                    except Exception:  # noqa: BLE001
                        pass

    # -- settling a message
    def _settle(self, msg: _Message, ack: bool, requeue: bool = True) -> None:
        def do() -> None:
            if msg.channel.is_open:
                if ack:
                    msg.channel.basic_ack(msg.tag)
                else:
                    msg.channel.basic_nack(msg.tag, requeue=requeue)

        if self._on_conn_thread():
            do()
            return
        try:
            msg.conn.add_callback_threadsafe(do)
        except Exception:  # noqa: BLE001 - the connection is gone: the broker redelivers
            log.warning("%s: %s of %s lost with the connection; the message will be redelivered", self.service,
                        "ack" if ack else "nack", msg.routing_key)

    def _parse(self, msg: _Message) -> tuple[Any, str | None, str]:
        """``(payload, idempotency id, kind)``; raises EventError / ValidationError."""
        if self.model is None:
            event: Any = parse_event(msg.body, msg.routing_key)
            payload = event if self.parse else event.model_dump(mode="json")
            return payload, str(event.event_id), kind_of(msg.routing_key)
        kind = self.queue
        if self.model is bytes:
            return msg.body, msg.props.message_id, kind
        return self.model.model_validate_json(msg.body), msg.props.message_id, kind

    def _process(self, msg: _Message) -> None:
        headers = dict(msg.props.headers or {})
        rk = msg.routing_key
        attempt = int(headers.get("x-delivery-count", 0) or 0) + 1
        kind = kind_of(rk) if self.model is None else self.queue
        t0 = time.perf_counter()
        try:
            payload, key, kind = self._parse(msg)
        except (EventError, ValidationError, ValueError) as exc:
            if isinstance(exc, EventError):
                why, error = f"{exc.kind}: {exc.reason}", exc.kind
            else:
                why, error = f"schema: {exc.__class__.__name__}: {str(exc)[:1500]}", "schema"
            EVENTS_FAILED.labels(service=self.service, kind=kind).inc()
            self._dead(msg.body, rk, headers, why, error=error, attempts=attempt)
            self.report_failure("message", f"{self.queue} ({rk})", why)
            self._settle(msg, ack=True)
            return
        if self.seen is not None and key is not None and key in self.seen:
            log.info("%s: duplicate %s %s acknowledged without processing", self.service, rk, key)
            self._settle(msg, ack=True)
            return
        delivery = Delivery(rk, headers, msg.redelivered, attempt, msg.body, self.queue, self,
                            message_id=msg.props.message_id)
        outcome = self._invoke(payload, delivery)
        if outcome is None:
            return  # stopping while blocked: left unacked, back to the queue
        if isinstance(outcome, Reject):
            EVENTS_FAILED.labels(service=self.service, kind=kind).inc()
            if not delivery.dead_lettered:
                self._dead(msg.body, rk, headers, f"rejected: {outcome}", error="rejected", attempts=attempt)
                self.report_failure("message", f"{self.queue} ({rk})", f"rejected: {outcome}", **_ids(payload))
            self._settle(msg, ack=True)
            return
        if isinstance(outcome, BaseException) and not delivery.dead_lettered:
            exc = outcome
            EVENTS_FAILED.labels(service=self.service, kind=kind).inc()
            why = f"{exc.__class__.__name__}: {exc}"
            if attempt >= self.settings.max_redeliveries:
                log.error("%s: handler failed on %s (attempt %d, giving up)", self.service, rk, attempt,
                          exc_info=(type(exc), exc, exc.__traceback__))
                self._dead(msg.body, rk, headers, f"handler failed {attempt} times: {why}", error="handler",
                           attempts=attempt)
                self.report_failure("message", f"{self.queue} ({rk})", f"handler failed {attempt} times: {why}",
                                    **_ids(payload))
                self._settle(msg, ack=True)
            else:
                log.warning("%s: handler failed on %s (attempt %d of %d): %s; requeued", self.service, rk, attempt,
                            self.settings.max_redeliveries, why)
                self._wait(min(0.2 * attempt, 2.0), serve=self._on_conn_thread())
                self._settle(msg, ack=False, requeue=True)
            return
        if isinstance(outcome, BaseException):
            log.warning("%s: handler raised after dead-lettering %s: %s", self.service, rk, outcome)
        if self.seen is not None and key is not None:
            self.seen.add(key, kind)
        self._settle(msg, ack=True)
        self.handled += 1
        if not delivery.dead_lettered:
            EVENTS_CONSUMED.labels(service=self.service, kind=kind).inc()
        PROCESSING_SECONDS.labels(service=self.service, step="handle").observe(time.perf_counter() - t0)

    def _invoke(self, payload: Any, delivery: Delivery) -> Any:
        """Call the handler, again and again while it raises :class:`Retry`. Returns True (done),
        the exception it raised, or None (stopped while blocked)."""
        backoff = Backoff(self.retry_initial, self.retry_max)
        since = retries = 0
        reason: str | None = None
        try:
            while True:
                try:
                    self.handler(payload, delivery)
                    return True
                except CONNECTION_ERRORS:
                    raise
                except Retry as exc:
                    if exc.reason != reason:
                        if reason is not None:
                            SERVICE_BLOCKED.labels(service=self.service, reason=reason).set(0)
                        reason, since = exc.reason, since or time.monotonic()
                        self.blocked = reason
                        SERVICE_BLOCKED.labels(service=self.service, reason=reason).set(1)
                        log.error("%s: blocked (%s): %s; %s kept unacknowledged, retrying with backoff up to %.0f s",
                                  self.service, reason, exc.detail, delivery.routing_key, self.retry_max)
                    retries += 1
                    self._wait(backoff.next(), serve=self._on_conn_thread())
                    if self._stop.is_set():
                        log.warning("%s: stopping while blocked (%s); %s goes back to the queue", self.service,
                                    reason, delivery.routing_key)
                        return None
                except Exception as exc:  # noqa: BLE001 - judged by the caller (Reject, retries)
                    return exc
        finally:
            if reason is not None:
                SERVICE_BLOCKED.labels(service=self.service, reason=reason).set(0)
                self.blocked = None
                if not self._stop.is_set():
                    log.warning("%s: unblocked (%s) after %.1f s and %d retries", self.service, reason,
                                time.monotonic() - since, retries)

    def _dead(self, body: bytes, rk: str, headers: dict, reason: str, *, error: str, attempts: int,
              queue: str | None = None) -> None:
        q = queue or self.queue
        self._publishing(lambda pub: pub.dead_letter(body, rk, headers, reason, queue=q, error=error, attempts=attempts),
                         "dead letter")


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
        self._conn = broker_connection(self.settings)
        self._chan = self._conn.channel()
        try:  # a subscriber (the read-only analyst) needs no configure permission on an existing exchange
            self._chan.exchange_declare(self.settings.exchange, "topic", passive=True)
        except pex.ChannelClosedByBroker as exc:
            if exc.reply_code != 404:
                raise (_refusal(exc, "exchange", self.settings.exchange, self.settings) or exc) from exc
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
    conn = broker_connection(settings)
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
        if conn.is_open:
            conn.close()
    return out


__all__ = [
    "Backoff",
    "BrokerConfigError",
    "CONNECTION_ERRORS",
    "Consumer",
    "DELIVERY_LIMIT_MARGIN",
    "Delivery",
    "EX_CONFIG",
    "Publisher",
    "Reject",
    "Retry",
    "SeenStore",
    "Subscription",
    "broker_connection",
    "connection_parameters",
    "dead_letter_exchange",
    "dead_letter_headers",
    "dead_letters",
    "dead_queue_name",
    "declare_queue",
    "declare_service_queue",
    "declare_topology",
    "ensure_queue",
    "mask_url",
    "queue_arguments",
    "queue_name",
    "ssl_options",
    "work_queue_name",
]
