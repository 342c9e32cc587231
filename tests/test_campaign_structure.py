"""The structure check (pure): exposure-log rows of one CCD against a test's script."""

from __future__ import annotations

import json

import pytest

from shared.campaign import CampaignConfig, check_structure, explog_values, get_test
from shared.flags import Flag, flag_names

CHAMBER = "CHAMBER_B_BORN"
EQUIP = {"operator": "jdoe", "sn_ccd1": "C1", "sn_roe": "R4"}


def rows_of(script, ccd=1):
    """Exposure-log rows (7.5.X columns) a faithful acquisition of ``script`` writes for one CCD."""
    rows = []
    for col in script.columns:
        for _ in range(col.frames):
            row = {"ObsID": 1000 + len(rows), "File_name": "x", "CCD": ccd, "ROE": 1, "date": "010324D120000T",
                   "R1C1_TT": -120.0, **explog_values(col.values)}
            rows.append(row)
    return rows


def test_log_rows_carry_composed_iphi_and_7_5_spellings():
    s = get_test("TP01").script(None, CHAMBER, EQUIP)
    row = explog_values(s.columns[3].values)
    assert row["IPHI"] == "I1I2I3"
    assert row["v_tp_mod"] == s.columns[3].values["v_tpmod"] and "v_tpmod" not in row
    assert row["motr"] == 0 and "frames" not in row and "comments" not in row


def test_correct_mini_campaign_passes_untouched():
    mini = CampaignConfig(block="BORN", chamber=CHAMBER, operator="jdoe", preset="mini").define()
    for plan in mini.tests:
        rows = rows_of(plan.script)
        partial = check_structure(plan.script, rows[: len(rows) // 2])
        assert partial.passed, (plan.name, partial.flags)  # a test in progress is not "ended early"
        result = check_structure(plan.script, rows, finished=True)
        assert result.passed and result.flags == [], (plan.name, result.flags, result.mismatches[:3])
        assert result.frames_per_column == plan.script.frames_per_column
        assert result.extra_frames == 0 and not result.ended_early
        leaves = [leaf for key, node in result.tree.items() if key.startswith("col") for leaf in node.values()]
        assert leaves and all(leaf["passed"] for leaf in leaves)
        json.dumps(result.model_dump(mode="json"))  # serialisable tree


def test_wrong_register_value_is_flagged_on_that_frame():
    s = get_test("CHINJ01").script(None, CHAMBER, EQUIP)
    rows = rows_of(s)
    rows[7] = {**rows[7], "IG1_2_B": rows[7]["IG1_2_B"] + 0.25}
    rows[9] = {**rows[9], "IG1_1_T": rows[9]["IG1_1_T"] * 1.004}  # inside the 0.5 % tolerance
    result = check_structure(s, rows, finished=True)
    assert not result.passed
    assert result.flags == ["WRONG_ROE_CONF"]
    assert result.frame_flags[7] == ["WRONG_ROE_CONF"] and all(not f for i, f in enumerate(result.frame_flags) if i != 7)
    assert [(m.frame, m.column, m.key) for m in result.mismatches] == [(7, 7, "IG1_2_B")]
    leaf = result.tree["col008"]["IG1_2_B"]
    expected = s.columns[7].values["IG1_2_B"]
    assert not leaf["passed"] and leaf["value"] == pytest.approx(expected + 0.25)
    assert leaf["lo"] == pytest.approx(expected * 0.995) and leaf["hi"] == pytest.approx(expected * 1.005)
    assert result.tree["col010"]["IG1_1_T"]["passed"]
    assert Flag(result.flag_value) == Flag.WRONG_ROE_CONF


def test_strings_iphi_source_and_test_name_mismatches():
    s = get_test("FLAT01").script({"frames": [2, 2, 2]}, CHAMBER, EQUIP)
    rows = rows_of(s)
    rows[0] = {**rows[0], "rdmode": "rwd_bas_v"}
    rows[1] = {**rows[1], "IPHI": "I1I2"}
    rows[2] = {**rows[2], "exptime": rows[2]["exptime"] * 2}
    rows[3] = {**rows[3], "test": "FLAT02_730"}
    rows[4] = {**rows[4], "operator": "someone else"}
    result = check_structure(s, rows, finished=True)
    assert result.frame_flags[:6] == [["WRONG_ROE_CONF"], ["WRONG_ROE_CONF"], ["WRONGSOURCE"], ["WRONGTEST"],
                                      ["WRONG_ROE_CONF"], []]
    assert result.tree["col001"]["rdmode"] == {"passed": False, "value": "rwd_bas_v", "lo": "fwd_bas", "hi": "fwd_bas"}
    assert result.tree["col001"]["IPHI"]["value"] == "I1I2" and result.tree["col001"]["IPHI"]["lo"] == "I1I2I3"
    assert set(result.flags) == {"WRONG_ROE_CONF", "WRONGSOURCE", "WRONGTEST"}


def test_missing_value_fails_and_waived_keys_are_skipped():
    s = get_test("BIAS01").script({"N": 2}, CHAMBER, EQUIP)
    rows = rows_of(s)
    rows[0] = {**rows[0], "vend": ""}  # no value: NaN fails
    rows[1] = {**rows[1], "wave": 1, "mirr_pos": 12.0}  # waived for a closed-shutter bias
    result = check_structure(s, rows, finished=True)
    assert result.frame_flags == [["WRONG_ROE_CONF"], []]
    assert result.tree["col001"]["vend"]["passed"] is False
    assert "wave" not in result.tree["col001"] and "wave" in s.waived_keys
    ok = check_structure(s, rows, finished=True, waived=["vend"])
    assert ok.passed


def test_ended_early_and_extra_frames_are_missdata():
    s = get_test("PTC02_590").script(None, CHAMBER, EQUIP)
    rows = rows_of(s)
    early = check_structure(s, rows[:10], finished=True)
    assert early.ended_early and early.flags == ["MISSDATA"] and not early.passed
    assert early.tree["complete"] == {"passed": False, "value": 10, "lo": 24, "hi": 24}
    assert early.tree["col003"]["frames"] == {"passed": False, "value": 2, "lo": 4, "hi": 4}
    assert early.tree["col001"]["frames"]["passed"] and early.frames_per_column == [4, 4, 2, 0, 0, 0]
    ongoing = check_structure(s, rows[:10], finished=False)
    assert ongoing.passed and ongoing.tree["col003"]["frames"]["passed"]
    extra = check_structure(s, rows + rows[:2])
    assert extra.extra_frames == 2 and "MISSDATA" in extra.flags and not extra.passed
    assert extra.column_of_frame[-2:] == [None, None] and extra.frame_flags[-1] == ["MISSDATA"]
    assert extra.tree["extra_frames"] == {"passed": False, "value": 2, "lo": 0, "hi": 0}
    assert flag_names(extra.flag_value) == ["MISSDATA"]


def test_simulated_mini_campaign_through_the_exposure_log_passes(tmp_path):
    """Rows as the simulator writes them, through the 7.5.X exposure-log text and its parser."""
    from datetime import datetime, timedelta

    sim = pytest.importorskip("services.sim.frames")
    explog = pytest.importorskip("shared.explog")
    mini = CampaignConfig(block="BORN", chamber=CHAMBER, operator="jdoe", preset="mini",
                          equipment={"sn_roe": "FM04"}).define()
    t0, obsid = datetime(2024, 3, 1, 12), 100
    for plan in mini.tests:
        lines = [explog.explog_header()]
        for col in plan.script.columns:
            for _ in range(col.frames):
                row = sim.explog_values(col.values, obsid, 1, 1, t0 + timedelta(seconds=obsid), "f", {})
                lines.append(explog.format_explog_row(row))
                obsid += 1
        path = tmp_path / f"EXP_LOG_{plan.name}.txt"
        path.write_text("".join(lines))
        rows = [r.values for r in explog.read_explog(path).rows]
        assert len(rows) == plan.expected_frames
        result = check_structure(plan, rows, finished=True)
        assert result.passed, (plan.name, result.mismatches[:3])
        broken = [dict(r) for r in rows]
        broken[-1]["vend"] = 1000
        assert check_structure(plan, broken, finished=True).frame_flags[-1] == ["WRONG_ROE_CONF"]
