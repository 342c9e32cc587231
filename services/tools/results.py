"""``vison results``: follow events on the bus, or query the results catalogue.

``vison results tail PATTERN [PATTERN ...]``: print events whose routing key matches a pattern
as they arrive (an exclusive, auto-deleted queue bound to the exchange: nothing is left behind
on the broker). One readable line per event, or the raw JSON with ``--json``. Patterns are AMQP
topic patterns: ``*`` one word, ``#`` any number of words, e.g. ``exposure.validated.#``,
``analysis.completed.PTC01.#``, ``processing.failed.#``, ``#``.

``vison results query QUANTITY [--test T] [--block B] [--all] [--csv | --json]``: the values of a
quantity per CCD and quadrant from the catalogue (VISON_CATALOGUE_URL), the latest analysis of
each (block, test, repeat) unless ``--all``. ``vison results history QUANTITY --block B``: the
quantity across tests and time, one line per analysis with one column per CCD quadrant.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from datetime import datetime
from pathlib import Path
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
    parser.add_argument("action", choices=["tail", "query", "history"],
                        help="tail: follow events; query: a quantity from the catalogue; history: a quantity over time")
    parser.add_argument("patterns", nargs="+", metavar="PATTERN|QUANTITY",
                        help="tail: routing-key pattern(s), e.g. exposure.validated.#; query/history: the quantity, e.g. gain")
    parser.add_argument("--json", action="store_true", help="JSON output (tail: one line per message body)")
    parser.add_argument("--csv", action="store_true", help="query/history: CSV output")
    parser.add_argument("--test", default=None, help="query/history: test name (wildcards *), e.g. PTC01, BIAS*")
    parser.add_argument("--block", default=None, help="query/history: block, e.g. BORN")
    parser.add_argument("--all", action="store_true", help="query: every analysis, not only the latest per test and repeat")
    parser.add_argument("--url", default=None, help="query/history: catalogue URL (default VISON_CATALOGUE_URL)")
    parser.add_argument("--count", type=int, default=0, help="tail: exit after this many events (0: never)")
    parser.add_argument("--timeout", type=float, default=None, help="tail: exit after this many seconds without an event")


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


# --------------------------------------------------------------------------- catalogue queries
QUERY_COLUMNS = ["block", "ccd", "quadrant", "value", "error", "unit", "test", "repeat", "produced"]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def query_table(rows: list[Any]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of ``results query``: one line per CCD quadrant value."""
    body = [[r.block, r.ccd or "-", r.quadrant or "-", r.value, r.error, r.unit, r.test, r.repeat,
             r.produced_at.strftime("%Y-%m-%dT%H:%M:%SZ")] for r in rows]
    return QUERY_COLUMNS, body


def history_table(rows: list[Any]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows of ``results history``: one line per analysis (time, block, test, repeat,
    software version), one column per CCD quadrant (``CCD1.E`` ...; ``value`` for test-level)."""
    cells = sorted({(r.ccd, r.quadrant) for r in rows})
    names = [f"{c}.{q}" if c else "value" for c, q in cells]
    lines: dict[str, dict[str, Any]] = {}
    for r in rows:
        line = lines.setdefault(r.event_id, {"produced": r.produced_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                             "block": r.block, "test": r.test, "repeat": r.repeat,
                                             "version": r.software_version, "unit": r.unit})
        line[f"{r.ccd}.{r.quadrant}" if r.ccd else "value"] = r.value
    header = ["produced", "block", "test", "repeat", "version", "unit", *names]
    return header, [[line.get(h) for h in header] for line in lines.values()]


def print_table(header: list[str], body: list[list[Any]], fmt: str, out=None) -> None:
    """``text`` (aligned columns), ``csv`` or ``json`` (a list of objects)."""
    out = out or sys.stdout
    if fmt == "json":
        print(json.dumps([dict(zip(header, row)) for row in body], indent=1), file=out)
        return
    if fmt == "csv":
        import csv

        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in body])
        return
    text = [[_fmt(v) if isinstance(v, float) or v is None else str(v) for v in row] for row in body]
    widths = [max([len(h)] + [len(r[i]) for r in text]) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), file=out)
    for row in text:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip(), file=out)


def run_query(args: argparse.Namespace) -> int:
    from services.catalogue.store import Catalogue, catalogue_url
    from shared.config import get_settings

    if len(args.patterns) != 1:
        print(f"vison results {args.action}: give one quantity, e.g. gain or ron_img_adu", file=sys.stderr)
        return 2
    if args.action == "history" and not args.block:
        print("vison results history: --block is required (e.g. --block BORN)", file=sys.stderr)
        return 2
    url = args.url or catalogue_url(get_settings())
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        print(f"vison results: no catalogue at {url[len('sqlite:///'):]} (VISON_CATALOGUE_URL; fill it with "
              "`vison catalogue` or `vison catalogue rebuild`)", file=sys.stderr)
        return 2
    try:
        catalogue = Catalogue(url, create=False)
        try:
            rows = catalogue.results(args.patterns[0], block=args.block, test=args.test,
                                     latest=args.action == "query" and not args.all)
        finally:
            catalogue.close()
    except Exception as exc:  # unreachable database, missing tables
        print(f"vison results: catalogue {url.split('@')[-1]}: {exc.__class__.__name__}: {str(exc).splitlines()[0]}",
              file=sys.stderr)
        return 2
    fmt = "json" if args.json else "csv" if args.csv else "text"
    if not rows and fmt == "text":
        where = " ".join(f"{k} {v}" for k, v in (("test", args.test), ("block", args.block)) if v)
        print(f"no {args.patterns[0]} in the catalogue{' for ' + where if where else ''}", file=sys.stderr)
        return 1
    header, body = (query_table if args.action == "query" else history_table)(rows)
    print_table(header, body, fmt)
    return 0


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    if args.action in ("query", "history"):
        return run_query(args)
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
