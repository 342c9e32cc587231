"""Fuzzed message bodies through ``shared.events.parse_event``: every model of ``EVENT_TYPES``
with fields replaced by random JSON (wrong types, huge numbers, long strings, nesting), fields
removed or added, kinds and routing keys mixed up, random bytes. Property: the typed event of
the right kind or an :class:`EventError` with a reason; valid events round-trip.

Three inputs crashed ``parse_event`` with something else than ``EventError`` (a consumer then
looped on the message instead of dead-lettering it): deep nesting, a 5000-digit integer and a
non-string kind; they are regression tests below."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from shared.events import EVENT_TYPES, Event, EventError, parse_event
from tests.test_events import KEYS, SAMPLES
from tests.test_fuzz_strategies import count, json_values

BASES = {type(e).kind: json.loads(e.to_json()) for e in SAMPLES}
ROUTING = dict(zip((type(e).kind for e in SAMPLES), KEYS))


def _check(body, routing_key):
    count("events")
    try:
        event = parse_event(body, routing_key)
    except EventError as exc:
        assert exc.reason and exc.kind in ("json", "schema", "kind", "routing")
        assert str(exc) == exc.reason
        return None
    assert isinstance(event, Event) and type(event) in EVENT_TYPES.values()
    if routing_key:
        assert routing_key.startswith(type(event).kind)
    return event


@st.composite
def mutated_bodies(draw):
    kind = draw(st.sampled_from(sorted(BASES)))
    data = json.loads(json.dumps(BASES[kind]))
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["replace", "delete", "add", "nest"]))
        keys = sorted(data)
        if op == "replace" and keys:
            data[draw(st.sampled_from(keys))] = draw(json_values)
        elif op == "delete" and keys:
            data.pop(draw(st.sampled_from(keys)))
        elif op == "add":
            data[draw(st.text(max_size=12))] = draw(json_values)
        elif op == "nest" and keys:
            key, depth = draw(st.sampled_from(keys)), draw(st.integers(1, 200))
            value = data[key]
            for _ in range(depth):
                value = [value] if draw(st.booleans()) else {"x": value}
            data[key] = value
    if draw(st.integers(0, 9)) == 0:
        data["kind"] = draw(st.sampled_from(sorted(EVENT_TYPES) + ["", "nope.kind", None]))
    routing_key = draw(st.sampled_from([None, ROUTING[kind], ROUTING[draw(st.sampled_from(sorted(ROUTING)))],
                                        "x", ""]))
    body = json.dumps(data)
    if draw(st.integers(0, 9)) == 0:
        body = body[: draw(st.integers(0, len(body)))]  # cut in the middle
    encoding = draw(st.sampled_from(["str", "bytes", "dict"]))
    if encoding == "bytes":
        return body.encode(), routing_key
    if encoding == "dict":
        try:
            return json.loads(body), routing_key
        except ValueError:
            pass
    return body, routing_key


@given(mutated_bodies())
def test_mutated_events_parse_or_raise_an_event_error(case):
    _check(*case)


@given(st.one_of(st.binary(max_size=300), st.text(max_size=300), json_values.map(json.dumps)),
       st.one_of(st.none(), st.sampled_from(KEYS), st.text(max_size=30)))
def test_random_bodies_raise_an_event_error(body, routing_key):
    _check(body, routing_key)


@given(st.sampled_from(SAMPLES), st.booleans())
def test_valid_events_round_trip(event, with_key):
    count("events")
    back = _check(event.to_json(), event.routing_key() if with_key else None)
    assert back == event


@given(st.sampled_from(sorted(BASES)), st.sampled_from(["a" * 100_000, 10**300, -(10**300), 1e308, [[[[[[]]]]]]]))
def test_huge_values_in_every_field(kind, value):
    for key in list(BASES[kind]):
        data = dict(BASES[kind], **{key: value})
        if key == "kind":
            continue
        _check(json.dumps(data).encode(), None)


KNOWN_CRASHES = {
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,  # RecursionError from json.loads
    "an integer of 5000 digits": b'{"kind":"test.close","test":"A","block":"B","x":' + b"9" * 5000 + b"}",  # ValueError
    "a non-string kind": b'{"kind":[1],"test":"A","block":"B"}',  # TypeError: unhashable type
}


@pytest.mark.parametrize("name", sorted(KNOWN_CRASHES))
def test_known_crashes_of_parse_event(name):
    _check(KNOWN_CRASHES[name], None)
