"""PTC family (engine v2) plumbing and the issue-11 PTC defects: extraction round trip, the
solve from stored extractions only, and one test per fixed defect (each docstring says what
the code before the fix gave on the same input)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.analyzer import extractions as store
from services.analyzer.families.ptc import FAMILY, measure
from services.analyzer.families.ptc.measure import FrameQuadStats, PairQuadMeasurement, PTCPairExtraction
from services.analyzer.families.ptc.models import full_covariance_model
from services.analyzer.families.ptc.params import PTCParams
from services.analyzer.families.ptc.solve import pair_rejection
from services.analyzer.family import Calibrations, TestRun, run_inprocess
from services.analyzer.model import ListSink
from shared.flags import Flag
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS
from ptc_sim import array_exposure

GAIN, RON, OFFSET = 3.3, 1.4, 1000.0
IMG = (slice(0, IMAGE_ROWS), slice(PRESCAN_COLS, PRESCAN_COLS + IMAGE_COLS))


def _quad(rng, mu, *, full_well=None, frac=0.0, fac=1.0, pattern=None, her=0.0, shape=(2086, 2119)):
    """A digitised canonical quadrant: offset + read noise; in the image area a flat of mean mu
    with Gaussian shot noise at GAIN (``frac`` of the pixels with ``fac`` x the noise), times a
    fixed ``pattern`` (image-area array), capped at ``full_well`` (a bloomed plateau) and at the
    ADC ceiling; ``her`` x the last image column leaks into the first overscan column."""
    q = OFFSET + RON * rng.standard_normal(shape, dtype=np.float32)
    s = np.float32(np.sqrt(mu / GAIN)) * rng.standard_normal((IMAGE_ROWS, IMAGE_COLS), dtype=np.float32)
    if frac:
        s[rng.random(s.shape) < frac] *= np.float32(fac)
    sig = np.float32(mu) + s
    if pattern is not None:
        sig *= pattern
    if full_well is not None:
        np.minimum(sig, np.float32(full_well), out=sig)
    q[IMG] += sig
    if her:
        q[:IMAGE_ROWS, PRESCAN_COLS + IMAGE_COLS] += np.float32(her) * sig[:, -1]
    return np.minimum(np.rint(q), 65535.0).astype(np.float32)


def _pair_exposures(rng, fluences, **kw):
    exps, k = [], 0
    for t, mu in enumerate(fluences, start=1):
        for _ in range(2):
            k += 1
            exps.append(array_exposure(k, _quad(rng, mu, **kw), exptime=float(t)))
    return exps


# ----------------------------------------------------------------------------- synthetic extractions


def _synthetic_extractions(fluences=(2e3, 5e3, 1e4, 1.5e4, 2e4, 2.5e4, 3e4, 3.5e4, 4e4, 4.5e4), a00=-1.5e-6, her=0.0,
                           ron_adu=RON, n00=(RON * GAIN) ** 2, lags=9, seed=3, neighbours=True) -> list[PTCPairExtraction]:
    """Pair extractions of one quadrant (CCD1 E) whose covariances follow eq. 20 exactly (a00,
    a10, a01; noise n00 e-^2) plus the measurement noise of 4e6 pixels; frames with the given
    HER and overscan RON."""
    rng = np.random.default_rng(seed)
    a = np.zeros((lags, lags))
    a[0, 0] = a00
    if neighbours:  # else C00 is the exponential model to 3rd order
        a[1, 0], a[0, 1] = -a00 / 4.6, -a00 * 1.3 / 4.6
    noise = np.zeros((lags, lags))
    noise[0, 0] = n00
    out = []
    for k, mu in enumerate(fluences):
        cov = full_covariance_model(np.array([mu]), a, np.zeros_like(a), noise, GAIN)[0]
        sig = cov[0, 0] / np.sqrt(4e6) * np.ones_like(cov)
        sig[0, 0] *= np.sqrt(2)
        cov = cov + sig * rng.standard_normal(cov.shape)
        m = PairQuadMeasurement(ccd="CCD1", quadrant="E", mu1=mu, mu2=mu, mu=mu, var=float(cov[0, 0]),
                                var_err=float(cov[0, 0] * np.sqrt(2 / 4e6)), cov=cov, npix=4_000_000, ks_p=0.5, mismatch=0.0,
                                adc_frac=0.0, plateau_frac=0.0, offset1=OFFSET, offset2=OFFSET)
        ob = (2 * k + 1, 2 * k + 2)
        frames = [FrameQuadStats(obsid=o, ccd="CCD1", quadrant="E", exptime=float(k + 1), fluence=mu, offset_adu=OFFSET,
                                 sat_frac=0.0, ron_ove_adu=ron_adu, her=her) for o in ob]
        out.append(PTCPairExtraction(family="ptc", unit=f"p{ob[0]}-{ob[1]}", obsids=list(ob), ccds=["CCD1"], exptime=float(k + 1),
                                     wave=800.0, pairs={"CCD1": {"E": m}}, frames=frames))
    return out


def _solve(extractions, params=None, sink=None):
    return run_inprocess(FAMILY, [], TestRun.of("PTC01", "SIM"), calib=Calibrations(), params=params or {},
                         extractions=extractions, sink=sink if sink is not None else ListSink())


# ----------------------------------------------------------------------------- plumbing


def test_pair_extraction_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(11)
    first, second = (array_exposure(k, _quad(rng, 20000.0), exptime=2.0) for k in (7, 8))
    ex = FAMILY.extract_pair(first, second, Calibrations(), PTCParams(max_lag=3))
    assert ex.unit == "p7-8" and ex.obsids == [7, 8] and set(ex.pairs["CCD1"]) == {"E"} and len(ex.frames) == 2
    back = store.load(store.save(tmp_path / "p7-8.npz", ex), PTCPairExtraction)
    a, b = ex.pairs["CCD1"]["E"], back.pairs["CCD1"]["E"]
    assert isinstance(b.cov, np.ndarray) and b.cov.dtype == a.cov.dtype and b.cov.shape == (4, 4)
    np.testing.assert_array_equal(a.cov, b.cov)
    for name in PairQuadMeasurement.model_fields:
        if name != "cov":
            x, y = getattr(a, name), getattr(b, name)
            assert x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y)), name
    assert back.frames == ex.frames and back.exptime == ex.exptime and back.wave == ex.wave


def test_solve_needs_only_the_stored_extractions(tmp_path):
    """The solve reads no frame: from extractions saved and loaded (the exposures gone) it gives
    the results of the extractions in memory."""
    rng = np.random.default_rng(12)
    exps = _pair_exposures(rng, [2e3, 5e3, 1e4, 2e4, 3e4, 4e4, 5e4])
    params = {"max_lag": 2, "fit_lag": 2}
    p = FAMILY.parameters(params)
    exts = [FAMILY.run_extraction(inputs, Calibrations(), p) for _, inputs in FAMILY.units(exps)]
    paths = [store.save(tmp_path / f"{ex.unit}.npz", ex) for ex in exts]
    del exps
    direct = _solve(exts, params)
    again = _solve([store.load(x, PTCPairExtraction) for x in paths], params)
    assert again.results == direct.results and again.frames == direct.frames
    r = again.results["CCD1"]["E"]
    assert r["gain"] == pytest.approx(GAIN, rel=0.01) and r["n_pairs"] == 7 and r["fit_ok"]


# ----------------------------------------------------------------------------- issue 11 defects


def test_defect1_adc_ceiling_is_not_reported_as_full_well():
    """The ADC clips before any full well: the fix reports the full well as a lower limit and
    the ADC ceiling as the limit reached. Before the fix (``find_bloom`` on every pair, ADC
    pixels included) the same pairs gave ``bloom_adu`` = 64 535 ADU (the ADC ceiling, 65535 -
    offset) as a measured blooming level (``bloom_is_lower_limit`` False)."""
    rng = np.random.default_rng(21)
    exps = _pair_exposures(rng, [5e3, 1.5e4, 2.5e4, 3.5e4, 4.5e4, 5.5e4, 6.3e4, 6.42e4, 6.5e4])
    out = run_inprocess(FAMILY, exps, TestRun.of("PTC01", "SIM"), params={"max_lag": 2, "fit_lag": 2})
    r = out.results["CCD1"]["E"]
    assert r["adc_reached"] and r["saturation_limit"] == "adc"
    assert r["adc_saturation_adu"] == pytest.approx(65535 - OFFSET, abs=0.5)
    assert r["full_well_is_lower_limit"] and r["bloom_is_lower_limit"]
    assert r["full_well_adu"] == pytest.approx(6.3e4, rel=1e-3)  # the highest fluence without ADC-clipped pixels
    assert r["gain"] == pytest.approx(GAIN, rel=0.01)


def test_defect1_full_well_below_the_adc_is_measured():
    """Pixels bloom at a 52 000 ADU full well, well below the ADC ceiling: the fix reports the
    full well from the plateau level (within 0.1 %), no ADC saturation and ``saturation_limit``
    ``full_well``. Before the fix the same pairs gave ``bloom_adu`` 52 000 too, but the same
    kind of number as in the ADC case above: nothing told the two limits apart (no
    ``full_well_*``, ``adc_*`` or ``saturation_limit`` keys)."""
    rng = np.random.default_rng(22)
    exps = _pair_exposures(rng, [5e3, 1.5e4, 2.5e4, 3.5e4, 4.5e4, 5.5e4, 6e4], full_well=52000.0)
    out = run_inprocess(FAMILY, exps, TestRun.of("PTC01", "SIM"), params={"max_lag": 2, "fit_lag": 2})
    r = out.results["CCD1"]["E"]
    assert not r["adc_reached"] and r["saturation_limit"] == "full_well"
    assert not r["full_well_is_lower_limit"] and r["full_well_method"] == "plateau"
    assert r["full_well_adu"] == pytest.approx(52000.0, rel=1e-3)
    assert r["saturation_adu"] == r["full_well_adu"] == r["bloom_adu"]


def test_defect2_means_and_variance_from_one_pixel_mask():
    """A fixed pattern (1 % of the columns at 1.4 x the flat) cancels in the difference, so every
    pixel enters the variance: the means must come from the same pixels. Before the fix mu1 /
    mu2 were each frame's own 5-sigma clipped mean, which drops those columns: 0.39 % below the
    mean over the variance's pixels."""
    rng = np.random.default_rng(23)
    pattern = np.ones((IMAGE_ROWS, IMAGE_COLS), np.float32)
    pattern[:, ::100] = 1.4
    q1, q2 = _quad(rng, 2e4, pattern=pattern), _quad(rng, 2e4, pattern=pattern)
    p = PTCParams(max_lag=1)
    m = measure.measure_pair(q1, q2, p)
    e = p.edge
    area = (slice(e, IMAGE_ROWS - e), slice(PRESCAN_COLS + e, PRESCAN_COLS + IMAGE_COLS - e))
    npix_all = (IMAGE_ROWS - 2 * e) * (IMAGE_COLS - 2 * e)
    assert m.npix > npix_all - 100  # nothing but a few Gaussian-tail pixels clipped
    assert m.mu1 == pytest.approx(float(np.mean(q1[area], dtype=np.float64)) - m.offset1, rel=2e-5)
    assert m.mu2 == pytest.approx(float(np.mean(q2[area], dtype=np.float64)) - m.offset2, rel=2e-5)
    # the cosmetic mask removes the same pixels from means and variance
    defect = np.zeros(q1.shape, bool)
    defect[:IMAGE_ROWS, PRESCAN_COLS : PRESCAN_COLS + IMAGE_COLS][:, ::100] = True
    md = measure.measure_pair(q1, q2, p, defect=defect)
    assert md.n_defect > 0 and md.npix <= npix_all - md.n_defect
    assert md.mu1 == pytest.approx(2e4, rel=2e-4) and md.var < m.var


def test_defect3_ks_test_rejects_a_subtly_non_gaussian_pair():
    """2 % of the pixels with twice the noise (a scale mixture: same mean, slightly heavy
    tails). The KS test on every pixel against the Gaussian fitted to the histogram rejects it
    (p ~ 1e-13); before the fix (20 000-pixel subsample of the clipped, self-standardised
    difference) p was 0.44 and the pair was accepted."""
    rng = np.random.default_rng(7)
    q1, q2 = _quad(rng, 2e4, frac=0.02, fac=2.0), _quad(rng, 2e4, frac=0.02, fac=2.0)
    p = PTCParams(max_lag=2)
    m = measure.measure_pair(q1, q2, p)
    assert m.ks_p < 1e-6 and "non-Gaussian" in pair_rejection(m, p)
    # a Gaussian pair at the same level passes
    g1, g2 = _quad(rng, 2e4), _quad(rng, 2e4)
    assert measure.measure_pair(g1, g2, p).ks_p > 0.01


def test_defect3_ks_rejected_pairs_are_not_fitted():
    exts = _synthetic_extractions()
    exts[4].pairs["CCD1"]["E"] = exts[4].pairs["CCD1"]["E"].model_copy(update={"ks_p": 1e-5, "var": 3 * exts[4].pairs["CCD1"]["E"].var})
    sink = ListSink()
    out = _solve(exts, sink=sink)
    r = out.results["CCD1"]["E"]
    assert r["n_rejected"] == 1 and r["n_fit"] == 9
    without = _solve(exts[:4] + exts[5:]).results["CCD1"]["E"]
    assert r["gain"] == without["gain"] and r["a00"] == without["a00"]  # the rejected pair enters no fit
    table = sink.get("ptc_pairs").columns
    k = table["obsid1"].index(9)
    assert table["rejected"][k] and not table["used"][k] and not table["fitted"][k]


def test_defect4_her_and_noise_mismatch_are_flagged():
    """|HER| = 3e-3 and an overscan RON twice the PTC noise: both flagged (UNDERPERFORM,
    POORQUALDATA). Before the fix HER was reported but never checked and the mismatch was a
    warning line only: the test flags were 0."""
    out = _solve(_synthetic_extractions(her=3e-3, ron_adu=2 * RON, neighbours=False))
    r = out.results["CCD1"]["E"]
    assert r["her"] == pytest.approx(3e-3) and not r["her_ok"]
    assert not r["noise_check_ok"] and r["noise_ron_ratio"] < 0.8  # PTC noise vs 2 x its RON
    assert out.flags & Flag.UNDERPERFORM and out.flags & Flag.POORQUALDATA
    clean = _solve(_synthetic_extractions(neighbours=False))
    rc = clean.results["CCD1"]["E"]
    assert rc["her_ok"] and rc["noise_check_ok"] and clean.flags == 0


def test_defect4_her_measured_from_frames():
    rng = np.random.default_rng(24)
    quad = _quad(rng, 3e4, her=3e-3)
    st = measure.frame_quad_stats(quad)
    assert st.her == pytest.approx(3e-3, rel=0.05)


def test_defect5_pairs_table_fitted_column_a_err_and_guarded_b():
    """The pairs table has ``fitted`` (turnoff / outlier cuts visible), the full-fit table has
    ``a_err``, and b = c / a is NaN where a ~ 0 (the far lags) instead of a huge number. Before
    the fix there was no ``fitted`` column, no ``a_err``, and b reached 1e3-1e5 /e- on the
    lags where a vanishes."""
    exts = _synthetic_extractions()
    sink = ListSink()
    out = _solve(exts, sink=sink)
    pairs = sink.get("ptc_pairs").columns
    assert "fitted" in pairs and sum(pairs["fitted"]) == out.results["CCD1"]["E"]["n_fit"] >= 9
    full = sink.get("ptc_fullcov_CCD1").columns
    a, a_err, b = full["a"][0], full["a_err"][0], full["b"][0]
    assert a_err.shape == a.shape and np.all(a_err[:2, :2] > 0) and np.all(np.isfinite(a_err))
    assert a_err[0, 0] < 0.05 * abs(a[0, 0])
    small = np.abs(a) <= PTCParams().a_min_for_b
    assert small.any() and np.isnan(b[small]).all() and np.isfinite(b[~small]).all()
    r = out.results["CCD1"]["E"]
    assert r["a00_full_err"] == pytest.approx(a_err[0, 0]) and r["a10_full_err"] > 0
    cov = sink.get("ptc_covariances").columns
    assert cov["cov"].shape == (10, 9, 9) and "fitted" in cov and cov["gain"][0] == r["gain"]


def test_defect2_cosmetic_mask_from_calibration_applied_at_extraction(tmp_path):
    """With the COSMETICS00 ``defect_mask`` available (a declared ``extract_needs``), its pixels
    leave means, variance and covariances alike; the extraction records that it used it."""
    from astropy.io import fits

    from services.analyzer.family import DEFECT_MASK, Calibration, ExposureFrames
    from services.analyzer.model import FrameMeta
    from shared.geometry import Geometry, quadrant

    geo = Geometry()
    rng = np.random.default_rng(25)
    pattern = np.ones((IMAGE_ROWS, IMAGE_COLS), np.float32)
    pattern[:, 300:310] = 0.5  # a dead band the mask knows
    frames = []
    for _ in range(2):
        full = np.zeros(geo.shape, np.float32)
        quadrant(full, "E", geo)[...] = _quad(rng, 2e4, pattern=pattern)
        frames.append(full)
    mask = np.zeros(geo.shape, np.uint8)
    quadrant(mask, "E", geo)[:IMAGE_ROWS, PRESCAN_COLS + 300 : PRESCAN_COLS + 310] = 1
    path = tmp_path / "cosmetics_masks_CCD1.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(mask, name="MASK")]).writeto(path)
    calib = Calibrations([Calibration(name=DEFECT_MASK, block="SIM", test="COSMETICS00", files={"CCD1": str(path)})])
    exps = [ExposureFrames(obsid=k + 1, block="SIM", test="PTC01", loader=lambda m, f=f: f,
                           frames={"CCD1": FrameMeta(obsid=k + 1, ccd=1, path=f"/nonexistent/{k}.fits", exptime=1.0)})
            for k, f in enumerate(frames)]
    ex = FAMILY.extract_pair(exps[0], exps[1], calib, PTCParams(max_lag=1))
    m = ex.pairs["CCD1"]["E"]
    assert ex.calibrations == [DEFECT_MASK] and ex.defect_masked
    assert m.n_defect == (IMAGE_ROWS - 10) * 10
    assert m.mu1 == pytest.approx(2e4, rel=2e-4) and m.mu2 == pytest.approx(2e4, rel=2e-4)  # the dead band is out
    plain = FAMILY.extract_pair(exps[0], exps[1], Calibrations(), PTCParams(max_lag=1)).pairs["CCD1"]["E"]
    assert plain.n_defect == 0 and plain.mu1 < 0.999 * 2e4  # without the mask the band lowers the mean
