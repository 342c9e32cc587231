"""FLAT01/02 (engine v2 family ``services.analyzer.families.flat``): normalisation, master flats,
PRNU (target: within 5 % relative of the injected value), photo-response defect mask. Full-size
flats from ``services.sim.physics`` written as FITS files (the solve stacks from the files)."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pytest

from services.analyzer import extractions as store
from services.analyzer.family import Calibration, Calibrations, TestRun, exposures_of
from services.analyzer.families import flat
from services.analyzer.model import FrameMeta, ListSink
from services.analyzer.science.stacking import median_error_factor
from shared.fitsio import write_frame
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, Geometry, assemble, quadrant

T_FWC = 4.0
_IMG = slice(PRESCAN_COLS, PRESCAN_COLS + IMAGE_COLS)


def test_median_error_factor():
    assert median_error_factor(1) == 1.0 and median_error_factor(2) == 1.0
    assert median_error_factor(3) == pytest.approx(np.sqrt(1.3484), rel=0.01)
    assert median_error_factor(80) == pytest.approx(np.sqrt(np.pi / 2), rel=0.03)


def test_defect_mask_bits_and_bad_columns():
    rng = np.random.default_rng(1)
    master = (1.0 + 0.01 * rng.standard_normal((400, 300))).astype(np.float32)
    master *= np.linspace(0.95, 1.05, 300)[None, :].astype(np.float32)  # smooth gradient is not a defect
    master[10, 10] = 0.3
    master[20, 20] = 1.8
    master[30, 30] = 1.10  # 10 sigma: n-sigma rule only
    master[100:, 150] *= 0.7  # a weak column, 300 pixels
    mask, counts = flat.defect_mask(master, flat.FlatParams(defect_nbins=(16, 16)))
    assert mask[10, 10] & flat.MASK_LOW and mask[20, 20] & flat.MASK_HIGH
    assert mask[30, 30] == flat.MASK_NSIGMA
    assert counts["n_defects_low"] == 1 and counts["n_defects_high"] == 1
    assert counts["n_bad_columns"] == 1
    assert 302 <= counts["n_defects"] <= 306


def test_flat_columns_grouping():
    items = [(i, t, w, None) for i, (t, w) in enumerate([(1.0, 4), (3.0, 4), (1.0, 4), (1.0, 1), (3.0, 4)])]
    assert flat.flat_columns(items) == [[0, 2], [1, 4], [3]]
    items = [(i, t, w, str(i % 2)) for i, (_, t, w, _) in enumerate(items)]
    assert flat.flat_columns(items) == [[0, 2, 4], [1, 3]]


def write_flats(tmp_path, model, ccd: str, plan, quads=("E", "F"), start=1, test="FLAT01", ripple=None):
    """FITS frames of one CCD: ``plan`` = [(fluence fraction, n frames)], quadrants ``quads``
    simulated as flats (x ``ripple(cols)`` in the image area when given), the others as biases."""
    from services.sim.physics import FULL_SCALE_ADU, REFERENCE_GAIN, Exposure

    geo = Geometry()
    flux = FULL_SCALE_ADU * REFERENCE_GAIN / T_FWC
    metas, k = [], start - 1
    t0 = datetime(2026, 12, 1, 12, 0, 0)
    for frac, n in plan:
        for _ in range(n):
            k += 1
            t = frac * T_FWC
            arrs = {}
            for q in ("E", "F", "G", "H"):
                if q not in quads:  # not analysed: a constant offset (cheap)
                    arrs[q] = np.full((geo.quad_rows, geo.quad_cols), 1000.0, np.float32)
                    continue
                e = Exposure(kind="flat", exptime=t, flux_e_per_s=flux)
                arrs[q] = model.simulate_quadrant(ccd, q, e, model.rng("flat", k, q), geo).data
                if ripple is not None and q in quads:
                    off = model.truth[ccd].quadrants[q].offset_adu
                    arrs[q][:IMAGE_ROWS, _IMG] = (arrs[q][:IMAGE_ROWS, _IMG] - off) * ripple + off
            path = tmp_path / f"EUC_{k}_CCD{ccd[-1]}.fits"
            write_frame(path, assemble(arrs), int(ccd[-1]))
            metas.append(FrameMeta(obsid=k, ccd=int(ccd[-1]), path=str(path), exptime=t, date=t0 + timedelta(seconds=100 * k),
                                   test=test, values={"wave": 800}))
    return metas


@pytest.mark.fullsize
def test_flat01_prnu_masters_and_defects(tmp_path):
    """Two quadrants of a CCD, three columns (25 % x 2, 75 % x 2, 50 % x 1 frame with the PTC01
    gain as a calibration): PRNU within 5 % of the injected 1.5 %, dead columns in the mask,
    master flat follows the injected pixel response. The solve from stored extractions (+ the
    frame files) gives the same results as the in-process run."""
    from services.sim.physics import DetectorModel, PhysicsConfig

    model = DetectorModel(PhysicsConfig(prnu_pct=1.5, bad_columns=12), seed=21)
    ccd, quads = "CCD1", ["E", "F"]
    metas = write_flats(tmp_path, model, ccd, [(0.25, 2), (0.75, 2), (0.5, 1)], quads)
    truth = model.truth[ccd]
    gains = {ccd: {q: truth.quadrants[q].gain_e_per_adu for q in quads}}
    calib = Calibrations([Calibration(name="gain", block="B", test="PTC01", values={"gain": gains})])
    run = TestRun.of("FLAT01", "B", metas)
    params = {"quadrants": quads}
    sink = ListSink()
    exposures = exposures_of(metas, "B")
    p = flat.FAMILY.parameters(params)
    extr = [flat.FAMILY.run_extraction((e,), calib, p) for e in exposures]
    out = flat.FAMILY.solve(extr, calib, p, run, sink)
    res = out.results[ccd]
    product = sink.get(f"master_flat_{ccd}")
    geo = Geometry()
    for q in quads:
        r = res[q]
        assert r["n_frames"] == 5 and r["n_columns"] == 3
        assert abs(r["prnu_pct"] / 1.5 - 1) < 0.05
        assert r["prnu_raw_pct"] > 1.02 * r["prnu_pct"]  # shot noise inflates the raw value
        assert all(abs(v / 1.5 - 1) < 0.05 for v in r["column_prnu_pct"]), r["column_prnu_pct"]
        tab = sink.get("flat_columns").columns
        methods = [m for m, qq in zip(tab["shot_method"], tab["quadrant"]) if qq == q]
        nfr = [n for n, qq in zip(tab["n_frames"], tab["quadrant"]) if qq == q]
        assert methods == ["gain" if n == 1 else "pairs" for n in nfr]
        assert abs(r["prnu_master_pct"] / 1.5 - 1) < 0.05
        mask = quadrant(product.extensions["MASK"], q, geo)[:IMAGE_ROWS, _IMG]
        dead = [b for b in truth.bad_columns if b.quadrant == q and b.kind == "dead"]
        expected_low = sum(IMAGE_ROWS - b.row_start for b in dead if b.response < 0.5)
        assert r["n_defects_low"] >= expected_low
        for b in dead:
            assert np.mean(mask[b.row_start :, b.col - PRESCAN_COLS] != 0) > 0.99
        assert r["n_bad_columns"] == len(dead)
        assert r["n_defects"] < sum(IMAGE_ROWS - b.row_start for b in dead) + 50
        master = quadrant(product.extensions["FLAT"], q, geo)[:IMAGE_ROWS, _IMG]
        resp = model.response(ccd, q)
        sl = (slice(100, 600), slice(100, 600))
        rel = resp[sl] / np.median(resp[sl])
        good = np.abs(rel - 1) < 0.2
        assert np.corrcoef(master[sl][good], rel[good])[0, 1] > 0.95
        err = quadrant(product.extensions["ERR"], q, geo)[:IMAGE_ROWS, _IMG]
        assert np.median(err[sl]) < 0.5 * 0.015
    # products: raw-frame orientation, 1 outside the analysed image areas
    assert product.extensions["FLAT"].shape == (4172, 4238)
    assert set(product.extensions) >= {"FLAT", "ERR", "MASK", "COL1", "COL1_ERR", "COL2", "COL3"}
    assert np.all(quadrant(product.extensions["FLAT"], "G", geo) == 1.0)
    assert out.provides["flat_mask"]["files"] == {ccd: f"master_flat_{ccd}.fits"}
    # columns 1 and 2 are complete as soon as an exposure of the next column is extracted: solved
    # then (solve_column), re-used by the final solve; column 3 solved from the stored extractions
    # only (+ the frame files): the same numbers
    stored = [store.loads(store.dumps(e), flat.FlatExtraction) for e in extr]
    assert flat.completed_columns(stored[:3]) == [1] and flat.completed_columns(stored) == [1, 2]
    groups = flat.column_groups(stored)
    paths = {m.obsid: m.path for m in metas}
    done = {(ccd, k): flat.solve_column(ccd, k, groups[k - 1], [paths[e.obsids[0]] for e in groups[k - 1]], p, calib) for k in (1, 2)}
    again = flat.FAMILY.solve(stored, calib, p, run, ListSink(), columns_done=done)
    assert again.results == out.results
    # without the gain, the single-frame column has no shot-noise-corrected PRNU; when the gain
    # arrives, the re-solve re-uses the column (no new stack) with the gain's shot noise
    single = flat.solve_column(ccd, 3, groups[2], [paths[e.obsids[0]] for e in groups[2]], p, Calibrations())
    assert single.rows["E"].shot_method == "none" and np.isnan(single.rows["E"].prnu_pct)
    rows = flat.column_rows(ccd, 3, groups[2], single.pair_var, single.master_stats, p, calib)
    assert rows["E"].shot_method == "gain"
    assert rows["E"].prnu_pct == pytest.approx(out.results[ccd]["E"]["column_prnu_pct"][2], rel=1e-9)
