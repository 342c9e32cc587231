"""NL01 / NL02: non-linearity of the detection chain from flats of increasing exposure time.

Per frame and canonical quadrant: fluence F = clipped mean of the image area (standard trim)
minus the offset (clipped mean of the trimmed prescan: a median would be biased by the ADC
quantisation), and the "pile-up" fraction (pixels within 6 RON of the frame maximum when that is
above half the ADC scale: full-well or ADC saturation), which excludes saturated frames from the
fit.

Per quadrant:

1. background: the mean fluence of the background frames (``meta["role"] == "background"`` or
   exposure-log comment ``BGD``, else fluence below ``background_max_adu``) is subtracted from
   every frame;
2. source drift: the stability frames (role ``stability`` or comment ``STAB``, else
   ``params.stability_exptime``, else the most repeated exposure time) give F_s(t); a polynomial in time (``drift_degree``) normalised to
   its mean is the drift d(t), and every fluence is divided by d(t_frame);
3. the drift-corrected fluences are fitted with ``F = b + L + sum_k c_k L^k / S^(k-1)``
   (k = 2..``fit_degree``), ``L = r_w t`` (one rate r_w per wavelength: NL02 mixes the ND filter
   and 880 nm), S = 2^16 ADU; points above ``max_fit_frac`` x 2^16 or piled up are left out; 5-sigma
   iterative rejection. The linear reference ``F_lin = b + r_w t`` is the fit's tangent at zero
   fluence, pinned by the low-fluence frames;
4. NL % = 100 (F - F_lin) / F_lin per frame, and its smooth curve from the fit; ``max_nl_pct``
   = the signed value of largest |NL| of the smooth curve over the fitted fluence range,
   ``max_nl_fluence_adu`` where it occurs (measured fluence).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
from pydantic import BaseModel, Field
from scipy import optimize

from services.analyzer.analysis.common import FrameInput, as_frames, clipped_stats, group_by, mad_std, params_of, row_offsets
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, QUADRANTS, STANDARD_TRIMS, region

TESTS = ("NL01", "NL02")
FULL_SCALE = 65536.0


class NLParams(BaseModel):
    """Analysis parameters of NL01/02."""

    offset_method: str = Field("mean", description="offset: mean (clipped mean of the trimmed prescan) | global | row")
    nsigma: float = Field(4.0, description="clipping of the frame fluences")
    background_max_adu: float = Field(50.0, description="frames below this fluence are background frames (when no role is given)")
    stability_exptime: float | None = Field(None, description="exposure time of the stability frames (default: the most repeated one)")
    drift_degree: int = Field(2, ge=0, description="degree of the drift polynomial in time")
    fit_degree: int = Field(3, ge=2, le=6, description="degree of the fluence polynomial")
    max_fit_frac: float = Field(0.98, description="largest fluence fitted (fraction of 2^16 ADU)")
    pileup_max: float = Field(1e-5, description="frames with more piled-up (saturated) pixels are not fitted")
    outlier_nsigma: float = Field(5.0, description="iterative rejection of the fit")
    rel_error_floor: float = Field(2e-5, description="relative fluence error floor of the fit weights")
    abs_error_adu: float = Field(0.05, description="absolute fluence error (ADU) of the fit weights")
    curve_points: int = Field(200, description="points of the smooth NL curve")


class NLFrameQuad(BaseModel):
    """Per frame and quadrant."""

    obsid: int
    ccd: str
    quadrant: str
    exptime: float
    wave: float | None
    time_s: float
    role: str
    fluence_raw_adu: float
    pileup_frac: float
    drift: float
    fluence_adu: float = Field(description="background-subtracted, drift-corrected fluence (ADU)")
    fluence_lin_adu: float
    nl_pct: float
    fitted: bool


class NLQuadResult(BaseModel):
    """Per CCD quadrant result of NL01/02."""

    max_nl_pct: float = Field(description="signed NL (%) of largest |NL| on the fitted curve")
    max_nl_fluence_adu: float = Field(description="fluence (ADU) where |NL| is largest")
    fit_range_adu: tuple[float, float]
    coeffs: list[float] = Field(description="[b (ADU), c2, c3, ...] of F = b + L + sum c_k L^k / S^(k-1)")
    rates_adu_s: dict[str, float] = Field(description="r_w (ADU/s) per wavelength")
    rms_nl_resid_pct: float = Field(description="rms of the per-frame NL % about the smooth curve")
    drift_pct: float = Field(description="peak-to-peak of the fitted drift (%)")
    n_stability: int
    n_background: int
    background_adu: float
    n_frames: int
    n_fit: int
    fit_ok: bool


@dataclass
class NLQuadAnalysis:
    result: NLQuadResult
    frames: list[NLFrameQuad]
    curve_fluence: np.ndarray
    curve_nl_pct: np.ndarray


@dataclass
class NLAnalysis:
    """Output of :func:`analyse_nl`."""

    quads: dict[str, dict[str, NLQuadAnalysis]]
    warnings: list[str] = field(default_factory=list)
    params: NLParams = field(default_factory=NLParams)

    def results(self) -> dict[str, dict[str, dict[str, Any]]]:
        return {c: {q: a.result.model_dump() for q, a in qs.items()} for c, qs in self.quads.items()}


# ----------------------------------------------------------------------------- per frame


def frame_fluence(quad: np.ndarray, params: NLParams) -> tuple[float, float]:
    """(fluence ADU, piled-up fraction) of one canonical quadrant."""
    off = row_offsets(quad, params.offset_method if params.offset_method in ("row", "global", "mean") else "mean")
    lead, trail = STANDARD_TRIMS["img"]
    img = np.asarray(quad[:IMAGE_ROWS, PRESCAN_COLS + lead : PRESCAN_COLS + IMAGE_COLS - trail], dtype=np.float64) - off[:IMAGE_ROWS, None]
    st = clipped_stats(img, params.nsigma, subsample=7)
    ron = clipped_stats(region(quad, "ove", STANDARD_TRIMS["ove"]), 4.0, maxiters=5).std_corrected
    top = float(np.max(img))
    # saturation (full well or ADC) only happens in the upper half of the scale; below, the
    # maximum is just the tail of the distribution
    pile = float(np.mean(img >= top - 6.0 * max(ron, 0.5))) if top > 0.5 * FULL_SCALE else 0.0
    return st.mean, pile


# ----------------------------------------------------------------------------- model


def nl_model(t: np.ndarray, wave_idx: np.ndarray, b: float, rates: np.ndarray, cks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(F, F_lin) for exposure times ``t`` (s): ``L = rates[wave_idx] t``, ``F_lin = b + L``,
    ``F = F_lin + sum_k c_k L^k / S^(k-1)`` (k = 2, 3, ...)."""
    L = rates[wave_idx] * t
    u = L / FULL_SCALE
    poly = np.zeros_like(L)
    for k, c in enumerate(cks, start=2):
        poly += c * u**k
    return b + L + FULL_SCALE * poly, b + L


def _roles(frames: Sequence[FrameInput], fluence: np.ndarray, params: NLParams) -> list[str]:
    """``signal`` / ``stability`` / ``background`` for each frame."""
    roles = []
    comment_roles = {"stab": "stability", "bgd": "background", "flu": "signal"}
    explicit = [str(f.meta.get("role") or comment_roles.get(str(f.meta.get("comments", "")).strip().lower(), "")).lower()
                for f in frames]
    for i, f in enumerate(frames):
        if explicit[i] in ("stability", "background", "signal"):
            roles.append(explicit[i])
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


def fit_nl(t: np.ndarray, wave_idx: np.ndarray, F: np.ndarray, sigma: np.ndarray, use: np.ndarray, nwave: int, degree: int,
           nsigma: float = 5.0) -> tuple[float, np.ndarray, np.ndarray, np.ndarray, bool]:
    """Least-squares fit of :func:`nl_model`; returns (b, rates, c_k, kept, success)."""
    keep = use.copy()
    # initial: per wave a line through the lower half of the fitted fluences
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
        else:
            rates0[w] = np.nan
    fixed = ~np.isfinite(rates0)
    rates0[fixed] = 0.0
    x0 = np.concatenate([[0.0], rates0, np.zeros(degree - 1)])

    def resid(x, sel):
        b, rates, cks = x[0], x[1 : 1 + nwave], x[1 + nwave :]
        model, _ = nl_model(t[sel], wave_idx[sel], b, rates, cks)
        return (F[sel] - model) / sigma[sel]

    ok = False
    x = x0
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


def analyse_nl_quadrant(frames: Sequence[FrameInput], fluence: np.ndarray, pileup: np.ndarray, ccd: str, q: str,
                        params: NLParams) -> NLQuadAnalysis:
    """NL analysis of one quadrant from the per-frame fluences."""
    p = params
    n = len(frames)
    roles = _roles(frames, fluence, p)
    t_abs = np.array([f.t_seconds for f in frames])
    if not np.all(np.isfinite(t_abs)):
        t_abs = np.array([float(f.obsid) for f in frames])  # order only
    t_rel = t_abs - np.nanmin(t_abs)
    texp = np.array([f.exptime for f in frames])
    bkg_idx = [i for i, r in enumerate(roles) if r == "background"]
    bkg = float(np.mean(fluence[bkg_idx])) if bkg_idx else 0.0
    F0 = fluence - bkg
    stab = np.array([r == "stability" for r in roles])
    drift = np.ones(n)
    drift_p2p = 0.0
    if stab.sum() >= 2:
        deg = min(p.drift_degree, int(stab.sum()) - 1)
        span = max(np.ptp(t_rel[stab]), 1.0)
        coef = np.polyfit(t_rel[stab] / span, F0[stab], deg)
        level = np.polyval(coef, t_rel / span)
        ref = float(np.mean(np.polyval(coef, t_rel[stab] / span)))
        drift = level / ref
        drift_p2p = 100.0 * float(np.ptp(drift[~np.array([r == "background" for r in roles])])) if n else 0.0
    F = F0 / drift
    waves = [f.wave for f in frames]
    wave_keys = sorted({str(w) for w in waves})
    widx = np.array([wave_keys.index(str(w)) for w in waves])
    use = np.array([r != "background" for r in roles]) & (texp > 0) & (F > 0) & (F <= p.max_fit_frac * FULL_SCALE) & (pileup <= p.pileup_max)
    # relative scatter of the stability frames after drift correction (a floor of the errors)
    rel = p.rel_error_floor
    if stab.sum() >= 4:
        rel = max(rel, float(np.std(F[stab] / np.mean(F[stab]), ddof=1)))
    sigma = np.sqrt((rel * F) ** 2 + p.abs_error_adu**2)
    deg = p.fit_degree
    b, rates, cks, kept, ok = fit_nl(texp, widx, F, sigma, use, len(wave_keys), deg, p.outlier_nsigma)
    model, flin = nl_model(texp, widx, b, rates, cks)
    with np.errstate(divide="ignore", invalid="ignore"):
        nl = 100.0 * (F - flin) / flin
    # smooth curve on the linear-fluence axis (same for every wavelength: F_lin = b + L)
    if kept.any():
        lo_f, hi_f = float(np.min(F[kept])), float(np.max(F[kept]))
        lin_lo, lin_hi = float(np.min(flin[kept])), float(np.max(flin[kept]))
        grid_lin = np.linspace(lin_lo, lin_hi, p.curve_points)
        L = grid_lin - b
        u = L / FULL_SCALE
        poly = sum(c * u**k for k, c in enumerate(cks, start=2)) * FULL_SCALE
        curve_nl = 100.0 * poly / grid_lin
        curve_F = grid_lin + poly
        k = int(np.argmax(np.abs(curve_nl)))
        max_nl, max_f = float(curve_nl[k]), float(curve_F[k])
        resid = nl[kept] - np.interp(flin[kept], grid_lin, curve_nl)
        rms = float(np.sqrt(np.mean(resid**2)))
    else:
        lo_f = hi_f = max_nl = max_f = rms = float("nan")
        curve_F = curve_nl = np.array([])
    frames_out = [
        NLFrameQuad(obsid=f.obsid, ccd=ccd, quadrant=q, exptime=f.exptime, wave=f.wave, time_s=float(t_abs[i]), role=roles[i],
                    fluence_raw_adu=float(fluence[i]), pileup_frac=float(pileup[i]), drift=float(drift[i]), fluence_adu=float(F[i]),
                    fluence_lin_adu=float(flin[i]), nl_pct=float(nl[i]), fitted=bool(kept[i]))
        for i, f in enumerate(frames)
    ]
    res = NLQuadResult(
        max_nl_pct=max_nl, max_nl_fluence_adu=max_f, fit_range_adu=(lo_f, hi_f), coeffs=[b, *map(float, cks)],
        rates_adu_s={w: float(r) for w, r in zip(wave_keys, rates)}, rms_nl_resid_pct=rms, drift_pct=drift_p2p,
        n_stability=int(stab.sum()), n_background=len(bkg_idx), background_adu=bkg, n_frames=n, n_fit=int(kept.sum()),
        fit_ok=bool(ok and kept.sum() >= len(wave_keys) + deg + 1),
    )
    return NLQuadAnalysis(result=res, frames=frames_out, curve_fluence=np.asarray(curve_F), curve_nl_pct=np.asarray(curve_nl))


def nl_at(result: NLQuadResult, fluence_lin_adu: np.ndarray) -> np.ndarray:
    """The fitted NL % at linear fluences (ADU) from a result's coefficients."""
    b, cks = result.coeffs[0], result.coeffs[1:]
    x = np.asarray(fluence_lin_adu, dtype=np.float64)
    u = (x - b) / FULL_SCALE
    poly = sum(c * u**k for k, c in enumerate(cks, start=2)) * FULL_SCALE
    return 100.0 * poly / x


def analyse_nl(frames: Iterable[Any], definition: Any = None, params: NLParams | dict | None = None,
               quadrants: Sequence[str] = QUADRANTS) -> NLAnalysis:
    """NL01 / NL02 analysis of a list of frames (all CCDs mixed; :class:`FrameInput` or dicts;
    ``meta["role"]`` may mark ``stability`` / ``background`` frames)."""
    p = params_of(NLParams, params)
    fr = as_frames(frames)
    out: dict[str, dict[str, NLQuadAnalysis]] = {}
    warn: list[str] = []
    for ccd in sorted({f.ccd for f in fr}):
        sub = sorted((f for f in fr if f.ccd == ccd), key=lambda f: f.obsid)
        flu = {q: np.full(len(sub), np.nan) for q in quadrants}
        pile = {q: np.zeros(len(sub)) for q in quadrants}
        for i, f in enumerate(sub):
            quads = f.load()
            for q in quadrants:
                if q in quads:
                    flu[q][i], pile[q][i] = frame_fluence(quads[q], p)
            del quads
        for q in quadrants:
            a = analyse_nl_quadrant(sub, flu[q], pile[q], ccd, q, p)
            out.setdefault(ccd, {})[q] = a
            r = a.result
            if not r.fit_ok:
                warn.append(f"{ccd} {q}: NL fit failed ({r.n_fit} points)")
            if r.n_stability < 2:
                warn.append(f"{ccd} {q}: fewer than 2 stability frames: no drift correction")
    return NLAnalysis(quads=out, warnings=warn, params=p)


# ----------------------------------------------------------------------------- analyzer plug-in

PARAMS = NLParams


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


def run_test(data: Any, sink: Any) -> Any:
    """Analyzer plug-in: NL01 / NL02 (exposure-log comments STAB / BGD mark the frame roles)."""
    from services.analyzer.analysis.common import frame_inputs
    from services.analyzer.model import AnalysisOutput, FigureProduct, TableProduct
    from shared.flags import Flag

    p = params_of(NLParams, data.params)
    an = analyse_nl(frame_inputs(data), params=p)
    flags = Flag(0)
    rows = [fr.model_dump() for qs in an.quads.values() for qa in qs.values() for fr in qa.frames]
    for ccd, quads in an.quads.items():
        if any(not qa.result.fit_ok for qa in quads.values()):
            flags |= Flag.BADFIT
        sink.add(FigureProduct(f"nl_{ccd}", (lambda fig, quads=quads, ccd=ccd: _draw_nl(fig, quads, ccd)), ccd=ccd, size=(16, 7),
                               description="non-linearity vs fluence and source drift per quadrant"))
    if rows:
        sink.add(TableProduct("nl_frames", {k: [r[k] for r in rows] for k in NLFrameQuad.model_fields if k != "wave"},
                              units={"fluence_adu": "ADU", "fluence_lin_adu": "ADU", "nl_pct": "%"},
                              description="per frame and quadrant: role, drift, corrected and linear fluence, NL %"))
    curves = [(c, q, qa) for c, qs in an.quads.items() for q, qa in qs.items() if qa.curve_fluence.size]
    if curves:
        sink.add(TableProduct("nl_curves", {"ccd": [c for c, _, _ in curves], "quadrant": [q for _, q, _ in curves],
                                            "fluence": np.stack([qa.curve_fluence for *_, qa in curves]),
                                            "nl_pct": np.stack([qa.curve_nl_pct for *_, qa in curves])},
                              units={"fluence": "ADU", "nl_pct": "%"}, description="fitted NL curves"))
    summary = [f"{'CCD':<5}{'Q':<2} {'maxNL%':>8} {'at ADU':>8} {'rms%':>7} {'drift%':>7} {'nfit':>5}"]
    for ccd, quads in an.quads.items():
        for q, qa in quads.items():
            r = qa.result
            summary.append(f"{ccd:<5}{q:<2} {r.max_nl_pct:8.3f} {r.max_nl_fluence_adu:8.0f} {r.rms_nl_resid_pct:7.4f} {r.drift_pct:7.3f} {r.n_fit:5d}")
    summary += [f"warning: {w}" for w in an.warnings]
    return AnalysisOutput(results=an.results(), flags=int(flags), frames=rows, parameters=p.model_dump(mode="json"), summary=summary)
