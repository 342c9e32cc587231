"""Event schemas of the vison bus: one pydantic model per kind of message.

Every event carries ``schema_version``, ``event_id`` (unique; consumers use it for idempotency),
``produced_at`` (UTC), ``producer`` (service name) and ``kind`` (``<kind>.<verb>``, the first two
words of its routing key). ``routing_key()`` gives ``<kind>.<verb>[.<test>[.<block>]]``; words are
made safe for AMQP topic matching (a ``.``, ``*``, ``#`` or blank inside a test or block name
becomes ``_``: ``PTC01.2`` is routed as ``PTC01_2``).

``parse_event(body, routing_key)`` turns a message body back into its typed model and raises
:class:`EventError` (with a reason) for anything that is not a valid event.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime, timezone
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

SCHEMA_VERSION = "1.0"
#: Namespace of deterministic event ids (same input -> same id, so duplicates are detectable).
EVENT_NAMESPACE = uuid.UUID("6f0d3c1e-8a4b-4c55-9f7e-5b1a2d3c4e5f")

_UNSAFE = re.compile(r"[.*#\s]+")


def routing_word(text: str | None, default: str = "UNKNOWN") -> str:
    """A test / block name as one routing-key word (``.``, ``*``, ``#``, blanks -> ``_``)."""
    text = (text or "").strip()
    return _UNSAFE.sub("_", text) or default


def derived_event_id(*parts: Any) -> uuid.UUID:
    """A deterministic event id from its inputs (uuid5): a re-published result keeps its id."""
    return uuid.uuid5(EVENT_NAMESPACE, "|".join(str(p) for p in parts))


def _now() -> datetime:
    return datetime.now(timezone.utc)


class EventError(ValueError):
    """A message that is not a valid event; ``reason`` says why (malformed JSON, schema, kind)."""

    def __init__(self, reason: str, kind: str = "schema"):
        self.reason = reason
        self.kind = kind  # "json" | "schema" | "kind" | "routing"
        super().__init__(reason)


class Event(BaseModel):
    """Fields common to every event."""

    model_config = ConfigDict(extra="ignore")

    schema_version: str = Field(SCHEMA_VERSION, description="Event schema version (major.minor).")
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4, description="Unique id, used for idempotency.")
    produced_at: datetime = Field(default_factory=_now, description="UTC time the event was produced.")
    producer: str = Field("vison", description="Service that produced the event (ingest, validator, ...).")

    kind: ClassVar[str] = ""

    def routing_key(self) -> str:  # pragma: no cover - overridden
        return self.kind

    def to_json(self) -> bytes:
        """The message body (UTF-8 JSON, with ``kind``)."""
        return event_body(self)


# --------------------------------------------------------------------------- pieces


class FileRef(BaseModel):
    """One file of an exposure: path relative to the data root (POSIX), SHA-256, size in bytes."""

    ccd: int | None = Field(None, description="CCD number 1..3 (None for non-frame files).")
    path: str = Field(description="Path relative to the data root, '/' separated.")
    sha256: str = Field(description="Hex SHA-256 of the whole file.")
    size: int = Field(description="File size in bytes.")
    complete_at: datetime | None = Field(None, description="When ingest saw the file complete (UTC).")


class ComplianceLeaf(BaseModel):
    """One check: passes when ``value`` is a number inside [lo, hi]."""

    passed: bool
    value: float | None = None
    lo: float | None = None
    hi: float | None = None


class RegionStats(BaseModel):
    """Offset (median, ADU) and noise (standard deviation, ADU) of one region."""

    offset: float
    noise: float


class QuadrantStats(BaseModel):
    """Per quadrant statistics of one CCD frame (canonical orientation, standard regions)."""

    pre: RegionStats
    img: RegionStats
    ove: RegionStats
    saturated: int = Field(description="Pixels at 65535 ADU inside the readout window.")
    lost: int = Field(description="Pixels at 0 ADU inside the readout window.")
    npix: int = Field(description="Pixels inside the readout window.")


# --------------------------------------------------------------------------- events


class ExposureIngested(Event):
    """One exposure (ObsID) whose 3 CCD frames and 3 exposure-log rows are present."""

    kind: ClassVar[str] = "exposure.ingested"
    obsid: int
    block: str
    roe: int = 1
    test: str
    date: datetime | None = Field(None, description="Exposure date from the file names (local ELVIS time).")
    files: list[FileRef] = Field(description="The CCD frames (ccd 1..3).")
    hk_file: FileRef | None = Field(None, description="Per-exposure HK file, when present at ingest time.")
    explog: list[dict[str, Any]] = Field(description="Exposure-log rows (one per CCD), all columns.")
    complete_at: datetime = Field(default_factory=_now, description="When the last frame was seen complete (UTC).")

    def routing_key(self) -> str:
        return f"{self.kind}.{routing_word(self.test)}.{routing_word(self.block)}"


class HKSample(BaseModel):
    timestamp: datetime
    values: dict[str, float | None] = Field(description="Parameter -> value; None = no reading.")


class HKSamples(Event):
    """A batch of rows of the daily HK master file."""

    kind: ClassVar[str] = "hk.samples"
    block: str
    roe: int = 1
    source: str = Field(description="HK file, relative to the data root.")
    samples: list[HKSample]

    def routing_key(self) -> str:
        return f"{self.kind}.{routing_word(self.block)}"


class ExposureValidated(Event):
    """The validator's verdict on one exposure: compliance tree, flags, per-quadrant statistics."""

    kind: ClassVar[str] = "exposure.validated"
    obsid: int
    block: str
    roe: int = 1
    test: str
    date: datetime | None = None
    ingested_event_id: uuid.UUID | None = None
    files: list[FileRef]
    explog: list[dict[str, Any]] = Field(default_factory=list, description="Exposure-log rows (one per CCD).")
    passed: bool = Field(description="True when every compliance leaf passed.")
    flags: int = Field(description="Flag bitmask (historical bit values, shared/flags.py).")
    flag_names: list[str]
    compliance: dict[str, Any] = Field(
        description="Tree of checks; leaves are {passed, value, lo, hi} (e.g. offsets.CCD1.E.pre)."
    )
    stats: dict[str, dict[str, QuadrantStats]] = Field(description="{CCD1: {E: QuadrantStats}}.")
    structure: str = Field("not checked", description="Script-structure check status.")
    complete_at: datetime | None = Field(None, description="When ingest saw the exposure complete (UTC).")
    processing_seconds: float | None = None
    notes: list[str] = Field(default_factory=list, description="Checks that could not run, and why.")

    def routing_key(self) -> str:
        return f"{self.kind}.{routing_word(self.test)}.{routing_word(self.block)}"

    def offsets(self, region: str = "pre") -> dict[str, dict[str, float]]:
        """``{CCD: {quadrant: offset ADU}}`` of one region."""
        return {ccd: {q: getattr(s, region).offset for q, s in quads.items()} for ccd, quads in self.stats.items()}


class ProcessingFailed(Event):
    """Bad input or a failed step: what (kind of thing), where (file / queue), why (reason)."""

    kind: ClassVar[str] = "processing.failed"
    what: str = Field(description="fits | explog | hk | exposure | path | message | analysis | ...")
    where: str = Field(description="File (relative to the data root when inside it), queue or routing key.")
    why: str = Field(description="The reason, human readable.")
    service: str = Field("", description="Service that met the failure.")
    obsid: int | None = None
    test: str | None = None
    block: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)

    def routing_key(self) -> str:
        return f"{self.kind}.{routing_word(self.test)}.{routing_word(self.block)}"


class CampaignDefined(Event):
    """The campaign definition of a block (scriptgen): tests, scripts, expected frames."""

    kind: ClassVar[str] = "campaign.defined"
    block: str
    campaign: str = Field("", description="Campaign name / preset.")
    definition: dict[str, Any] = Field(description="The definition (tests, parameters, columns).")

    def routing_key(self) -> str:
        return f"{self.kind}.{routing_word(self.block)}"


class ScriptgenRequest(Event):
    """Ask scriptgen to write scripts for a campaign configuration."""

    kind: ClassVar[str] = "scriptgen.request"
    block: str
    config: dict[str, Any] = Field(description="Campaign configuration (tests, free parameters, equipment).")
    out_dir: str | None = None

    def routing_key(self) -> str:
        return f"{self.kind}.{routing_word(self.block)}"


class TestClose(Event):
    """An operator closes a test: analyse what has arrived."""

    __test__ = False  # not a pytest class
    kind: ClassVar[str] = "test.close"
    test: str
    block: str
    repeat: int | None = None
    operator: str = ""
    reason: str = ""

    def routing_key(self) -> str:
        return f"{self.kind}.{routing_word(self.test)}.{routing_word(self.block)}"


class TestStructureChecked(Event):
    """The validator's verdict on a whole test's structure once the test is over (the next test
    started, or an operator closed it): frames per CCD against the script, extra frames, and
    whether it ended early (MISSDATA)."""

    __test__ = False  # not a pytest class
    kind: ClassVar[str] = "test.checked"
    test: str
    block: str
    reason: str = Field(description="Why the test counts as over: 'next test started' or 'closed by operator'.")
    passed: bool
    ended_early: bool
    frames_expected: int | None = Field(None, description="Frames per CCD in the script (None: test unknown).")
    frames_seen: dict[str, int] = Field(default_factory=dict, description="Frames seen per CCD.")
    extra_frames: dict[str, int] = Field(default_factory=dict, description="Frames beyond the script, per CCD.")
    compliance: dict[str, Any] = Field(default_factory=dict, description="Per CCD: per script column and key leaves.")
    flags: int = 0
    flag_names: list[str] = Field(default_factory=list)
    status: str = Field("checked", description="'checked', or why the structure could not be checked.")

    def routing_key(self) -> str:
        return f"{self.kind}.{routing_word(self.test)}.{routing_word(self.block)}"


class Reanalysis(BaseModel):
    """Why an analysis was run again: the ``analysis.completed`` event it supersedes."""

    of: uuid.UUID | None = Field(None, description="event_id of the analysis.completed this one supersedes.")
    reason: str = Field(description="e.g. 'calibration gain from PTC01 arrived'.")


class CalibrationUsed(BaseModel):
    """Provenance of one calibration an analysis used (what another analysis provided)."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(description="Calibration name (master_bias, gain, dark_mask, ptc_covariances, ...).")
    test: str = Field(description="Test run that provided it (BIAS01, PTC01.2).")
    event_id: str | None = Field(None, description="analysis.completed event id of the provider.")
    produced_at: datetime | None = None
    files: dict[str, str] = Field(default_factory=dict, description="Files used (absolute paths), by CCD or 'ALL'.")


class AnalysisResults(BaseModel):
    """The results document of one test analysis: what ``results.json`` holds and what
    ``analysis.completed`` carries (the event adds the event fields; ``results.json`` adds the
    per-frame rows and parameters)."""

    model_config = ConfigDict(extra="allow")

    test: str = Field(description="Base test name (BIAS01).")
    block: str
    repeat: int | None = Field(None, description="Repeat number (None or 0: none).")
    status: Literal["completed", "failed"] = "completed"
    results: dict[str, Any] = Field(default_factory=dict, description="results[<CCD>][<Q>][key].")
    products: list[str] = Field(default_factory=list, description="Product paths relative to the products root.")
    obsids: list[int] = Field(default_factory=list, description="Input exposures.")
    flags: int = 0
    flag_names: list[str] = Field(default_factory=list)
    error: str | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)
    reanalysis: Reanalysis | None = Field(None, description="Set when this analysis supersedes an earlier one.")
    calibrations: list[CalibrationUsed] = Field(default_factory=list, description="Calibrations used.")


class ResultsDocument(AnalysisResults):
    """``results.json``: the shared results fields plus the run's details."""

    schema_: str = Field("vison.results/2", alias="schema")
    label: str = Field("", description="Test run label (BIAS01, BIAS01.2).")
    n_frames: int = 0
    expected_frames: int | None = None
    input_flags: int = 0
    input_flag_names: list[str] = Field(default_factory=list)
    test_values: dict[str, Any] = Field(default_factory=dict)
    summary: list[str] = Field(default_factory=list)
    frames: list[dict[str, Any]] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    duration_s: float | None = None
    warnings: list[str] = Field(default_factory=list)
    provides: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Calibrations this result provides: "
                                                "{name: {values, files: {CCD|ALL: file name in this run's folder}}}.")
    traceback: str | None = None

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class AnalysisCompleted(Event):
    """Results and products of one test analysis."""

    kind: ClassVar[str] = "analysis.completed"
    test: str
    block: str
    repeat: int | None = None
    status: Literal["completed", "failed"] = "completed"
    results: dict[str, Any] = Field(default_factory=dict)
    products: list[str] = Field(default_factory=list, description="Product paths relative to the products root.")
    obsids: list[int] = Field(default_factory=list, description="Input exposures.")
    flags: int = 0
    flag_names: list[str] = Field(default_factory=list)
    error: str | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)
    reanalysis: Reanalysis | None = Field(None, description="Set when this analysis supersedes an earlier one "
                                          "(a needed calibration arrived later).")
    calibrations: list[CalibrationUsed] = Field(default_factory=list, description="Calibrations used (provenance).")

    def routing_key(self) -> str:
        return f"{self.kind}.{routing_word(self.test)}.{routing_word(self.block)}"

    @classmethod
    def of_results(cls, doc: AnalysisResults, **event_fields: Any) -> "AnalysisCompleted":
        """The event of a results document (the shared fields are copied)."""
        fields = {name: getattr(doc, name) for name in AnalysisResults.model_fields}
        return cls(**{**fields, **event_fields})


class MetatestCompleted(Event):
    """FPA-level aggregates of one test family (bias, ptc, ...), published at once whenever a
    block's result of that family arrives (missing FPA blocks listed, their values null). The
    ``event_id`` is derived from ``inputs``: the same inputs give the same id."""

    kind: ClassVar[str] = "metatest.completed"
    family: str = Field(description="bias | dark | ptc | nl | bf | flat | cosmetics | chinj | tp | psf | persistence | warm")
    blocks: list[str] = Field(default_factory=list, description="Blocks with input (FPA blocks and spares).")
    missing: list[str] = Field(default_factory=list, description="FPA blocks without input (blank in the maps).")
    results: dict[str, Any] = Field(
        default_factory=dict,
        description="The maps: {quantity: {block: {CCD: {Q: value}}}} of the 12 FPA blocks (null = no value); "
                    "`<key>_e` quantities in electrons (x the latest PTC01 gain).")
    spares: dict[str, Any] = Field(
        default_factory=dict,
        description="{quantity: {block: {CCD: {Q: value}}}} of the spare blocks with input (never in maps or mosaics).")
    units: dict[str, str] = Field(default_factory=dict, description="Unit of each quantity.")
    summary: dict[str, Any] = Field(default_factory=dict, description="Family verdicts (psf: the crosstalk requirement).")
    products: list[str] = Field(default_factory=list, description="Product paths relative to the products root.")
    inputs: list[str] = Field(default_factory=list, description="event_id of every analysis.completed result used.")
    provenance: dict[str, Any] = Field(default_factory=dict)

    def routing_key(self) -> str:
        return f"{self.kind}.{routing_word(self.family)}"


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (
        ExposureIngested,
        HKSamples,
        ExposureValidated,
        ProcessingFailed,
        CampaignDefined,
        ScriptgenRequest,
        TestClose,
        TestStructureChecked,
        AnalysisCompleted,
        MetatestCompleted,
    )
}


def kind_of(routing_key: str) -> str:
    """``<kind>.<verb>`` of a routing key (its first two words)."""
    return ".".join(routing_key.split(".")[:2])


def parse_event(body: bytes | str | dict, routing_key: str | None = None) -> Event:
    """The typed event of a message body; the kind comes from the body's ``kind`` field or from
    the routing key. Raises :class:`EventError` naming the problem."""
    if isinstance(body, (bytes, bytearray)):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EventError(f"body is not UTF-8: {exc}", "json") from None
    if isinstance(body, str):
        try:
            data = json.loads(body)
        except json.JSONDecodeError as exc:
            raise EventError(f"malformed JSON: {exc}", "json") from None
        except RecursionError:
            raise EventError("malformed JSON: nested too deeply", "json") from None
        except ValueError as exc:  # e.g. an integer longer than Python's conversion limit
            raise EventError(f"malformed JSON: {exc}", "json") from None
    else:
        data = body
    if not isinstance(data, dict):
        raise EventError(f"event body must be a JSON object, got {type(data).__name__}", "schema")
    if data.get("kind") is not None and not isinstance(data.get("kind"), str):
        raise EventError(f"'kind' must be a string, got {type(data['kind']).__name__}", "schema")
    kind = data.get("kind") or (kind_of(routing_key) if routing_key else None)
    if routing_key and data.get("kind") and kind_of(routing_key) != data["kind"]:
        raise EventError(f"body kind {data['kind']!r} does not match routing key {routing_key!r}", "routing")
    cls = EVENT_TYPES.get(kind or "")
    if cls is None:
        raise EventError(f"unknown event kind {kind!r} (known: {', '.join(EVENT_TYPES)})", "kind")
    try:
        return cls.model_validate(data)
    except RecursionError:
        raise EventError(f"schema error in {kind}: nested too deeply", "schema") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()[:5]
        )
        raise EventError(f"schema error in {kind}: {problems}", "schema") from None


def event_body(event: Event) -> bytes:
    """The JSON body of an event, with its ``kind`` (so the body alone says what it is)."""
    data = json.loads(event.model_dump_json())
    data["kind"] = event.kind
    return json.dumps(data, separators=(",", ":")).encode()


def json_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schema of every event kind (``kind`` is a required constant in each)."""
    out: dict[str, dict[str, Any]] = {}
    for kind, cls in EVENT_TYPES.items():
        schema = TypeAdapter(cls).json_schema(mode="serialization")
        schema.setdefault("properties", {})["kind"] = {"const": kind, "type": "string", "title": "Kind"}
        schema.setdefault("required", []).append("kind")
        schema["$id"] = f"https://vison.local/schemas/{kind}.json"
        schema["description"] = (cls.__doc__ or "").strip()
        schema["x-routing-key"] = _ROUTING_DOC[kind]
        out[kind] = schema
    return out


_ROUTING_DOC = {
    "exposure.ingested": "exposure.ingested.<test>.<block>",
    "hk.samples": "hk.samples.<block>",
    "exposure.validated": "exposure.validated.<test>.<block>",
    "processing.failed": "processing.failed.<test|UNKNOWN>.<block|UNKNOWN>",
    "campaign.defined": "campaign.defined.<block>",
    "scriptgen.request": "scriptgen.request.<block>",
    "test.close": "test.close.<test>.<block>",
    "test.checked": "test.checked.<test>.<block>",
    "analysis.completed": "analysis.completed.<test>.<block>",
    "metatest.completed": "metatest.completed.<family>",
}

__all__ = [
    "AnalysisCompleted",
    "AnalysisResults",
    "CalibrationUsed",
    "CampaignDefined",
    "ComplianceLeaf",
    "EVENT_TYPES",
    "Event",
    "EventError",
    "ExposureIngested",
    "ExposureValidated",
    "FileRef",
    "HKSample",
    "HKSamples",
    "MetatestCompleted",
    "ProcessingFailed",
    "QuadrantStats",
    "Reanalysis",
    "RegionStats",
    "ResultsDocument",
    "SCHEMA_VERSION",
    "ScriptgenRequest",
    "TestClose",
    "TestStructureChecked",
    "derived_event_id",
    "event_body",
    "json_schemas",
    "kind_of",
    "parse_event",
    "routing_word",
]
