"""DARK01 analysis on simulated full-size darks with known dark current, hot pixels and hot
columns: dark current within 5 % (ADU/s and e-/s with a PTC gain), every injected hot pixel and
hot column found, the defect-mask rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from services.analyzer.analysis.dark import (
    DEFECT_COLD,
    DEFECT_COLUMN,
    DEFECT_HOT,
    bias_structure,
    defect_mask,
)
from services.analyzer.products import write_json
from services.cli import main as vison
from shared.geometry import PRESCAN_COLS, QUADRANTS, quadrant

DARK_TOL = 0.05  # relative


@pytest.fixture(scope="module")
def dark_data(tmp_path_factory) -> tuple[Path, dict]:
    """DARK01, 2 exposures of 2000 s (longer than the nominal 565 s: the simulated dark current
    of 0.001-0.003 e-/s then gives ~1 ADU), 30 hot pixels and 4 bad columns per CCD."""
    data = tmp_path_factory.mktemp("dark") / "data"
    assert vison(["sim", "--out", str(data), "--block", "BORN", "--seed", "21", "--test", "DARK01", "--frames", "2",
                  "--exptime", "2000", "--hot-pixels", "30", "--bad-columns", "4"]) == 0
    return data, json.loads((data / "truth.json").read_text())


@pytest.mark.fullsize
def test_dark_current_hot_pixels_and_columns(dark_data, tmp_path):
    data, truth = dark_data
    out = tmp_path / "products"
    # a PTC01 result of the block gives the gains (e-/s); a BIAS01 result the bias structure
    gains = {c: {q: truth["ccds"][c]["quadrants"][q]["gain_e_per_adu"] for q in QUADRANTS} for c in truth["ccds"]}
    write_json(out / "BORN" / "PTC01" / "results.json",
               {"status": "completed", "results": {c: {q: {"gain": g} for q, g in qs.items()} for c, qs in gains.items()}})
    write_json(out / "BORN" / "BIAS01" / "results.json",
               {"status": "completed", "results": {c: {q: {"offset_img": 1000.0, "offset_ref": 1000.0} for q in QUADRANTS}
                                                   for c in truth["ccds"]}})
    assert vison(["analyze", "DARK01", "--data", str(data), "--out", str(out), "--expected", "2"]) == 0
    folder = out / "BORN" / "DARK01"
    doc = json.loads((folder / "results.json").read_text())
    assert doc["status"] == "completed"
    assert {c["kind"] for c in doc["provenance"]["calibrations"]} == {"bias", "gain"}
    for ccd, ct in truth["ccds"].items():
        with fits.open(folder / f"master_dark_{ccd}.fits") as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "STACK", "ERR", "MASK", "INPUTS"]
            assert hdul["STACK"].header["EXPTIME"] == 2000.0
            mask = hdul["MASK"].data
        for q in QUADRANTS:
            v, t = doc["results"][ccd][q], ct["quadrants"][q]
            assert abs(v["dark_current_adu_s"] * t["gain_e_per_adu"] / t["dark_e_per_s"] - 1) < DARK_TOL, (ccd, q, v)
            assert abs(v["dark_current_e_s"] / t["dark_e_per_s"] - 1) < DARK_TOL, (ccd, q)
            assert v["gain"] == pytest.approx(t["gain_e_per_adu"]) and v["bias_structure_adu"] == 0.0
            qmask = quadrant(mask, q)
            hot_cols = sorted(b["col"] for b in ct["bad_columns"] if b["quadrant"] == q and b["kind"] == "hot")
            assert v["bad_columns"] == hot_cols, (ccd, q)  # dead columns do not show in darks
            for c in hot_cols:
                assert np.all(qmask[:2066, c] & DEFECT_COLUMN)
            hot = {(h["row"], h["col"]) for h in ct["hot_pixels"] if h["quadrant"] == q}
            for r, c in hot:
                assert qmask[r, c] & (DEFECT_HOT | DEFECT_COLUMN), (ccd, q, r, c)
            isolated = {(r, c) for r, c in hot if c not in hot_cols}
            assert v["n_hot"] == len(isolated), (ccd, q)
            assert v["n_cold"] == 0
            assert int(np.count_nonzero(qmask)) == v["n_masked"]
    assert (folder / "master_dark.png").is_file() and (folder / "dark_frames.fits").is_file()
    with fits.open(folder / "dark_defects_CCD1.fits") as hdul:
        table = hdul["TABLE"].data
        assert len(table) >= sum(1 for h in truth["ccds"]["CCD1"]["hot_pixels"])
        assert np.all(table["level_adu"][table["bits"] & DEFECT_HOT > 0] > 50)


def test_defect_mask_thresholds_and_whole_column_rule():
    rng = np.random.default_rng(5)
    img = (20.0 + rng.standard_normal((600, 400))).astype(np.float32)
    img[10, 10] = 80.0  # hot (> 50 above background)
    img[20, 20] = 60.0  # 40 above background: not hot
    img[30, 30] = -1500.0  # cold (< -1000)
    img[100:300, 50] += 100.0  # 200 bad pixels: whole column
    img[100:299, 60] += 100.0  # 199 bad pixels: pixels only
    dm = defect_mask(img, lo=-1000, hi=50, min_bad=200, degree=3, nbins=(16, 16))
    assert dm.bits[10, 10] & DEFECT_HOT and not dm.bits[20, 20]
    assert dm.bits[30, 30] & DEFECT_COLD
    assert dm.bad_columns == [50 + PRESCAN_COLS]
    assert np.all(dm.bits[:, 50] & DEFECT_COLUMN) and not np.any(dm.bits[:, 60] & DEFECT_COLUMN)
    assert dm.n_hot == 1 + 200 + 199 and dm.n_cold == 1
    assert dm.n_hot_isolated == 1 + 199
    assert dm.n_masked == 600 + 1 + 1 + 199


def test_bias_structure_from_bias_results():
    calib = {"bias": {"CCD1": {"E": {"offset_img": 2001.25, "offset_ref": 2001.0}}}}
    assert bias_structure(calib, "CCD1", "E") == pytest.approx(0.25)
    assert bias_structure(calib, "CCD1", "F") is None and bias_structure({}, "CCD2", "E") is None
