"""Metatest family-specific products (synthetic results, small files, no frames, no broker): NL
curves per quadrant, BF a-matrices / covariances, gain vs wavelength / temperature / RD, crosstalk
matrices and the FPA requirement figure, offset / RON history figures, the merged defect mask."""

from __future__ import annotations

import csv
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from services.metatest.aggregate import ResultRecord, aggregate, gains_of, history_rows, latest_per_test
from services.metatest.extras import QUADRANT_ORDER, condition_of, extra_products
from services.metatest.families import FAMILIES, families_of
from services.metatest.layout import fpa_layout
from services.metatest.products import write_family_products
from shared.geometry import CCDS, QUADRANTS

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
LAYOUT = fpa_layout()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def code(block: str, ccd: str, q: str) -> float:
    return 100 * LAYOUT.known_blocks.index(block) + 10 * int(ccd[-1]) + QUADRANTS.index(q) + 1


def record(block: str, test: str, fn, when: datetime = T0, products: list[str] | None = None, **top) -> ResultRecord:
    res: dict = {c: {q: fn(block, c, q) for q in QUADRANTS} for c in CCDS}
    res.update(top)
    return ResultRecord(block, test, 0, f"{test}-{block}-{when.isoformat()}", when, res, products or [])


def build(family: str, records: list[ResultRecord], root: Path, **kw) -> list[str]:
    """Every product of the family (maps, heat maps, tables, mosaics, extras)."""
    latest = latest_per_test(records)
    result = aggregate(FAMILIES[family], latest, gains_of(latest), LAYOUT)
    assert result is not None
    return write_family_products(result, LAYOUT, root, history=history_rows(FAMILIES[family], records), **kw)


def build_extras(family: str, records: list[ResultRecord], root: Path) -> list[str]:
    """Only the family-specific products (faster: no heat map per quantity)."""
    latest = latest_per_test(records)
    result = aggregate(FAMILIES[family], latest, gains_of(latest), LAYOUT)
    assert result is not None
    out = root / "FPA" / family
    out.mkdir(parents=True, exist_ok=True)
    paths = extra_products(result, LAYOUT, root, out, history=history_rows(FAMILIES[family], records))
    return [p.relative_to(root).as_posix() for p in paths]


def assert_png(path: Path) -> tuple[int, int]:
    """A valid PNG (signature, decodable); its (height, width)."""
    from matplotlib import image

    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC
    return image.imread(str(path)).shape[:2]


# --------------------------------------------------------------------------- NL curves


def _nl_table(path: Path, block: str, n: int = 200) -> None:
    rows = [(c, q) for c in CCDS for q in QUADRANTS]
    fluence = np.stack([np.linspace(100, 60000, n)] * len(rows))
    nl = np.stack([np.full(n, code(block, c, q) / 1000.0) for c, q in rows])
    path.parent.mkdir(parents=True, exist_ok=True)
    Table({"ccd": [c for c, _ in rows], "quadrant": [q for _, q in rows], "fluence": fluence, "fluence_lin": fluence,
           "nl_pct": nl}).write(str(path), format="fits")


def test_nl_curves_per_quadrant_on_the_fpa(tmp_path):
    blocks = LAYOUT.fpa_blocks[:3]
    recs = []
    for b in blocks:
        _nl_table(tmp_path / b / "NL01" / "nl_curves.fits", b)
        recs.append(record(b, "NL01", lambda b, c, q: {"max_nl_pct": code(b, c, q) / 1000.0},
                           products=[f"{b}/NL01/nl_curves.fits"]))
    recs.append(record(LAYOUT.fpa_blocks[5], "NL01", lambda b, c, q: {"max_nl_pct": 0.5}))  # no curves file
    products = build("nl", recs, tmp_path)
    assert "FPA/nl/nl_curves.json" in products and "FPA/nl/nl_curves_NL01.png" in products
    doc = json.loads((tmp_path / "FPA/nl/nl_curves.json").read_text())
    curves = doc["curves"]["NL01"]
    assert sorted(curves) == sorted(blocks)
    for b in blocks:
        for c in CCDS:
            for q in QUADRANTS:
                cv = curves[b][c][q]
                assert len(cv["fluence_adu"]) == len(cv["nl_pct"]) == 60
                assert cv["fluence_adu"][0] == pytest.approx(100.0) and cv["fluence_adu"][-1] == pytest.approx(60000.0)
                assert cv["nl_pct"] == pytest.approx([code(b, c, q) / 1000.0] * 60)
    assert doc["missing"]["NL01"] == [b for b in LAYOUT.fpa_blocks if b not in blocks]
    assert assert_png(tmp_path / "FPA/nl/nl_curves_NL01.png") == (864, 864)
    # the maps keep their shape
    maps = json.loads((tmp_path / "FPA/nl/nl_maps.json").read_text())
    assert set(maps) == {"layout", "maps", "grid"}


# --------------------------------------------------------------------------- BF matrices


def test_bf_a_matrices_from_kernels_or_results_and_covariances(tmp_path):
    b1, b2 = LAYOUT.fpa_blocks[0], LAYOUT.fpa_blocks[7]
    out = tmp_path / b1 / "BF01"
    out.mkdir(parents=True)
    for c in CCDS:
        hdus = [fits.PrimaryHDU()]
        for q in QUADRANTS:
            a = np.full((6, 6), 1e-8)
            a[0, 0] = -code(b1, c, q) * 1e-9
            a[0, 1] = 2e-7  # serial lag 1 (image rows = parallel lag)
            hdus.append(fits.ImageHDU(a, name=f"A_{q}"))
        fits.HDUList(hdus).writeto(out / f"bf_kernels_{c}.fits")
    rows = [(c, q, mu) for c in CCDS for q in QUADRANTS for mu in (1000.0, 30000.0, 5000.0)]
    Table({"ccd": [r[0] for r in rows], "quadrant": [r[1] for r in rows], "mu": [r[2] for r in rows],
           "cov": np.stack([np.full((6, 6), r[2] / 10 + code(b1, r[0], r[1])) for r in rows])}).write(
        str(out / "bf_covariances.fits"), format="fits")
    recs = [record(b1, "BF01", lambda b, c, q: {"a00": -1e-6, "fwhm_x_half": 1.6}),
            record(b2, "BF01", lambda b, c, q: {"a00": -code(b, c, q) * 1e-9, "a10": 1e-7, "a01": 2e-7, "a11": 3e-8})]
    products = build_extras("bf", recs, tmp_path)
    assert "FPA/bf/bf_matrices.json" in products and "FPA/bf/bf_a_matrix_BF01.png" in products
    doc = json.loads((tmp_path / "FPA/bf/bf_matrices.json").read_text())
    assert doc["a_source"]["BF01"] == {b1: "bf_kernels", b2: "results"}
    for c in CCDS:
        for q in QUADRANTS:
            a1 = doc["a"]["BF01"][b1][c][q]
            assert len(a1) == 6 and len(a1[0]) == 6
            assert a1[0][0] == pytest.approx(-code(b1, c, q) * 1e-9) and a1[0][1] == pytest.approx(2e-7)
            np.testing.assert_allclose(doc["a"]["BF01"][b2][c][q], [[-code(b2, c, q) * 1e-9, 1e-7], [2e-7, 3e-8]])
            cov = doc["cov"]["BF01"][b1][c][q]
            assert cov["mu_adu"] == 30000.0  # the highest fluence
            assert cov["cov_adu2"][2][3] == pytest.approx(3000.0 + code(b1, c, q))
    assert b2 not in doc["cov"]["BF01"]
    assert_png(tmp_path / "FPA/bf/bf_a_matrix_BF01.png")


# --------------------------------------------------------------------------- gain vs conditions


def test_condition_of_ptc_tests():
    assert condition_of("PTC01") == ("wavelength_nm", 800.0)
    assert condition_of("PTC02_590") == ("wavelength_nm", 590.0)
    assert condition_of("PTC02_150K") == ("temperature_K", 150.0)
    assert condition_of("PTC02_15.5R") == ("rd_v", 15.5)
    assert condition_of("PTC02_x") is None and condition_of("BIAS01") is None


def test_gain_vs_wavelength_temperature_and_rd_per_block(tmp_path):
    b1, b2 = LAYOUT.fpa_blocks[2], LAYOUT.fpa_blocks[3]
    offsets = {"PTC01": 0.0, "PTC02_590": 0.01, "PTC02_880": 0.02, "PTC02_150K": 0.03, "PTC02_15.5R": 0.04,
               "PTC02_16.5R": 0.05}
    recs = [record(b1, t, lambda b, c, q, d=d: {"gain": 3.0 + code(b, c, q) / 1e4 + d}) for t, d in offsets.items()]
    recs.append(record(b2, "PTC01", lambda b, c, q: {"gain": 3.2}))  # no PTC02: no conditions products
    products = build_extras("ptc", recs, tmp_path)
    doc = json.loads((tmp_path / "FPA/ptc/ptc_gain_conditions.json").read_text())
    assert list(doc) == [b1]
    assert set(doc[b1]) == {"wavelength_nm", "temperature_K", "rd_v"}
    assert {t: v["value"] for t, v in doc[b1]["wavelength_nm"].items()} == {"PTC01": 800.0, "PTC02_590": 590.0,
                                                                            "PTC02_880": 880.0}
    assert set(doc[b1]["rd_v"]) == {"PTC02_15.5R", "PTC02_16.5R"}
    for axis, tests in doc[b1].items():
        for t, item in tests.items():
            for c in CCDS:
                for q in QUADRANTS:
                    assert item["gain"][c][q] == pytest.approx(3.0 + code(b1, c, q) / 1e4 + offsets[t])
    with open(tmp_path / f"FPA/ptc/ptc_gain_conditions_{b1}.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 * 12
    row = next(r for r in rows if r["TEST"] == "PTC02_150K" and r["CCD"] == "CCD2" and r["QUAD"] == "G")
    assert row["AXIS"] == "temperature_K" and float(row["VALUE"]) == 150.0
    assert float(row["GAIN"]) == pytest.approx(3.0 + code(b1, "CCD2", "G") / 1e4 + 0.03)
    assert f"FPA/ptc/ptc_gain_conditions_{b1}.png" in products
    assert not any(b2 in p and "conditions" in p for p in products)
    assert_png(tmp_path / f"FPA/ptc/ptc_gain_conditions_{b1}.png")


# --------------------------------------------------------------------------- crosstalk


def _xtalk(block: str, strong: dict[tuple[str, str], float] | None = None) -> dict:
    xt = {s: {v: (code(block, s[:4], s[-1]) * 1e-9 if s != v else 1.0) for v in QUADRANT_ORDER} for s in QUADRANT_ORDER}
    for (s, v), c in (strong or {}).items():
        xt[s][v] = c
    return xt


def test_crosstalk_matrices_and_the_fpa_requirement_figure(tmp_path):
    b1, b2 = LAYOUT.fpa_blocks[0], LAYOUT.fpa_blocks[1]  # b2 is a rotated block (columns 4-6)
    recs = [record(b1, "PSF01_800", lambda b, c, q: {"fwhm_x_px": 1.3}, crosstalk=_xtalk(b1)),
            record(b2, "PSF01_800", lambda b, c, q: {"fwhm_x_px": 1.3},
                   crosstalk=_xtalk(b2, {("CCD1.E", "CCD2.F"): -9e-4}))]
    products = build_extras("psf", recs, tmp_path)
    doc = json.loads((tmp_path / "FPA/psf/psf_crosstalk_matrices.json").read_text())
    for b in (b1, b2):
        m = doc["PSF01_800"][b]["matrix"]
        assert doc["PSF01_800"][b]["order"] == QUADRANT_ORDER
        assert len(m) == 12 and all(len(r) == 12 for r in m)
        for i, s in enumerate(QUADRANT_ORDER):
            assert m[i][i] is None
            for j, v in enumerate(QUADRANT_ORDER):
                if i != j and not (b == b2 and (s, v) == ("CCD1.E", "CCD2.F")):
                    assert m[i][j] == pytest.approx(code(b, s[:4], s[-1]) * 1e-9)
    assert doc["PSF01_800"][b2]["matrix"][QUADRANT_ORDER.index("CCD1.E")][QUADRANT_ORDER.index("CCD2.F")] == 9e-4
    for b in (b1, b2):
        assert_png(tmp_path / f"FPA/psf/psf_crosstalk_matrix_{b}_PSF01_800.png")
    assert "FPA/psf/psf_crosstalk_requirement_PSF01_800.png" in products
    assert_png(tmp_path / "FPA/psf/psf_crosstalk_requirement_PSF01_800.png")
    # the grid behind the requirement figure: the failing victim at its FPA cell
    from services.metatest.extras import crosstalk_requirement_grid

    latest = latest_per_test(recs)
    result = aggregate(FAMILIES["psf"], latest, gains_of(latest), LAYOUT)
    dom, bad = crosstalk_requirement_grid(result, LAYOUT, "PSF01_800")
    cell = LAYOUT.cell(b2, "CCD2", "F")
    assert bad[cell] and int(bad.sum()) == 1
    assert dom[cell] == pytest.approx(9e-4)
    assert np.isnan(dom[LAYOUT.cell(LAYOUT.fpa_blocks[4], "CCD1", "E")])  # missing block blank


# --------------------------------------------------------------------------- bias history figure


def test_bias_history_figures_per_block(tmp_path):
    b1, b2 = LAYOUT.fpa_blocks[0], LAYOUT.fpa_blocks[6]
    recs = []
    for k, test in enumerate(("BIAS01", "DARK01", "PTC01", "BIAS02")):
        for b in (b1, b2):
            recs.append(record(b, test, lambda b, c, q, k=k: {"offset_img": 2600.0 + k, "ron_img_adu": 1.3 + 0.01 * k,
                                                              "offset_pre": 2601.0 + k},
                               when=T0 + timedelta(hours=k)))
    products = build_extras("bias", recs, tmp_path)
    for b in (b1, b2):
        assert f"FPA/bias/bias_history_{b}.png" in products
        assert_png(tmp_path / f"FPA/bias/bias_history_{b}.png")
    # a new result of b1 redraws b1's figure only (b2's file is the same file: not rewritten)
    inode = {b: (tmp_path / f"FPA/bias/bias_history_{b}.png").stat().st_ino for b in (b1, b2)}
    recs.append(record(b1, "BIAS02", lambda b, c, q: {"offset_img": 2590.0, "ron_img_adu": 1.5}, when=T0 + timedelta(hours=9)))
    build_extras("bias", recs, tmp_path)
    assert (tmp_path / f"FPA/bias/bias_history_{b2}.png").stat().st_ino == inode[b2]
    assert (tmp_path / f"FPA/bias/bias_history_{b1}.png").stat().st_ino != inode[b1]
    assert_png(tmp_path / f"FPA/bias/bias_history_{b1}.png")
    recs.pop()
    rows = [r for r in history_rows(FAMILIES["bias"], recs) if r["BLOCK"] == b1 and r["CCD"] == "CCD3" and r["QUAD"] == "H"]
    assert [r["TEST"] for r in rows] == ["BIAS01", "DARK01", "PTC01", "BIAS02"]
    assert [r["offset_img"] for r in rows] == [2600.0, 2601.0, 2602.0, 2603.0]


# --------------------------------------------------------------------------- merged defect mask


def _mask_file(path: Path, ext: str, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(mask.astype(np.uint8), name=ext)]).writeto(path)


def test_defect_mask_mosaic_merges_dark01_and_flat_masks(tmp_path):
    assert "cosmetics" in {f.name for f in families_of("DARK01")}
    assert "cosmetics" in {f.name for f in families_of("FLAT02_730")}
    b1, b2 = LAYOUT.fpa_blocks[0], LAYOUT.fpa_blocks[1]  # left and right (rotated) block
    shape = (8, 10)
    masks = {}
    for b in (b1, b2):
        for c in CCDS:
            cos = np.zeros(shape, np.uint8)
            cos[0, 0] = 4  # whole column bit
            dark = np.zeros(shape, np.uint8)
            dark[7, 9] = 1  # hot
            flat = np.zeros(shape, np.uint8)
            flat[7, 0] = 2  # flat high -> 16
            flat[0, 0] = 1  # flat low -> 8
            flat2 = np.zeros(shape, np.uint8)
            flat2[1, 1] = 4  # n-sigma -> 32
            if b == b1:
                _mask_file(tmp_path / b / "COSMETICS00" / f"cosmetics_masks_{c}.fits", "MASK", cos)
            _mask_file(tmp_path / b / "DARK01" / f"master_dark_{c}.fits", "MASK", dark)
            _mask_file(tmp_path / b / "FLAT01" / f"master_flat_{c}.fits", "MASK", flat)
            _mask_file(tmp_path / b / "FLAT02_730" / f"master_flat_{c}.fits", "MASK", flat2)
            expected = (cos if b == b1 else 0) | dark
            expected = expected | np.where(flat & 1, 8, 0) | np.where(flat & 2, 16, 0) | np.where(flat2 & 4, 32, 0)
            masks[(b, c)] = expected
    recs = [record(b1, "COSMETICS00", lambda b, c, q: {"n_defects": 3})]
    for b in (b1, b2):
        recs += [record(b, "DARK01", lambda b, c, q: {"dark_current_adu_s": 0.001}),
                 record(b, "FLAT01", lambda b, c, q: {"prnu_pct": 1.0}),
                 record(b, "FLAT02_730", lambda b, c, q: {"prnu_pct": 1.1})]
    products = build("cosmetics", recs, tmp_path)
    assert "FPA/cosmetics/cosmetics_defect_mask.fits" in products
    from services.metatest.mosaic import frame_quadrant

    with fits.open(tmp_path / "FPA/cosmetics/cosmetics_defect_mask.fits") as hdul:
        assert len(hdul) == 1 + 2 * 3 * 4
        for b in (b1, b2):
            for c in CCDS:
                pos = LAYOUT.position(b, c)
                for q in QUADRANTS:
                    h = hdul[f"{pos.ccd_id}.{q}"]
                    want = frame_quadrant(masks[(b, c)], q)
                    if pos.rotated:
                        want = want[::-1, ::-1]
                    np.testing.assert_array_equal(h.data, want)
                    assert h.header["BLOCK"] == b and h.header["CCD"] == c
        every = np.concatenate([hdul[i].data.ravel() for i in range(1, len(hdul))])
        assert int(np.bitwise_or.reduce(every)) == 1 | 4 | 8 | 16 | 32
    # blocks present in the family by their masks; the COSMETICS00 map keeps its values
    maps = json.loads((tmp_path / "FPA/cosmetics/cosmetics_maps.json").read_text())
    assert maps["maps"]["n_defects"][b1]["CCD1"]["E"] == 3
    assert maps["maps"]["n_defects"][b2]["CCD1"]["E"] is None
