"""PTC figures (matplotlib, drawn on a Figure given by the products writer; no pyplot)."""

from __future__ import annotations

from typing import Any

import numpy as np

from services.analyzer.families.ptc.models import exponential_model
from services.analyzer.families.ptc.solve import QuadSolution
from shared.geometry import QUADRANTS


def draw_ptc(fig: Any, quads: dict[str, QuadSolution], ccd: str) -> None:
    """Variance vs mean per quadrant: fitted / not fitted (turnoff, outliers, saturation) /
    rejected points, the exponential and linear models, the saturation limits, residuals."""
    axes = fig.subplots(2, 4, sharex="col", gridspec_kw={"height_ratios": [3, 1]})
    for k, q in enumerate(QUADRANTS):
        ax, axr = axes[0, k], axes[1, k]
        s = quads.get(q)
        ax.set_title(f"{ccd} {q}")
        if s is None:
            continue
        mu = np.array([r.m.mu for r in s.records])
        var = np.array([r.m.var for r in s.records])
        fitted = np.array([r.fitted for r in s.records], dtype=bool)
        rej = np.array([r.rejected for r in s.records], dtype=bool)
        ax.plot(mu[fitted], var[fitted], "o", ms=3, label="fitted")
        ax.plot(mu[~fitted & ~rej], var[~fitted & ~rej], "s", ms=3, mfc="none", label="not fitted (outlier, turnoff, saturated)")
        ax.plot(mu[rej], var[rej], "x", ms=4, label="rejected (mismatch, KS)")
        r = s.result
        if np.isfinite(r.gain):
            grid = np.linspace(0, np.nanmax(mu) if mu.size else 1, 200)
            ax.plot(grid, exponential_model(grid, r.a00, r.gain, r.n00_e2), "-", lw=1, label=f"exp: g={r.gain:.4f} a00={r.a00:.2e}")
            ax.plot(grid, grid / r.gain_quad if np.isfinite(r.gain_quad) else grid * np.nan, ":", lw=1,
                    label=f"linear, quad g={r.gain_quad:.4f}")
            model = exponential_model(mu, r.a00, r.gain, r.n00_e2)
            axr.plot(mu[fitted], 100 * (var[fitted] / model[fitted] - 1), "o", ms=3)
            axr.axhline(0, color="k", lw=0.5)
        if not r.full_well_is_lower_limit:
            ax.axvline(r.full_well_adu, color="r", lw=0.7, ls="--", label=f"full well {r.full_well_adu:.0f}")
        if r.adc_reached:
            ax.axvline(r.adc_saturation_adu, color="m", lw=0.7, ls="-.", label=f"ADC ceiling {r.adc_saturation_adu:.0f}")
        ax.legend(fontsize=6)
        axr.set_xlabel("mean (ADU)")
    axes[0, 0].set_ylabel("variance (ADU$^2$)")
    axes[1, 0].set_ylabel("resid (%)")
