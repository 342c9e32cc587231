"""Fuzzed HK files through ``shared.hk``: every layout (legacy padded headers with ``HH:MM:SS``
timestamps and a ``#`` metadata block, 6.x / 7.x ``TimeStamp``), "no reading" sentinels, junk
lines, CRLF, wrong field counts, random text. Property: an :class:`HKTable` (bad lines listed) or
an :class:`HKFormatError` naming the file; written samples round-trip (sentinels and blanks read
as NaN); statistics and limit checks never fail on what the parser returns; the tail reader in
chunks gives the samples of the whole-text parser."""

from __future__ import annotations

import math
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
from hypothesis import given, strategies as st

from shared.hk import (
    HKFormatError,
    HKTail,
    check_hk_limits,
    format_hk_row,
    hk_header,
    hk_layouts,
    hk_sentinels,
    hk_stats,
    parse_hk_text,
    read_hk,
)
from tests.test_fuzz_strategies import assert_names, count, junk_text, line_noise, scaled

VERSIONS = sorted(hk_layouts())
SOURCE = "HK_12_010124D120000T_ROE1.txt"
SENTINELS = hk_sentinels()

stamps = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31)).map(
    lambda d: d.replace(microsecond=0))
readings = st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.integers(-1000, 1000), st.sampled_from(SENTINELS),
                     st.none())


@st.composite
def hk_texts(draw):
    """(text, samples [(timestamp, {key: value})], version)."""
    version = draw(st.sampled_from(VERSIONS))
    cols = hk_layouts()[version]
    header = hk_header(version)
    legacy = cols[0] == "HK_timestamp"
    if legacy or draw(st.booleans()):  # legacy files pad the names with spaces
        header = "\t".join(f"{c:<24}" for c in header.rstrip("\n").split("\t")) + "\n"
    lines, samples = [header], []
    for _ in range(draw(st.integers(0, 5))):
        choice = draw(st.integers(0, 4))
        if choice <= 2:
            ts = draw(stamps)
            chosen = draw(st.lists(st.sampled_from(cols[1:]), max_size=5, unique=True))
            values = {c: draw(readings) for c in chosen}
            lines.append(format_hk_row(ts, values, version))
            samples.append((ts.time() if legacy else ts, values))
        elif choice == 3:
            lines.append(draw(line_noise).lstrip("#") + "\n")
        else:
            lines.append("\t".join(["12-13-99_25:61:61"] + ["1"] * draw(st.integers(0, 3))) + "\n")
    if legacy and draw(st.booleans()):
        lines += ["\n", "\n", "# Comment block\n", f"# ROE_SN  {draw(st.integers(0, 999))}\n", "# Operator  jdoe\n"]
    crlf = draw(st.booleans())
    text = "".join(line.replace("\n", "\r\n") if crlf else line for line in lines)
    if draw(st.booleans()):
        text += format_hk_row(draw(stamps), {}, version)[: draw(st.integers(1, 40))].rstrip("\n")
    return text, samples, version


def _same(got: float, want) -> bool:
    if want is None or any(abs(float(want) - s) <= 0.005 for s in SENTINELS):
        return math.isnan(got)
    return got == float(want)


@given(hk_texts())
def test_hk_text_parses_and_samples_round_trip(case):
    count("hk")
    text, samples, version = case
    table = parse_hk_text(text, source=SOURCE)
    assert version in table.match.equivalent or table.version == version
    ts = iter(range(table.n_rows))
    for stamp, values in samples:  # every valid sample, in order (junk lines cannot hide them)
        for i in ts:
            if table.timestamps[i] == stamp and all(_same(table.values[k][i], v) for k, v in values.items()):
                break
        else:
            raise AssertionError(f"sample {stamp} {values} not read back")
    stats = hk_stats(table)
    assert set(stats) == set(table.columns)
    for verdict in check_hk_limits(table):
        assert verdict.passed in (True, False, None) and verdict.reason


@given(st.one_of(junk_text, st.lists(line_noise, max_size=8).map("\n".join),
                 st.sampled_from(VERSIONS).flatmap(lambda v: st.tuples(st.just(hk_header(v)), line_noise)).map(
                     lambda t: t[0][: len(t[0]) // 3] + t[1] + "\n" + t[1] + "\n")))
def test_random_text_is_an_hk_table_or_a_typed_error(text):
    count("hk")
    try:
        table = parse_hk_text(text, source=SOURCE)
    except HKFormatError as exc:
        assert_names(exc, SOURCE)
    else:
        for key in table.columns:
            assert table.values[key].shape == (table.n_rows,) and table.values[key].dtype == np.float64
        hk_stats(table)
        check_hk_limits(table)


@scaled(0.5)
@given(hk_texts(), st.lists(st.integers(1, 600), max_size=4))
def test_hk_tail_in_chunks_gives_the_samples_of_the_whole_text(case, cuts):
    count("hk")
    text, _, _ = case
    raw = text.encode()
    whole = parse_hk_text(text, source=SOURCE)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "HK_01-01-24_ROE1.txt"
        tail, rows, at = HKTail(path), [], 0
        with open(path, "wb") as f:
            for n in cuts + [len(raw)]:
                f.write(raw[at:at + n])
                f.flush()
                at += n
                rows += tail.poll()
        assert [r.timestamp for r in rows] == whole.timestamps
        for i, row in enumerate(rows):
            for key in whole.columns:
                a, b = row.values[key], whole.values[key][i]
                assert a == b or (math.isnan(a) and math.isnan(b))
        assert tail.errors == whole.errors and tail.metadata == whole.metadata
        assert read_hk(path).n_rows == whole.n_rows


@given(st.binary(max_size=2000))
def test_binary_garbage_hk_files_are_refused_with_the_file_name(raw):
    count("hk")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / SOURCE
        path.write_bytes(raw)
        for read in (lambda: read_hk(path), lambda: HKTail(path).poll()):
            try:
                read()
            except HKFormatError as exc:
                assert_names(exc, str(path))
