"""HK files: the real legacy 5.7 fixture (padded names, '#' block), every layout synthesised,
sentinels -> missing, statistics, P/S limit verdicts at and just beyond the edges (A, R, I),
the 7.5.X writer round trip, partial / garbage lines and the tail reader."""

from __future__ import annotations

import math
import os
from datetime import datetime, time, timedelta

import numpy as np
import pytest

from shared.explog import ExpLogRow, explog_header, format_explog_row, parse_explog_text
from shared.hk import (
    HKFormatError,
    HKTail,
    check_hk_limits,
    format_hk_row,
    hk_header,
    hk_layouts,
    hk_stats,
    parse_hk_text,
    read_hk,
)
from shared.refdata import elvis_formats

FORMATS = elvis_formats()
LIMITS_P = FORMATS["hk_limits_7.5.X"]["P"]
T0 = datetime(2025, 8, 5, 10, 0, 0)
COMMANDED = {"OD_1_T": 25.0, "OD_2_T": 25.0, "OD_3_T": 25.0, "OD_1_B": 25.0, "OD_2_B": 25.0, "OD_3_B": 25.0,
             "RD_T": 16.0, "RD_B": 16.0, "IG2_T": 6.0, "IG2_B": 6.0, "IDH": 13.0, "IDL": 11.0,
             **{f"IG1_{c}_{s}": 3.5 for c in (1, 2, 3) for s in "TB"}}


def nominal_hk() -> dict[str, float]:
    """7.5.X values inside every P limit (R keys at the COMMANDED values)."""
    to_explog = FORMATS["hk_to_explog_7.5.X"]
    out = {}
    for key in hk_layouts()["7.5.X"][1:]:
        lim = LIMITS_P.get(key)
        if lim is None:
            out[key] = 0.0
        elif lim[0] == "I":
            out[key] = lim[1]
        elif lim[0] == "A":
            out[key] = (lim[1] + lim[2]) / 2
        else:
            out[key] = COMMANDED[to_explog[key]]
    return out


def hk_text(samples: list[dict], version: str = "7.5.X", t0: datetime = T0) -> str:
    return hk_header(version) + "".join(format_hk_row(t0 + timedelta(seconds=i), s, version) for i, s in enumerate(samples))


def verdict(verdicts, key, kind="P"):
    [v] = [v for v in verdicts if v.key == key and v.kind == kind]
    return v


# --------------------------------------------------------------------------------------------
# the real legacy file


def test_fixture_legacy_hk(elvis_fixtures):
    table = read_hk(elvis_fixtures / "HK_191_050800D000000T_ROE1.txt")
    assert table.version == "5.7.09" and table.match.exact
    assert table.match.equivalent == ["5.7.07", "5.7.08", "5.7.09"]
    assert table.kind == "exposure" and table.timestamp_column == "HK_timestamp"
    assert table.timestamps == [time(15, 6, 14), time(15, 6, 15), time(15, 6, 16)]
    assert len(table.columns) == 55 and table.columns[0] == "HK_OD_Top_CCD1" and table.columns[-1] == "Video_BOT"
    assert table.errors == [] and not table.partial_tail
    # the '#' block is metadata, not samples
    assert len(table.metadata) == 56
    assert table.metadata["HK_timestamp"] == "15:06:14"
    assert table.metadata["HK_IDL"] == 1.67
    assert table.metadata["HK_temp_VB_BOT"] == -273.15  # the line without a tab
    # sentinels -> NaN
    assert np.isnan(table.values["HK_temp_bottom_CCD1"]).all()  # -246.86
    assert np.isnan(table.values["HK_temp_top_CCD3"]).all()
    assert np.isnan(table.values["Video_TOP"]).all()  # -273.15
    np.testing.assert_array_equal(table.values["HK_temp_top_CCD1"], [-246.08] * 3)
    assert table.get("CCD2_TEMP_T") is table.values["HK_temp_top_CCD2"]
    stats = hk_stats(table)
    assert stats["HK_IDL"] == {"mean": pytest.approx(1.67), "std": 0.0, "min": 1.67, "max": 1.67, "n": 3}
    assert stats["HK_temp_bottom_CCD1"]["n"] == 0 and math.isnan(stats["HK_temp_bottom_CCD1"]["mean"])
    # CCD temperature P limits are checked (under the 7.5.X names)
    verdicts = check_hk_limits(table)
    v = verdict(verdicts, "CCD1_TEMP_T")
    assert (v.column, v.type, v.lo, v.hi, v.value_lo, v.passed) == ("HK_temp_top_CCD1", "A", -121.0, -119.0, -246.08, False)
    assert verdict(verdicts, "CCD1_TEMP_B").passed is None  # no reading
    assert "no reading" in verdict(verdicts, "CCD1_TEMP_B").reason
    assert verdict(verdicts, "CCD1_OD_T").passed is None  # R without commanded values


def test_fixture_hk_with_fixture_explog(elvis_fixtures):
    table = read_hk(elvis_fixtures / "HK_191_050800D000000T_ROE1.txt")
    row = parse_explog_text((elvis_fixtures / "EXP_LOG_050800.txt").read_text()).rows_of(191)[0]
    assert isinstance(row, ExpLogRow) and row.values["OD_1_T"] == 26.0
    v = verdict(check_hk_limits(table, row), "CCD1_OD_T")  # HK 0.00 V, commanded ODCCD1_V 26 V
    assert (v.commanded, v.lo, v.hi, v.passed) == (26.0, pytest.approx(25.8), pytest.approx(26.2), False)
    assert verdict(check_hk_limits(table, row), "COMM_IG2_T").passed is True  # 0.00 vs IG2_V 0.000


# --------------------------------------------------------------------------------------------
# every layout


@pytest.mark.parametrize("version", list(FORMATS["hk_columns"]))
def test_every_layout_synthesised(version):
    cols = hk_layouts()[version]
    samples = [{c: 0.5 * i + j for j, c in enumerate(cols[1:])} for i in range(3)]
    text = hk_text(samples, version)
    lines = text.split("\n")[:-1]
    padded = "\t".join(f"{n:<32}" for n in lines[0].split("\t"))  # padded names, as 5.7 writes
    text = "".join(line + "\t\r\n" for line in [padded, *lines[1:]])  # trailing tabs, CRLF
    table = parse_hk_text(text, source="HK_05-08-25_ROE1.txt")
    assert table.match.exact and version in table.match.equivalent
    assert table.kind == "daily"
    assert table.columns == cols[1:]
    assert table.n_rows == 3 and table.errors == []
    if cols[0] == "TimeStamp":
        assert table.timestamps[2] == T0 + timedelta(seconds=2)
    else:
        assert table.timestamps[2] == time(10, 0, 2)
    last = cols[-1]
    np.testing.assert_array_equal(table.values[last], [len(cols) - 2 + 0.5 * i for i in range(3)])


def test_legacy_with_comment_block_and_blank_lines():
    cols = hk_layouts()["5.7.02"]
    header = "\t".join(f"{c:<32}" for c in cols) + "\r\n"
    rows = "".join("\t".join([f"12:00:0{i}"] + [f"{1.0 + i:.2f}"] * (len(cols) - 1)) + "\r\n" for i in range(2))
    block = "\r\n\r\n# HK_timestamp\t\t\t\t12:00:00\r\n# HK_IDL                         \t1.00\t\r\n# Note free text\r\n\r\n"
    table = parse_hk_text(header + rows + block, source="HK_1_050825D120000T_ROE1.txt")
    assert table.version == "5.7.06" and table.kind == "exposure"
    assert table.n_rows == 2 and table.errors == []
    assert table.metadata == {"HK_timestamp": "12:00:00", "HK_IDL": 1.0, "Note": "text"}
    np.testing.assert_array_equal(table.values["HK_IDL"], [1.0, 2.0])


def test_closest_hk_layout_and_unrecognisable():
    cols = hk_layouts()["7.5.X"][:-3]  # three columns short
    table = parse_hk_text("\t".join(cols) + "\n" + "\t".join(["05-08-25_10:00:00"] + ["1"] * (len(cols) - 1)) + "\n")
    assert not table.match.exact and table.version == "7.5.X"
    assert table.match.score == pytest.approx(80 / 83, abs=1e-4)
    assert table.match.missing == ["TwoCmdsErr", "SPW_STATUS_REG", "Out_of_range"]
    for bad in ("ObsID\tFile_name\n", "TimeStamp\tfoo\tbar\n", "nothing here\n", ""):
        with pytest.raises(HKFormatError, match="HK_9_050825D120000T_ROE1.txt"):
            parse_hk_text(bad, source="HK_9_050825D120000T_ROE1.txt")


# --------------------------------------------------------------------------------------------
# sentinels and statistics


def test_sentinels_are_missing():
    values = nominal_hk()
    samples = []
    for i in range(4):
        s = dict(values)
        s["CCD1_TEMP_T"] = [-246.86, -120.0, -246.861, -120.5][i]  # sentinel within tolerance
        s["RPSU_TEMP1"] = [-273.27, 20.0, 21.0, 22.0][i]
        s["VID_PCB_TEMP_T"] = [-273.15, -273.15, -273.15, -273.15][i]
        s["CCD2_TEMP_T"] = -246.80  # near, but a value
        samples.append(s)
    table = parse_hk_text(hk_text(samples))
    np.testing.assert_array_equal(np.isnan(table.values["CCD1_TEMP_T"]), [True, False, True, False])
    assert np.isnan(table.values["RPSU_TEMP1"][0]) and not np.isnan(table.values["RPSU_TEMP1"][1:]).any()
    assert not np.isnan(table.values["CCD2_TEMP_T"]).any()
    stats = hk_stats(table)
    assert stats["CCD1_TEMP_T"] == {"mean": -120.25, "std": 0.25, "min": -120.5, "max": -120.0, "n": 2}
    assert stats["RPSU_TEMP1"]["mean"] == pytest.approx(21.0) and stats["RPSU_TEMP1"]["n"] == 3
    assert stats["VID_PCB_TEMP_T"]["n"] == 0
    v = verdict(check_hk_limits(table, COMMANDED), "VID_PCB_TEMP_T")
    assert v.passed is None and v.status == "unchecked"
    assert verdict(check_hk_limits(table, COMMANDED), "CCD1_TEMP_T").passed is True


# --------------------------------------------------------------------------------------------
# limits at the edges


def _stats(**minmax) -> dict:
    return {k: {"mean": (lo + hi) / 2, "std": 0.0, "min": lo, "max": hi, "n": 2} for k, (lo, hi) in minmax.items()}


@pytest.mark.parametrize(
    "lo, hi, passed",
    [
        (-121.0, -120.0, False),  # exactly at lo: fails (elvis-formats.json: <= lo fails)
        (-120.0, -119.0, False),  # exactly at hi: fails
        (-120.99, -119.01, True),  # just inside both edges
        (-121.01, -120.0, False),  # just below
        (-120.0, -118.99, False),  # just above
    ],
)
def test_type_a_ccd_temperature_edges(lo, hi, passed):
    v = verdict(check_hk_limits(_stats(CCD1_TEMP_T=(lo, hi)), kinds=("P",)), "CCD1_TEMP_T")
    assert (v.type, v.lo, v.hi, v.value_lo, v.value_hi) == ("A", -121.0, -119.0, lo, hi)
    assert v.passed is passed


@pytest.mark.parametrize(
    "value, passed",
    [(25.19, True), (24.81, True), (25.0, True), (25.2, False), (24.8, False), (25.21, False), (24.79, False)],
)
def test_type_r_edges_relative_to_commanded(value, passed):
    v = verdict(check_hk_limits(_stats(CCD1_OD_T=(value, value)), {"OD_1_T": 25.0}), "CCD1_OD_T")
    assert (v.type, v.commanded, v.lo, v.hi) == ("R", 25.0, pytest.approx(24.8), pytest.approx(25.2))
    assert v.passed is passed
    assert verdict(check_hk_limits(_stats(CCD1_OD_T=(value, value)), {"OD_1_T": 25.0}), "CCD1_OD_T", "S").type == "A"


def test_type_r_unknown_commanded_value():
    stats = _stats(CCD1_OD_T=(25.0, 25.0), FPGA_BIAS_ID2=(11.0, 11.0))
    for given in (None, {}, {"OD_1_T": ""}, {"OD_1_T": float("nan")}):
        v = verdict(check_hk_limits(stats, given), "CCD1_OD_T")
        assert v.passed is None and "OD_1_T" in v.reason and "unknown" in v.reason
    # from an exposure-log row: FPGA_BIAS_ID2 <-> IDL
    row = parse_explog_text(explog_header() + format_explog_row({"ObsID": 1, "CCD": 1, "ROE": 1, "date": T0, "IDL": 11.1})).rows[0]
    v = verdict(check_hk_limits(stats, row), "FPGA_BIAS_ID2")
    assert (v.commanded, v.passed) == (11.1, True)
    assert verdict(check_hk_limits(stats, row), "CCD1_OD_T").passed is None  # OD_1_T empty in the row


@pytest.mark.parametrize(
    "key, lo, hi, passed",
    [
        ("SPW_STATUS_REG", 12192, 12192, True),
        ("SPW_STATUS_REG", 12192, 12193, False),
        ("SPW_STATUS_REG", 0, 0, False),
        ("hkInvalidFlg", 0, 0, True),
        ("hkInvalidFlg", 0, 1, False),
    ],
)
def test_type_i_identity(key, lo, hi, passed):
    v = verdict(check_hk_limits(_stats(**{key: (lo, hi)}), kinds=("P",)), key)
    assert v.type == "I" and v.lo == v.hi == FORMATS["hk_limits_7.5.X"]["P"][key][1]
    assert v.passed is passed


def test_kinds_keys_and_absent_keys():
    stats = _stats(CCD1_TEMP_T=(-125.0, -125.0))
    verdicts = check_hk_limits(stats)
    assert [(v.key, v.kind, v.passed) for v in verdicts] == [("CCD1_TEMP_T", "P", False), ("CCD1_TEMP_T", "S", True)]
    assert verdicts[0].reason == "min -125 <= lo -121"
    assert check_hk_limits(stats, kinds=("S",))[0].lo == -133.0
    assert check_hk_limits(stats, keys=["CCD2_TEMP_T"]) == []


def test_nominal_file_passes_everything_and_one_key_pushed_out():
    samples = [nominal_hk() for _ in range(3)]
    samples[1]["FPGA_PCB_TEMP_B"] = 45.0
    table = parse_hk_text(hk_text(samples))
    verdicts = check_hk_limits(table, COMMANDED)
    failed = [(v.key, v.kind) for v in verdicts if v.passed is False]
    assert failed == [("FPGA_PCB_TEMP_B", "P"), ("FPGA_PCB_TEMP_B", "S")]
    assert all(v.passed is True for v in verdicts if v.key != "FPGA_PCB_TEMP_B")
    assert len(verdicts) == len(LIMITS_P) + len(FORMATS["hk_limits_7.5.X"]["S"])


# --------------------------------------------------------------------------------------------
# writer round trip, bad lines, tail


def test_writer_round_trip_7_5():
    rng = np.random.default_rng(3)
    samples = [{k: float(np.round(v + rng.normal(0, 0.01), 4)) for k, v in nominal_hk().items()} for _ in range(5)]
    header = hk_header()
    assert header.rstrip("\n").split("\t") == FORMATS["hk_columns"]["7.5.X"]
    row = format_hk_row(T0, samples[0])
    assert row.startswith("05-08-25_10:00:00\t") and row.endswith("\n") and row.count("\t") == 82
    table = parse_hk_text(hk_text(samples), source="/x/HK_05-08-25_ROE1.txt")
    assert table.version == "7.5.X" and table.match.exact and table.kind == "daily"
    assert table.timestamps == [T0 + timedelta(seconds=i) for i in range(5)]
    for key in table.columns:
        np.testing.assert_array_equal(table.values[key], [s[key] for s in samples])
    stats = hk_stats(table)
    col = [s["CCD1_TEMP_T"] for s in samples]
    assert stats["CCD1_TEMP_T"]["mean"] == pytest.approx(np.mean(col))
    assert stats["CCD1_TEMP_T"]["std"] == pytest.approx(np.std(col))
    # numpy scalars are written as plain numbers
    numpy_row = format_hk_row(T0, {"CCD1_TEMP_T": np.float64(-120.5), "SPW_STATUS_REG": np.int64(12192), "hkInvalidFlg": np.bool_(False)})
    back = parse_hk_text(hk_header() + numpy_row)
    assert (back.values["CCD1_TEMP_T"][0], back.values["SPW_STATUS_REG"][0], back.values["hkInvalidFlg"][0]) == (-120.5, 12192, 0)
    # a missing key is written empty and read back as missing
    partial = format_hk_row(T0, {"CCD1_TEMP_T": -120.0})
    back = parse_hk_text(hk_header() + partial)
    assert back.values["CCD1_TEMP_T"][0] == -120.0 and np.isnan(back.values["CCD2_TEMP_T"][0])


def test_partial_and_garbage_lines():
    good = [format_hk_row(T0 + timedelta(seconds=i), nominal_hk()) for i in range(3)]
    text = hk_header() + good[0] + "junk\n" + good[1].replace("05-08-25_10:00:01", "yesterday") + good[2][:-1]
    table = parse_hk_text(text)
    assert table.n_rows == 1 and table.partial_tail
    assert table.errors == [(3, "1 fields, the header has 83"), (4, "unparsable timestamp 'yesterday'")]
    assert parse_hk_text(text, complete=True).n_rows == 2


def test_hk_tail_on_growing_file(tmp_path):
    path = tmp_path / "HK_05-08-25_ROE1.txt"
    tail = HKTail(path)
    assert tail.poll() == []
    rows = []
    for i in range(4):
        s = nominal_hk()
        s["CCD3_TEMP_B"] = -246.86 if i == 1 else -120.0 + i / 10
        rows.append(format_hk_row(T0 + timedelta(seconds=i), s))
    header = hk_header()
    with open(path, "w") as f:
        f.write(header[:100])
        f.flush()
        assert tail.poll() == []
        f.write(header[100:] + rows[0] + rows[1][:40])
        f.flush()
        got = tail.poll()
        assert [r.timestamp for r in got] == [T0] and tail.version == "7.5.X" and tail.partial_tail
        assert got[0].values["CCD3_TEMP_B"] == -120.0 and len(got[0].values) == 82
        f.write(rows[1][40:] + rows[2])
        f.flush()
        got = tail.poll()
        assert [r.timestamp.second for r in got] == [1, 2]
        assert math.isnan(got[0].values["CCD3_TEMP_B"]) and got[1].values["CCD3_TEMP_B"] == pytest.approx(-119.8)
        assert tail.poll() == []
        f.write(rows[3])
    assert [r.timestamp.second for r in tail.poll()] == [3]
    # replaced by a new file (e.g. the next day's rotation written to the same name)
    new = tmp_path / "tmp.txt"
    new.write_text(header + rows[0])
    os.replace(new, path)
    assert [r.timestamp.second for r in tail.poll()] == [0]


def test_hk_tail_legacy_and_bad_header(tmp_path):
    path = tmp_path / "HK_1_050825D120000T_ROE1.txt"
    cols = hk_layouts()["5.7.09"]
    path.write_text("\t".join(f"{c:<32}" for c in cols) + "\r\n"
                    + "\t".join(["12:00:00"] + ["-273.15"] * (len(cols) - 1)) + "\r\n\r\n# HK_IDL\t1.5\r\n")
    tail = HKTail(path)
    [row] = tail.poll()
    assert row.timestamp == time(12) and math.isnan(row.values["Video_TOP"]) and tail.metadata == {"HK_IDL": 1.5}
    bad = tmp_path / "HK_2_050825D120000T_ROE1.txt"
    bad.write_text("a\tb\n")
    with pytest.raises(HKFormatError, match="HK_2_050825D120000T_ROE1.txt"):
        HKTail(bad).poll()
