"""Fuzzed file names through ``shared.filenames``: random text, near-miss names (impossible dates
and times, huge ObsIDs, non-ASCII digits, paths), valid names. Property: a parsed name or a
``ValueError`` naming the string and the reason; ``classify`` never raises; valid names round-trip."""

from __future__ import annotations

from datetime import datetime

from hypothesis import example, given, strategies as st

from shared.filenames import (
    classify,
    explog_name,
    format_fits_name,
    hk_daily_name,
    hk_exposure_name,
    parse_elvis_date,
    parse_explog_name,
    parse_fits_name,
    parse_hk_daily_name,
    parse_hk_exposure_name,
)
from tests.test_fuzz_strategies import assert_names, count

PARSERS = (parse_fits_name, parse_explog_name, parse_hk_exposure_name, parse_hk_daily_name)
dates = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31)).map(
    lambda d: d.replace(microsecond=0))
digits = st.text(alphabet="0123456789", min_size=1, max_size=8)
odd_digits = st.text(alphabet="0123456789\u0663\u096b\uff15", min_size=1, max_size=8)


@st.composite
def near_names(draw):
    d6 = draw(st.text(alphabet="0123456789", min_size=6, max_size=6))
    t6 = draw(st.text(alphabet="0123456789", min_size=6, max_size=6))
    n = draw(st.one_of(digits, odd_digits, st.just("9" * 5000)))
    r, c = draw(odd_digits), draw(odd_digits)
    name = draw(st.sampled_from([
        f"EUC_{n}_{d6}D{t6}T_ROE{r}_CCD{c}.fits", f"EUC_{n}_{d6}D_{t6}T_ROE{r}_CCD{c}.fits",
        f"EXP_LOG_{d6}.txt", f"HK_{n}_{d6}D{t6}T_ROE{r}.txt", f"HK_{d6[:2]}-{d6[2:4]}-{d6[4:]}_ROE{r}.txt",
        f"HK_{d6[:2]}-{d6[2:4]}-{d6[4:]}_ROE{r}_{c}.txt", f"{d6}D{t6}T",
    ]))
    prefix = draw(st.sampled_from(["", "/data/010124/", "../", "a\\b\\", "./"]))
    return prefix + name


def _parse_all(text: str) -> None:
    count("filenames")
    kind = classify(text)
    assert kind in (None, "fits", "explog", "hk_exposure", "hk_daily")
    base = text.replace("\\", "/").rsplit("/", 1)[-1] if "/" in text else text
    for parser in (*PARSERS, parse_elvis_date):
        try:
            parsed = parser(text)
        except ValueError as exc:
            name = text.strip() if parser is parse_elvis_date else base
            assert_names(exc, repr(name)[1:-1][:40])
        else:
            if parser is not parse_elvis_date:
                assert kind is not None
                assert hasattr(parsed, "date")


@given(st.one_of(near_names(), st.text(max_size=80)))
@example("HK_" + "9" * 5000 + "_010124D120000T_ROE1.txt")
@example("EUC_\u0663_010124D120000T_ROE1_CCD1.fits")
@example("HK_31-02-24_ROE1_07.txt")
def test_any_name_parses_or_raises_a_value_error_naming_it(text):
    _parse_all(text)


@given(obsid=st.integers(0, 10**9), date=dates, roe=st.integers(1, 99), ccd=st.integers(1, 3),
       legacy=st.booleans(), part=st.one_of(st.none(), st.integers(0, 99)))
def test_valid_names_round_trip(obsid, date, roe, ccd, legacy, part):
    count("filenames")
    fits_name = format_fits_name(obsid, date, roe, ccd, legacy=legacy)
    fn = parse_fits_name(fits_name)
    assert (fn.obsid, fn.date, fn.roe, fn.ccd, fn.legacy, fn.name) == (obsid, date, roe, ccd, legacy, fits_name)
    assert classify(f"/data/{fits_name}") == "fits"
    hn = parse_hk_exposure_name(hk_exposure_name(obsid, date, roe))
    assert (hn.obsid, hn.date, hn.roe) == (obsid, date, roe)
    dn = parse_hk_daily_name(hk_daily_name(date.date(), roe, part))
    assert (dn.date, dn.roe, dn.part) == (date.date(), roe, part)
    assert parse_explog_name(explog_name(date.date())).date == date.date()
