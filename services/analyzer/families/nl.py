"""NL01 / NL02: non-linearity of the detection chain from flats of increasing exposure time
(engine v2 plug-in: extract per exposure, solve per test run).

**Extraction** (per exposure, CCD and canonical quadrant): fluence F = clipped mean of the image
area (standard trim) minus the offset (clipped mean of the trimmed prescan: a median would be
biased by the ADC quantisation); the "pile-up" fraction (pixels within 6 RON of the frame
maximum when that is above half the ADC scale: full-well or ADC saturation); the exposure's
time, exposure time, wavelength and role hint (exposure-log ``role`` or comment STAB / BGD / FLU).

**Solve** (per quadrant, ``method="low"``, the default):

1. roles: background (hint BGD, else exptime 0 or F < ``background_max_adu``), stability (hint
   STAB, else ``stability_exptime``, else the most repeated exposure time), signal; the mean
   background fluence is subtracted from every frame;
2. source drift: a cubic smoothing spline in time through the stability fluences (smoothed down
   to their noise, estimated from their second differences), normalised to its mean over the
   stability frames; every fluence is divided by the drift at its time (``drift_method="poly"``:
   the old polynomial of degree ``drift_degree``);
3. linear reference from the low-fluence frames (F <= ``linear_max_frac`` x 2^16), per
   wavelength: ``F = a0 + a1 t + a2 t^2`` (``linear_degree``); the shutter offset dt is where it
   crosses F = 0 (``t = -dt``: the shutter opens ``dt`` longer than commanded) and the linear
   reference is its tangent there, ``F_lin = r_w (t + dt)``;
4. NL curve: ``F = F_lin (1 + nl(F_lin / S))`` with nl a cubic regression spline in u = F_lin / S
   (S = 2^16 ADU; basis u, u^2, u^3, (u - k)^3_+ at ``curve_knots`` x the largest fitted u; nl(0)
   = 0 and slope 1 at zero by construction), rates fixed by step 3 (fitted here for a wavelength
   without low-fluence frames, NL02's 880 nm); points above ``max_fit_frac`` x 2^16 or piled up
   left out; 5-sigma iterative rejection;
5. NL % = 100 (F - F_lin) / F_lin per frame, the curve 100 nl(u); ``max_nl_pct`` = the signed
   value of largest |NL| of the curve over the fitted range, ``max_nl_fluence_adu`` where it
   occurs (measured fluence).

``method="global"``: the old analysis (one global polynomial F = b + L + sum c_k L^k / S^(k-1),
tangent at zero as the linear reference), kept for comparison.

Provides ``linearity``: per CCD / quadrant the curve's coefficients and a table measured ->
linear fluence (ADU), enough for a linearity correction ``np.interp(F, measured, linear)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, Field
from scipy import optimize

from services.analyzer.family import (
    LINEARITY,
    Calibrations,
    ExposureFrames,
    Extraction,
    Family,
    TestRun,
    exposure_unit,
)
from services.analyzer.model import AnalysisOutput, FigureProduct, ProductSink, TableProduct
from services.analyzer.science.preprocess import row_offsets
from services.analyzer.science.stats import clipped_stats, group_by, mad_std
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, QUADRANTS, STANDARD_TRIMS, region

TESTS = ("NL01", "NL02")
FULL_SCALE = 65536.0


class NLParams(BaseModel):
    """Analysis parameters of NL01/02."""

    offset_method: Literal["mean", "global", "row"] = Field("mean", description="offset: mean (clipped mean of the trimmed prescan) | global | row")
    nsigma: float = Field(4.0, description="clipping of the frame fluences")
    quadrants: tuple[str, ...] = Field(QUADRANTS, description="quadrants analysed")
    background_max_adu: float = Field(50.0, description="frames below this fluence are background frames (when no role is given)")
    stability_exptime: float | None = Field(None, description="exposure time of the stability frames (default: the most repeated one)")
    method: Literal["low", "global"] = Field("low", description="low: linear reference from the low-fluence frames + spline NL curve | global: the old global polynomial")
    drift_method: Literal["spline", "poly"] = Field("spline", description="drift model in time of the stability frames: spline (smoothing) | poly")
    drift_degree: int = Field(2, ge=0, description="degree of the drift polynomial in time (drift_method=poly)")
    linear_max_frac: float = Field(0.3, gt=0, le=1, description="frames up to this fraction of 2^16 ADU define the linear reference")
    linear_start_frac: float = Field(0.05, gt=0, description="a wavelength has its own linear reference only with frames below this fraction of 2^16 ADU")
    linear_degree: int = Field(2, ge=1, le=3, description="degree in t of the low-fluence fit (its tangent at F = 0 is the reference)")
    shutter_offset: bool = Field(True, description="estimate the shutter offset (else dt = 0: F_lin = r t + F(0))")
    curve_knots: tuple[float, ...] = Field((0.3, 0.55, 0.75, 0.9), description="interior knots of the NL spline (fractions of the largest fitted u)")
    fit_degree: int = Field(3, ge=2, le=6, description="degree of the fluence polynomial (method=global)")
    max_fit_frac: float = Field(0.98, description="largest fluence fitted (fraction of 2^16 ADU)")
    pileup_max: float = Field(1e-5, description="frames with more piled-up (saturated) pixels are not fitted")
    outlier_nsigma: float = Field(5.0, description="iterative rejection of the fit")
    rel_error_floor: float = Field(2e-5, description="relative fluence error floor of the fit weights")
    abs_error_adu: float = Field(0.05, description="absolute fluence error (ADU) of the fit weights")
    curve_points: int = Field(200, description="points of the smooth NL curve")
    table_points: int = Field(64, description="points of the linearity table provided to other tests")


# ----------------------------------------------------------------------------- extraction


class NLQuadMeasure(BaseModel):
    """One quadrant of one NL exposure."""

    fluence_adu: float = Field(description="offset-subtracted clipped mean of the image area (ADU)")
    pileup_frac: float = Field(description="fraction of image pixels piled up at the frame maximum (saturation)")


class NLExtraction(Extraction):
    """One NL exposure: exposure time (s), wavelength, start time (s, POSIX), role hint and the
    per CCD / quadrant fluence and pile-up."""

    exptime: float
    wave: float | None = None
    time_s: float = Field(float("nan"), description="exposure start (POSIX s); NaN when unknown")
    role_hint: str = Field("", description="stability | background | signal from the exposure log, '' when not said")
    quads: dict[str, dict[str, NLQuadMeasure]] = Field(default_factory=dict)


def frame_fluence(quad: np.ndarray, params: NLParams) -> tuple[float, float]:
    """(fluence ADU, piled-up fraction) of one canonical quadrant."""
    off = row_offsets(quad, params.offset_method)
    lead, trail = STANDARD_TRIMS["img"]
    img = np.asarray(quad[:IMAGE_ROWS, PRESCAN_COLS + lead : PRESCAN_COLS + IMAGE_COLS - trail], dtype=np.float32)
    img = img - off[:IMAGE_ROWS, None].astype(np.float32)
    st = clipped_stats(img, params.nsigma, subsample=7)
    ron = clipped_stats(region(quad, "ove", STANDARD_TRIMS["ove"]), 4.0, maxiters=5).std_corrected
    top = float(np.max(img))
    # saturation (full well or ADC) only happens in the upper half of the scale
    pile = float(np.count_nonzero(img >= top - 6.0 * max(ron, 0.5)) / img.size) if top > 0.5 * FULL_SCALE else 0.0
    return st.mean, pile


_COMMENT_ROLES = {"stab": "stability", "bgd": "background", "flu": "signal"}


def role_hint(values: dict[str, Any]) -> str:
    """``stability`` / ``background`` / ``signal`` from exposure-log values (``role`` or the
    comment STAB / BGD / FLU), '' when they say nothing."""
    r = str(values.get("role") or _COMMENT_ROLES.get(str(values.get("comments", "")).strip().lower(), "")).lower()
    return r if r in ("stability", "background", "signal") else ""


def extract(exposure: ExposureFrames, calib: Calibrations, params: NLParams) -> NLExtraction:
    """Per-exposure extraction (its own frames only)."""
    quads: dict[str, dict[str, NLQuadMeasure]] = {}
    for ccd in exposure.ccds():
        qv = exposure.quadrants(ccd)
        quads[ccd] = {}
        for q in params.quadrants:
            if q in qv:
                f, pile = frame_fluence(qv[q], params)
                quads[ccd][q] = NLQuadMeasure(fluence_adu=f, pileup_frac=pile)
        exposure.release(ccd)
    t = exposure.date.timestamp() if exposure.date is not None else float("nan")
    return NLExtraction(family="nl", unit=exposure_unit(exposure.obsid), obsids=[exposure.obsid], ccds=exposure.ccds(),
                        flags=exposure.flags, exptime=exposure.exptime, wave=exposure.wave, time_s=t,
                        role_hint=role_hint(exposure.values()), quads=quads)


# ----------------------------------------------------------------------------- results


class NLFrameQuad(BaseModel):
    """Per frame and quadrant (table ``nl_frames``)."""

    obsid: int
    ccd: str
    quadrant: str
    exptime: float = Field(description="commanded exposure time (s)")
    wave: float | None = Field(None, description="wavelength (nm) or filter position of the exposure log")
    time_s: float = Field(description="exposure start (s; POSIX, or ObsID order when unknown)")
    role: str = Field(description="signal | stability | background")
    fluence_raw_adu: float = Field(description="offset-subtracted fluence before background / drift correction (ADU)")
    pileup_frac: float = Field(description="fraction of image pixels piled up at the frame maximum (saturation)")
    drift: float = Field(description="relative source level at the frame's time (1 = mean of the stability frames)")
    fluence_adu: float = Field(description="background-subtracted, drift-corrected fluence (ADU)")
    fluence_lin_adu: float = Field(description="linear reference fluence at the frame's exposure time (ADU)")
    nl_pct: float = Field(description="100 (F - F_lin) / F_lin (%)")
    fitted: bool = Field(description="used in the NL curve fit")


class NLQuadResult(BaseModel):
    """Per CCD quadrant result of NL01/02 (``results[CCD][Q]``). NL sign: positive when the
    measured fluence is above the linear reference (super-linear)."""

    max_nl_pct: float = Field(description="signed NL (%) of largest |NL| on the fitted curve over the fitted range")
    max_nl_fluence_adu: float = Field(description="measured fluence (ADU) where |NL| is largest")
    fit_range_adu: tuple[float, float] = Field(description="measured fluence range of the fitted frames (ADU)")
    model: str = Field("spline", description="spline (cubic regression spline in u = F_lin / 2^16) | poly (old global polynomial)")
    coeffs: list[float] = Field(description="spline: coefficients of u, u^2, u^3, (u - k)^3_+ (nl as a fraction); "
                                "poly: [b (ADU), c2, c3, ...] of F = b + L + sum c_k L^k / S^(k-1)")
    knots: list[float] = Field(default_factory=list, description="interior knots (u) of the NL spline")
    rates_adu_s: dict[str, float] = Field(description="r_w (ADU/s) per wavelength: slope of the linear reference")
    shutter_offset_s: float = Field(description="shutter offset dt (s): F_lin = r (t + dt), positive = open longer than commanded")
    shutter_offset_err_s: float = Field(description="1-sigma error of the shutter offset (s)")
    linear_range_adu: tuple[float, float] = Field(description="fluence range (ADU) of the frames defining the linear reference")
    rms_nl_resid_pct: float = Field(description="rms of the per-frame NL % about the smooth curve (fitted frames)")
    drift_pct: float = Field(description="peak-to-peak of the fitted source drift over the run (%)")
    drift_method: str = Field(description="spline | poly | none")
    n_stability: int = Field(description="stability frames (drift reference)")
    n_background: int = Field(description="background frames")
    background_adu: float = Field(description="mean fluence of the background frames, subtracted (ADU)")
    n_frames: int = Field(description="frames of the quadrant")
    n_fit: int = Field(description="frames in the NL curve fit (after saturation and outlier cuts)")
    fit_ok: bool = Field(description="the fit converged with enough points (else flag BADFIT)")


@dataclass
class NLQuadAnalysis:
    result: NLQuadResult
    frames: list[NLFrameQuad]
    curve_fluence: np.ndarray  # measured fluence (ADU)
    curve_nl_pct: np.ndarray
    curve_lin: np.ndarray  # linear fluence (ADU)


@dataclass
class FrameInfo:
    """What the quadrant analysis needs of a frame besides its fluence."""

    obsid: int
    exptime: float
    wave: float | None = None
    time_s: float = float("nan")
    role_hint: str = ""


# ----------------------------------------------------------------------------- roles, drift


def wave_key(wave: float | None) -> str:
    """Key of a wavelength in ``rates_adu_s``: ``800.0 -> "800"``, None -> "none"."""
    return "none" if wave is None else f"{float(wave):g}"


def assign_roles(frames: Sequence[FrameInfo], fluence: np.ndarray, params: NLParams) -> list[str]:
    """``signal`` / ``stability`` / ``background`` for each frame."""
    roles = []
    for i, f in enumerate(frames):
        if f.role_hint in ("stability", "background", "signal"):
            roles.append(f.role_hint)
        elif f.exptime <= 0 or fluence[i] < params.background_max_adu:
            roles.append("background")
        else:
            roles.append("")
    if any(r == "stability" for r in roles):
        return [r or "signal" for r in roles]
    cand = [i for i, r in enumerate(roles) if r == ""]
    if params.stability_exptime is not None:
        for i in cand:
            if abs(frames[i].exptime - params.stability_exptime) <= 1e-3 * max(params.stability_exptime, 1e-6):
                roles[i] = "stability"
    else:
        groups = group_by([frames[i].exptime for i in cand], rel_tol=1e-3)
        sizes = [len(g) for g in groups]
        if groups and max(sizes) >= 3 and max(sizes) > float(np.median(sizes)):
            for k in groups[int(np.argmax(sizes))]:
                roles[cand[k]] = "stability"
    return [r or "signal" for r in roles]


def fit_drift(t: np.ndarray, level: np.ndarray, t_all: np.ndarray, method: str = "spline", degree: int = 2,
              rel_floor: float = 2e-5) -> np.ndarray:
    """Relative source level at ``t_all`` from the stability fluences ``level`` at times ``t``
    (1 = their mean). ``spline``: a cubic smoothing spline with ``s`` = number of points, the
    weights 1 / (relative noise x level), the noise from the points' second differences
    (``mad_std / sqrt(6)``, at least ``rel_floor``); fewer than 5 points: a polynomial of degree
    <= 2. Outside the stability frames' time span the level is held at the end values."""
    order = np.argsort(t)
    t, level = np.asarray(t, float)[order], np.asarray(level, float)[order]
    span = max(float(np.ptp(t)), 1.0)
    x, xa = (t - t[0]) / span, (np.asarray(t_all, float) - t[0]) / span
    n = len(t)
    if method == "spline" and n >= 5 and np.all(np.diff(x) > 0):
        from scipy.interpolate import UnivariateSpline

        rel = level / np.mean(level)
        d2 = rel[:-2] - 2 * rel[1:-1] + rel[2:]
        sigma = max(mad_std(d2) / np.sqrt(6.0), rel_floor)
        spl = UnivariateSpline(x, rel, w=np.full(n, 1.0 / sigma), k=3, s=float(n))
        model = spl(np.clip(xa, 0.0, 1.0))
        return model / float(np.mean(spl(x)))
    deg = min(degree if method == "poly" else 2, n - 1)
    coef = np.polyfit(x, level, deg)
    return np.polyval(coef, np.clip(xa, 0.0, 1.0) if method == "spline" else xa) / float(np.mean(np.polyval(coef, x)))


# ----------------------------------------------------------------------------- linear reference, curve


def linear_reference(t: np.ndarray, F: np.ndarray, sigma: np.ndarray, degree: int = 2, shutter: bool = True,
                     nsigma: float = 5.0) -> tuple[float, float, float, np.ndarray] | None:
    """(rate r (ADU/s), shutter offset dt (s), its error (s), kept) of the low-fluence frames:
    ``F = a0 + a1 t (+ a2 t^2 ...)`` (weights 1/sigma, ``nsigma`` rejection); dt = -(root nearest
    0), r = the slope there (the tangent at zero fluence). ``shutter=False``: dt = a0 / a1 with the
    tangent at t = 0 (no root search). None with too few distinct exposure times."""
    keep = np.isfinite(F) & np.isfinite(t)
    ndist = len(group_by(list(t[keep]), rel_tol=1e-3)) if keep.any() else 0
    degree = min(degree, ndist - 1)
    if degree < 1:
        return None
    coef = cov = None
    for _ in range(10):
        coef, cov = np.polyfit(t[keep], F[keep], degree, w=1.0 / sigma[keep], cov="unscaled")
        r = (F - np.polyval(coef, t)) / sigma
        scale = max(mad_std(r[keep]), 1.0)
        new = keep & (np.abs(r) <= nsigma * scale)
        if new.sum() == keep.sum() or new.sum() <= degree + 1:
            break
        keep = new
    chi2 = float(np.sum(((F[keep] - np.polyval(coef, t[keep])) / sigma[keep]) ** 2) / max(keep.sum() - degree - 1, 1))
    cov = cov * max(chi2, 1.0)
    deriv = np.polyder(coef)
    a1, a0 = float(np.polyval(deriv, 0.0)), float(coef[-1])
    if not shutter:
        return a1, a0 / a1 if a1 else 0.0, float("nan"), keep
    t0 = -a0 / a1 if a1 else 0.0
    for _ in range(20):
        step = np.polyval(coef, t0) / np.polyval(deriv, t0)
        t0 -= step
        if abs(step) < 1e-12:
            break
    rate = float(np.polyval(deriv, t0))
    dt_err = float(np.sqrt(max(cov[-1, -1], 0.0))) / rate if rate else float("nan")
    return rate, float(-t0), dt_err, keep


def plateau(t: np.ndarray, widx: np.ndarray, F: np.ndarray, use: np.ndarray, min_gain: float = 0.5) -> np.ndarray:
    """True for frames on the saturation plateau: per wavelength, exposure-time levels (from the
    first level whose median fluence grew less than ``min_gain`` x the increase expected from the
    exposure times since the previous level) onwards. Catches saturated frames whose pile-up
    fraction is below the threshold."""
    out = np.zeros(len(F), dtype=bool)
    for w in np.unique(widx[use]):
        sel = np.flatnonzero(use & (widx == w))
        levels = group_by(list(t[sel]), rel_tol=1e-3)
        levels.sort(key=lambda g: t[sel[g[0]]])
        prev_t = prev_f = None
        saturated = False
        for g in levels:
            idx = sel[g]
            tl, fl = float(np.median(t[idx])), float(np.median(F[idx]))
            if prev_t is not None and not saturated and prev_t > 0 and tl > prev_t:
                expected = prev_f * (tl / prev_t - 1.0)
                saturated = (fl - prev_f) < min_gain * expected
            if saturated:
                out[idx] = True
            else:
                prev_t, prev_f = tl, fl
    return out


def nl_basis(u: np.ndarray, knots: Sequence[float]) -> np.ndarray:
    """Cubic regression-spline basis in u (zero at u = 0 with zero value, so nl(0) = 0):
    columns u, u^2, u^3, (u - k)^3_+."""
    u = np.asarray(u, dtype=np.float64)
    cols = [u, u**2, u**3] + [np.clip(u - k, 0, None) ** 3 for k in knots]
    return np.stack(cols, axis=-1)


def nl_spline(u: np.ndarray, coeffs: Sequence[float], knots: Sequence[float]) -> np.ndarray:
    """nl(u) (fraction) of the regression spline."""
    return nl_basis(u, knots) @ np.asarray(coeffs, dtype=np.float64)


def fit_curve(t_eff: np.ndarray, widx: np.ndarray, F: np.ndarray, sigma: np.ndarray, use: np.ndarray, rates: np.ndarray,
              free: np.ndarray, knot_fracs: Sequence[float], nsigma: float = 5.0) -> tuple[np.ndarray, np.ndarray, list[float], np.ndarray, bool]:
    """Fit ``F = L (1 + nl(L / S))``, ``L = r_w t_eff`` with nl a cubic regression spline; rates
    with ``free[w]`` fitted, the others fixed. Returns (rates, coeffs, knots, kept, success)."""
    keep = use.copy()
    rates = rates.astype(float).copy()
    if not keep.any():
        return rates, np.zeros(3 + len(knot_fracs)), [], keep, False
    u_max = float(np.max(rates[widx[keep]] * t_eff[keep] / FULL_SCALE))
    knots = [float(k * u_max) for k in knot_fracs]
    nb = 3 + len(knots)
    fw = np.flatnonzero(free)

    def model(x, sel):
        r = rates.copy()
        r[fw] = x[: len(fw)]
        L = r[widx[sel]] * t_eff[sel]
        return L * (1.0 + nl_basis(L / FULL_SCALE, knots) @ x[len(fw) :])

    def resid(x, sel):
        return (F[sel] - model(x, sel)) / sigma[sel]

    def linear(sel):  # rates fixed: weighted linear least squares for the spline coefficients
        L = rates[widx[sel]] * t_eff[sel]
        A = (L[:, None] * nl_basis(L / FULL_SCALE, knots)) / sigma[sel, None]
        c, *_ = np.linalg.lstsq(A, (F[sel] - L) / sigma[sel], rcond=None)
        return c

    x = np.concatenate([rates[fw], np.zeros(nb)])
    ok = False
    for _ in range(10):
        if keep.sum() < nb + len(fw) + 1:
            ok = False
            break
        if len(fw) == 0:
            x, ok = linear(keep), True
        else:
            res = optimize.least_squares(resid, x, args=(keep,), method="lm" if keep.sum() > x.size else "trf", x_scale="jac")
            x, ok = res.x, bool(res.success)
        r = resid(x, np.ones_like(keep))
        scale = max(mad_std(r[keep]), 1.0)
        new = use & (np.abs(r) <= nsigma * scale)
        if new.sum() == keep.sum():
            break
        keep = new
    rates[fw] = x[: len(fw)]
    return rates, x[len(fw) :], knots, keep, ok


# ----------------------------------------------------------------------------- old global model


def nl_model(t: np.ndarray, wave_idx: np.ndarray, b: float, rates: np.ndarray, cks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(F, F_lin) of the old global model: ``L = rates[wave_idx] t``, ``F_lin = b + L``,
    ``F = F_lin + sum_k c_k L^k / S^(k-1)`` (k = 2, 3, ...)."""
    L = rates[wave_idx] * t
    u = L / FULL_SCALE
    poly = np.zeros_like(L)
    for k, c in enumerate(cks, start=2):
        poly += c * u**k
    return b + L + FULL_SCALE * poly, b + L


def fit_nl_global(t: np.ndarray, wave_idx: np.ndarray, F: np.ndarray, sigma: np.ndarray, use: np.ndarray, nwave: int, degree: int,
                  nsigma: float = 5.0) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, bool]:
    """Least-squares fit of :func:`nl_model`; returns (b, rates, c_k, kept, success)."""
    keep = use.copy()
    rates0 = np.zeros(nwave)
    for w in range(nwave):
        sel = keep & (wave_idx == w)
        if sel.sum() >= 2:
            lo = sel & (F <= np.median(F[sel]))
            if lo.sum() < 2:
                lo = sel
            rates0[w] = np.polyfit(t[lo], F[lo], 1)[0]
        elif sel.sum() == 1:
            rates0[w] = F[sel][0] / t[sel][0]
    x = np.concatenate([[0.0], rates0, np.zeros(degree - 1)])

    def resid(x, sel):
        model, _ = nl_model(t[sel], wave_idx[sel], x[0], x[1 : 1 + nwave], x[1 + nwave :])
        return (F[sel] - model) / sigma[sel]

    ok = False
    for _ in range(10):
        if keep.sum() < nwave + degree + 1:
            break
        res = optimize.least_squares(resid, x, args=(keep,), method="lm" if keep.sum() > x.size else "trf", x_scale="jac")
        x, ok = res.x, bool(res.success)
        r = resid(x, np.ones_like(keep))
        scale = max(mad_std(r[keep]), 1.0)
        new = use & (np.abs(r) <= nsigma * scale)
        if new.sum() == keep.sum():
            break
        keep = new
    return float(x[0]), x[1 : 1 + nwave], x[1 + nwave :], keep, ok


def nl_at(result: NLQuadResult | dict, fluence_lin_adu: np.ndarray) -> np.ndarray:
    """The fitted NL % at linear fluences (ADU) from a result's coefficients."""
    r = result if isinstance(result, NLQuadResult) else NLQuadResult(**result)
    x = np.asarray(fluence_lin_adu, dtype=np.float64)
    if r.model == "spline":
        return 100.0 * nl_spline(x / FULL_SCALE, r.coeffs, r.knots)
    b, cks = r.coeffs[0], r.coeffs[1:]
    u = (x - b) / FULL_SCALE
    poly = sum(c * u**k for k, c in enumerate(cks, start=2)) * FULL_SCALE
    return 100.0 * poly / x


# ----------------------------------------------------------------------------- one quadrant


def analyse_quadrant(frames: Sequence[FrameInfo], fluence: np.ndarray, pileup: np.ndarray, ccd: str, q: str,
                     params: NLParams) -> NLQuadAnalysis:
    """NL analysis of one quadrant from the per-frame fluences (ADU) and pile-up fractions."""
    p = params
    n = len(frames)
    fluence = np.asarray(fluence, dtype=np.float64)
    pileup = np.asarray(pileup, dtype=np.float64)
    roles = assign_roles(frames, fluence, p)
    t_abs = np.array([f.time_s for f in frames], dtype=float)
    if not np.all(np.isfinite(t_abs)):
        t_abs = np.array([float(f.obsid) for f in frames])  # order only
    t_rel = t_abs - np.nanmin(t_abs)
    texp = np.array([f.exptime for f in frames], dtype=float)
    is_bkg = np.array([r == "background" for r in roles])
    bkg = float(np.mean(fluence[is_bkg])) if is_bkg.any() else 0.0
    F0 = fluence - bkg
    stab = np.array([r == "stability" for r in roles])
    drift = np.ones(n)
    drift_p2p, drift_method = 0.0, "none"
    if stab.sum() >= 2:
        drift_method = p.drift_method if (p.drift_method == "poly" or stab.sum() >= 5) else "poly"
        drift = fit_drift(t_rel[stab], F0[stab], t_rel, drift_method, p.drift_degree, p.rel_error_floor)
        drift_p2p = 100.0 * float(np.ptp(drift[~is_bkg])) if (~is_bkg).any() else 0.0
    F = F0 / drift
    waves = [wave_key(f.wave) for f in frames]
    wave_keys = sorted(set(waves))
    widx = np.array([wave_keys.index(w) for w in waves])
    use = ~is_bkg & (texp > 0) & (F > 0) & (F <= p.max_fit_frac * FULL_SCALE) & (pileup <= p.pileup_max)
    rel = p.rel_error_floor
    if stab.sum() >= 4:
        rel = max(rel, float(np.std(F[stab] / np.mean(F[stab]), ddof=1)))
    sigma = np.sqrt((rel * F) ** 2 + p.abs_error_adu**2)
    nw = len(wave_keys)
    shutter, shutter_err = 0.0, float("nan")
    lin_range = (float("nan"), float("nan"))
    knots: list[float] = []
    if p.method == "global":
        b, rates, cks, kept, ok = fit_nl_global(texp, widx, F, sigma, use, nw, p.fit_degree, p.outlier_nsigma)
        _, flin = nl_model(texp, widx, b, rates, cks)
        coeffs = [b, *map(float, cks)]
        shutter = b / rates[0] if nw == 1 and rates[0] else float("nan")

        def curve(lin):
            u = (lin - b) / FULL_SCALE
            return 100.0 * sum(c * u**k for k, c in enumerate(cks, start=2)) * FULL_SCALE / lin
        model_name = "poly"
    else:
        rates = np.full(nw, np.nan)
        free = np.ones(nw, dtype=bool)
        low = use & (F <= p.linear_max_frac * FULL_SCALE)
        dts, dt_errs, lin_sel = [], [], np.zeros(n, dtype=bool)
        for w in range(nw):
            sel = low & (widx == w)
            # a reference needs frames from near zero fluence (else this wave's rate is fitted with the curve)
            starts_low = sel.any() and float(np.min(F[sel])) <= p.linear_start_frac * FULL_SCALE
            ref = linear_reference(texp[sel], F[sel], sigma[sel], p.linear_degree, p.shutter_offset, p.outlier_nsigma) \
                if sel.sum() >= 3 and starts_low else None
            if ref is None:
                continue
            rates[w], dt, dt_err, kept_w = ref
            free[w] = False
            dts.append(dt), dt_errs.append(dt_err)
            lin_sel[np.flatnonzero(sel)[kept_w]] = True
        if dts:
            wts = np.array([1.0 / e**2 if np.isfinite(e) and e > 0 else 1.0 for e in dt_errs])
            shutter = float(np.sum(wts * np.array(dts)) / np.sum(wts))
            shutter_err = float(1.0 / np.sqrt(np.sum(wts))) if all(np.isfinite(dt_errs)) else float("nan")
            lin_range = (float(np.min(F[lin_sel])), float(np.max(F[lin_sel])))
        t_eff = texp + shutter
        use &= ~plateau(np.maximum(t_eff, 1e-6), widx, F, use)
        for w in np.flatnonzero(free):  # no low-fluence frames: start from F / t_eff of the lowest
            sel = use & (widx == w)
            if sel.any():
                i = np.flatnonzero(sel)[np.argmin(F[sel])]
                rates[w] = F[i] / t_eff[i]
            else:
                rates[w], free[w] = 0.0, False
        rates, cks, knots, kept, ok = fit_curve(t_eff, widx, F, sigma, use, rates, free, p.curve_knots, p.outlier_nsigma)
        flin = rates[widx] * t_eff
        coeffs = [float(c) for c in cks]
        ok = ok and bool(dts)

        def curve(lin):
            return 100.0 * nl_spline(lin / FULL_SCALE, cks, knots)
        model_name = "spline"
    with np.errstate(divide="ignore", invalid="ignore"):
        nl = 100.0 * (F - flin) / flin
    if kept.any():
        lo_f, hi_f = float(np.min(F[kept])), float(np.max(F[kept]))
        grid_lin = np.linspace(float(np.min(flin[kept])), float(np.max(flin[kept])), p.curve_points)
        curve_nl = curve(grid_lin)
        curve_F = grid_lin * (1 + curve_nl / 100.0)
        k = int(np.argmax(np.abs(curve_nl)))
        max_nl, max_f = float(curve_nl[k]), float(curve_F[k])
        rms = float(np.sqrt(np.mean((nl[kept] - curve(flin[kept])) ** 2)))
    else:
        lo_f = hi_f = max_nl = max_f = rms = float("nan")
        grid_lin = curve_F = curve_nl = np.array([])
    frames_out = [
        NLFrameQuad(obsid=f.obsid, ccd=ccd, quadrant=q, exptime=f.exptime, wave=f.wave, time_s=float(t_abs[i]), role=roles[i],
                    fluence_raw_adu=float(fluence[i]), pileup_frac=float(pileup[i]), drift=float(drift[i]), fluence_adu=float(F[i]),
                    fluence_lin_adu=float(flin[i]), nl_pct=float(nl[i]), fitted=bool(kept[i]))
        for i, f in enumerate(frames)
    ]
    npar = nw + len(coeffs)
    res = NLQuadResult(
        max_nl_pct=max_nl, max_nl_fluence_adu=max_f, fit_range_adu=(lo_f, hi_f), model=model_name, coeffs=coeffs, knots=knots,
        rates_adu_s={w: float(r) for w, r in zip(wave_keys, rates)}, shutter_offset_s=float(shutter), shutter_offset_err_s=shutter_err,
        linear_range_adu=lin_range, rms_nl_resid_pct=rms, drift_pct=drift_p2p, drift_method=drift_method,
        n_stability=int(stab.sum()), n_background=int(is_bkg.sum()), background_adu=bkg, n_frames=n, n_fit=int(kept.sum()),
        fit_ok=bool(ok and kept.sum() >= npar + 1),
    )
    return NLQuadAnalysis(result=res, frames=frames_out, curve_fluence=np.asarray(curve_F), curve_nl_pct=np.asarray(curve_nl),
                          curve_lin=np.asarray(grid_lin))


def linearity_table(qa: NLQuadAnalysis, points: int) -> dict[str, Any]:
    """The ``linearity`` calibration values of one quadrant: the model and a monotonic table
    measured -> linear fluence (ADU) over the fitted range."""
    r = qa.result
    out: dict[str, Any] = {"model": r.model, "scale_adu": FULL_SCALE, "coeffs": list(r.coeffs), "knots": list(r.knots),
                           "fit_range_adu": list(r.fit_range_adu), "fit_ok": r.fit_ok}
    if qa.curve_lin.size:
        idx = np.linspace(0, qa.curve_lin.size - 1, min(points, qa.curve_lin.size)).round().astype(int)
        out["measured_adu"] = [0.0] + [float(v) for v in qa.curve_fluence[idx]]
        out["linear_adu"] = [0.0] + [float(v) for v in qa.curve_lin[idx]]
    return out


# ----------------------------------------------------------------------------- solve


def _draw_nl(fig: Any, quads: dict[str, NLQuadAnalysis], ccd: str) -> None:
    """NL % vs fluence per quadrant (frames and fitted curve) and the drift of the stability frames."""
    axes = fig.subplots(2, 4, gridspec_kw={"height_ratios": [3, 1.4]})
    for k, q in enumerate(QUADRANTS):
        ax, axd = axes[0, k], axes[1, k]
        qa = quads.get(q)
        ax.set_title(f"{ccd} {q}")
        if qa is None:
            continue
        fit = [f for f in qa.frames if f.fitted]
        other = [f for f in qa.frames if not f.fitted and f.role != "background"]
        ax.plot([f.fluence_adu for f in fit], [f.nl_pct for f in fit], "o", ms=3, label="fitted")
        ax.plot([f.fluence_adu for f in other], [f.nl_pct for f in other], "x", ms=3, label="not fitted")
        ax.plot(qa.curve_fluence, qa.curve_nl_pct, "-", lw=1, label=f"max {qa.result.max_nl_pct:.2f} %")
        lo = min([f.nl_pct for f in fit], default=-1)
        hi = max([f.nl_pct for f in fit], default=1)
        ax.set_ylim(lo - 0.2 * (hi - lo + 0.1), hi + 0.2 * (hi - lo + 0.1))
        ax.set_xlabel("fluence (ADU)")
        ax.legend(fontsize=6)
        st = [f for f in qa.frames if f.role == "stability"]
        if st:
            t0 = min(f.time_s for f in st)
            ref = np.mean([f.fluence_raw_adu for f in st])
            axd.plot([(f.time_s - t0) / 3600 for f in st], [100 * (f.fluence_raw_adu / ref - 1) for f in st], "o", ms=3)
            axd.plot([(f.time_s - t0) / 3600 for f in qa.frames], [100 * (f.drift - 1) for f in qa.frames], "-", lw=1)
        axd.set_xlabel("time (h)")
    axes[0, 0].set_ylabel("NL (%)")
    axes[1, 0].set_ylabel("drift (%)")


def solve(extractions: list[NLExtraction], calib: Calibrations, params: NLParams, run: TestRun, sink: ProductSink) -> AnalysisOutput:
    """NL01 / NL02 from the per-exposure fluences (no frame is read)."""
    from shared.flags import Flag

    p = params
    if not extractions:
        raise ValueError(f"{run.label}: no NL extractions to solve")
    ex = sorted(extractions, key=lambda e: e.obsids[0])
    quads: dict[str, dict[str, NLQuadAnalysis]] = {}
    warn: list[str] = []
    flags = Flag(0)
    for ccd in sorted({c for e in ex for c in e.quads}):
        sub = [e for e in ex if ccd in e.quads]
        info = [FrameInfo(obsid=e.obsids[0], exptime=e.exptime, wave=e.wave, time_s=e.time_s, role_hint=e.role_hint) for e in sub]
        for q in sorted({q for e in sub for q in e.quads[ccd]}, key=QUADRANTS.index):
            rows = [(i, e.quads[ccd][q]) for i, e in enumerate(sub) if q in e.quads[ccd]]
            fi = [info[i] for i, _ in rows]
            qa = analyse_quadrant(fi, np.array([m.fluence_adu for _, m in rows]), np.array([m.pileup_frac for _, m in rows]), ccd, q, p)
            quads.setdefault(ccd, {})[q] = qa
            r = qa.result
            if not r.fit_ok:
                flags |= Flag.BADFIT
                warn.append(f"{ccd} {q}: NL fit failed ({r.n_fit} points)")
            if r.n_stability < 2:
                warn.append(f"{ccd} {q}: fewer than 2 stability frames: no drift correction")
    rows = [fr.model_dump() for qs in quads.values() for qa in qs.values() for fr in qa.frames]
    for ccd, qs in quads.items():
        sink.add(FigureProduct(f"nl_{ccd}", (lambda fig, qs=qs, ccd=ccd: _draw_nl(fig, qs, ccd)), ccd=ccd, size=(16, 7),
                               description="non-linearity vs fluence and source drift per quadrant"))
    if rows:
        sink.add(TableProduct("nl_frames", {k: [r[k] for r in rows] for k in NLFrameQuad.model_fields if k != "wave"},
                              units={"fluence_adu": "ADU", "fluence_lin_adu": "ADU", "nl_pct": "%", "exptime": "s", "time_s": "s"},
                              description="per frame and quadrant: role, drift, corrected and linear fluence, NL %"))
    curves = [(c, q, qa) for c, qs in quads.items() for q, qa in qs.items() if qa.curve_fluence.size]
    if curves:
        sink.add(TableProduct("nl_curves", {"ccd": [c for c, _, _ in curves], "quadrant": [q for _, q, _ in curves],
                                            "fluence": np.stack([qa.curve_fluence for *_, qa in curves]),
                                            "fluence_lin": np.stack([qa.curve_lin for *_, qa in curves]),
                                            "nl_pct": np.stack([qa.curve_nl_pct for *_, qa in curves])},
                              units={"fluence": "ADU", "fluence_lin": "ADU", "nl_pct": "%"},
                              description="fitted NL curves: measured and linear fluence, NL %"))
    summary = [f"{'CCD':<5}{'Q':<2} {'maxNL%':>8} {'at ADU':>8} {'rms%':>7} {'drift%':>7} {'dt ms':>7} {'nfit':>5}"]
    for ccd, qs in quads.items():
        for q, qa in qs.items():
            r = qa.result
            summary.append(f"{ccd:<5}{q:<2} {r.max_nl_pct:8.3f} {r.max_nl_fluence_adu:8.0f} {r.rms_nl_resid_pct:7.4f} "
                           f"{r.drift_pct:7.3f} {1e3 * r.shutter_offset_s:7.1f} {r.n_fit:5d}")
    summary += [f"warning: {w}" for w in warn]
    results = {c: {q: qa.result.model_dump() for q, qa in qs.items()} for c, qs in quads.items()}
    provides = {LINEARITY: {"values": {c: {q: linearity_table(qa, p.table_points) for q, qa in qs.items()} for c, qs in quads.items()},
                            "files": {}}}
    return AnalysisOutput(results=results, flags=int(flags), frames=rows, parameters=p.model_dump(mode="json"), summary=summary,
                          provides=provides)


FAMILY = Family(
    name="nl",
    tests=TESTS,
    params=NLParams,
    extract=extract,
    solve=solve,
    extraction=NLExtraction,
    provides=(LINEARITY,),
    result=NLQuadResult,
    version="2",
)
