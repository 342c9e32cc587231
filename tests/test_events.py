"""Event models: routing keys, JSON round trip, clear errors, exported JSON Schemas."""

from __future__ import annotations

import json
import uuid

import pytest

from shared.events import (
    EVENT_TYPES,
    AnalysisCompleted,
    CampaignDefined,
    EventError,
    ExposureIngested,
    ExposureValidated,
    FileRef,
    HKSample,
    HKSamples,
    MetatestCompleted,
    ProcessingFailed,
    ScriptgenRequest,
    TestClose,
    TestStructureChecked,
    derived_event_id,
    parse_event,
    routing_word,
)

FILES = [FileRef(ccd=c, path=f"140326/EUC_5_140326D100000T_ROE1_CCD{c}.fits", sha256="ab" * 32, size=35369280)
         for c in (1, 2, 3)]
QSTATS = {"pre": {"offset": 2000.5, "noise": 1.3}, "img": {"offset": 2001.0, "noise": 1.4},
          "ove": {"offset": 2000.7, "noise": 1.3}, "saturated": 0, "lost": 2, "npix": 100}

SAMPLES = [
    ExposureIngested(obsid=5, block="BORN", test="BIAS01", files=FILES, explog=[{"ObsID": 5, "CCD": "CCD1"}]),
    HKSamples(block="BORN", source="140326/HK_14-03-26_ROE1.txt",
              samples=[HKSample(timestamp="2026-03-14T10:00:00", values={"CCD1_TEMP_T": -120.0, "X": None})]),
    ExposureValidated(obsid=5, block="BORN", test="PTC01", files=FILES, passed=False, flags=1 << 18,
                      flag_names=["RON_OOL"], compliance={"noise": {"CCD1": {"E": {"pre": {"passed": False, "value": 2.0, "lo": 0.86, "hi": 1.44}}}}},
                      stats={"CCD1": {"E": QSTATS}}),
    ProcessingFailed(what="fits", where="140326/x.fits", why="truncated", obsid=5),
    CampaignDefined(block="BORN", campaign="mini", definition={"tests": []}),
    ScriptgenRequest(block="BORN", config={"preset": "mini"}),
    TestClose(test="PTC01", block="BORN", operator="rc"),
    TestStructureChecked(test="BIAS01", block="BORN", reason="next test started", passed=False, ended_early=True,
                         frames_expected=10, frames_seen={"CCD1": 7}, flags=1, flag_names=["MISSDATA"]),
    AnalysisCompleted(test="PTC01", block="BORN", results={"gain": {"CCD1": {"E": 3.3}}}, products=["BORN/PTC01/gain.json"]),
    MetatestCompleted(family="ptc", blocks=["BORN"]),
]
KEYS = [
    "exposure.ingested.BIAS01.BORN", "hk.samples.BORN", "exposure.validated.PTC01.BORN",
    "processing.failed.UNKNOWN.UNKNOWN", "campaign.defined.BORN", "scriptgen.request.BORN",
    "test.close.PTC01.BORN", "test.checked.BIAS01.BORN", "analysis.completed.PTC01.BORN", "metatest.completed.ptc",
]


def test_every_kind_has_a_sample():
    assert {type(e).kind for e in SAMPLES} == set(EVENT_TYPES)


@pytest.mark.parametrize("event,key", list(zip(SAMPLES, KEYS)), ids=KEYS)
def test_routing_key_and_round_trip(event, key):
    assert event.routing_key() == key
    body = event.to_json()
    data = json.loads(body)
    assert data["kind"] == type(event).kind and data["schema_version"] == "1.0"
    assert uuid.UUID(data["event_id"]) == event.event_id and data["produced_at"].endswith("Z")
    back = parse_event(body, key)
    assert type(back) is type(event) and back == event
    assert type(parse_event(body)) is type(event)  # the body alone is enough


def test_routing_words_are_safe():
    assert routing_word("PTC01.2") == "PTC01_2" and routing_word("a b#*") == "a_b_"
    assert routing_word("") == "UNKNOWN" and routing_word(None) == "UNKNOWN"
    ev = ProcessingFailed(what="fits", where="x", why="y", test="FLAT02.3", block="BORN")
    assert ev.routing_key() == "processing.failed.FLAT02_3.BORN"
    ev = ExposureValidated(**{**SAMPLES[2].model_dump(), "test": "PTC01.2"})
    assert ev.routing_key() == "exposure.validated.PTC01_2.BORN" and ev.test == "PTC01.2"


def test_derived_ids_are_deterministic():
    assert derived_event_id("a", 1) == derived_event_id("a", 1) != derived_event_id("a", 2)


@pytest.mark.parametrize(
    "body,key,reason,kind",
    [
        (b"{not json", "test.close.X.Y", "malformed JSON", "json"),
        (b"\xff\xfe", "test.close.X.Y", "not UTF-8", "json"),
        (b"[1, 2]", "test.close.X.Y", "JSON object", "schema"),
        (b'{"kind": "nope.nope"}', "nope.nope", "unknown event kind 'nope.nope'", "kind"),
        (b'{"block": "BORN"}', "test.close.X.BORN", "test: Field required", "schema"),
        (b'{"kind": "test.close", "test": "A", "block": "B"}', "exposure.validated.A.B", "does not match routing key", "routing"),
        (b'{"kind": "exposure.ingested", "obsid": "five", "block": "B", "test": "T", "files": [], "explog": []}',
         None, "obsid: Input should be a valid integer", "schema"),
    ],
)
def test_parse_errors_are_clear(body, key, reason, kind):
    with pytest.raises(EventError) as info:
        parse_event(body, key)
    assert reason in info.value.reason and info.value.kind == kind


def test_offsets_helper():
    ev = SAMPLES[2]
    assert ev.offsets("pre") == {"CCD1": {"E": 2000.5}} and ev.offsets("ove") == {"CCD1": {"E": 2000.7}}


def test_schemas_command_writes_valid_schemas(tmp_path):
    import jsonschema

    from services.cli import main

    assert main(["schemas", "--out", str(tmp_path)]) == 0
    index = json.loads((tmp_path / "index.json").read_text())
    assert [e["kind"] for e in index["events"]] == list(EVENT_TYPES)
    for event in SAMPLES:
        schema = json.loads((tmp_path / f"{type(event).kind}.json").read_text())
        jsonschema.validate(json.loads(event.to_json()), schema)
        assert schema["x-routing-key"].startswith(type(event).kind)
    schema = json.loads((tmp_path / "exposure.validated.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"kind": "exposure.validated", "obsid": 1}, schema)
