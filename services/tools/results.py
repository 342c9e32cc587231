"""``vison results tail PATTERN [PATTERN ...]``: print events whose routing key matches a
pattern as they arrive (an exclusive, auto-deleted queue bound to the exchange: nothing is left
behind on the broker). One readable line per event, or the raw JSON with ``--json``.

Patterns are AMQP topic patterns: ``*`` one word, ``#`` any number of words, e.g.
``exposure.validated.#``, ``analysis.completed.PTC01.#``, ``processing.failed.#``, ``#``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from datetime import datetime
from typing import Any

from shared.events import (
    AnalysisCompleted,
    CampaignDefined,
    Event,
    EventError,
    ExposureIngested,
    ExposureValidated,
    HKSamples,
    MetatestCompleted,
    ProcessingFailed,
    TestClose,
    parse_event,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["tail"], help="tail: follow events")
    parser.add_argument("patterns", nargs="+", metavar="PATTERN", help="routing-key pattern(s), e.g. exposure.validated.#")
    parser.add_argument("--json", action="store_true", help="print each message body as one JSON line")
    parser.add_argument("--count", type=int, default=0, help="exit after this many events (0: never)")
    parser.add_argument("--timeout", type=float, default=None, help="exit after this many seconds without an event")


def _offsets(ev: ExposureValidated, region: str = "pre") -> str:
    parts = []
    for ccd, quads in ev.offsets(region).items():
        parts.append(f"{ccd} " + "/".join(f"{quads[q]:.0f}" for q in sorted(quads)))
    return "  ".join(parts)


def summarize(event: Event) -> str:
    """One readable line per event."""
    if isinstance(event, ExposureValidated):
        verdict = "PASS" if event.passed else "FAIL"
        flags = ",".join(event.flag_names) or "-"
        return f"ObsID {event.obsid} {event.test} {event.block}: {verdict} flags {flags}; offsets pre E/F/G/H {_offsets(event)}"
    if isinstance(event, ExposureIngested):
        return f"ObsID {event.obsid} {event.test} {event.block}: {len(event.files)} frames, {len(event.explog)} log rows"
    if isinstance(event, ProcessingFailed):
        who = f" ObsID {event.obsid}" if event.obsid is not None else ""
        return f"FAILED {event.what}{who} at {event.where}: {event.why} ({event.service or event.producer})"
    if isinstance(event, HKSamples):
        return f"{len(event.samples)} HK samples of {event.block} ROE{event.roe} from {event.source}"
    if isinstance(event, AnalysisCompleted):
        keys = ", ".join(list(event.results)[:6])
        extra = f" error: {event.error}" if event.error else ""
        return (f"{event.test} {event.block}{f' repeat {event.repeat}' if event.repeat else ''}: {event.status}, "
                f"results [{keys}], {len(event.products)} products, flags {','.join(event.flag_names) or '-'}{extra}")
    if isinstance(event, MetatestCompleted):
        return f"{event.family}: blocks {', '.join(event.blocks)}, {len(event.products)} products"
    if isinstance(event, CampaignDefined):
        tests = event.definition.get("tests", [])
        return f"campaign {event.campaign or '-'} of {event.block}: {len(tests)} tests"
    if isinstance(event, TestClose):
        return f"{event.test} {event.block} closed by {event.operator or '?'}{': ' + event.reason if event.reason else ''}"
    return f"{event.kind} {event.event_id}"


def format_line(routing_key: str, body: bytes) -> str:
    now = datetime.now().strftime("%H:%M:%S")
    try:
        event = parse_event(body, routing_key)
    except EventError as exc:
        return f"{now} {routing_key}  (not a valid event: {exc.reason})"
    return f"{now} {routing_key}  {summarize(event)}"


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    from shared.bus import Subscription
    from shared.config import get_settings

    settings = get_settings()
    signal.signal(signal.SIGTERM, _interrupt)
    seen = 0
    try:
        with Subscription(settings, args.patterns) as sub:
            print(f"# following {', '.join(args.patterns)} on exchange {settings.exchange} (Ctrl-C to stop)",
                  file=sys.stderr, flush=True)
            for rk, _, body in sub.messages(timeout=args.timeout):
                if args.json:
                    try:
                        data: Any = json.loads(body)
                    except ValueError:
                        data = {"_raw": body.decode("utf-8", "replace")}
                    print(json.dumps({"routing_key": rk, "event": data}), flush=True)
                else:
                    print(format_line(rk, body), flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
    except KeyboardInterrupt:
        pass
    return 0
