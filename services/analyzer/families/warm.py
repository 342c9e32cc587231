"""MOT_WARM (engine v2): the warm functional check (families.md, "Warm functional check").

The 8 frames are recognised by their register values, never by their place in the sequence:
``rdmode`` starting with ``rwd`` -> a reverse-readout bias of that mode; ``chinj`` -> the
injection frame; shutter open with the flat source -> the flat; shutter open with the point
source -> a point-source frame (per ``wave``); shutter closed, zero seconds, forward readout ->
the ROE ramp.

**Extract** (per exposure, CCD, quadrant; canonical): prescan offset (clipped mean) and RON
(clipped std, variance-corrected); ramp: median of each read row (prescan included, since the
ramp is in the video chain), straight-line fit -> slope (ADU/row) and the largest deviation from
the line in % of the ramp's range; injection: median of the injected lines (``shared.injection``
rule) minus the offset; flat: median of the image area minus the offset and the hard-edge
response ``(O_1 - O_far) / (I_last - O_far)`` at the image -> serial-overscan edge; point
source: spots found (photutils, ghosts of crosstalk excluded).

**Solve**: per quadrant the values of each recognised frame; a frame kind missing is said in
``reason`` (flag MISSDATA), never filled in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from services.analyzer.family import Calibrations, ExposureFrames, Extraction, Family, TestRun, exposure_unit
from services.analyzer.model import AnalysisOutput, FigureProduct, ProductSink
from services.analyzer.science.injection import injected_rows
from services.analyzer.science.spots import background_noise, detect_spots, measure_spot
from services.analyzer.science.stats import clipped_stats
from shared.flags import Flag
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, QUADRANTS, STANDARD_TRIMS, region

HER_LIMIT = 1.5e-3


class WarmParams(BaseModel):
    """Analysis parameters of MOT_WARM."""

    nsigma: float = Field(4.0, description="clipping of offsets and noise")
    her_limit: float = Field(HER_LIMIT, description="|HER| requirement")


class QuadWarm(BaseModel):
    offset_adu: float
    ron_adu: float
    ramp_slope_adu_per_row: float | None = None
    ramp_nl_max_pct: float | None = None
    injection_adu: float | None = None
    flat_fluence_adu: float | None = None
    her: float | None = None
    n_spots: int | None = None


class WarmExtraction(Extraction):
    kind: str = Field(description="bias_<rdmode> | ramp | injection | flat | point | other")
    rdmode: str = "fwd_bas"
    wave: float | None = None
    quads: dict[str, dict[str, QuadWarm]] = Field(default_factory=dict)


class WarmQuadResult(BaseModel):
    """``results[CCD][Q]`` of MOT_WARM (ADU unless said)."""

    ron_adu: dict[str, float] = Field(default_factory=dict, description="read noise per readout mode (rdmode -> ADU; prescan)")
    offset_adu: dict[str, float] = Field(default_factory=dict, description="prescan offset per readout mode (rdmode -> ADU)")
    ramp_slope_adu_per_row: float | None = Field(None, description="ROE ramp slope (ADU per row)")
    ramp_nl_max_pct: float | None = Field(None, description="largest deviation of the ramp from a straight line (% of its range)")
    injection_adu: float | None = Field(None, description="median injected level (ADU, offset-subtracted)")
    flat_fluence_adu: float | None = Field(None, description="median of the 800 nm flat (ADU, offset-subtracted)")
    n_spots: int | None = Field(None, description="fewest spots found over the point-source frames")
    n_spots_by_wave: dict[str, int] = Field(default_factory=dict, description="spots found per point-source frame (wave position -> n)")
    her: float | None = Field(None, description="hard-edge response at the image -> serial overscan edge of the flat (|HER| <= 1.5e-3)")
    her_ok: bool | None = Field(None, description="|HER| <= 1.5e-3")
    reason: str = Field("", description="frame kinds missing (empty when all 8 frames were recognised)")


def _num(values: dict[str, Any], key: str, default: float) -> float:
    try:
        v = values.get(key, default)
        return float(v) if v not in (None, "") else default
    except (TypeError, ValueError):
        return default


def frame_kind(values: dict[str, Any]) -> str:
    """The MOT_WARM frame a set of register values describes (module docstring)."""
    rdmode = str(values.get("rdmode", "fwd_bas") or "fwd_bas").strip().lower()
    if rdmode.startswith("rwd"):
        return f"bias_{rdmode}"
    if _num(values, "chinj", 0):
        return "injection"
    t = _num(values, "exptime", 0)
    shutter = _num(values, "shuttr", 1.0) if values.get("shuttr") not in (None, "") else 1.0  # not in the 7.5.X log: t > 0 is lit
    source = str(values.get("source", "flat") or "flat").lower()
    if shutter and t > 0:
        return "point" if source.startswith("point") else "flat"
    if t <= 0:
        return "ramp"
    return "other"


def hard_edge_response(quad: np.ndarray, offset: float) -> float:
    """(O_1 - O_far) / (I_last - O_far) over the image rows (O_1 first serial-overscan column,
    O_far the overscan beyond its 5th column, I_last the last image column)."""
    ove0 = PRESCAN_COLS + IMAGE_COLS
    o1 = float(np.mean(quad[:IMAGE_ROWS, ove0], dtype=np.float64))
    ofar = float(np.mean(quad[:IMAGE_ROWS, ove0 + 5:], dtype=np.float64))
    ilast = float(np.mean(quad[:IMAGE_ROWS, ove0 - 1], dtype=np.float64))
    return (o1 - ofar) / (ilast - ofar) if ilast - ofar > 0 else float("nan")


def quadrant_warm(quad: np.ndarray, kind: str, values: dict[str, Any], params: WarmParams) -> QuadWarm:
    vstart, vend = int(_num(values, "vstart", 0)), int(_num(values, "vend", 2086))
    pre = clipped_stats(region(quad, "pre", STANDARD_TRIMS["pre"])[max(vstart, 0):min(vend, IMAGE_ROWS)], params.nsigma, subsample=3)
    out = QuadWarm(offset_adu=pre.mean, ron_adu=pre.std_corrected)
    img = np.asarray(quad[:IMAGE_ROWS, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS], dtype=np.float32)
    if kind == "ramp":
        r0, r1 = max(vstart, 0), min(vend, quad.shape[0])
        prof = np.median(quad[r0:r1, PRESCAN_COLS + 5:PRESCAN_COLS + IMAGE_COLS - 5], axis=1).astype(np.float64)
        rows = np.arange(r0, r1, dtype=np.float64)
        coef = np.polyfit(rows, prof, 1)
        resid = prof - np.polyval(coef, rows)
        span = abs(coef[0]) * (r1 - r0)
        out.ramp_slope_adu_per_row = float(coef[0])
        out.ramp_nl_max_pct = float(100 * np.max(np.abs(resid)) / span) if span > 0 else None
        out.ron_adu = float(np.median(np.std(quad[r0:r1, 5:PRESCAN_COLS - 5], axis=1)))  # along rows: the ramp is per row
        out.offset_adu = float(np.median(quad[r0:min(r0 + 20, r1), 5:PRESCAN_COLS - 5]))
    elif kind == "injection":
        inj = injected_rows(values)[:IMAGE_ROWS]
        out.injection_adu = float(np.median(img[inj][:, 5:-5])) - pre.mean if inj.any() else None
    elif kind == "flat":
        out.flat_fluence_adu = float(np.median(img[::4, ::4])) - pre.mean
        out.her = hard_edge_response(quad, pre.mean)
    elif kind == "point":
        sub = img - np.float32(pre.mean)
        level, noise = background_noise(sub)
        found = [measure_spot(sub, x, y, noise) for x, y in detect_spots(sub - np.float32(level))]
        found = [m for m in found if m is not None and m.fluence_adu > 0]
        top = max((m.fluence_adu for m in found), default=0.0)
        out.n_spots = sum(1 for m in found if m.fluence_adu >= 0.01 * top)
    return out


def extract(exposure: ExposureFrames, calib: Calibrations, params: WarmParams) -> WarmExtraction:
    values = exposure.values()
    kind = frame_kind(values)
    out = WarmExtraction(family="warm", unit=exposure_unit(exposure.obsid), obsids=[exposure.obsid], ccds=exposure.ccds(),
                         flags=exposure.flags, kind=kind, rdmode=str(values.get("rdmode", "fwd_bas") or "fwd_bas"),
                         wave=_num(values, "wave", float("nan")))
    for ccd in exposure.ccds():
        v = exposure.values(ccd)
        out.quads[ccd] = {q: quadrant_warm(quad, kind, v, params) for q, quad in exposure.quadrants(ccd).items()}
        exposure.release(ccd)
    return out


def solve(extractions: list[WarmExtraction], calib: Calibrations, params: WarmParams, run: TestRun, sink: ProductSink) -> AnalysisOutput:
    exts = sorted(extractions, key=lambda e: e.obsids[0])
    if not exts:
        raise ValueError(f"{run.label}: no exposure to analyse")
    flags = Flag(run.flags)
    kinds = [e.kind for e in exts]
    expected = {"bias_rwd": 2, "ramp": 1, "injection": 1, "flat": 1, "point": 3}
    got = {"bias_rwd": sum(k.startswith("bias_rwd") for k in kinds), "ramp": kinds.count("ramp"), "injection": kinds.count("injection"),
           "flat": kinds.count("flat"), "point": kinds.count("point")}
    missing = [f"{k}: {got[k]} of {n}" for k, n in expected.items() if got[k] < n]
    if missing:
        flags |= Flag.MISSDATA
    ccds = [c for c in ("CCD1", "CCD2", "CCD3") if any(c in e.quads for e in exts)]
    results: dict[str, dict[str, Any]] = {}
    for ccd in ccds:
        results[ccd] = {}
        for q in QUADRANTS:
            res: dict[str, Any] = {"ron_adu": {}, "offset_adu": {}, "n_spots_by_wave": {}}
            for e in exts:
                s = e.quads.get(ccd, {}).get(q)
                if s is None:
                    continue
                if e.kind.startswith("bias_") or (e.kind in ("injection", "flat", "point") and e.rdmode not in res["ron_adu"]):
                    res["ron_adu"].setdefault(e.rdmode, s.ron_adu)
                    res["offset_adu"].setdefault(e.rdmode, s.offset_adu)
                if e.kind == "ramp":
                    res["ramp_slope_adu_per_row"], res["ramp_nl_max_pct"] = s.ramp_slope_adu_per_row, s.ramp_nl_max_pct
                elif e.kind == "injection":
                    res["injection_adu"] = s.injection_adu
                elif e.kind == "flat":
                    res["flat_fluence_adu"], res["her"] = s.flat_fluence_adu, s.her
                    res["her_ok"] = bool(s.her is not None and np.isfinite(s.her) and abs(s.her) <= params.her_limit)
                elif e.kind == "point" and s.n_spots is not None:
                    res["n_spots_by_wave"][f"{e.wave:g}"] = s.n_spots
            if res["n_spots_by_wave"]:
                res["n_spots"] = min(res["n_spots_by_wave"].values())
                if res["n_spots"] < 5:
                    flags |= Flag.STARS_MISSING
            if res.get("her_ok") is False:
                flags |= Flag.REQNOTMET
            res["reason"] = ("frames not recognised: " + ", ".join(missing)) if missing else ""
            results[ccd][q] = WarmQuadResult(**res).model_dump()
    sink.add(FigureProduct("mot_warm_summary", lambda fig: _draw(fig, results), size=(12, 4),
                           description="warm check: offsets and RON per readout mode, per CCD and quadrant"))
    summary = [f"{run.label}: frames {', '.join(f'{e.obsids[0]}={e.kind}' for e in exts)}"]
    if missing:
        summary.append("missing: " + ", ".join(missing))
    return AnalysisOutput(results=results, flags=int(flags), parameters=params.model_dump(mode="json"), summary=summary,
                          test_values={"frames": {str(e.obsids[0]): e.kind for e in exts}})


def _draw(fig: Any, results: dict[str, dict[str, Any]]) -> None:
    ax1, ax2 = fig.subplots(1, 2)
    labels = [f"{c}.{q}" for c in results for q in results[c]]
    modes = sorted({m for c in results.values() for r in c.values() for m in r["ron_adu"]})
    for m in modes:
        ax1.plot(labels, [results[c][q]["offset_adu"].get(m, np.nan) for c in results for q in results[c]], "o", label=m)
        ax2.plot(labels, [results[c][q]["ron_adu"].get(m, np.nan) for c in results for q in results[c]], "o", label=m)
    ax1.set_ylabel("offset (ADU)")
    ax2.set_ylabel("RON (ADU)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=90, labelsize=7)
        ax.legend(fontsize=7)


FAMILY = Family(
    name="warm", tests=("MOT_WARM",), params=WarmParams, extract=extract, solve=solve, unit="exposure",
    extraction=WarmExtraction, result=WarmQuadResult,
)
