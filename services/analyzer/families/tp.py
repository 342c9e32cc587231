"""TP01 / TP11 (vertical) and TP02 / TP21 (serial) trap pumping on engine v2 (families.md, "Trap
pumping").

**Extract** (per exposure, CCD and quadrant; canonical orientation, offset-subtracted image area
of the readout window):
- every frame: the column profile (median along rows, ADU) and the row-averaged profile (mean
  over the rows read, per column); for references (unpumped: ``v_tpump`` and ``s_tpump`` 0) the
  injection level and noise: each column fitted along rows with a quadratic, level = median of
  the models, noise = median rms of the residuals (ADU);
- vertical pumped frames: the relative map ``img / column profile`` (the frame's own column
  profile: the dipoles are sparse, so it is the injection's column structure, as the reference's
  is), residual ``r = map - uniform_filter(map, 21)``, and every dipole candidate: two pixels
  adjacent along a column with opposite residuals beyond ``candidate_nsigma`` x the map's robust
  noise whose outer neighbours are within it (the 4-pixel pattern within / above / below / within
  or its mirror). The cut at ``5 x noise / level`` of the reference is the solve's.
**Solve**: per quadrant and injection delay the reference's level and noise; vertical: the
candidates whose both residuals pass ``nsigma x noise / level``; serial: the pumped frame's
row-averaged profile divided by its reference's, residual as above, the 4-pixel pattern along the
row with the noise of the row-averaged profile; amplitude ``A = (|r1| + |r2|) / 2 x level x gain``
(e-; the PTC01 gain, else 3.5 e-/ADU and flag UNKNOWN); catalogues per (CCD, quadrant, mode,
t); merge across phase times / dwells by position and polarity; fit per dipole seen at >= 3 values
of t: vertical ``A(t) = N Pc (exp(-t/tau) - exp(-2 t/tau))``, serial ``A = N Pc (1 -
exp(-t/tau))`` with t = dwell + 4.75 us, parameters ``log10 Pc`` in [-6, 0] and ``tau`` in
[t_min / 10, t_max x 10] (bounds as (lower, upper) arrays); N from each frame's exposure-log row.
``(X, Y)`` of a dipole is the pixel of the pair nearer the readout (lower y vertical, lower x
serial, ``Y = -1``), ``POLARITY`` S / N (vertical: S when the brighter pixel is the lower one) or
W / E (serial: W when the brighter pixel is the lower x).

Bad input: a pumped frame without a reference of its delay, an unknown mode, too few points: a
flag and a reason (``notes`` / ``reason``), never a crash or a silent number.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import BaseModel, Field
from scipy import optimize
from scipy.ndimage import uniform_filter

from services.analyzer.family import GAIN, Calibrations, ExposureFrames, Extraction, Family, Need, TestRun, exposure_unit
from services.analyzer.model import AnalysisOutput, FigureProduct, ProductSink, TableProduct
from services.analyzer.science.injection import well_injected_half
from services.analyzer.science.stats import clipped_stats, mad_std
from shared.flags import Flag
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, QUADRANTS, standard_region

NOMINAL_GAIN = 3.5  # e-/ADU when no PTC01 gain is known (families.md)
SERIAL_TRANSFER_US = 4.75
VERTICAL_MODES = (123, 234, 341, 412)
SERIAL_MODES = (23, 31)


class TPParams(BaseModel):
    """Analysis parameters of TP01 / TP11 / TP02 / TP21."""

    nsigma: float = Field(5.0, description="detection threshold: both pixels of a dipole beyond nsigma x noise / level")
    candidate_nsigma: float = Field(3.0, description="candidates kept by the extraction (x the map's robust noise)")
    filter_size: int = Field(21, ge=3, description="uniform filter size of the residual map (px)")
    min_points: int = Field(3, ge=2, description="phase times / dwells a dipole must be seen at to be fitted")
    offset_nsigma: float = 4.0


class Candidate(BaseModel):
    """A dipole candidate: the lower pixel of the pair (x, y), its residuals (relative units)."""

    x: int
    y: int
    r1: float  # residual of the lower pixel (y or x)
    r2: float  # residual of the upper pixel (y + 1 or x + 1)


class QuadTP(BaseModel):
    """One quadrant of one trap-pumping frame."""

    model_config = {"arbitrary_types_allowed": True}

    pumped: str = Field(description="'v', 's' or '' (reference)")
    mode: int | None = None
    t_us: float | None = Field(None, description="toi_tp (vertical) or dwell_s + 4.75 us (serial)")
    cycles: int = 0
    id_dly_us: float = 0.0
    well_injected: bool = True
    level_adu: float | None = None  # references: injection level and noise (ADU)
    noise_adu: float | None = None
    map_noise: float = float("nan")  # robust noise of the residual map (relative)
    row_profile: np.ndarray  # row-averaged profile per column (ADU)
    row_profile_noise_adu: float = float("nan")
    candidates: list[Candidate] = Field(default_factory=list)


class TPExtraction(Extraction):
    quads: dict[str, dict[str, QuadTP]] = Field(default_factory=dict)


class TPQuadResult(BaseModel):
    """``results[CCD][Q]`` of the trap-pumping tests."""

    n_dipoles: int = Field(description="merged dipoles fitted (tau and Pc), all modes")
    n_dipoles_by_mode: dict[str, int] = Field(default_factory=dict, description="merged dipoles (fitted or not) per mode")
    tau_median_us: float | None = Field(None, description="median emission time constant of the fitted dipoles (us)")
    pc_median: float | None = Field(None, description="median capture probability of the fitted dipoles")
    injection_adu: float | None = Field(None, description="injection level of the references (ADU, mean over injection delays)")
    injection_noise_adu: float | None = Field(None, description="noise of the references (ADU): median rms of the column fits")
    gain_used: float = Field(description="gain converting the amplitudes to electrons (e-/ADU)")
    gain_is_nominal: bool = Field(description="no PTC01 gain: the nominal 3.5 e-/ADU (Pc is then only approximate)")
    notes: list[str] = Field(default_factory=list, description="why frames were not used (no reference, unknown mode, ...)")


# ------------------------------------------------------------------------------------ extraction


def _num(values: dict[str, Any], key: str, default: float) -> float:
    try:
        v = values.get(key, default)
        return float(v) if v not in (None, "") else default
    except (TypeError, ValueError):
        return default


def reference_level_noise(img: np.ndarray, degree: int = 2, stride: int = 4) -> tuple[float, float]:
    """Level (median of the column models) and noise (median rms of the residuals) of a
    reference, every ``stride``-th column fitted along rows with a polynomial (ADU)."""
    cols = img[:, ::stride].astype(np.float64)
    y = np.linspace(-1, 1, cols.shape[0])
    basis = np.polynomial.legendre.legvander(y, degree)
    coef, *_ = np.linalg.lstsq(basis, cols, rcond=None)
    model = basis @ coef
    resid = cols - model
    return float(np.median(model)), float(np.median(np.sqrt(np.mean(resid**2, axis=0))))


def dipole_candidates(r: np.ndarray, threshold: float, axis: int = 0) -> list[Candidate]:
    """Adjacent pixels along ``axis`` with opposite residuals beyond ``threshold`` whose outer
    neighbours are within it (the 4-pixel pattern); 2-D ``r`` (rows, cols) or 1-D along x."""
    if r.ndim == 1:
        r = r[None, :]
        axis = 1
        one_d = True
    else:
        one_d = False
    a = np.moveaxis(r, axis, 0)  # pumping axis first
    big = np.abs(a) > threshold
    positive = a > 0
    hit = big[1:-2] & big[2:-1]
    hit &= positive[1:-2] != positive[2:-1]
    hit &= ~big[:-3]
    hit &= ~big[3:]
    idx = np.argwhere(hit)
    out = []
    for i, j in idx:
        k = int(i) + 1  # index of the lower pixel along the pumping axis
        v1, v2 = float(a[k, j]), float(a[k + 1, j])
        if one_d:
            out.append(Candidate(x=k, y=-1, r1=v1, r2=v2))
        elif axis == 0:
            out.append(Candidate(x=int(j), y=k, r1=v1, r2=v2))
        else:
            out.append(Candidate(x=k, y=int(j), r1=v1, r2=v2))
    return out


def quadrant_tp(quad: np.ndarray, values: dict[str, Any], q: str, params: TPParams) -> QuadTP:
    vstart, vend = int(_num(values, "vstart", 0)), int(_num(values, "vend", 2086))
    offset = clipped_stats(standard_region(quad, "pre", vstart, vend), params.offset_nsigma, subsample=7).mean
    r0, r1 = max(vstart, 0), min(vend, IMAGE_ROWS)
    img = np.asarray(quad[r0:r1, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS], dtype=np.float32) - np.float32(offset)
    v_p, s_p = bool(_num(values, "v_tpump", 0)), bool(_num(values, "s_tpump", 0))
    row_profile = img.mean(axis=0, dtype=np.float64).astype(np.float32)
    dly = _num(values, "id_dly", 0.0)
    out = QuadTP(pumped="v" if v_p else ("s" if s_p else ""), id_dly_us=dly, row_profile=row_profile,
                 well_injected=q in well_injected_half(dly, _num(values, "toi_ch", 1000.0)),
                 row_profile_noise_adu=float(np.median(img.std(axis=0)) / math.sqrt(max(img.shape[0], 1))))
    # the exposure log names the modes v_tp_mod / s_tp_mod (the script keys are v_tpmod / s_tpmod)
    if v_p:
        out.mode = int(_num(values, "v_tp_mod", _num(values, "v_tpmod", 0)))
        out.t_us, out.cycles = _num(values, "toi_tp", float("nan")), int(_num(values, "v_tp_cnt", 0))
    elif s_p:
        out.mode = int(_num(values, "s_tp_mod", _num(values, "s_tpmod", 0)))
        out.t_us = _num(values, "dwell_s", float("nan")) + SERIAL_TRANSFER_US
        out.cycles = int(_num(values, "s_tp_cnt", 0))
    if not v_p and not s_p:  # references: injection level and noise
        out.level_adu, out.noise_adu = reference_level_noise(img)
        return out
    if v_p:
        profile = np.median(img[::4], axis=0)  # every 4th row: the column structure, the sparse dipoles do not move it
        profile = np.where(profile > 0, profile, np.nan).astype(np.float32)
        rel = img / profile[None, :]
        if not np.isfinite(profile).all():
            rel = np.nan_to_num(rel, nan=1.0)
        resid = rel - uniform_filter(rel, params.filter_size, mode="nearest")
        out.map_noise = mad_std(resid[::3, ::3])
        if math.isfinite(out.map_noise) and out.map_noise > 0:
            out.candidates = dipole_candidates(resid, params.candidate_nsigma * out.map_noise, axis=0)
    return out


def extract(exposure: ExposureFrames, calib: Calibrations, params: TPParams) -> TPExtraction:
    out = TPExtraction(family="tp", unit=exposure_unit(exposure.obsid), obsids=[exposure.obsid], ccds=exposure.ccds(), flags=exposure.flags)
    for ccd in exposure.ccds():
        values = exposure.values(ccd)
        quads = exposure.quadrants(ccd)
        out.quads[ccd] = {q: quadrant_tp(quads[q], values, q, params) for q in QUADRANTS}
        exposure.release(ccd)
    return out


# ------------------------------------------------------------------------------------ models and fits


def vertical_amplitude(t: np.ndarray, n: np.ndarray, log_pc: float, tau: float) -> np.ndarray:
    t = np.asarray(t, float)
    return n * 10.0**log_pc * (np.exp(-t / tau) - np.exp(-2.0 * t / tau))


def serial_amplitude(t: np.ndarray, n: np.ndarray, log_pc: float, tau: float) -> np.ndarray:
    return n * 10.0**log_pc * (1.0 - np.exp(-np.asarray(t, float) / tau))


def fit_dipole(t: np.ndarray, a: np.ndarray, n: np.ndarray, serial: bool, t_range: tuple[float, float]) -> dict[str, float] | None:
    """Fit tau (us) and Pc of one dipole's amplitudes ``a`` (e-) at ``t`` (us) with ``n`` cycles;
    bounds ``log10 Pc`` in [-6, 0], ``tau`` in [t_min / 10, t_max x 10] (as (lower, upper))."""
    model = serial_amplitude if serial else vertical_amplitude
    lo, hi = np.array([-6.0, t_range[0] / 10.0]), np.array([0.0, t_range[1] * 10.0])
    sigma = np.sqrt(np.maximum(a, 1.0))  # binomial counts
    best = None
    if serial:
        starts = np.geomspace(lo[1] * 1.01, hi[1] * 0.99, 4)
    else:  # the vertical amplitude peaks at t = tau ln 2
        t_peak = float(t[int(np.argmax(a))]) / math.log(2.0)
        starts = np.clip([t_peak, t_peak / 3.0, t_peak * 3.0], lo[1] * 1.01, hi[1] * 0.99)
    for tau0 in starts:
        f = model(t, n, 0.0, tau0)
        pc0 = float(np.clip(np.sum(a * f) / max(np.sum(f * f), 1e-30), 1e-6, 1.0))
        try:
            p, cov = optimize.curve_fit(lambda tt, lp, tau: model(tt, n, lp, tau), t, a, p0=[math.log10(pc0), tau0], sigma=sigma,
                                        bounds=(lo, hi), maxfev=2000)
        except (RuntimeError, ValueError):
            continue
        chi2 = float(np.sum(((a - model(t, n, *p)) / sigma) ** 2))
        if best is None or chi2 < best[2]:
            best = (p, cov, chi2)
    if best is None:
        return None
    p, cov, chi2 = best
    err = np.sqrt(np.clip(np.diag(cov), 0, None)) if np.all(np.isfinite(cov)) else np.full(2, np.nan)
    pc = 10.0 ** p[0]
    return {"tau_us": float(p[1]), "tau_err_us": float(err[1]), "pc": float(pc), "pc_err": float(pc * math.log(10) * err[0]),
            "chi2": chi2}


# ------------------------------------------------------------------------------------ solve


def _serial_candidates(prof: np.ndarray, ref: np.ndarray, noise_rel: float, params: TPParams) -> tuple[list[Candidate], float]:
    rel = prof / np.where(ref > 0, ref, np.nan)
    rel = np.nan_to_num(rel, nan=1.0)
    resid = rel - uniform_filter(rel, params.filter_size, mode="nearest")
    thr = params.nsigma * noise_rel
    return dipole_candidates(resid, thr), thr


def solve(extractions: list[TPExtraction], calib: Calibrations, params: TPParams, run: TestRun, sink: ProductSink) -> AnalysisOutput:
    serial_test = run.test.upper().startswith(("TP02", "TP21"))
    flags = Flag(0)
    exts = sorted(extractions, key=lambda e: e.obsids[0])
    results: dict[str, dict[str, dict[str, Any]]] = {}
    catalogue: list[dict[str, Any]] = []
    points: list[dict[str, Any]] = []
    summary = [f"{'CCD':<5}{'Q':<2} {'dipoles':>7} {'tau_med(us)':>11} {'Pc_med':>7}  by mode"]
    ccds = sorted({c for e in exts for c in e.quads})
    if not ccds:
        raise ValueError(f"{run.label}: no trap-pumping frames to analyse")
    for ccd in ccds:
        results[ccd] = {}
        for q in QUADRANTS:
            everything = [(e.obsids[0], e.quads[ccd][q]) for e in exts if ccd in e.quads and q in e.quads[ccd]]
            frames = [(o, f) for o, f in everything if f.well_injected]  # the other half injects poorly: unusable
            refs = {f.id_dly_us: (o, f) for o, f in frames if f.pumped == ""}
            gain = calib.gain(ccd, q)
            nominal = gain is None
            gain = gain or NOMINAL_GAIN
            notes: list[str] = []
            dipoles: dict[tuple[int, int, int, str], list[tuple[float, float, int]]] = {}
            for obsid, f in frames:
                if not f.pumped:
                    continue
                valid = SERIAL_MODES if f.pumped == "s" else VERTICAL_MODES
                if f.mode not in valid:
                    notes.append(f"ObsID {obsid}: unknown pumping mode {f.mode} (known: {', '.join(map(str, valid))}): frame not used")
                    flags |= Flag.WRONG_ROE_CONF
                    continue
                ref = refs.get(f.id_dly_us)
                if ref is None:
                    notes.append(f"ObsID {obsid}: no unpumped reference at id_dly {f.id_dly_us:g} us: frame not used")
                    flags |= Flag.MISSDATA
                    continue
                rf = ref[1]
                if not (rf.level_adu and rf.noise_adu and rf.level_adu > 0):
                    notes.append(f"ObsID {ref[0]}: reference without injection: frame {obsid} not used")
                    flags |= Flag.MISSDATA
                    continue
                if f.pumped == "v":
                    thr = params.nsigma * rf.noise_adu / rf.level_adu
                    found = [c for c in f.candidates if abs(c.r1) > thr and abs(c.r2) > thr]
                    level = rf.level_adu
                else:
                    noise_rel = math.sqrt(2.0) * rf.row_profile_noise_adu / rf.level_adu
                    found, thr = _serial_candidates(f.row_profile, rf.row_profile, noise_rel, params)
                    level = rf.level_adu
                for c in found:
                    pol = ("S" if c.r1 > 0 else "N") if f.pumped == "v" else ("W" if c.r1 > 0 else "E")
                    amp = 0.5 * (abs(c.r1) + abs(c.r2)) * level * gain
                    dipoles.setdefault((f.mode, c.x, c.y, pol), []).append((float(f.t_us), amp, f.cycles))
                    points.append({"ccd": ccd, "quadrant": q, "obsid": obsid, "mode": f.mode, "t_us": f.t_us, "x": c.x, "y": c.y,
                                   "polarity": pol, "amplitude_e": amp})
            ts = [f.t_us for _, f in frames if f.pumped and f.t_us is not None and math.isfinite(f.t_us)]
            t_range = (min(ts), max(ts)) if ts else (1.0, 1.0)
            fitted, by_mode = [], {}
            for (mode, x, y, pol), pts in sorted(dipoles.items()):
                by_mode[str(mode)] = by_mode.get(str(mode), 0) + 1
                pts = sorted(pts)
                t = np.array([p[0] for p in pts])
                a = np.array([p[1] for p in pts])
                n = np.array([p[2] for p in pts], float)
                fit = fit_dipole(t, a, n, serial_test, t_range) if len(np.unique(t)) >= params.min_points else None
                if fit is not None:
                    fitted.append(fit)
                catalogue.append({"CCD": ccd, "QUAD": q, "X": x, "Y": y if not serial_test else -1, "POLARITY": pol, "MODE": int(mode),
                                  "TAU_US": fit["tau_us"] if fit else float("nan"), "TAU_ERR_US": fit["tau_err_us"] if fit else float("nan"),
                                  "PC": fit["pc"] if fit else float("nan"), "PC_ERR": fit["pc_err"] if fit else float("nan"),
                                  "NPOINTS": int(len(np.unique(t))), "A_MAX_E": float(a.max())})
            levels = [f.level_adu for _, f in refs.values() if f.level_adu]
            noises = [f.noise_adu for _, f in refs.values() if f.noise_adu]
            if not refs:
                notes.append("no unpumped reference frame")
            res = TPQuadResult(
                n_dipoles=len(fitted), n_dipoles_by_mode=by_mode,
                tau_median_us=float(np.median([f["tau_us"] for f in fitted])) if fitted else None,
                pc_median=float(np.median([f["pc"] for f in fitted])) if fitted else None,
                injection_adu=float(np.mean(levels)) if levels else None, injection_noise_adu=float(np.mean(noises)) if noises else None,
                gain_used=gain, gain_is_nominal=nominal, notes=notes)
            if nominal:
                flags |= Flag.UNKNOWN
            results[ccd][q] = res.model_dump()
            summary.append(f"{ccd:<5}{q:<2} {res.n_dipoles:7d} {res.tau_median_us or float('nan'):11.1f} {res.pc_median or float('nan'):7.3f}  "
                           + " ".join(f"{m}:{k}" for m, k in sorted(by_mode.items())) + (f"  ({'; '.join(notes[:2])})" if notes else ""))
    columns = ("CCD", "QUAD", "X", "Y", "POLARITY", "MODE", "TAU_US", "TAU_ERR_US", "PC", "PC_ERR", "NPOINTS", "A_MAX_E")
    sink.add(TableProduct(f"{run.test}_dipoles", {c: [r[c] for r in catalogue] for c in columns},
                          units={"TAU_US": "us", "TAU_ERR_US": "us", "A_MAX_E": "electron"},
                          description="merged dipoles (one row per CCD, quadrant, mode, position and polarity; TAU/PC NaN when not fitted)"))
    if points:
        sink.add(TableProduct(f"{run.test}_detections", {k: [p[k] for p in points] for k in points[0]},
                              description="dipoles detected per frame (before merging)"))
    sink.add(FigureProduct(f"{run.test}_tau_pc", lambda fig: _draw(fig, catalogue), size=(12, 4.5),
                           description="tau-Pc heat maps per mode (fitted dipoles)"))
    return AnalysisOutput(results=results, flags=int(flags), parameters=params.model_dump(mode="json"), summary=summary,
                          test_values={"dipoles": len(catalogue), "fitted": sum(1 for r in catalogue if math.isfinite(r["TAU_US"]))})


def _draw(fig: Any, catalogue: list[dict[str, Any]]) -> None:
    modes = sorted({r["MODE"] for r in catalogue}) or [0]
    axes = np.atleast_1d(fig.subplots(1, len(modes)))
    for ax, mode in zip(axes, modes):
        rows = [r for r in catalogue if r["MODE"] == mode and math.isfinite(r["TAU_US"])]
        if rows:
            ax.hist2d(np.log10([r["TAU_US"] for r in rows]), np.log10([max(r["PC"], 1e-6) for r in rows]), bins=20, cmap="viridis")
        ax.set_title(f"mode {mode} ({len(rows)} fitted)")
        ax.set_xlabel("log10 tau (us)")
    axes[0].set_ylabel("log10 Pc")


FAMILY = Family(
    name="tp", tests=("TP01", "TP11", "TP02", "TP21"), params=TPParams, extract=extract, solve=solve, unit="exposure",
    extraction=TPExtraction, needs=(Need(GAIN, "rerun", ("PTC01",)),), result=TPQuadResult, version="2",
)
