"""The ``vison`` command: one entry point, one sub-command per tool or service.

Each sub-command lives in the module that owns it and exposes ``add_arguments(parser)`` and
``run(args) -> int``; the module is imported only when its command runs, so ``vison --help`` and
every command start fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

#: name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "sim": ("services.sim.cli", "write simulated ELVIS data (FITS, exposure log, HK) with recorded truth"),
    "qla": ("services.tools.qla", "quick-look statistics of a FITS frame per quadrant and region"),
    "inspect": ("services.tools.inspect", "inspect an exposure log or HK file (kind, version, rows, limits)"),
    "schemas": ("services.tools.schemas", "export the JSON Schemas of every event"),
    "results": ("services.tools.results", "follow events on the bus (results tail PATTERN)"),
    "stack": ("services.tools.stack", "run every service as local processes (stack up)"),
    "demo": ("services.tools.demo", "run the live demo: stack + simulated acquisition"),
    "ingest": ("services.ingest.main", "run the ingest service"),
    "validator": ("services.validator.main", "run the validator service"),
    "analyzer": ("services.analyzer.main", "run the analyzer service (collector + workers)"),
    "analyze": ("services.analyzer.offline", "run a test's analysis offline on a data folder"),
    "reprocess": ("services.analyzer.reprocess", "re-analyse every test of a data root on the shared analyzer queue"),
    "metatest": ("services.metatest.main", "run the FPA metatest service (or --products DIR: offline FPA products)"),
    "scriptgen": ("services.scriptgen.main", "write acquisition scripts for a campaign (or run as a service)"),
    "grafana": ("services.tools.grafana", "publish the Grafana dashboards to a running Grafana"),
    "catalogue": ("services.catalogue.main", "fill the results catalogue from the bus (or rebuild it from products)"),
    "show": ("services.tools.show", "send an exposure's 3 frames to an image viewer over SAMP (ds9, Aladin)"),
}


def key_value(text: str) -> tuple[str, Any]:
    """argparse type of ``KEY=VALUE`` options: the value read as YAML (numbers, lists, strings)."""
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vison", description="Euclid VIS live calibration pipeline")
    parser.add_argument("--log-level", default=None, help="logging level (default VISON_LOG_LEVEL or INFO)")
    parser.add_argument("command", nargs="?", help="one of: " + ", ".join(COMMANDS))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    head, rest = top.parse_known_args(argv[:1] if argv and not argv[0].startswith("-") else argv[:2])
    if argv and argv[0] in ("-h", "--help") or not argv:
        top.print_help()
        print("\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0
    # allow `vison --log-level DEBUG cmd ...`
    args_list = argv
    if argv[0] == "--log-level":
        head.log_level, args_list = argv[1], argv[2:]
    name = args_list[0]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r} (one of: {', '.join(COMMANDS)})")
    module_name, text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"vison {name}", description=text)
    module.add_arguments(parser)
    args = parser.parse_args(args_list[1:])
    from shared.config import get_settings

    logging.basicConfig(
        level=(head.log_level or get_settings().log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
