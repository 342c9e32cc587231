"""ELVIS file names: both FITS patterns, exposure-log and HK names, the DDMMYYDHHMMSST date
(year 20YY), classify(), and clear errors naming the string."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path

import pytest

from shared.filenames import (
    ExpLogName,
    FitsName,
    HKDailyName,
    HKExposureName,
    classify,
    day_folder_name,
    explog_name,
    format_elvis_date,
    format_fits_name,
    hk_daily_name,
    hk_exposure_name,
    parse_elvis_date,
    parse_explog_name,
    parse_fits_name,
    parse_hk_daily_name,
    parse_hk_exposure_name,
)

T = datetime(2016, 11, 25, 15, 6, 14)


def test_fits_name_current_pattern():
    got = parse_fits_name("EUC_191_251116D150614T_ROE1_CCD2.fits")
    assert got == FitsName(obsid=191, date=T, roe=1, ccd=2, legacy=False)
    assert got.name == "EUC_191_251116D150614T_ROE1_CCD2.fits"


def test_fits_name_legacy_pattern_and_path():
    got = parse_fits_name(Path("/data/251116/EUC_12345_251116D_150614T_ROE2_CCD3.fits"))
    assert (got.obsid, got.date, got.roe, got.ccd, got.legacy) == (12345, T, 2, 3, True)
    assert got.name == "EUC_12345_251116D_150614T_ROE2_CCD3.fits"


def test_format_fits_name_both_patterns():
    assert format_fits_name(7, T, 1, 1) == "EUC_7_251116D150614T_ROE1_CCD1.fits"
    assert format_fits_name(7, T, 1, 1, legacy=True) == "EUC_7_251116D_150614T_ROE1_CCD1.fits"
    assert parse_fits_name(format_fits_name(99, T, 1, 3)).ccd == 3


@pytest.mark.parametrize(
    "bad",
    [
        "EUC_191_251116D150614T_ROE1_CCD4.fits",  # CCD 1..3
        "EUC_191_251116D150614T_ROE1_CCD1.fit",
        "EUC_x_251116D150614T_ROE1_CCD1.fits",
        "EUC_191_321116D150614T_ROE1_CCD1.fits",  # day 32
        "EUC_191_251116D250614T_ROE1_CCD1.fits",  # hour 25
        "EXP_LOG_251116.txt",
    ],
)
def test_bad_fits_names_raise_naming_the_string(bad):
    with pytest.raises(ValueError, match=bad.split(".")[0][:12]):
        parse_fits_name(bad)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("251116D150614T", datetime(2016, 11, 25, 15, 6, 14)),
        ("010199D000000T", datetime(2099, 1, 1, 0, 0, 0)),  # 20YY always (old tool: 1999)
        ("311220D235959T", datetime(2020, 12, 31, 23, 59, 59)),
        ("050800D_000000T", datetime(2000, 8, 5)),
    ],
)
def test_elvis_date_is_20yy(text, expected):
    assert parse_elvis_date(text) == expected


def test_elvis_date_round_trip_and_errors():
    assert format_elvis_date(T) == "251116D150614T"
    assert parse_elvis_date(format_elvis_date(datetime(2099, 12, 31, 1, 2, 3))) == datetime(2099, 12, 31, 1, 2, 3)
    with pytest.raises(ValueError, match="2016-11-25"):
        parse_elvis_date("2016-11-25")
    with pytest.raises(ValueError, match="1999"):
        format_elvis_date(datetime(1999, 1, 1))


def test_explog_names():
    assert explog_name(date(2000, 8, 5)) == "EXP_LOG_050800.txt"
    assert parse_explog_name("EXP_LOG_050800.txt") == ExpLogName(date(2000, 8, 5))
    assert parse_explog_name("/x/y/EXP_LOG_251116.txt").date == date(2016, 11, 25)
    with pytest.raises(ValueError, match="EXP_LOG_0508.txt"):
        parse_explog_name("EXP_LOG_0508.txt")


def test_hk_exposure_names():
    name = hk_exposure_name(191, datetime(2000, 8, 5), 1)
    assert name == "HK_191_050800D000000T_ROE1.txt"
    assert parse_hk_exposure_name(name) == HKExposureName(191, datetime(2000, 8, 5), 1)
    with pytest.raises(ValueError, match="HK_191_050800_ROE1.txt"):
        parse_hk_exposure_name("HK_191_050800_ROE1.txt")


def test_hk_daily_names():
    assert hk_daily_name(date(2025, 8, 5), 1) == "HK_05-08-25_ROE1.txt"
    assert hk_daily_name(date(2025, 8, 5), 2, part=3) == "HK_05-08-25_ROE2_03.txt"
    assert parse_hk_daily_name("HK_05-08-25_ROE1.txt") == HKDailyName(date(2025, 8, 5), 1, None)
    assert parse_hk_daily_name("HK_05-08-25_ROE2_03.txt") == HKDailyName(date(2025, 8, 5), 2, 3)
    with pytest.raises(ValueError, match="HK_05-13-25_ROE1.txt"):  # month 13
        parse_hk_daily_name("HK_05-13-25_ROE1.txt")


def test_day_folder_name():
    assert day_folder_name(date(2025, 8, 5)) == "050825"


@pytest.mark.parametrize(
    "name, kind",
    [
        ("EUC_191_251116D150614T_ROE1_CCD1.fits", "fits"),
        ("/d/EUC_191_251116D_150614T_ROE1_CCD3.fits", "fits"),
        ("EXP_LOG_050800.txt", "explog"),
        ("HK_191_050800D000000T_ROE1.txt", "hk_exposure"),
        ("HK_05-08-00_ROE1.txt", "hk_daily"),
        ("HK_05-08-00_ROE1_01.txt", "hk_daily"),
        ("EUC_191_251116D150614T_ROE1_CCD1.fits.tmp", None),
        ("notes.txt", None),
        ("truth.json", None),
    ],
)
def test_classify(name, kind):
    assert classify(name) == kind
