"""scriptgen: spreadsheets (layout, read back), checksums, inventory, scheduler, the command and
the request handler of the service mode."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from openpyxl import load_workbook

from services.cli import main as vison
from services.scriptgen.main import EXAMPLES, handle_request
from services.scriptgen.writer import (
    inventory_lines,
    read_script,
    script_filename,
    verify_checksums,
    write_campaign,
    write_script,
)
from shared.campaign import SCRIPT_KEYS, CampaignConfig, get_test, load_campaign_config

CHAMBER = "CHAMBER_B_BORN"
DATE = dt.date(2024, 3, 1)


def test_spreadsheet_layout_and_round_trip(tmp_path):
    s = get_test("FLAT01").script(None, CHAMBER, {"operator": "jdoe", "sn_ccd2": "C2"})
    path = write_script(s, tmp_path / "flat.xlsx", DATE)
    wb = load_workbook(path)
    assert len(wb.worksheets) == 1
    rows = list(wb.active.iter_rows(values_only=True))
    assert [r[0] for r in rows] == list(SCRIPT_KEYS)  # no header row, keys in column A
    assert rows[0][1:] == (80, 140, 170, "End")  # cumulative frames, then End
    assert rows[SCRIPT_KEYS.index("sn_ccd2")][1:4] == ("C2", "C2", "C2")
    back = read_script(path, waived_keys=s.waived_keys)
    assert back == s
    assert back.columns[1].frames == 60


@pytest.mark.parametrize("name", ["CHINJ01", "TP02", "NL02_15.5R", "PERSIST01", "MOT_WARM", "PTC02_150K"])
def test_read_back_same_columns(tmp_path, name):
    s = get_test(name).script(None, CHAMBER, {"operator": "jdoe"})
    back = read_script(write_script(s, tmp_path / f"{name}.xlsx"))
    assert back.test == s.test and back.columns == s.columns
    assert [type(v) for v in back.columns[0].values.values()] == [type(v) for v in s.columns[0].values.values()]


def test_campaign_files_checksums_and_inventory(tmp_path):
    cfg = load_campaign_config({"block": "BORN", "chamber": CHAMBER, "operator": "jdoe", "date": "2024-03-01",
                                "tests": ["BIAS01", "PTC01", "BF01", {"name": "FLAT02_730", "params": {"frames": [2, 3]}}]})
    d = cfg.define()
    written = write_campaign(d, tmp_path)
    assert set(written) == {"BIAS01", "PTC01", "FLAT02_730", "CHECK_SUMS", "TESTS_INVENTORY", "TESTS_SCHEDULER"}
    assert written["PTC01"].name == "vis_CalCamp_PTC01_010324_v7.5.X.xlsx" == script_filename("PTC01", DATE)
    sums = written["CHECK_SUMS"]
    assert sums.name == "CHECK_SUMS_010324.txt"
    assert re.fullmatch(r"([0-9a-f]{32}  vis_CalCamp_\S+\.xlsx\n){3}", sums.read_text())
    assert verify_checksums(sums) == {p.name: True for k, p in written.items() if k in ("BIAS01", "PTC01", "FLAT02_730")}
    # one changed byte breaks the checksum of that script only
    target = written["PTC01"]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    result = verify_checksums(sums)
    assert result[target.name] is False and result[written["BIAS01"].name] is True
    # inventory
    lines = written["TESTS_INVENTORY"].read_text().splitlines()
    assert lines[0] == "BIAS01: 1 cols, 10 frames, 15.6 min"
    assert lines[1].startswith("PTC01: 11 cols, 92 frames, ")
    assert lines[2] == "BF01: 0 cols, 0 frames, 0.0 min (re-uses PTC01)"
    assert re.fullmatch(r"FLAT02_730: 2 cols, 5 frames, \d+\.\d min", lines[3])
    assert re.fullmatch(r"Total: 14 cols, 107 frames, \d+\.\d min \(\d+\.\d\d h\)", lines[4])
    assert lines == inventory_lines(d)
    # scheduler: tests in order with start offsets
    rows = list(load_workbook(written["TESTS_SCHEDULER"]).active.iter_rows(values_only=True))
    assert rows[0][:4] == ("order", "test", "start (min)", "duration (min)")
    assert [r[1] for r in rows[1:5]] == ["BIAS01", "PTC01", "BF01", "FLAT02_730"]
    assert rows[2][2] == pytest.approx(rows[1][3], abs=0.01) and rows[1][2] == 0


def test_same_campaign_same_bytes(tmp_path):
    cfg = CampaignConfig(block="BORN", chamber=CHAMBER, operator="jdoe", preset="warm", date=DATE)
    a = write_campaign(cfg.define(), tmp_path / "a")
    b = write_campaign(cfg.define(), tmp_path / "b")
    assert a["CHECK_SUMS"].read_text() == b["CHECK_SUMS"].read_text()


def test_example_configurations():
    full = load_campaign_config(EXAMPLES / "campaign.yaml").define()
    preset = CampaignConfig(block="BORN", chamber=CHAMBER, operator="jdoe", preset="full").define()
    assert [t.name for t in full.tests] == [t.name for t in preset.tests]
    assert full.expected_frames() == preset.expected_frames()
    assert full.equipment.sn_roe and full.campaign == "full"
    mini = load_campaign_config(EXAMPLES / "campaign_mini.yaml").define()
    assert mini.campaign == "mini" and mini.test("BIAS01").expected_frames == 3


def test_command_writes_scripts(tmp_path, capsys):
    out = tmp_path / "scripts"
    rc = vison(["scriptgen", "--config", str(EXAMPLES / "campaign_mini.yaml"), "--out", str(out), "--date", "2024-03-01"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "BIAS01: 1 cols, 3 frames, 4.7 min" in text
    assert (out / "CHECK_SUMS_010324.txt").is_file() and (out / "TESTS_SCHEDULER_010324.xlsx").is_file()
    assert vison(["scriptgen", "--verify", str(out / "CHECK_SUMS_010324.txt")]) == 0
    assert read_script(out / "vis_CalCamp_TP01_010324_v7.5.X.xlsx").total_frames == 26


def test_command_refuses_bad_configuration_naming_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("block: BORN\nchamber: CHAMBER_B_BORN\noperator: jdoe\ntests:\n"
                   "  - name: PTC01\n    params: {fluences: [5, 250]}\n")
    assert vison(["scriptgen", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "tests.0" in err and "params.fluences.1" in err and "200" in err
    assert not (tmp_path / "o").exists()
    bad.write_text("block: BORN\noperator: jdoe\ntests: [BIAS01]\n")
    assert vison(["scriptgen", "--config", str(bad)]) == 2
    assert "chamber: Field required" in capsys.readouterr().err


def test_handle_request(tmp_path):
    config = {"chamber": CHAMBER, "operator": "jdoe", "tests": ["BIAS01", "DARK01"], "date": "2024-03-01"}
    d = handle_request({"block": "CURIE", "config": config, "out_dir": "scripts/CURIE"}, out_root=tmp_path)
    assert d.block == "CURIE" and d.expected_frames() == {"BIAS01": 10, "DARK01": 4}
    assert verify_checksums(tmp_path / "scripts/CURIE/CHECK_SUMS_010324.txt") == {
        "vis_CalCamp_BIAS01_010324_v7.5.X.xlsx": True, "vis_CalCamp_DARK01_010324_v7.5.X.xlsx": True}
    bare = handle_request({"block": "BORN", "chamber": CHAMBER, "operator": "x", "preset": "warm"})
    assert bare.tests[0].name == "MOT_WARM"
    with pytest.raises(ValueError, match="chamber"):
        handle_request({"block": "BORN", "config": {"operator": "x", "tests": ["BIAS01"]}})
