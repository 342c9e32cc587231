"""CHINJ01 / CHINJ02 (engine v2): charge-injection statistics and the injection curves
(families.md, "Charge injection").

**Extract** (per exposure, CCD and quadrant; canonical orientation): offset = clipped mean of the
trimmed prescan; the offset-subtracted readout window of the image area folded into cycles of
``chinj_on + chinj_of`` lines and averaged over the cycles; statistics of the injected lines of
that average cycle (mean, median, std, p5, p25, p75, p95; ADU), non-uniformity ``(p95 - p5) /
p50``, spill-over into the first non-injected line ``(y[on] - bgd) / median(y[0:on] - bgd)``
(``bgd`` = median of the other non-injected lines), the line profile of the cycle and the column
profile of the injected lines; the swept voltages of the quadrant (IG1 of its CCD side, IG2,
IDL), the injection delay and whether the quadrant is in the well-injected half
(``id_dly / toi_ch`` in (2, 3]: E and F; in (1, 2]: G and H; outside (1, 3]: the nearer
interval).

**Solve** (per quadrant, well-injected frames only): CHINJ01 the thresholded ramp
``I = b + expit(k (IG1 - x_T)) (N + S max(0, x_N - IG1))`` (free x_T, x_N, S, N, k, b);
CHINJ02 the logistic ``I = b + A expit(-k (IDL - x_T))``; parameters with 1-sigma errors from
the fit covariance (scaled by the reduced chi^2); fewer than 4 usable points, a fit that did not
converge or non-finite errors: ``fit_ok = False``, values None, flag BADFIT: never a silent
number. Products: ``chinj_lines.fits`` (per frame / CCD / quadrant statistics) and a figure of
the injection curves per CCD.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from services.analyzer.family import Calibrations, ExposureFrames, Extraction, Family, TestRun, exposure_unit
from services.analyzer.model import AnalysisOutput, FigureProduct, ProductSink, TableProduct
from services.analyzer.science.fitting import iterative_fit
from services.analyzer.science.injection import well_injected_half
from services.analyzer.science.stats import clipped_stats
from shared.flags import Flag
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, QUADRANTS, standard_region

MIN_POINTS = 4
LIT_FRACTION = 0.1  # non-uniformity and spill-over from frames injecting > 10 % of the quadrant's top level
PERCENTILES = (5, 25, 50, 75, 95)


class ChinjParams(BaseModel):
    """Analysis parameters of CHINJ01 / CHINJ02."""

    nsigma: float = Field(4.0, description="clipping of the prescan offset")
    min_id_wid_us: float = Field(10.0, description="injection pulse width below which nothing is injected (us)")
    outlier_nsigma: float = Field(6.0, description="outlier rejection of the curve fits (robust sigmas)")
    sigma_floor_adu: float = Field(3.0, description="floor of the per-point uncertainty of the fits (ADU)")
    sigma_rel: float = Field(0.002, description="relative per-point uncertainty of the fits (fraction of the level)")


class QuadInjection(BaseModel):
    """Injection statistics of one quadrant of one frame (ADU, offset-subtracted)."""

    model_config = {"arbitrary_types_allowed": True}

    offset_adu: float
    mean: float
    median: float
    std: float
    p5: float
    p25: float
    p75: float
    p95: float
    nonuniformity: float
    spill: float | None
    bgd_adu: float
    ig1_v: float
    ig2_v: float
    idl_v: float
    id_dly_us: float
    id_wid_us: float
    well_injected: bool
    line_profile: np.ndarray
    column_profile: np.ndarray


class ChinjExtraction(Extraction):
    """Per CCD and quadrant injection statistics of one exposure."""

    quads: dict[str, dict[str, QuadInjection]] = Field(default_factory=dict)


class ChinjQuadResult(BaseModel):
    """``results[CCD][Q]`` of CHINJ01 / CHINJ02 (voltages V, levels ADU). CHINJ01 keys:
    ``ig1_threshold_v``, ``ig1_notch_v``, ``slope_adu_per_v``, ``floor_adu``; CHINJ02:
    ``idl_threshold_v``, ``amplitude_adu``; both ``background_adu``, each with ``_err``."""

    fit_ok: bool = Field(description="the curve fit converged with >= 4 usable points and finite errors")
    n_points: int = Field(description="well-injected frames used in the fit")
    ig1_threshold_v: float | None = Field(None, description="CHINJ01: IG1 threshold x_T (V) where injection starts")
    ig1_threshold_v_err: float | None = None
    ig1_notch_v: float | None = Field(None, description="CHINJ01: IG1 notch x_N (V) above which the level is the floor")
    ig1_notch_v_err: float | None = None
    slope_adu_per_v: float | None = Field(None, description="CHINJ01: slope S of the injected level vs IG1 below the notch (ADU/V, positive)")
    slope_adu_per_v_err: float | None = None
    floor_adu: float | None = Field(None, description="CHINJ01: injected level N above the notch (ADU)")
    floor_adu_err: float | None = None
    steepness_per_v: float | None = Field(None, description="steepness k of the logistic edge (1/V)")
    steepness_per_v_err: float | None = None
    idl_threshold_v: float | None = Field(None, description="CHINJ02: IDL where the injection falls to half (V)")
    idl_threshold_v_err: float | None = None
    amplitude_adu: float | None = Field(None, description="CHINJ02: injected level well below the IDL threshold (ADU)")
    amplitude_adu_err: float | None = None
    background_adu: float | None = Field(None, description="level without injection b (ADU, offset-subtracted)")
    background_adu_err: float | None = None
    nonuniformity_max: float | None = Field(None, description="largest (p95 - p5) / p50 of the injected lines over the well-injected "
                                            "frames injecting more than 10 % of the quadrant's top level")
    spill_max: float | None = Field(None, description="largest spill-over fraction into the first non-injected line (same frames)")
    reason: str = Field("", description="why the fit is not ok (empty when it is)")


# ------------------------------------------------------------------------------------ extraction


def _num(values: dict[str, Any], key: str, default: float) -> float:
    try:
        v = values.get(key, default)
        return float(v) if v not in (None, "") else default
    except (TypeError, ValueError):
        return default


def quadrant_injection(quad: np.ndarray, values: dict[str, Any], ccd: int, q: str, params: ChinjParams) -> QuadInjection:
    """Injection statistics of one canonical quadrant (module docstring)."""
    vstart = int(_num(values, "vstart", 0))
    vend = int(_num(values, "vend", 2086))
    offset = clipped_stats(standard_region(quad, "pre", vstart, vend), params.nsigma, subsample=7).mean
    r0, r1 = max(vstart, 0), min(vend, IMAGE_ROWS)
    img = np.asarray(quad[r0:r1, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS], dtype=np.float32) - np.float32(offset)
    on, off = int(_num(values, "chinj_on", 30)), int(_num(values, "chinj_of", 100))
    on = max(min(on, img.shape[0]), 1)
    period = max(on + max(off, 0), 1)
    cycles = max(img.shape[0] // period, 1)
    if img.shape[0] >= period:
        cycle = img[: cycles * period].reshape(cycles, period, img.shape[1]).mean(axis=0)
    else:
        cycle = img
    injected = cycle[:on]
    lines = np.median(cycle, axis=1)
    if off > 1 and cycle.shape[0] > on + 1:
        bgd = float(np.median(cycle[on + 1:]))
        level = float(np.median(lines[:on] - bgd))
        spill = float((lines[on] - bgd) / level) if level > 0 else None
    else:
        bgd, spill = 0.0, None
    pct = np.percentile(injected, PERCENTILES)
    side = "T" if q in ("E", "F") else "B"
    dly, toi = _num(values, "id_dly", 1500.0), _num(values, "toi_ch", 1000.0)
    return QuadInjection(
        offset_adu=float(offset), mean=float(injected.mean()), median=float(pct[2]), std=float(injected.std()),
        p5=float(pct[0]), p25=float(pct[1]), p75=float(pct[3]), p95=float(pct[4]),
        nonuniformity=float((pct[4] - pct[0]) / pct[2]) if pct[2] > 0 else float("nan"), spill=spill, bgd_adu=bgd,
        ig1_v=_num(values, f"IG1_{ccd}_{side}", _num(values, "IG1", float("nan"))),
        ig2_v=_num(values, f"IG2_{side}", _num(values, "IG2", float("nan"))), idl_v=_num(values, "IDL", float("nan")),
        id_dly_us=dly, id_wid_us=_num(values, "id_wid", 100.0), well_injected=q in well_injected_half(dly, toi),
        line_profile=lines.astype(np.float32), column_profile=injected.mean(axis=0).astype(np.float32),
    )


def extract(exposure: ExposureFrames, calib: Calibrations, params: ChinjParams) -> ChinjExtraction:
    out = ChinjExtraction(family="chinj", unit=exposure_unit(exposure.obsid), obsids=[exposure.obsid], ccds=exposure.ccds(),
                          flags=exposure.flags)
    for ccd in exposure.ccds():
        values = exposure.values(ccd)
        quads = exposure.quadrants(ccd)
        out.quads[ccd] = {q: quadrant_injection(quads[q], values, int(ccd[-1]), q, params) for q in QUADRANTS}
        exposure.release(ccd)
    return out


# ------------------------------------------------------------------------------------ models


def _expit(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, dtype=np.float64)))


def ramp_model(x: np.ndarray, x_t: float, x_n: float, slope: float, floor: float, k: float, b: float) -> np.ndarray:
    """CHINJ01: ``b + expit(k (x - x_T)) (N + S max(0, x_N - x))`` (x = IG1, V)."""
    x = np.asarray(x, dtype=np.float64)
    return b + _expit(k * (x - x_t)) * (floor + slope * np.maximum(0.0, x_n - x))


def logistic_model(x: np.ndarray, x_t: float, amplitude: float, k: float, b: float) -> np.ndarray:
    """CHINJ02: ``b + A expit(-k (x - x_T))`` (x = IDL, V)."""
    return b + amplitude * _expit(-k * (np.asarray(x, dtype=np.float64) - x_t))


def fit_ramp(x: np.ndarray, y: np.ndarray, params: ChinjParams) -> tuple[dict[str, float] | None, str]:
    """Thresholded-ramp fit; (parameters with ``_err``, reason) - None when it failed."""
    order = np.argsort(x)
    x, y = np.asarray(x, float)[order], np.asarray(y, float)[order]
    if x.size < MIN_POINTS + 2:
        return None, f"{x.size} usable points: the 6-parameter ramp needs at least {MIN_POINTS + 2}"
    b0 = float(np.min(y[: max(2, x.size // 4)]))
    top = float(np.max(y))
    above = x[y > b0 + 0.5 * (top - b0)]
    x_t0 = float(above[0]) if above.size else float(x[x.size // 2])
    tail = y[-max(2, x.size // 5):]
    floor0 = max(float(np.median(tail)) - b0, 1.0)
    ramp = (x > x_t0 + 0.2) & (y > b0 + floor0 * 1.5)
    if ramp.sum() >= 2:
        s0 = max(-float(np.polyfit(x[ramp], y[ramp], 1)[0]), 1.0)
        x_n0 = float(x[ramp][-1]) + 0.1
    else:
        s0, x_n0 = 1000.0, float(x[-1])
    sigma = np.maximum(params.sigma_floor_adu, params.sigma_rel * np.abs(y))
    lo = [x[0] - 1.0, x[0], 0.0, 0.0, 1.0, -1e4]
    hi = [x[-1] + 1.0, x[-1] + 2.0, 1e6, 1e6, 200.0, 1e4]
    p0 = np.clip([x_t0, x_n0, s0, floor0, 15.0, b0], lo, hi)
    fr = iterative_fit(ramp_model, x, y, p0, sigma=sigma, nsigma=params.outlier_nsigma, min_points=MIN_POINTS + 2,
                       bounds=(lo, hi))
    return _report(fr, ("ig1_threshold_v", "ig1_notch_v", "slope_adu_per_v", "floor_adu", "steepness_per_v", "background_adu"))


def fit_logistic(x: np.ndarray, y: np.ndarray, params: ChinjParams) -> tuple[dict[str, float] | None, str]:
    """Logistic fit vs IDL; (parameters with ``_err``, reason)."""
    order = np.argsort(x)
    x, y = np.asarray(x, float)[order], np.asarray(y, float)[order]
    if x.size < MIN_POINTS:
        return None, f"{x.size} usable points: the logistic needs at least {MIN_POINTS}"
    b0, top = float(np.min(y)), float(np.max(y))
    half = x[y < b0 + 0.5 * (top - b0)]
    x_t0 = float(half[0]) if half.size else float(x[x.size // 2])
    sigma = np.maximum(params.sigma_floor_adu, params.sigma_rel * np.abs(y))
    lo, hi = [x[0] - 2.0, 0.0, 0.5, -1e4], [x[-1] + 2.0, 1e6, 200.0, 1e4]
    p0 = np.clip([x_t0, max(top - b0, 1.0), 15.0, b0], lo, hi)
    fr = iterative_fit(logistic_model, x, y, p0, sigma=sigma, nsigma=params.outlier_nsigma, min_points=MIN_POINTS, bounds=(lo, hi))
    return _report(fr, ("idl_threshold_v", "amplitude_adu", "steepness_per_v", "background_adu"))


def _report(fr: Any, names: tuple[str, ...]) -> tuple[dict[str, float] | None, str]:
    if not fr.success:
        return None, f"fit did not converge: {fr.message}"
    if not np.all(np.isfinite(fr.errors)):
        return None, "fit parameters are not constrained (non-finite errors)"
    out: dict[str, float] = {}
    for name, value, err in zip(names, fr.params, fr.errors):
        out[name] = float(value)
        out[f"{name}_err"] = float(err)
    out["_kept"] = int(np.count_nonzero(fr.kept))
    return out, ""


# ------------------------------------------------------------------------------------ solve


def sweep_of(test: str) -> str:
    """``ig1`` for CHINJ01, ``idl`` for CHINJ02."""
    return "idl" if test.upper().startswith("CHINJ02") else "ig1"


def solve(extractions: list[ChinjExtraction], calib: Calibrations, params: ChinjParams, run: TestRun, sink: ProductSink) -> AnalysisOutput:
    sweep = sweep_of(run.test)
    flags = Flag(0)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray, dict | None]]] = {}
    exts = sorted(extractions, key=lambda e: e.obsids[0])
    ccds = sorted({c for e in exts for c in e.quads})
    summary = [f"{'CCD':<5}{'Q':<2} {'n':>3} " + ("x_T(V)   x_N(V)   S(ADU/V)  N(ADU)" if sweep == "ig1" else "IDL_T(V)  A(ADU)")]
    for ccd in ccds:
        results[ccd] = {}
        curves[ccd] = {}
        for q in QUADRANTS:
            pts = [(e.obsids[0], e.quads[ccd][q]) for e in exts if ccd in e.quads and q in e.quads[ccd]]
            for obsid, s in pts:
                rows.append({"obsid": obsid, "ccd": ccd, "quadrant": q, **{k: getattr(s, k) for k in (
                    "ig1_v", "ig2_v", "idl_v", "id_dly_us", "well_injected", "offset_adu", "mean", "median", "std", "p5", "p25",
                    "p75", "p95", "nonuniformity", "bgd_adu")}, "spill": s.spill if s.spill is not None else float("nan")})
            use = [s for _, s in pts if s.well_injected and s.id_wid_us >= params.min_id_wid_us]
            x = np.array([s.ig1_v if sweep == "ig1" else s.idl_v for s in use], float)
            y = np.array([s.median for s in use], float)
            good = np.isfinite(x) & np.isfinite(y)
            x, y = x[good], y[good]
            fit, reason = (fit_ramp if sweep == "ig1" else fit_logistic)(x, y, params)
            ok = fit is not None
            res: dict[str, Any] = {"fit_ok": ok, "n_points": int(x.size), "reason": reason}
            if ok:
                res.update({k: v for k, v in fit.items() if not k.startswith("_")})
            else:
                flags |= Flag.BADFIT
            top = max((s.median for s in use), default=0.0)
            lit = [s for s in use if s.median > LIT_FRACTION * top]  # frames that really inject
            nonuni = [s.nonuniformity for s in lit if math.isfinite(s.nonuniformity)]
            spills = [s.spill for s in lit if s.spill is not None and math.isfinite(s.spill)]
            res["nonuniformity_max"] = max(nonuni) if nonuni else None
            res["spill_max"] = max(spills) if spills else None
            results[ccd][q] = ChinjQuadResult(**res).model_dump()
            curves[ccd][q] = (x, y, fit)
            r = results[ccd][q]
            if sweep == "ig1":
                summary.append(f"{ccd:<5}{q:<2} {x.size:3d} " + (f"{r['ig1_threshold_v']:7.3f}  {r['ig1_notch_v']:7.3f}  "
                               f"{r['slope_adu_per_v']:8.1f}  {r['floor_adu']:7.1f}" if ok else f"fit failed: {reason}"))
            else:
                summary.append(f"{ccd:<5}{q:<2} {x.size:3d} " + (f"{r['idl_threshold_v']:8.3f}  {r['amplitude_adu']:8.1f}" if ok
                               else f"fit failed: {reason}"))
    if not rows:
        raise ValueError(f"{run.label}: no injection frames to analyse")
    sink.add(TableProduct("chinj_lines", {k: [r[k] for r in rows] for k in rows[0]},
                          units={k: "ADU" for k in ("offset_adu", "mean", "median", "std", "p5", "p25", "p75", "p95", "bgd_adu")},
                          description="injection statistics per frame, CCD and quadrant (offset-subtracted, average cycle)"))
    sink.add(FigureProduct("chinj_curves", lambda fig: _draw(fig, curves, sweep), size=(15, 5),
                           description=f"injected level vs {'IG1' if sweep == 'ig1' else 'IDL'} per CCD (well-injected frames)"))
    brightest = {ccd: {q: max((e.quads[ccd][q] for e in exts if ccd in e.quads and e.quads[ccd][q].well_injected),
                              key=lambda s: s.median, default=None) for q in QUADRANTS} for ccd in ccds}
    sink.add(FigureProduct("chinj_profiles", lambda fig: _draw_profiles(fig, brightest), size=(15, 7),
                           description="line profile of the average injection cycle and column profile of the injected lines "
                                       "(brightest well-injected frame of each quadrant)"))
    return AnalysisOutput(results=results, flags=int(flags), frames=rows, parameters=params.model_dump(mode="json"), summary=summary,
                          test_values={"sweep": sweep, "frames": len(exts)})


def _draw(fig: Any, curves: dict[str, dict[str, tuple]], sweep: str) -> None:
    axes = np.atleast_1d(fig.subplots(1, max(len(curves), 1), sharey=True))
    for ax, (ccd, quads) in zip(axes, curves.items()):
        for q, (x, y, fit) in quads.items():
            line = ax.plot(x, y, "o", ms=3, label=q)[0]
            if fit is not None and x.size:
                grid = np.linspace(x.min(), x.max(), 200)
                if sweep == "ig1":
                    model = ramp_model(grid, fit["ig1_threshold_v"], fit["ig1_notch_v"], fit["slope_adu_per_v"], fit["floor_adu"],
                                       fit["steepness_per_v"], fit["background_adu"])
                else:
                    model = logistic_model(grid, fit["idl_threshold_v"], fit["amplitude_adu"], fit["steepness_per_v"], fit["background_adu"])
                ax.plot(grid, model, "-", lw=0.8, color=line.get_color())
        ax.set_title(ccd)
        ax.set_xlabel("IG1 (V)" if sweep == "ig1" else "IDL (V)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("injected level (ADU)")


def _draw_profiles(fig: Any, brightest: dict[str, dict[str, QuadInjection | None]]) -> None:
    axes = fig.subplots(2, max(len(brightest), 1), squeeze=False)
    for k, (ccd, quads) in enumerate(brightest.items()):
        for q, s in quads.items():
            if s is None:
                continue
            axes[0, k].plot(s.line_profile, lw=0.8, label=q)
            axes[1, k].plot(s.column_profile, lw=0.5, label=q)
        axes[0, k].set_title(f"{ccd}: average cycle")
        axes[0, k].set_xlabel("line in the cycle")
        axes[1, k].set_xlabel("image column (canonical)")
        axes[0, k].legend(fontsize=7)
    axes[0, 0].set_ylabel("median (ADU)")
    axes[1, 0].set_ylabel("mean of the injected lines (ADU)")


FAMILY = Family(
    name="chinj", tests=("CHINJ01", "CHINJ02"), params=ChinjParams, extract=extract, solve=solve, unit="exposure",
    extraction=ChinjExtraction, result=ChinjQuadResult,
)
