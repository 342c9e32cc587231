"""``vison scriptgen``: acquisition scripts of a campaign.

- ``vison scriptgen --config campaign.yaml --out DIR``: one spreadsheet per test,
  CHECK_SUMS_<DDMMYY>.txt, TESTS_INVENTORY_<DDMMYY>.txt, TESTS_SCHEDULER_<DDMMYY>.xlsx;
- ``vison scriptgen --preset mini --block BORN --chamber CHAMBER_B_BORN --operator ab --out DIR``;
- ``vison scriptgen --verify DIR/CHECK_SUMS_<DDMMYY>.txt``: check the MD5 of written scripts;
- ``vison scriptgen --serve``: consume ``scriptgen.request.#``, publish ``campaign.defined.<block>``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from shared.campaign import CampaignConfig, CampaignDefinition, load_campaign_config, naming_help

log = logging.getLogger("vison.scriptgen")
SERVICE = "scriptgen"
EXAMPLES = Path(__file__).parent / "examples"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="campaign configuration (YAML)")
    parser.add_argument("--out", help="output folder of the scripts")
    parser.add_argument("--preset", choices=["full", "mini", "warm"], help="campaign preset (without --config)")
    parser.add_argument("--block", help="block name (with --preset; overrides the config's)")
    parser.add_argument("--chamber", help="chamber profile (with --preset; overrides the config's)")
    parser.add_argument("--operator", help="operator (with --preset; overrides the config's)")
    parser.add_argument("--date", help="date of the scripts, YYYY-MM-DD (default: config date or today)")
    parser.add_argument("--json", action="store_true", help="print the campaign definition as JSON")
    parser.add_argument("--verify", metavar="CHECK_SUMS", help="verify the MD5 of scripts listed in a CHECK_SUMS file")
    parser.add_argument("--list-tests", action="store_true", help="print the test naming and exit")
    parser.add_argument("--serve", action="store_true", help="run as a bus service (scriptgen.request -> campaign.defined)")


def config_from_args(args: argparse.Namespace) -> CampaignConfig:
    """The configuration of --config and/or --preset, with command-line overrides."""
    data: dict[str, Any] = {}
    if args.config:
        import yaml

        data = yaml.safe_load(Path(args.config).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{args.config}: expected a mapping at the top level")
    for key in ("preset", "block", "chamber", "operator"):
        if getattr(args, key, None):
            data[key] = getattr(args, key)
    if args.date:
        data["date"] = args.date
    return load_campaign_config(data)


def generate(config: CampaignConfig, out_dir: str | Path, date: dt.date | None = None) -> tuple[CampaignDefinition, dict[str, Path]]:
    """Define the campaign and write its files into ``out_dir``."""
    from services.scriptgen.writer import write_campaign

    definition = config.define()
    return definition, write_campaign(definition, out_dir, date or config.date)


def handle_request(request: Mapping[str, Any], out_root: str | Path | None = None) -> CampaignDefinition:
    """Service entry: a ``scriptgen.request`` body (``{block, config, out_dir?}``, or a bare
    configuration mapping) -> the campaign definition; with ``out_dir`` the scripts are written
    there (relative paths under ``out_root``; with ``out_root`` an absolute path or ``..`` leaving it
    is refused). Raises ValidationError / ValueError on a bad request."""
    request = dict(request)
    if "config" in request and isinstance(request["config"], Mapping):
        config_data = dict(request["config"])
        if request.get("block") and not config_data.get("block"):
            config_data["block"] = request["block"]
    else:
        config_data = {k: v for k, v in request.items()
                       if k not in ("out_dir", "schema_version", "event_id", "produced_at", "producer", "kind")}
    config = load_campaign_config(config_data)
    definition = config.define()
    out_dir = request.get("out_dir")
    if out_dir:
        from services.scriptgen.writer import write_campaign

        if out_root is not None:  # a request from the bus: the scripts stay under the products root
            from shared.paths import ensure_writable_under

            path = ensure_writable_under(out_root, out_dir)  # PathError (a ValueError) names an escaping path
        else:
            path = Path(out_dir)
        write_campaign(definition, path, config.date)
    return definition


def _error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        lines = []
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"]) or "config"
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  {loc}: {msg}")
        return "invalid campaign configuration:\n" + "\n".join(lines)
    return f"invalid campaign configuration: {exc}"


def make_consumer(settings=None):
    """The service consumer: ``scriptgen.request.#`` -> ``campaign.defined.<block>`` (event id
    derived from the request's, so a redelivered request republishes the same event). A request
    that cannot be valid is dead-lettered with a processing.failed event naming the field."""
    from shared.bus import Consumer, Reject
    from shared.config import get_settings
    from shared.events import CampaignDefined, ScriptgenRequest, derived_event_id

    settings = settings or get_settings()

    def handler(event: ScriptgenRequest, delivery) -> None:
        request = {"block": event.block, "config": event.config, "out_dir": event.out_dir}
        try:
            definition = handle_request(request, out_root=settings.products_root)
        except (ValidationError, ValueError, KeyError) as exc:
            raise Reject(_error(exc)) from None
        delivery.publish(CampaignDefined(
            event_id=derived_event_id("campaign.defined", event.event_id),
            producer=SERVICE, block=definition.block, campaign=definition.campaign,
            definition=definition.model_dump(mode="json"),
        ))
        log.info("campaign.defined %s: %d tests, %d frames", definition.block, len(definition.tests),
                 definition.total_frames)

    return Consumer(settings, SERVICE, ["scriptgen.request.#"], handler)


def serve(args: argparse.Namespace) -> int:
    """Run the service until SIGTERM / SIGINT."""
    from shared.config import get_settings
    from shared.metrics import start_metrics_server

    settings = get_settings()
    start_metrics_server(settings.metrics_port, SERVICE)
    make_consumer(settings).run()
    return 0


def run(args: argparse.Namespace) -> int:
    if args.list_tests:
        print(naming_help())
        return 0
    if args.verify:
        from services.scriptgen.writer import verify_checksums

        result = verify_checksums(args.verify)
        for name, ok in result.items():
            print(f"{name}: {'OK' if ok else 'FAILED'}")
        return 0 if result and all(result.values()) else 1
    if args.serve:
        return serve(args)
    if not args.config and not args.preset:
        print("vison scriptgen: give --config FILE (or --preset NAME with --block/--chamber/--operator)",
              file=sys.stderr)
        return 2
    try:
        config = config_from_args(args)
    except (ValidationError, ValueError, OSError) as exc:
        print(f"vison scriptgen: {_error(exc)}", file=sys.stderr)
        return 2
    if args.out:
        definition, written = generate(config, args.out)
        inventory = written["TESTS_INVENTORY"].read_text()
        print(f"wrote {len(written) - 3} scripts, {written['CHECK_SUMS'].name}, {written['TESTS_INVENTORY'].name}, "
              f"{written['TESTS_SCHEDULER'].name} into {args.out}")
        if not args.json:
            print(inventory, end="")
    else:
        definition = config.define()
    if args.json:
        print(json.dumps(definition.model_dump(mode="json"), indent=1))
    elif not args.out:
        from services.scriptgen.writer import inventory_lines

        print("\n".join(inventory_lines(definition)))
    return 0
