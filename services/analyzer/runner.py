"""Run one test analysis end to end (shared by ``vison analyze`` and the analyzer workers):
check the input files (existence, SHA-256 against ingest's), find the block's calibrations
(BIAS results, PTC gains), call the test's analysis module, write its products and
``results.json`` under ``<products_root>/<block>/<test>[.<repeat>]/``.

A failing analysis raises :class:`AnalysisFailed`, which can write a ``results.json``
(``status: failed``, flag SUBTASKCRASH, the error and a traceback summary).
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.analyzer import registry
from services.analyzer.analysis.common import params_of
from services.analyzer.model import FrameMeta, TestData, run_label, split_test_name
from services.analyzer.products import ProductWriter, jsonable, utc_now
from shared.checksum import sha256_file
from shared.fitsio import FrameError, read_frame
from shared.flags import Flag, flag_names

log = logging.getLogger("vison.analyzer")

#: Where a test's calibrations come from: results of these tests of the same block (first found).
BIAS_SOURCES = ("BIAS01", "BIAS02")
GAIN_SOURCES = ("PTC01",)
#: Tests that merge the block's DARK01 defect mask (master_dark_<CCD>.fits, MASK) when there is one.
MASK_USERS = ("COSMETICS00",)


class DataError(Exception):
    """Input data that cannot be analysed (missing / changed / unreadable file); says which."""


class AnalysisFailed(Exception):
    """An analysis raised; ``summary`` is one line, ``trace`` the traceback summary.
    :meth:`write_results` writes the ``results.json`` with ``status: failed`` (the caller decides:
    a worker that lost its job to another worker must not overwrite that worker's results)."""

    def __init__(self, summary: str, trace: str = "", writer: Any = None, doc: dict[str, Any] | None = None):
        self.summary = summary
        self.trace = trace
        self.results_path: str | None = None
        self._writer, self._doc = writer, doc
        super().__init__(summary)

    def write_results(self) -> str | None:
        if self._writer is None or self._doc is None or self.results_path:
            return self.results_path
        try:
            self.results_path = str(self._writer.write_results(self._doc))
        except Exception:  # pragma: no cover - disk full etc.
            log.exception("could not write the failed results.json")
        return self.results_path


@dataclass
class RunResult:
    """Outcome of a completed analysis."""

    doc: dict[str, Any]
    out_dir: Path
    results_path: Path
    products: list[str]
    duration_s: float
    flags: int
    warnings: list[str] = field(default_factory=list)


def products_dir(root: str | Path, block: str, label: str) -> Path:
    """``<root>/<block>/<test>[.<repeat>]``."""
    return Path(root) / block / label


def _latest_results(root: Path, block: str, test: str) -> Path | None:
    """results.json of the latest completed run of ``test`` (repeats included) of a block."""
    base = Path(root) / block
    if not base.is_dir():
        return None
    found = []
    for d in base.iterdir():
        name, _ = split_test_name(d.name)
        path = d / "results.json"
        if name == test and path.is_file():
            found.append(path)
    for path in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if doc.get("status") == "completed":
            return path
    return None


def find_calibrations(root: str | Path, block: str, test: str = "") -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Calibrations of a block from earlier results: ``{"bias": results of BIAS01/02,
    "gain": {CCD: {Q: e-/ADU}} of PTC01}`` and the list of files used (for provenance)."""
    calib: dict[str, Any] = {}
    used: list[dict[str, Any]] = []
    root = Path(root)
    if registry.base_test(test) not in BIAS_SOURCES:
        for src in BIAS_SOURCES:
            path = _latest_results(root, block, src)
            if path:
                calib["bias"] = json.loads(path.read_text()).get("results") or {}
                used.append({"kind": "bias", "file": str(path), "sha256": sha256_file(path)})
                break
    if registry.base_test(test) in MASK_USERS:
        path = _latest_results(root, block, "DARK01")
        if path:
            files = {f.stem.rsplit("_", 1)[-1]: f for f in sorted(path.parent.glob("master_dark_CCD*.fits"))}
            if files:
                calib["dark_mask_files"] = {ccd: str(f) for ccd, f in files.items()}
                used += [{"kind": "dark_mask", "file": str(f), "sha256": sha256_file(f)} for f in files.values()]
    for src in GAIN_SOURCES:
        path = _latest_results(root, block, src)
        if not path:
            continue
        res = json.loads(path.read_text()).get("results") or {}
        gains = {ccd: {q: v.get("gain") for q, v in quads.items() if isinstance(v, dict) and v.get("gain")}
                 for ccd, quads in res.items() if isinstance(quads, dict)}
        gains = {c: g for c, g in gains.items() if g}
        if gains:
            calib["gain"] = gains
            used.append({"kind": "gain", "file": str(path), "sha256": sha256_file(path)})
            break
    return calib, used


def check_inputs(frames: list[FrameMeta], verify: bool = True) -> list[dict[str, Any]]:
    """Every input file exists and (``verify``) matches its SHA-256 from ingest; returns the
    provenance input list ``[{file, obsid, ccd, sha256}]``. Raises :class:`DataError`."""
    inputs = []
    missing = [f"{f.obsid}/CCD{f.ccd}: {f.path}" for f in frames if not Path(f.path).is_file()]
    if missing:
        raise DataError(f"{len(missing)} input file(s) missing: " + "; ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    for f in frames:
        digest = sha256_file(f.path) if verify or not f.sha256 else f.sha256
        if f.sha256 and digest != f.sha256:
            raise DataError(f"{f.path}: SHA-256 {digest[:12]}... differs from ingest's {f.sha256[:12]}... (file changed)")
        inputs.append({"file": Path(f.path).name, "path": f.path, "obsid": f.obsid, "ccd": f.ccd_name, "sha256": digest})
    return inputs


def _loader(meta: FrameMeta) -> np.ndarray:
    try:
        return read_frame(meta.path).data
    except FrameError as exc:
        raise DataError(f"ObsID {meta.obsid} CCD{meta.ccd}: {exc}") from None


def _calib_loader(calib: dict[str, Any]):
    def load(kind: str, ccd: str) -> np.ndarray | None:
        if kind == "dark_mask":
            path = (calib.get("dark_mask_files") or {}).get(ccd)
            if path:
                from astropy.io import fits

                return np.asarray(fits.getdata(path, "MASK"))
        return None

    return load


def _trace_summary(exc: BaseException, frames: int = 4) -> str:
    tb = traceback.extract_tb(exc.__traceback__)[-frames:]
    lines = [f"{Path(f.filename).name}:{f.lineno} in {f.name}: {f.line}" for f in tb]
    return "\n".join(lines + traceback.format_exception_only(type(exc), exc)).strip()


def run_analysis(
    test: str,
    block: str,
    frames: list[FrameMeta],
    products_root: str | Path,
    *,
    out_dir: str | Path | None = None,
    params: dict[str, Any] | None = None,
    expected_frames: int | None = None,
    partial: bool = False,
    job_id: str | None = None,
    verify: bool = True,
    figures: bool = True,
    extra_flags: int = 0,
) -> RunResult:
    """Analyse the frames of one test run (``test`` may carry a repeat suffix ``BIAS01.2``).

    Raises :class:`registry.UnknownTest`, :class:`DataError` (before writing anything) or
    :class:`AnalysisFailed` (products written so far stay; ``write_results()`` on it writes the
    ``results.json`` with ``status: failed``)."""
    t0 = time.perf_counter()
    base, repeat = split_test_name(test)
    label = run_label(base, repeat)
    module = registry.get(base)
    if not frames:
        raise DataError(f"{label} {block}: no frames")
    inputs = check_inputs(frames, verify)
    obsids = sorted({f.obsid for f in frames})
    calib, calib_used = find_calibrations(products_root, block, base)
    out = Path(out_dir) if out_dir is not None else products_dir(products_root, block, label)
    flags = Flag(extra_flags)
    if partial or (expected_frames is not None and len(obsids) != expected_frames):
        flags |= Flag.MISSDATA
    input_flags = 0
    for f in frames:
        input_flags |= int(f.flags)
    resolved = dict(params or {})
    model = getattr(module, "PARAMS", None)  # optional: the plug-in's parameter model
    if model is not None:
        resolved = {**params_of(model, resolved).model_dump(mode="json"), **resolved}
    provenance = {
        "block": block, "test": base, "repeat": repeat, "label": label, "obsids": obsids,
        "obsid_range": [obsids[0], obsids[-1]], "inputs": inputs, "calibrations": calib_used,
        "parameters": jsonable(resolved), "job_id": job_id, "started": utc_now(),
    }
    writer = ProductWriter(out, provenance, root=products_root, figures=figures)
    data = TestData(test=base, block=block, repeat=repeat, frames=frames, loader=_loader, params=dict(params or {}),
                    expected_frames=expected_frames, flags=int(flags), calib=calib, calib_loader=_calib_loader(calib))
    doc: dict[str, Any] = {
        "schema": "vison.results/1", "test": base, "repeat": repeat, "label": label, "block": block,
        "n_frames": len(obsids), "expected_frames": expected_frames, "obsids": obsids,
        "input_flags": input_flags, "input_flag_names": flag_names(input_flags),
    }
    try:
        output = module.run_test(data, writer)
    except DataError:
        raise
    except Exception as exc:
        summary = f"{label} {block}: {exc.__class__.__name__}: {exc}"
        trace = _trace_summary(exc)
        flags |= Flag.SUBTASKCRASH
        doc.update(status="failed", flags=int(flags), flag_names=flag_names(int(flags)), error=summary, traceback=trace,
                   duration_s=time.perf_counter() - t0, results={})
        raise AnalysisFailed(summary, trace, writer, doc) from exc
    flags |= Flag(output.flags)
    writer.set_parameters({**resolved, **output.parameters})
    duration = time.perf_counter() - t0
    doc.update(
        status="completed", flags=int(flags), flag_names=flag_names(int(flags)), results=output.results,
        test_values=output.test_values, summary=output.summary, frames=output.frames, duration_s=duration,
        warnings=writer.errors,
    )
    path = writer.write_results(doc)
    final = json.loads(path.read_text())
    return RunResult(final, out, path, writer.product_paths(), duration, int(flags), writer.errors)
