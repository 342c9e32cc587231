#!/usr/bin/env python3
"""Fuzz every lab-file and message parser with a larger budget than ``make test`` and print the
examples run and the failures found per parser.

    .venv/bin/python bench/fuzz.py                 # profile "bench" (2000 examples per property)
    HYPOTHESIS_PROFILE=dev .venv/bin/python bench/fuzz.py
    .venv/bin/python bench/fuzz.py --only fits,events

Runs the property tests of tests/test_fuzz_*.py (FITS, exposure logs, HK, file names, events,
campaign YAML) outside pytest; a failing property prints its minimal failing example.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MODULES = {"fits": "tests.test_fuzz_fits", "explog": "tests.test_fuzz_explog", "hk": "tests.test_fuzz_hk",
           "filenames": "tests.test_fuzz_filenames", "events": "tests.test_fuzz_events",
           "campaign": "tests.test_fuzz_campaign"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated parsers (default: all)")
    args = parser.parse_args()
    os.environ.setdefault("HYPOTHESIS_PROFILE", "bench")
    from tests.test_fuzz_strategies import EXAMPLES, PROFILE

    wanted = [p for p in (args.only.split(",") if args.only else MODULES) if p]
    rows, failures = [], 0
    for name in wanted:
        module = importlib.import_module(MODULES[name])
        tests = [(n, f) for n, f in inspect.getmembers(module, inspect.isfunction)
                 if n.startswith("test_") and hasattr(f, "hypothesis") and f.__module__ == module.__name__]
        failed, t0, before = [], time.perf_counter(), EXAMPLES[name]
        for test_name, fn in tests:
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - report and go on with the next property
                failed.append(test_name)
                print(f"\nFAILED {name}: {test_name}: {exc.__class__.__name__}", file=sys.stderr)
                traceback.print_exc(limit=3)
        seconds = time.perf_counter() - t0
        rows.append((name, len(tests), EXAMPLES[name] - before, len(failed), seconds))
        failures += len(failed)
        print(f"  {name}: {rows[-1][2]} examples, {len(failed)} failures, {seconds:.1f} s", flush=True)
    print(f"\nfuzzing (hypothesis profile {PROFILE!r})")
    print(f"{'parser':<10} {'properties':>10} {'examples':>9} {'failures':>9} {'seconds':>8} {'examples/s':>10}")
    for name, n_props, n_examples, n_failed, seconds in rows:
        print(f"{name:<10} {n_props:>10} {n_examples:>9} {n_failed:>9} {seconds:>8.1f} {n_examples / seconds:>10.0f}")
    total = sum(r[2] for r in rows)
    print(f"{'total':<10} {sum(r[1] for r in rows):>10} {total:>9} {failures:>9} {sum(r[4] for r in rows):>8.1f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
