"""``vison analyze TEST --data DIR [--block B] [--out DIR] [--partial] [--workers N]``: run a test's
analysis offline on a data folder with the same two stages as the live analyzer: the extraction
units on a local process pool (all cores by default, ``--workers N``, 0 = in this process; a
progress bar with rate and ETA on a terminal), then the solve. Extractions are kept in the
products folder (``<block>/<test>/_extractions/``) and re-used when their inputs are unchanged.

Calibrations (a DARK01's master bias, PTC01 gains, ...) come from the ``results.json`` of the
block's earlier analyses in the products root (their ``provides`` section: the same Calibration
records as live), or ``--calib NAME=PATH`` (a results.json or its folder).

Exit status: 0 done; 2 bad usage (unknown test, no such folder); 3 data incomplete or wrong
(nothing written; ``--partial`` analyses anyway and flags MISSDATA); 4 the analysis failed
(``results.json`` with ``status: failed`` written).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from services.analyzer import planner, registry
from services.analyzer.definitions import Plan, default_plan, load_definition, plans_from_definition
from services.analyzer.execute import file_sha256, provided_calibrations
from services.analyzer.family import Calibration, Family
from services.analyzer.local import run_extractions, solve
from services.analyzer.model import FrameMeta, split_test_name
from services.analyzer.selection import select_test
from services.cli import key_value
from shared.config import get_settings
from shared.events import ResultsDocument, derived_event_id
from shared.flags import Flag, flag_names

EXIT_USAGE, EXIT_DATA, EXIT_FAILED = 2, 3, 4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  vison analyze BIAS01 --data data --block BORN\n"
        "  vison analyze DARK01 --data data --out /tmp/products --expected 1 --workers 2\n"
        "  vison analyze BIAS01.2 --data data --partial --param nsigma=5\n"
        "  vison analyze DARK01 --data data --calib master_bias=products/BORN/BIAS01/results.json\n"
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
    parser.add_argument("--calib", action="append", type=key_value, default=[], metavar="NAME=PATH",
                        help="calibration from a results.json (or its folder), e.g. gain=products/BORN/PTC01")
    parser.add_argument("--workers", type=int, default=None, help="extraction processes (default: all cores; 0 = in this process)")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--no-verify", action="store_true", help="do not checksum the input files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar / lines")
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


def _results_calibrations(path: Path) -> list[Calibration]:
    """The Calibration records a results.json provides (its ``provides`` section)."""
    path = path / "results.json" if path.is_dir() else path
    doc = ResultsDocument.model_validate(json.loads(path.read_text()))
    job_id = (doc.provenance or {}).get("job_id")
    event_id = str(derived_event_id("analysis.completed", job_id)) if job_id else None
    return provided_calibrations(doc, event_id)


def block_calibrations(root: Path, block: str, fam: Family) -> list[Calibration]:
    """Calibrations for ``fam``'s needs from the block's earlier results in the products root
    (latest completed results.json of each source test, repeats included)."""
    out: list[Calibration] = []
    base = root / block
    if not base.is_dir():
        return out
    for need in fam.needs:
        for src in need.sources:
            found = sorted((d / "results.json" for d in base.iterdir() if split_test_name(d.name)[0] == src
                            and (d / "results.json").is_file()), key=lambda p: p.stat().st_mtime)
            cals = []
            for path in found:
                try:
                    cals += [c for c in _results_calibrations(path) if c.name == need.name]
                except Exception:  # an unreadable or failed result provides nothing
                    continue
            if cals:
                out.append(cals[-1])
                break
    return out


def run(args: argparse.Namespace) -> int:
    settings = get_settings()
    label = args.test.strip()
    fam = registry.find(label)
    if fam is None:
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
    params_plan = dict(plan.params or {})
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
    root = Path(args.out or settings.products_root)
    params = {**params_plan, **dict(args.param)}
    if not args.no_verify:  # provenance: the SHA-256 of every input (and the job ids)
        try:
            frames = [f.model_copy(update={"sha256": file_sha256(f.path)}) for f in frames]
        except OSError as exc:
            _err(f"cannot read {exc.filename}: {exc.strerror}")
            return EXIT_DATA
    calibrations = block_calibrations(root, block, fam)
    for name, path in args.calib:
        try:
            cals = [c for c in _results_calibrations(Path(path)) if c.name == name]
        except Exception as exc:
            _err(f"--calib {name}={path}: cannot read it: {exc}")
            return EXIT_USAGE
        if not cals:
            _err(f"--calib {name}={path}: that result provides no {name}")
            return EXIT_USAGE
        calibrations = [c for c in calibrations if c.name != name] + cals
    flags = int(Flag.MISSDATA) if problems else 0
    notes = list(problems)
    have = {c.name for c in calibrations}
    for need in fam.needs:
        if need.name not in have:
            if need.mode == "required":
                _err(f"{label} needs the calibration {need.name} (from {', '.join(need.sources)}): analyse that test first "
                     f"or give --calib {need.name}=PATH")
                return EXIT_DATA
            notes.append(f"calibration {need.name} (from {', '.join(need.sources) or 'any test'}) not available: analysed without it")
            if need.mode == "wait":
                flags |= int(Flag.MISSDATA)
    progress = not args.no_progress and not args.json
    jobs = planner.extract_jobs(fam, block, label, frames, params, calibrations)
    done = run_extractions(jobs, args.data, root, args.workers, progress=progress)
    for d in done:
        if d.status == "failed":
            _err(f"warning: {d.error}")
    sjob = planner.solve_job(fam, block, label, frames, done, params, calibrations, expected, flags, notes)
    reply = solve(sjob, args.data, root, figures=not args.no_figures)
    doc = reply.results
    out_dir = root / block / label
    if reply.status != "completed" or doc is None:
        _err(f"analysis failed: {reply.error}")
        if doc is not None and doc.traceback:
            print(doc.traceback, file=sys.stderr)
        _err(f"see {out_dir / 'results.json'}")
        return EXIT_FAILED
    if args.json:
        print(json.dumps(doc.model_dump(mode="json", by_alias=True), indent=1))
        return 0
    reused = sum(1 for d in done if d.reused)
    print(f"{label}  block {block}  {n} exposure(s) (ObsID {doc.obsids[0]}..{doc.obsids[-1]})"
          f"{'' if expected is None else f', expected {expected}'}  analysed in "
          f"{sum(d.duration_s for d in done) + reply.duration_s:.1f} s cpu"
          f"{f' ({reused}/{len(done)} extractions re-used)' if reused else ''}")
    for p in notes:
        print(f"  warning: {p}")
    for line in doc.summary or []:
        print("  " + line)
    print(f"flags: {', '.join(flag_names(doc.flags)) or 'none'}")
    for w in doc.warnings:
        print(f"  warning: {w}")
    print(f"products ({len(doc.products)}) in {out_dir}")
    print(f"results: {out_dir / 'results.json'}")
    return 0
