"""ELVIS exposure logs ``EXP_LOG_<DDMMYY>.txt``: read every layout of ``elvis-formats.json``
(``explog_columns``), write the 7.5.X layout, tail a log that ELVIS is still writing.

One header row, then one tab-separated row per (ObsID, CCD). The version is detected from the
header row: exact match after stripping spaces / CRLF / trailing tabs, else the closest layout by
column-name overlap (Jaccard index of the case- and space-insensitive names), reported in
:class:`HeaderMatch`. Rows keep the file's own column names in ``values`` and, for older layouts,
also the 7.5.X names where the correspondence is obvious (``Exptime`` -> ``exptime``,
``Wavelength`` -> ``wave``, ``R1CCD1TT`` -> ``R1C1_TT``...), so consumers can ask for
``exptime``, ``vstart``, ``vend``, ``wave``, ``test`` whatever the version.

Bad lines (wrong field count, unparsable ObsID / CCD / date) are skipped and listed in
``ExpLog.errors`` as ``(line number, reason)``; only an unrecognisable header raises
:class:`ExpLogFormatError`. A last line without its newline is a row still being written: it is
ignored and reported as ``partial_tail``.
"""

from __future__ import annotations

import numbers
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from pydantic import BaseModel, Field

from shared.filenames import format_elvis_date, format_fits_name, parse_elvis_date
from shared.refdata import elvis_formats

EXPLOG_LATEST = "7.5.X"
#: minimum column-name overlap (Jaccard index) for a header that matches no layout exactly
MIN_HEADER_SCORE = 0.5

Value = Union[int, float, str]


class ExpLogFormatError(ValueError):
    """An exposure log whose header row matches no known layout (names the file)."""

    def __init__(self, source: str, reason: str):
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


# --------------------------------------------------------------------------------------------
# layouts and version matching (shared with shared.hk)


def version_key(version: str) -> tuple[int, ...]:
    """Sort key of a version string ('5.7.04' < '6.5.X'; 'X' and names sort last)."""
    return tuple(int(p) if p.isdigit() else 10**6 for p in version.split("."))


def norm_name(name: str) -> str:
    """Comparison form of a column name: no spaces, lower case."""
    return "".join(name.split()).lower()


def clean_header(line: str) -> list[str]:
    """Column names of a header line: split on tabs, names stripped, trailing empty fields dropped."""
    names = [f.strip() for f in line.rstrip("\r\n").split("\t")]
    while names and not names[-1]:
        names.pop()
    return names


class HeaderMatch(BaseModel):
    """Which layout a header row matched: ``exact`` (same names, same order) or the closest one
    with ``score`` = Jaccard overlap of the names (1.0 for exact); ``equivalent`` lists every
    version with the same layout; ``missing`` / ``extra`` compare the file with that layout."""

    version: str
    exact: bool
    score: float
    equivalent: list[str] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)
    extra: list[str] = Field(default_factory=list)


def match_layout(names: Sequence[str], layouts: dict[str, list[str]]) -> HeaderMatch | None:
    """Best layout for the header ``names`` (already cleaned); None when nothing overlaps."""
    names = list(names)
    exact = [v for v, cols in layouts.items() if list(cols) == names]
    if exact:
        best = max(exact, key=version_key)
        return HeaderMatch(version=best, exact=True, score=1.0, equivalent=sorted(exact, key=version_key))
    mine = {norm_name(n) for n in names}
    scored = []
    for version, cols in layouts.items():
        theirs = {norm_name(c) for c in cols}
        union = mine | theirs
        scored.append((len(mine & theirs) / len(union) if union else 0.0, version_key(version), version))
    if not scored:
        return None
    score, _, best = max(scored)
    if score <= 0:
        return None
    cols = layouts[best]
    theirs = {norm_name(c) for c in cols}
    return HeaderMatch(
        version=best,
        exact=False,
        score=round(score, 4),
        equivalent=sorted((v for v, c in layouts.items() if list(c) == list(cols)), key=version_key),
        missing=[c for c in cols if norm_name(c) not in mine],
        extra=[n for n in names if norm_name(n) not in theirs],
    )


def explog_layouts() -> dict[str, list[str]]:
    """``explog_columns`` of ``elvis-formats.json``: version -> column names."""
    return elvis_formats()["explog_columns"]


# --------------------------------------------------------------------------------------------
# old column names -> 7.5.X names


def _build_aliases() -> dict[str, tuple[str, ...]]:
    a: dict[str, tuple[str, ...]] = {
        "Flsh-Rdout_e_time": ("fl_rdout",),
        "C.Inj-Rdout_e_time": ("ci_rdout",),
        "N_P_high": ("IPHI",),
        "Chrg_inj": ("chinj",),
        "On_cycle": ("chinj_on",),
        "Off_cycl": ("chinj_of",),
        "pls_leng": ("id_wid",),
        "pls_del": ("id_dly",),
        "TP_DW_V": ("dwell_v",),
        "TP_DW_H": ("dwell_s",),
        "TOI_flu": ("toi_fl",),
        "TOI_flsh": ("toi_fl",),
        "TOI_pump": ("toi_tp",),
        "TOI _pump": ("toi_tp",),
        "TOI_read": ("toi_ro",),
        "TOI_CInj": ("toi_ch",),
        "Invflush": ("siflsh",),
        "Invflshp": ("siflsh_p",),
        "M_Steps": ("motr_cnt",),
        "M_St_Sze": ("motr_siz",),
        "Wavelength": ("wave",),
        "ROE_SN": ("sn_roe",),
        "RPSU_SN": ("sn_rpsu",),
        "SPW_clk": ("cdpu_clk",),
        "spw_clk": ("cdpu_clk",),
        "v_tpmod": ("v_tp_mod",),
        "s_tpmod": ("s_tp_mod",),
        "motr_on": ("motr",),
        "IDL_V": ("IDL",),
        "IDH_V": ("IDH",),
        "IG1_V": tuple(f"IG1_{c}_{s}" for s in "TB" for c in (1, 2, 3)),
        "IG2_V": ("IG2_T", "IG2_B"),
        "IG2_T_V": ("IG2_T",),
        "IG2_B_V": ("IG2_B",),
        "RD_T_V": ("RD_T",),
        "RD_B_V": ("RD_B",),
    }
    for c in (1, 2, 3):
        a[f"CCD{c}_SN"] = (f"sn_ccd{c}",)
        a[f"ODCCD{c}_V"] = (f"OD_{c}_T", f"OD_{c}_B")
        for s in "TB":
            a[f"R1CCD{c}T{s}"] = (f"R1C{c}_T{s}",)
            a[f"IG1_{s}{c}_V"] = (f"IG1_{c}_{s}",)
            a[f"OD_{s}{c}_V"] = (f"OD_{c}_{s}",)
    return a


#: old exposure-log column name -> 7.5.X name(s) it is the same quantity as
EXPLOG_ALIASES: dict[str, tuple[str, ...]] = _build_aliases()


def canonical_names(name: str) -> tuple[str, ...]:
    """7.5.X name(s) of an exposure-log column of any version (empty when none is obvious)."""
    latest = explog_layouts()[EXPLOG_LATEST]
    if name in latest:
        return ()
    if name in EXPLOG_ALIASES:
        return EXPLOG_ALIASES[name]
    low = {c.lower(): c for c in latest}
    return (low[name.lower()],) if name.lower() in low else ()


# --------------------------------------------------------------------------------------------
# rows


_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_UNIT_RE = re.compile(r"^(?:CCD|ROE)?\s*(\d+)$", re.IGNORECASE)
_FILE_UNITS_RE = re.compile(r"_ROE(\d+)_CCD(\d+)(?:\.fits)?$")


def parse_value(text: str) -> Value:
    """A cell as int or float when it reads as a number, else the stripped string."""
    text = text.strip()
    if _INT_RE.match(text):
        return int(text)
    if _FLOAT_RE.match(text):
        return float(text)
    return text


class ExpLogRow(BaseModel):
    """One exposure-log row = one (ObsID, CCD). ``ccd`` / ``roe`` are None only for the FPA
    layout when the file name does not say. ``values`` has every column under the file's name
    (numbers parsed) plus the 7.5.X names of old columns."""

    obsid: int
    file_name: str
    ccd: int | None = Field(default=None, ge=1, le=3)
    roe: int | None = None
    date: datetime
    test: str = ""
    program: str = ""
    values: dict[str, Value] = Field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """A column by its file name or 7.5.X name."""
        return self.values.get(key, default)


class _RowParser:
    """Turns data lines into rows for one header (the stateless part of reading a log)."""

    def __init__(self, columns: list[str]):
        self.columns = columns
        low = {c.lower(): c for c in columns}
        self.col = {k: low.get(k) for k in ("obsid", "file_name", "ccd", "roe", "date", "test", "program")}
        self.aliases = [(c, canonical_names(c)) for c in columns]
        taken = set(columns)
        self.aliases = [(c, tuple(a for a in al if a not in taken)) for c, al in self.aliases]
        self.aliases = [(c, al) for c, al in self.aliases if al]

    def parse(self, line: str) -> ExpLogRow | str:
        """A row, or the reason the line is unusable."""
        fields = line.rstrip("\r\n").split("\t")
        n = len(self.columns)
        if len(fields) > n and not any(f.strip() for f in fields[n:]):
            fields = fields[:n]
        if len(fields) != n:
            return f"{len(fields)} fields, the header has {n}"
        raw = {c: f.strip() for c, f in zip(self.columns, fields)}
        values: dict[str, Value] = {c: parse_value(v) for c, v in raw.items()}
        obsid = values.get(self.col["obsid"]) if self.col["obsid"] else None
        if not isinstance(obsid, int):
            return f"unparsable ObsID {raw.get(self.col['obsid'] or '', '')!r}"
        file_name = raw.get(self.col["file_name"] or "", "")
        ccd = roe = None
        units = _FILE_UNITS_RE.search(file_name)
        for key in ("ccd", "roe"):
            text = raw.get(self.col[key] or "", "")
            if self.col[key] is None:
                if units:
                    unit = int(units.group(2 if key == "ccd" else 1))
                else:
                    continue
            else:
                m = _UNIT_RE.match(text)
                if not m:
                    return f"unparsable {key.upper()} {text!r}"
                unit = int(m.group(1))
            if key == "ccd" and not 1 <= unit <= 3:
                return f"CCD {unit} is not 1..3"
            if key == "ccd":
                ccd = unit
            else:
                roe = unit
        date_text = raw.get(self.col["date"] or "", "")
        try:
            date = parse_elvis_date(date_text)
        except ValueError:
            return f"unparsable date {date_text!r}"
        for col, names in self.aliases:
            for name in names:
                values.setdefault(name, values[col])
        return ExpLogRow(
            obsid=obsid,
            file_name=file_name,
            ccd=ccd,
            roe=roe,
            date=date,
            test=raw.get(self.col["test"] or "", ""),
            program=raw.get(self.col["program"] or "", ""),
            values=values,
        )


def _header_parser(line: str, source: str) -> tuple[HeaderMatch, _RowParser]:
    names = clean_header(line)
    if not any(norm_name(n) == "obsid" for n in names):
        raise ExpLogFormatError(source, f"not an exposure log: no ObsID column in the header row {line.strip()[:80]!r}")
    match = match_layout(names, explog_layouts())
    if match is None or match.score < MIN_HEADER_SCORE:
        score = 0.0 if match is None else match.score
        raise ExpLogFormatError(
            source, f"header row matches no known exposure-log layout (best overlap {score:.2f} < {MIN_HEADER_SCORE})"
        )
    if len(set(names)) != len(names):
        raise ExpLogFormatError(source, "header row has duplicate column names")
    return match, _RowParser(names)


class ExpLog(BaseModel):
    """A parsed exposure log. ``version`` is ``match.version``; ``columns`` the file's names;
    ``errors`` the skipped lines as (line number from 1, reason)."""

    source: str
    version: str
    match: HeaderMatch
    columns: list[str]
    rows: list[ExpLogRow]
    partial_tail: bool = False
    errors: list[tuple[int, str]] = Field(default_factory=list)

    @property
    def obsids(self) -> list[int]:
        """Distinct ObsIDs, sorted."""
        return sorted({r.obsid for r in self.rows})

    def rows_of(self, obsid: int) -> list[ExpLogRow]:
        """The rows (one per CCD) of one ObsID."""
        return [r for r in self.rows if r.obsid == obsid]


def parse_explog_text(text: str, source: str = "<text>", complete: bool = False) -> ExpLog:
    """Parse the content of an exposure log (see the module docstring).

    ``complete=True`` also parses a last line that lacks its newline (a file known to be final)."""
    lines = text.split("\n")
    tail = lines.pop()  # '' when the text ends with a newline
    partial = bool(tail.strip()) and not complete
    if complete and tail.strip():
        lines.append(tail)
    header_at = next((i for i, line in enumerate(lines) if line.strip()), None)
    if header_at is None:
        raise ExpLogFormatError(source, "no complete header row (empty file)")
    match, parser = _header_parser(lines[header_at], source)
    rows: list[ExpLogRow] = []
    errors: list[tuple[int, str]] = []
    for i in range(header_at + 1, len(lines)):
        line = lines[i]
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        result = parser.parse(line)
        if isinstance(result, str):
            errors.append((i + 1, result))
        else:
            rows.append(result)
    return ExpLog(
        source=source, version=match.version, match=match, columns=parser.columns, rows=rows,
        partial_tail=partial, errors=errors,
    )


def read_explog(path: str | os.PathLike, complete: bool = False) -> ExpLog:
    """Read an exposure log of any known version; see :func:`parse_explog_text`."""
    data = Path(path).read_bytes()
    return parse_explog_text(data.decode("utf-8", errors="replace"), source=str(path), complete=complete)


def merge_explogs(logs: Iterable[ExpLog | str | os.PathLike]) -> ExpLog:
    """Merge several logs (ExpLog objects or paths): one row per (ObsID, CCD) - a later log wins -
    sorted by (ObsID, CCD). ``version`` is the common version or ``"mixed"``; errors carry their
    file name in the reason."""
    merged: dict[tuple[int, int], ExpLogRow] = {}
    columns: list[str] = []
    versions: list[str] = []
    errors: list[tuple[int, str]] = []
    partial = False
    matches: list[HeaderMatch] = []
    sources: list[str] = []
    for log in logs:
        if not isinstance(log, ExpLog):
            log = read_explog(log)
        versions.append(log.version)
        matches.append(log.match)
        sources.append(log.source)
        partial |= log.partial_tail
        columns.extend(c for c in log.columns if c not in columns)
        errors.extend((line, f"{log.source}: {reason}") for line, reason in log.errors)
        for row in log.rows:
            merged[(row.obsid, row.ccd or 0)] = row
    if not versions:
        raise ValueError("merge_explogs: no exposure log given")
    same = len(set(versions)) == 1
    match = matches[0] if same else HeaderMatch(version="mixed", exact=False, score=min(m.score for m in matches))
    return ExpLog(
        source="+".join(sources), version=versions[0] if same else "mixed", match=match, columns=columns,
        rows=[merged[k] for k in sorted(merged)], partial_tail=partial, errors=errors,
    )


# --------------------------------------------------------------------------------------------
# writers (simulator)


def explog_header(version: str = EXPLOG_LATEST) -> str:
    """The header row of a layout, tab separated, ``\\n`` terminated."""
    return "\t".join(explog_layouts()[version]) + "\n"


def format_cell(value: Any) -> str:
    """One cell as ELVIS writes it: numbers as text, datetimes as DDMMYYDHHMMSST, None as ''."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, datetime):
        return format_elvis_date(value)
    if isinstance(value, float):
        return repr(float(value))  # float(): numpy 2 reprs np.float64 as 'np.float64(..)'
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalar
        return format_cell(value.item())
    return str(value).replace("\t", " ").replace("\r", " ").replace("\n", " ")


def format_explog_row(values: dict[str, Any], version: str = EXPLOG_LATEST) -> str:
    """One row in a layout (tab separated, ``\\n`` terminated). Keys are the layout's names or
    their 7.5.X names; missing keys are written empty. ``CCD``/``ROE`` given as ints are written
    ``CCD<c>``/``ROE<r>``; a missing ``File_name`` is made from ObsID, date, ROE and CCD."""
    cols = explog_layouts()[version]
    low = {k.lower(): v for k, v in values.items()}

    def lookup(col: str) -> Any:
        if col in values:
            return values[col]
        for name in canonical_names(col):
            if name in values:
                return values[name]
        return low.get(col.lower())

    cells = []
    for col in cols:
        value = lookup(col)
        if col in ("CCD", "ROE") and isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = f"{col}{int(value)}"
        if col == "File_name" and value in (None, ""):
            try:
                date = lookup("date")
                date = parse_elvis_date(date) if isinstance(date, str) else date
                ccd, roe = (int(str(lookup(k)).upper().removeprefix(k)) for k in ("CCD", "ROE"))
                value = format_fits_name(int(lookup("ObsID")), date, roe, ccd)[: -len(".fits")]
            except (TypeError, ValueError):
                value = ""
        cells.append(format_cell(value))
    return "\t".join(cells) + "\n"


# --------------------------------------------------------------------------------------------
# tailing a growing file


class LineTail:
    """Base of the tail readers: hands out each newly *completed* line of a growing text file
    once. Remembers the byte offset; starts again from the top when the file is replaced (other
    inode, shorter than the offset, or a different header line)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.errors: list[tuple[int, str]] = []
        self._reset()

    def _reset(self) -> None:
        self.offset = 0
        self.lineno = 0
        self.partial_tail = False
        self._ident: tuple[int, int] | None = None
        self._header_raw: bytes | None = None
        self.errors = []
        self._on_reset()

    def _on_reset(self) -> None:  # subclasses forget their header here
        pass

    def _new_lines(self) -> list[tuple[int, bytes]]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return []
        ident = (st.st_dev, st.st_ino)
        with open(self.path, "rb") as f:
            replaced = self._ident is not None and (ident != self._ident or st.st_size < self.offset)
            if not replaced and self._header_raw is not None:
                replaced = f.read(len(self._header_raw)) != self._header_raw
            if replaced:
                self._reset()
            self._ident = ident
            f.seek(self.offset)
            data = f.read()
        cut = data.rfind(b"\n")
        self.partial_tail = bool(data[cut + 1:].strip())
        if cut < 0:
            return []
        out = []
        for raw in data[: cut + 1].split(b"\n")[:-1]:  # "\n" only, as parse_explog_text (a lone "\r" is data)
            raw += b"\n"
            self.lineno += 1
            out.append((self.lineno, raw))
        self.offset += cut + 1
        return out


class ExpLogTail(LineTail):
    """Incremental reader of an exposure log being written: ``poll()`` returns the rows completed
    since the last call. ``version`` / ``match`` / ``columns`` once the header row is in;
    ``errors`` holds skipped lines. Raises :class:`ExpLogFormatError` when the header row is
    unrecognisable (again at each poll until the file is replaced)."""

    def _on_reset(self) -> None:
        self.match: HeaderMatch | None = None
        self._parser: _RowParser | None = None
        self._header_error: ExpLogFormatError | None = None

    @property
    def version(self) -> str | None:
        return self.match.version if self.match else None

    @property
    def columns(self) -> list[str]:
        return self._parser.columns if self._parser else []

    def poll(self) -> list[ExpLogRow]:
        """Rows completed since the previous poll (an empty list when none)."""
        rows: list[ExpLogRow] = []
        for lineno, raw in self._new_lines():
            line = raw.decode("utf-8", errors="replace")
            if not line.strip():
                continue
            if self._parser is None:
                if self._header_error is None:
                    try:
                        self.match, self._parser = _header_parser(line, str(self.path))
                        self._header_raw = raw
                        continue
                    except ExpLogFormatError as exc:
                        self._header_error = exc
                continue
            if line.lstrip().startswith("#"):
                continue
            result = self._parser.parse(line)
            if isinstance(result, str):
                self.errors.append((lineno, result))
            else:
                rows.append(result)
        if self._header_error is not None:
            raise self._header_error
        return rows


__all__ = [
    "EXPLOG_ALIASES",
    "EXPLOG_LATEST",
    "ExpLog",
    "ExpLogFormatError",
    "ExpLogRow",
    "ExpLogTail",
    "HeaderMatch",
    "LineTail",
    "canonical_names",
    "clean_header",
    "explog_header",
    "explog_layouts",
    "format_cell",
    "format_explog_row",
    "match_layout",
    "merge_explogs",
    "parse_explog_text",
    "parse_value",
    "read_explog",
]
