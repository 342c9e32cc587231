"""FLAT01/02 analysis: normalisation, master flats, PRNU (target: within 5 % relative of the
injected value), photo-response defect mask. Full-size flats from ``services.sim.physics``."""

from __future__ import annotations

import numpy as np
import pytest

from services.analyzer.analysis import flat
from services.analyzer.analysis.common import FrameInput
from shared.fitsio import to_uint16
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, Geometry, assemble

T_FWC = 4.0


def test_median_error_factor():
    assert flat.median_error_factor(1) == 1.0 and flat.median_error_factor(2) == 1.0
    assert flat.median_error_factor(3) == pytest.approx(np.sqrt(1.3484), rel=0.01)
    assert flat.median_error_factor(80) == pytest.approx(np.sqrt(np.pi / 2), rel=0.03)


def test_defect_mask_bits_and_bad_columns():
    rng = np.random.default_rng(1)
    master = (1.0 + 0.01 * rng.standard_normal((400, 300))).astype(np.float32)
    master *= np.linspace(0.95, 1.05, 300)[None, :].astype(np.float32)  # smooth gradient is not a defect
    master[10, 10] = 0.3
    master[20, 20] = 1.8
    master[30, 30] = 1.10  # 10 sigma: n-sigma rule only
    master[100:, 150] *= 0.7  # a weak column, 300 pixels
    mask, counts = flat.defect_mask(master, flat.FlatParams(nbins=(16, 16)))
    assert mask[10, 10] & flat.MASK_LOW and mask[20, 20] & flat.MASK_HIGH
    assert mask[30, 30] == flat.MASK_NSIGMA
    assert counts["n_defects_low"] == 1 and counts["n_defects_high"] == 1
    assert counts["n_bad_columns"] == 1
    assert 302 <= counts["n_defects"] <= 306


def test_flat_columns_grouping():
    fr = [FrameInput(quads={}, exptime=t, obsid=i, wave=w) for i, (t, w) in enumerate([(1.0, 4), (3.0, 4), (1.0, 4), (1.0, 1), (3.0, 4)])]
    assert flat.flat_columns(fr) == [[0, 2], [1, 4], [3]]
    for i, f in enumerate(fr):
        f.meta["column"] = i % 2
    assert flat.flat_columns(fr) == [[0, 2, 4], [1, 3]]


@pytest.mark.fullsize
def test_flat01_prnu_masters_and_defects():
    """Two quadrants of a CCD, three columns (25 % x 4, 75 % x 2, 50 % x 1 frame with a known
    gain): PRNU within 5 % of the injected 1.5 %, dead columns in the mask, master flat follows
    the injected pixel response."""
    from services.sim.physics import FULL_SCALE_ADU, REFERENCE_GAIN, DetectorModel, Exposure, PhysicsConfig

    model = DetectorModel(PhysicsConfig(prnu_pct=1.5, bad_columns=12), seed=21)
    ccd, quads = "CCD1", ["E", "F"]
    geo = Geometry()
    flux = FULL_SCALE_ADU * REFERENCE_GAIN / T_FWC
    frames, k = [], 0
    for frac, n in ((0.25, 4), (0.75, 2), (0.5, 1)):
        for _ in range(n):
            k += 1

            def load(k=k, t=frac * T_FWC):
                e = Exposure(kind="flat", exptime=t, flux_e_per_s=flux)
                return {q: to_uint16(model.simulate_quadrant(ccd, q, e, model.rng("flat", k, q), geo).data).astype(np.float32) for q in quads}

            frames.append(FrameInput(quads=load, exptime=frac * T_FWC, obsid=k, ccd=ccd, wave=800))
    truth = model.truth[ccd]
    gains = {ccd: {q: truth.quadrants[q].gain_e_per_adu for q in quads}}
    an = flat.analyse_flat(frames, params={"gain": gains}, quadrants=quads)
    for q in quads:
        r = an.results[ccd][q]
        assert r.n_frames == 7 and r.n_columns == 3
        assert abs(r.prnu_pct / 1.5 - 1) < 0.05
        assert r.prnu_raw_pct > 1.02 * r.prnu_pct  # shot noise inflates the raw value
        for c in an.columns[ccd][q]:
            assert abs(c.prnu_pct / 1.5 - 1) < 0.05, c
            assert c.shot_method == ("gain" if c.n_frames == 1 else "pairs")
        assert abs(r.prnu_master_pct / 1.5 - 1) < 0.05
        # dead columns of this quadrant: every pixel below 0.5 response is in the mask
        mask = an.masters[ccd]["mask"][q][:IMAGE_ROWS, PRESCAN_COLS : PRESCAN_COLS + IMAGE_COLS]
        dead = [b for b in truth.bad_columns if b.quadrant == q and b.kind == "dead"]
        expected_low = sum(IMAGE_ROWS - b.row_start for b in dead if b.response < 0.5)
        assert r.n_defects_low >= expected_low
        for b in dead:
            col = mask[b.row_start :, b.col - PRESCAN_COLS]
            assert np.mean(col != 0) > 0.99
        assert r.n_bad_columns == len(dead)
        assert r.n_defects < sum(IMAGE_ROWS - b.row_start for b in dead) + 50
        # master flat vs the injected per-pixel response (illumination removed)
        master = an.masters[ccd]["master"][q][:IMAGE_ROWS, PRESCAN_COLS : PRESCAN_COLS + IMAGE_COLS]
        resp = model.response(ccd, q)
        sl = (slice(100, 600), slice(100, 600))
        rel = resp[sl] / np.median(resp[sl])
        good = np.abs(rel - 1) < 0.2
        corr = np.corrcoef(master[sl][good], rel[good])[0, 1]
        assert corr > 0.95
        assert np.median(an.masters[ccd]["master_err"][q][sl]) < 0.5 * 0.015
    # products assemble into a raw frame
    full = {q: an.masters[ccd]["master"][q] for q in quads}
    full.update({q: np.ones((2086, 2119), np.float32) for q in ("G", "H")})
    assert assemble(full).shape == (4172, 4238)
    assert set(an.masters[ccd]) >= {"col1", "col1_err", "col2", "col3", "master", "master_err", "mask"}
