"""PTC01 / PTC02 plug-in (engine v2): ``extract_pair`` measures one pair of flats (every CCD and
quadrant, both frames' statistics) as soon as its second exposure is validated; ``solve`` fits
the curves from the extractions only and writes the products, among them the covariance dataset
BF01 solves from (``ptc_covariances.fits``: per pair and quadrant mu, var, the covariance
matrix, npix, rejection, fitted, and the quadrant's PTC gain).

Provides ``gain`` (values ``{"gain": {CCD: {Q: e-/ADU}}}``) and ``ptc_covariances`` (files
``{"ALL": "ptc_covariances.fits"}``; values: the same gains and the lag range)."""

from __future__ import annotations

from typing import Any

import numpy as np

from services.analyzer.families.ptc.figures import draw_ptc
from services.analyzer.families.ptc.measure import PTCPairExtraction, frame_quad_stats, measure_pair
from services.analyzer.families.ptc.params import TESTS, PTCParams
from services.analyzer.families.ptc.solve import PTCQuadResult, QuadSolution, solve_quadrants, warnings_of
from services.analyzer.family import DEFECT_MASK, GAIN, PTC_COVARIANCES, Calibrations, ExposureFrames, Family, TestRun, pair_unit
from services.analyzer.model import AnalysisOutput, FigureProduct, ProductSink, TableProduct
from shared.flags import Flag
from shared.geometry import Geometry, quadrants

COVARIANCE_FILE = "ptc_covariances.fits"


def _defect_quadrants(calib: Calibrations, ccd: str, exposure: ExposureFrames, notes: list[str]) -> dict[str, np.ndarray] | None:
    """Canonical bool quadrants (True = bad) of the cosmetic defect mask of a CCD, if known."""
    if DEFECT_MASK not in calib:
        return None
    shape = exposure.load(ccd).shape
    try:
        mask = calib.image(DEFECT_MASK, ccd, "MASK")
    except (OSError, KeyError, ValueError) as exc:
        notes.append(f"{ccd}: defect mask unreadable ({exc.__class__.__name__}: {exc}); not applied")
        return None
    if mask is None:
        return None
    if mask.shape != shape:
        notes.append(f"{ccd}: defect mask shape {mask.shape} differs from the frame's {shape}; not applied")
        return None
    return quadrants(np.asarray(mask) != 0, Geometry.from_shape(shape))


def extract_pair(first: ExposureFrames, second: ExposureFrames, calib: Calibrations, params: PTCParams) -> PTCPairExtraction:
    """Measure one pair of flats: per CCD and quadrant :func:`measure_pair`, per frame
    :func:`frame_quad_stats`. One CCD's two frames in memory at a time."""
    p = params if isinstance(params, PTCParams) else PTCParams.model_validate(params or {})
    notes: list[str] = []
    pairs: dict[str, dict[str, Any]] = {}
    frames = []
    ccds = [c for c in first.ccds() if c in second.ccds()]
    masked = False
    for ccd in ccds:
        qa, qb = first.quadrants(ccd), second.quadrants(ccd)
        defects = _defect_quadrants(calib, ccd, first, notes) if p.use_defect_mask else None
        masked = masked or defects is not None
        for q in qa:
            m = measure_pair(qa[q], qb[q], p, ccd=ccd, quadrant=q, defect=None if defects is None else defects[q])
            pairs.setdefault(ccd, {})[q] = m
            for ex, quad, mu, off in ((first, qa[q], m.mu1, m.offset1), (second, qb[q], m.mu2, m.offset2)):
                frames.append(frame_quad_stats(quad, obsid=ex.obsid, ccd=ccd, quadrant=q, exptime=ex.exptime, fluence=mu, offset=off))
        first.release(ccd)
        second.release(ccd)
    return PTCPairExtraction(
        family="ptc", unit=pair_unit(first.obsid, second.obsid), obsids=[first.obsid, second.obsid], ccds=ccds,
        flags=int(first.flags | second.flags), calibrations=[DEFECT_MASK] if masked else [], notes=notes,
        exptime=first.exptime, wave=first.wave, pairs=pairs, frames=frames, defect_masked=masked,
    )


def _products(sol: dict[str, dict[str, QuadSolution]], frames: dict, params: PTCParams, sink: ProductSink) -> list[dict[str, Any]]:
    """Hand the products to the sink; returns the frame rows."""
    rows = [r.row() for quads in sol.values() for s in quads.values() for r in s.records]
    for ccd, quads in sol.items():
        sink.add(FigureProduct(f"ptc_{ccd}", (lambda fig, quads=quads, ccd=ccd: draw_ptc(fig, quads, ccd)), ccd=ccd, size=(16, 7),
                               description="photon transfer curve per quadrant"))
    sink.add(TableProduct("ptc_pairs", {k: [r[k] for r in rows] for k in rows[0]}, units={"mu": "ADU", "var": "ADU2"},
                          description="per pair and quadrant: means, variance, nearest covariances, KS p, rejection, used "
                          "(enters the fits), fitted (kept by the exponential fit: turnoff and outlier cuts)"))
    recs = [(ccd, q, s, r) for ccd, quads in sol.items() for q, s in quads.items() for r in s.records]
    sink.add(TableProduct("ptc_covariances", {
        "ccd": [c for c, *_ in recs], "quadrant": [q for _, q, *_ in recs],
        "obsid1": [r.obsids[0] for *_, r in recs], "obsid2": [r.obsids[1] for *_, r in recs],
        "exptime": [r.exptime for *_, r in recs], "mu": [r.m.mu for *_, r in recs], "mu1": [r.m.mu1 for *_, r in recs],
        "mu2": [r.m.mu2 for *_, r in recs], "var": [r.m.var for *_, r in recs], "var_err": [r.m.var_err for *_, r in recs],
        "cov": np.stack([r.m.cov for *_, r in recs]), "npix": [r.m.npix for *_, r in recs],
        "rejected": [r.rejected for *_, r in recs], "reason": [r.reason or "-" for *_, r in recs],
        "used": [r.used for *_, r in recs], "fitted": [r.fitted for *_, r in recs],
        "gain": [s.result.gain for _, _, s, _ in recs]},
        units={"mu": "ADU", "var": "ADU2", "cov": "ADU2", "gain": "electron/adu"},
        description="PTC covariance dataset (BF01 input): covariances C[i serial, j parallel] of D/2 per pair and quadrant; "
        "gain = the quadrant's PTC gain"))
    flist = [f for quads in frames.values() for fs in quads.values() for f in fs]
    frame_rows = [f.model_dump() for f in flist]
    if frame_rows:
        sink.add(TableProduct("ptc_frames", {k: [r[k] for r in frame_rows] for k in frame_rows[0]},
                              description="per frame and quadrant: fluence, offset, ADC saturation, overscan RON, HER"))
    for ccd, quads in sol.items():
        fits_ = {q: s.full for q, s in quads.items() if s.full is not None}
        if fits_:
            sink.add(TableProduct(f"ptc_fullcov_{ccd}", {
                "quadrant": list(fits_), "a": np.stack([f.a for f in fits_.values()]), "a_err": np.stack([f.a_err for f in fits_.values()]),
                "b": np.stack([f.b for f in fits_.values()]), "noise": np.stack([f.noise for f in fits_.values()]),
                "gain": [f.gain for f in fits_.values()], "gain_err": [f.gain_err for f in fits_.values()]},
                ccd=ccd, units={"a": "1/electron", "a_err": "1/electron", "b": "1/electron", "noise": "electron2",
                                "gain": "electron/adu", "gain_err": "electron/adu"},
                description="full covariance model (Astier 2019 eq. 20): a (+ a_err), b = c / a (NaN where |a| is ~0), noise "
                "matrices [i serial, j parallel]"))
    return frame_rows


def solve(extractions: list[PTCPairExtraction], calib: Calibrations, params: PTCParams, run: TestRun, sink: ProductSink) -> AnalysisOutput:
    """PTC01 / PTC02 from its pair extractions (no frame is read)."""
    p = params if isinstance(params, PTCParams) else PTCParams.model_validate(params or {})
    if not extractions:
        raise ValueError(f"{run.label}: no pairs of flats at equal exposure time")
    sol, frames = solve_quadrants(extractions, p)
    if not sol:
        raise ValueError(f"{run.label}: the pair extractions hold no quadrant")
    flags = Flag(run.flags)
    for quads in sol.values():
        for s in quads.values():
            r = s.result
            if not r.fit_ok:
                flags |= Flag.BADFIT
            elif not r.noise_check_ok:
                flags |= Flag.POORQUALDATA
            if not r.her_ok:
                flags |= Flag.UNDERPERFORM
    frame_rows = _products(sol, frames, p, sink)
    warn = warnings_of(sol, p)
    summary = [f"{'CCD':<5}{'Q':<2} {'gain':>7} {'err':>7} {'a00':>10} {'noise_e':>7} {'turnoff':>8} {'full well':>9} "
               f"{'ADC':>7} {'g_full':>7} {'g_quad':>7}"]
    for ccd, quads in sol.items():
        for q, s in quads.items():
            r = s.result
            fw = f"{'>' if r.full_well_is_lower_limit else ''}{r.full_well_adu:.0f}"
            summary.append(f"{ccd:<5}{q:<2} {r.gain:7.4f} {r.gain_err:7.4f} {r.a00:10.3e} {r.noise_e:7.2f} {r.turnoff_adu:8.0f} "
                           f"{fw:>9} {('hit' if r.adc_reached else '-'):>7} {r.gain_full or float('nan'):7.4f} {r.gain_quad:7.4f}")
    summary += [f"warning: {w}" for w in warn]
    gains = {ccd: {q: float(s.result.gain) for q, s in quads.items() if np.isfinite(s.result.gain)} for ccd, quads in sol.items()}
    L = p.max_lag + 1
    n_rows = sum(len(s.records) for quads in sol.values() for s in quads.values())
    return AnalysisOutput(
        results={ccd: {q: s.result.model_dump() for q, s in quads.items()} for ccd, quads in sol.items()},
        flags=int(flags), frames=frame_rows, parameters=p.model_dump(mode="json"), summary=summary,
        test_values={"pairs": len(extractions), "rejected_pairs": sum(s.result.n_rejected for quads in sol.values() for s in quads.values()),
                     "pair_quadrants": n_rows},
        provides={
            GAIN: {"values": {"gain": gains}},
            PTC_COVARIANCES: {"values": {"gain": gains, "max_lag": p.max_lag, "fit_lag": min(p.fit_lag, p.max_lag), "lags": L},
                              "files": {"ALL": COVARIANCE_FILE}},
        },
    )


FAMILY = Family(
    name="ptc",
    tests=TESTS,
    params=PTCParams,
    extract_pair=extract_pair,
    solve=solve,
    unit="pair",
    extraction=PTCPairExtraction,
    needs=(),
    extract_needs=(DEFECT_MASK,),
    provides=(GAIN, PTC_COVARIANCES),
    version="2",
    result=PTCQuadResult,
)
