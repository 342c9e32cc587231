"""Persistence of the simulator (families.md, "Persistence"): the pixels saturated by a
point-source exposure release charge at a rate ``R0 exp(-t / tau)`` (e-/s per pixel, ``t`` =
seconds since the end of that exposure) into the following darks (shutter closed, exposure time
> 0); a dark integrating from ``t1`` to ``t2`` collects ``R0 tau (exp(-t1/tau) - exp(-t2/tau))``
e- extra in each of those pixels. ``R0`` and ``tau`` are drawn per quadrant (truth). Only
point-source exposures leave a mask (PERSIST01's saturating exposure; saturated flats are
followed by reset frames in the campaign and are not modelled), the latest one replacing the
previous; other frame kinds are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, Field

from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS

ADC_SATURATED = 65534.5  # a pixel digitised to 65535


class PersistenceTruth(BaseModel):
    """Persistence of one quadrant."""

    rate0_e_per_s: float = Field(description="release rate R0 at the end of the saturating exposure (e-/s per saturated pixel)")
    tau_s: float = Field(description="decay time constant (s)")


def draw_persistence(rng: np.random.Generator) -> PersistenceTruth:
    return PersistenceTruth(rate0_e_per_s=round(float(rng.uniform(0.15, 0.5)), 4), tau_s=round(float(rng.uniform(300.0, 900.0)), 1))


def excess_e(truth: PersistenceTruth, t1_s: float, t2_s: float) -> float:
    """Charge (e-) collected per saturated pixel by a dark integrating from t1 to t2 (s after the
    end of the saturating exposure)."""
    if t2_s <= 0 or t2_s <= t1_s:
        return 0.0
    t1 = max(t1_s, 0.0)
    return float(truth.rate0_e_per_s * truth.tau_s * (math.exp(-t1 / truth.tau_s) - math.exp(-t2_s / truth.tau_s)))


def saturated_indices(quad: np.ndarray) -> np.ndarray:
    """Flat indices (into the 2066 x 2048 image area) of the pixels of a canonical quadrant (ADU,
    before digitisation) that digitise to 65535."""
    img = quad[:IMAGE_ROWS, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS]
    return np.flatnonzero(img >= ADC_SATURATED).astype(np.int64)


@dataclass
class PersistenceState:
    """The masks left by the latest saturating exposure per (CCD, quadrant), with its end time
    (POSIX seconds)."""

    masks: dict[tuple[str, str], tuple[np.ndarray, float]] = field(default_factory=dict)

    def record(self, ccd: str, q: str, indices: np.ndarray, t_end: float) -> None:
        if indices.size:
            self.masks[(ccd, q)] = (indices, float(t_end))

    def excess(self, ccd: str, q: str, truth: PersistenceTruth, t_start: float, t_end: float) -> tuple[np.ndarray, float, float] | None:
        """(indices, e- per pixel, seconds since saturation at mid-dark) for a dark integrating from
        ``t_start`` to ``t_end`` (POSIX s), or None."""
        entry = self.masks.get((ccd, q))
        if entry is None:
            return None
        idx, t_sat = entry
        e = excess_e(truth, t_start - t_sat, t_end - t_sat)
        if e <= 0:
            return None
        return idx, e, 0.5 * (t_start + t_end) - t_sat
