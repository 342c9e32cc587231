#!/usr/bin/env python3
"""Generate the HK alert rules (``rules/hk.rules.yml``) from the ELVIS formats specification.

Run from the repository root::

    python deploy/prometheus/generate_rules.py          # rewrite rules/hk.rules.yml
    python deploy/prometheus/generate_rules.py --check  # exit 1 if the committed file differs

Rules (one per HK key; values come from ``vison_hk_value{block,roe,param}`` exported by ingest):

- ``HKCriticalLimit``: the keys of ``hk_critical_keys``, one rule per side (``above`` = value at or
  over the safe upper limit, ``below`` = at or under the safe lower limit); label ``severity`` is
  ``warning`` for severity 1 and ``page`` for severity 2.
- ``HKSafeLimit``: every other key of ``hk_limits_7.5.X`` ``S`` (safe) limits, severity
  ``warning``. Types: A (absolute) fails when ``value <= lo or value >= hi``; I (identity) fails
  when ``value != expected``. R (relative to the commanded value) has no constant bound: such
  keys are left to the ingest's ``vison_hk_out_of_limits`` gauge (none in 7.5.X S limits).

Each rule carries the static label ``hk_key`` (= the series' ``param``) so that no two rules
share alert name and labels (promtool's duplicate-rule lint).

Latching: an alert fires once the violation has lasted ``FOR`` (a single noisy sample does not
page) and keeps firing for ``KEEP_FIRING_FOR`` after the value is back inside its limits, so a
short excursion stays visible in Alertmanager and Grafana; it then resolves and Alertmanager
sends the resolution.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SPEC = REPO / "shared" / "spec" / "elvis-formats.json"
OUT = HERE / "rules" / "hk.rules.yml"

VERSION = "7.5.X"
FOR = "1m"
KEEP_FIRING_FOR = "10m"
SEVERITY = {1: "warning", 2: "page"}
METRIC = "vison_hk_value"


def _num(x: float) -> str:
    """PromQL literal of a limit (no trailing .0 noise, exact repr otherwise)."""
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _sel(param: str) -> str:
    return f'{METRIC}{{param="{param}"}}'


def load_spec(path: Path = SPEC) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def build_rules(spec: dict[str, Any]) -> dict[str, Any]:
    """The Prometheus rule-file document (a dict) for the HK keys of the spec."""
    safe: dict[str, list] = spec[f"hk_limits_{VERSION}"]["S"]
    critical = {k: v for k, v in spec["hk_critical_keys"].items() if not k.startswith("_")}
    order = [c for c in spec["hk_columns"][VERSION] if c in safe] + sorted(set(safe) - set(spec["hk_columns"][VERSION]))
    crit_rules, safe_rules = [], []
    for param in order:
        lim = safe[param]
        kind = lim[0]
        if param in critical:
            if kind != "A":
                raise ValueError(f"critical key {param} has non-absolute S limits {lim}")
            lo, hi = lim[1], lim[2]
            for side, op, bound in (("above", ">=", hi), ("below", "<=", lo)):
                sev = SEVERITY[int(critical[param][side])]
                word = "at or above its safe upper" if side == "above" else "at or below its safe lower"
                crit_rules.append({
                    "alert": "HKCriticalLimit",
                    "expr": f"{_sel(param)} {op} {_num(bound)}",
                    "for": FOR,
                    "keep_firing_for": KEEP_FIRING_FOR,
                    "labels": {"severity": sev, "kind": "S", "side": side, "hk_key": param},
                    "annotations": {
                        "summary": f"{param} {word} limit {_num(bound)} (block {{{{ $labels.block }}}} ROE {{{{ $labels.roe }}}})",
                        "description": (
                            f"{param} = {{{{ $value }}}}; safe limits {_num(lo)} .. {_num(hi)}. "
                            f"Latched: resolves {KEEP_FIRING_FOR} after the value is back inside the limits."
                        ),
                    },
                })
            continue
        if kind == "A":
            lo, hi = lim[1], lim[2]
            expr = f"{_sel(param)} <= {_num(lo)} or {_sel(param)} >= {_num(hi)}"
            text = f"outside its safe limits {_num(lo)} .. {_num(hi)}"
        elif kind == "I":
            expr = f"{_sel(param)} != {_num(lim[1])}"
            text = f"differs from its expected value {_num(lim[1])}"
        else:  # R: needs the commanded value; covered by ingest's vison_hk_out_of_limits
            continue
        safe_rules.append({
            "alert": "HKSafeLimit",
            "expr": expr,
            "for": FOR,
            "keep_firing_for": KEEP_FIRING_FOR,
            "labels": {"severity": "warning", "kind": "S", "hk_key": param},
            "annotations": {
                "summary": f"{param} {text} (block {{{{ $labels.block }}}} ROE {{{{ $labels.roe }}}})",
                "description": (
                    f"{param} = {{{{ $value }}}}. Latched: resolves {KEEP_FIRING_FOR} after the value is back inside the limits."
                ),
            },
        })
    return {"groups": [
        {"name": "vison-hk-critical", "rules": crit_rules},
        {"name": "vison-hk-safe-limits", "rules": safe_rules},
    ]}


def render(doc: dict[str, Any]) -> str:
    import yaml

    head = ("# GENERATED by deploy/prometheus/generate_rules.py from shared/spec/elvis-formats.json"
            f" (hk_limits_{VERSION} S, hk_critical_keys).\n# Do not edit: change the spec or the script and regenerate.\n")
    return head + yaml.safe_dump(doc, sort_keys=False, width=200, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=SPEC)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare with the committed file, do not write")
    args = parser.parse_args(argv)
    text = render(build_rules(load_spec(args.spec)))
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is out of date: run python deploy/prometheus/generate_rules.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
