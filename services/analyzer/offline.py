"""``vison analyze TEST --data DIR [--block B] [--out DIR] [--partial]``: run a test's analysis
offline on a data folder (the exposure logs of every day folder select the test's frames), print
a readable summary and write the same products as the analyzer service, ``results.json`` included.

Exit status: 0 done; 2 bad usage (unknown test, no such folder); 3 data incomplete or wrong
(nothing written; ``--partial`` analyses anyway and flags MISSDATA); 4 the analysis failed
(``results.json`` with ``status: failed`` written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from services.analyzer import registry
from services.analyzer.definitions import Plan, default_plan, load_definition, plans_from_definition
from services.analyzer.model import split_test_name
from services.analyzer.runner import AnalysisFailed, DataError, run_analysis
from services.analyzer.selection import select_test
from services.cli import key_value
from shared.config import get_settings
from shared.flags import flag_names

EXIT_USAGE, EXIT_DATA, EXIT_FAILED = 2, 3, 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  vison analyze BIAS01 --data data --block BORN\n"
        "  vison analyze DARK01 --data data --out /tmp/products --expected 1\n"
        "  vison analyze BIAS01.2 --data data --partial --param nsigma=5\n"
        "exit status: 0 done, 2 usage, 3 data incomplete or wrong, 4 analysis failed"
    )
    parser.add_argument("test", help="test name as in the exposure log (BIAS01, BIAS01.2, DARK01, COSMETICS00, ...)")
    parser.add_argument("--data", required=True, type=Path, help="data folder (day folders with EXP_LOG_*.txt and FITS)")
    parser.add_argument("--block", default=None, help="block name (default: the frames' BLOCK header, else VISON_BLOCK)")
    parser.add_argument("--out", default=None, type=Path, help="products root (default VISON_PRODUCTS_ROOT); "
                        "products go to OUT/<block>/<test>[.<repeat>]/")
    parser.add_argument("--partial", action="store_true", help="analyse an incomplete / unexpected set anyway (flag MISSDATA)")
    parser.add_argument("--expected", type=int, default=None, help="expected exposures (default: campaign file or catalogue)")
    parser.add_argument("--campaign", type=Path, default=None, help="campaign configuration or definition (YAML/JSON) "
                        "giving the expected frames")
    parser.add_argument("--param", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                        help="analysis parameter (repeatable), e.g. nsigma=5")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-verify", action="store_true", help="do not checksum the input files")
    parser.add_argument("--json", action="store_true", help="print results.json instead of the summary")


def _err(msg: str) -> None:
    print(f"vison analyze: {msg}", file=sys.stderr)


def _block_of(path: str) -> str | None:
    try:
        from astropy.io import fits

        for hdr in (fits.getheader(path, -1), fits.getheader(path, 0)):
            if hdr.get("BLOCK"):
                return str(hdr["BLOCK"])
    except Exception:
        return None
    return None


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    label = args.test.strip()
    if registry.find(label) is None:
        _err(f"no analysis for test {label!r} (analysed: {', '.join(registry.known_tests())})")
        return EXIT_USAGE
    if not args.data.is_dir():
        _err(f"data folder {args.data} does not exist")
        return EXIT_USAGE
    plan: Plan = default_plan(label)
    plans: dict[str, Plan] = {}
    if args.campaign:
        try:
            plans = plans_from_definition(load_definition(args.campaign))
        except Exception as exc:
            _err(f"cannot read the campaign file {args.campaign}: {exc}")
            return EXIT_USAGE
        if label not in plans:
            _err(f"test {label} is not in the campaign {args.campaign} (tests: {', '.join(plans)})")
            return EXIT_DATA
        plan = plans[label]
    source = plan.data_from or label
    if plan.data_from:  # a test re-analysing another test's frames (BF01 <- PTC01): that test's count
        plan = plans.get(source) or default_plan(source)
    expected = args.expected if args.expected is not None else plan.expected_frames

    sel = select_test(args.data, source)
    if not sel.logs:
        _err(f"no exposure log (EXP_LOG_*.txt) under {args.data}")
        return EXIT_DATA
    if not sel.frames and not sel.missing_files:
        found = ", ".join(f"{t} ({n})" for t, n in sorted(sel.tests_found.items())) or "none"
        _err(f"no frames of {source} in the exposure logs of {args.data} (tests found: {found})")
        return EXIT_DATA
    problems = []
    if sel.missing_files:
        problems.append(f"{len(sel.missing_files)} FITS file(s) listed in the exposure log are missing: "
                        + "; ".join(sel.missing_files[:5]) + (" ..." if len(sel.missing_files) > 5 else ""))
    if sel.incomplete_exposures:
        items = [f"ObsID {o} has CCD {','.join(map(str, c)) or 'none'}" for o, c in sorted(sel.incomplete_exposures.items())]
        problems.append(f"{len(items)} exposure(s) without all 3 CCDs: " + "; ".join(items[:5]))
    frames = sel.complete_frames()
    n = len({f.obsid for f in frames})
    if expected is not None and n != expected:
        what = "incomplete" if n < expected else "unexpected"
        problems.append(f"{what}: {n} complete exposure(s) of {source}, the test definition expects {expected}")
    if problems and not args.partial:
        for p in problems:
            _err(p)
        _err("nothing analysed; use --partial to analyse what is there (flagged MISSDATA)")
        return EXIT_DATA
    if not frames:
        for p in problems:
            _err(p)
        _err("no complete exposure to analyse")
        return EXIT_DATA
    block = args.block or _block_of(frames[0].path) or settings.block
    root = args.out or settings.products_root
    params = dict(args.param)
    try:
        result = run_analysis(label, block, frames, root, params=params, expected_frames=expected,
                              partial=bool(problems), verify=not args.no_verify, figures=not args.no_figures)
    except DataError as exc:
        _err(str(exc))
        return EXIT_DATA
    except AnalysisFailed as exc:
        exc.write_results()
        _err(f"analysis failed: {exc.summary}")
        if exc.trace:
            print(exc.trace, file=sys.stderr)
        if exc.results_path:
            _err(f"see {exc.results_path}")
        return EXIT_FAILED
    if args.json:
        print(json.dumps(result.doc, indent=1))
        return 0
    base, repeat = split_test_name(label)
    doc = result.doc
    print(f"{label}  block {block}  {n} exposure(s) (ObsID {doc['obsids'][0]}..{doc['obsids'][-1]})"
          f"{'' if expected is None else f', expected {expected}'}  analysed in {result.duration_s:.1f} s")
    for p in problems:
        print(f"  warning: {p}")
    for line in doc.get("summary") or []:
        print("  " + line)
    print(f"flags: {', '.join(flag_names(result.flags)) or 'none'}")
    for w in result.warnings:
        print(f"  warning: {w}")
    print(f"products ({len(result.products)}) in {result.out_dir}")
    print(f"results: {result.results_path}")
    return 0
