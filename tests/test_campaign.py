"""Test definitions of the campaign: frame counts, durations, layering, naming, parameter
validation, presets and the campaign definition (shared/campaign)."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from shared.campaign import (
    DEFAULTS,
    FAMILIES,
    CampaignConfig,
    CampaignDefinition,
    campaign_preset,
    compose,
    frame_duration_s,
    get_test,
    load_campaign_config,
)
from shared.refdata import chamber_profile

CHAMBER = "CHAMBER_B_BORN"
EQUIP = {"operator": "jdoe", "sn_ccd1": "C1", "sn_ccd2": "C2", "sn_ccd3": "C3", "sn_roe": "R4", "sn_rpsu": "P4"}

# frames of campaign.md (and of the choices documented in shared/campaign/catalogue.py)
FRAMES = {
    "BIAS01": 10, "BIAS02": 10, "DARK01": 4, "CHINJ01": 36, "CHINJ02": 26, "TP01": 50, "TP11": 50,
    "TP02": 18, "TP21": 18, "FLAT01": 170, "FLAT02_730": 110, "FLAT02_590": 110, "FLAT_STB": 20,
    "PTC01": 92, "PTC02_590": 24, "PTC02_150K": 24, "PTC02_15.5R": 24, "NL01": 109, "NL02": 109,
    "NL02_16.5R": 109, "BF01": 0, "BF01_880": 0, "FOCUS00_800": 9, "PSF01_590": 53, "PSF01_800": 53,
    "PSF02": 53, "PERSIST01": 12, "COSMETICS00": 10, "MOT_WARM": 8, "BIAS01.2": 10,
}


def script(name, params=None, chamber=CHAMBER, equipment=EQUIP):
    return get_test(name).script(params, chamber, equipment)


@pytest.mark.parametrize("name,frames", sorted(FRAMES.items()))
def test_frame_counts(name, frames):
    s = script(name)
    assert s.total_frames == frames
    assert s.test == get_test(name).name
    assert all(c.values["test"] == s.test for c in s.columns)


def test_every_family_has_a_definition_in_the_frame_table():
    families = {get_test(n).family.name for n in FRAMES}
    assert families == set(FAMILIES)


def test_column_structure_of_injection_and_pumping_tests():
    chinj = script("CHINJ01")
    ig1 = [c.values["IG1_1_T"] for c in chinj.columns]
    assert ig1[:18] == pytest.approx([2.5 + 0.25 * i for i in range(18)]) and ig1[18:] == ig1[:18]
    assert {c.values["id_dly"] for c in chinj.columns[:18]} == {1250} and chinj.columns[18].values["id_dly"] == 750
    assert all(c.values["IDL"] == 11 and c.values["IG2_B"] == 6 and c.values["toi_ch"] == 500
               and c.values["chinj_on"] == 30 and c.values["chinj_of"] == 100 for c in chinj.columns)
    assert [c.values["IDL"] for c in script("CHINJ02").columns][:13] == pytest.approx([9.5 + 0.25 * i for i in range(13)])
    tp = script("TP01").columns
    assert [c.values["v_tpump"] for c in tp].count(0) == 2  # one reference per delay
    assert {(c.values["toi_tp"], c.values["v_tpmod"]) for c in tp if c.values["v_tpump"]} == {
        (t, m) for t in (50, 200, 1000, 2000, 4000, 8000) for m in (123, 234, 341, 412)}
    assert all(c.values["v_tp_cnt"] == 5000 for c in tp)
    assert script("TP11").columns[0].values["IDL"] == 10.5
    tp2 = script("TP02").columns
    assert all(c.values["vend"] == 100 for c in tp2)
    assert {c.values["dwell_s"] for c in tp2 if c.values["s_tpump"]} == {0, 4.75, 14.3, 28.6}


def test_exposure_times_are_fractions_of_the_chamber_full_well_times():
    prof = chamber_profile(CHAMBER)
    flat = script("FLAT01")
    assert [c.frames for c in flat.columns] == [80, 60, 30]
    assert [c.values["exptime"] for c in flat.columns] == pytest.approx(
        [f * prof["tFWC_flat"]["nm800"] for f in (0.25, 0.5, 0.75)], rel=1e-3)
    assert {c.values["wave"] for c in flat.columns} == {4} and flat.columns[0].values["source"] == "flat"
    f730 = script("FLAT02_730")
    assert f730.columns[0].values["wave"] == 3
    assert f730.columns[1].values["exptime"] == pytest.approx(0.75 * prof["tFWC_flat"]["nm730"], rel=1e-3)
    psf = script("PSF01_880")
    assert psf.columns[0].values["exptime"] == pytest.approx(0.05 * prof["tFWC_point"]["nm880"], rel=1e-2)
    assert psf.columns[0].values["source"] == "point" and psf.columns[0].values["mirr_on"] == 1
    assert psf.columns[0].values["mirr_pos"] == prof["mirror_nom"]["F5"]
    focus = script("FOCUS00_590").columns
    assert [c.values["mirr_pos"] for c in focus] == pytest.approx(
        [prof["mirror_nom"]["F1"] + 0.2 * j for j in range(-4, 5)])


def test_nl02_uses_nd_below_20_percent_and_880_above():
    prof = chamber_profile(CHAMBER)
    cols = script("NL02").columns
    assert cols[0].frames == 3 and cols[0].values["shuttr"] == 0  # background
    stab = [c for c in cols if c.values["comments"] == "STAB"]
    flu = [c for c in cols if c.values["comments"] == "FLU"]
    assert len(stab) == 22 and len(flu) == 21 and all(c.frames == 4 for c in flu)
    assert all(c.values["wave"] == 5 for c in stab)
    for c in flu:
        percent = 100 * c.values["exptime"] / (prof["tFWC_flat"]["nm0"] if c.values["wave"] == 6 else prof["tFWC_flat"]["nm880"])
        assert (c.values["wave"] == 6) == (percent < 20 - 1e-6)
    assert script("NL02_15.5R").columns[5].values["RD_T"] == 15.5


def test_bf01_has_no_frames_and_names_its_data():
    assert get_test("BF01").data_from == "PTC01"
    assert get_test("BF01_590").data_from == "PTC02_590"
    assert get_test("BF01_15.5R").data_from == "PTC02_15.5R"
    assert script("BF01").columns == [] and script("BF01").data_from == "PTC01"


def test_durations_follow_the_campaign_formula():
    bias = script("BIAS01")
    assert bias.columns[0].frame_duration_s == pytest.approx(93.5, abs=1.0)
    assert bias.duration_min == pytest.approx(15.6, abs=0.2)
    # by hand: vertical pumping column of TP01 (toi_tp 8000 us, 5000 cycles, chin_dly 0)
    col = next(c for c in script("TP01").columns if c.values["toi_tp"] == 8000)
    us = 2066 * 4 * 143 + 2086 * (4 * 1000 + 14.3 * 2128) + 2066 * (4 * 1000) + (4 * 8000 + 0) * 5000
    assert col.frame_duration_s == pytest.approx(0.5 + us * 1e-6 + 20, rel=1e-9)
    # serial pumping (vend 100, dwell 28.6 us) and exposure time add in
    col = next(c for c in script("TP02").columns if c.values["dwell_s"] == 28.6)
    us = 2066 * 4 * 143 + 100 * (4000 + 14.3 * 2128) + 2066 * 4000 + 100 * (2 * 14.3 + 28.6) * 5000
    assert col.frame_duration_s == pytest.approx(0.5 + us * 1e-6 + 20, rel=1e-9)
    dark = script("DARK01")
    assert dark.duration_s == pytest.approx(4 * (565 + frame_duration_s(DEFAULTS)), rel=1e-9)
    assert frame_duration_s({**DEFAULTS, "siflsh": 0}) == pytest.approx(frame_duration_s(DEFAULTS) - 0.5)


def test_layering_defaults_common_column_equipment():
    v = compose({"IDL": 11, "operator": "common", "rdmode": "rwd_bas_v"},
                {"IDL": 12, "operator": "column"}, {"operator": "equipment"})
    assert v["IDL"] == 12 and v["operator"] == "equipment" and v["rdmode"] == "rwd_bas_v"
    assert v["IDH"] == 18 and v["toi_fl"] == 143 and v["vend"] == 2086  # defaults
    assert list(v)[:3] == ["program", "test", "IDL"]
    with pytest.raises(ValueError, match="bogus"):
        compose({"bogus": 1}, {})
    s = script("BIAS02")
    assert s.columns[0].values["rdmode"] == "rwd_bas_v" and s.columns[0].values["swellw"] == 8.4
    assert all(c.values["sn_roe"] == "R4" and c.values["operator"] == "jdoe" for c in script("FLAT01").columns)


def test_naming_suffixes_and_repeats():
    assert get_test("PTC02_16R").name == "PTC02_16.0R" and get_test("ptc02_16.0r").name == "PTC02_16.0R"
    assert get_test("PTC02_16R").script(None, CHAMBER).columns[0].values["RD_B"] == 16
    t = get_test("PTC02_150K")
    assert t.params().temperature == 150 and script("PTC02_150K").columns[0].values["comments"] == "T=150K"
    assert get_test("NL02_15.5R.2").name == "NL02_15.5R.2" and get_test("NL02_15.5R.2").repeat == 2
    assert script("FLAT02_730.3").columns[0].values["test"] == "FLAT02_730.3"
    with pytest.raises(ValueError, match="needs a suffix"):
        get_test("FLAT02")
    with pytest.raises(ValueError, match="wavelength"):
        get_test("FLAT02_731")
    with pytest.raises(ValueError, match="suffix"):
        get_test("BIAS01_590")
    with pytest.raises(KeyError, match="unknown test"):
        get_test("FOO01")


def test_parameter_validation_names_the_field():
    with pytest.raises(ValidationError) as exc:
        get_test("BIAS01").params({"N": 0})
    assert exc.value.errors()[0]["loc"] == ("N",)
    with pytest.raises(ValidationError, match="frames"):
        get_test("PTC01").params({"frames": [4, 4]})
    with pytest.raises(ValidationError, match="IG1_max"):
        get_test("CHINJ01").params({"IG1_min": 5, "IG1_max": 4})
    with pytest.raises(ValueError, match="wavelength: fixed"):
        get_test("PSF01_590").params({"wavelength": 800})
    with pytest.raises(ValueError, match="640 nm is not on the filter wheel"):
        get_test("FLAT02_640").script(None, CHAMBER)


BASE = {"block": "BORN", "chamber": CHAMBER, "operator": "jdoe"}


@pytest.mark.parametrize("change,field", [
    ({"tests": [{"name": "BIAS01", "params": {"N": 5000}}]}, "params.N"),
    ({"tests": [{"name": "BIAS01", "params": {"bogus": 1}}]}, "params.bogus"),
    ({"tests": ["FOO99"]}, "unknown test 'FOO99'"),
    ({"tests": ["BIAS01"], "chamber": "NOPE"}, "chamber"),
    ({"tests": ["BIAS01"], "chamber": None}, "chamber"),
    ({"tests": ["BIAS01"], "operator": None}, "operator"),
    ({"tests": ["BIAS01", "BIAS01"]}, "appears twice"),
    ({"tests": ["BF01"]}, "PTC01"),
    ({"tests": ["PTC02_640"]}, "wavelength"),
])
def test_bad_configuration_is_refused_naming_the_field(change, field):
    data = {**BASE, **change}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(ValidationError) as exc:
        CampaignConfig.model_validate(data)
    text = str(exc.value)
    assert field in text
    if change.get("chamber", "") is None:
        assert exc.value.errors()[0]["loc"] == ("chamber",)


def test_presets():
    full = CampaignConfig(**BASE, preset="full").define()
    assert {get_test(t.name).family.name for t in full.tests} == set(FAMILIES) - {"MOT_WARM"}
    assert full.test("PTC01").expected_frames == 92 and full.test("NL02").expected_frames == 109
    assert full.total_frames == sum(t.expected_frames for t in full.tests)
    mini = CampaignConfig(**BASE, preset="mini").define()
    frames = mini.expected_frames()
    assert frames["BIAS01"] == 3 and frames["DARK01"] == 1 and frames["FLAT01"] == 3
    assert frames["FLAT02_730"] == 2 and frames["PSF01_800"] == 12
    assert len([n for n in frames if n.startswith("FOCUS00_")]) == 3
    tp = mini.test("TP01").script
    assert {c.values["v_tp_cnt"] for c in tp.columns} == {500}
    assert len({c.values["toi_tp"] for c in tp.columns if c.values["v_tpump"]}) == 3
    assert len({c.values["dwell_s"] for c in mini.test("TP02").script.columns if c.values["s_tpump"]}) == 3
    assert mini.duration_s < full.duration_s / 10
    warm = CampaignConfig(**BASE, preset="warm").define()
    assert warm.tests[0].name == "MOT_WARM" and warm.tests[0].expected_frames == 8
    scripts = campaign_preset("mini").scripts(CHAMBER, {"operator": "jdoe"})
    assert [sc.total_frames for sc in scripts] == list(frames.values())
    assert CampaignConfig(**BASE, preset="mini").scripts() == scripts
    with pytest.raises(ValueError):
        campaign_preset("nope")  # type: ignore[arg-type]


def test_preset_overrides_and_appends():
    cfg = CampaignConfig(**BASE, preset="mini", tests=[{"name": "BIAS01", "params": {"N": 5}}, "BIAS01.2"])
    d = cfg.define()
    assert d.test("BIAS01").expected_frames == 5 and d.tests[0].name == "BIAS01"
    assert d.tests[-1].name == "BIAS01.2"
    # re-validating the dumped configuration gives the same definition
    again = CampaignConfig.model_validate(cfg.model_dump(mode="json")).define()
    assert again == d


def test_definition_is_self_contained_json():
    cfg = load_campaign_config("""
block: BORN
chamber: CHAMBER_B_BORN
operator: jdoe
equipment: {sn_roe: FM04}
date: 2024-03-01
tests: [BIAS01, {name: FLAT02_880, params: {frames: [2, 2]}}, PTC01, BF01]
""")
    d = cfg.define()
    back = CampaignDefinition.model_validate_json(d.model_dump_json())
    assert back == d
    assert back.chamber_profile["tFWC_flat"]["nm880"] == chamber_profile(CHAMBER)["tFWC_flat"]["nm880"]
    assert back.test("FLAT02_880").script.columns[1].values["sn_roe"] == "FM04"
    assert back.expected_frames() == {"BIAS01": 10, "FLAT02_880": 4, "PTC01": 92, "BF01": 0}
    assert back.tests[1].start_offset_s == pytest.approx(back.tests[0].duration_s)
    assert back.test("BF01").data_from == "PTC01"
    assert math.isclose(back.duration_s, sum(t.duration_s for t in back.tests))
    assert back.test("BIAS01").script.waived_keys  # carried for the structure check
