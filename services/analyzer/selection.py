"""Offline selection of a test's frames in a data folder: the exposure logs of every day folder
say which ObsIDs / CCD files belong to the test; the FITS files are found by name."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from services.analyzer.model import FrameMeta
from shared.explog import ExpLogRow, merge_explogs, read_explog


@dataclass
class Selection:
    """Frames of one test in a data folder and what is wrong with them."""

    test: str
    frames: list[FrameMeta]
    missing_files: list[str] = field(default_factory=list)  # "ObsID n CCDc: name"
    incomplete_exposures: dict[int, list[int]] = field(default_factory=dict)  # obsid -> CCDs present
    tests_found: Counter = field(default_factory=Counter)  # test -> exposures in the logs
    explog_errors: list[str] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def obsids(self) -> list[int]:
        return sorted({f.obsid for f in self.frames})

    def complete_frames(self) -> list[FrameMeta]:
        """Frames of the exposures that have all their files and CCDs."""
        return [f for f in self.frames if f.obsid not in self.incomplete_exposures]


def find_explogs(data_dir: Path) -> list[Path]:
    """Every ``EXP_LOG_*.txt`` in the folder and its day folders, oldest folder first."""
    return sorted(Path(data_dir).rglob("EXP_LOG_*.txt"), key=lambda p: (p.parent.name, p.name))


def _frame(row: ExpLogRow, path: Path) -> FrameMeta:
    exptime = row.get("exptime", 0.0)
    try:
        exptime = float(exptime or 0.0)
    except (TypeError, ValueError):
        exptime = 0.0
    return FrameMeta(obsid=row.obsid, ccd=row.ccd or 1, path=str(path.resolve()), exptime=exptime, date=row.date,
                     test=row.test, values={k: v for k, v in row.values.items()})


def select_test(data_dir: str | Path, test: str, ccds: int = 3) -> Selection:
    """The frames of ``test`` (exact exposure-log test name, e.g. ``BIAS01`` or ``BIAS01.2``)."""
    data_dir = Path(data_dir)
    logs = find_explogs(data_dir)
    sel = Selection(test=test, frames=[], logs=logs)
    if not logs:
        return sel
    merged = merge_explogs([read_explog(p, complete=True) for p in logs])
    sel.explog_errors = [f"line {n}: {why}" for n, why in merged.errors]
    per_test: dict[str, set[int]] = {}
    for row in merged.rows:
        per_test.setdefault(row.test, set()).add(row.obsid)
    sel.tests_found = Counter({t: len(o) for t, o in per_test.items()})
    rows = [r for r in merged.rows if r.test == test]
    if not rows:
        return sel
    fits_index: dict[str, Path] = {}
    for p in data_dir.rglob("*.fits"):
        fits_index.setdefault(p.name, p)
    by_obsid: dict[int, set[int]] = {}
    for row in rows:
        name = row.file_name if row.file_name.endswith(".fits") else f"{row.file_name}.fits"
        path = fits_index.get(name)
        if path is None:
            sel.missing_files.append(f"ObsID {row.obsid} CCD{row.ccd}: {name}")
            continue
        sel.frames.append(_frame(row, path))
        by_obsid.setdefault(row.obsid, set()).add(row.ccd or 1)
    for obsid in {r.obsid for r in rows}:
        present = by_obsid.get(obsid, set())
        if len(present) < ccds:
            sel.incomplete_exposures[obsid] = sorted(present)
    sel.frames.sort(key=lambda f: (f.obsid, f.ccd))
    return sel
