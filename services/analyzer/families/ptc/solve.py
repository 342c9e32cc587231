"""PTC01 / PTC02 solve (pure): the per-quadrant fits from the pair extractions.

Per quadrant, from the pairs (:class:`~.measure.PairQuadMeasurement`) and the frame statistics:

- rejection (here, not at extraction, so that a threshold change only re-solves): fluence
  mismatch above ``max_mismatch``, a KS p-value below ``ks_pmin``; pairs with more than
  ``max_sat_frac`` saturated pixels (ADC ceiling or a full-well plateau) are measured but not
  fitted;
- (a) the exponential model (Astier 2019 eq. 16) after the turnoff cut with 5-sigma
  iterative outlier rejection: ``gain``, ``a00``, ``noise_e``; ``turnoff_adu`` = highest mean
  retained (these pairs are the ``fitted`` ones of the pairs table);
- (b) the full covariance model (eq. 20) on the fitted pairs, lags 0..``fit_lag``;
- (c) the plain quadratic of the original campaign software;
- the two saturation limits, separately: the **ADC ceiling** (``adc_saturation_adu`` = 65535 -
  offset; ``adc_reached`` when pairs have pixels at it) and the **full well** (the plateau
  level of bloomed pixels below the ADC ceiling, else the first fluence whose variance falls
  below the model without ADC-clipped pixels; a lower limit, the highest such fluence, when
  neither is seen); ``saturation_limit`` says which one ends the curve;
- HER (median over frames in ``her_range``; flagged when ``|HER| > her_max``), overscan RON and
  the PTC noise cross-check (flagged when the difference is beyond ``ron_tolerance`` and
  ``ron_nsigma`` errors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Sequence

import numpy as np
from pydantic import BaseModel, Field

from services.analyzer.families.ptc.measure import FrameQuadStats, PairQuadMeasurement, PTCPairExtraction
from services.analyzer.families.ptc.models import (
    ExpFit,
    FullCovFit,
    _groups,
    exponential_model,
    fit_exponential,
    fit_full_covariance,
    fit_quadratic,
)
from services.analyzer.families.ptc.params import ADC_MAX, FULL_SCALE, PTCParams
from shared.geometry import QUADRANTS


# ----------------------------------------------------------------------------- inputs


@dataclass
class PairRecord:
    """One pair of one quadrant as the solve sees it: identity, measurement and the solve's
    decisions (``reason`` of a rejection, ``used`` = enters the fits, ``fitted`` = kept by the
    exponential fit after the turnoff and outlier cuts)."""

    ccd: str
    quadrant: str
    obsids: tuple[int, int]
    exptime: float
    wave: float | None
    m: PairQuadMeasurement
    reason: str = ""
    used: bool = False
    fitted: bool = False

    @property
    def rejected(self) -> bool:
        return bool(self.reason)

    @property
    def mu(self) -> float:
        return self.m.mu

    def row(self) -> dict[str, Any]:
        """Row of the pairs table (JSON-able)."""
        m = self.m
        return {
            "ccd": self.ccd, "quadrant": self.quadrant, "obsid1": self.obsids[0], "obsid2": self.obsids[1], "exptime": self.exptime,
            "mu1": m.mu1, "mu2": m.mu2, "mu": m.mu, "var": m.var, "var_err": m.var_err,
            "cov01": float(m.cov[0, 1]) if m.cov.shape[1] > 1 else float("nan"),
            "cov10": float(m.cov[1, 0]) if m.cov.shape[0] > 1 else float("nan"),
            "npix": m.npix, "n_defect": m.n_defect, "ks_p": m.ks_p, "mismatch": m.mismatch, "adc_frac": m.adc_frac,
            "sat_frac": m.sat_frac, "rejected": self.rejected, "reason": self.reason, "used": self.used, "fitted": self.fitted,
        }


def pair_rejection(m: PairQuadMeasurement, params: PTCParams) -> str:
    """Why a pair is rejected ("" when accepted): no signal, fluence mismatch, non-Gaussian
    difference (KS)."""
    if not (np.isfinite(m.mu) and m.mu > 0 and m.npix > 0):
        return "saturated (ADC ceiling)" if m.adc_frac > 0.5 else "no signal"
    if m.mismatch > params.max_mismatch:
        return f"fluence mismatch {100 * m.mismatch:.1f} %"
    if np.isfinite(m.ks_p) and m.ks_p < params.ks_pmin:
        return f"non-Gaussian difference (KS p = {m.ks_p:.2g})"
    return ""


def collect(extractions: Iterable[PTCPairExtraction], params: PTCParams) -> tuple[
        dict[str, dict[str, list[PairRecord]]], dict[str, dict[str, list[FrameQuadStats]]]]:
    """Pair records and frame statistics by CCD and quadrant (pairs in (exptime, ObsID) order;
    a frame measured twice counts once)."""
    pairs: dict[str, dict[str, list[PairRecord]]] = {}
    frames: dict[str, dict[str, dict[int, FrameQuadStats]]] = {}
    for ex in sorted(extractions, key=lambda e: (e.exptime, e.obsids)):
        ob = (int(ex.obsids[0]), int(ex.obsids[1]))
        for ccd, quads in ex.pairs.items():
            for q, m in quads.items():
                pairs.setdefault(ccd, {}).setdefault(q, []).append(
                    PairRecord(ccd, q, ob, float(ex.exptime), ex.wave, m, reason=pair_rejection(m, params)))
        for f in ex.frames:
            frames.setdefault(f.ccd, {}).setdefault(f.quadrant, {})[f.obsid] = f
    fr = {c: {q: [v[k] for k in sorted(v)] for q, v in qs.items()} for c, qs in frames.items()}
    return pairs, fr


# ----------------------------------------------------------------------------- saturation


def find_bloom(mu, var, model, var_err, exptime, params: PTCParams) -> tuple[float, bool]:
    """Variance fall-off: first exposure-time group (by fluence) that starts a run of
    ``bloom_consecutive`` groups whose median variance lies below the model by more than
    ``bloom_rel_drop`` (relative) and ``bloom_nsigma`` errors (a shorter run at the end of the
    curve counts when its variance is below half the model). Points with a NaN are ignored.
    Returns (mean ADU, is_lower_limit): the highest mean when no fall-off is seen."""
    mu, var, model, var_err, exptime = (np.asarray(x, dtype=np.float64) for x in (mu, var, model, var_err, exptime))
    ok = np.isfinite(mu) & np.isfinite(var) & np.isfinite(model)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return float("nan"), True
    groups = _groups(mu[idx], exptime[idx])
    below = []
    gmu = []
    for g in groups:
        ii = idx[g]
        v, m, e = np.median(var[ii]), np.median(model[ii]), np.median(var_err[ii]) / np.sqrt(len(ii))
        below.append(bool((m - v) > params.bloom_rel_drop * m and (m - v) > params.bloom_nsigma * e))
        gmu.append(float(np.median(mu[ii])))
    k = params.bloom_consecutive
    for s in range(len(groups) - k + 1):
        if all(below[s : s + k]):
            return gmu[s], False
    s = len(groups)
    while s > 0 and below[s - 1]:
        s -= 1
    if s < len(groups) and s > 0:
        ii = idx[groups[s]]
        if np.median(var[ii]) < 0.5 * np.median(model[ii]):
            return gmu[s], False
    return float(np.max(mu[idx])), True


@dataclass
class Saturation:
    """The two saturation limits of a quadrant (ADU above the offset)."""

    full_well_adu: float
    full_well_is_lower_limit: bool
    full_well_method: str  # plateau | variance | lower limit
    adc_saturation_adu: float
    adc_reached: bool
    limit: str  # full_well | adc | none


def find_saturation(records: Sequence[PairRecord], model: np.ndarray, params: PTCParams) -> Saturation:
    """Full well and ADC saturation separately (see the module docstring). ``model``: the
    exponential-model variance at each pair's mean (NaN when the fit failed)."""
    p = params
    mu = np.array([r.m.mu for r in records])
    var = np.array([r.m.var for r in records])
    err = np.array([r.m.var_err for r in records])
    texp = np.array([r.exptime for r in records])
    adc = np.array([r.m.adc_frac for r in records])
    plateau = np.array([r.m.plateau_frac for r in records])
    offsets = [0.5 * (r.m.offset1 + r.m.offset2) for r in records]
    adc_level = float(ADC_MAX - np.median(offsets)) if offsets else float("nan")
    adc_hit = adc > p.max_sat_frac
    adc_reached = bool(adc_hit.any())
    mismatch = np.array([r.reason.startswith(("fluence mismatch", "no signal", "saturated")) for r in records], dtype=bool)
    clean = ~adc_hit & ~mismatch & np.isfinite(mu)
    # 1. a plateau of bloomed pixels below the ADC ceiling: its level is the full well
    plat = clean & (plateau > p.max_sat_frac)
    tops = np.array([r.m.plateau_level for r in records])
    fw, lower, method = float("nan"), True, "lower limit"
    if plat.any() and np.isfinite(tops[plat]).any():
        fw, lower, method = float(np.nanmedian(tops[plat])), False, "plateau"
    elif clean.any() and np.isfinite(model).any():
        # 2. the variance falls below the model on pairs without ADC-clipped pixels
        level, lim = find_bloom(np.where(clean, mu, np.nan), var, model, err, texp, p)
        if not lim:
            fw, lower, method = level, False, "variance"
    if lower:
        fw = float(np.nanmax(mu[clean])) if clean.any() else float("nan")
    if not lower and (not adc_reached or fw < adc_level):
        limit = "full_well"
    elif adc_reached:
        limit = "adc"
    else:
        limit = "none"
    return Saturation(fw, lower, method, adc_level, adc_reached, limit)


# ----------------------------------------------------------------------------- results


class PTCQuadResult(BaseModel):
    """Per CCD quadrant result of PTC01/02. Means and levels in ADU above the offset, gain in
    e-/ADU, a / b in 1/e-, noise in e-."""

    gain: float = Field(description="gain from the exponential model (e-/ADU): the calibration gain")
    gain_err: float = Field(description="1-sigma error of gain (e-/ADU)")
    a00: float = Field(description="brighter-fatter a00 from the exponential model (1/e-, < 0: the variance falls below Poisson)")
    a00_err: float = Field(description="1-sigma error of a00 (1/e-)")
    noise_e: float = Field(description="PTC read-noise term sqrt(n00) (e-); NaN if n00 < 0")
    n00_e2: float = Field(description="noise term n00 of the exponential model (e-^2)")
    noise_e_err: float = Field(description="1-sigma error of noise_e (e-)")
    chi2_red: float = Field(description="reduced chi^2 of the exponential fit")
    turnoff_adu: float = Field(description="PTC turnoff: highest mean retained in the exponential fit (ADU)")
    full_well_adu: float = Field(description="full well (ADU above the offset): plateau level of bloomed pixels below the ADC "
                                 "ceiling, else the first fluence whose variance falls off the model without ADC-clipped "
                                 "pixels; a lower limit (highest such fluence) when not reached")
    full_well_is_lower_limit: bool = Field(description="the full well was not reached (full_well_adu is a lower limit)")
    full_well_method: str = Field(description="how full_well_adu was found: plateau | variance | lower limit")
    adc_saturation_adu: float = Field(description="ADC ceiling above the offset: 65535 - offset (ADU)")
    adc_reached: bool = Field(description="pairs with more than max_sat_frac pixels at the ADC ceiling were measured")
    saturation_limit: Literal["full_well", "adc", "none"] = Field(description="the limit that ends the PTC: full_well "
                                                                  "(blooms before the ADC clips), adc, or none reached")
    saturation_adu: float = Field(description="fluence where the PTC ends: the full well or the ADC ceiling, whichever was "
                                  "reached first (ADU); the highest fluence measured when none was")
    bloom_adu: float = Field(description="blooming level = full_well_adu (kept for continuity)")
    bloom_is_lower_limit: bool = Field(description="= full_well_is_lower_limit")
    her: float = Field(description="hard-edge response at the image -> serial overscan edge (fraction; > 0: charge trailing "
                       "into the overscan), median over frames in her_range")
    her_ok: bool = Field(description="|her| <= her_max (1.5e-3); NaN HER counts as ok (not measurable)")
    gain_quad: float = Field(description="gain of the plain quadratic fit (original method, e-/ADU)")
    gain_quad_err: float = Field(description="1-sigma error of gain_quad (e-/ADU)")
    gain_full: float | None = Field(None, description="gain of the full covariance model (Astier eq. 20, e-/ADU)")
    gain_full_err: float | None = Field(None, description="1-sigma error of gain_full (e-/ADU)")
    a00_full: float | None = Field(None, description="a00 of the full model (1/e-)")
    a00_full_err: float | None = Field(None, description="1-sigma error of a00_full (1/e-)")
    a10_full: float | None = Field(None, description="a (serial lag 1) of the full model (1/e-)")
    a10_full_err: float | None = Field(None, description="1-sigma error of a10_full (1/e-)")
    a01_full: float | None = Field(None, description="a (parallel lag 1) of the full model (1/e-)")
    a01_full_err: float | None = Field(None, description="1-sigma error of a01_full (1/e-)")
    full_chi2_red: float | None = Field(None, description="reduced chi^2 of the full covariance fit")
    ron_ove_adu: float = Field(description="overscan RON (ADU), median over frames")
    ron_ove_e: float = Field(description="overscan RON in e- (with gain)")
    noise_ron_ratio: float = Field(description="PTC noise / overscan RON (e- / e-)")
    noise_check_ok: bool = Field(description="PTC noise agrees with the overscan RON (within ron_tolerance, or within "
                                 "ron_nsigma errors of the PTC noise)")
    n_pairs: int = Field(description="pairs measured")
    n_rejected: int = Field(description="pairs rejected (fluence mismatch, non-Gaussian difference)")
    n_saturated: int = Field(0, description="accepted pairs not fitted because of saturated pixels")
    n_fit: int = Field(description="pairs retained by the exponential fit (the fitted column of the pairs table)")
    defect_masked: bool = Field(False, description="the cosmetic defect mask excluded pixels from the statistics")
    fit_ok: bool = Field(description="the exponential fit converged to a finite gain")


@dataclass
class QuadSolution:
    """Everything solved for one quadrant (results + arrays for figures and the dataset)."""

    result: PTCQuadResult
    records: list[PairRecord]
    exp: ExpFit
    full: FullCovFit | None
    saturation: Saturation
    quad: dict[str, float] = field(default_factory=dict)


def _noise_agrees(noise_e: float, noise_err: float, ron_e: float, tolerance: float, nsigma: float) -> bool:
    """PTC noise vs overscan RON (e-): agreement within ``tolerance`` (relative), or a difference
    within ``nsigma`` errors of the PTC noise (the intercept of a PTC fit is poorly
    constrained: only a significant disagreement is flagged)."""
    if not (np.isfinite(noise_e) and np.isfinite(ron_e) and ron_e > 0):
        return False
    diff = abs(noise_e - ron_e)
    return bool(diff <= tolerance * ron_e or (np.isfinite(noise_err) and diff <= nsigma * noise_err))


def fit_quadrant(records: list[PairRecord], frames: list[FrameQuadStats], params: PTCParams) -> QuadSolution:
    """All fits of one quadrant from its pair records (updated in place: ``used``, ``fitted``)
    and frame statistics."""
    p = params
    for r in records:
        r.used = (not r.rejected) and r.m.sat_frac <= p.max_sat_frac
        r.fitted = False
    used = np.array([r.used for r in records], dtype=bool)
    mu = np.array([r.m.mu for r in records])
    var = np.array([r.m.var for r in records])
    err = np.array([r.m.var_err for r in records])
    texp = np.array([r.exptime for r in records])
    ex = fit_exponential(mu[used], var[used], err[used], texp[used], p)
    kept = np.zeros(len(records), bool)
    kept[np.flatnonzero(used)] = ex.kept
    for r, k in zip(records, kept):
        r.fitted = bool(k)
    quad = fit_quadratic(mu, var, err, kept)
    full = None
    if p.full_fit and kept.sum() >= 6 and np.isfinite(ex.gain):
        L = min(p.fit_lag, p.max_lag) + 1
        covs = np.stack([r.m.cov[:L, :L] for r in records])[kept]
        npix = np.array([r.m.npix for r in records])[kept]
        try:
            full = fit_full_covariance(mu[kept], covs, npix, ex.gain, ex.a00 if np.isfinite(ex.a00) else -1e-6, p.fit_b,
                                       p.outlier_nsigma, p.a_min_for_b)
        except (ValueError, np.linalg.LinAlgError) as exc:  # pragma: no cover - reported
            nanm = np.full((L, L), np.nan)
            full = FullCovFit(nanm, nanm, nanm, nanm, float("nan"), float("nan"), nanm, float("nan"), False, str(exc))
    model = exponential_model(mu, ex.a00, ex.gain, ex.n00) if np.isfinite(ex.gain) else np.full(mu.shape, np.nan)
    sat = find_saturation(records, model, p)
    lo, hi = p.her_range
    hers = [f.her for f in frames if lo * FULL_SCALE <= f.fluence <= hi * FULL_SCALE and f.sat_frac < 1e-4 and np.isfinite(f.her)]
    her = float(np.median(hers)) if hers else float("nan")
    rons = [f.ron_ove_adu for f in frames if np.isfinite(f.ron_ove_adu)]
    ron = float(np.median(rons)) if rons else float("nan")
    g = ex.gain
    noise_e = float(np.sqrt(ex.n00)) if ex.n00 > 0 else float("nan")
    noise_err = float(0.5 * ex.n00_err / noise_e) if noise_e > 0 else float("nan")
    ron_e = ron * g if np.isfinite(g) else float("nan")
    ratio = noise_e / ron_e if ron_e and np.isfinite(ron_e) else float("nan")
    ok_full = full is not None and full.a.shape[0] > 1

    def fv(x: Any) -> float | None:
        return float(x) if full is not None else None

    if sat.limit == "full_well":
        sat_level = sat.full_well_adu
    elif sat.limit == "adc":
        sat_level = min(sat.adc_saturation_adu, sat.full_well_adu) if sat.full_well_is_lower_limit else sat.adc_saturation_adu
        first_adc = [r.m.mu for r in records if r.m.adc_frac > p.max_sat_frac and np.isfinite(r.m.mu)]
        sat_level = float(min(first_adc)) if first_adc else sat_level
    else:
        sat_level = sat.full_well_adu
    res = PTCQuadResult(
        gain=g, gain_err=ex.gain_err, a00=ex.a00, a00_err=ex.a00_err, noise_e=noise_e, n00_e2=ex.n00, noise_e_err=noise_err,
        chi2_red=ex.chi2_red, turnoff_adu=ex.turnoff_adu,
        full_well_adu=sat.full_well_adu, full_well_is_lower_limit=sat.full_well_is_lower_limit, full_well_method=sat.full_well_method,
        adc_saturation_adu=sat.adc_saturation_adu, adc_reached=sat.adc_reached, saturation_limit=sat.limit, saturation_adu=sat_level,
        bloom_adu=sat.full_well_adu, bloom_is_lower_limit=sat.full_well_is_lower_limit,
        her=her, her_ok=bool(not np.isfinite(her) or abs(her) <= p.her_max),
        gain_quad=quad["gain_quad"], gain_quad_err=quad["gain_quad_err"],
        gain_full=fv(full.gain) if full else None, gain_full_err=fv(full.gain_err) if full else None,
        a00_full=fv(full.a[0, 0]) if full else None, a00_full_err=fv(full.a_err[0, 0]) if full else None,
        a10_full=fv(full.a[1, 0]) if ok_full else None, a10_full_err=fv(full.a_err[1, 0]) if ok_full else None,
        a01_full=fv(full.a[0, 1]) if ok_full else None, a01_full_err=fv(full.a_err[0, 1]) if ok_full else None,
        full_chi2_red=fv(full.chi2_red) if full else None,
        ron_ove_adu=ron, ron_ove_e=ron_e, noise_ron_ratio=ratio,
        noise_check_ok=_noise_agrees(noise_e, noise_err, ron_e, p.ron_tolerance, p.ron_nsigma),
        n_pairs=len(records), n_rejected=int(sum(r.rejected for r in records)),
        n_saturated=int(sum(r.m.sat_frac > p.max_sat_frac and not r.rejected for r in records)), n_fit=int(kept.sum()),
        defect_masked=any(r.m.n_defect > 0 for r in records),
        fit_ok=bool(ex.success and np.isfinite(g)),
    )
    return QuadSolution(result=res, records=records, exp=ex, full=full, saturation=sat, quad=quad)


def solve_quadrants(extractions: Iterable[PTCPairExtraction], params: PTCParams,
                    quadrants: Sequence[str] = QUADRANTS) -> tuple[dict[str, dict[str, QuadSolution]], dict[str, dict[str, list[FrameQuadStats]]]]:
    """Every quadrant's solution from the pair extractions."""
    pairs, frames = collect(extractions, params)
    out: dict[str, dict[str, QuadSolution]] = {}
    for ccd in sorted(pairs):
        for q in quadrants:
            if q in pairs[ccd]:
                out.setdefault(ccd, {})[q] = fit_quadrant(pairs[ccd][q], frames.get(ccd, {}).get(q, []), params)
    return out, frames


def warnings_of(sol: dict[str, dict[str, QuadSolution]], params: PTCParams) -> list[str]:
    """Human warnings of a solve (fit failures, flags, rejections)."""
    warn: list[str] = []
    for ccd, quads in sol.items():
        for q, s in quads.items():
            r = s.result
            if not r.fit_ok:
                warn.append(f"{ccd} {q}: PTC fit failed")
            elif not r.noise_check_ok:
                warn.append(f"{ccd} {q}: PTC noise {r.noise_e:.2f} +/- {r.noise_e_err:.2f} e- differs from the overscan RON "
                            f"{r.ron_ove_e:.2f} e- by more than {100 * params.ron_tolerance:.0f} % and {params.ron_nsigma:g} sigma")
            if not r.her_ok:
                warn.append(f"{ccd} {q}: hard-edge response {r.her:.2e} beyond {params.her_max:g}")
            if r.n_rejected:
                reasons = sorted({x.reason.split(" (")[0].split(" %")[0].rstrip("0123456789. ") for x in s.records if x.rejected})
                warn.append(f"{ccd} {q}: {r.n_rejected} pair(s) rejected ({'; '.join(reasons)})")
    return warn
