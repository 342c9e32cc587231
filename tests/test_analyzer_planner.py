"""The analyzer's pure parts: registry v2 look-ups, extraction units (exposures, pairs as they
arrive), completeness, declared needs (required / wait / rerun), deterministic job ids, the
extraction store's job id record."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from services.analyzer import extractions, planner, registry  # noqa: E402
from services.analyzer.family import GAIN, MASTER_BIAS, Calibration, Extraction, Family, Need  # noqa: E402
from services.analyzer.jobs import ExtractJob, ExtractionRef, SolveJob, parse_job  # noqa: E402
from services.analyzer.model import AnalysisOutput, FrameMeta  # noqa: E402
from shared.flags import Flag  # noqa: E402


def _frames(obsids, exptimes=None, ccds=(1, 2, 3)):
    exptimes = exptimes or {}
    return [FrameMeta(obsid=o, ccd=c, path=f"d/EUC_{o}_CCD{c}.fits", sha256=f"{o}{c}" * 8, exptime=exptimes.get(o, 1.0),
                      test="X", values={"wave": 4}) for o in obsids for c in ccds]


def _family(unit="exposure", needs=()):
    return Family(name="t", tests=("T01",), params=__import__("pydantic").BaseModel, solve=lambda *a: AnalysisOutput({}),
                  extract=lambda *a: None, extract_pair=lambda *a: None, unit=unit, needs=needs)


def test_registry_finds_v2_families_catalogue_family_and_repeats():
    bias = registry.find("BIAS01.3")
    assert bias is not None and bias.name == "bias" and registry.find("BIAS02") is bias
    flat = registry.find("FLAT02_730")
    assert flat is not None and flat.name == "flat"
    assert registry.find("NOSUCH99") is None
    with pytest.raises(registry.UnknownTest, match="NOSUCH99"):
        registry.get("NOSUCH99")
    assert registry.by_name("bias") is bias


def test_units_per_exposure_only_when_every_ccd_is_there():
    frames = _frames([1, 2]) + _frames([3], ccds=(1, 2))
    units = planner.extraction_units(_family(), frames, "B")
    assert [u for u, _ in units] == ["e1", "e2"] and len(units[0][1]) == 3


def test_pairs_form_as_exposures_arrive():
    fam = _family("pair")
    times = {1: 1.0, 2: 5.0, 3: 1.0, 4: 5.0, 5: 1.0}
    assert planner.extraction_units(fam, _frames([1, 2], times), "B") == []
    assert [u for u, _ in planner.extraction_units(fam, _frames([1, 2, 3], times), "B")] == ["p1-3"]
    units = planner.extraction_units(fam, _frames([1, 2, 3, 4, 5], times), "B")
    assert [u for u, _ in units] == ["p1-3", "p2-4"]  # 5 waits for its partner
    assert {f.obsid for f in units[1][1]} == {2, 4} and len(units[1][1]) == 6


def test_completeness():
    assert planner.is_complete(3, 3, False) and not planner.is_complete(2, 3, False)
    assert planner.is_complete(2, 3, True) and not planner.is_complete(5, None, False)


def _cal(name, test, eid):
    return Calibration(name=name, block="B", test=test, event_id=eid)


def test_needs_required_wait_and_rerun():
    needs = (Need(MASTER_BIAS, "wait", ("BIAS01", "BIAS02")), Need(GAIN, "rerun", ("PTC01",)),
             Need("ptc_covariances", "required", ("PTC01",)))
    d = planner.resolve_needs(needs, [], None, 100.0, 60.0)
    assert not d.ready and d.waiting == [MASTER_BIAS, "ptc_covariances"] and d.wait_deadline is None
    d = planner.resolve_needs(needs[:2], [], 100.0, 130.0, 60.0)
    assert not d.ready and d.waiting == [MASTER_BIAS] and d.wait_deadline == 160.0
    d = planner.resolve_needs(needs[:2], [], 100.0, 161.0, 60.0)  # waited long enough: run without, flagged
    assert d.ready and d.without == [MASTER_BIAS, GAIN] and d.flags == int(Flag.MISSDATA)
    assert any("master_bias" in n and "without" in n for n in d.notes)
    cals = [_cal(MASTER_BIAS, "BIAS02", "b2"), _cal(MASTER_BIAS, "BIAS01", "b1"), _cal(GAIN, "PTC01", "g")]
    d = planner.resolve_needs(needs[:2], cals, None, 0.0, 60.0)
    assert d.ready and [c.event_id for c in d.use] == ["b1", "g"] and d.flags == 0  # BIAS01 preferred
    assert planner.resolve_needs(needs[1:2], [], None, 0.0, 60.0).ready  # rerun: runs at once


def test_rerun_needed_when_a_new_calibration_arrives():
    needs = (Need(GAIN, "rerun", ("PTC01",)), Need(MASTER_BIAS, "wait", ("BIAS01",)))
    g1, g2 = _cal(GAIN, "PTC01", "g1"), _cal(GAIN, "PTC01.2", "g2")
    assert [c.event_id for _, c in planner.rerun_needed(needs, [], [g1])] == ["g1"]
    assert planner.rerun_needed(needs, [g1], [g1]) == []
    assert [c.event_id for _, c in planner.rerun_needed(needs, [g1], [g1, g2])] == ["g2"]  # a newer PTC01
    assert planner.rerun_needed(needs, [], [_cal(MASTER_BIAS, "BIAS01", "b")]) == []  # wait needs never re-run


def test_job_ids_are_deterministic_and_change_with_inputs():
    f = _frames([1])
    a = ExtractJob.make_id("B", "T01", "t", "1", "e1", f, {"x": 1}, [])
    assert a == ExtractJob.make_id("B", "T01", "t", "1", "e1", list(reversed(f)), {"x": 1}, [])
    assert a != ExtractJob.make_id("B", "T01", "t", "2", "e1", f, {"x": 1}, [])  # family version
    assert a != ExtractJob.make_id("B", "T01", "t", "1", "e1", f, {"x": 2}, [])  # parameters
    changed = [m.model_copy(update={"sha256": "0" * 64}) if m.ccd == 2 else m for m in f]
    assert a != ExtractJob.make_id("B", "T01", "t", "1", "e1", changed, {"x": 1}, [])  # file content
    refs = [ExtractionRef(unit="e1", path="p", sha256="h", job_id=a)]
    s = SolveJob.make_id("B", "T01", "t", "1", refs, f, {}, [], 0, 1)
    assert s == SolveJob.make_id("B", "T01", "t", "1", [r.model_copy(update={"sha256": "other"}) for r in refs], f, {}, [], 0, 1)
    assert s != SolveJob.make_id("B", "T01", "t", "1", refs, f, {}, [_cal(GAIN, "PTC01", "g")], 0, 1)
    assert s != SolveJob.make_id("B", "T01", "t", "1", [r.model_copy(update={"failed": True}) for r in refs], f, {}, [], 0, 1)
    job = ExtractJob(job_id=a, block="B", label="T01.2", family="t", unit="e1", frames=f)
    back = parse_job(job.model_dump_json().encode())
    assert isinstance(back, ExtractJob) and back == job and back.test == "T01" and back.repeat == 2
    with pytest.raises(ValueError, match="unknown job kind"):
        parse_job(b'{"kind": "nope"}')


class _X(Extraction):
    values: np.ndarray


def test_extraction_store_records_its_job_id(tmp_path):
    x = _X(family="t", unit="e1", obsids=[1], values=np.arange(6.0).reshape(2, 3))
    path = extractions.save(tmp_path / "e1.npz", x, "x-123")
    assert extractions.stored_job_id(path) == "x-123"
    back = extractions.load(path, _X)
    assert np.array_equal(back.values, x.values) and back.unit == "e1"
    path.write_bytes(path.read_bytes()[:50])  # truncated: not re-used
    assert extractions.stored_job_id(path) is None
