"""The documentation of every analysis result key, generated from the families' result models
(``Family.result``: ``results[CCD][Q]``; ``Family.test_result``: the test-level keys), so that it
never drifts from the code. ``vison schemas --result-keys FILE`` writes it (``docs/results.md`` in
the repository; a test checks that the committed file is up to date)."""

from __future__ import annotations

import re
import typing
from typing import Any

from pydantic import BaseModel

#: Unit of a key from its suffix (families.md: units in the key names), longest suffix first.
UNIT_SUFFIXES = (
    ("_adu_per_v", "ADU/V"), ("_adu_per_row", "ADU/row"), ("_per_v", "1/V"), ("_adu_s", "ADU/s"), ("_e_s", "e-/s"), ("_err_us", "us"),
    ("_err_mm", "mm"), ("_err_v", "V"), ("_err_adu", "ADU"), ("_adu", "ADU"), ("_e2", "e-^2"), ("_e", "e-"),
    ("_v", "V"), ("_px", "px"), ("_mm", "mm"), ("_us", "us"), ("_pct", "%"), ("_s", "s"),
)


def unit_of(key: str) -> str:
    """The unit a key's suffix names ('' when none: dimensionless or stated in its description)."""
    base = key[: -len("_err")] if key.endswith("_err") else key
    for suffix, unit in UNIT_SUFFIXES:
        if base.endswith(suffix):
            return unit
    return ""


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    text = text or str(annotation).replace("typing.", "")
    return re.sub(r"\bNoneType\b", "None", text)


def model_rows(model: type[BaseModel]) -> list[tuple[str, str, str, str]]:
    """``(key, type, unit, meaning)`` of every field of a result model."""
    out = []
    fields = model.model_fields
    for name, field in fields.items():
        meaning = field.description or (f"1-sigma error of `{name[:-4]}`" if name.endswith("_err") and name[:-4] in fields else "")
        out.append((name, _type_name(field.annotation).replace("|", "or"), unit_of(name), meaning.replace("|", "\\|")))
    return out


def families() -> list[Any]:
    """The analysis families (engine v2 plug-ins), each once, by name."""
    from services.analyzer import registry

    table, _ = registry.plugins()
    unique = {f.name: f for f in table.values() if hasattr(f, "result")}
    return [unique[k] for k in sorted(unique)]


def markdown() -> str:
    """The whole document (markdown)."""
    lines = [
        "# Analysis result keys",
        "",
        "Generated from the families' result models (`services/analyzer/families/`) by",
        "`vison schemas --result-keys docs/results.md`; do not edit by hand. `results.json` and",
        "`analysis.completed` hold `results[<CCD>][<Q>][<key>]` (CCD1..3, quadrants E F G H) and, for some",
        "tests, test-level keys. Units come from the key suffix (`_adu` ADU, `_e` electrons, `_v` V, `_px`",
        "pixels, `_mm` mm, `_us` microseconds, `_s` seconds, `_pct` per cent, `_adu_s` ADU/s, `_e_s` e-/s);",
        "`<key>_err` is the 1-sigma error of `<key>`; `null` means not measured (see the flags).",
        "",
    ]
    for fam in families():
        lines += [f"## {fam.name}: {', '.join(fam.tests)}", ""]
        for title, model in (("per CCD and quadrant", fam.result), ("test level", getattr(fam, "test_result", None))):
            if model is None:
                if title.startswith("per"):
                    lines += ["(no result model declared)", ""]
                continue
            lines += [f"{title} (`{model.__name__}`):", "", "| key | type | unit | meaning |", "|---|---|---|---|"]
            lines += [f"| `{k}` | {t} | {u} | {d} |" for k, t, u, d in model_rows(model)]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def undocumented() -> list[str]:
    """``family.key`` of every result field without a description."""
    out = []
    for fam in families():
        for model in (fam.result, getattr(fam, "test_result", None)):
            if model is None:
                continue
            fields = model.model_fields
            out += [f"{fam.name}.{name}" for name, field in fields.items()
                    if not field.description and not (name.endswith("_err") and name[:-4] in fields)]
    return out
