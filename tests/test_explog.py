"""Exposure logs: the real 5.7 fixture, every layout of elvis-formats.json synthesised (padded
names, trailing tabs, CRLF), closest-layout detection, partial last line, garbage lines, merge,
the 7.5.X writer, and the tail reader on a file grown in steps."""

from __future__ import annotations

import os
from datetime import datetime

import pytest

from shared.explog import (
    EXPLOG_LATEST,
    ExpLog,
    ExpLogFormatError,
    ExpLogTail,
    explog_header,
    format_explog_row,
    merge_explogs,
    parse_explog_text,
    read_explog,
)
from shared.refdata import elvis_formats

LAYOUTS = elvis_formats()["explog_columns"]
T0 = datetime(2025, 8, 5, 10, 0, 0)


def _values(obsid: int, ccd: int, **extra) -> dict:
    """Row values under 7.5.X names (the writer maps them to older layouts)."""
    v = {
        "ObsID": obsid, "CCD": ccd, "ROE": 1, "date": T0.replace(second=obsid % 60), "program": "VIS",
        "test": "FLAT01", "exptime": 2.5, "vstart": 0, "vend": 2086, "wave": 4, "OD_1_T": 25.5,
        "IG1_2_B": 3.25, "R1C1_TT": -120.05, "operator": "jdoe",
    }
    v.update(extra)
    return v


def _log_text(rows: list[dict], version: str = EXPLOG_LATEST) -> str:
    return explog_header(version) + "".join(format_explog_row(r, version) for r in rows)


def _elvis_style(text: str) -> str:
    """Pad header names, add trailing tabs and CRLF, as ELVIS writes."""
    lines = text.split("\n")[:-1]
    header = "\t".join(f"{name}   " for name in lines[0].split("\t"))
    return "".join(line + "\t\r\n" for line in [header, *lines[1:]])


# --------------------------------------------------------------------------------------------
# the real file


def test_fixture_5_7_log(elvis_fixtures):
    log = read_explog(elvis_fixtures / "EXP_LOG_050800.txt")
    assert log.version == "5.7.09"
    assert not log.match.exact
    assert log.match.score == pytest.approx(68 / 78, abs=1e-4)
    assert set(log.match.equivalent) == {"5.7.04", "5.7.09"}
    assert log.match.extra == ["Mirr_pos"]
    assert "Lght_int" in log.match.missing
    assert "TOI _pump" in log.columns and "Vstart" in log.columns  # names stripped, inner space kept
    assert len(log.columns) == 69
    assert log.errors == [] and log.partial_tail is False
    assert log.obsids == [191, 192]
    assert [(r.obsid, r.ccd, r.roe) for r in log.rows] == [(191, 1, 1), (191, 2, 1), (191, 3, 1), (192, 1, 1), (192, 2, 1), (192, 3, 1)]
    r = log.rows[3]
    assert r.date == datetime(2016, 11, 25, 15, 6, 43)
    assert (r.test, r.program, r.file_name) == ("Test", "Lab", "EUC_192_251116D150643T_ROE1_CCD1")
    # original names kept, 7.5.X names added
    assert r.values["Vstart"] == 1 and r.values["vstart"] == 1
    assert r.values["Vend"] == 100 and r.values["vend"] == 100
    assert r.values["Exptime"] == 0 and r.values["exptime"] == 0
    assert r.values["wave"] == 0 and r.values["test"] == "Test"
    assert r.values["Flsh-Rdout_e_time"] == 512 and r.values["fl_rdout"] == 512
    assert r.values["toi_tp"] == 1000  # from 'TOI _pump'
    assert r.values["OD_2_T"] == 26.0 and r.values["OD_2_B"] == 26.0  # from ODCCD2_V
    assert r.values["IG1_3_B"] == 3.0 and r.values["IDH"] == 13.0
    assert r.values["R1C2_TT"] == -180.17
    assert r.values["FPGA_ver"] == 2.75 and r.values["fpga_ver"] == 2.75
    assert r.values["EGSE_ver"] == "5.7.05"


# --------------------------------------------------------------------------------------------
# every layout


@pytest.mark.parametrize("version", list(LAYOUTS))
def test_every_layout_synthesised(version):
    rows = [_values(10 + i // 3, 1 + i % 3, exptime=float(i)) for i in range(6)]
    text = _elvis_style(_log_text(rows, version))
    log = parse_explog_text(text, source=f"EXP_LOG_{version}.txt")
    assert log.match.exact and log.match.score == 1.0
    assert version in log.match.equivalent and log.version in log.match.equivalent
    assert log.columns == LAYOUTS[version]
    assert log.errors == [] and not log.partial_tail
    assert [r.obsid for r in log.rows] == [10, 10, 10, 11, 11, 11]
    assert [r.ccd for r in log.rows] == [1, 2, 3, 1, 2, 3]  # FPA: from File_name
    assert all(r.test == "FLAT01" and r.program == "VIS" for r in log.rows)
    assert log.rows[4].date == datetime(2025, 8, 5, 10, 0, 11)
    assert log.rows[4].file_name == "EUC_11_050825D100011T_ROE1_CCD2"
    if version != "FPA":
        assert [r.values["exptime"] for r in log.rows] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
        assert all(r.values["vstart"] == 0 and r.values["vend"] == 2086 and r.values["wave"] == 4 for r in log.rows)
        assert log.rows[0].values["R1C1_TT"] == -120.05
        assert log.rows[0].roe == 1
    if version not in ("5.7.02", "FPA"):
        assert log.rows[0].values["OD_1_T"] == 25.5
    if version.startswith(("6.", "7.")):
        assert log.rows[0].values["IG1_2_B"] == 3.25


def test_identical_layouts_report_the_latest():
    log = parse_explog_text(_log_text([_values(1, 1)], "6.5.X"))
    assert log.version == "7.5.X" and log.match.equivalent == ["6.5.X", "7.2.X", "7.5.X"]
    log = parse_explog_text(_log_text([_values(1, 1)], "6.0.0"))
    assert log.version == "6.1.0" and log.match.equivalent == ["6.0.0", "6.1.0"]
    assert parse_explog_text(_log_text([_values(1, 1)], "6.3.0")).version == "6.3.0"


def test_closest_layout_reported_with_score():
    cols = list(LAYOUTS["7.5.X"])
    cols[cols.index("mirr_pos")] = "Mirr_pos"  # case differs: same name for the overlap
    cols[cols.index("source")] = "lamp"  # renamed
    cols.remove("IPHI")  # dropped
    text = "\t".join(cols) + "\n" + "\t".join(
        {"ObsID": "5", "File_name": "f", "CCD": "CCD2", "ROE": "ROE1", "date": "050825D100000T", "test": "X",
         "exptime": "1.5"}.get(c, "0") for c in cols) + "\n"
    log = parse_explog_text(text)
    assert not log.match.exact
    assert log.version == "7.5.X" and log.match.equivalent == ["6.5.X", "7.2.X", "7.5.X"]
    assert log.match.score == pytest.approx(79 / 82, abs=1e-4)
    assert log.match.missing == ["IPHI", "source"] and log.match.extra == ["lamp"]
    assert log.rows[0].values["exptime"] == 1.5 and log.rows[0].ccd == 2


@pytest.mark.parametrize(
    "header",
    [
        "foo\tbar\tbaz\n",
        "TimeStamp\tCCD1_OD_T\tCCD2_OD_T\n",
        "ObsID\tfoo\tbar\tbaz\tqux\tquux\tcorge\n",  # an ObsID column but nothing else known
        "",
    ],
)
def test_unrecognisable_header_raises_naming_file(header):
    with pytest.raises(ExpLogFormatError, match="EXP_LOG_999999.txt"):
        parse_explog_text(header + "1\t2\t3\n", source="EXP_LOG_999999.txt")


def test_unrecognisable_file_raises_naming_file(tmp_path):
    path = tmp_path / "EXP_LOG_010125.txt"
    path.write_text("hello world\n")
    with pytest.raises(ExpLogFormatError, match=str(path)):
        read_explog(path)
    with pytest.raises(ValueError):  # ExpLogFormatError is a ValueError
        read_explog(path)


# --------------------------------------------------------------------------------------------
# growing files and bad lines


def test_partial_last_line_ignored():
    text = _log_text([_values(1, 1), _values(1, 2), _values(1, 3)])
    cut = text[: text.rindex("\t", 0, len(text) - 5)]  # the third row stops in mid-write
    log = parse_explog_text(cut)
    assert log.partial_tail and [r.ccd for r in log.rows] == [1, 2] and log.errors == []
    whole = parse_explog_text(text.rstrip("\n"))  # complete row, newline not yet written
    assert whole.partial_tail and len(whole.rows) == 2
    final = parse_explog_text(text.rstrip("\n"), complete=True)
    assert not final.partial_tail and len(final.rows) == 3


def test_garbage_lines_skipped_and_reported():
    good = [format_explog_row(_values(1, c)) for c in (1, 2, 3)]
    bad_obsid = format_explog_row(_values(2, 1)).replace("2", "x2", 1)
    bad_ccd = format_explog_row(_values(2, 1, CCD="CCD7"))
    bad_date = format_explog_row(_values(2, 2, date="yesterday", File_name="f"))
    text = (
        explog_header() + good[0] + "garbage line\n" + good[1] + "\n" + "# a comment\n" + bad_obsid + bad_ccd
        + "\t".join(["3"] * 90) + "\n" + bad_date + good[2]
    )
    log = parse_explog_text(text)
    assert [r.ccd for r in log.rows] == [1, 2, 3]
    lines = [n for n, _ in log.errors]
    assert lines == [3, 7, 8, 9, 10]
    reasons = [r for _, r in log.errors]
    assert reasons[0] == "1 fields, the header has 81"
    assert reasons[1].startswith("unparsable ObsID 'x2'")
    assert reasons[2] == "CCD 7 is not 1..3"
    assert reasons[3] == "90 fields, the header has 81"
    assert reasons[4] == "unparsable date 'yesterday'"


# --------------------------------------------------------------------------------------------
# merge


def test_merge_dedups_later_wins_sorted(tmp_path):
    a = parse_explog_text(_log_text([_values(5, c) for c in (1, 2, 3)] + [_values(3, 1, exptime=1.0)]), source="a")
    b = parse_explog_text(_log_text([_values(3, 1, exptime=9.0), _values(3, 2), _values(4, 1)]), source="b")
    merged = merge_explogs([a, b])
    assert isinstance(merged, ExpLog)
    assert [(r.obsid, r.ccd) for r in merged.rows] == [(3, 1), (3, 2), (4, 1), (5, 1), (5, 2), (5, 3)]
    assert merged.rows[0].values["exptime"] == 9.0
    assert merged.version == "7.5.X" and merged.obsids == [3, 4, 5]
    # paths and mixed versions
    path = tmp_path / "EXP_LOG_050825.txt"
    path.write_text(_log_text([_values(6, 1)], "5.7.02"))
    mixed = merge_explogs([a, path])
    assert mixed.version == "mixed" and mixed.obsids == [3, 5, 6]
    assert mixed.rows[-1].values["exptime"] == 2.5
    with pytest.raises(ValueError):
        merge_explogs([])


# --------------------------------------------------------------------------------------------
# writer


def test_writer_7_5_round_trip():
    header = explog_header()
    assert header.endswith("\n") and header.rstrip("\n").split("\t") == LAYOUTS["7.5.X"]
    values = _values(42, 3, rdmode="fwd_bas", chinj=1, chinj_on=30, v_tpump=0, mirr_pos=52.5)
    line = format_explog_row(values)
    assert line.endswith("\n") and line.count("\t") == 80
    cells = dict(zip(LAYOUTS["7.5.X"], line.rstrip("\n").split("\t")))
    assert cells["CCD"] == "CCD3" and cells["ROE"] == "ROE1" and cells["date"] == "050825D100042T"
    assert cells["File_name"] == "EUC_42_050825D100042T_ROE1_CCD3"
    assert cells["sn_ccd1"] == ""  # missing keys written empty
    row = parse_explog_text(header + line).rows[0]
    assert (row.obsid, row.ccd, row.roe, row.date) == (42, 3, 1, datetime(2025, 8, 5, 10, 0, 42))
    for key in ("exptime", "vstart", "vend", "wave", "rdmode", "chinj", "chinj_on", "mirr_pos", "OD_1_T", "R1C1_TT"):
        assert row.values[key] == values[key], key
    assert row.values["sn_ccd1"] == ""


# --------------------------------------------------------------------------------------------
# tail


def test_tail_on_growing_file(tmp_path):
    path = tmp_path / "EXP_LOG_050825.txt"
    tail = ExpLogTail(path)
    assert tail.poll() == []  # not there yet
    header = explog_header()
    rows = [format_explog_row(_values(1, c)) for c in (1, 2, 3)] + [format_explog_row(_values(2, 1))]
    with open(path, "w") as f:
        f.write(header[:30])  # header half written
        f.flush()
        assert tail.poll() == [] and tail.version is None
        f.write(header[30:] + rows[0] + rows[1][:20])
        f.flush()
        got = tail.poll()
        assert [(r.obsid, r.ccd) for r in got] == [(1, 1)] and tail.partial_tail
        assert tail.version == "7.5.X"
        f.write(rows[1][20:] + "junk\n" + rows[2])
        f.flush()
        assert [(r.obsid, r.ccd) for r in tail.poll()] == [(1, 2), (1, 3)]
        assert not tail.partial_tail
        assert tail.errors == [(4, "1 fields, the header has 81")]
        assert tail.poll() == []
        f.write(rows[3])
    assert [(r.obsid, r.ccd) for r in tail.poll()] == [(2, 1)]
    # the whole file read at once agrees
    assert [(r.obsid, r.ccd) for r in read_explog(path).rows] == [(1, 1), (1, 2), (1, 3), (2, 1)]


def test_tail_restarts_on_replaced_file(tmp_path):
    path = tmp_path / "EXP_LOG_050825.txt"
    path.write_text(_log_text([_values(1, 1), _values(1, 2)]))
    tail = ExpLogTail(path)
    assert len(tail.poll()) == 2
    new = tmp_path / "new.txt"
    new.write_text(_log_text([_values(7, 1)], "6.3.0"))  # another layout, shorter file
    os.replace(new, path)
    got = tail.poll()
    assert [(r.obsid, r.ccd) for r in got] == [(7, 1)] and tail.version == "6.3.0"
    # rewritten in place with the same size but another header
    text = path.read_text()
    path.write_text(text.replace("ObsID", "OBSID", 1))
    assert [(r.obsid, r.ccd) for r in tail.poll()] == [(7, 1)]


def test_tail_unrecognisable_header_raises(tmp_path):
    path = tmp_path / "EXP_LOG_050825.txt"
    path.write_text("what\tis\tthis\n1\t2\t3\n")
    tail = ExpLogTail(path)
    with pytest.raises(ExpLogFormatError, match="EXP_LOG_050825.txt"):
        tail.poll()
    with pytest.raises(ExpLogFormatError):
        tail.poll()
