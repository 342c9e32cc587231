"""Metatest: FPA layout, families, maps, electrons, spares, crosstalk, idempotency (no broker)."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from services.metatest.aggregate import (
    ResultError,
    ResultRecord,
    aggregate,
    check_result,
    crosstalk_victims,
    gains_of,
    latest_per_test,
)
from services.metatest.families import FAMILIES, electron_key, families_of
from services.metatest.layout import fpa_layout
from services.metatest.products import write_family_products
from services.metatest.service import Metatest
from shared.config import Settings
from shared.events import AnalysisCompleted
from shared.geometry import CCDS, QUADRANTS
from shared.refdata import reference_data

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
LAYOUT = fpa_layout()
SLICES = reference_data()["fpa_layout"]["slices"]


def expected_cell(block: str, ccd: str, q: str) -> tuple[int, int]:
    """(row from the bottom, column) written independently of the code under test."""
    for s, (left, right) in enumerate(SLICES, start=1):
        n = int(ccd[-1])
        if block == left:
            col, rotated = n, False
        elif block == right:
            col, rotated = 7 - n, True
        else:
            continue
        # frame orientation: E top-left, F top-right, H bottom-left, G bottom-right
        x, y = {"E": (0, 1), "F": (1, 1), "H": (0, 0), "G": (1, 0)}[q]
        if rotated:  # 180 deg: G top-left, H top-right, F bottom-left, E bottom-right
            x, y = 1 - x, 1 - y
        return 2 * (s - 1) + y, 2 * (col - 1) + x
    raise KeyError(block)


def code(block: str, ccd: str, q: str) -> float:
    """A value unique to each quadrant of each known block."""
    blocks = LAYOUT.known_blocks
    return 100 * blocks.index(block) + 10 * int(ccd[-1]) + QUADRANTS.index(q) + 1


def results_of(block: str, fn) -> dict:
    return {c: {q: fn(block, c, q) for q in QUADRANTS} for c in CCDS}


def record(block: str, test: str, fn, when: datetime = T0, repeat: int = 0, eid: str | None = None, **top) -> ResultRecord:
    res = results_of(block, fn)
    res.update(top)
    return ResultRecord(block, test, repeat, eid or f"{test}-{block}-{repeat}-{when.isoformat()}", when, res)


def ptc(block, gain_fn=lambda b, c, q: 3.0 + QUADRANTS.index(q) * 0.1, **kw):
    return record(block, "PTC01", lambda b, c, q: {"gain": gain_fn(b, c, q), "a00": -1.5e-6,
                                                  "turnoff_adu": 60000.0, "bloom_adu": 62000.0}, **kw)


def bias(block, **kw):
    return record(block, "BIAS01", lambda b, c, q: {"offset_pre": 2600.0, "ron_img_adu": code(b, c, q) / 1000.0}, **kw)


# --------------------------------------------------------------------------- layout and maps


def test_layout_cells_follow_the_fpa_orientation():
    assert LAYOUT.position("BORN", "CCD1").ccd_id == "1-1"
    assert LAYOUT.position("DIRAC", "CCD3").ccd_id == "1-4"  # metatest.md: 1-4 = CCD3 of DIRAC
    assert LAYOUT.position("DIRAC", "CCD1").ccd_id == "1-6"
    assert LAYOUT.position("MAX", "CCD1") is None and LAYOUT.cell("MAX", "CCD1", "E") is None
    assert LAYOUT.cell("BORN", "CCD1", "E") == (1, 0)  # top-left of the lower-left CCD
    assert LAYOUT.cell("BORN", "CCD1", "G") == (0, 1)
    assert LAYOUT.cell("DIRAC", "CCD3", "E") == (0, 7)  # rotated: E bottom-right
    assert LAYOUT.cell("DIRAC", "CCD3", "G") == (1, 6)  # rotated: G top-left
    assert LAYOUT.cell("CURIE", "CCD1", "F") == (10, 10)  # slice 6, column 6, F bottom-left


def test_ptc_maps_cell_by_cell_with_a_missing_block(tmp_path):
    blocks = [b for b in LAYOUT.fpa_blocks if b != "KRAMERS"]
    latest = latest_per_test([ptc(b, gain_fn=code) for b in blocks])
    res = aggregate(FAMILIES["ptc"], latest, gains_of(latest), LAYOUT)
    assert res.missing == ["KRAMERS"] and res.blocks == blocks
    paths = write_family_products(res, LAYOUT, tmp_path)
    doc = json.loads((tmp_path / "FPA/ptc/ptc_maps.json").read_text())
    assert set(doc) == {"layout", "maps", "grid"}
    assert doc["layout"]["DIRAC"] == {"CCD1": "1-6", "CCD2": "1-5", "CCD3": "1-4"}
    grid = doc["grid"]["gain"]
    assert len(grid) == 12 and all(len(row) == 12 for row in grid)
    seen = set()
    for block in LAYOUT.fpa_blocks:
        for ccd in CCDS:
            for q in QUADRANTS:
                r, c = expected_cell(block, ccd, q)
                seen.add((r, c))
                want = None if block == "KRAMERS" else code(block, ccd, q)
                assert grid[r][c] == want, (block, ccd, q)
                assert doc["maps"]["gain"][block][ccd][q] == want
    assert len(seen) == 144
    # electrons: turnoff_e = turnoff_adu x the block's own PTC01 gain
    assert doc["maps"]["turnoff_e"]["BORN"]["CCD2"]["H"] == pytest.approx(60000.0 * code("BORN", "CCD2", "H"))
    assert "FPA/ptc/ptc_gain.png" in paths and (tmp_path / "FPA/ptc/ptc_gain.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((tmp_path / "FPA/ptc/ptc_table.csv").open()))
    assert len(rows) == 11 * 12
    row = next(r for r in rows if r["BLOCK"] == "DIRAC" and r["CCD"] == "CCD3" and r["QUAD"] == "E")
    assert row["CCDID"] == "1-4" and float(row["gain"]) == code("DIRAC", "CCD3", "E")
    from astropy.io import fits

    with fits.open(tmp_path / "FPA/ptc/ptc_table.fits") as hdul:
        t = hdul["TABLE"].data
        assert len(t) == 132 and "turnoff_e" in t.columns.names
        sel = (t["BLOCK"] == "DIRAC") & (t["CCD"] == "CCD3") & (t["QUAD"] == "E")
        assert t["gain"][sel][0] == code("DIRAC", "CCD3", "E")


def test_spares_are_in_tables_and_blocks_never_in_maps_nor_missing(tmp_path):
    latest = latest_per_test([ptc("BORN"), ptc("MAX", gain_fn=lambda b, c, q: 9.0)])
    res = aggregate(FAMILIES["ptc"], latest, gains_of(latest), LAYOUT)
    assert res.blocks == ["BORN", "MAX"]
    assert "MAX" not in res.missing and len(res.missing) == 11
    maps = res.maps(LAYOUT)
    assert "MAX" not in maps["gain"] and set(maps["gain"]) == set(LAYOUT.fpa_blocks)
    assert 9.0 not in [v for row in LAYOUT.grid(maps["gain"]) for v in row]
    assert res.spare_values(LAYOUT)["gain"]["MAX"]["CCD1"]["E"] == 9.0
    write_family_products(res, LAYOUT, tmp_path)
    rows = list(csv.DictReader((tmp_path / "FPA/ptc/ptc_table.csv").open()))
    spare = [r for r in rows if r["BLOCK"] == "MAX"]
    assert len(spare) == 12 and all(r["ON_FPA"] == "False" and r["CCDID"] == "" and r["gain"] == "9.0" for r in spare)


# --------------------------------------------------------------------------- electrons, latest


def test_electrons_from_the_latest_ptc01_and_recomputation_on_a_new_one():
    assert electron_key("ron_img_adu") == "ron_img_e" and electron_key("dark_current_adu_s") == "dark_current_e_s"
    names = {f.name for f in families_of("PTC01")}
    assert {"ptc", "bias", "dark", "nl", "chinj", "tp", "persistence", "warm"} <= names
    assert "flat" not in names and "cosmetics" not in names
    old = ptc("BORN", gain_fn=lambda b, c, q: 3.0, when=T0, eid="ptc-old")
    new = ptc("BORN", gain_fn=lambda b, c, q: 4.0, when=T0 + timedelta(hours=1), eid="ptc-new", repeat=2)
    b = bias("BORN", eid="bias-1")
    latest = latest_per_test([old, b])
    res = aggregate(FAMILIES["bias"], latest, gains_of(latest), LAYOUT)
    adu = res.values["ron_img_adu"]["BORN"]["CCD3"]["F"]
    assert res.values["ron_img_e"]["BORN"]["CCD3"]["F"] == pytest.approx(adu * 3.0)
    assert res.inputs == ["bias-1", "ptc-old"]
    latest = latest_per_test([old, new, b])  # a later repeat of PTC01: its gain is the latest
    res2 = aggregate(FAMILIES["bias"], latest, gains_of(latest), LAYOUT)
    assert res2.values["ron_img_e"]["BORN"]["CCD3"]["F"] == pytest.approx(adu * 4.0)
    assert res2.inputs == ["bias-1", "ptc-new"]
    # a block without PTC01: no electrons (null), ADU still there
    latest = latest_per_test([b, bias("GUYE", eid="bias-2"), old])
    res3 = aggregate(FAMILIES["bias"], latest, gains_of(latest), LAYOUT)
    assert res3.values["ron_img_e"]["GUYE"]["CCD1"]["E"] is None
    assert res3.values["ron_img_adu"]["GUYE"]["CCD1"]["E"] == code("GUYE", "CCD1", "E") / 1000.0


def _event(block, test, results, when, eid=None, status="completed", repeat=None):
    kw = {"event_id": eid} if eid else {}
    return AnalysisCompleted(test=test, block=block, results=results, produced_at=when, status=status, repeat=repeat, **kw)


def _service(tmp_path) -> Metatest:
    settings = Settings(_env_file=None, products_root=tmp_path / "products", state_dir=tmp_path / "state")
    return Metatest(settings, batch_seconds=0.0, figures=False)


def test_service_idempotent_latest_and_failed_reanalysis_keeps_the_good_result(tmp_path):
    svc = _service(tmp_path)
    sent = []
    gain = {c: {q: {"gain": 3.3} for q in QUADRANTS} for c in CCDS}
    first = _event("BORN", "PTC01", gain, T0)
    assert svc.accept(first) is None
    svc.flush(sent.append)
    assert [e.family for e in sent] == ["ptc"]  # no bias / dark input yet: nothing to publish there
    ev = sent[0]
    assert ev.inputs == [str(first.event_id)] and len(ev.missing) == 11 and ev.blocks == ["BORN"]
    assert ev.results["gain"]["BORN"]["CCD2"]["G"] == 3.3 and ev.results["gain"]["CURIE"]["CCD1"]["E"] is None
    # the same input again (a redelivery, or republished under the same id): nothing new
    assert svc.accept(first) is None
    assert svc.flush(sent.append) == [] and len(sent) == 1
    # an older result of the same test run (another id): not the latest, nothing new
    svc.accept(_event("BORN", "PTC01", {c: {q: {"gain": 9.9} for q in QUADRANTS} for c in CCDS}, T0 - timedelta(hours=1)))
    assert svc.flush(sent.append) == [] and len(sent) == 1
    # a failed re-analysis keeps the previous good result
    svc.accept(_event("BORN", "PTC01", {}, T0 + timedelta(hours=1), status="failed"))
    assert svc.flush(sent.append) == []
    # recomputing with the same inputs gives the same id (even after a restart: the state is durable)
    svc.close()
    svc = _service(tmp_path)
    svc.store.mark_dirty(["ptc"])
    assert svc.flush(sent.append) == [] and len(sent) == 1
    # a newer PTC01 recomputes ptc (and the electron families that have input)
    svc.accept(_event("BORN", "BIAS01", results_of("BORN", lambda b, c, q: {"ron_img_adu": 1.3}), T0))
    newer = _event("BORN", "PTC01", {c: {q: {"gain": 3.5} for q in QUADRANTS} for c in CCDS}, T0 + timedelta(hours=2))
    svc.accept(newer)
    out = {e.family: e for e in svc.flush(sent.append)}
    assert set(out) == {"ptc", "bias"}
    assert out["bias"].results["ron_img_e"]["BORN"]["CCD1"]["E"] == pytest.approx(1.3 * 3.5)
    assert str(newer.event_id) in out["bias"].inputs and str(newer.event_id) in out["ptc"].inputs
    assert (tmp_path / "products/FPA/bias/bias_maps.json").is_file()
    assert all(not p.startswith("/") for p in out["bias"].products)
    svc.close()


@pytest.mark.parametrize("block, results, reason", [
    ("NOBODY", results_of("BORN", lambda b, c, q: {"gain": 3.0}), "unknown block"),
    ("BORN", {c: {q: {"gain": 3.0} for q in "EFG"} for c in CCDS}, "lacks quadrant"),
    ("BORN", {c: {q: {"gain": 3.0} for q in QUADRANTS} for c in ("CCD1", "CCD2")}, "missing CCD CCD3"),
    ("BORN", {c: {q: {"gain": "3.0"} for q in QUADRANTS} for c in CCDS}, "is not a number"),
])
def test_malformed_results_are_refused_with_a_reason(tmp_path, block, results, reason):
    with pytest.raises(ResultError, match=reason):
        check_result(block, "PTC01", results, LAYOUT, {"gain"})
    svc = _service(tmp_path)
    failure = svc.accept(_event(block, "PTC01", results, T0))
    assert failure is not None and failure.kind == "processing.failed" and reason in failure.why
    assert failure.block == block and failure.what == "analysis"
    assert svc.store.count() == 0
    svc.close()


# --------------------------------------------------------------------------- crosstalk


def _xtalk(extra: dict[tuple[str, str], float]) -> dict:
    names = [f"{c}.{q}" for c in CCDS for q in QUADRANTS]
    xt = {s: {v: 1e-6 for v in names if v != s} for s in names}
    for (s, v), c in extra.items():
        xt[s][v] = c
    return xt


def test_crosstalk_requirement_passes_and_fails_per_victim():
    ok = crosstalk_victims(_xtalk({("CCD1.E", "CCD1.F"): 5.9e-4, ("CCD2.E", "CCD1.F"): 8e-5}))
    assert ok["CCD1.F"] == {"crosstalk_max": 5.9e-4, "crosstalk_n_above": 1, "crosstalk_ok": True}
    bad = crosstalk_victims(_xtalk({("CCD1.E", "CCD1.F"): 1e-4, ("CCD2.E", "CCD1.F"): 8e-5, ("CCD3.E", "CCD1.F"): 9e-5,
                                    ("CCD1.E", "CCD2.G"): 6.5e-4}))
    assert bad["CCD1.F"]["crosstalk_n_above"] == 2 and not bad["CCD1.F"]["crosstalk_ok"]  # two secondaries
    assert not bad["CCD2.G"]["crosstalk_ok"]  # dominant above 6e-4
    assert bad["CCD3.H"]["crosstalk_ok"]
    fn = lambda b, c, q: {"fwhm_x_px": 1.5, "fwhm_y_px": 1.6}  # noqa: E731
    good = record("BORN", "PSF01_800", fn, crosstalk=_xtalk({}))
    failing = record("DIRAC", "PSF01_800", fn, crosstalk=_xtalk({("CCD1.E", "CCD2.G"): 6.5e-4}))
    latest = latest_per_test([good, failing])
    res = aggregate(FAMILIES["psf"], latest, gains_of(latest), LAYOUT)
    assert res.summary["crosstalk_requirement_met"] is False
    per_block = res.summary["crosstalk"]["PSF01_800"]
    assert per_block["BORN"]["requirement_met"] and per_block["DIRAC"]["failing_victims"] == ["CCD2.G"]
    assert res.values["crosstalk_ok_PSF01_800"]["DIRAC"]["CCD2"]["G"] == 0.0
    assert res.values["crosstalk_ok_PSF01_800"]["DIRAC"]["CCD2"]["H"] == 1.0
    assert res.values["fwhm_x_px_PSF01_800"]["BORN"]["CCD1"]["E"] == 1.5
    latest = latest_per_test([good])
    assert aggregate(FAMILIES["psf"], latest, {}, LAYOUT).summary["crosstalk_requirement_met"] is True


# --------------------------------------------------------------------------- mosaics


def _master(path: Path, block: str, ccd: str) -> np.ndarray:
    from astropy.io import fits

    rng = np.random.default_rng(abs(hash((block, ccd))) % 2**32)
    arr = rng.normal(0, 1, (8, 10)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(arr, name="STACK")]).writeto(path)
    return arr


def test_master_bias_mosaic_in_fpa_orientation(tmp_path):
    from astropy.io import fits

    arrays = {}
    for block in ("BORN", "DIRAC", "MAX"):
        for ccd in CCDS:
            arrays[(block, ccd)] = _master(tmp_path / block / "BIAS01" / f"master_bias_{ccd}.fits", block, ccd)
    recs = [bias(b) for b in ("BORN", "DIRAC", "MAX")]
    latest = latest_per_test(recs)
    res = aggregate(FAMILIES["bias"], latest, gains_of(latest), LAYOUT)
    paths = write_family_products(res, LAYOUT, tmp_path, figures=False)
    assert "FPA/bias/bias_master_bias_BIAS01.fits" in paths
    with fits.open(tmp_path / "FPA/bias/bias_master_bias_BIAS01.fits") as hdul:
        names = [h.name for h in hdul[1:]]
        assert len(names) == 24  # 2 FPA blocks x 3 CCDs x 4 quadrants, no spare
        born = arrays[("BORN", "CCD1")]
        e = hdul["1-1.E"]
        assert (e.header["BLOCK"], e.header["CCD"], e.header["CCDID"], e.header["QUAD"]) == ("BORN", "CCD1", "1-1", "E")
        np.testing.assert_array_equal(e.data, born[4:, :5])  # E: top-left as read in the frame
        np.testing.assert_array_equal(hdul["1-1.G"].data, born[:4, 5:])  # G: bottom-right
        dirac = arrays[("DIRAC", "CCD3")]
        x = hdul["1-4.E"]
        assert (x.header["BLOCK"], x.header["CCD"], x.header["ROTATED"]) == ("DIRAC", "CCD3", True)
        np.testing.assert_array_equal(x.data, dirac[4:, :5][::-1, ::-1])  # rotated by 180 deg
        assert all(h.header["BLOCK"] != "MAX" for h in hdul[1:])


def test_bias_history_follows_offsets_and_ron_across_the_tests_of_a_block(tmp_path):
    from services.metatest.aggregate import history_rows

    b1 = bias("BORN", eid="b1")
    b2 = record("BORN", "BIAS01", lambda b, c, q: {"offset_pre": 2601.0, "ron_img_adu": 1.5}, repeat=2,
                when=T0 + timedelta(hours=3), eid="b2")
    dark = record("BORN", "DARK01", lambda b, c, q: {"offset_ref": 2599.5, "dark_current_adu_s": 0.001},
                  when=T0 + timedelta(hours=1), eid="d1")
    rows = history_rows(FAMILIES["bias"], [b2, dark, b1])
    born_e = [r for r in rows if r["CCD"] == "CCD1" and r["QUAD"] == "E"]
    assert [r["TEST"] for r in born_e] == ["BIAS01", "DARK01", "BIAS01.2"]  # by time
    assert [r["offset_pre"] for r in born_e] == [2600.0, None, 2601.0]
    assert born_e[1]["offset_ref"] == 2599.5
    latest = latest_per_test([b1, b2, dark])
    assert latest[("BORN", "BIAS01")].event_id == "b2"  # the later repeat is the latest
    res = aggregate(FAMILIES["bias"], latest, gains_of(latest), LAYOUT)
    paths = write_family_products(res, LAYOUT, tmp_path, figures=False, history=rows)
    assert "FPA/bias/bias_history.csv" in paths
    assert len(list(csv.DictReader((tmp_path / "FPA/bias/bias_history.csv").open()))) == 36
    assert res.values["ron_img_adu"]["BORN"]["CCD1"]["E"] == 1.5


def test_declared_families_work_as_soon_as_their_keys_exist():
    gain = ptc("BORN", gain_fn=lambda b, c, q: 3.5, eid="g")
    chinj = record("BORN", "CHINJ01", lambda b, c, q: {"ig1_threshold_v": 3.1, "slope_adu_per_v": 6000.0,
                                                      "fit_ok": True}, eid="c")
    warm = record("BORN", "MOT_WARM", lambda b, c, q: {"ron_adu": {"fwd_bas": 1.3, "rwd_bas_v": 1.2}, "her": 1e-4},
                  eid="w")
    flat = record("BORN", "FLAT02_730", lambda b, c, q: {"prnu_pct": 1.1, "column_prnu_pct": [1.0, 1.2]}, eid="f")
    latest = latest_per_test([gain, chinj, warm, flat])
    gains = gains_of(latest)
    c = aggregate(FAMILIES["chinj"], latest, gains, LAYOUT)
    assert c.values["slope_e_per_v"]["BORN"]["CCD2"]["F"] == pytest.approx(6000.0 * 3.5)
    assert c.quantities["slope_e_per_v"].unit == "e-/V" and c.inputs == ["c", "g"]
    w = aggregate(FAMILIES["warm"], latest, gains, LAYOUT)
    assert w.values["ron_adu_fwd_bas"]["BORN"]["CCD1"]["E"] == 1.3
    assert w.values["ron_e_rwd_bas_v"]["BORN"]["CCD1"]["E"] == pytest.approx(1.2 * 3.5)
    assert "ron_adu" not in w.quantities
    f = aggregate(FAMILIES["flat"], latest, gains, LAYOUT)
    assert f.values["prnu_pct_FLAT02_730"]["BORN"]["CCD3"]["H"] == 1.1
    assert f.values["column_prnu_pct_2_FLAT02_730"]["BORN"]["CCD3"]["H"] == 1.2
    assert f.inputs == ["f"]  # flat does not convert to electrons: the gain is not an input
    assert aggregate(FAMILIES["tp"], latest, gains, LAYOUT) is None  # no TP result: nothing to publish
    with pytest.raises(ResultError, match="not a number"):
        check_result("BORN", "MOT_WARM", results_of("BORN", lambda b, c, q: {"ron_adu": {"fwd_bas": "x"}}), LAYOUT,
                     {"ron_adu"})


def test_persistence_median_decay_and_a_family_due_survives_a_restart(tmp_path):
    def fn(b, c, q):
        k = QUADRANTS.index(q)  # excess 10+k then 5+k: medians over E..H are 11.5 and 6.5
        return {"persistence_adu": 10.0 + k, "decay": [{"t_s": 300.0, "excess_adu": 10.0 + k},
                                                       {"t_s": 900.0, "excess_adu": 5.0 + k}]}
    latest = latest_per_test([record("BORN", "PERSIST01", fn), record("MAX", "PERSIST01", lambda b, c, q: {
        "persistence_adu": 99.0, "decay": [{"t_s": 300.0, "excess_adu": 99.0}]})])
    res = aggregate(FAMILIES["persistence"], latest, {}, LAYOUT)
    assert res.summary["median_decay"] == [{"t_s": 300.0, "excess_adu": 11.5, "n_quadrants": 12},
                                           {"t_s": 900.0, "excess_adu": 6.5, "n_quadrants": 12}]  # spare MAX left out
    # a result stored but not yet aggregated when the service stops is aggregated after the restart
    svc = _service(tmp_path)
    svc.accept(_event("GUYE", "PTC01", {c: {q: {"gain": 3.1} for q in QUADRANTS} for c in CCDS}, T0))
    svc.close()
    svc = _service(tmp_path)
    sent = []
    svc.flush(sent.append)
    assert [e.family for e in sent] == ["ptc"] and sent[0].blocks == ["GUYE"]
    svc.close()


def test_an_input_marked_during_a_recomputation_keeps_its_family_due(tmp_path):
    from services.metatest.state import MetatestStore

    store = MetatestStore(tmp_path / "m.sqlite")
    store.mark_dirty(["ptc", "bias"])
    seq = store.due()["ptc"]
    store.mark_dirty(["ptc"])  # arrives while ptc is being rebuilt from what was read before
    assert store.clear_dirty("ptc", seq) is False and "ptc" in store.due()
    assert store.clear_dirty("bias", store.due()["bias"]) is True and "bias" not in store.due()
    assert store.due(older_than=3600) == {}  # batching: not due before its window has passed
    store.close()
