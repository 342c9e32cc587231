"""ELVIS file names: FITS frames, exposure logs, HK files (per exposure and daily) and the
``DDMMYYDHHMMSST`` date stamp.

A two-digit year is always 20YY (the original tool mapped 20..99 to 19YY: a bug). Parsers accept a
bare name or a path (only the last component is read) and raise :class:`ValueError` naming the
string when it does not match.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import date as Date
from datetime import datetime
from pathlib import PurePath
from typing import Literal

FileKind = Literal["fits", "explog", "hk_exposure", "hk_daily"]

# ASCII digits only (re.ASCII: "\u0663" is not an ObsID digit) and bounded widths (an ObsID of
# thousands of digits is not a name, and int() would refuse it without naming the file)
_OBSID = r"(\d{1,18})"
_UNIT = r"(\d{1,4})"
_STAMP = r"(\d{6})D(_?)(\d{6})T"
_FITS_RE = re.compile(r"^EUC_" + _OBSID + "_" + _STAMP + r"_ROE" + _UNIT + "_CCD" + _UNIT + r"\.fits$", re.ASCII)
_EXPLOG_RE = re.compile(r"^EXP_LOG_(\d{6})\.txt$", re.ASCII)
_HK_EXPOSURE_RE = re.compile(r"^HK_" + _OBSID + r"_(\d{6})D(\d{6})T_ROE" + _UNIT + r"\.txt$", re.ASCII)
_HK_DAILY_RE = re.compile(r"^HK_(\d{2})-(\d{2})-(\d{2})_ROE" + _UNIT + r"(?:_" + _UNIT + r")?\.txt$", re.ASCII)
_DATE_RE = re.compile(r"^(\d{6})D_?(\d{6})T$", re.ASCII)


@dataclass(frozen=True)
class FitsName:
    """Parsed ``EUC_<ObsID>_<DDMMYY>D<HHMMSS>T_ROE<r>_CCD<c>.fits`` (``legacy``: ``D_`` form)."""

    obsid: int
    date: datetime
    roe: int
    ccd: int
    legacy: bool = False

    @property
    def name(self) -> str:
        """The file name in the same pattern it was parsed from."""
        return format_fits_name(self.obsid, self.date, self.roe, self.ccd, legacy=self.legacy)


@dataclass(frozen=True)
class ExpLogName:
    """Parsed ``EXP_LOG_<DDMMYY>.txt``."""

    date: Date


@dataclass(frozen=True)
class HKExposureName:
    """Parsed per-exposure HK name ``HK_<ObsID>_<DDMMYY>D<HHMMSS>T_ROE<r>.txt``."""

    obsid: int
    date: datetime
    roe: int


@dataclass(frozen=True)
class HKDailyName:
    """Parsed daily HK name ``HK_<DD-MM-YY>_ROE<r>[_NN].txt`` (``part`` None when absent)."""

    date: Date
    roe: int
    part: int | None = None


def _basename(name: str | os.PathLike) -> str:
    return PurePath(os.fspath(name)).name


def _ddmmyy(text: str, whole: str) -> Date:
    try:
        return Date(2000 + int(text[4:6]), int(text[2:4]), int(text[0:2]))
    except ValueError as exc:
        raise ValueError(f"{whole!r}: invalid date {text!r} (DDMMYY): {exc}") from None


def _check_year(dt: Date) -> None:
    if not 2000 <= dt.year <= 2099:
        raise ValueError(f"year {dt.year} cannot be written as a two-digit ELVIS year (20YY)")


def _check_ccd(ccd: int, whole: str) -> None:
    if not 1 <= ccd <= 3:
        raise ValueError(f"{whole!r}: CCD {ccd} is not 1..3")


def parse_elvis_date(text: str) -> datetime:
    """``DDMMYYDHHMMSST`` (also ``DDMMYYD_HHMMSST``) -> datetime, year 20YY."""
    m = _DATE_RE.match(text.strip())
    if not m:
        raise ValueError(f"{text!r} is not an ELVIS date DDMMYYDHHMMSST")
    day = _ddmmyy(m.group(1), text)
    hms = m.group(2)
    try:
        return datetime(day.year, day.month, day.day, int(hms[0:2]), int(hms[2:4]), int(hms[4:6]))
    except ValueError as exc:
        raise ValueError(f"{text!r}: invalid time {hms!r} (HHMMSS): {exc}") from None


def format_elvis_date(dt: datetime) -> str:
    """datetime -> ``DDMMYYDHHMMSST`` (seconds truncated)."""
    _check_year(dt)
    return dt.strftime("%d%m%yD%H%M%ST")


def _stamp(dstr: str, tstr: str, whole: str) -> datetime:
    try:
        return parse_elvis_date(f"{dstr}D{tstr}T")
    except ValueError as exc:
        raise ValueError(f"{whole!r}: {exc}") from None


def parse_fits_name(name: str | os.PathLike) -> FitsName:
    """Parse either FITS name pattern (``...D<HHMMSS>T...`` or the older ``...D_<HHMMSS>T...``)."""
    base = _basename(name)
    m = _FITS_RE.match(base)
    if not m:
        raise ValueError(f"{base!r} is not an ELVIS FITS name EUC_<ObsID>_<DDMMYY>D<HHMMSS>T_ROE<r>_CCD<c>.fits")
    obsid, dstr, sep, tstr, roe, ccd = m.groups()
    _check_ccd(int(ccd), base)
    return FitsName(int(obsid), _stamp(dstr, tstr, base), int(roe), int(ccd), legacy=bool(sep))


def format_fits_name(obsid: int, date: datetime, roe: int, ccd: int, legacy: bool = False) -> str:
    """``EUC_<ObsID>_<DDMMYY>D<HHMMSS>T_ROE<r>_CCD<c>.fits`` (``legacy=True``: ``D_<HHMMSS>T``)."""
    _check_ccd(int(ccd), f"CCD{ccd}")
    stamp = format_elvis_date(date)
    if legacy:
        stamp = stamp.replace("D", "D_", 1)
    return f"EUC_{int(obsid)}_{stamp}_ROE{int(roe)}_CCD{int(ccd)}.fits"


def explog_name(date: Date) -> str:
    """``EXP_LOG_<DDMMYY>.txt``."""
    _check_year(date)
    return f"EXP_LOG_{date.strftime('%d%m%y')}.txt"


def parse_explog_name(name: str | os.PathLike) -> ExpLogName:
    """Parse ``EXP_LOG_<DDMMYY>.txt``."""
    base = _basename(name)
    m = _EXPLOG_RE.match(base)
    if not m:
        raise ValueError(f"{base!r} is not an exposure-log name EXP_LOG_<DDMMYY>.txt")
    return ExpLogName(_ddmmyy(m.group(1), base))


def hk_exposure_name(obsid: int, date: datetime, roe: int) -> str:
    """``HK_<ObsID>_<DDMMYY>D<HHMMSS>T_ROE<r>.txt``."""
    return f"HK_{int(obsid)}_{format_elvis_date(date)}_ROE{int(roe)}.txt"


def parse_hk_exposure_name(name: str | os.PathLike) -> HKExposureName:
    """Parse ``HK_<ObsID>_<DDMMYY>D<HHMMSS>T_ROE<r>.txt``."""
    base = _basename(name)
    m = _HK_EXPOSURE_RE.match(base)
    if not m:
        raise ValueError(f"{base!r} is not a per-exposure HK name HK_<ObsID>_<DDMMYY>D<HHMMSS>T_ROE<r>.txt")
    obsid, dstr, tstr, roe = m.groups()
    return HKExposureName(int(obsid), _stamp(dstr, tstr, base), int(roe))


def hk_daily_name(date: Date, roe: int, part: int | None = None) -> str:
    """``HK_<DD-MM-YY>_ROE<r>[_NN].txt`` (``part`` written as two digits)."""
    _check_year(date)
    suffix = "" if part is None else f"_{int(part):02d}"
    return f"HK_{date.strftime('%d-%m-%y')}_ROE{int(roe)}{suffix}.txt"


def parse_hk_daily_name(name: str | os.PathLike) -> HKDailyName:
    """Parse ``HK_<DD-MM-YY>_ROE<r>[_NN].txt``."""
    base = _basename(name)
    m = _HK_DAILY_RE.match(base)
    if not m:
        raise ValueError(f"{base!r} is not a daily HK name HK_<DD-MM-YY>_ROE<r>[_NN].txt")
    dd, mm, yy, roe, part = m.groups()
    return HKDailyName(_ddmmyy(dd + mm + yy, base), int(roe), None if part is None else int(part))


def day_folder_name(date: Date) -> str:
    """Day folder of ELVIS data: ``DDMMYY``."""
    _check_year(date)
    return date.strftime("%d%m%y")


_PARSERS = (
    ("fits", parse_fits_name),
    ("explog", parse_explog_name),
    ("hk_exposure", parse_hk_exposure_name),
    ("hk_daily", parse_hk_daily_name),
)


def classify(path: str | os.PathLike) -> FileKind | None:
    """Kind of an ELVIS file from its name: "fits", "explog", "hk_exposure", "hk_daily" or None."""
    for kind, parser in _PARSERS:
        try:
            parser(path)
        except ValueError:
            continue
        return kind  # type: ignore[return-value]
    return None


__all__ = [
    "ExpLogName",
    "FileKind",
    "FitsName",
    "HKDailyName",
    "HKExposureName",
    "classify",
    "day_folder_name",
    "explog_name",
    "format_elvis_date",
    "format_fits_name",
    "hk_daily_name",
    "hk_exposure_name",
    "parse_elvis_date",
    "parse_explog_name",
    "parse_fits_name",
    "parse_hk_daily_name",
    "parse_hk_exposure_name",
]
