"""Pure FPA aggregation: the latest result of each (block, test) in, one family's maps out.

No I/O here: :func:`check_result` says whether an analysis result can be aggregated (known block,
3 CCDs x 4 quadrants, numeric values), :func:`aggregate` builds a :class:`FamilyResult` (values
per quantity / block / CCD / quadrant, electrons from the latest PTC01 gain, missing FPA blocks,
the crosstalk requirement for psf, the event ids used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.metatest.families import (
    CROSSTALK_KEYS,
    GAIN_KEY,
    GAIN_TEST,
    Family,
    electron_key,
    electron_unit,
)
from services.metatest.layout import CCDS, QUADRANTS, FPALayout

#: the crosstalk requirement (per victim quadrant): dominant coupling and the secondary threshold
XTALK_MAX = 6e-4
XTALK_SECONDARY = 7.6e-5

Values = dict[str, dict[str, dict[str, float | None]]]  # {block: {CCD: {Q: value}}}


class ResultError(ValueError):
    """An analysis result that cannot be aggregated; the message names the input and the reason."""


@dataclass
class ResultRecord:
    """The latest completed result of one (block, test, repeat)."""

    block: str
    test: str  # base name (``FLAT02_730``), no repeat suffix
    repeat: int
    event_id: str
    produced_at: datetime
    results: dict[str, Any]
    products: list[str] = field(default_factory=list)  # relative to the products root

    @property
    def label(self) -> str:
        return f"{self.test}.{self.repeat}" if self.repeat else self.test


@dataclass
class QuantityInfo:
    name: str
    unit: str
    test: str
    key: str


@dataclass
class FamilyResult:
    """One family's aggregate over the blocks it has results for."""

    family: str
    blocks: list[str]  # blocks with input (FPA order, then spares)
    missing: list[str]  # FPA blocks without input
    quantities: dict[str, QuantityInfo]
    values: dict[str, Values]  # {quantity: {block: {CCD: {Q: value}}}} of every block with input
    inputs: list[str]  # event ids of the analysis results used (gains included)
    records: dict[tuple[str, str], ResultRecord]  # (block, test) -> the record used
    summary: dict[str, Any] = field(default_factory=dict)

    def maps(self, layout: FPALayout) -> dict[str, Values]:
        """The maps: every quantity over the 12 FPA blocks (missing ones all None), no spares."""
        return {name: {b: _block_values(self.values[name].get(b)) for b in layout.fpa_blocks} for name in self.quantities}

    def spare_values(self, layout: FPALayout) -> dict[str, Values]:
        return {name: {b: v for b, v in self.values[name].items() if not layout.on_fpa(b)} for name in self.quantities}


def _block_values(values: dict[str, dict[str, float | None]] | None) -> dict[str, dict[str, float | None]]:
    return {c: {q: ((values or {}).get(c) or {}).get(q) for q in QUADRANTS} for c in CCDS}


def _number(value: Any) -> float | None | str:
    """A float, None (no value: null / NaN), or the string ``"bad"`` for a non-number."""
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    return "bad"


def _expand(key: str, raw: Any) -> list[tuple[str, float | None]]:
    """``(key, value)`` of a scalar; ``(<key>_<sub>, value)`` of each entry of a mapping (a value
    per readout mode) and ``(<key>_<n>, value)`` (n from 1) of each item of a list (per fluence)."""
    if isinstance(raw, dict):
        return [(f"{key}_{sub}", v if isinstance(v := _number(x), float) else None) for sub, x in raw.items()]
    if isinstance(raw, (list, tuple)):
        return [(f"{key}_{i}", v if isinstance(v := _number(x), float) else None) for i, x in enumerate(raw, start=1)]
    value = _number(raw)
    return [(key, value if isinstance(value, float) else None)]


def _bad_value(raw: Any) -> bool:
    """Not a number, null, or a flat mapping / list of those."""
    if isinstance(raw, dict):
        return any(_number(v) == "bad" for v in raw.values())
    if isinstance(raw, (list, tuple)):
        return any(_number(v) == "bad" for v in raw)
    return _number(raw) == "bad"


def check_result(block: str, test: str, results: Any, layout: FPALayout, keys: set[str] | None = None) -> None:
    """Raise :class:`ResultError` unless ``results`` is ``{CCD1..3: {E..H: {key: value}}}`` (other
    top-level keys allowed) of a known block, with numbers (or null) for the ``keys`` present."""
    where = f"{test} of block {block!r}"
    if not layout.is_known(block):
        raise ResultError(f"{where}: unknown block {block!r} (neither on the FPA nor a spare: "
                          f"{', '.join(layout.known_blocks)})")
    if not isinstance(results, dict):
        raise ResultError(f"{where}: results must be an object {{CCD: {{Q: {{key: value}}}}}}, got {type(results).__name__}")
    extra = [k for k in results if k.upper().startswith("CCD") and k not in CCDS]
    if extra:
        raise ResultError(f"{where}: unknown CCD key(s) {', '.join(map(str, extra))} (expected {', '.join(CCDS)})")
    for ccd in CCDS:
        quads = results.get(ccd)
        if not isinstance(quads, dict):
            raise ResultError(f"{where}: missing CCD {ccd}" if quads is None else f"{where}: {ccd} is not an object")
        lacking = [q for q in QUADRANTS if not isinstance(quads.get(q), dict)]
        if lacking:
            raise ResultError(f"{where}: {ccd} lacks quadrant(s) {', '.join(lacking)}")
        for q in QUADRANTS:
            for key in keys or ():
                if key in quads[q] and _bad_value(quads[q][key]):
                    raise ResultError(f"{where}: {ccd}.{q}.{key} = {quads[q][key]!r} is not a number")
    xt = results.get("crosstalk")
    if xt is not None:
        _check_crosstalk(where, xt)


def _check_crosstalk(where: str, xt: Any) -> None:
    if not isinstance(xt, dict):
        raise ResultError(f"{where}: crosstalk must be {{source: {{victim: coefficient}}}}")
    for source, victims in xt.items():
        if not isinstance(victims, dict):
            raise ResultError(f"{where}: crosstalk[{source!r}] must be {{victim: coefficient}}")
        for victim, c in victims.items():
            if _number(c) == "bad":
                raise ResultError(f"{where}: crosstalk[{source!r}][{victim!r}] = {c!r} is not a number")


def family_keys(family: Family) -> set[str]:
    return {q.key for spec in family.tests for q in spec.quantities if q.key not in CROSSTALK_KEYS}


# --------------------------------------------------------------------------- crosstalk


def crosstalk_victims(xt: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | int | bool]]:
    """Per victim ``"CCDn.Q"``: the dominant coupling (largest |c| from any other quadrant), the number
    of other couplings above :data:`XTALK_SECONDARY`, and whether the requirement holds (dominant
    <= :data:`XTALK_MAX` and at most one other coupling above :data:`XTALK_SECONDARY`)."""
    into: dict[str, list[float]] = {}
    for source, victims in xt.items():
        for victim, c in (victims or {}).items():
            v = _number(c)
            if victim != source and isinstance(v, float):
                into.setdefault(victim, []).append(abs(v))
    out = {}
    for victim, cs in into.items():
        cs = sorted(cs, reverse=True)
        dominant = cs[0]
        n_above = sum(1 for c in cs[1:] if c > XTALK_SECONDARY)
        out[victim] = {"crosstalk_max": dominant, "crosstalk_n_above": n_above,
                       "crosstalk_ok": dominant <= XTALK_MAX and n_above <= 1}
    return out


# --------------------------------------------------------------------------- aggregation


def _gain_of(gains: dict[str, ResultRecord], block: str, ccd: str, q: str) -> float | None:
    rec = gains.get(block)
    if rec is None:
        return None
    value = _number(((rec.results.get(ccd) or {}).get(q) or {}).get(GAIN_KEY))
    return value if isinstance(value, float) and value > 0 else None


def _order(blocks: set[str], layout: FPALayout) -> list[str]:
    known = [b for b in layout.known_blocks if b in blocks]
    return known + sorted(blocks - set(known))


def aggregate(family: Family, latest: dict[tuple[str, str], ResultRecord], gains: dict[str, ResultRecord],
              layout: FPALayout) -> FamilyResult | None:
    """The family over the latest result of each (block, test) (``latest``; tests the family does
    not use are ignored) with the latest PTC01 per block (``gains``). None when no block has input."""
    records = {k: r for k, r in latest.items() if family.uses(k[1])}
    if not records:
        return None
    tests = sorted({t for _, t in records}, key=lambda t: (t != family.primary, t))
    quantities: dict[str, QuantityInfo] = {}
    values: dict[str, Values] = {}
    for test in tests:
        spec = family.spec_of(test)
        assert spec is not None
        for qty in spec.quantities:
            name = family.quantity_name(qty.key, test)
            quantities.setdefault(name, QuantityInfo(name, qty.unit, test, qty.key))
            values.setdefault(name, {})
            if qty.electrons:
                ename = family.quantity_name(electron_key(qty.key), test)
                quantities.setdefault(ename, QuantityInfo(ename, electron_unit(qty.unit), test, electron_key(qty.key)))
                values.setdefault(ename, {})
    inputs: set[str] = set()
    summary: dict[str, Any] = {}
    for (block, test), rec in sorted(records.items()):
        spec = family.spec_of(test)
        inputs.add(rec.event_id)
        xt = crosstalk_victims(rec.results["crosstalk"]) if family.crosstalk and isinstance(
            rec.results.get("crosstalk"), dict) else None
        converts = any(q.electrons for q in spec.quantities)
        if converts and block in gains:
            inputs.add(gains[block].event_id)
        for qty in spec.quantities:
            name = family.quantity_name(qty.key, test)
            ename = family.quantity_name(electron_key(qty.key), test) if qty.electrons else None
            for ccd in CCDS:
                for q in QUADRANTS:
                    if qty.key in CROSSTALK_KEYS:
                        raw = (xt or {}).get(f"{ccd}.{q}", {}).get(qty.key)
                    else:
                        raw = ((rec.results.get(ccd) or {}).get(q) or {}).get(qty.key)
                    g = _gain_of(gains, block, ccd, q) if ename else None
                    for key, value in _expand(qty.key, raw):
                        qname = family.quantity_name(key, test)
                        if qname not in quantities:  # a per-mode / per-fluence value: its own quantity
                            quantities[qname] = QuantityInfo(qname, qty.unit, test, key)
                        values.setdefault(qname, {}).setdefault(block, {}).setdefault(ccd, {})[q] = value
                        if ename:
                            ekey = electron_key(key)
                            qe = family.quantity_name(ekey, test)
                            if qe not in quantities:
                                quantities[qe] = QuantityInfo(qe, electron_unit(qty.unit), test, ekey)
                            values.setdefault(qe, {}).setdefault(block, {}).setdefault(ccd, {})[q] = (
                                value * g if value is not None and g is not None else None)
        if xt is not None:
            failing = sorted(v for v, r in xt.items() if not r["crosstalk_ok"])
            summary.setdefault("crosstalk", {}).setdefault(test, {})[block] = {
                "requirement_met": not failing, "failing_victims": failing, "victims": len(xt)}
    if family.name == "persistence":
        decay = median_decay([r for (b, _), r in records.items() if layout.on_fpa(b)])
        if decay:
            summary["median_decay"] = decay
    if "crosstalk" in summary:
        summary["crosstalk_requirement_met"] = all(
            b["requirement_met"] for per_test in summary["crosstalk"].values() for b in per_test.values())
        summary["crosstalk_limits"] = {"dominant_max": XTALK_MAX, "secondary_threshold": XTALK_SECONDARY,
                                       "secondary_max_count": 1}
    # quantities no block reports (e.g. a key an analysis does not write yet) are left out
    present = {n for n, per_block in values.items()
               if any(v is not None for ccds in per_block.values() for qs in ccds.values() for v in qs.values())}
    quantities = {n: i for n, i in quantities.items() if n in present}
    values = {n: v for n, v in values.items() if n in present}
    blocks = _order({b for b, _ in records}, layout)
    missing = [b for b in layout.fpa_blocks if b not in blocks]
    return FamilyResult(family.name, blocks, missing, quantities, values, sorted(inputs), records, summary)


def latest_per_test(records: list[ResultRecord]) -> dict[tuple[str, str], ResultRecord]:
    """``(block, test) -> record`` with the latest ``produced_at`` among the repeats of a test."""
    out: dict[tuple[str, str], ResultRecord] = {}
    for rec in records:
        key = (rec.block, rec.test)
        if key not in out or (rec.produced_at, rec.event_id) > (out[key].produced_at, out[key].event_id):
            out[key] = rec
    return out


def median_decay(records: list[ResultRecord]) -> list[dict[str, float]]:
    """PERSIST01: the median over all quadrants of the ``decay`` curves (``[{t_s, excess_adu}]``),
    point by point (n-th latent dark of every quadrant together)."""
    import statistics

    points: dict[int, list[tuple[float, float]]] = {}
    for rec in records:
        for ccd in CCDS:
            for q in QUADRANTS:
                decay = ((rec.results.get(ccd) or {}).get(q) or {}).get("decay")
                for i, p in enumerate(decay if isinstance(decay, list) else []):
                    t, x = (_number(p.get("t_s")), _number(p.get("excess_adu"))) if isinstance(p, dict) else (None, None)
                    if isinstance(t, float) and isinstance(x, float):
                        points.setdefault(i, []).append((t, x))
    return [{"t_s": statistics.median(t for t, _ in pts), "excess_adu": statistics.median(x for _, x in pts),
             "n_quadrants": len(pts)} for _, pts in sorted(points.items())]


def history_rows(family: Family, records: list[ResultRecord]) -> list[dict[str, Any]]:
    """The family's ``history`` keys in every stored result of any test (all repeats), one row per
    block / test run / CCD / quadrant, by time: e.g. offsets and RON across a block's campaign."""
    if not family.history:
        return []
    rows = []
    for rec in sorted(records, key=lambda r: (r.block, r.produced_at, r.label)):
        for ccd in CCDS:
            for q in QUADRANTS:
                values = ((rec.results.get(ccd) or {}).get(q) or {}) if isinstance(rec.results, dict) else {}
                found = {k: _number(values.get(k)) for k in family.history if k in values}
                found = {k: (v if isinstance(v, float) else None) for k, v in found.items()}
                if any(v is not None for v in found.values()):
                    rows.append({"BLOCK": rec.block, "TEST": rec.label, "PRODUCED_AT": rec.produced_at.isoformat(),
                                 "CCD": ccd, "QUAD": q, **{k: found.get(k) for k in family.history},
                                 "EVENT_ID": rec.event_id})
    return rows


def gains_of(latest: dict[tuple[str, str], ResultRecord]) -> dict[str, ResultRecord]:
    """block -> its latest PTC01 record."""
    return {b: r for (b, t), r in latest.items() if t == GAIN_TEST}


__all__ = ["FamilyResult", "QuantityInfo", "ResultError", "ResultRecord", "XTALK_MAX", "XTALK_SECONDARY",
           "aggregate", "check_result", "crosstalk_victims", "median_decay", "family_keys", "gains_of", "history_rows",
           "latest_per_test"]
