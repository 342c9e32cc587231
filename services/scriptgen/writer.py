"""Acquisition-script files: one spreadsheet per test (ELVIS layout), the reader of those
spreadsheets, ``CHECK_SUMS_<date>.txt``, ``TESTS_INVENTORY_<date>.txt`` and the scheduler.

Script spreadsheet: one sheet named after the test, no header row; column A = register keys
(SCRIPT_KEYS order), then one column per script column; the ``frames`` row is cumulative; a
final column holds ``End`` in the ``frames`` row.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import zipfile
from pathlib import Path

from openpyxl import Workbook, load_workbook

from shared.campaign import SCRIPT_KEYS, CampaignDefinition, Script, ScriptColumn
from shared.campaign.keys import STRING_KEYS, normalise

ELVIS_VERSION = "7.5.X"


def date_tag(date: dt.date) -> str:
    """DDMMYY, as ELVIS names files."""
    return date.strftime("%d%m%y")


def script_filename(test: str, date: dt.date) -> str:
    """``vis_CalCamp_<TEST>_<DDMMYY>_v7.5.X.xlsx``."""
    return f"vis_CalCamp_{test}_{date_tag(date)}_v{ELVIS_VERSION}.xlsx"


def _save(wb: Workbook, path: Path, date: dt.date | None) -> Path:
    """Save with fixed document and zip-member timestamps (the script date), so that the same
    script gives the same bytes and MD5."""
    stamp = dt.datetime.combine(date or dt.date(2000, 1, 1), dt.time())
    wb.properties.created = stamp
    wb.properties.creator = "vison scriptgen"
    path.parent.mkdir(parents=True, exist_ok=True)
    wb.save(path)
    with zipfile.ZipFile(path) as zin:
        items = [(info, zin.read(info.filename)) for info in zin.infolist()]
    iso = stamp.strftime("%Y-%m-%dT%H:%M:%SZ").encode()
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info, data in items:
            if info.filename == "docProps/core.xml":
                data = re.sub(rb"(<dcterms:modified[^>]*>)[^<]*(<)", rb"\g<1>" + iso + rb"\g<2>", data)
            member = zipfile.ZipInfo(info.filename, date_time=stamp.timetuple()[:6])
            member.compress_type = zipfile.ZIP_DEFLATED
            member.external_attr = info.external_attr
            zout.writestr(member, data)
    tmp.replace(path)
    return path


def write_script(script: Script, path: str | Path, date: dt.date | None = None) -> Path:
    """Write ``script`` as an ELVIS script spreadsheet; returns the path."""
    path = Path(path)
    wb = Workbook()
    ws = wb.active
    ws.title = script.test[:31]
    cumulative = script.cumulative_frames
    for r, key in enumerate(SCRIPT_KEYS, start=1):
        ws.cell(row=r, column=1, value=key)
        for c, col in enumerate(script.columns, start=2):
            value = cumulative[c - 2] if key == "frames" else col.values[key]
            ws.cell(row=r, column=c, value=value)
    ws.cell(row=1, column=len(script.columns) + 2, value="End")
    return _save(wb, path, date)


def read_script(path: str | Path, waived_keys: list[str] | None = None, data_from: str | None = None) -> Script:
    """Read a script spreadsheet back into a Script (frames un-cumulated, values normalised)."""
    wb = load_workbook(path, read_only=True, data_only=True)
    try:
        ws = wb.worksheets[0]
        rows = [list(r) for r in ws.iter_rows(values_only=True)]
    finally:
        wb.close()
    table = {str(r[0]).strip(): r[1:] for r in rows if r and r[0] is not None}
    missing = [k for k in SCRIPT_KEYS if k not in table]
    if missing:
        raise ValueError(f"{path}: script keys missing: {', '.join(missing)}")
    frames_row = list(table["frames"])
    ncols = next((i for i, v in enumerate(frames_row) if isinstance(v, str) and v.strip() == "End"), None)
    if ncols is None:
        ncols = len([v for v in frames_row if v is not None])
    columns, previous = [], 0
    for c in range(ncols):
        cumulative = int(frames_row[c])
        values = {}
        for key in SCRIPT_KEYS[1:]:
            cells = table[key]
            raw = cells[c] if c < len(cells) else None
            if raw is None and key not in STRING_KEYS:
                raise ValueError(f"{path}: empty cell for {key} in column {c + 1}")
            values[key] = normalise(key, raw)
        columns.append(ScriptColumn(frames=cumulative - previous, values=values))
        previous = cumulative
    test = str(columns[0].values["test"]) if columns else ws.title
    return Script(test=test, columns=columns, waived_keys=waived_keys or [], data_from=data_from)


def md5sum(path: str | Path) -> str:
    """MD5 hex digest of a file."""
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(paths: list[Path], out: str | Path) -> Path:
    """``<md5>  <file name>`` per script (the ``md5sum -c`` layout, relative to out's folder)."""
    out = Path(out)
    out.write_text("".join(f"{md5sum(p)}  {Path(p).name}\n" for p in paths))
    return out


def verify_checksums(checksums: str | Path) -> dict[str, bool]:
    """File name -> MD5 matches, for every line of a CHECK_SUMS file (missing file = False)."""
    checksums = Path(checksums)
    result = {}
    for line in checksums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(None, 1)
        target = checksums.parent / name.strip()
        result[name.strip()] = target.is_file() and md5sum(target) == digest
    return result


def inventory_lines(definition: CampaignDefinition) -> list[str]:
    """``<TEST>: <Ncols> cols, <Nframes> frames, <minutes> min`` per test, then the totals."""
    lines = []
    for t in definition.tests:
        line = f"{t.name}: {len(t.script.columns)} cols, {t.expected_frames} frames, {t.duration_s / 60:.1f} min"
        if t.data_from:
            line += f" (re-uses {t.data_from})"
        lines.append(line)
    ncols = sum(len(t.script.columns) for t in definition.tests)
    lines.append(f"Total: {ncols} cols, {definition.total_frames} frames, {definition.duration_s / 60:.1f} min "
                 f"({definition.duration_s / 3600:.2f} h)")
    return lines


def write_scheduler(definition: CampaignDefinition, path: str | Path, date: dt.date | None = None) -> Path:
    """Scheduler spreadsheet: one row per test in order with start offset and duration (min)."""
    path = Path(path)
    wb = Workbook()
    ws = wb.active
    ws.title = "schedule"
    ws.append(["order", "test", "start (min)", "duration (min)", "end (min)", "columns", "frames", "data from"])
    for t in definition.tests:
        start, dur = t.start_offset_s / 60, t.duration_s / 60
        ws.append([t.order + 1, t.name, round(start, 2), round(dur, 2), round(start + dur, 2),
                   len(t.script.columns), t.expected_frames, t.data_from or ""])
    ws.append(["", "Total", 0, round(definition.duration_s / 60, 2), round(definition.duration_s / 60, 2),
               sum(len(t.script.columns) for t in definition.tests), definition.total_frames, ""])
    return _save(wb, path, date or definition.date)


def write_campaign(definition: CampaignDefinition, out_dir: str | Path, date: dt.date | None = None) -> dict[str, Path]:
    """Every file of a campaign into ``out_dir``: scripts (tests with frames), CHECK_SUMS,
    TESTS_INVENTORY, TESTS_SCHEDULER. Returns name -> path (scripts keyed by test name)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    date = date or definition.date or dt.date.today()
    tag = date_tag(date)
    written: dict[str, Path] = {}
    for t in definition.tests:
        if t.script.columns:
            written[t.name] = write_script(t.script, out / script_filename(t.name, date), date)
    scripts = list(written.values())
    written["CHECK_SUMS"] = write_checksums(scripts, out / f"CHECK_SUMS_{tag}.txt")
    inventory = out / f"TESTS_INVENTORY_{tag}.txt"
    inventory.write_text("\n".join(inventory_lines(definition)) + "\n")
    written["TESTS_INVENTORY"] = inventory
    written["TESTS_SCHEDULER"] = write_scheduler(definition, out / f"TESTS_SCHEDULER_{tag}.xlsx", date)
    return written
