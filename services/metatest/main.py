"""``vison metatest``: the FPA aggregation service (consumes ``analysis.completed.#`` on
``<prefix>.metatest``, publishes ``metatest.completed.<family>``), or offline with ``--products DIR``:
the same products from the ``results.json`` already in a products folder, without a broker."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("vison.metatest")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--products", type=Path, default=None,
                        help="offline: products folder holding <block>/<test>[.<n>]/results.json (no broker)")
    parser.add_argument("--families", default=None,
                        help="offline: comma-separated families (default all: bias,dark,ptc,nl,bf,flat,cosmetics,"
                             "chinj,tp,psf,persistence,warm)")
    parser.add_argument("--out", type=Path, default=None, help="offline: write FPA/<family>/ under this folder (default --products)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG heat maps")
    parser.add_argument("--json", action="store_true", help="offline: print the events as JSON lines")
    parser.add_argument("--batch", type=float, default=None, help="service: seconds inputs are batched into one recomputation (0.5)")
    parser.add_argument("--metrics-port", type=int, default=None, help="override VISON_METRICS_PORT")


def run(args: argparse.Namespace) -> int:
    if args.products is not None:
        return run_offline(args)
    if args.families or args.out or args.json:
        print("vison metatest: --families / --out / --json need --products DIR (offline mode)", file=sys.stderr)
        return 2
    from services.metatest.service import BATCH_SECONDS, BINDINGS, SERVICE, Metatest, Recomputer
    from shared.bus import Consumer
    from shared.config import get_settings
    from shared.metrics import start_metrics_server

    settings = get_settings()
    port = settings.metrics_port if args.metrics_port is None else args.metrics_port
    start_metrics_server(port, SERVICE)
    service = Metatest(settings, batch_seconds=BATCH_SECONDS if args.batch is None else args.batch,
                       figures=not args.no_figures)
    recomputer = Recomputer(service, settings)
    consumer = Consumer(settings, SERVICE, BINDINGS, service)
    log.info("metatest: products %s/FPA, state %s", settings.products_root, settings.state_dir)
    recomputer.start()
    try:
        consumer.run()
    finally:
        recomputer.stop()
        recomputer.join(120)
        service.close()
    return 0


def run_offline(args: argparse.Namespace) -> int:
    from services.metatest.families import select
    from services.metatest.layout import fpa_layout
    from services.metatest.offline import build_offline
    from services.metatest.products import family_dir

    root: Path = args.products
    if not root.is_dir():
        print(f"vison metatest: --products {root}: not a folder", file=sys.stderr)
        return 2
    try:
        families = select([f.strip() for f in args.families.split(",") if f.strip()] if args.families else None)
    except ValueError as exc:
        print(f"vison metatest: --families: {exc}", file=sys.stderr)
        return 2
    out = args.out or root
    events, problems = build_offline(root, families, fpa_layout(), out, figures=not args.no_figures)
    for problem in problems:
        print(f"skipped {problem}", file=sys.stderr)
    for ev in events:
        if args.json:
            print(ev.model_dump_json())
            continue
        print(f"{ev.family:<12} {len(ev.blocks):>2} blocks ({', '.join(ev.blocks)}); missing: "
              f"{', '.join(ev.missing) or '-'}; {len(ev.results)} quantities -> {family_dir(out, ev.family)}")
    if not events:
        print(f"vison metatest: no completed results of any family under {root}", file=sys.stderr)
        return 3
    return 0
