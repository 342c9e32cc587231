"""``vison inspect``: kind, version, rows, ObsIDs, columns and HK out-of-limit keys, for the real
fixture files and synthesised 7.5.X files; clear non-zero exit for files it cannot read."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest

from services.cli import main
from shared.explog import explog_header, format_explog_row
from shared.hk import format_hk_row, hk_header, hk_layouts
from shared.refdata import elvis_formats

T0 = datetime(2025, 8, 5, 10, 0, 0)
COMMANDED = {"OD_1_T": 25.0, "OD_2_T": 25.0, "OD_3_T": 25.0, "OD_1_B": 25.0, "OD_2_B": 25.0, "OD_3_B": 25.0,
             "RD_T": 16.0, "RD_B": 16.0, "IG2_T": 6.0, "IG2_B": 6.0, "IDH": 13.0, "IDL": 11.0,
             **{f"IG1_{c}_{s}": 3.5 for c in (1, 2, 3) for s in "TB"}}


def nominal_hk() -> dict[str, float]:
    """7.5.X values inside every P and S limit (R keys at the COMMANDED values)."""
    formats = elvis_formats()
    limits, to_explog = formats["hk_limits_7.5.X"]["P"], formats["hk_to_explog_7.5.X"]
    out = {}
    for key in hk_layouts()["7.5.X"][1:]:
        lim = limits.get(key, ["I", 0])
        out[key] = {"I": lambda: lim[1], "A": lambda: (lim[1] + lim[2]) / 2,
                    "R": lambda: COMMANDED[to_explog[key]]}[lim[0]]()
    return out


def inspect_json(capsys, *argv) -> tuple[int, dict]:
    rc = main(["inspect", *map(str, argv), "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out) if rc == 0 else {}


def test_fixture_explog(capsys, elvis_fixtures):
    rc, rep = inspect_json(capsys, elvis_fixtures / "EXP_LOG_050800.txt")
    assert rc == 0
    assert (rep["kind"], rep["version"], rep["rows"], rep["obsids"]) == ("explog", "5.7.09", 6, [191, 192])
    assert rep["match"]["exact"] is False and rep["match"]["score"] == pytest.approx(0.8718, abs=1e-4)
    assert rep["ccds"] == [1, 2, 3] and rep["tests"] == ["Test"]
    assert len(rep["columns"]) == 69 and rep["errors"] == []


def test_fixture_hk_with_and_without_explog(capsys, elvis_fixtures):
    hk = elvis_fixtures / "HK_191_050800D000000T_ROE1.txt"
    rc, rep = inspect_json(capsys, hk)
    assert rc == 0
    assert (rep["kind"], rep["version"], rep["rows"], rep["obsid"], rep["roe"]) == ("hk_exposure", "5.7.09", 3, 191, 1)
    assert rep["first_timestamp"] == "15:06:14" and len(rep["columns"]) == 55
    assert set(rep["no_reading"]) == {"HK_temp_bottom_CCD1", "HK_temp_top_CCD3", "Video_TOP", "Video_BOT"}
    ool = {(v["key"], v["kind"]) for v in rep["out_of_limits"]}
    assert ("CCD1_TEMP_T", "P") in ool and ("CCD2_TEMP_T", "S") in ool
    unchecked = {v["key"]: v["reason"] for v in rep["not_checked"] if v["type"] == "R"}
    assert "commanded value unknown" in unchecked["CCD1_OD_T"]
    rc, rep = inspect_json(capsys, hk, "--explog", elvis_fixtures / "EXP_LOG_050800.txt")
    assert rc == 0 and rep["commanded_from"].startswith("ObsID 191 of ")
    od = [v for v in rep["out_of_limits"] if v["key"] == "CCD1_OD_T"][0]
    assert (od["commanded"], od["value_lo"]) == (26.0, 0.0)
    assert not [v for v in rep["not_checked"] if v["type"] == "R"]


def test_synthesised_daily_hk_one_key_out(tmp_path, capsys):
    log = tmp_path / "EXP_LOG_050825.txt"
    log.write_text(explog_header() + format_explog_row({"ObsID": 7, "CCD": 1, "ROE": 1, "date": T0, "test": "BIAS01", **COMMANDED}))
    samples = [nominal_hk() for _ in range(4)]
    samples[2]["CCD2_TEMP_B"] = -118.5
    hk = tmp_path / "HK_05-08-25_ROE1.txt"
    hk.write_text(hk_header() + "".join(format_hk_row(T0 + timedelta(seconds=i), s) for i, s in enumerate(samples)))
    rc, rep = inspect_json(capsys, hk, "--explog", log)
    assert rc == 0
    assert (rep["kind"], rep["version"], rep["rows"], rep["roe"]) == ("hk_daily", "7.5.X", 4, 1)
    assert rep["commanded_from"].startswith("last row (ObsID 7)")
    assert [(v["key"], v["kind"], v["value_hi"]) for v in rep["out_of_limits"]] == [("CCD2_TEMP_B", "P", -118.5)]
    assert rep["not_checked"] == []
    # text form
    assert main(["inspect", str(hk), "--explog", str(log)]) == 0
    out = capsys.readouterr().out
    assert "daily HK (ROE1)" in out and "OOL P A CCD2_TEMP_B: max -118.5 >= hi -119" in out
    assert main(["inspect", str(log)]) == 0
    out = capsys.readouterr().out
    assert "version   7.5.X (exact; same layout: 6.5.X, 7.2.X, 7.5.X)" in out and "1 ObsIDs: 7" in out


def test_sniffs_unconventional_names(tmp_path, capsys):
    path = tmp_path / "copy_of_log.tsv"
    path.write_text(explog_header() + format_explog_row({"ObsID": 3, "CCD": 2, "ROE": 1, "date": T0}))
    rc, rep = inspect_json(capsys, path)
    assert rc == 0 and rep["kind"] == "explog" and rep["obsids"] == [3]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("notes.txt", "hello\n", "not a recognised exposure log or HK file"),
        ("EXP_LOG_050825.txt", "a\tb\tc\n", "no ObsID column"),
        ("HK_05-08-25_ROE1.txt", "TimeStamp\tfoo\n", "matches no known HK layout"),
        ("EUC_1_050825D100000T_ROE1_CCD1.fits", "", "vison qla"),
    ],
)
def test_unrecognised_files_exit_2(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and name in err


def test_missing_file_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
