"""The analyzer's internal messages (never on the topic exchange): the jobs the coordinator puts
on ``<prefix>.analyzer.jobs`` (competing workers, prefetch 1) and the :class:`JobDone` replies a
worker sends to the job's ``reply_to`` queue once its outputs are durable.

- :class:`ExtractJob`: one extraction unit (an exposure ``e123`` or a pair ``p123-124``) of a
  family for a test run;
- :class:`SolveJob`: the solve of a test run from its extractions (plus the run's frames, for
  the families that stack them);
- :class:`JobDone`: ``completed`` | ``failed`` with the extraction reference or the results
  document.

Job ids are deterministic hashes of the inputs (frames and their SHA-256, family and its
version, parameters, calibration event ids): the same inputs give the same id, which is what
makes re-running (a redelivered job, a second ``vison reprocess``) free.

Frame paths in jobs are relative to the data root and extraction paths relative to the products
root of the executing host (resolved with :func:`shared.paths.resolve_under`); calibration files
are relative to the products root too (made absolute by the executing side).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal, Union

from pydantic import BaseModel, Field

from services.analyzer.family import Calibration
from services.analyzer.model import FrameMeta, split_test_name
from shared.config import Settings
from shared.events import ResultsDocument
from shared.topology import work_queue_name


def jobs_queue(settings: Settings) -> str:
    """``<prefix>.analyzer.jobs``: the shared work queue."""
    return work_queue_name(settings, "analyzer.jobs")


def done_queue(settings: Settings) -> str:
    """``<prefix>.analyzer.done``: the live coordinator's reply queue."""
    return work_queue_name(settings, "analyzer.done")


def reprocess_queue(settings: Settings, run_id: str) -> str:
    """``<prefix>.reprocess.<run id>``: the reply queue of one ``vison reprocess``."""
    return work_queue_name(settings, f"reprocess.{run_id}")


def digest(*parts: Any) -> str:
    """Deterministic short hash of JSON-able parts (16 hex digits)."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def frames_key(frames: list[FrameMeta]) -> list[tuple[int, int, str]]:
    """Identity of a frame set: sorted (ObsID, CCD, SHA-256 or file name)."""
    return sorted((f.obsid, f.ccd, f.sha256 or f.path.rsplit("/", 1)[-1]) for f in frames)


def calibrations_key(calibrations: list[Calibration]) -> list[tuple[str, str]]:
    return sorted((c.name, str(c.event_id or c.test)) for c in calibrations)


class ExtractionRef(BaseModel):
    """A stored extraction: its unit, file (relative to the products root), content hash and the
    job that wrote it; ``failed`` units carry the error instead."""

    unit: str
    path: str | None = None
    sha256: str | None = None
    job_id: str | None = None
    obsids: list[int] = Field(default_factory=list)
    failed: bool = False
    error: str | None = None


class _Job(BaseModel):
    job_id: str
    block: str
    label: str = Field(description="test run label (BIAS01, BIAS01.2)")
    family: str
    family_version: str = "1"
    params: dict[str, Any] = Field(default_factory=dict)
    calibrations: list[Calibration] = Field(default_factory=list)
    reply_to: str = ""
    verify: bool = Field(False, description="hash the input files while reading (offline provenance)")
    reprocess: str | None = Field(None, description="run id of the vison reprocess that issued it")

    @property
    def test(self) -> str:
        return split_test_name(self.label)[0]

    @property
    def repeat(self) -> int:
        return split_test_name(self.label)[1]


class ExtractJob(_Job):
    """Extract one unit (exposure or pair) of a test run."""

    kind: Literal["extract"] = "extract"
    unit: str
    frames: list[FrameMeta] = Field(description="the unit's CCD frames (paths relative to the data root)")

    @staticmethod
    def make_id(block: str, label: str, family: str, version: str, unit: str, frames: list[FrameMeta],
                params: dict[str, Any], calibrations: list[Calibration]) -> str:
        return f"x-{digest('extract', block, label, family, version, unit, frames_key(frames), params, calibrations_key(calibrations))}"


class SolveJob(_Job):
    """Solve a test run from its extractions."""

    kind: Literal["solve"] = "solve"
    extractions: list[ExtractionRef] = Field(default_factory=list)
    frames: list[FrameMeta] = Field(default_factory=list, description="the run's frames (for stacks)")
    expected_exposures: int | None = None
    flags: int = Field(0, description="input flags of the run (MISSDATA: partial set, failed units, missing calibration)")
    notes: list[str] = Field(default_factory=list)
    reanalysis_of: str | None = Field(None, description="event id of the analysis.completed this one supersedes")
    reanalysis_reason: str | None = None

    @staticmethod
    def make_id(block: str, label: str, family: str, version: str, extractions: list[ExtractionRef],
                frames: list[FrameMeta], params: dict[str, Any], calibrations: list[Calibration], flags: int,
                expected: int | None) -> str:
        refs = sorted((e.unit, e.job_id or "", bool(e.failed)) for e in extractions)  # npz bytes vary (zip times)
        return f"s-{digest('solve', block, label, family, version, refs, frames_key(frames), params, calibrations_key(calibrations), flags, expected)}"


Job = Union[ExtractJob, SolveJob]


def parse_job(body: bytes | str | dict) -> ExtractJob | SolveJob:
    """The job of a message body; ``ValueError`` naming the problem for anything else."""
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", errors="replace")
    data = json.loads(body) if isinstance(body, str) else body
    if not isinstance(data, dict):
        raise ValueError(f"a job must be a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if kind == "extract":
        return ExtractJob.model_validate(data)
    if kind == "solve":
        return SolveJob.model_validate(data)
    raise ValueError(f"unknown job kind {kind!r} (extract | solve)")


class JobDone(BaseModel):
    """A worker's reply: the job finished (its outputs are durable)."""

    kind: Literal["done"] = "done"
    job_id: str
    job_kind: Literal["extract", "solve"]
    status: Literal["completed", "failed"]
    block: str = ""
    label: str = ""
    family: str = ""
    unit: str | None = None
    extraction: ExtractionRef | None = None
    results: ResultsDocument | None = None
    error: str | None = None
    failed_file: str | None = Field(None, description="the input file that could not be read, when that was the cause")
    duration_s: float = 0.0
    reused: bool = Field(False, description="the stored output of the same job id was returned (nothing recomputed)")
    worker: str = ""


def parse_done(body: bytes | str | dict) -> JobDone:
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", errors="replace")
    return JobDone.model_validate_json(body) if isinstance(body, str) else JobDone.model_validate(body)


__all__ = ["ExtractJob", "ExtractionRef", "Job", "JobDone", "SolveJob", "digest", "done_queue", "jobs_queue",
           "parse_done", "parse_job", "reprocess_queue"]
