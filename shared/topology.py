"""Everything a vison deployment creates on the broker, and the one naming rule behind it.

Naming rule (prefix-derived; ``P = VISON_QUEUE_PREFIX``, ``X = VISON_EXCHANGE``):

- event exchange ``X`` (durable topic);
- dead-letter exchange ``P.dlx`` (durable fanout) and dead-letter queue ``P.dead``;
- one durable quorum queue per consuming service ``P.<service>``, bound to ``X`` with the
  service's patterns, ``x-dead-letter-exchange = P.dlx`` and ``x-delivery-limit``;
- internal work queues (no bindings, fed through the default exchange): ``P.analyzer.jobs``,
  ``P.analyzer.done``.

:data:`SERVICES` is the table of every service: the patterns its queue is bound with and the
event kinds it publishes (which give the queues it feeds, and its broker topic permissions).
:func:`declare_all` declares the whole table (``vison stack up``, ``vison demo``, tests); the
compose ``broker-setup`` job applies the same names from ``deploy/rabbitmq/definitions.json``.
Pure data and topic matching here; the declarations themselves are :func:`shared.bus.declare_queue`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from shared.config import Settings


@dataclass(frozen=True)
class ServiceTopology:
    """One service: its queue bindings (empty: publishes only, no queue) and what it publishes."""

    service: str
    bindings: tuple[str, ...] = ()
    publishes: tuple[str, ...] = ()  # event kinds (routing-key prefixes) on the exchange
    work_queues: tuple[str, ...] = ()  # suffixes of internal queues it owns (``analyzer.jobs``)


#: Every vison service. Keep in step with each service's ``BINDINGS`` (tests/test_topology.py checks).
SERVICES: tuple[ServiceTopology, ...] = (
    ServiceTopology("ingest", (), ("exposure.ingested", "hk.samples", "processing.failed")),
    ServiceTopology("validator", ("exposure.ingested.#", "campaign.defined.#", "test.close.#"),
                    ("exposure.validated", "test.checked", "processing.failed")),
    ServiceTopology("analyzer", ("exposure.validated.#", "campaign.defined.#", "test.close.#"),
                    ("analysis.completed", "processing.failed"), ("analyzer.jobs", "analyzer.done")),
    ServiceTopology("metatest", ("analysis.completed.#",), ("metatest.completed", "processing.failed")),
    ServiceTopology("catalogue", ("exposure.validated.#", "analysis.completed.#", "metatest.completed.#"),
                    ("processing.failed",)),
    ServiceTopology("scriptgen", ("scriptgen.request.#",), ("campaign.defined", "processing.failed")),
)

#: Routing-key prefixes published by operator tools (``vison demo``, ``test.close`` from the CLI).
TOOL_PUBLISHES: tuple[str, ...] = ("test.close", "scriptgen.request", "campaign.defined")


def service(name: str) -> ServiceTopology | None:
    return next((s for s in SERVICES if s.service == name), None)


# --------------------------------------------------------------------------- names


def queue_name(settings: Settings, service_name: str) -> str:
    """Durable queue of a service: ``<prefix>.<service>``."""
    return f"{settings.queue_prefix}.{service_name}"


def work_queue_name(settings: Settings, suffix: str) -> str:
    """An internal queue: ``<prefix>.<suffix>`` (``analyzer.jobs``, ``analyzer.done``)."""
    return f"{settings.queue_prefix}.{suffix}"


def dead_letter_exchange(settings: Settings) -> str:
    """The dead-letter fanout exchange: ``<prefix>.dlx`` (named after the prefix, like its queue)."""
    return f"{settings.queue_prefix}.dlx"


def dead_queue_name(settings: Settings) -> str:
    """The dead-letter queue: ``<prefix>.dead``."""
    return f"{settings.queue_prefix}.dead"


# --------------------------------------------------------------------------- topic matching


@lru_cache(maxsize=4096)
def topic_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic match (``*`` exactly one word, ``#`` zero or more words)."""
    return _match(tuple(pattern.split(".")), tuple(routing_key.split(".")))


def _match(pat: tuple[str, ...], key: tuple[str, ...]) -> bool:
    if not pat:
        return not key
    head, rest = pat[0], pat[1:]
    if head == "#":
        return any(_match(rest, key[i:]) for i in range(len(key) + 1))
    if not key:
        return False
    return (head == "*" or head == key[0]) and _match(rest, key[1:])


def consumers_of(routing_key: str) -> list[ServiceTopology]:
    """Services whose queue receives ``routing_key``."""
    return [s for s in SERVICES if any(topic_matches(p, routing_key) for p in s.bindings)]


def _kind_matches(pattern: str, kind: str) -> bool:
    """Could a routing key of ``kind`` (``kind.<test>.<block>``) match ``pattern``?"""
    return topic_matches(pattern, kind) or topic_matches(pattern, f"{kind}.x") or topic_matches(pattern, f"{kind}.x.y")


def fed_services(name: str) -> list[ServiceTopology]:
    """Services whose queue receives an event kind that service ``name`` publishes."""
    me = service(name)
    kinds = me.publishes if me is not None else ()
    return [s for s in SERVICES if s.service != name and any(_kind_matches(p, k) for p in s.bindings for k in kinds)]


def all_queues(settings: Settings, services: Iterable[str] | None = None) -> list[tuple[str, tuple[str, ...]]]:
    """``(queue, bindings)`` of every queue of the table (or of the named services)."""
    wanted = None if services is None else set(services)
    out: list[tuple[str, tuple[str, ...]]] = []
    for s in SERVICES:
        if wanted is not None and s.service not in wanted:
            continue
        if s.bindings:
            out.append((queue_name(settings, s.service), s.bindings))
        out += [(work_queue_name(settings, w), ()) for w in s.work_queues]
    return out


def declare_all(settings: Settings, services: Iterable[str] | None = None) -> list[str]:
    """Declare the exchange, the dead-letter exchange and queue, and every queue of the table with
    its bindings (idempotent); returns the queue names. Raises :class:`shared.bus.BrokerConfigError`
    (exit status 78) when the broker refuses a declaration."""
    from shared.bus import broker_connection, declare_queue, declare_topology

    conn = broker_connection(settings)
    try:
        ch = conn.channel()
        declare_topology(ch, settings)
        names = []
        for name, bindings in all_queues(settings, services):
            declare_queue(ch, settings, name, bindings, _topology=False)
            names.append(name)
        return names
    finally:
        try:
            if conn.is_open:
                conn.close()
        except Exception:  # noqa: BLE001 - closing a refused connection
            pass


# --------------------------------------------------------------------------- permissions


def _alt(names: Iterable[str]) -> str:
    """An anchored RabbitMQ permission regex matching exactly ``names``."""
    items = sorted({re.escape(n) for n in names})
    return f"^(?:{'|'.join(items)})$" if items else "^$"


def service_permissions(settings: Settings) -> dict[str, dict]:
    """Least-privilege broker permissions of each service's user (deploy/rabbitmq/setup_broker.py).

    ``configure``: the exchanges, the dead-letter queue, its own queues and the queues it feeds
    (declared on connect); ``write``: the same queues (bindings) and the exchanges it publishes to
    (``amq.default`` for the work queues); ``read``: its own queues and the exchanges it binds to;
    ``topic``: on the event exchange, ``write`` = the event kinds it publishes (routing keys),
    ``read`` = the binding patterns of its queues and of the queues it feeds."""
    out: dict[str, dict] = {}
    exchanges = [settings.exchange, dead_letter_exchange(settings)]
    dead = dead_queue_name(settings)
    for s in SERVICES:
        own = ([queue_name(settings, s.service)] if s.bindings else []) + [work_queue_name(settings, w) for w in s.work_queues]
        fed = fed_services(s.service)
        fed_queues = [queue_name(settings, f.service) for f in fed]
        patterns = list(s.bindings) + [p for f in fed for p in f.bindings]
        default = ["amq.default"] if s.work_queues else []
        kinds = sorted({re.escape(k) for k in s.publishes})
        out[s.service] = {
            "configure": _alt(own + fed_queues + [dead] + exchanges),
            "write": _alt(own + fed_queues + [dead] + exchanges + default),
            "read": _alt(own + exchanges),
            "topic": {
                "write": f"^(?:{'|'.join(kinds)})(?:\\..*)?$" if kinds else "^$",
                "read": _alt(patterns),
            },
        }
    return out


__all__ = [
    "SERVICES",
    "TOOL_PUBLISHES",
    "ServiceTopology",
    "all_queues",
    "consumers_of",
    "dead_letter_exchange",
    "dead_queue_name",
    "declare_all",
    "fed_services",
    "queue_name",
    "service",
    "service_permissions",
    "topic_matches",
    "work_queue_name",
]
