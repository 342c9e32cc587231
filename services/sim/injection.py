"""Charge injection and trap pumping in the simulator (families.md, "Charge injection", "Trap
pumping"). Pure functions on canonical quadrant arrays (e-); the per-quadrant truth is drawn by
:class:`services.sim.physics.DetectorModel` and recorded in ``truth.json``.

Injection: line ``y`` of the readout window is injected when ``(y - vstart) mod (chinj_on +
chinj_of) < chinj_on``; the half of the CCD whose injection delay is right (``id_dly / toi_ch`` in
(1, 2]: G and H; otherwise E and F, so that the campaign's two delays (1250 and 750 us
at the default 1000 us phase time) cover both halves) gets
``expit(k (IG1 - x_T)) (N + S max(0, x_N - IG1))`` ADU with per-quadrant threshold
``x_T = IDL - 7.5 + dx_T``, notch ``x_N = IG2 + dx_N``, slope S and floor N; the other half a low,
strongly non-uniform level (unusable); a fixed column-to-column non-uniformity of a few per cent;
``id_wid < 10`` injects nothing. Shot noise comes from the physics chain.

Trap pumping is simulated cycle by cycle in distribution: the number of electrons a trap moves
in N cycles is a binomial draw ``Bin(N, p)`` with the per-cycle probability ``p = Pc (exp(-t/tau)
- exp(-2 t/tau))`` (vertical, phase time t) or ``Pc (1 - exp(-t/tau))`` (serial, t = dwell +
4.75 us); which modes pump a trap, and in which direction, depends on the clock phase it sits
under (:func:`vertical_polarity`, :func:`serial_polarity`).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping

import numpy as np
from pydantic import BaseModel, Field

from shared.geometry import IMAGE_COLS, IMAGE_ROWS

SERIAL_TRANSFER_US = 4.75


class InjectionTruth(BaseModel):
    """Charge-injection response of one quadrant (well-injected half)."""

    dx_threshold_v: float = Field(description="threshold x_T = IDL - 7.5 + this (V)")
    dx_notch_v: float = Field(description="notch x_N = IG2 + this (V)")
    slope_adu_per_v: float
    floor_adu: float = 600.0
    steepness_per_v: float = 15.0
    column_nonuniformity_pct: float = 4.0


class VerticalTrap(BaseModel):
    """A trap of the image area: pixel (x image column, y image row; canonical), the clock phase
    it sits under (1..4), emission time constant (us), capture probability."""

    x: int
    y: int
    phase: int
    tau_us: float
    pc: float


class SerialTrap(BaseModel):
    """A trap of the serial register under image column ``x`` (canonical), serial phase 1..3."""

    x: int
    phase: int
    tau_us: float
    pc: float


def draw_injection(rng: np.random.Generator) -> InjectionTruth:
    return InjectionTruth(dx_threshold_v=round(float(rng.uniform(-0.3, 0.3)), 4), dx_notch_v=round(float(rng.uniform(-0.2, 0.2)), 4),
                          slope_adu_per_v=round(float(6000.0 * rng.uniform(0.9, 1.1)), 2))


def draw_traps(rng: np.random.Generator, n_vertical: int, n_serial: int) -> tuple[list[VerticalTrap], list[SerialTrap]]:
    """A trap population: vertical tau log-uniform 50 us..10 ms, Pc 0.05..1; serial tau 1..30 us.
    Traps keep 3 pixels from the image edges and from each other along their column."""
    vertical: list[VerticalTrap] = []
    used: set[tuple[int, int]] = set()
    while len(vertical) < n_vertical:
        x, y = int(rng.integers(3, IMAGE_COLS - 3)), int(rng.integers(3, IMAGE_ROWS - 3))
        if any((x, y + d) in used for d in range(-3, 4)):
            continue
        used.add((x, y))
        vertical.append(VerticalTrap(x=x, y=y, phase=int(rng.integers(1, 5)), tau_us=round(float(math.exp(rng.uniform(math.log(50), math.log(1e4)))), 3),
                                     pc=round(float(rng.uniform(0.05, 1.0)), 4)))
    serial: list[SerialTrap] = []
    cols: set[int] = set()
    while len(serial) < n_serial:
        x = int(rng.integers(3, IMAGE_COLS - 3))
        if any(x + d in cols for d in range(-3, 4)):
            continue
        cols.add(x)
        serial.append(SerialTrap(x=x, phase=int(rng.integers(1, 4)), tau_us=round(float(math.exp(rng.uniform(0.0, math.log(30.0)))), 4),
                                 pc=round(float(rng.uniform(0.05, 1.0)), 4)))
    return vertical, serial


def _num(values: Mapping[str, Any], key: str, default: float) -> float:
    try:
        v = values.get(key, default)
        return float(v) if v not in (None, "") else default
    except (TypeError, ValueError):
        return default


def well_injected(values: Mapping[str, Any]) -> tuple[str, ...]:
    """Quadrants that inject well for this frame's injection delay (module docstring)."""
    ratio = _num(values, "id_dly", 1500.0) / max(_num(values, "toi_ch", 1000.0), 1e-9)
    return ("G", "H") if 1.0 < ratio <= 2.0 else ("E", "F")


def injected_lines(values: Mapping[str, Any], rows: int = IMAGE_ROWS) -> np.ndarray:
    """Boolean per canonical image row: injected when ``(y - vstart) mod (on + off) < on``."""
    on, off = int(_num(values, "chinj_on", 30)), int(_num(values, "chinj_of", 100))
    vstart = int(_num(values, "vstart", 0))
    y = np.arange(rows) - vstart
    period = max(on + off, 1)
    return (np.mod(y, period) < on) & (y >= 0)


def injection_level_adu(values: Mapping[str, Any], q: str, ccd: int, truth: InjectionTruth) -> float:
    """Mean injected level (ADU) of the well-injected half (module docstring)."""
    if _num(values, "id_wid", 100.0) < 10:
        return 0.0
    side = "T" if q in ("E", "F") else "B"
    ig1 = _num(values, f"IG1_{ccd}_{side}", _num(values, "IG1", 6.0))
    ig2 = _num(values, f"IG2_{side}", _num(values, "IG2", 2.0))
    idl = _num(values, "IDL", 13.0)
    x_t = idl - 7.5 + truth.dx_threshold_v
    x_n = ig2 + truth.dx_notch_v
    z = truth.steepness_per_v * (ig1 - x_t)
    expit = 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0
    return expit * (truth.floor_adu + truth.slope_adu_per_v * max(0.0, x_n - ig1))


def injection_charge(values: Mapping[str, Any], q: str, ccd: int, truth: InjectionTruth, gain: float,
                     column_profile: np.ndarray, poor_profile: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """Expected injected charge (e-) of a quadrant's image area and what was injected."""
    level = injection_level_adu(values, q, ccd, truth)
    good = q in well_injected(values)
    lines = injected_lines(values)
    profile = column_profile if good else poor_profile
    level_used = level if good else 0.25 * level
    lam = (lines[:, None] * profile[None, :] * np.float32(level_used * gain)).astype(np.float32)
    return lam, {"injection_adu": level_used, "injection_expected_adu": level, "well_injected": good,
                 "injection_lines": {"on": int(_num(values, "chinj_on", 30)), "off": int(_num(values, "chinj_of", 100))}}


def vertical_polarity(mode: int | str, phase: int) -> Literal["S", "N"] | None:
    """Direction a mode pumps a trap under ``phase``: the mode's first phase -> towards the
    serial register (the lower pixel is brighter: ``S``), its last -> away (``N``), its middle
    phase or a phase not in the mode -> not pumped."""
    digits = [int(c) for c in str(int(mode))]
    if phase == digits[0]:
        return "S"
    if phase == digits[-1]:
        return "N"
    return None


def serial_polarity(mode: int | str, phase: int) -> Literal["W", "E"] | None:
    """Serial modes 23 / 31: the mode's first phase -> towards the readout node (``W``), the
    second -> away (``E``); other phases not pumped."""
    digits = [int(c) for c in str(int(mode))]
    if phase == digits[0]:
        return "W"
    if phase == digits[-1]:
        return "E"
    return None


def vertical_probability(t_us: float, tau_us: float, pc: float) -> float:
    return pc * (math.exp(-t_us / tau_us) - math.exp(-2.0 * t_us / tau_us))


def serial_probability(dwell_us: float, tau_us: float, pc: float) -> float:
    return pc * (1.0 - math.exp(-(dwell_us + SERIAL_TRANSFER_US) / tau_us))


def pump_vertical(charge: np.ndarray, traps: list[VerticalTrap], mode: int, toi_us: float, cycles: int,
                  rng: np.random.Generator) -> int:
    """Move the pumped charge of every trap pumped by ``mode`` (in place, e-): a binomial number
    of electrons from the trap's pixel into its neighbour along the column. Returns the number of
    traps pumped."""
    n = 0
    for tr in traps:
        pol = vertical_polarity(mode, tr.phase)
        if pol is None:
            continue
        moved = float(rng.binomial(cycles, vertical_probability(toi_us, tr.tau_us, tr.pc)))
        moved = min(moved, float(max(charge[tr.y, tr.x], 0.0)))
        dest = tr.y - 1 if pol == "S" else tr.y + 1
        charge[tr.y, tr.x] -= moved
        charge[dest, tr.x] += moved
        n += 1
    return n


def pump_serial(charge: np.ndarray, traps: list[SerialTrap], mode: int, dwell_us: float, cycles: int, rows: slice,
                rng: np.random.Generator) -> int:
    """Serial pumping (in place, e-): every row read gets its own binomial draw of electrons moved
    from column x into x - 1 (``W``) or x + 1 (``E``)."""
    n = 0
    rr = np.arange(charge.shape[0])[rows]
    for tr in traps:
        pol = serial_polarity(mode, tr.phase)
        if pol is None:
            continue
        moved = rng.binomial(cycles, serial_probability(dwell_us, tr.tau_us, tr.pc), size=rr.size).astype(np.float32)
        moved = np.minimum(moved, np.maximum(charge[rr, tr.x], 0))
        dest = tr.x - 1 if pol == "W" else tr.x + 1
        charge[rr, tr.x] -= moved
        charge[rr, dest] += moved
        n += 1
    return n


__all__ = [
    "InjectionTruth", "SerialTrap", "VerticalTrap", "draw_injection", "draw_traps", "injected_lines", "injection_charge",
    "injection_level_adu", "pump_serial", "pump_vertical", "serial_polarity", "serial_probability", "vertical_polarity",
    "vertical_probability", "well_injected",
]
