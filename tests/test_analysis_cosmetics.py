"""COSMETICS00 on simulated full-size frames (a bias and a 50 % flat with dead columns): the
flat mask finds every injected dead column, the merged mask, counts and products; the DARK01
defect mask of the block is merged when present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from services.analyzer.analysis.cosmetics import FLAT_HIGH, FLAT_LOW, flat_defects
from services.analyzer.analysis.dark import DEFECT_COLUMN, DEFECT_HOT
from services.analyzer.products import ProductWriter, write_json
from services.analyzer.model import ImageProduct
from services.cli import main as vison
from shared.geometry import QUADRANTS, Geometry, quadrant


@pytest.fixture(scope="module")
def cosmetics_data(tmp_path_factory) -> tuple[Path, dict]:
    """1 bias + 1 flat of 28 s at 800 nm (~50 % of full scale), 6 bad columns per CCD."""
    data = tmp_path_factory.mktemp("cosmetics") / "data"
    assert vison(["sim", "--out", str(data), "--block", "BORN", "--seed", "31", "--test", "COSMETICS00", "--frames", "1,1",
                  "--exptime", "0,28", "--wave", "4", "--bad-columns", "6"]) == 0
    return data, json.loads((data / "truth.json").read_text())


@pytest.mark.fullsize
def test_cosmetics_finds_dead_columns_and_merges_dark01_mask(cosmetics_data, tmp_path):
    data, truth = cosmetics_data
    out = tmp_path / "products"
    # a DARK01 defect mask of the block with one hot pixel in CCD1 E
    dark_mask = np.zeros(Geometry().shape, dtype=np.uint8)
    quadrant(dark_mask, "E")[100, 200] = DEFECT_HOT
    writer = ProductWriter(out / "BORN" / "DARK01", {"block": "BORN", "test": "DARK01"}, root=out)
    writer.add(ImageProduct("master_dark_CCD1", {"MASK": dark_mask}, ccd="CCD1"))
    write_json(out / "BORN" / "DARK01" / "results.json", {"status": "completed", "results": {}})

    assert vison(["analyze", "COSMETICS00", "--data", str(data), "--out", str(out), "--expected", "2"]) == 0
    folder = out / "BORN" / "COSMETICS00"
    doc = json.loads((folder / "results.json").read_text())
    assert doc["status"] == "completed"
    for ccd, ct in truth["ccds"].items():
        with fits.open(folder / f"cosmetics_masks_{ccd}.fits") as hdul:
            assert [h.name for h in hdul] == ["PRIMARY", "MASK", "DARK_MASK", "FLAT_MASK", "FLAT_NORM", "MBIAS", "INPUTS"]
            merged = hdul["MASK"].data
        for q in QUADRANTS:
            v = doc["results"][ccd][q]
            assert v["n_bias"] == 1 and v["n_flats"] == 1
            assert 25000 < v["flat_level_adu"] < 42000
            dead = [b for b in ct["bad_columns"] if b["quadrant"] == q and b["kind"] == "dead"]
            expect = sorted({b["col"] for b in dead if b["response"] < 0.45 and b["row_start"] < 1800})
            assert set(expect) <= set(v["bad_columns"]), (ccd, q, expect, v["bad_columns"])
            assert v["n_bad_columns"] == len(v["bad_columns"])
            qm = quadrant(merged, q)
            for c in expect:
                assert np.all(qm[:2066, c] & DEFECT_COLUMN)
            assert v["n_defects"] == int(np.count_nonzero(qm)) >= 2066 * len(expect)
            assert v["n_flat_high"] == 0
            assert v["dark01_mask_merged"] == (ccd == "CCD1")
    assert doc["results"]["CCD1"]["E"]["n_dark_defects"] >= 1
    assert doc["results"]["CCD1"]["E"]["n_hot"] >= 1
    with fits.open(folder / "cosmetics_masks_CCD1.fits") as hdul:
        assert quadrant(hdul["MASK"].data, "E")[100, 200] & DEFECT_HOT
    with fits.open(folder / "cosmetics_bad_columns.fits") as hdul:
        assert len(hdul["TABLE"].data) == sum(v["n_bad_columns"] for qs in doc["results"].values() for v in qs.values())
    assert any(c["kind"] == "dark_mask" for c in doc["provenance"]["calibrations"])


def test_flat_defects_limits():
    rng = np.random.default_rng(7)
    img = (30000 * (1 + 0.01 * rng.standard_normal((500, 400)))).astype(np.float32)
    img[:, 100] *= 0.3  # dead column
    img[5, 5] = 0.0  # no response
    img[50, 50] *= 1.7  # too responsive
    img[60, 60] *= 1.3  # within [0.5, 1.5]
    bits, ratio = flat_defects(img, 0.5, 1.5, degree=3, nbins=(16, 16))
    assert np.all(bits[:, 100] & FLAT_LOW) and bits[5, 5] & FLAT_LOW
    assert bits[50, 50] & FLAT_HIGH and not bits[60, 60]
    assert abs(float(np.median(ratio)) - 1) < 0.01
    assert int(np.count_nonzero(bits)) == 500 + 2
