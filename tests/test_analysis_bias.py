"""BIAS01 analysis on simulated full-size frames with known truth (2 exposures x 3 CCDs):
offsets within 0.05 ADU, RON within 2 % (digitised std, quantisation included), products with
provenance, and the offline command's exit codes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from services.analyzer.analysis.bias import dnl_spread, prescan_columns
from services.cli import main as vison
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


@pytest.mark.fullsize
def test_offline_bias_products_results_and_provenance(bias_data, tmp_path, capsys):
    data, truth = bias_data
    out = tmp_path / "products"
    assert vison(["analyze", "BIAS01", "--data", str(data), "--out", str(out), "--expected", "2"]) == 0
    printed = capsys.readouterr().out
    assert "BIAS01  block BORN  2 exposure(s)" in printed and "RON_img" in printed
    folder = out / "BORN" / "BIAS01"
    doc = json.loads((folder / "results.json").read_text())
    assert doc["status"] == "completed" and doc["block"] == "BORN" and doc["test"] == "BIAS01"
    assert doc["n_frames"] == 2 and doc["obsids"] == [1, 2]
    for ccd in ("CCD1", "CCD2", "CCD3"):
        for q in QUADRANTS:
            v, t = doc["results"][ccd][q], _truth(truth, ccd, q)
            for key in ("offset_pre", "offset_img", "offset_ove", "offset_ref"):
                assert abs(v[key] - t["offset_adu"]) < OFFSET_TOL, (ccd, q, key, v[key], t["offset_adu"])
            for key in ("ron_pre_adu", "ron_img_adu", "ron_ove_adu"):
                assert abs(v[key] / t["ron_adu"] - 1) < RON_TOL, (ccd, q, key, v[key], t["ron_adu"])
            # the RON is the digitised std: the analogue noise alone (quantisation removed) is farther
            assert abs(v["ron_img_adu"] - t["ron_adu"]) < abs(v["ron_img_adu"] - t["ron_analog_adu"])
            # master bias: offset-subtracted, flat, the noise of a 2-frame median; no DNL excess
            assert abs(v["mb_img_mean"]) < OFFSET_TOL and 0.5 * t["ron_adu"] < v["mb_img_std"] < 1.2 * t["ron_adu"]
            assert 0.5 < v["dnl_spread_ratio"] < 2.0 and v["n_frames"] == 2
    ron_ool = any(not 0.86 <= v["ron_img_adu"] <= 1.44 for quads in doc["results"].values() for v in quads.values())
    assert ("RON_OOL" in doc["flag_names"]) == ron_ool
    assert len(doc["frames"]) == 2 * 3 * 4
    # provenance: inputs with checksums, software, parameters
    prov = doc["provenance"]
    files = sorted(data.rglob("EUC_*.fits"))
    sums = {i["file"]: i["sha256"] for i in prov["inputs"]}
    assert len(sums) == 6
    for f in files:
        assert sums[f.name] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert prov["software"]["version"] and prov["parameters"]["degree"] == 5 and prov["obsids"] == [1, 2]
    # products: FITS with provenance headers and the INPUTS table, tables, figures
    names = {Path(p).name for p in doc["products"]}
    for ccd in ("CCD1", "CCD2", "CCD3"):
        assert {f"master_bias_{ccd}.fits", f"bias_profiles_{ccd}.fits", f"bias_dnl_{ccd}.fits"} <= names
    assert {"bias_frames.fits", "bias_summary.fits", "bias_offsets.png", "bias_ron.png", "master_bias.png",
            "bias_profiles.png", "bias_dnl.png", "results.json"} <= names
    assert all((out / p).is_file() for p in doc["products"])
    assert not list(folder.glob(".*.tmp"))
    with fits.open(folder / "master_bias_CCD2.fits") as hdul:
        assert [h.name for h in hdul] == ["PRIMARY", "STACK", "STD", "MASK", "INPUTS"]
        h0 = hdul[0].header
        assert (h0["BLOCK"], h0["TEST"], h0["CCD"], h0["NOBSID"], h0["OBSID0"], h0["OBSID1"]) == ("BORN", "BIAS01", "CCD2", 2, 1, 2)
        assert h0["SWVERS"] and h0["DATE"] and h0["PARAM nsigma"] == 4.0
        inputs = hdul["INPUTS"].data
        assert sorted(inputs["CCD"]) == ["CCD2", "CCD2"]
        assert set(inputs["SHA256"]) == {sums[f.name] for f in files if f.name.endswith("CCD2.fits")}
        stack = hdul["STACK"].data
        assert stack.shape == (4172, 4238) and stack.dtype.kind == "f" and stack.dtype.itemsize == 4 and abs(float(np.median(stack))) < 0.5
        assert float(np.median(hdul["STD"].data)) > 0.5 and hdul["MASK"].data.dtype == np.uint8
    with fits.open(folder / "bias_frames.fits") as hdul:
        table = hdul["TABLE"].data
        assert len(table) == 24 and set(table["quadrant"]) == set(QUADRANTS)
    from PIL import Image

    with Image.open(folder / "bias_ron.png") as im:
        meta = json.loads(im.info["Provenance"])
        assert meta["block"] == "BORN" and meta["test"] == "BIAS01" and meta["n_inputs"] == 6


@pytest.mark.fullsize
def test_offline_incomplete_data_exit_code_and_partial(bias_data, tmp_path, capsys):
    data, _ = bias_data
    out = tmp_path / "products"
    # nominal BIAS01 expects 10 exposures: refused, nothing written
    assert vison(["analyze", "BIAS01", "--data", str(data), "--out", str(out)]) == 3
    err = capsys.readouterr().err
    assert "incomplete: 2 complete exposure(s) of BIAS01, the test definition expects 10" in err and "--partial" in err
    assert not out.exists() or not any(out.rglob("results.json"))
    # a folder where one CCD file of ObsID 2 is missing: refused, then analysed with --partial
    part = tmp_path / "part"
    shutil.copytree(data, part, ignore=shutil.ignore_patterns("EUC_2_*CCD*.fits", "EUC_1_*CCD3.fits"))
    shutil.copy(next(data.rglob("EUC_2_*CCD1.fits")), next(part.rglob("EXP_LOG_*.txt")).parent)
    assert vison(["analyze", "BIAS01", "--data", str(part), "--out", str(out), "--expected", "2"]) == 3
    err = capsys.readouterr().err
    assert "FITS file(s) listed in the exposure log are missing" in err and "without all 3 CCDs" in err
    assert vison(["analyze", "BIAS01", "--data", str(part), "--out", str(out), "--expected", "2", "--partial",
                  "--no-figures"]) == 3  # no exposure has all 3 CCDs: nothing to analyse
    shutil.copy(next(data.rglob("EUC_1_*CCD3.fits")), next(part.rglob("EXP_LOG_*.txt")).parent)
    assert vison(["analyze", "BIAS01", "--data", str(part), "--out", str(out), "--expected", "2", "--partial",
                  "--no-figures"]) == 0
    doc = json.loads((out / "BORN" / "BIAS01" / "results.json").read_text())
    assert doc["obsids"] == [1] and "MISSDATA" in doc["flag_names"] and doc["expected_frames"] == 2
    assert not list((out / "BORN" / "BIAS01").glob("*.png"))


def test_offline_usage_errors(tmp_path, capsys):
    assert vison(["analyze", "NOSUCHTEST01", "--data", str(tmp_path)]) == 2
    assert "no analysis for test 'NOSUCHTEST01'" in capsys.readouterr().err
    assert vison(["analyze", "BIAS01", "--data", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert vison(["analyze", "BIAS01", "--data", str(tmp_path)]) == 3
    assert "no exposure log" in capsys.readouterr().err
