"""A pair family through the offline engine (``vison analyze``: exposure-log selection, the
extraction units on a process pool, the solve, the products writer) on full-size simulated
data with known truth: the refusal of an incomplete set (exit 3, naming the expected count),
``--partial`` (MISSDATA), the numbers in results.json and the products; a second run re-uses
the stored extractions. The accuracy of the families is in tests/test_family_*.py."""

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
    assert vison(["analyze", "PTC01", "--data", str(data), "--out", str(out), "--partial", "--workers", "2"]) == 0
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
    first = json.loads((folder / "results.json").read_text())["results"]
    assert vison(["analyze", "PTC01", "--data", str(data), "--out", str(out), "--partial", "--workers", "0"]) == 0
    assert "re-used" in capsys.readouterr().out or not list((folder / "_extractions").glob("*/*.npz"))
    assert json.loads((folder / "results.json").read_text())["results"] == first
