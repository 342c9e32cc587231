"""FOCUS00_<nm>, PSF01_<nm>, PSF02 (engine v2): point sources, focus, brighter-fatter on spots
and optical crosstalk (families.md, "Point sources").

**Extract** (per exposure; canonical orientation): per CCD and quadrant the offset (clipped mean
of the virtual pixels), the background level and noise of the image area, the spots found by
photutils on the offset-subtracted image area (:func:`services.analyzer.science.spots.detect_spots`)
and their measurements (annulus background, moments ``e1, e2, R2``, axis-aligned 2D Gaussian fit:
pixel-sampled ``FWHM_x, FWHM_y``, peak = fitted amplitude, aperture fluence, saturation, a
column departing from the profile); for the crosstalk, per (source, victim) quadrant pair the
sums ``n, Sx, Sy, Sxx, Sxy, Syy`` of the source pixels inside its spots (radius 2.5 FWHM,
unsaturated, > 20 x noise) against the victim's pixels at the same canonical positions
(background-subtracted; positions within 12 px + 3 FWHM of the victim's own spots excluded).

**Solve** (per test): the spot pattern is locked on one frame (most spots, then the highest
median peak) and every frame's spots are matched to it (within 3 px, 6 px for FOCUS00).
FOCUS00: per spot a parabola of FWHM^2 vs mirror position (>= 3 positions), best focus =
vertex, ``fwhm_at_focus_px`` = sqrt of the vertex value; per quadrant / CCD the 3-sigma clipped
mean of the spots' best focus (error = std / sqrt(n), or the spot's fit error for one spot).
PSF01/02: per spot FWHM vs fitted peak, robust straight line; ``fwhm_slope_px`` = the mean of
the spots' slopes per 10 000 ADU; FWHM x/y, e1, e2 at the exposure group nearest 50 % of 2^16
ADU peak; crosstalk from the frames whose median peak is >= 60 % of the brightest group's:
coefficient = pooled slope of the per-frame centred sums, error from the residual scatter;
requirement per victim: dominant coupling <= 6e-4 and at most one other > 7.6e-5 (REQNOTMET).
Spots saturated or on a bad column are left out (and said); a quadrant with fewer than 5 spots
is flagged STARS_MISSING; no spot at all: SOURCEOFF; FOCUS00 with fewer than 3 usable
positions: no number, BADFIT. Products: ``<TEST>_spots.fits``, figures.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from services.analyzer.family import BF_KERNEL, Calibrations, ExposureFrames, Extraction, Family, Need, TestRun, exposure_unit
from services.analyzer.model import AnalysisOutput, FigureProduct, ProductSink, TableProduct
from services.analyzer.science.preprocess import reference_offset
from services.analyzer.science.spots import SpotMeasure, background_noise, detect_spots, match_to_pattern, measure_spot, robust_line
from shared.flags import Flag
from shared.geometry import CCDS, IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, QUADRANTS

ADC_MAX = 65535.0
FULL_SCALE = 65536.0
SPOTS_EXPECTED = 5
DOMINANT_MAX = 6e-4
SECONDARY_MAX = 7.6e-5
LABELS = [f"{c}.{q}" for c in CCDS for q in QUADRANTS]


class PSFParams(BaseModel):
    """Analysis parameters of FOCUS00 / PSF01 / PSF02."""

    detect_nsigma: float = Field(15.0, description="detection threshold on the 4x4-binned image (noise sigmas)")
    max_spots: int = Field(20, description="spots measured per quadrant at most")
    match_radius_px: float = Field(3.0, description="matching radius to the locked pattern (px; x2 for FOCUS00)")
    min_positions: int = Field(3, description="FOCUS00: mirror positions a spot needs for its parabola")
    xtalk_min_snr: float = Field(20.0, description="crosstalk: source pixels above this many noise sigmas")
    xtalk_bright_fraction: float = Field(0.6, description="crosstalk: frames with median peak >= this x the brightest group's")
    expected_spots: int = Field(SPOTS_EXPECTED, description="spots per quadrant of the mask")
    ghost_fraction: float = Field(0.01, description="detections fainter than this x the quadrant's brightest spot are crosstalk ghosts")
    profile_tolerance: float = Field(0.12, description="a spot whose FWHM departs by more than this fraction from the median of "
                                     "the quadrant's other spots in a frame is distorted (bad column, defect)")


class QuadSpots(BaseModel):
    """Spots of one quadrant of one exposure."""

    offset_adu: float
    bgd_adu: float
    noise_adu: float
    spots: list[SpotMeasure] = Field(default_factory=list)


class PSFExtraction(Extraction):
    """One exposure: spots per CCD / quadrant, the registers the solve needs, crosstalk sums."""

    exptime: float = 0.0
    mirr_pos: float | None = None
    wave: float | None = None
    quads: dict[str, dict[str, QuadSpots]] = Field(default_factory=dict)
    xtalk_labels: list[str] = Field(default_factory=list)
    xtalk_sums: np.ndarray | None = Field(None, description="(source, victim, 6): n, Sx, Sy, Sxx, Sxy, Syy (ADU)")


class PSFQuadResult(BaseModel):
    """``results[CCD][Q]`` of FOCUS00 / PSF01 / PSF02 (px, mm, ADU)."""

    n_spots: int = Field(description="spots used (found, matched, neither saturated nor on a bad column; FOCUS00: with a parabola)")
    best_focus_mm: float | None = Field(None, description="FOCUS00: clipped mean of the spots' best-focus mirror positions (mm)")
    best_focus_err_mm: float | None = Field(None, description="FOCUS00: its error (mm)")
    fwhm_at_focus_px: float | None = Field(None, description="FOCUS00: pixel-sampled FWHM at best focus, mean over the spots (px)")
    fwhm_x_px: float | None = Field(None, description="PSF: pixel-sampled FWHM along x (serial) at the 50 % fluence, median over spots/frames")
    fwhm_y_px: float | None = Field(None, description="PSF: pixel-sampled FWHM along y (parallel) at the 50 % fluence")
    e1: float | None = Field(None, description="PSF: (Ixx - Iyy)/(Ixx + Iyy) at the 50 % fluence (moments)")
    e2: float | None = Field(None, description="PSF: 2 Ixy/(Ixx + Iyy) at the 50 % fluence")
    fwhm_slope_px: float | None = Field(None, description="PSF: brighter-fatter, FWHM change per 10 000 ADU of fitted peak (px, > 0 grows)")
    fwhm_slope_err_px: float | None = Field(None, description="PSF: its error (px per 10 000 ADU)")
    bf01_fwhm_slope_px: float | None = Field(None, description="PSF: BF01's predicted slope for its model spot (px per 10 000 ADU), "
                                             "when a BF01 result (bf_kernel calibration) is known")
    bf01_slope_ratio: float | None = Field(None, description="PSF: fwhm_slope_px / bf01_fwhm_slope_px (1: the PTC covariances "
                                           "explain the spot broadening)")
    crosstalk_requirement_met: bool | None = Field(None, description="PSF: this quadrant as a crosstalk victim meets the requirement")
    bgd_adu: float | None = Field(None, description="median background of the image area (ADU, offset-subtracted)")
    reason: str = Field("", description="why values are missing or flagged (empty when all is well)")


class PSFTestResult(BaseModel):
    """Test-level keys of ``results``."""

    best_focus_mm: float | None = Field(None, description="FOCUS00: mean of the CCDs' best focus (mm)")
    best_focus_ccd_mm: dict[str, float | None] | None = Field(None, description="FOCUS00: per CCD clipped mean of its spots (mm)")
    crosstalk: dict[str, dict[str, float]] | None = Field(None, description="PSF: source 'CCDn.Q' -> victim -> coupling (victim/source ADU)")
    crosstalk_err: dict[str, dict[str, float]] | None = Field(None, description="PSF: 1-sigma errors, same shape")
    crosstalk_requirement_met: dict[str, bool] | None = Field(None, description="PSF: per victim, dominant <= 6e-4 and at most one other > 7.6e-5")


# ------------------------------------------------------------------------------------ extraction


def _num(values: dict[str, Any], key: str, default: float | None) -> float | None:
    try:
        v = values.get(key, default)
        return float(v) if v not in (None, "") else default
    except (TypeError, ValueError):
        return default


def quadrant_spots(quad: np.ndarray, params: PSFParams, vstart: int = 0, vend: int = 2086) -> tuple[QuadSpots, np.ndarray]:
    """Spots of one canonical quadrant; also returns the offset-subtracted image area (float32)."""
    offset = reference_offset(quad, vstart=vstart, vend=vend)
    img = np.asarray(quad[:IMAGE_ROWS, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS], dtype=np.float32) - np.float32(offset)
    level, noise = background_noise(img)
    found = detect_spots(img - np.float32(level), params.detect_nsigma, params.max_spots)
    sat = ADC_MAX - offset - 0.5
    spots = []
    for x, y in found:
        m = measure_spot(img, x, y, noise, sat, 2.0)
        if m is not None and m.fwhm_x_px and m.fwhm_x_px > 6.0:  # defocused: measure again with a wider stamp
            m = measure_spot(img, m.x, m.y, noise, sat, m.fwhm_px / 2.3548 * 1.5) or m
        if m is not None and m.fluence_adu > 0:
            spots.append(m)
    if spots:  # optical-crosstalk ghosts of other quadrants' spots (< 1e-3 of a spot) are not spots
        top = max(s.fluence_adu for s in spots)
        spots = [s for s in spots if s.fluence_adu >= params.ghost_fraction * top]
    return QuadSpots(offset_adu=float(offset), bgd_adu=level, noise_adu=noise, spots=spots), img


def crosstalk_sums(images: dict[str, np.ndarray], spots: dict[str, QuadSpots], params: PSFParams) -> np.ndarray:
    """``(12, 12, 6)`` regression sums of victim vs source pixels (module docstring)."""
    out = np.zeros((len(LABELS), len(LABELS), 6))
    excl: dict[str, list[tuple[float, float, float]]] = {}
    for lab, qs in spots.items():
        excl[lab] = [(s.x, s.y, 12.0 + 3.0 * (s.fwhm_px or 2.0)) for s in qs.spots]
    for i, src in enumerate(LABELS):
        if src not in images:
            continue
        img, qs = images[src], spots[src]
        rows, cols = [], []
        for s in qs.spots:
            if s.saturated or not s.fit_ok:
                continue
            rad = 2.5 * (s.fwhm_px or 2.0)
            r0, r1 = int(max(s.y - rad, 0)), int(min(s.y + rad + 1, IMAGE_ROWS))
            c0, c1 = int(max(s.x - rad, 0)), int(min(s.x + rad + 1, IMAGE_COLS))
            gy, gx = np.mgrid[r0:r1, c0:c1]
            cut = img[r0:r1, c0:c1] - np.float32(qs.bgd_adu)
            ok = ((gx - s.x) ** 2 + (gy - s.y) ** 2 <= rad * rad) & (cut > params.xtalk_min_snr * qs.noise_adu)
            ok &= img[r0:r1, c0:c1] < ADC_MAX - qs.offset_adu - 100.0
            rows.append(gy[ok]), cols.append(gx[ok])
        if not rows:
            continue
        r = np.concatenate(rows)
        c = np.concatenate(cols)
        if r.size < 3:
            continue
        xsrc = (img[r, c] - np.float32(qs.bgd_adu)).astype(np.float64)
        for j, vic in enumerate(LABELS):
            if vic == src or vic not in images:
                continue
            keep = np.ones(r.size, bool)
            for ex, ey, er in excl.get(vic, []):
                keep &= (c - ex) ** 2 + (r - ey) ** 2 > er * er
            if keep.sum() < 3:
                continue
            x = xsrc[keep]
            y = (images[vic][r[keep], c[keep]] - np.float32(spots[vic].bgd_adu)).astype(np.float64)
            out[i, j] = (x.size, x.sum(), y.sum(), (x * x).sum(), (x * y).sum(), (y * y).sum())
    return out


def extract(exposure: ExposureFrames, calib: Calibrations, params: PSFParams) -> PSFExtraction:
    values = exposure.values()
    out = PSFExtraction(family="psf", unit=exposure_unit(exposure.obsid), obsids=[exposure.obsid], ccds=exposure.ccds(),
                        flags=exposure.flags, exptime=exposure.exptime, mirr_pos=_num(values, "mirr_pos", None),
                        wave=_num(values, "wave", None))
    images: dict[str, np.ndarray] = {}
    spots: dict[str, QuadSpots] = {}
    for ccd in exposure.ccds():
        v = exposure.values(ccd)
        vstart, vend = int(_num(v, "vstart", 0) or 0), int(_num(v, "vend", 2086) or 2086)
        quads = exposure.quadrants(ccd)
        out.quads[ccd] = {}
        for q in QUADRANTS:
            qs, img = quadrant_spots(quads[q], params, vstart, vend)
            out.quads[ccd][q] = qs
            images[f"{ccd}.{q}"] = img
            spots[f"{ccd}.{q}"] = qs
        exposure.release(ccd)
    if any(qs.spots for qs in spots.values()):
        out.xtalk_labels = list(LABELS)
        out.xtalk_sums = crosstalk_sums(images, spots, params)
    return out


# ------------------------------------------------------------------------------------ solve


def _clipped_mean(values: list[float], nsigma: float = 3.0) -> tuple[float, float, int]:
    v = np.asarray(values, float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan"), 0
    keep = np.ones(v.size, bool)
    for _ in range(5):
        m, s = v[keep].mean(), v[keep].std()
        new = np.abs(v - m) <= max(nsigma * s, 1e-12) if v.size > 2 else keep
        if np.array_equal(new, keep):
            break
        keep = new
    k = v[keep]
    err = float(k.std(ddof=1) / math.sqrt(k.size)) if k.size > 1 else float("nan")
    return float(k.mean()), err, int(k.size)


def fit_focus(z: np.ndarray, fwhm: np.ndarray, min_positions: int = 3) -> tuple[dict[str, float] | None, str]:
    """Parabola of FWHM^2 vs mirror position: (best focus mm and error, FWHM at focus px), reason."""
    z, f2 = np.asarray(z, float), np.asarray(fwhm, float) ** 2
    good = np.isfinite(z) & np.isfinite(f2)
    z, f2 = z[good], f2[good]
    npos = np.unique(np.round(z, 4)).size
    if npos < min_positions:
        return None, f"{npos} usable mirror positions (at least {min_positions} needed)"
    zc = z.mean()
    coef, cov = np.polyfit(z - zc, f2, 2, cov=True) if z.size > 3 else (np.polyfit(z - zc, f2, 2), np.full((3, 3), np.nan))
    a, b, c = coef
    if not a > 0:
        return None, "FWHM^2 vs mirror position is not convex (no minimum)"
    zb = -b / (2 * a)
    # error propagation of -b / 2a
    g = np.array([b / (2 * a * a), -1 / (2 * a), 0.0])
    err = float(math.sqrt(max(g @ cov @ g, 0.0))) if np.all(np.isfinite(cov)) else float("nan")
    vertex = c - b * b / (4 * a)
    if vertex <= 0:
        return None, "the parabola's minimum is not positive"
    if not (z.min() - 0.5 * np.ptp(z) <= zb + zc <= z.max() + 0.5 * np.ptp(z)):
        return None, "best focus far outside the swept mirror range"
    return {"best_focus_mm": float(zb + zc), "best_focus_err_mm": err, "fwhm_at_focus_px": float(math.sqrt(vertex))}, ""


def _distorted_spots(per_spot: list[list[tuple[Any, SpotMeasure]]], tolerance: float) -> set[int]:
    """Spots whose FWHM x or y departs by more than ``tolerance`` (fraction) from the median of
    the quadrant's other spots in the same frame (>= 3 spots), in any unsaturated frame."""
    by_frame: dict[int, dict[int, SpotMeasure]] = {}
    for k, meas in enumerate(per_spot):
        for e, m in meas:
            if m.fit_ok and not m.saturated:
                by_frame.setdefault(e.obsids[0], {})[k] = m
    out: set[int] = set()
    for spots in by_frame.values():
        if len(spots) < 3:
            continue
        for axis in ("fwhm_x_px", "fwhm_y_px"):
            med = float(np.median([getattr(m, axis) for m in spots.values()]))
            out |= {k for k, m in spots.items() if abs(getattr(m, axis) / med - 1.0) > tolerance}
    return out


def _lock_frame(exts: list[PSFExtraction]) -> PSFExtraction | None:
    def score(e: PSFExtraction) -> tuple[int, float]:
        n = sum(len(qs.spots) for quads in e.quads.values() for qs in quads.values())
        peaks = [s.peak_adu for quads in e.quads.values() for qs in quads.values() for s in qs.spots
                 if s.peak_adu and not s.saturated]
        return n, float(np.median(peaks)) if peaks else 0.0

    best = max(exts, key=score, default=None)
    return best if best is not None and score(best)[0] > 0 else None


def crosstalk_matrix(exts: list[PSFExtraction]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pooled slope and error (12 x 12) from the per-frame regression sums; also the pixel count."""
    sxx = np.zeros((len(LABELS), len(LABELS)))
    sxy = np.zeros_like(sxx)
    syy = np.zeros_like(sxx)
    n = np.zeros_like(sxx)
    nf = np.zeros_like(sxx)
    for e in exts:
        s = e.xtalk_sums
        if s is None:
            continue
        cnt = s[..., 0]
        ok = cnt >= 3
        safe = np.where(ok, cnt, 1.0)
        sxx += np.where(ok, s[..., 3] - s[..., 1] ** 2 / safe, 0.0)
        sxy += np.where(ok, s[..., 4] - s[..., 1] * s[..., 2] / safe, 0.0)
        syy += np.where(ok, s[..., 5] - s[..., 2] ** 2 / safe, 0.0)
        n += np.where(ok, cnt, 0.0)
        nf += ok
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(sxx > 0, sxy / sxx, np.nan)
        resid = np.maximum(syy - slope * sxy, 0.0)
        dof = np.maximum(n - nf - 1, 1.0)
        err = np.sqrt(resid / dof / np.where(sxx > 0, sxx, np.nan))
    return slope, err, n


def requirement_met(couplings: dict[str, float]) -> bool:
    """Dominant coupling <= 6e-4 and at most one other > 7.6e-5."""
    v = sorted((abs(c) for c in couplings.values() if c is not None and math.isfinite(c)), reverse=True)
    return not v or (v[0] <= DOMINANT_MAX and sum(1 for c in v[1:] if c > SECONDARY_MAX) <= 1)


def solve(extractions: list[PSFExtraction], calib: Calibrations, params: PSFParams, run: TestRun, sink: ProductSink) -> AnalysisOutput:
    focus = run.test.upper().startswith("FOCUS")
    flags = Flag(run.flags)
    notes: list[str] = []
    exts = sorted(extractions, key=lambda e: e.obsids[0])
    if not exts:
        raise ValueError(f"{run.label}: no point-source exposure to analyse")
    dark = [e.obsids[0] for e in exts if not any(qs.spots for quads in e.quads.values() for qs in quads.values())]
    if dark:
        flags |= Flag.SOURCEOFF
        notes.append(f"no spot in ObsID {', '.join(map(str, dark))} (shutter closed or source off): left out")
    lit = [e for e in exts if e.obsids[0] not in dark]
    lock = _lock_frame(lit)
    ccds = [c for c in CCDS if any(c in e.quads for e in exts)]
    results: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    curves: dict[str, dict[str, list]] = {}
    radius = params.match_radius_px * (2 if focus else 1)
    spot_focus: dict[str, list[float]] = {}
    for ccd in ccds:
        results[ccd] = {}
        curves[ccd] = {}
        for q in QUADRANTS:
            reasons: list[str] = []
            bgds = [e.quads[ccd][q].bgd_adu for e in exts if q in e.quads.get(ccd, {})]
            res: dict[str, Any] = {"n_spots": 0, "bgd_adu": float(np.median(bgds)) if bgds else None}
            locked = lock.quads.get(ccd, {}).get(q) if lock else None
            pattern = [(s.x, s.y) for s in sorted(locked.spots, key=lambda s: (s.y, s.x))] if locked else []
            if not pattern:
                flags |= Flag.SOURCEOFF
                res["reason"] = "no spot found in any frame (shutter closed or source off)"
                results[ccd][q] = PSFQuadResult(**res).model_dump()
                continue
            if len(pattern) < params.expected_spots:
                flags |= Flag.STARS_MISSING
                reasons.append(f"{len(pattern)} spots found, {params.expected_spots} expected")
            per_spot: list[list[tuple[PSFExtraction, SpotMeasure]]] = [[] for _ in pattern]
            for e in lit:
                if q not in e.quads.get(ccd, {}):
                    continue
                found = e.quads[ccd][q].spots
                for k, idx in enumerate(match_to_pattern(pattern, [(s.x, s.y) for s in found], radius)):
                    if idx is not None:
                        per_spot[k].append((e, found[idx]))
                        s = found[idx]
                        rows.append({"CCD": ccd, "QUAD": q, "SPOT": k, "X": s.x, "Y": s.y, "FRAME_OBSID": e.obsids[0],
                                     "PEAK_ADU": s.peak_adu if s.peak_adu is not None else float("nan"), "FLUENCE_ADU": s.fluence_adu,
                                     "FWHM_X_PX": s.fwhm_x_px if s.fwhm_x_px is not None else float("nan"),
                                     "FWHM_Y_PX": s.fwhm_y_px if s.fwhm_y_px is not None else float("nan"), "E1": s.e1, "E2": s.e2,
                                     "MIRR_POS": e.mirr_pos if e.mirr_pos is not None else float("nan"), "SATURATED": s.saturated,
                                     "BAD_COLUMN": s.bad_column})
            distorted = _distorted_spots(per_spot, params.profile_tolerance)
            usable = []
            for k, meas in enumerate(per_spot):
                if any(m.bad_column for _, m in meas) or k in distorted:
                    reasons.append(f"spot {k} on a bad column (its profile departs from the fit or from the other spots): left out")
                    continue
                n_sat = sum(1 for _, m in meas if m.saturated)
                if n_sat:
                    reasons.append(f"spot {k} saturated in {n_sat} frame(s): those left out")
                meas = [(e, m) for e, m in meas if not m.saturated and m.fit_ok]
                if meas:
                    usable.append((k, meas))
            curves[ccd][q] = usable
            if focus:
                fits = []
                for k, meas in usable:
                    fit, why = fit_focus(np.array([e.mirr_pos if e.mirr_pos is not None else np.nan for e, _ in meas]),
                                         np.array([m.fwhm_px for _, m in meas]), params.min_positions)
                    if fit is None:
                        reasons.append(f"spot {k}: {why}")
                    else:
                        fits.append(fit)
                res["n_spots"] = len(fits)
                if fits:
                    bf, err, _n = _clipped_mean([f["best_focus_mm"] for f in fits])
                    res["best_focus_mm"] = bf
                    res["best_focus_err_mm"] = err if math.isfinite(err) else fits[0]["best_focus_err_mm"]
                    res["fwhm_at_focus_px"] = float(np.mean([f["fwhm_at_focus_px"] for f in fits]))
                    spot_focus.setdefault(ccd, []).extend(f["best_focus_mm"] for f in fits)
                else:
                    flags |= Flag.BADFIT
            else:
                res["n_spots"] = len(usable)
                slopes, serrs = [], []
                for k, meas in usable:
                    peaks = np.array([m.peak_adu for _, m in meas])
                    fw = np.array([m.fwhm_px for _, m in meas])
                    if np.unique(np.round(peaks, -2)).size >= 2 and peaks.size >= 3 and np.ptp(peaks) > 0.2 * peaks.max():
                        _, b, _, eb, _ = robust_line(peaks / 1e4, fw)
                        if math.isfinite(b):
                            slopes.append(b), serrs.append(eb)
                if slopes:
                    res["fwhm_slope_px"] = float(np.mean(slopes))
                    res["fwhm_slope_err_px"] = float(np.std(slopes, ddof=1) / math.sqrt(len(slopes))) if len(slopes) > 1 else serrs[0]
                elif usable:
                    reasons.append("no spot spans a range of peaks: no brighter-fatter slope")
                # values at the exposure group nearest 50 % of 2^16 ADU peak
                groups: dict[float, list[SpotMeasure]] = {}
                for k, meas in usable:
                    for e, m in meas:
                        groups.setdefault(round(e.exptime, 4), []).append(m)
                if groups:
                    g = min(groups.values(), key=lambda ms: abs(np.median([m.max_adu for m in ms]) - 0.5 * FULL_SCALE))
                    res.update(fwhm_x_px=float(np.median([m.fwhm_x_px for m in g])), fwhm_y_px=float(np.median([m.fwhm_y_px for m in g])),
                               e1=float(np.median([m.e1 for m in g])), e2=float(np.median([m.e2 for m in g])))
            res["reason"] = "; ".join(reasons)
            results[ccd][q] = PSFQuadResult(**res).model_dump()
    test_values: dict[str, Any] = {"frames": len(exts), "lock_obsid": lock.obsids[0] if lock else None}
    if focus:
        per_ccd = {}
        for ccd in ccds:
            m, _, n = _clipped_mean(spot_focus.get(ccd, []))
            per_ccd[ccd] = m if n else None
        good = [v for v in per_ccd.values() if v is not None]
        results["best_focus_mm"] = float(np.mean(good)) if good else None
        results["best_focus_ccd_mm"] = per_ccd
        if not good:
            flags |= Flag.BADFIT
    elif lit:
        flags = _solve_crosstalk(lit, params, results, flags, notes)
    if not focus:
        bfc = calib.get(BF_KERNEL)
        if bfc is not None:
            pred = bfc.values.get("fwhm_slope_px")
            if pred:
                for ccd, quads in results.items():
                    if not isinstance(quads, dict) or ccd not in pred:
                        continue
                    for q, r in quads.items():
                        p_slope = (pred.get(ccd) or {}).get(q)
                        if isinstance(r, dict) and p_slope:
                            r["bf01_fwhm_slope_px"] = float(p_slope)
                            if r.get("fwhm_slope_px") is not None:
                                r["bf01_slope_ratio"] = float(r["fwhm_slope_px"] / p_slope)
                test_values["bf01_source"] = bfc.test
            else:
                notes.append(f"{BF_KERNEL} of {bfc.test} carries no spot-broadening prediction: no comparison with BF01")
    if rows:
        cols = list(rows[0])
        sink.add(TableProduct(f"{run.test}_spots", {c: [r[c] for r in rows] for c in cols},
                              units={"X": "px", "Y": "px", "PEAK_ADU": "ADU", "FLUENCE_ADU": "ADU", "FWHM_X_PX": "px", "FWHM_Y_PX": "px",
                                     "MIRR_POS": "mm"},
                              description="spots per frame (canonical image-area coordinates; SPOT = index in the locked pattern)"))
        sink.add(FigureProduct(f"{run.test}_fwhm", lambda fig: _draw_fwhm(fig, curves, focus), size=(15, 5),
                               description="FWHM vs mirror position" if focus else "FWHM vs fitted peak"))
    if isinstance(results.get("crosstalk"), dict):
        sink.add(FigureProduct(f"{run.test}_crosstalk", lambda fig: _draw_xtalk(fig, results["crosstalk"]), size=(8, 7),
                               description="optical crosstalk matrix (source rows, victim columns), log10"))
    summary = [f"{run.label}: {len(exts)} frames, pattern locked on ObsID {test_values['lock_obsid']}"]
    for ccd in ccds:
        for q in QUADRANTS:
            r = results[ccd][q]
            if focus:
                summary.append(f"{ccd} {q} n={r['n_spots']} focus={r['best_focus_mm']} mm fwhm={r['fwhm_at_focus_px']}")
            else:
                summary.append(f"{ccd} {q} n={r['n_spots']} fwhm x/y={r['fwhm_x_px']}/{r['fwhm_y_px']} slope={r['fwhm_slope_px']}")
    summary += [f"note: {n}" for n in notes]
    return AnalysisOutput(results=results, flags=int(flags), frames=[], parameters=params.model_dump(mode="json"),
                          summary=summary, test_values={**test_values, "notes": notes})


def _solve_crosstalk(exts: list[PSFExtraction], params: PSFParams, results: dict[str, Any], flags: Flag, notes: list[str]) -> Flag:
    """The crosstalk matrix, its errors and the per-victim verdict into ``results``; the flags."""
    groups: dict[float, list[float]] = {}
    for e in exts:
        peaks = [s.max_adu for quads in e.quads.values() for qs in quads.values() for s in qs.spots if not s.saturated]
        if peaks:
            groups.setdefault(round(e.exptime, 4), []).append(float(np.median(peaks)))
    if not groups:
        return flags
    top = max(np.median(v) for v in groups.values())
    bright = [e for e in exts if round(e.exptime, 4) in groups and np.median(groups[round(e.exptime, 4)]) >= params.xtalk_bright_fraction * top]
    slope, err, n = crosstalk_matrix(bright)
    xt: dict[str, dict[str, float]] = {}
    xe: dict[str, dict[str, float]] = {}
    for i, s in enumerate(LABELS):
        for j, v in enumerate(LABELS):
            if i != j and np.isfinite(slope[i, j]):
                xt.setdefault(s, {})[v] = float(slope[i, j])
                xe.setdefault(s, {})[v] = float(err[i, j])
    verdict = {}
    for v in LABELS:
        into = {s: xt[s][v] for s in xt if v in xt[s]}
        if into:
            verdict[v] = requirement_met(into)
    results["crosstalk"], results["crosstalk_err"], results["crosstalk_requirement_met"] = xt, xe, verdict
    failed = [v for v, ok in verdict.items() if not ok]
    if failed:
        flags |= Flag.REQNOTMET
        notes.append(f"crosstalk requirement not met for victim(s) {', '.join(failed)}")
    for v, ok in verdict.items():
        ccd, q = v.split(".")
        if ccd in results and q in results[ccd]:
            results[ccd][q]["crosstalk_requirement_met"] = ok
    return flags


def _draw_fwhm(fig: Any, curves: dict[str, dict[str, list]], focus: bool) -> None:
    axes = np.atleast_1d(fig.subplots(1, max(len(curves), 1), sharey=True))
    for ax, (ccd, quads) in zip(axes, curves.items()):
        for q, usable in quads.items():
            for k, meas in usable:
                x = [e.mirr_pos if focus else (m.peak_adu or 0) for e, m in meas]
                ax.plot(x, [m.fwhm_px for _, m in meas], ".", ms=3, label=f"{q}{k}" if k == 0 else None)
        ax.set_title(ccd)
        ax.set_xlabel("mirror position (mm)" if focus else "fitted peak (ADU)")
    axes[0].set_ylabel("FWHM (px)")


def _draw_xtalk(fig: Any, xt: dict[str, dict[str, float]]) -> None:
    m = np.full((len(LABELS), len(LABELS)), np.nan)
    for i, s in enumerate(LABELS):
        for j, v in enumerate(LABELS):
            c = xt.get(s, {}).get(v)
            if c is not None and c > 0:
                m[i, j] = math.log10(c)
    ax = fig.subplots()
    im = ax.imshow(m, cmap="viridis", vmin=-7, vmax=-3)
    ax.set_xticks(range(len(LABELS)), LABELS, rotation=90, fontsize=7)
    ax.set_yticks(range(len(LABELS)), LABELS, fontsize=7)
    ax.set_xlabel("victim")
    ax.set_ylabel("source")
    fig.colorbar(im, ax=ax, label="log10 coupling")


FAMILY = Family(
    name="psf", tests=("FOCUS00", "PSF01", "PSF02"), params=PSFParams, extract=extract, solve=solve, unit="exposure",
    extraction=PSFExtraction, result=PSFQuadResult, test_result=PSFTestResult, needs=(Need(BF_KERNEL, "rerun", ("BF01",)),),
)
