"""Simulated PTC flats for the PTC / BF family tests (one full-size quadrant per exposure,
simulated lazily with ``services.sim.physics``; not a test module)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.analyzer.family import ExposureFrames
from services.analyzer.model import FrameMeta
from shared.fitsio import to_uint16
from shared.geometry import Geometry

PTC01_FLUENCES = [0.05, 0.10, 0.20, 0.30, 0.50, 0.70, 0.80, 0.90, 1.00, 1.10, 1.20]
PTC01_FRAMES = [10] * 8 + [4] * 3
T_FWC = 4.0  # s to reach 2^16 ADU at the reference gain


@dataclass
class QuadrantExposure(ExposureFrames):
    """An exposure whose frames hold one canonical quadrant (``quadrant``) only: what the PTC
    extraction sees of a real exposure restricted to that quadrant (``load`` gives the
    canonical quadrant array)."""

    quadrant: str = "E"

    def quadrants(self, ccd: str) -> dict[str, np.ndarray]:
        return {self.quadrant: self.load(ccd)}


def sim_exposures(model, ccd: str, q: str, fluences, nframes, tag: str = "ptc", rng_key=None) -> list[QuadrantExposure]:
    """Lazily simulated flats of one quadrant at ``fluences`` (fraction of 2^16 ADU at the
    reference gain) x ``nframes``; ObsIDs 1, 2, ... The rng key is ``(tag, k, ccd, q)`` unless
    ``rng_key(k)`` is given."""
    from services.sim.physics import FULL_SCALE_ADU, REFERENCE_GAIN, Exposure

    geo = Geometry()
    flux = FULL_SCALE_ADU * REFERENCE_GAIN / T_FWC
    out, k = [], 0
    for frac, n in zip(fluences, nframes):
        for _ in range(n):
            k += 1
            t = frac * T_FWC

            def load(meta, k=k, t=t):
                key = rng_key(k) if rng_key else (tag, k, ccd, q)
                res = model.simulate_quadrant(ccd, q, Exposure(kind="flat", exptime=t, flux_e_per_s=flux), model.rng(*key), geo)
                return to_uint16(res.data).astype(np.float32)

            meta = FrameMeta(obsid=k, ccd=int(ccd[-1]), path=f"/nonexistent/{tag}_{k}.fits", exptime=t, test="PTC01",
                             values={"wave": 800})
            out.append(QuadrantExposure(obsid=k, block="SIM", test="PTC01", frames={ccd: meta}, loader=load, quadrant=q))
    return out


def array_exposure(obsid: int, quad: np.ndarray, exptime: float = 1.0, ccd: str = "CCD1", q: str = "E") -> QuadrantExposure:
    """An exposure holding one given canonical quadrant array."""
    meta = FrameMeta(obsid=obsid, ccd=int(ccd[-1]), path=f"/nonexistent/{obsid}.fits", exptime=exptime, test="PTC01", values={"wave": 800})
    return QuadrantExposure(obsid=obsid, block="SIM", test="PTC01", frames={ccd: meta}, loader=lambda m: quad, quadrant=q)
