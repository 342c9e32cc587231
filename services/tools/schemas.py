"""``vison schemas --out DIR``: write the JSON Schema of every event (one file per kind, e.g.
``exposure.validated.json``) and an ``index.json`` listing kinds, routing keys and files, so that
an analyst can consume the bus with any AMQP client."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shared.events import SCHEMA_VERSION, json_schemas


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="folder to write the event schemas into")
    parser.add_argument("--result-keys", type=Path, default=None, metavar="FILE",
                        help="write the documentation of every analysis result key (markdown) to FILE")


def run(args: argparse.Namespace) -> int:
    if args.result_keys is not None:
        from services.tools.resultkeys import markdown

        args.result_keys.parent.mkdir(parents=True, exist_ok=True)
        args.result_keys.write_text(markdown())
        print(f"result keys: {args.result_keys}")
        if args.out is None:
            return 0
    if args.out is None:
        print("vison schemas: give --out DIR and / or --result-keys FILE")
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    index = {"schema_version": SCHEMA_VERSION, "events": []}
    for kind, schema in json_schemas().items():
        name = f"{kind}.json"
        (out / name).write_text(json.dumps(schema, indent=2) + "\n")
        index["events"].append({"kind": kind, "routing_key": schema["x-routing-key"], "file": name,
                                "description": schema["description"]})
        print(f"{schema['x-routing-key']:<52} {out / name}")
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return 0
