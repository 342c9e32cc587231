"""Test families and helpers of the analyzer engine tests (no tests here).

Small frames (``SHAPE``): the families below need no CCD geometry. Loaded by the engine through
``VISON_ANALYZER_PLUGINS=<this file>``.

- ``qmean`` (test ``QMEAN01``): extraction = per CCD / quadrant mean of one exposure; solve =
  the average over exposures (``mean_adu``), ``mean_e`` when a ``gain`` calibration exists;
  an optional ``sleep`` parameter slows the extraction (``VISON_TEST_MARKER`` dir: a file
  ``<pid>.x`` is created when an extraction starts, ``<pid>.s`` when a solve starts);
- ``tbias`` (``TBIAS01``): like qmean, provides ``master_bias`` (values + a FITS file per CCD),
  needs ``gain`` (rerun, from TPTC01) as the real BIAS family;
- ``tdark`` (``TDARK01``): needs ``master_bias`` (wait, from TBIAS01) as DARK01 does; results
  ``dark_adu`` = mean - bias;
- ``tptc`` (``TPTC01``): provides ``gain`` = ``gain`` parameter (e-/ADU, default 2.0).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from services.analyzer.family import GAIN, MASTER_BIAS, Calibrations, ExposureFrames, Extraction, Family, Need, TestRun, exposure_unit
from services.analyzer.model import AnalysisOutput, ImageProduct
from shared.events import ExposureValidated, FileRef

QUADS = ("E", "F", "G", "H")
SHAPE = (16, 20)


class QParams(BaseModel):
    sleep: float = 0.0
    gain: float = 2.0


class QExtraction(Extraction):
    means: dict[str, dict[str, float]]
    profile: np.ndarray | None = None


def _mark(kind: str) -> None:
    folder = os.environ.get("VISON_TEST_MARKER")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{os.getpid()}.{kind}").write_text(str(time.time()))


def quads_of(data: np.ndarray) -> dict[str, np.ndarray]:
    h, w = data.shape[0] // 2, data.shape[1] // 2
    return {"E": data[:h, :w], "F": data[:h, w:], "G": data[h:, w:], "H": data[h:, :w]}


def extract(exposure: ExposureFrames, calib: Calibrations, params: QParams) -> QExtraction:
    _mark("x")
    if params.sleep:
        time.sleep(params.sleep)
    means = {}
    prof = []
    for ccd in exposure.ccds():
        data = exposure.load(ccd)
        means[ccd] = {q: float(np.mean(a)) for q, a in quads_of(data).items()}
        prof.append(data.mean(axis=1))
        exposure.release(ccd)
    return QExtraction(family="qmean", unit=exposure_unit(exposure.obsid), obsids=[exposure.obsid], ccds=exposure.ccds(),
                       flags=exposure.flags, means=means, profile=np.array(prof))


def _average(extractions: list[QExtraction]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for ccd in sorted({c for e in extractions for c in e.means}):
        out[ccd] = {q: float(np.mean([e.means[ccd][q] for e in extractions if ccd in e.means])) for q in QUADS}
    return out


def solve(extractions: list[QExtraction], calib: Calibrations, params: QParams, run: TestRun, sink) -> AnalysisOutput:
    _mark("s")
    if params.sleep:
        time.sleep(params.sleep)
    if not extractions:
        raise ValueError(f"{run.label}: no extraction to solve")
    avg = _average(extractions)
    results = {}
    for ccd, quads in avg.items():
        results[ccd] = {}
        for q, m in quads.items():
            g = calib.gain(ccd, q)
            results[ccd][q] = {"mean_adu": m, "n": len(extractions), "mean_e": m * g if g else None}
    return AnalysisOutput(results=results, summary=[f"{len(extractions)} exposure(s)"], flags=0)


def solve_bias(extractions, calib, params, run, sink) -> AnalysisOutput:
    out = solve(extractions, calib, params, run, sink)
    files = {}
    for ccd in out.results:
        sink.add(ImageProduct(name=f"tmaster_{ccd}", ccd=ccd, extensions={"BIAS": np.full(SHAPE, out.results[ccd]["E"]["mean_adu"], np.float32)}))
        files[ccd] = f"tmaster_{ccd}.fits"
    out.provides = {MASTER_BIAS: {"values": {c: {q: v["mean_adu"] for q, v in qs.items()} for c, qs in out.results.items()},
                                  "files": files}}
    return out


def solve_dark(extractions, calib, params, run, sink) -> AnalysisOutput:
    out = solve(extractions, calib, params, run, sink)
    bias = calib.get(MASTER_BIAS)
    for ccd, quads in out.results.items():
        for q, v in quads.items():
            b = bias.values[ccd][q] if bias is not None else None
            v["dark_adu"] = v["mean_adu"] - b if b is not None else None
            if bias is not None:  # the file is there and readable
                assert calib.image(MASTER_BIAS, ccd, "BIAS") is not None
    return out


def solve_ptc(extractions, calib, params, run, sink) -> AnalysisOutput:
    out = solve(extractions, calib, params, run, sink)
    out.provides = {GAIN: {"values": {"gain": {c: {q: params.gain for q in QUADS} for c in out.results}}, "files": {}}}
    return out


FAMILIES = [
    Family(name="qmean", tests=("QMEAN01",), params=QParams, extract=extract, solve=solve, extraction=QExtraction),
    Family(name="tbias", tests=("TBIAS01",), params=QParams, extract=extract, solve=solve_bias, extraction=QExtraction,
           needs=(Need(GAIN, "rerun", ("TPTC01",)),), provides=(MASTER_BIAS,)),
    Family(name="tdark", tests=("TDARK01",), params=QParams, extract=extract, solve=solve_dark, extraction=QExtraction,
           needs=(Need(MASTER_BIAS, "wait", ("TBIAS01",)), Need(GAIN, "rerun", ("TPTC01",)))),
    Family(name="tptc", tests=("TPTC01",), params=QParams, extract=extract, solve=solve_ptc, extraction=QExtraction,
           provides=(GAIN,)),
]

PLUGIN = __file__


# ----------------------------------------------------------------------------- data helpers


def write_exposures(data_root: Path, test: str, obsids: list[int], level: float = 1000.0, seed: int = 0,
                    day: str = "011125") -> list[ExposureValidated]:
    """Small 3-CCD exposures (FITS + an exposure log) and their ``exposure.validated`` events."""
    from astropy.io import fits

    from shared.explog import explog_header, format_explog_row

    rng = np.random.default_rng(seed)
    folder = data_root / day
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"EXP_LOG_{day}.txt"
    if not log.exists():
        log.write_text(explog_header())
    events = []
    for obsid in obsids:
        files, rows = [], []
        for ccd in (1, 2, 3):
            name = f"EUC_{obsid}_{day}D120000T_ROE1_CCD{ccd}"
            path = folder / f"{name}.fits"
            data = (level + 10 * ccd + rng.normal(0, 2, SHAPE)).astype(np.float32)
            data[:, SHAPE[1] // 2:] += 5  # quadrants differ
            fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data)]).writeto(path, overwrite=True)
            blob = path.read_bytes()
            files.append(FileRef(ccd=ccd, path=path.relative_to(data_root).as_posix(), sha256=hashlib.sha256(blob).hexdigest(),
                                 size=len(blob)))
            values = {"ObsID": obsid, "File_name": name, "CCD": f"CCD{ccd}", "ROE": "ROE1", "date": f"{day}D120000T",
                      "test": test, "exptime": 1.0}
            rows.append({**values, "ccd": ccd})
            with open(log, "a") as fh:
                fh.write(format_explog_row(values))
        events.append(ExposureValidated(obsid=obsid, block="BORN", test=test, files=files, explog=rows, passed=True, flags=0,
                                        flag_names=[], compliance={}, stats={}, producer="validator"))
    return events


def results_json(products: Path, block: str, label: str) -> dict:
    return json.loads((products / block / label / "results.json").read_text())
