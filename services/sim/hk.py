"""Simulated housekeeping (HK, 7.5.X): values near nominal with noise, and out-of-limit injection.

Nominal values derive from the performance (P) limits of ``hk_limits_7.5.X``: type R keys sit at
the value commanded in the exposure log (through ``hk_to_explog``), type A keys at the middle of
their range, type I keys at their identity value (no noise). Noise is 2 % of the half-width of the
P range (R/A keys), so nominal samples never leave their limits (> 40 sigma).
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta
from typing import Any, Mapping

import numpy as np
from pydantic import BaseModel, Field

from shared.refdata import elvis_formats

NOISE_FRACTION = 0.02  # of the P half-width
OOL_MARGIN = 0.5  # "hi"/"lo" injection: beyond the P limit by this fraction of the half-width (min 0.5 unit)


def hk_keys() -> list[str]:
    """The 7.5.X HK parameters (without the TimeStamp column)."""
    return list(elvis_formats()["hk_columns"]["7.5.X"][1:])


def _limits() -> dict[str, list]:
    return elvis_formats()["hk_limits_7.5.X"]["P"]


def _commanded(key: str, explog_values: Mapping[str, Any]) -> float | None:
    column = elvis_formats()["hk_to_explog_7.5.X"].get(key)
    if column is None or column not in explog_values:
        return None
    try:
        return float(explog_values[column])
    except (TypeError, ValueError):
        return None


def nominal_hk(explog_values: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """``{key: (nominal value, noise sigma)}`` for every 7.5.X HK parameter."""
    out: dict[str, tuple[float, float]] = {}
    limits = _limits()
    for key in hk_keys():
        limit = limits.get(key)
        if limit is None:
            out[key] = (0.0, 0.0)
        elif limit[0] == "I":
            out[key] = (float(limit[1]), 0.0)
        elif limit[0] == "R":
            commanded = _commanded(key, explog_values)
            half = (limit[2] - limit[1]) / 2
            centre = (commanded or 0.0) + (limit[1] + limit[2]) / 2
            out[key] = (centre, NOISE_FRACTION * half)
        else:
            half = (limit[2] - limit[1]) / 2
            out[key] = ((limit[1] + limit[2]) / 2, NOISE_FRACTION * half)
    return out


def out_of_limit_value(key: str, side: str, explog_values: Mapping[str, Any]) -> float:
    """A value beyond the P limit of ``key`` on ``side`` ("hi" or "lo")."""
    limit = _limits().get(key)
    if limit is None:
        raise KeyError(f"HK key {key!r} has no limits (known: {', '.join(hk_keys())})")
    if limit[0] == "I":
        return float(limit[1]) + (1.0 if side == "hi" else -1.0)
    base = (_commanded(key, explog_values) or 0.0) if limit[0] == "R" else 0.0
    half = (limit[2] - limit[1]) / 2
    margin = max(OOL_MARGIN * half, 0.5)
    return base + (limit[2] + margin if side == "hi" else limit[1] - margin)


_OOL_RE = re.compile(r"^(?P<key>[^:=@]+)[:=](?P<value>[^@]+)(?:@(?P<when>.+))?$")


class HKInjection(BaseModel):
    """Push HK ``key`` to ``value`` (a number, or "hi"/"lo": just beyond the P limit) from ObsID
    ``from_obsid`` (to ``to_obsid`` inclusive) or from ``from_s`` seconds after the run start."""

    key: str
    value: float | str
    from_obsid: int | None = None
    to_obsid: int | None = None
    from_s: float | None = None
    spec: str = Field("", description="the text it was parsed from")

    def active(self, obsid: int, seconds_from_start: float) -> bool:
        if self.from_s is not None:
            return seconds_from_start >= self.from_s
        if self.from_obsid is not None and obsid < self.from_obsid:
            return False
        if self.to_obsid is not None and obsid > self.to_obsid:
            return False
        return True

    def resolve(self, explog_values: Mapping[str, Any]) -> float:
        if isinstance(self.value, str):
            return out_of_limit_value(self.key, self.value, explog_values)
        return float(self.value)


def parse_hk_injection(text: str) -> HKInjection:
    """``KEY:VALUE[@WHEN]``; VALUE a number or ``hi``/``lo``; WHEN ``N`` (from ObsID N on),
    ``N-M`` (ObsIDs N..M) or ``tS`` / ``+S`` (from S seconds after the run start); no WHEN = always.
    Raises ValueError naming the problem."""
    m = _OOL_RE.match(text.strip())
    if not m:
        raise ValueError(f"--hk-ool {text!r}: expected KEY:VALUE[@OBSID|@OBSID-OBSID|@tSECONDS]")
    key, value, when = m.group("key").strip(), m.group("value").strip(), m.group("when")
    if key not in hk_keys():
        raise ValueError(f"--hk-ool {text!r}: unknown HK key {key!r}")
    parsed: float | str
    if value.lower() in ("hi", "lo"):
        parsed = value.lower()
    else:
        try:
            parsed = float(value)
        except ValueError:
            raise ValueError(f"--hk-ool {text!r}: value must be a number, 'hi' or 'lo'") from None
    inj = HKInjection(key=key, value=parsed, spec=text)
    if when:
        when = when.strip()
        try:
            if when[0] in "t+":
                inj.from_s = float(when[1:])
            elif "-" in when:
                a, b = when.split("-", 1)
                inj.from_obsid, inj.to_obsid = int(a), int(b)
            else:
                inj.from_obsid = int(when)
        except ValueError:
            raise ValueError(f"--hk-ool {text!r}: WHEN must be OBSID, OBSID-OBSID or tSECONDS") from None
    return inj


def sample_times(start: datetime, duration_s: float, period_s: float) -> list[datetime]:
    """Sample times of one frame: every ``period_s`` from ``start`` while inside the frame
    (at least one), whole seconds (HK timestamps have a 1 s resolution)."""
    n = max(1, int(math.ceil(duration_s / period_s - 1e-9)))
    out = []
    for k in range(n):
        t = start + timedelta(seconds=int(round(k * period_s)))
        if not out or t > out[-1]:
            out.append(t)
    return out


def hk_samples(
    times: list[datetime],
    explog_values: Mapping[str, Any],
    rng: np.random.Generator,
    obsid: int,
    run_start: datetime,
    injections: list[HKInjection] = (),
) -> list[tuple[datetime, dict[str, float | int]]]:
    """HK rows ``(timestamp, {key: value})`` at ``times`` for one exposure."""
    nominal = nominal_hk(explog_values)
    keys = list(nominal)
    centre = np.array([nominal[k][0] for k in keys])
    sigma = np.array([nominal[k][1] for k in keys])
    limits = _limits()
    integer = {k for k in keys if limits.get(k, ["A"])[0] == "I"}
    rows = []
    for t in times:
        vals = centre + sigma * rng.standard_normal(len(keys))
        row: dict[str, float | int] = {}
        for k, v in zip(keys, vals):
            row[k] = int(round(v)) if k in integer else round(float(v), 3)
        elapsed = (t - run_start).total_seconds()
        for inj in injections:
            if inj.active(obsid, elapsed):
                v = inj.resolve(explog_values)
                row[inj.key] = int(round(v)) if inj.key in integer else round(v, 3)
        rows.append((t, row))
    return rows


#: exposure-log temperature column -> HK key
EXPLOG_TEMPERATURES = {f"R1C{c}_T{s}": f"CCD{c}_TEMP_{s}" for c in (1, 2, 3) for s in ("T", "B")}


def mean_temperatures(rows: list[tuple[datetime, Mapping[str, float]]]) -> dict[str, float]:
    """Exposure-log CCD temperatures (R1C<c>_T<T|B>, degC): means of the HK samples."""
    return {col: round(float(np.mean([r[key] for _, r in rows])), 2) for col, key in EXPLOG_TEMPERATURES.items()}
