"""Writers of ELVIS-like test data for the ingest / validator / fault tests (and checks of them).

Full-size frames are a fixed noise field (generated once per process) plus a known offset per
quadrant, so that writing an exposure costs well under a second and the expected offsets are
exact. Small frames (``size="tiny"``) serve tests that never read pixels (ingest alone).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from shared.explog import explog_header, format_explog_row
from shared.filenames import day_folder_name, explog_name, format_fits_name, hk_daily_name, hk_exposure_name
from shared.fitsio import write_frame
from shared.geometry import QUADRANTS, Geometry, assemble
from shared.hk import format_hk_row, hk_header
from shared.refdata import block_offsets

BASE_DATE = datetime(2026, 3, 14, 10, 0, 0)
NOISE_ADU = 1.2
_NOISE: dict[tuple[int, int], np.ndarray] = {}


def noise_field(shape: tuple[int, int]) -> np.ndarray:
    """A fixed Gaussian field (std NOISE_ADU), the same for every frame of a process."""
    if shape not in _NOISE:
        rng = np.random.default_rng(12345)
        _NOISE[shape] = rng.standard_normal(shape, dtype=np.float32) * np.float32(NOISE_ADU)
    return _NOISE[shape]


def frame_data(offsets: dict[str, float], geometry: Geometry | None = None, signal: float = 0.0) -> np.ndarray:
    """A full frame: each quadrant at its offset (ADU) + noise (+ ``signal`` ADU in the image area)."""
    geometry = geometry or Geometry()
    quads = {}
    for q in QUADRANTS:
        quad = np.full((geometry.quad_rows, geometry.quad_cols), offsets[q], dtype=np.float32)
        if signal:
            quad[:2066, 51:51 + 2048] += np.float32(signal)
        quads[q] = quad
    return assemble(quads, geometry) + noise_field(geometry.shape)


def default_offsets(block: str = "UNKNOWN", obsid: int = 0) -> dict[str, dict[str, float]]:
    """Block reference offsets shifted by a few ADU (distinct per CCD, quadrant and ObsID)."""
    ref = block_offsets(block)
    return {ccd: {q: ref[ccd][q] + (obsid % 7) + 2 * i - 3 * c for i, q in enumerate(QUADRANTS)}
            for c, ccd in enumerate(("CCD1", "CCD2", "CCD3"))}


def explog_values(obsid: int, ccd: int, date: datetime, test: str, **extra: Any) -> dict[str, Any]:
    name = format_fits_name(obsid, date, 1, ccd)[:-5]
    values = {
        "ObsID": obsid, "File_name": name, "CCD": ccd, "ROE": 1, "date": date, "program": "CALCAMP",
        "test": test, "exptime": 0.0, "vstart": 0, "vend": 2086, "chinj": 0, "v_tpump": 0, "s_tpump": 0,
        "wave": 4, "source": "flat", "IDL": 13.0, "IDH": 18.0, "RD_T": 16.0, "RD_B": 16.0,
        "IG2_T": 2.0, "IG2_B": 2.0, "operator": "tester",
    }
    for c in (1, 2, 3):
        for s in "TB":
            values[f"OD_{c}_{s}"] = 26.0
            values[f"IG1_{c}_{s}"] = 6.0
            values[f"R1C{c}_T{s}"] = -120.0
    values.update(extra)
    return values


def hk_values(**override: float) -> dict[str, float]:
    """Nominal HK readings (inside P and S limits) for the keys the validator checks."""
    v: dict[str, float] = {}
    for c in (1, 2, 3):
        for s in "TB":
            v[f"CCD{c}_TEMP_{s}"] = -120.0
            v[f"CCD{c}_OD_{s}"] = 26.0
            v[f"CCD{c}_IG1_{s}"] = 6.0
    v.update({"COMM_RD_T": 16.0, "COMM_RD_B": 16.0, "COMM_IG2_T": 2.0, "COMM_IG2_B": 2.0,
              "VID_PCB_TEMP_T": 20.0, "VID_PCB_TEMP_B": 20.0, "FPGA_PCB_TEMP_T": 20.0, "FPGA_PCB_TEMP_B": 20.0})
    v.update(override)
    return v


def write_exposure(
    root: Path,
    obsid: int,
    *,
    test: str = "BIAS01",
    offsets: dict[str, dict[str, float]] | None = None,
    date: datetime | None = None,
    size: str = "full",
    ccds: tuple[int, ...] = (1, 2, 3),
    log_ccds: tuple[int, ...] | None = None,
    hk: dict[str, float] | None = None,
    signal: float = 0.0,
    atomic: bool = True,
    explog_extra: dict[str, Any] | None = None,
    block: str = "UNKNOWN",
) -> dict[str, Any]:
    """Write one exposure like ELVIS (FITS of ``ccds``, the per-exposure HK file, then the log
    rows of ``log_ccds``); returns ``{"obsid", "files": {ccd: Path}, "offsets"}``."""
    date = date or BASE_DATE + timedelta(seconds=100 * obsid)
    folder = Path(root) / day_folder_name(date.date())
    folder.mkdir(parents=True, exist_ok=True)
    offsets = offsets or default_offsets(block, obsid)
    files = {}
    for c in ccds:
        path = folder / format_fits_name(obsid, date, 1, c)
        if size == "tiny":
            data = np.full((8, 8), 1000 + c, dtype=np.float32)
        else:
            data = frame_data(offsets[f"CCD{c}"], signal=signal)
        write_frame(path, data, c, header={"OBSID": obsid, "vstart": 0, "vend": 2086}, atomic=atomic)
        files[c] = path
    hk_rows = [format_hk_row(date + timedelta(seconds=s), hk_values(**(hk or {}))) for s in (0, 5, 10)]
    (folder / hk_exposure_name(obsid, date, 1)).write_text(hk_header() + "".join(hk_rows))
    rows = "".join(format_explog_row(explog_values(obsid, c, date, test, **(explog_extra or {})))
                   for c in (ccds if log_ccds is None else log_ccds))
    append_log(folder / explog_name(date.date()), rows)
    return {"obsid": obsid, "files": files, "offsets": offsets, "folder": folder, "date": date}


def append_log(path: Path, text: str) -> None:
    """Append to an exposure log (header first when new), in one write."""
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", encoding="utf-8", newline="") as fh:
        fh.write((explog_header() if new else "") + text)


def append_daily_hk(root: Path, date: datetime, rows: list[dict[str, float]], period_s: float = 1.0) -> Path:
    folder = Path(root) / day_folder_name(date.date())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / hk_daily_name(date.date(), 1)
    new = not path.exists()
    with open(path, "a", encoding="utf-8") as fh:
        if new:
            fh.write(hk_header())
        for i, values in enumerate(rows):
            fh.write(format_hk_row(date + timedelta(seconds=i * period_s), values))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_written_exposure_is_readable(tmp_path):
    from shared.explog import read_explog
    from shared.fitsio import read_frame
    from shared.hk import read_hk

    info = write_exposure(tmp_path, 7, size="full", ccds=(2,), log_ccds=(1, 2, 3))
    frame = read_frame(info["files"][2])
    from shared.qla import frame_qla

    report = frame_qla(frame.data)
    assert abs(report["F"]["pre"]["p50"] - info["offsets"]["CCD2"]["F"]) <= 1
    log = read_explog(next(info["folder"].glob("EXP_LOG_*.txt")))
    assert [r.ccd for r in log.rows] == [1, 2, 3] and log.rows[0].obsid == 7 and log.rows[0].test == "BIAS01"
    table = read_hk(next(info["folder"].glob("HK_7_*.txt")))
    assert table.n_rows == 3 and float(table.values["CCD1_TEMP_T"][0]) == -120.0
