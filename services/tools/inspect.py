"""``vison inspect FILE [--json]``: what an exposure log or HK file is (kind, detected version,
rows, ObsIDs, columns) and, for HK, which keys are out of their P/S limits.

R-type HK limits are relative to the commanded value in the exposure log: give the log with
``--explog`` (the row of the HK file's ObsID, or ``--obsid``, else the log's last row is used);
without it R keys are reported as not checked. Exit status 0 when the file was read (whatever
the limits say), 2 when it is missing or not an exposure log / HK file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime, time
from pathlib import Path
from typing import Any

from shared.explog import ExpLog, ExpLogFormatError, ExpLogRow, read_explog
from shared.filenames import classify, parse_hk_daily_name, parse_hk_exposure_name
from shared.hk import HKFormatError, HKTable, check_hk_limits, hk_stats, read_hk


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="exposure log (EXP_LOG_*.txt) or HK file (HK_*.txt)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--explog", help="exposure log giving the commanded values for R-type HK limits")
    parser.add_argument("--obsid", type=int, help="ObsID whose commanded values to use (default: the HK file's)")
    parser.add_argument("--kinds", default="P,S", help="HK limit kinds to check, comma separated (P,S)")


def compact_ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 7, 9, 10] -> '1-3, 7, 9-10'."""
    out: list[str] = []
    nums = sorted(set(numbers))
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ", ".join(out)


def _sniff(path: Path) -> str | None:
    """'explog' / 'hk' from the first non-blank line when the name says nothing."""
    try:
        with open(path, "rb") as f:
            head = f.read(65536).decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in head.splitlines():
        if line.strip():
            first = line.split("\t")[0].strip().lower()
            if first == "obsid":
                return "explog"
            if first in ("timestamp", "hk_timestamp"):
                return "hk"
            return None
    return None


def _ts(value: datetime | time) -> str:
    return value.isoformat()


def _num(x: Any) -> Any:
    return None if isinstance(x, float) and math.isnan(x) else x


def explog_report(log: ExpLog) -> dict[str, Any]:
    """JSON-able summary of an exposure log."""
    dates = [r.date for r in log.rows]
    return {
        "kind": "explog",
        "version": log.version,
        "match": log.match.model_dump(),
        "rows": len(log.rows),
        "obsids": log.obsids,
        "ccds": sorted({r.ccd for r in log.rows if r.ccd is not None}),
        "tests": sorted({r.test for r in log.rows}),
        "first_date": min(dates).isoformat() if dates else None,
        "last_date": max(dates).isoformat() if dates else None,
        "columns": log.columns,
        "partial_tail": log.partial_tail,
        "errors": [{"line": n, "reason": r} for n, r in log.errors],
    }


def _commanded(args: argparse.Namespace, table: HKTable, hk_obsid: int | None) -> tuple[ExpLogRow | None, str]:
    if not args.explog:
        return None, "no --explog given"
    log = read_explog(args.explog)
    want = args.obsid if args.obsid is not None else hk_obsid
    if want is not None:
        rows = log.rows_of(want)
        if rows:
            return rows[0], f"ObsID {want} of {args.explog}"
        if args.obsid is not None or not log.rows:
            return None, f"ObsID {want} not in {args.explog}"
    if not log.rows:
        return None, f"no rows in {args.explog}"
    return log.rows[-1], f"last row (ObsID {log.rows[-1].obsid}) of {args.explog}"


def hk_report(table: HKTable, args: argparse.Namespace, name_kind: str | None) -> dict[str, Any]:
    """JSON-able summary of an HK file with its limit verdicts."""
    obsid = roe = None
    if name_kind == "hk_exposure":
        parsed = parse_hk_exposure_name(table.source)
        obsid, roe = parsed.obsid, parsed.roe
    elif name_kind == "hk_daily":
        roe = parse_hk_daily_name(table.source).roe
    stats = hk_stats(table)
    row, commanded_from = _commanded(args, table, obsid)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    verdicts = check_hk_limits(stats, row, kinds=kinds)
    return {
        "kind": "hk_daily" if table.kind == "daily" else "hk_exposure",
        "version": table.version,
        "match": table.match.model_dump(),
        "obsid": obsid,
        "roe": roe,
        "rows": table.n_rows,
        "first_timestamp": _ts(table.timestamps[0]) if table.timestamps else None,
        "last_timestamp": _ts(table.timestamps[-1]) if table.timestamps else None,
        "columns": table.columns,
        "no_reading": [k for k, s in stats.items() if s["n"] == 0],
        "stats": {k: {m: _num(v) for m, v in s.items()} for k, s in stats.items()},
        "metadata_keys": len(table.metadata),
        "limits_version": "7.5.X",
        "commanded_from": commanded_from,
        "out_of_limits": [v.model_dump() for v in verdicts if v.passed is False],
        "not_checked": [v.model_dump() for v in verdicts if v.passed is None],
        "passed": sum(1 for v in verdicts if v.passed),
        "partial_tail": table.partial_tail,
        "errors": [{"line": n, "reason": r} for n, r in table.errors],
    }


def _print_match(report: dict[str, Any]) -> None:
    m = report["match"]
    how = "exact" if m["exact"] else f"closest layout, overlap {m['score']:.2f}"
    same = f"; same layout: {', '.join(m['equivalent'])}" if len(m["equivalent"]) > 1 else ""
    print(f"  version   {report['version']} ({how}{same})")
    if not m["exact"]:
        print(f"            missing: {', '.join(m['missing']) or '-'}")
        print(f"            extra:   {', '.join(m['extra']) or '-'}")


def _print_common_tail(report: dict[str, Any]) -> None:
    cols = report["columns"]
    print(f"  columns   {len(cols)}: {' '.join(cols)}")
    if report["partial_tail"]:
        print("  note      last line incomplete (file still being written): ignored")
    errors = report["errors"]
    print(f"  bad lines {len(errors)}" + "".join(f"\n            line {e['line']}: {e['reason']}" for e in errors[:20]))


def print_text(path: str, report: dict[str, Any]) -> None:
    """Human-readable form of a report."""
    print(path)
    if report["kind"] == "explog":
        print("  kind      exposure log")
        _print_match(report)
        obsids = report["obsids"]
        print(f"  rows      {report['rows']} ({len(obsids)} ObsIDs: {compact_ranges(obsids) or '-'})")
        print(f"  CCDs      {', '.join(map(str, report['ccds'])) or '-'};  tests: {', '.join(report['tests']) or '-'}")
        if report["first_date"]:
            print(f"  dates     {report['first_date']} .. {report['last_date']}")
        _print_common_tail(report)
        return
    where = ", ".join(x for x in (f"ObsID {report['obsid']}" if report["obsid"] is not None else "",
                                  f"ROE{report['roe']}" if report["roe"] is not None else "") if x)
    print(f"  kind      {'daily HK' if report['kind'] == 'hk_daily' else 'per-exposure HK'}" + (f" ({where})" if where else ""))
    _print_match(report)
    span = f" ({report['first_timestamp']} .. {report['last_timestamp']})" if report["rows"] else ""
    print(f"  rows      {report['rows']}{span}")
    _print_common_tail(report)
    if report["no_reading"]:
        print(f"  no reading (sentinel/missing throughout): {', '.join(report['no_reading'])}")
    ool = report["out_of_limits"]
    via = "" if report["version"] == report["limits_version"] else f", checked under their {report['limits_version']} names"
    print(f"  limits    {report['passed']} passed, {len(ool)} out of limits, {len(report['not_checked'])} not checked"
          f"  ({report['limits_version']} limits{via}; commanded values: {report['commanded_from']})")
    for v in ool:
        alias = f" ({v['column']})" if v["column"] != v["key"] else ""
        print(f"    OOL {v['kind']} {v['type']} {v['key']}{alias}: {v['reason']}")
    for v in report["not_checked"]:
        print(f"    not checked {v['kind']} {v['type']} {v['key']}: {v['reason']}")


def run(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        print(f"vison inspect: {path}: no such file", file=sys.stderr)
        return 2
    name_kind = classify(path)
    kind = {"explog": "explog", "hk_exposure": "hk", "hk_daily": "hk"}.get(name_kind or "") or _sniff(path)
    if name_kind == "fits":
        print(f"vison inspect: {path}: a FITS frame; use `vison qla {path}`", file=sys.stderr)
        return 2
    if kind is None:
        print(f"vison inspect: {path}: not a recognised exposure log or HK file "
              "(expected EXP_LOG_<DDMMYY>.txt / HK_*.txt, or a header row starting with ObsID / TimeStamp)", file=sys.stderr)
        return 2
    try:
        if kind == "explog":
            report = explog_report(read_explog(path))
        else:
            report = hk_report(read_hk(path), args, name_kind)
    except (ExpLogFormatError, HKFormatError) as exc:
        print(f"vison inspect: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:
        print(f"vison inspect: {path}: {exc}", file=sys.stderr)
        return 2
    if args.json:
        report["file"] = str(path)
        print(json.dumps(report, indent=1, default=str))
    else:
        print_text(str(path), report)
    return 0
