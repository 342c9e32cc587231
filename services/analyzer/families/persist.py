"""PERSIST01 (engine v2): persistence of saturated pixels (families.md, "Persistence").

Frames are recognised by their registers: the saturating exposure has the shutter open (or,
without ``shuttr`` in the exposure log, the mirror on) and an exposure time > 0; darks have the shutter closed and an exposure time > 0 (reference darks come
before the saturating exposure, latent darks after it); zero-second frames are reset biases.

**Extract** (per exposure, CCD and quadrant; canonical orientation): offset (clipped mean of the
virtual pixels); of a dark, the 4-sigma clipped mean of its offset-subtracted image area; of the
saturating exposure, the saturation mask (image-area pixels at 65535, flat indices) and its size.

**Solve**: mask = saturated pixels minus the cosmetic defects of a ``dark_mask`` / ``defect_mask``
calibration when one is given; for every reference and latent dark the pixels at the mask
(read from the dark's frame file) minus the dark's clipped mean outside the mask: mean (4-sigma
clipped against cosmic rays), p25, p50, p75, std, N, against the time from the end of the
saturating exposure to the middle of the dark; persistence ``p = mean_inside(first latent) -
mean(mean_inside(references))``, error ``sqrt(std(ref means)^2 + (std_first_latent / sqrt(N))^2)``;
in electrons with the ``gain`` calibration. No saturating exposure, no saturated pixel, no
latent dark: no number, a reason and a flag (MISSDATA / NONSATURATION).
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from services.analyzer.family import (
    DARK_MASK, DEFECT_MASK, GAIN, Calibrations, ExposureFrames, Extraction, Family, Need, TestRun, exposure_unit, load_frame_data,
)
from services.analyzer.model import AnalysisOutput, FigureProduct, FrameMeta, ImageProduct, ProductSink, TableProduct
from services.analyzer.science.preprocess import reference_offset
from services.analyzer.science.stats import clipped_stats
from shared.flags import Flag
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, QUADRANTS, Geometry, assemble, quadrant, quadrants

ADC_MAX = 65535.0


class PersistParams(BaseModel):
    """Analysis parameters of PERSIST01."""

    nsigma: float = Field(4.0, description="clipping of the dark levels and of the in-mask mean (cosmic rays)")


class QuadPersist(BaseModel):
    """One quadrant of one PERSIST01 exposure (ADU, offset-subtracted)."""

    offset_adu: float
    level_adu: float | None = Field(None, description="dark: clipped mean of the image area")
    saturated: np.ndarray | None = Field(None, description="saturating exposure: flat indices of the 65535 pixels (image area)")
    n_saturated: int = 0

    model_config = {"arbitrary_types_allowed": True}


class PersistExtraction(Extraction):
    role: str = Field(description="reset | dark | saturating")
    exptime: float = 0.0
    date: datetime | None = None
    quads: dict[str, dict[str, QuadPersist]] = Field(default_factory=dict)


class DecayPoint(BaseModel):
    t_s: float = Field(description="seconds from the end of the saturating exposure to the middle of the latent dark")
    excess_adu: float = Field(description="mean inside the mask minus the reference mean (ADU)")


class PersistQuadResult(BaseModel):
    """``results[CCD][Q]`` of PERSIST01."""

    n_saturated: int | None = Field(None, description="pixels at 65535 in the saturating exposure, cosmetic defects excluded")
    persistence_adu: float | None = Field(None, description="mean in the mask of the first latent dark minus the references' (ADU, > 0 = excess)")
    persistence_err_adu: float | None = Field(None, description="its 1-sigma error (ADU)")
    persistence_e: float | None = Field(None, description="persistence in electrons (gain calibration), None without it")
    decay: list[DecayPoint] = Field(default_factory=list, description="excess of each latent dark vs time")
    reason: str = Field("", description="why a value is missing (empty when all is well)")


def _num(values: dict[str, Any], key: str, default: float) -> float:
    try:
        v = values.get(key, default)
        return float(v) if v not in (None, "") else default
    except (TypeError, ValueError):
        return default


def frame_role(values: dict[str, Any]) -> str:
    """``saturating`` (shutter open, t > 0), ``dark`` (shutter closed, t > 0) or ``reset``. The
    shutter is ``shuttr`` when given; the 7.5.X exposure log does not carry it, and then the
    point-source mirror ``mirr_on`` (1 only in the saturating exposure) says it."""
    if _num(values, "exptime", 0.0) <= 0:
        return "reset"
    shutter = values.get("shuttr")
    lit = _num(values, "shuttr", 0.0) if shutter not in (None, "") else _num(values, "mirr_on", 0.0)
    return "saturating" if lit else "dark"


def extract(exposure: ExposureFrames, calib: Calibrations, params: PersistParams) -> PersistExtraction:
    role = frame_role(exposure.values())
    out = PersistExtraction(family="persist", unit=exposure_unit(exposure.obsid), obsids=[exposure.obsid], ccds=exposure.ccds(),
                            flags=exposure.flags, role=role, exptime=exposure.exptime, date=exposure.date)
    for ccd in exposure.ccds():
        v = exposure.values(ccd)
        vstart, vend = int(_num(v, "vstart", 0)), int(_num(v, "vend", 2086))
        out.quads[ccd] = {}
        for q, quad in exposure.quadrants(ccd).items():
            offset = reference_offset(quad, params.nsigma, vstart, vend)
            img = quad[:IMAGE_ROWS, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS]
            qp = QuadPersist(offset_adu=float(offset))
            if role == "dark":
                qp.level_adu = clipped_stats(img, params.nsigma, subsample=11).mean - offset
            elif role == "saturating":
                idx = np.flatnonzero(img >= ADC_MAX).astype(np.int64)
                qp.saturated, qp.n_saturated = idx, int(idx.size)
            out.quads[ccd][q] = qp
        exposure.release(ccd)
    return out


def _defects(calib: Calibrations, ccd: str) -> dict[str, np.ndarray] | None:
    """Canonical image-area defect masks of a CCD (True = defect) from dark_mask / defect_mask."""
    for name in (DEFECT_MASK, DARK_MASK):
        img = calib.image(name, ccd, "MASK")
        if img is not None:
            try:
                g = Geometry.from_shape(img.shape)
            except ValueError:
                continue
            return {q: np.asarray(quadrant(img, q, g)[:IMAGE_ROWS, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS] != 0) for q in QUADRANTS}
    return None


def inside_stats(img: np.ndarray, idx: np.ndarray, outside_mask: np.ndarray | None, nsigma: float) -> dict[str, float]:
    """Statistics (ADU) of the pixels ``idx`` of an offset-subtracted image area, minus the
    clipped mean of the pixels outside the mask."""
    flat = img.reshape(-1)
    keep = np.ones(flat.size, bool)
    keep[idx] = False
    outside = clipped_stats(flat[keep], nsigma, subsample=11).mean
    vals = flat[idx].astype(np.float64) - outside
    cs = clipped_stats(vals, nsigma)
    p25, p50, p75 = np.percentile(vals, [25, 50, 75]) if vals.size else (np.nan,) * 3
    return {"mean": cs.mean, "p25": float(p25), "p50": float(p50), "p75": float(p75), "std": float(vals.std()) if vals.size else float("nan"),
            "n": int(vals.size), "outside_adu": float(outside)}


def solve(extractions: list[PersistExtraction], calib: Calibrations, params: PersistParams, run: TestRun, sink: ProductSink) -> AnalysisOutput:
    exts = sorted(extractions, key=lambda e: e.obsids[0])
    if not exts:
        raise ValueError(f"{run.label}: no exposure to analyse")
    flags = Flag(run.flags)
    notes: list[str] = []
    sats = [e for e in exts if e.role == "saturating"]
    ccds = [c for c in ("CCD1", "CCD2", "CCD3") if any(c in e.quads for e in exts)]
    results: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    decay_curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    if not sats:
        flags |= Flag.MISSDATA
        for ccd in ccds:
            results[ccd] = {q: PersistQuadResult(reason="no saturating exposure (shutter open, exposure time > 0) in the test").model_dump()
                            for q in QUADRANTS}
        return AnalysisOutput(results=results, flags=int(flags), parameters=params.model_dump(mode="json"),
                              summary=[f"{run.label}: no saturating exposure: no persistence measured"])
    sat = sats[0]
    if len(sats) > 1:
        notes.append(f"{len(sats)} saturating exposures: ObsID {sat.obsids[0]} used")
    t_sat_end = sat.date.timestamp() + sat.exptime if sat.date else None
    refs = [e for e in exts if e.role == "dark" and e.obsids[0] < sat.obsids[0]]
    lats = [e for e in exts if e.role == "dark" and e.obsids[0] > sat.obsids[0]]
    frames_by = {(f.obsid, f.ccd_name): f for f in run.frames}
    for ccd in ccds:
        results[ccd] = {}
        decay_curves[ccd] = {}
        defects = _defects(calib, ccd)
        masks: dict[str, np.ndarray] = {}
        for q in QUADRANTS:
            qp = sat.quads.get(ccd, {}).get(q)
            idx = qp.saturated if qp is not None and qp.saturated is not None else np.zeros(0, np.int64)
            if defects is not None and idx.size:
                idx = idx[~defects[q].reshape(-1)[idx]]
            masks[q] = idx
        stats: dict[int, dict[str, dict[str, float]]] = {}
        for e in refs + lats:
            meta: FrameMeta | None = frames_by.get((e.obsids[0], ccd))
            if meta is None:
                notes.append(f"ObsID {e.obsids[0]} {ccd}: no frame file: left out")
                continue
            try:
                data = load_frame_data(meta)
            except Exception as exc:  # noqa: BLE001 - an unreadable frame is a note, not a crash
                notes.append(f"ObsID {e.obsids[0]} {ccd}: unreadable ({exc}): left out")
                continue
            quads = quadrants(data, Geometry.from_shape(data.shape))
            stats[e.obsids[0]] = {}
            for q in QUADRANTS:
                if masks[q].size == 0:
                    continue
                img = np.asarray(quads[q][:IMAGE_ROWS, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS], dtype=np.float32)
                img = img - np.float32(e.quads[ccd][q].offset_adu)
                st = inside_stats(img, masks[q], None, params.nsigma)
                t_mid = (e.date.timestamp() + e.exptime / 2 - t_sat_end) if (e.date and t_sat_end is not None) else float("nan")
                st["t_s"] = t_mid
                stats[e.obsids[0]][q] = st
                rows.append({"obsid": e.obsids[0], "ccd": ccd, "quadrant": q, "kind": "reference" if e in refs else "latent", **st})
            del data, quads
        for q in QUADRANTS:
            res: dict[str, Any] = {"n_saturated": int(masks[q].size)}
            if masks[q].size == 0:
                flags |= Flag.NONSATURATION
                res["reason"] = "the saturating exposure has no saturated pixel in this quadrant"
                results[ccd][q] = PersistQuadResult(**res).model_dump()
                continue
            ref_means = [stats[e.obsids[0]][q]["mean"] for e in refs if q in stats.get(e.obsids[0], {})]
            lat_stats = [stats[e.obsids[0]][q] for e in lats if q in stats.get(e.obsids[0], {})]
            reasons = []
            if not lat_stats:
                flags |= Flag.MISSDATA
                res["reason"] = "no latent dark after the saturating exposure"
                results[ccd][q] = PersistQuadResult(**res).model_dump()
                continue
            ref = float(np.mean(ref_means)) if ref_means else 0.0
            if not ref_means:
                reasons.append("no reference dark: the latent level is taken against the outside of the mask only")
            first = lat_stats[0]
            p = first["mean"] - ref
            ref_sd = float(np.std(ref_means, ddof=1)) if len(ref_means) > 1 else 0.0
            err = math.sqrt(ref_sd**2 + (first["std"] / math.sqrt(max(first["n"], 1))) ** 2)
            gain = calib.gain(ccd, q) if calib is not None else None
            res.update(persistence_adu=p, persistence_err_adu=err, persistence_e=p * gain if gain else None,
                       decay=[DecayPoint(t_s=s["t_s"], excess_adu=s["mean"] - ref) for s in lat_stats], reason="; ".join(reasons))
            decay_curves[ccd][q] = [(s["t_s"], s["mean"] - ref) for s in lat_stats]
            results[ccd][q] = PersistQuadResult(**res).model_dump()
        # mask product (frame orientation)
        geom = Geometry()
        full = {}
        for q in QUADRANTS:
            m = np.zeros((geom.quad_rows, geom.quad_cols), np.uint8)
            sub = np.zeros(IMAGE_ROWS * IMAGE_COLS, np.uint8)
            sub[masks[q]] = 1
            m[:IMAGE_ROWS, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS] = sub.reshape(IMAGE_ROWS, IMAGE_COLS)
            full[q] = m
        sink.add(ImageProduct(name=f"persist_mask_{ccd}", ccd=ccd, extensions={"MASK": assemble(full, geom, dtype=np.uint8)},
                              description="pixels saturated by the saturating exposure (1), cosmetic defects excluded"))
    if rows:
        sink.add(TableProduct("persist_stats", {k: [r[k] for r in rows] for k in rows[0]},
                              units={k: "ADU" for k in ("mean", "p25", "p50", "p75", "std", "outside_adu")} | {"t_s": "s"},
                              description="in-mask statistics of the reference and latent darks"))
        sink.add(FigureProduct("persist_decay", lambda fig: _draw(fig, decay_curves), size=(12, 4),
                               description="persistence excess vs time since the saturating exposure"))
    summary = [f"{run.label}: saturating ObsID {sat.obsids[0]}, {len(refs)} reference and {len(lats)} latent darks"]
    for ccd in ccds:
        for q in QUADRANTS:
            r = results[ccd][q]
            summary.append(f"{ccd} {q} Nsat={r['n_saturated']} p={r['persistence_adu']} +/- {r['persistence_err_adu']} ADU {r['reason']}")
    summary += [f"note: {n}" for n in notes]
    return AnalysisOutput(results=results, flags=int(flags), frames=rows, parameters=params.model_dump(mode="json"), summary=summary,
                          test_values={"saturating_obsid": sat.obsids[0], "references": [e.obsids[0] for e in refs],
                                       "latents": [e.obsids[0] for e in lats], "notes": notes})


def _draw(fig: Any, curves: dict[str, dict[str, list[tuple[float, float]]]]) -> None:
    axes = np.atleast_1d(fig.subplots(1, max(len(curves), 1), sharey=True))
    for ax, (ccd, quads) in zip(axes, curves.items()):
        for q, pts in quads.items():
            if pts:
                ax.plot([t for t, _ in pts], [v for _, v in pts], "o-", label=q)
        ax.set_title(ccd)
        ax.set_xlabel("time since saturation (s)")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("excess in the mask (ADU)")


FAMILY = Family(
    name="persist", tests=("PERSIST01",), params=PersistParams, extract=extract, solve=solve, unit="exposure",
    extraction=PersistExtraction, result=PersistQuadResult, needs=(Need(GAIN, "rerun", ("PTC01",)), Need(DARK_MASK, "rerun", ("DARK01",))),
)
