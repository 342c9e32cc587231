"""COSMETICS00 family (engine v2): the flat mask finds every injected dead column, the merged mask,
counts and products; the DARK01 defect mask (``dark_mask`` calibration) is merged where present.
The full-size run (a bias and a 50 % flat with dead columns) is chained after DARK01 in
tests/test_analysis_dark.py (its dark mask is the calibration); :func:`check_cosmetics` holds
the truth assertions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from services.analyzer.families.cosmetics import FAMILY, FLAT_HIGH, FLAT_LOW, flat_defects
from services.analyzer.family import DARK_MASK, DEFECT_MASK
from services.analyzer.science.defects import DEFECT_COLUMN
from services.cli import main as vison
from shared.geometry import CCDS, QUADRANTS, quadrant


@pytest.fixture(scope="module")
def cosmetics_data(tmp_path_factory) -> tuple[Path, dict]:
    """1 bias + 1 flat of 28 s at 800 nm (~50 % of full scale), 6 bad columns per CCD."""
    data = tmp_path_factory.mktemp("cosmetics") / "data"
    assert vison(["sim", "--out", str(data), "--block", "BORN", "--seed", "31", "--test", "COSMETICS00", "--frames", "1,1",
                  "--exptime", "0,28", "--wave", "4", "--bad-columns", "6"]) == 0
    return data, json.loads((data / "truth.json").read_text())


def check_cosmetics(out, sink, truth: dict, merged_ccds: set[str]) -> None:
    """Truth assertions of a COSMETICS00 solve (``merged_ccds``: CCDs given a DARK01 mask)."""
    for ccd, ct in truth["ccds"].items():
        prod = sink.get(f"cosmetics_masks_{ccd}")
        assert list(prod.extensions) == ["MASK", "DARK_MASK", "FLAT_MASK", "FLAT_NORM", "MBIAS"]
        merged = prod.extensions["MASK"]
        for q in QUADRANTS:
            v = out.results[ccd][q]
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
            assert v["dark01_mask_merged"] == (ccd in merged_ccds)
    table = sink.get("cosmetics_bad_columns").columns
    assert len(table["col"]) == sum(v["n_bad_columns"] for qs in out.results.values() for v in qs.values())
    assert out.provides[DEFECT_MASK]["files"] == {c: f"cosmetics_masks_{c}.fits" for c in CCDS}


def test_family_declaration():
    assert FAMILY.tests == ("COSMETICS00",)
    assert [(n.name, n.mode, n.sources) for n in FAMILY.needs] == [(DARK_MASK, "wait", ("DARK01",))]
    assert FAMILY.provides == (DEFECT_MASK,) and all(f.description for f in FAMILY.result.model_fields.values())


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
