"""Fuzzed exposure logs through ``shared.explog``: every layout version, CRLF, padded and trailing-tab
headers, garbage and partial lines, wrong column counts, random text. Property: a parsed
:class:`ExpLog` (bad lines listed in ``errors``) or an :class:`ExpLogFormatError` naming the
file; valid rows round-trip; the tail reader fed the same bytes in random chunks gives the same
rows as the whole-text parser."""

from __future__ import annotations

import string
import tempfile
from datetime import datetime
from pathlib import Path

from hypothesis import given, strategies as st

from shared.explog import (
    ExpLogFormatError,
    ExpLogTail,
    explog_header,
    explog_layouts,
    format_explog_row,
    parse_explog_text,
    read_explog,
)
from tests.test_fuzz_strategies import assert_names, count, junk_text, line_noise, scaled

VERSIONS = sorted(explog_layouts())
SOURCE = "EXP_LOG_010124.txt"

dates = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31)).map(
    lambda d: d.replace(microsecond=0))
words = st.text(alphabet=string.ascii_letters, min_size=1, max_size=8).filter(
    lambda w: w.lower() not in ("nan", "inf", "infinity", "e"))
cells = st.one_of(st.integers(-10**9, 10**9), st.floats(allow_nan=False, allow_infinity=False, width=64), words)


@st.composite
def row_values(draw, version: str):
    cols = explog_layouts()[version]
    chosen = draw(st.lists(st.sampled_from(cols[5:]), max_size=6, unique=True)) if len(cols) > 5 else []
    values = {c: draw(cells) for c in chosen}
    values.update(ObsID=draw(st.integers(0, 10**8)), CCD=draw(st.integers(1, 3)), ROE=draw(st.integers(1, 2)),
                  date=draw(dates), test=draw(st.text(alphabet=string.ascii_uppercase + string.digits + "_", min_size=1,
                                                      max_size=10)))
    values.pop("File_name", None)
    for c in cols:  # old layouts spell the standard columns differently
        if c.lower() in ("date", "test"):
            values[c] = values[c.lower()]
    return values


@st.composite
def explog_texts(draw):
    """(text, valid rows as (obsid, ccd) in order, version): header of any version (possibly
    padded, CRLF, trailing tabs), valid rows, garbage lines, rows with a wrong field count, and
    maybe a partial last line."""
    version = draw(st.sampled_from(VERSIONS))
    header = explog_header(version)
    if draw(st.booleans()):
        header = "\t".join(f" {c} " for c in header.rstrip("\n").split("\t")) + "\t\t\n"
    lines, valid = [header], []
    for _ in range(draw(st.integers(0, 6))):
        choice = draw(st.integers(0, 5))
        if choice <= 2:
            values = draw(row_values(version))
            lines.append(format_explog_row(values, version))
            valid.append((values["ObsID"], values["CCD"], values))  # FPA: the CCD from the file name
        elif choice == 3:
            lines.append(draw(line_noise) + "\n")
        elif choice == 4:
            fields = format_explog_row(draw(row_values(version)), version).rstrip("\n").split("\t")
            cut = draw(st.integers(1, len(fields) - 1))
            lines.append("\t".join(fields[:cut] if draw(st.booleans()) else fields + ["x"] * cut) + "\n")
        else:
            lines.append("\n")
    crlf = draw(st.booleans())
    text = "".join(line.replace("\n", "\r\n") if crlf else line for line in lines)
    partial = draw(st.booleans())
    if partial:
        text += format_explog_row(draw(row_values(version)), version).rstrip("\n")[: draw(st.integers(1, 60))]
    return text, valid, version


@given(explog_texts())
def test_explog_text_parses_or_raises_a_typed_error(case):
    count("explog")
    text, valid, version = case
    log = parse_explog_text(text, source=SOURCE)
    assert log.version == version or log.match.equivalent and version in log.match.equivalent
    got = [(r.obsid, r.ccd) for r in log.rows]
    want = [(o, c) for o, c, _ in valid]
    it = iter(got)
    assert all(w in it for w in want), f"valid rows {want} not all parsed (in order) from {got}"
    for lineno, reason in log.errors:
        assert 1 <= lineno <= text.count("\n") + 1 and reason
    by_key = {(r.obsid, r.ccd): r for r in log.rows}
    last = {(obsid, ccd): values for obsid, ccd, values in valid}  # a later row of the same key wins
    for (obsid, ccd), values in last.items():
        row = by_key[(obsid, ccd)]
        assert row.date == values["date"] and row.test == values["test"]
        for col in explog_layouts()[version][5:]:
            if col in values and col not in ("date", "test", "DATE", "TEST"):
                got_v, want_v = row.values[col], values[col]
                assert got_v == want_v or (isinstance(want_v, float) and float(got_v) == want_v), (col, got_v, want_v)


@given(st.one_of(junk_text, st.lists(line_noise, max_size=8).map("\n".join),
                 st.sampled_from(VERSIONS).flatmap(lambda v: st.tuples(st.just(explog_header(v)), line_noise)).map(
                     lambda t: t[0][: len(t[0]) // 2] + t[1] + "\n" + t[1])))
def test_random_text_is_an_explog_or_a_typed_error(text):
    count("explog")
    try:
        log = parse_explog_text(text, source=SOURCE)
    except ExpLogFormatError as exc:
        assert_names(exc, SOURCE)
        assert exc.source == SOURCE and exc.reason
    else:
        assert log.version in explog_layouts()


@scaled(0.5)
@given(explog_texts(), st.lists(st.integers(1, 400), max_size=4))
def test_tail_in_chunks_gives_the_rows_of_the_whole_text(case, cuts):
    count("explog")
    text, _, _ = case
    raw = text.encode()
    whole = parse_explog_text(text, source=SOURCE)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / SOURCE
        tail, rows, at = ExpLogTail(path), [], 0
        with open(path, "wb") as f:
            for n in cuts + [len(raw)]:
                f.write(raw[at:at + n])
                f.flush()
                at += n
                rows += tail.poll()
        assert [(r.obsid, r.ccd, r.values) for r in rows] == [(r.obsid, r.ccd, r.values) for r in whole.rows]
        assert tail.errors == whole.errors
        assert tail.partial_tail == whole.partial_tail
        assert [r.obsid for r in read_explog(path).rows] == [r.obsid for r in whole.rows]


@given(st.binary(max_size=2000))
def test_binary_garbage_files_are_refused_with_the_file_name(raw):
    count("explog")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / SOURCE
        path.write_bytes(raw)
        try:
            read_explog(path)
        except ExpLogFormatError as exc:
            assert_names(exc, str(path))
        tail = ExpLogTail(path)
        try:
            tail.poll()
        except ExpLogFormatError as exc:
            assert_names(exc, str(path))
