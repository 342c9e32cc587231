"""The results catalogue (services/catalogue): events -> rows, idempotency by event id, latest
analyses, FPA maps with their grid positions, rebuild from a products folder. Every test runs
on SQLite and on the real PostgreSQL (a database of its own, dropped after)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select, text

from services.catalogue import synthetic as syn
from services.catalogue.fpa import fpa_cell
from services.catalogue.models import Exposure, ExposureQuadrant, FpaValue
from services.catalogue.rebuild import rebuild
from services.catalogue.records import RecordError, unit_of
from services.catalogue.store import Catalogue, catalogue_url
from shared.config import Settings
from shared.events import AnalysisCompleted, MetatestCompleted, derived_event_id


@pytest.fixture
def cat(catalogue_db_url):
    c = Catalogue(catalogue_db_url)
    yield c
    c.close()


def test_units_from_key_suffixes():
    assert [unit_of(k) for k in ("ron_img_adu", "ron_img_e", "dark_current_adu_s", "dark_current_e_s", "texp_s",
                                 "vrd_v", "fwhm_px", "focus_mm", "max_nl_pct", "gain", "offset_pre", "n_hot", "her")] \
        == ["ADU", "e-", "ADU/s", "e-/s", "s", "V", "px", "mm", "%", "e-/ADU", "ADU", "count", ""]


def test_default_url_is_sqlite_in_the_state_dir(tmp_path):
    assert catalogue_url(Settings(state_dir=tmp_path)) == f"sqlite:///{tmp_path.resolve()}/catalogue.sqlite"
    assert catalogue_url(Settings(state_dir=tmp_path, catalogue_url="postgresql+psycopg://u@h/db")) == \
        "postgresql+psycopg://u@h/db"


def test_exposures_with_offsets_verdict_and_flags(cat):
    ev = syn.exposure(7, flags=0b101)
    assert cat.add(ev) is True
    assert cat.add(ev) is False  # the same event again: nothing changes
    with cat.engine.connect() as conn:
        (row,) = conn.execute(select(*Exposure.__table__.columns)).mappings().all()
        quads = conn.execute(select(*ExposureQuadrant.__table__.columns)).mappings().all()
    assert (row["block"], row["obsid"], row["test"], row["verdict"], row["passed"]) == ("BORN", 7, "BIAS01", "FAIL", False)
    assert row["flags"] == 5 and row["flag_names"] == "MISSDATA,BADDATA"
    assert row["offset_ccd2"] == pytest.approx(1000 + 200 + 1.5 + 0.007)
    assert row["files"][0]["path"].endswith("_CCD1.fits") and len(row["files"]) == 3
    assert len(quads) == 12
    g = next(q for q in quads if q["ccd"] == "CCD3" and q["quadrant"] == "G")
    assert g["offset_pre"] == pytest.approx(1302.007) and g["offset_ove"] == pytest.approx(1303.007)
    # a re-validation (new event id) of the same ObsID replaces the row
    again = syn.exposure(7, flags=0)
    assert cat.add(again) is True
    with cat.engine.connect() as conn:
        rows = conn.execute(select(Exposure.verdict, Exposure.flag_names)).all()
        assert conn.execute(select(ExposureQuadrant.id)).all().__len__() == 12
    assert rows == [("PASS", "")]
    assert cat.exposure().obsid == 7 and cat.exposure(8) is None


def test_analysis_results_values_units_errors_and_idempotency(cat):
    ev = syn.analysis("PTC01", values={"x_mm": 2.5, "comment": "text is not catalogued"})
    ev.results["CCD2"]["xtalk_pct"] = 0.25  # a per-CCD value
    assert cat.add(ev) is True and cat.add(ev) is False
    rows = cat.results("gain", block="BORN", test="PTC01")
    assert [(r.ccd, r.quadrant) for r in rows] == [(f"CCD{c}", q) for c in (1, 2, 3) for q in "EFGH"]
    r = rows[5]  # CCD2 F
    assert (r.value, r.error, r.unit, r.test, r.repeat, r.software_version) == (3.21, 0.002, "e-/ADU", "PTC01", 0, "0.1.0")
    assert r.event_id == str(ev.event_id)
    assert cat.results("gain_err") == []  # errors live beside their value
    (top,) = cat.results("x_mm")
    assert (top.ccd, top.quadrant, top.value, top.unit) == ("", "", 2.5, "mm")
    assert cat.results("comment") == [] and cat.results("gain", block="DIRAC") == []
    (xt,) = cat.results("xtalk_pct")
    assert (xt.ccd, xt.quadrant, xt.value, xt.unit) == ("CCD2", "", 0.25, "%")
    assert cat.counts()["results"] == 12 * 3 + 2  # gain, a00, bloom_adu per quadrant + x_mm + xtalk_pct


def test_latest_analysis_per_test_and_repeat(cat):
    first = syn.analysis("BIAS01", when=syn.T0)
    later = syn.analysis("BIAS01", when=syn.T0 + timedelta(hours=3), shift=0.5, version="0.2.0")
    repeat = syn.analysis("BIAS01", repeat=2, when=syn.T0 + timedelta(hours=1), shift=0.2)
    failed = syn.analysis("BIAS01", when=syn.T0 + timedelta(hours=5), status="failed")
    for ev in (later, first, repeat, failed):  # arrival order does not matter
        cat.add(ev)
    latest = cat.results("ron_img_adu", block="BORN", test="BIAS01")
    assert {(r.repeat, r.event_id) for r in latest} == {(0, str(later.event_id)), (2, str(repeat.event_id))}
    r0 = next(r for r in latest if r.repeat == 0)
    assert r0.value == pytest.approx(syn.ron_of(1, "E") + 0.5) and r0.software_version == "0.2.0"
    every = cat.results("ron_img_adu", block="BORN", latest=False)
    assert len(every) == 36
    assert [r.produced_at for r in every] == sorted(r.produced_at for r in every)
    wild = cat.results("ron_img_adu", test="BIAS*")
    assert {(r.test, r.repeat) for r in wild} == {("BIAS01", 0), ("BIAS01", 2)}


def test_malformed_analysis_is_refused_with_the_field_named(cat):
    bad = AnalysisCompleted(test="BIAS01", block="BORN", results={"CCD1": {"X": {"ron_img_adu": 1.0}}})
    with pytest.raises(RecordError, match=r"results\.CCD1\.X"):
        cat.add(bad)
    assert cat.counts()["analyses"] == 0  # nothing half-written


def test_fpa_maps_positions_newer_replaces_older_ignored(cat):
    ev = syn.metatest("ptc", ["BORN", "DIRAC", "SKLODOWSKA"])
    assert cat.add(ev) is True and cat.add(ev) is False
    with cat.engine.connect() as conn:
        rows = conn.execute(select(FpaValue.block, FpaValue.ccd, FpaValue.quadrant, FpaValue.value, FpaValue.x,
                                   FpaValue.y).where(FpaValue.quantity == "gain")).all()
        blocks = dict(conn.execute(text("SELECT block, present FROM fpa_blocks WHERE family = 'ptc'")).all())
    assert len(rows) == 36
    pos = {(b, c, q): (x, y) for b, c, q, _, x, y in rows}
    assert pos[("BORN", "CCD1", "E")] == (0, 1) and pos[("DIRAC", "CCD1", "E")] == (11, 0)
    assert pos[("SKLODOWSKA", "CCD1", "E")] == (None, None)  # spares are not on the FPA
    assert {b: bool(v) for b, v in blocks.items() if v} == {"BORN": True, "DIRAC": True} and len(blocks) == 12
    newer = syn.metatest("ptc", ["BORN"], when=ev.produced_at + timedelta(minutes=5))
    assert cat.add(newer) is True
    older = syn.metatest("ptc", ["BORN", "DIRAC", "GUYE"], when=ev.produced_at - timedelta(minutes=5))
    assert cat.add(older) is False
    with cat.engine.connect() as conn:
        assert {b for (b,) in conn.execute(select(FpaValue.block).distinct())} == {"BORN"}


def test_fpa_cells_follow_the_layout():
    assert fpa_cell("BORN", "CCD3", "G").model_dump() == {"slice": 1, "col": 3, "x": 5, "y": 0}
    assert fpa_cell("CURIE", "CCD3", "G").model_dump() == {"slice": 6, "col": 4, "x": 6, "y": 11}
    assert fpa_cell("MAX", "CCD1", "E") is None and fpa_cell("BORN", "CCD4", "E") is None


def test_malformed_metatest_is_refused(cat):
    with pytest.raises(RecordError, match=r"results\.gain\.BORN\.CCD1\.E: not a number"):
        cat.add(MetatestCompleted(family="ptc", blocks=["BORN"], results={"gain": {"BORN": {"CCD1": {"E": "x"}}}}))


def test_rebuild_from_products_gives_the_live_rows(cat, tmp_path):
    products = tmp_path / "products"
    live = syn.analysis("PTC01")
    job = "job-ptc01-born"
    doc = {"schema": "vison.results/1", "test": "PTC01", "repeat": 0, "block": "BORN", "status": "completed",
           "flags": 0, "flag_names": [], "results": live.results, "products": ["BORN/PTC01/results.json"],
           "provenance": {"job_id": job, "created": "2026-03-01T09:00:00+00:00",
                          "software": {"name": "vison", "version": "0.1.0"}}}
    (products / "BORN" / "PTC01").mkdir(parents=True)
    (products / "BORN" / "PTC01" / "results.json").write_text(json.dumps(doc))
    (products / "BORN" / "BIAS01").mkdir(parents=True)
    (products / "BORN" / "BIAS01" / "results.json").write_text("{not json")
    (products / "FPA" / "ptc").mkdir(parents=True)
    maps = {"layout": {}, "maps": syn.fpa_results(["BORN", "GUYE"]), "grid": {}}
    maps["maps"]["gain"]["DIRAC"] = None
    (products / "FPA" / "ptc" / "ptc_maps.json").write_text(json.dumps(maps))
    cat.add(syn.analysis("DARK01"))  # cleared by the rebuild
    report = rebuild(cat, products)
    assert (report.analyses, report.families) == (1, 1)
    assert len(report.skipped) == 1 and report.skipped[0].startswith("BORN/BIAS01/results.json")
    rows = cat.results("gain", block="BORN")
    assert len(rows) == 12 and {r.event_id for r in rows} == {str(derived_event_id("analysis.completed", job))}
    assert rows[0].value == syn.gain_of(1, "E") and rows[0].produced_at.hour == 9
    assert cat.results("dark_current_e_s") == []
    with cat.engine.connect() as conn:
        fam = conn.execute(text("SELECT blocks, missing FROM fpa_families WHERE family = 'ptc'")).one()
        blocks = fam[0] if isinstance(fam[0], list) else json.loads(fam[0])
        assert blocks == ["BORN", "GUYE"]
        assert conn.execute(text("SELECT COUNT(*) FROM fpa_values WHERE quantity = 'gain'")).scalar() == 24
    assert rebuild(cat, products).analyses == 1 and cat.counts()["results"] == 36  # repeatable
