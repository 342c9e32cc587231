"""The flat-family analyses through the analyzer's real path (``vison analyze``: exposure-log
selection, plug-in, products writer) on full-size simulated data with known truth. The
accuracy of the methods at nominal data volumes is in bench/accuracy.py and the
tests/test_analysis_{ptc,flat,nl,bf}.py unit tests; here a reduced data set checks that the
wiring delivers the right numbers into results.json and writes the products."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.cli import main as vison
from shared.geometry import CCDS, QUADRANTS

pytestmark = pytest.mark.fullsize


def _truth(data: Path) -> dict:
    return json.loads((data / "truth.json").read_text())


def test_ptc01_offline_gain_and_a00_against_truth(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "products"
    # 5 fluences x 2 frames: a reduced PTC01 (the nominal one has 92 frames)
    assert vison(["sim", "--out", str(data), "--block", "BORN", "--seed", "3", "--test", "PTC01", "--frames", "2",
                  "--fluence", "0.05,0.2,0.4,0.6,0.8", "--wave", "4"]) == 0
    assert vison(["analyze", "PTC01", "--data", str(data), "--out", str(out)]) == 3  # incomplete: refused
    said = capsys.readouterr()
    assert "92" in said.err + said.out  # the message names the expected frame count
    assert not (out / "BORN" / "PTC01" / "results.json").exists()
    assert vison(["analyze", "PTC01", "--data", str(data), "--out", str(out), "--partial"]) == 0
    folder = out / "BORN" / "PTC01"
    doc = json.loads((folder / "results.json").read_text())
    assert doc["n_frames"] == 10 and "MISSDATA" in doc["flag_names"]
    truth = _truth(data)
    for ccd in CCDS:
        for q in QUADRANTS:
            r, t = doc["results"][ccd][q], truth["ccds"][ccd]["quadrants"][q]
            assert r["gain"] == pytest.approx(t["gain_e_per_adu"], rel=0.005), (ccd, q)
            assert r["a00"] == pytest.approx(t["bf"]["a00"], rel=0.10), (ccd, q)
            assert r["bloom_is_lower_limit"] and r["bloom_adu"] >= 0.75 * 65536 * 0.9
            assert r["gain_err"] < 0.01 * r["gain"]
    for name in ("ptc_CCD1.png", "ptc_CCD2.png", "ptc_CCD3.png", "ptc_pairs.fits", "ptc_covariances.fits"):
        assert (folder / name).stat().st_size > 0, name


def test_flat01_offline_prnu_against_truth(tmp_path):
    data, out = tmp_path / "data", tmp_path / "products"
    assert vison(["sim", "--out", str(data), "--block", "BORN", "--seed", "5", "--test", "FLAT01", "--frames", "3",
                  "--fluence", "0.5", "--wave", "4", "--prnu", "1.0"]) == 0
    assert vison(["analyze", "FLAT01", "--data", str(data), "--out", str(out), "--partial", "--no-figures"]) == 0
    doc = json.loads((out / "BORN" / "FLAT01" / "results.json").read_text())
    truth = _truth(data)
    for ccd in CCDS:
        for q in QUADRANTS:
            injected = truth["ccds"][ccd]["quadrants"][q]["prnu_pct"]
            measured = doc["results"][ccd][q]["prnu_pct"]
            assert measured == pytest.approx(injected, rel=0.05), (ccd, q, measured, injected)
            assert doc["results"][ccd][q]["prnu_raw_pct"] > measured  # shot noise not yet removed
    assert (out / "BORN" / "FLAT01" / "master_flat_CCD1.fits").stat().st_size > 0
