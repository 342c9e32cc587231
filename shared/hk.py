"""ELVIS housekeeping (HK) files: per exposure ``HK_<ObsID>_<DDMMYY>D<HHMMSS>T_ROE<r>.txt`` and
daily ``HK_<DD-MM-YY>_ROE<r>[_NN].txt``; every layout of ``elvis-formats.json`` (``hk_columns``).

- 6.x / 7.x: tab table, header row, first column ``TimeStamp`` = ``DD-MM-YY_HH:MM:SS``.
- legacy 5.7.x: header names padded with spaces, first column ``HK_timestamp`` = ``HH:MM:SS``
  (read as :class:`datetime.time`), possibly followed by blank lines and a ``#`` block of
  ``key value`` lines (returned as ``metadata``, never as samples).

"No reading" sentinels (``hk_no_reading_sentinels``: -246.86, -273.27, -273.15, within
``SENTINEL_TOLERANCE``) and unparsable cells become NaN in every column. Limits
(``hk_limits_7.5.X``) are checked on per-file statistics; legacy keys are checked under their
7.5.X name where the correspondence is obvious (:data:`HK_LEGACY_ALIASES`).

Limit semantics (``elvis-formats.json``): an R/A value fails if it is <= lo or >= hi, an I value
if it is != value. ``EDGE_TOLERANCE`` absorbs float rounding: a value within it of a bound counts
as on the bound.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime, time
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

import numpy as np
from pydantic import BaseModel

from shared.explog import ExpLogRow, HeaderMatch, LineTail, clean_header, format_cell, match_layout, norm_name
from shared.filenames import classify
from shared.refdata import elvis_formats

HK_LATEST = "7.5.X"
SENTINEL_TOLERANCE = 0.005  # the ROE writes two decimals
EDGE_TOLERANCE = 1e-9  # relative to max(1, |bound|)
MIN_HEADER_SCORE = 0.5
TIMESTAMP_COLUMNS = ("TimeStamp", "HK_timestamp")

HKKind = Literal["exposure", "daily"]


class HKFormatError(ValueError):
    """An HK file whose header row matches no known layout (names the file)."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


def _build_legacy_aliases() -> dict[str, str]:
    a = {
        "HK_RD_top": "COMM_RD_T", "HK_RD_bot": "COMM_RD_B",
        "HK_IG2_top": "COMM_IG2_T", "HK_IG2_bot": "COMM_IG2_B",
        "HK_ID1": "FPGA_BIAS_ID1", "HK_ID2": "FPGA_BIAS_ID2",
        "HK_DD_bias": "FPGA_BIAS_DD", "HK_OG_bias": "FPGA_BIAS_OG",
        "HK_Temp1_RPSU": "RPSU_TEMP1", "HK_Temp2_RPSU": "RPSU_TEMP_2",
        "Video_TOP": "VID_PCB_TEMP_T", "Video_BOT": "VID_PCB_TEMP_B",
        "HK_Video_TOP": "VID_PCB_TEMP_T", "HK_Video_BOT": "VID_PCB_TEMP_B",
        "HK_FPGA_TOP": "FPGA_PCB_TEMP_T", "HK_FPGA_BOT": "FPGA_PCB_TEMP_B",
        "HK_VCCD_RPSU": "RPSU_VCCD_V", "HK_IVCCD_RPSU": "RPSU_VCCD_I",
        "HK_VCLK_RPSU": "RPSU_VCLK_V", "HK_IVCLK_RPSU": "RPSU_VCLK_I",
        "HK_VAN_pos_RPSU": "RPSU_VAN_P_V", "HK_I+VAN_RPSU": "RPSU_VAN_P_I",
        "HK_VAN_neg_RPSU": "RPSU_VAN_N_V", "HK_I-VAN_RPSU": "RPSU_VAN_N_I",
        "HK_3.3V_DIG_RPSU": "RPSU_3V3VD_V", "HK_I3.3V_DIG_RPSU": "RPSU_3V3VD_I",
        "HK_1.5V_DIG_RPSU": "RPSU_1V5VD_V", "HK_I1.5V_DIG_RPSU": "RPSU_1V5VD_I",
        "HK_28V_Pri_RPSU": "RPSU_28V_PRI_V", "HK_I28V_RPSU": "RPSU_28V_PRI_I",
        "HK_VCCD_ROE": "FPGA_VCCD_V", "HK_10VA_ROE": "FPGA_10VA_P_V",
        "HK_5VA_pos_ROE": "FPGA_5VA_P_V", "HK_5V_ref_ROE": "FPGA_5VREF_V",
        "HK_VRclk_ROE": "FPGA_VRCLK_V", "HK_Viclk_ROE": "FPGA_VICLK_V",
        "HK_1.5V_ROE": "FPGA_1V5VD_P_V",
    }
    for c in (1, 2, 3):
        a[f"HK_OD_Top_CCD{c}"] = f"CCD{c}_OD_T"
        a[f"HK_OD_Bottom_CCD{c}"] = f"CCD{c}_OD_B"
        a[f"HK_temp_top_CCD{c}"] = f"CCD{c}_TEMP_T"
        a[f"HK_temp_bottom_CCD{c}"] = f"CCD{c}_TEMP_B"
        a[f"HK_IG1_Top_CCD{c}"] = f"CCD{c}_IG1_T"
        a[f"HK_IG1_Bottom_CCD{c}"] = f"CCD{c}_IG1_B"
    return a


#: legacy (5.7.x / 6.0 / 6.1) HK name -> 7.5.X name of the same reading
HK_LEGACY_ALIASES: dict[str, str] = _build_legacy_aliases()


def canonical_hk_key(name: str) -> str:
    """7.5.X name of an HK column of any version (the name itself when there is none)."""
    return HK_LEGACY_ALIASES.get(name, name)


def hk_layouts() -> dict[str, list[str]]:
    """``hk_columns`` with the timestamp column first for every version (the JSON omits it for
    the legacy 5.7.x layouts, whose files start with ``HK_timestamp``)."""
    out = {}
    for version, cols in elvis_formats()["hk_columns"].items():
        out[version] = list(cols) if cols and cols[0] in TIMESTAMP_COLUMNS else ["HK_timestamp", *cols]
    return out


def hk_sentinels() -> list[float]:
    """The "no reading" values of ``hk_no_reading_sentinels``."""
    return [float(v) for k, v in elvis_formats()["hk_no_reading_sentinels"].items() if not k.startswith("_")]


def mask_sentinels(values: np.ndarray) -> np.ndarray:
    """Copy of ``values`` (float) with every "no reading" sentinel replaced by NaN."""
    out = np.array(values, dtype=float, copy=True)
    for s in hk_sentinels():
        out[np.abs(out - s) <= SENTINEL_TOLERANCE] = np.nan
    return out


_TS_FULL = re.compile(r"^(\d{2})-(\d{2})-(\d{2})_(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?$")
_TS_TIME = re.compile(r"^(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?$")


def parse_hk_timestamp(text: str) -> datetime | time:
    """``DD-MM-YY_HH:MM:SS`` -> datetime (20YY); legacy ``HH:MM:SS`` -> time."""
    text = text.strip()
    m = _TS_FULL.match(text)
    if m:
        dd, mo, yy, hh, mi, ss, frac = m.groups()
        us = int((frac or "0").ljust(6, "0"))
        return datetime(2000 + int(yy), int(mo), int(dd), int(hh), int(mi), int(ss), us)
    m = _TS_TIME.match(text)
    if m:
        hh, mi, ss, frac = m.groups()
        return time(int(hh), int(mi), int(ss), int((frac or "0").ljust(6, "0")))
    raise ValueError(f"{text!r} is not an HK timestamp DD-MM-YY_HH:MM:SS or HH:MM:SS")


def format_hk_timestamp(ts: datetime | time) -> str:
    """datetime -> ``DD-MM-YY_HH:MM:SS``; time -> ``HH:MM:SS`` (legacy)."""
    if isinstance(ts, datetime):
        if not 2000 <= ts.year <= 2099:
            raise ValueError(f"year {ts.year} cannot be written as a two-digit ELVIS year (20YY)")
        return ts.strftime("%d-%m-%y_%H:%M:%S")
    return ts.strftime("%H:%M:%S")


def _to_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _parse_metadata(line: str) -> tuple[str, Any] | None:
    parts = line.strip().lstrip("#").split()
    if not parts:
        return None
    key, value = parts[0], (parts[-1] if len(parts) > 1 else "")
    number = _to_float(value)
    return key, (value if math.isnan(number) and value.lower() != "nan" else number)


class _HKLineParser:
    """Data lines -> (timestamp, floats) for one header."""

    def __init__(self, columns: list[str]):
        self.columns = columns  # timestamp column first
        self.n = len(columns)

    def parse(self, line: str) -> tuple[datetime | time, list[float]] | str:
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) > self.n and not any(f.strip() for f in fields[self.n:]):
            fields = fields[: self.n]
        if len(fields) != self.n:
            return f"{len(fields)} fields, the header has {self.n}"
        try:
            ts = parse_hk_timestamp(fields[0])
        except ValueError:
            return f"unparsable timestamp {fields[0].strip()!r}"
        return ts, [_to_float(f) for f in fields[1:]]


def _hk_header_parser(line: str, source: str) -> tuple[HeaderMatch, _HKLineParser]:
    names = clean_header(line)
    if not names or norm_name(names[0]) not in {norm_name(t) for t in TIMESTAMP_COLUMNS}:
        raise HKFormatError(source, f"not an HK file: first column is not TimeStamp / HK_timestamp in {line.strip()[:80]!r}")
    match = match_layout(names, hk_layouts())
    if match is None or match.score < MIN_HEADER_SCORE:
        score = 0.0 if match is None else match.score
        raise HKFormatError(source, f"header row matches no known HK layout (best overlap {score:.2f} < {MIN_HEADER_SCORE})")
    if len(set(names)) != len(names):
        raise HKFormatError(source, "header row has duplicate column names")
    return match, _HKLineParser(names)


@dataclass
class HKTable:
    """A parsed HK file. ``columns`` = parameter names as in the file (timestamp column
    excluded); ``values[key]`` float arrays with NaN for missing readings; ``timestamps`` datetimes
    (6.x/7.x) or times (legacy); ``metadata`` the legacy ``#`` block; ``errors`` skipped lines."""

    source: str
    version: str
    kind: HKKind
    match: HeaderMatch
    columns: list[str]
    timestamp_column: str
    timestamps: list[datetime | time]
    values: dict[str, np.ndarray]
    metadata: dict[str, Any] = field(default_factory=dict)
    errors: list[tuple[int, str]] = field(default_factory=list)
    partial_tail: bool = False

    @property
    def n_rows(self) -> int:
        return len(self.timestamps)

    def get(self, key: str) -> np.ndarray | None:
        """A column by its file name or its 7.5.X name."""
        if key in self.values:
            return self.values[key]
        for col in self.columns:
            if canonical_hk_key(col) == key:
                return self.values[col]
        return None


def _kind_from_name(source: str) -> HKKind:
    return "daily" if classify(source) == "hk_daily" else "exposure"


def parse_hk_text(text: str, source: str = "<text>", kind: HKKind | None = None, complete: bool = False) -> HKTable:
    """Parse the content of an HK file (see the module docstring). ``kind`` defaults from the
    file name; ``complete=True`` also parses a last line without its newline."""
    lines = text.split("\n")
    tail = lines.pop()
    partial = bool(tail.strip()) and not complete
    if complete and tail.strip():
        lines.append(tail)
    header_at = next((i for i, line in enumerate(lines) if line.strip()), None)
    if header_at is None:
        raise HKFormatError(source, "no complete header row (empty file)")
    match, parser = _hk_header_parser(lines[header_at], source)
    timestamps: list[datetime | time] = []
    rows: list[list[float]] = []
    metadata: dict[str, Any] = {}
    errors: list[tuple[int, str]] = []
    for i in range(header_at + 1, len(lines)):
        line = lines[i]
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            item = _parse_metadata(line)
            if item:
                metadata[item[0]] = item[1]
            continue
        result = parser.parse(line)
        if isinstance(result, str):
            errors.append((i + 1, result))
        else:
            timestamps.append(result[0])
            rows.append(result[1])
    keys = parser.columns[1:]
    data = mask_sentinels(np.array(rows, dtype=float).reshape(len(rows), len(keys)))
    return HKTable(
        source=source, version=match.version, kind=kind or _kind_from_name(source), match=match,
        columns=keys, timestamp_column=parser.columns[0], timestamps=timestamps,
        values={k: data[:, j].copy() for j, k in enumerate(keys)}, metadata=metadata, errors=errors,
        partial_tail=partial,
    )


def read_hk(path: str | os.PathLike, kind: HKKind | None = None, complete: bool = False) -> HKTable:
    """Read an HK file of any known version; see :func:`parse_hk_text`."""
    data = Path(path).read_bytes()
    return parse_hk_text(data.decode("utf-8", errors="replace"), source=str(path), kind=kind, complete=complete)


# --------------------------------------------------------------------------------------------
# statistics and limits


def column_stats(values: np.ndarray) -> dict[str, float]:
    """mean, std (ddof 0), min, max of the finite values and their count ``n`` (NaN when n = 0)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def hk_stats(table: HKTable) -> dict[str, dict[str, float]]:
    """Per-column statistics ``{key: {mean, std, min, max, n}}`` ignoring missing readings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {k: column_stats(table.values[k]) for k in table.columns}


class HKVerdict(BaseModel):
    """Verdict of one HK key against one limit. ``key`` is the 7.5.X name, ``column`` the file's
    name; ``value_lo``/``value_hi`` the measured min/max; ``lo``/``hi`` the limits in absolute
    units (for type R: commanded + relative limits; for type I: lo = hi = the required value).
    ``passed`` is None when the key could not be checked (``reason`` says why)."""

    key: str
    column: str
    kind: Literal["P", "S"]
    type: Literal["A", "R", "I"]
    value_lo: float | None = None
    value_hi: float | None = None
    lo: float | None = None
    hi: float | None = None
    commanded: float | None = None
    passed: bool | None
    reason: str

    @property
    def status(self) -> str:
        """"pass", "fail" or "unchecked"."""
        return "unchecked" if self.passed is None else ("pass" if self.passed else "fail")


def hk_limits(kind: str) -> dict[str, list]:
    """``hk_limits_7.5.X[kind]`` (kind "P" or "S"): key -> [type, lo, hi] or ["I", value]."""
    return elvis_formats()["hk_limits_7.5.X"][kind]


def hk_to_explog() -> dict[str, str]:
    """``hk_to_explog_7.5.X``: HK key -> exposure-log column of its commanded value."""
    return elvis_formats()["hk_to_explog_7.5.X"]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _le(a: float, b: float) -> bool:
    """a <= b up to EDGE_TOLERANCE (relative to the bound)."""
    return a <= b + EDGE_TOLERANCE * max(1.0, abs(b))


def _lt(a: float, b: float, bound: float) -> bool:
    """a < b strictly, a value within EDGE_TOLERANCE of ``bound`` counting as equal to it."""
    return a < b and abs(a - b) > EDGE_TOLERANCE * max(1.0, abs(bound))


def check_hk_limits(
    stats_or_table: HKTable | Mapping[str, Mapping[str, float]],
    explog_values: Mapping[str, Any] | ExpLogRow | None = None,
    kinds: Iterable[str] = ("P", "S"),
    keys: Iterable[str] | None = None,
) -> list[HKVerdict]:
    """Check per-file statistics (or a table) against ``hk_limits_7.5.X``.

    Type A: lo < min and max < hi. Type R: same with lo/hi shifted by the commanded value of the
    exposure-log column ``hk_to_explog[key]`` taken from ``explog_values`` (a row's ``values`` or
    an :class:`ExpLogRow`); unknown commanded value -> verdict ``passed=None``. Type I: every value
    equals the required one. A value on a bound fails (lo < value < hi is required). Keys absent from the file get no verdict; keys with no
    valid reading get ``passed=None``. Legacy names are matched through :data:`HK_LEGACY_ALIASES`.
    """
    stats = hk_stats(stats_or_table) if isinstance(stats_or_table, HKTable) else stats_or_table
    if isinstance(explog_values, ExpLogRow):
        explog_values = explog_values.values
    by_key: dict[str, str] = {}
    for col in stats:
        by_key.setdefault(canonical_hk_key(col), col)
    for col in stats:  # an exact 7.5.X name wins over an alias
        by_key[col] = col
    wanted = None if keys is None else set(keys)
    mapping = hk_to_explog()
    verdicts: list[HKVerdict] = []
    for kind in kinds:
        for key, limit in hk_limits(kind).items():
            if (wanted is not None and key not in wanted) or key not in by_key:
                continue
            col = by_key[key]
            st = stats[col]
            vmin, vmax = _number(st.get("min")), _number(st.get("max"))
            ltype = limit[0]
            base = dict(key=key, column=col, kind=kind, type=ltype, value_lo=vmin, value_hi=vmax)
            if ltype == "I":
                lo = hi = float(limit[1])
            elif ltype == "A":
                lo, hi = float(limit[1]), float(limit[2])
            elif ltype == "R":
                source = mapping.get(key)
                commanded = _number((explog_values or {}).get(source)) if source else None
                if commanded is None:
                    why = (f"commanded value unknown (exposure-log column {source!r} not given)" if source
                           else "commanded value unknown (no exposure-log column mapped)")
                    verdicts.append(HKVerdict(**base, passed=None, reason=why))
                    continue
                base["commanded"] = commanded
                lo, hi = commanded + float(limit[1]), commanded + float(limit[2])
            else:
                verdicts.append(HKVerdict(**base, type="A", passed=None, reason=f"unknown limit type {ltype!r}"))
                continue
            if vmin is None or vmax is None:
                verdicts.append(HKVerdict(**base, lo=lo, hi=hi, passed=None, reason="no reading (all values missing)"))
                continue
            if ltype == "I":
                ok = _le(lo, vmin) and _le(vmax, hi)
                reason = f"== {lo:g}" if ok else f"values {vmin:g}..{vmax:g} != {lo:g}"
            else:
                below, above = not _lt(lo, vmin, lo), not _lt(vmax, hi, hi)
                ok = not (below or above)
                reason = (f"within ]{lo:g}, {hi:g}[" if ok else
                          "; ".join(([f"min {vmin:g} <= lo {lo:g}"] if below else []) + ([f"max {vmax:g} >= hi {hi:g}"] if above else [])))
            verdicts.append(HKVerdict(**base, lo=lo, hi=hi, passed=ok, reason=reason))
    return verdicts


# --------------------------------------------------------------------------------------------
# writers (simulator) and tail reader (ingest)


def hk_header(version: str = HK_LATEST) -> str:
    """The header row of an HK layout (timestamp column first), tab separated, ``\\n`` terminated."""
    return "\t".join(hk_layouts()[version]) + "\n"


def format_hk_row(timestamp: datetime | time, values: Mapping[str, Any], version: str = HK_LATEST) -> str:
    """One HK row: ``TimeStamp`` (``DD-MM-YY_HH:MM:SS``; legacy layouts ``HH:MM:SS``) then the
    layout's parameters; missing keys written empty (read back as NaN)."""
    cols = hk_layouts()[version]
    if cols[0] == "HK_timestamp" and isinstance(timestamp, datetime):
        timestamp = timestamp.time()
    cells = [format_hk_timestamp(timestamp)] + [format_cell(values.get(c)) for c in cols[1:]]
    return "\t".join(cells) + "\n"


@dataclass(frozen=True)
class HKRow:
    """One HK sample: timestamp and ``{key: value}`` (NaN = missing), keys as in the file."""

    timestamp: datetime | time
    values: dict[str, float]


class HKTail(LineTail):
    """Incremental reader of a growing (daily) HK file: ``poll()`` returns the samples completed
    since the last call. ``version`` / ``columns`` once the header row is in; ``metadata`` the
    legacy ``#`` block; ``errors`` skipped lines. Raises :class:`HKFormatError` on an
    unrecognisable header row (again at each poll until the file is replaced)."""

    def _on_reset(self) -> None:
        self.match: HeaderMatch | None = None
        self.metadata: dict[str, Any] = {}
        self._parser: _HKLineParser | None = None
        self._header_error: HKFormatError | None = None

    @property
    def version(self) -> str | None:
        return self.match.version if self.match else None

    @property
    def columns(self) -> list[str]:
        return self._parser.columns[1:] if self._parser else []

    def poll(self) -> list[HKRow]:
        """Samples completed since the previous poll (sentinels -> NaN)."""
        out: list[HKRow] = []
        for lineno, raw in self._new_lines():
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            if self._parser is None:
                if self._header_error is None:
                    try:
                        self.match, self._parser = _hk_header_parser(line, str(self.path))
                        self._header_raw = raw
                    except HKFormatError as exc:
                        self._header_error = exc
                continue
            if line.lstrip().startswith("#"):
                item = _parse_metadata(line)
                if item:
                    self.metadata[item[0]] = item[1]
                continue
            result = self._parser.parse(line)
            if isinstance(result, str):
                self.errors.append((lineno, result))
                continue
            ts, numbers = result
            masked = mask_sentinels(np.array(numbers, dtype=float))
            out.append(HKRow(ts, dict(zip(self.columns, masked.tolist()))))
        if self._header_error is not None:
            raise self._header_error
        return out


__all__ = [
    "EDGE_TOLERANCE",
    "HK_LATEST",
    "HK_LEGACY_ALIASES",
    "HKFormatError",
    "HKRow",
    "HKTable",
    "HKTail",
    "HKVerdict",
    "SENTINEL_TOLERANCE",
    "canonical_hk_key",
    "check_hk_limits",
    "column_stats",
    "format_hk_row",
    "format_hk_timestamp",
    "hk_header",
    "hk_layouts",
    "hk_limits",
    "hk_sentinels",
    "hk_stats",
    "hk_to_explog",
    "mask_sentinels",
    "parse_hk_text",
    "parse_hk_timestamp",
    "read_hk",
]
