"""BIAS01 family (engine v2) on simulated full-size frames with known truth (2 exposures x 3 CCDs):
offsets within 0.05 ADU, RON within 2 % (digitised std, quantisation included; also from frame
differences), RON in e- with a PTC01 gain from the calibrations, master bias products and what the
family provides; extractions round-trip exactly and the solve needs only them (+ frame paths)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from services.analyzer import extractions as store
from services.analyzer.families.bias import FAMILY, BiasExtraction, dnl_spread, prescan_columns
from services.analyzer.family import GAIN, MASTER_BIAS, Calibration, Calibrations, TestRun, exposures_of, run_inprocess
from services.analyzer.model import ListSink
from services.analyzer.selection import select_test
from services.cli import main as vison
from shared.flags import flag_names
from shared.geometry import QUADRANTS

OFFSET_TOL = 0.05  # ADU
RON_TOL = 0.02  # relative


@pytest.fixture(scope="module")
def bias_data(tmp_path_factory) -> tuple[Path, dict]:
    """BIAS01, 2 exposures, block BORN (simulated; per-quadrant offsets and RON in truth.json)."""
    data = tmp_path_factory.mktemp("bias") / "data"
    assert vison(["sim", "--out", str(data), "--block", "BORN", "--seed", "11", "--test", "BIAS01", "--frames", "2"]) == 0
    return data, json.loads((data / "truth.json").read_text())


def _truth(truth: dict, ccd: str, q: str) -> dict:
    return truth["ccds"][ccd]["quadrants"][q]


def assert_same_extraction(a, b) -> None:
    """Two extractions (pydantic models with numpy arrays) hold identical values."""
    da, db = a.model_dump(), b.model_dump()

    def same(x, y, path="") -> None:
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray) and x.dtype == y.dtype and np.array_equal(x, y), path
        elif isinstance(x, dict):
            assert set(x) == set(y), path
            for k in x:
                same(x[k], y[k], f"{path}.{k}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), path
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{path}[{i}]")
        elif isinstance(x, float) and np.isnan(x):
            assert np.isnan(y), path
        else:
            assert x == y, (path, x, y)

    same(da, db)


def test_dnl_diagnostic_sees_quantisation_structure():
    """Column stds of low-noise digitised data depend on the column mean (the DNL signature):
    the spread ratio is ~1 for noise >> 1 ADU and large for 0.3 ADU noise."""
    rng = np.random.default_rng(3)
    quad_shape = (2086, 2119)
    col_offsets = 1000 + rng.uniform(0, 1, quad_shape[1])
    for sigma, lo, hi in ((1.4, 0.6, 1.6), (0.3, 5.0, np.inf)):
        quad = np.rint(col_offsets[None, :] + sigma * rng.standard_normal(quad_shape)).astype(np.float32)
        mean, std = prescan_columns(quad)
        assert mean.shape == (51,) and std.shape == (51,)
        _, ratio = dnl_spread(std, 2066)
        assert lo < ratio < hi, (sigma, ratio)


def test_family_declaration():
    assert FAMILY.tests == ("BIAS01", "BIAS02") and FAMILY.unit == "exposure"
    assert [(n.name, n.mode, n.sources) for n in FAMILY.needs] == [(GAIN, "rerun", ("PTC01",))]
    assert FAMILY.provides == (MASTER_BIAS,) and FAMILY.extraction is BiasExtraction
    assert all(f.description for f in FAMILY.result.model_fields.values())


@pytest.mark.fullsize
def test_bias_family_truth_products_roundtrip_and_gain(bias_data, tmp_path):
    data, truth = bias_data
    frames = select_test(data, "BIAS01").frames
    run = TestRun.of("BIAS01", "BORN", frames)
    exposures = exposures_of(frames, "BORN")
    params = FAMILY.parameters({})
    calib = Calibrations([Calibration(name=GAIN, block="BORN", test="PTC01", values={"gain": {
        c: {q: truth["ccds"][c]["quadrants"][q]["gain_e_per_adu"] for q in QUADRANTS} for c in truth["ccds"]}})])

    # extract: per exposure, only that exposure's frames; stored and loaded back exactly
    loaded = []
    for exp in exposures:
        ex = FAMILY.run_extraction([exp], Calibrations(), params)
        exp.release()
        assert ex.obsids == [exp.obsid] and ex.unit == f"e{exp.obsid}" and ex.ccds == ["CCD1", "CCD2", "CCD3"]
        path = store.save(tmp_path / f"{ex.unit}.npz", ex)
        back = store.load(path, BiasExtraction)
        assert_same_extraction(ex, back)
        assert store.loads(store.dumps(ex), BiasExtraction).per_ccd["CCD2"].quadrants["F"].ron_img_adu == \
            ex.per_ccd["CCD2"].quadrants["F"].ron_img_adu
        loaded.append(back)

    # solve: from the loaded extractions and the frame paths only (no exposures given)
    sink = ListSink()
    out = run_inprocess(FAMILY, [], run, calib=calib, params=params, sink=sink, extractions=loaded)
    for ccd in ("CCD1", "CCD2", "CCD3"):
        for q in QUADRANTS:
            v, t = out.results[ccd][q], _truth(truth, ccd, q)
            for key in ("offset_pre", "offset_img", "offset_ove", "offset_ref"):
                assert abs(v[key] - t["offset_adu"]) < OFFSET_TOL, (ccd, q, key, v[key], t["offset_adu"])
            for key in ("ron_pre_adu", "ron_img_adu", "ron_ove_adu", "ron_diff_adu"):
                assert abs(v[key] / t["ron_adu"] - 1) < RON_TOL, (ccd, q, key, v[key], t["ron_adu"])
            # the RON is the digitised std: the analogue noise alone (quantisation removed) is farther
            assert abs(v["ron_img_adu"] - t["ron_adu"]) < abs(v["ron_img_adu"] - t["ron_analog_adu"])
            # master bias: offset-subtracted, flat, the noise of a 2-frame median; no DNL excess
            assert abs(v["mb_img_mean"]) < OFFSET_TOL and 0.5 * t["ron_adu"] < v["mb_img_std"] < 1.2 * t["ron_adu"]
            assert 0.5 < v["dnl_spread_ratio"] < 2.0 and v["n_frames"] == 2
            # electrons from the PTC01 gain calibration
            g = t["gain_e_per_adu"]
            assert v["gain"] == pytest.approx(g)
            for key in ("pre", "img", "ove", "diff"):
                assert v[f"ron_{key}_e"] == pytest.approx(v[f"ron_{key}_adu"] * g)
            assert out.provides[MASTER_BIAS]["values"][ccd][q]["offset_img"] == v["offset_img"]
    ron_ool = any(not 0.86 <= v["ron_img_adu"] <= 1.44 for quads in out.results.values() for v in quads.values())
    assert ("RON_OOL" in flag_names(out.flags)) == ron_ool
    assert len(out.frames) == 2 * 3 * 4 and {r["obsid"] for r in out.frames} == {1, 2}
    assert out.provides[MASTER_BIAS]["files"] == {c: f"master_bias_{c}.fits" for c in ("CCD1", "CCD2", "CCD3")}
    assert out.parameters["degree"] == 5
    names = set(sink.names())
    for ccd in ("CCD1", "CCD2", "CCD3"):
        assert {f"master_bias_{ccd}", f"bias_profiles_{ccd}", f"bias_dnl_{ccd}"} <= names
    assert {"bias_frames", "bias_summary", "bias_offsets", "bias_ron", "master_bias", "bias_profiles", "bias_dnl"} <= names
    mb = sink.get("master_bias_CCD2")
    assert list(mb.extensions) == ["STACK", "STD", "MASK"]
    stack = mb.extensions["STACK"]
    assert stack.shape == (4172, 4238) and stack.dtype == np.float32 and abs(float(np.median(stack))) < 0.5
    assert float(np.median(mb.extensions["STD"])) > 0.5 and mb.extensions["MASK"].dtype == np.uint8
    assert len(sink.get("bias_frames").columns["quadrant"]) == 24

    # without the gain: no electrons (a re-solve fills them when PTC01 arrives)
    from services.analyzer.families.bias import _with_electrons

    v2 = _with_electrons({k: val for k, val in out.results["CCD1"]["E"].items() if not k.endswith("_e") and k != "gain"}, None)
    assert v2.gain is None and v2.ron_img_e is None and v2.ron_diff_e is None


def test_ron_with_bias_structure_image_model_and_frame_difference():
    """Frames with bias structure (a 12 ADU smooth gradient, a static fixed pattern of 0.5 ADU rms,
    digitised): the image RON after the smooth model is the noise of one frame (fixed pattern
    included: sqrt(1.3^2 + 0.5^2 + 1/12)), the frame-difference RON excludes the fixed pattern
    (sqrt(1.3^2 + 1/12)); both within 2 %. Without the smooth model the gradient makes the clipped
    image std 5.97 ADU instead of 1.42 (measured)."""
    from services.analyzer.families.bias import BiasParams, image_ron, pair_difference_ron
    from services.analyzer.science.stats import fast_clipped_stats
    from shared.geometry import standard_region

    rng = np.random.default_rng(17)
    shape = (2086, 2119)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] / 2000.0
    structure = 1000.0 + 12.0 * (yy**2 - 0.5 * xx + xx * yy) + 0.5 * rng.standard_normal(shape)
    frames = [np.rint(structure + 1.3 * rng.standard_normal(shape)).astype(np.float32) for _ in range(2)]
    one = np.sqrt(1.3**2 + 0.5**2 + 1 / 12)
    read = np.sqrt(1.3**2 + 1 / 12)
    p = BiasParams()
    off, ron = image_ron(frames[0], p)
    assert abs(ron / one - 1) < RON_TOL, (ron, one)
    assert abs(off - float(np.mean(standard_region(structure, "img")))) < OFFSET_TOL
    a, b = (standard_region(f, "img") for f in frames)
    diff_ron = pair_difference_ron(a, b + 3.0)  # a different offset does not matter
    assert abs(diff_ron / read - 1) < RON_TOL, (diff_ron, read)
    assert fast_clipped_stats(a, 4.0).std_corrected > 4 * one  # the model matters


def test_fast_numerics_equal_the_reference_ones():
    """The speed-ups the families use give the reference results: the sorting-network median of a
    stack equals ``np.median`` (1-21 frames, float32), ``fast_clipped_stats`` equals
    ``clipped_stats`` on a digitised image with outliers, ``fit_poly_2d`` equals the ``poly`` model
    of ``fit_smooth_2d`` (step 1) to float32 rounding."""
    from services.analyzer.science.smooth import fit_poly_2d, fit_smooth_2d
    from services.analyzer.science.stacking import median_axis0
    from services.analyzer.science.stats import clipped_stats, fast_clipped_stats

    rng = np.random.default_rng(23)
    for n in range(1, 22):
        block = rng.normal(size=(n, 9, 11)).astype(np.float32)
        assert np.array_equal(median_axis0(block), np.median(block, axis=0)), n
    img = np.rint(1000 + 1.3 * rng.standard_normal((600, 700))).astype(np.float32)
    img[rng.integers(0, 600, 300), rng.integers(0, 700, 300)] = 5000.0
    view = img[::-1, ::-1]  # a canonical-orientation view (negative strides)
    a, b = clipped_stats(view, 4.0, subsample=17), fast_clipped_stats(view, 4.0, subsample=17)
    assert (a.n, a.lo, a.hi, a.median) == (b.n, b.lo, b.hi, b.median)
    assert b.mean == pytest.approx(a.mean, abs=1e-9) and b.std_corrected == pytest.approx(a.std_corrected, rel=1e-9)
    yy, xx = np.mgrid[0:600, 0:700]
    smooth = (img + 0.01 * yy - 0.002 * xx).astype(np.float32)
    ref, fast = fit_smooth_2d(smooth).model, fit_poly_2d(smooth).model
    assert np.max(np.abs(ref - fast)) < 1e-3
