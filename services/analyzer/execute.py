"""Running the two stages of a job (shared by the workers, ``vison analyze`` and ``vison
reprocess``): :func:`run_extraction` and :func:`run_solve`, each returning the :class:`JobDone`
reply. Both are idempotent: an output already stored for the same job id is returned as is.

- extraction: the unit's exposure(s) as :class:`ExposureFrames` (live: the SHA-256 verified by
  the validator is trusted, no re-hash; ``job.verify`` (offline): hashed while reading, for
  provenance), ``family.run_extraction``, stored by :mod:`services.analyzer.extractions` under
  ``<products_root>/<block>/<label>/_extractions/<family>/<unit>.npz``. A frame that cannot be
  read gives ``status failed`` naming the file (the solve proceeds without that unit, MISSDATA).
- solve: the stored extractions, ``TestRun`` + ``Calibrations``, ``family.solve`` with a
  :class:`ProductWriter`, ``results.json`` (a :class:`shared.events.ResultsDocument`, atomic).

A transient storage failure on the outputs (disk full, permission denied) raises
:class:`shared.storage.StorageBlocked` (a ``shared.bus.Retry``): the job is tried again later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from services.analyzer import extractions as store_x
from services.analyzer import registry
from services.analyzer.family import Calibration, Calibrations, Family, TestRun, exposures_of
from services.analyzer.jobs import ExtractionRef, ExtractJob, JobDone, SolveJob
from services.analyzer.model import FrameMeta, run_label
from services.analyzer.products import ProductWriter, jsonable, utc_now
from shared.events import CalibrationUsed, Reanalysis, ResultsDocument
from shared.fitsio import FrameError, read_frame
from shared.flags import Flag, flag_names
from shared.paths import PathError, resolve_under
from shared.storage import StorageBlocked, storage_guard

log = logging.getLogger("vison.analyzer")

WORKER = f"{socket.gethostname()}:{os.getpid()}"


class UnreadableFrame(Exception):
    """An input frame that cannot be read (missing, truncated, changed): ``path`` names it."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path}: {reason}")


def run_dir(products_root: str | Path, block: str, label: str) -> Path:
    """``<products_root>/<block>/<label>``."""
    return Path(products_root) / block / label


def extraction_relpath(block: str, label: str, family: str, unit: str) -> str:
    """``<block>/<label>/_extractions/<family>/<unit>.npz`` (relative to the products root)."""
    return f"{block}/{label}/_extractions/{family}/{unit}.npz"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def absolute_frames(frames: list[FrameMeta], data_root: str | Path) -> list[FrameMeta]:
    """The frames with their paths resolved under ``data_root`` (relative paths in jobs; absolute
    ones, offline, are kept)."""
    out = []
    for f in frames:
        path = f.path if os.path.isabs(f.path) else str(resolve_under(data_root, f.path))
        out.append(f.model_copy(update={"path": path}))
    return out


def absolute_calibrations(cals: list[Calibration], products_root: str | Path) -> Calibrations:
    """Calibration records with their files made absolute under the products root."""
    out = []
    for c in cals:
        files = {}
        for key, rel in c.files.items():
            try:
                files[key] = rel if os.path.isabs(rel) else str(resolve_under(products_root, rel))
            except PathError as exc:
                log.warning("calibration %s file %s refused: %s", c.name, rel, exc)
        out.append(c.model_copy(update={"files": files}))
    return Calibrations(out)


def _loader(verify: bool, hashes: dict[str, str]):
    def load(meta: FrameMeta) -> np.ndarray:
        try:
            if verify:
                digest = file_sha256(meta.path)
                if meta.sha256 and digest != meta.sha256:
                    raise UnreadableFrame(meta.path, f"SHA-256 {digest[:12]}... differs from ingest's {meta.sha256[:12]}... (file changed)")
                hashes[meta.path] = digest
            return read_frame(meta.path, check_geometry=False).data  # geometry: the validator's check
        except FrameError as exc:
            raise UnreadableFrame(meta.path, exc.reason if hasattr(exc, "reason") else str(exc)) from None
        except OSError as exc:
            raise UnreadableFrame(meta.path, exc.strerror or str(exc)) from None

    return load


def _trace(exc: BaseException, frames: int = 4) -> str:
    tb = traceback.extract_tb(exc.__traceback__)[-frames:]
    lines = [f"{Path(f.filename).name}:{f.lineno} in {f.name}: {f.line}" for f in tb]
    return "\n".join(lines + traceback.format_exception_only(type(exc), exc)).strip()


# ------------------------------------------------------------------------------------ extraction


def run_extraction(job: ExtractJob, data_root: str | Path, products_root: str | Path, family: Family | None = None) -> JobDone:
    """Extract one unit (see the module docstring); never raises for bad input (a failed reply)
    except :class:`StorageBlocked`."""
    t0 = time.perf_counter()
    rel = extraction_relpath(job.block, job.label, job.family, job.unit)
    path = Path(products_root) / rel
    obsids = sorted({f.obsid for f in job.frames})
    base = dict(job_id=job.job_id, job_kind="extract", block=job.block, label=job.label, family=job.family, unit=job.unit,
                worker=WORKER)
    if path.is_file() and store_x.stored_job_id(path) == job.job_id:
        return JobDone(status="completed", extraction=ExtractionRef(unit=job.unit, path=rel, sha256=file_sha256(path),
                                                                    job_id=job.job_id, obsids=obsids),
                       duration_s=time.perf_counter() - t0, reused=True, **base)
    try:
        fam = family or registry.by_name(job.family)
        frames = absolute_frames(job.frames, data_root)
        hashes: dict[str, str] = {}
        exposures = exposures_of(frames, job.block, _loader(job.verify, hashes))
        calib = absolute_calibrations(job.calibrations, products_root)
        params = fam.parameters({**job.params})
        extraction = fam.run_extraction(exposures, calib, params)
        for e in exposures:
            e.release()
    except (UnreadableFrame, PathError) as exc:
        where = exc.path if isinstance(exc, (UnreadableFrame, PathError)) else ""
        return JobDone(status="failed", error=f"{job.label} {job.block} unit {job.unit}: frame {where} cannot be read: "
                       f"{getattr(exc, 'reason', exc)}", failed_file=str(where), duration_s=time.perf_counter() - t0, **base)
    except StorageBlocked:
        raise
    except Exception as exc:  # a family bug on this unit: the unit fails, the worker lives on
        return JobDone(status="failed", error=f"{job.label} {job.block} unit {job.unit}: extraction failed: "
                       f"{exc.__class__.__name__}: {exc}\n{_trace(exc)}", duration_s=time.perf_counter() - t0, **base)
    if hashes:
        extraction.notes.append("inputs " + json.dumps({Path(p).name: h for p, h in sorted(hashes.items())}))
    with storage_guard("products", path.parent):
        store_x.save(path, extraction, job.job_id)
    return JobDone(status="completed", extraction=ExtractionRef(unit=job.unit, path=rel, sha256=file_sha256(path),
                                                                job_id=job.job_id, obsids=obsids),
                   duration_s=time.perf_counter() - t0, **base)


# ------------------------------------------------------------------------------------ solve


def _reused_solve(job: SolveJob, out: Path) -> ResultsDocument | None:
    path = out / "results.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (doc.get("provenance") or {}).get("job_id") != job.job_id:
        return None
    return ResultsDocument.model_validate(doc)


def run_solve(job: SolveJob, data_root: str | Path, products_root: str | Path, family: Family | None = None,
              figures: bool = True) -> JobDone:
    """Solve one test run from its extractions (see the module docstring)."""
    t0 = time.perf_counter()
    out = run_dir(products_root, job.block, job.label)
    base = dict(job_id=job.job_id, job_kind="solve", block=job.block, label=job.label, family=job.family, worker=WORKER)
    reused = _reused_solve(job, out)
    if reused is not None:
        return JobDone(status=reused.status, results=reused, error=reused.error, duration_s=time.perf_counter() - t0,
                       reused=True, **base)
    frames = absolute_frames(job.frames, data_root) if job.frames else []
    if job.extractions:  # the exposures actually analysed (a failed unit's are not)
        obsids = sorted({o for e in job.extractions if not e.failed for o in e.obsids})
    else:
        obsids = sorted({f.obsid for f in frames})
    flags = Flag(job.flags)
    notes = list(job.notes)
    input_flags = 0
    for f in frames:
        input_flags |= int(f.flags)
    calib = absolute_calibrations(job.calibrations, products_root)
    used = [CalibrationUsed(name=c.name, test=c.test, event_id=c.event_id, produced_at=c.produced_at, files=dict(c.files))
            for c in calib]
    provenance = {
        "block": job.block, "test": job.test, "repeat": job.repeat, "label": job.label, "obsids": obsids,
        "obsid_range": [obsids[0], obsids[-1]] if obsids else [], "family": job.family,
        "family_version": job.family_version, "job_id": job.job_id, "started": utc_now(),
        "inputs": [{"file": Path(f.path).name, "path": f.path, "obsid": f.obsid, "ccd": f.ccd_name, "sha256": f.sha256}
                   for f in frames],
        "extractions": [e.model_dump(exclude_none=True) for e in job.extractions],
        "calibrations": [c.model_dump(mode="json") for c in used],
    }
    if job.reprocess:
        provenance["reprocess"] = job.reprocess
    doc = ResultsDocument(test=job.test, block=job.block, repeat=job.repeat or None, label=job.label, obsids=obsids,
                          n_frames=len(obsids), expected_frames=job.expected_exposures, input_flags=input_flags,
                          input_flag_names=flag_names(input_flags), calibrations=used, notes=notes)
    if job.reanalysis_of or job.reanalysis_reason:
        doc.reanalysis = Reanalysis(of=job.reanalysis_of, reason=job.reanalysis_reason or "re-analysis")
    try:
        with storage_guard("products", out):
            out.mkdir(parents=True, exist_ok=True)
        fam = family or registry.by_name(job.family)
        params = fam.parameters({**job.params})
        provenance["parameters"] = jsonable({**job.params, **params.model_dump(mode="json")})
        writer = ProductWriter(out, provenance, root=products_root, figures=figures)
        loaded = []
        for ref in job.extractions:
            if ref.failed or not ref.path:
                continue
            loaded.append(store_x.load(resolve_under(products_root, ref.path), fam.extraction))
        run = TestRun.of(job.label, job.block, frames, params=dict(job.params), expected_exposures=job.expected_exposures,
                         flags=int(flags), notes=notes)
        output = fam.solve(loaded, calib, params, run, writer)
    except StorageBlocked:
        raise
    except Exception as exc:
        if isinstance(exc, OSError):
            from shared.storage import blocked_reason

            reason = blocked_reason(exc)
            if reason:
                raise StorageBlocked("products", out, reason, str(exc)) from exc
        summary = f"{job.label} {job.block}: {exc.__class__.__name__}: {exc}"
        flags |= Flag.SUBTASKCRASH
        doc.status, doc.flags, doc.flag_names, doc.error = "failed", int(flags), flag_names(int(flags)), summary
        doc.traceback = _trace(exc)
        doc.duration_s = time.perf_counter() - t0
        try:
            with storage_guard("products", out):
                writer = ProductWriter(out, provenance, root=products_root, figures=False)
                _write(writer, doc)
        except StorageBlocked:
            raise
        except Exception:  # pragma: no cover
            log.exception("could not write the failed results.json of %s", job.job_id)
        return JobDone(status="failed", results=doc, error=summary, duration_s=time.perf_counter() - t0, **base)
    flags |= Flag(output.flags)
    writer.set_parameters({**provenance.get("parameters", {}), **jsonable(output.parameters)})
    doc.status, doc.flags, doc.flag_names = "completed", int(flags), flag_names(int(flags))
    doc.results = jsonable(output.results)
    doc.test_values = jsonable(output.test_values)
    doc.summary = list(output.summary)
    doc.frames = jsonable(output.frames)
    doc.provides = jsonable(output.provides or {})
    doc.duration_s = time.perf_counter() - t0
    doc.warnings = list(writer.errors)
    with storage_guard("products", out):
        doc = _write(writer, doc)
    return JobDone(status="completed", results=doc, duration_s=time.perf_counter() - t0, **base)


def _write(writer: ProductWriter, doc: ResultsDocument) -> ResultsDocument:
    """results.json through the writer (products list + provenance added); the final document."""
    path = writer.write_results(doc.model_dump(mode="json", by_alias=True))
    return ResultsDocument.model_validate(json.loads(path.read_text()))


def provided_calibrations(doc: ResultsDocument, event_id: str | None, produced_at: Any = None) -> list[Calibration]:
    """The :class:`Calibration` records a completed result provides (files relative to the
    products root: ``<block>/<label>/<file>``)."""
    if doc.status != "completed":
        return []
    label = doc.label or run_label(doc.test, doc.repeat or 0)
    out = []
    for name, item in (doc.provides or {}).items():
        files = {k: f"{doc.block}/{label}/{v}" for k, v in (item.get("files") or {}).items()}
        out.append(Calibration(name=name, block=doc.block, test=label, event_id=event_id, produced_at=produced_at,
                               values=item.get("values") or {}, files=files))
    return out


def run_job(job: ExtractJob | SolveJob, data_root: str | Path, products_root: str | Path, figures: bool = True) -> JobDone:
    """Either stage."""
    if isinstance(job, ExtractJob):
        return run_extraction(job, data_root, products_root)
    return run_solve(job, data_root, products_root, figures=figures)


__all__ = ["UnreadableFrame", "extraction_relpath", "provided_calibrations", "run_dir", "run_extraction", "run_job", "run_solve"]
