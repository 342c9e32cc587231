"""Quick-look PNGs (services/validator/quicklook.py): binning, equalisation, the composed image
(3 CCDs side by side, row 0 at the bottom, verdict colour and title), the strided read of a FITS
file, and the validator writing one per exposure without ever failing a validation for it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from PIL import Image

from services.catalogue import synthetic as syn
from services.validator import quicklook as ql


def test_bin_frame_means_blocks_and_drops_the_remainder():
    data = np.arange(10 * 12, dtype=np.float32).reshape(10, 12)
    out = ql.bin_frame(data, 4)
    assert out.shape == (2, 3) and out.dtype == np.float32
    assert out[0, 0] == pytest.approx(data[:4, :4].mean()) and out[1, 2] == pytest.approx(data[4:8, 8:12].mean())
    with pytest.raises(ValueError, match="expected a 2-D image"):
        ql.bin_frame(np.zeros((3, 100)), 8)


def test_equalise_is_monotone_and_spreads_the_levels():
    rng = np.random.default_rng(0)
    img = np.exp(rng.normal(0, 1, (200, 200))).astype(np.float32)  # very skewed
    img[0, 0] = np.nan
    out = ql.equalise(img)
    assert out.dtype == np.uint8 and out[0, 0] == 0
    flat, eq = img.ravel()[1:], out.ravel()[1:]
    order = np.argsort(flat)
    assert np.all(np.diff(eq[order].astype(int)) >= 0)  # brighter never darker
    assert eq.max() == 253 and eq.min() == 0
    counts = np.bincount(eq // 64, minlength=4)
    assert counts.min() > 0.2 * eq.size  # equalised: each quarter of the levels holds ~1/4 of the pixels
    assert set(np.unique(ql.equalise(np.full((4, 4), 7.0)))) == {127}


def test_quicklook_png_layout_title_and_colours(tmp_path):
    thumbs = {}
    for c in (1, 2, 3):
        t = np.zeros((30, 40), dtype=np.float32)
        t[:5] = 100.0 * c  # first rows bright: at the bottom of the picture
        thumbs[f"CCD{c}"] = t
    ev = syn.exposure(42, flags=4)  # BADDATA: FAIL
    path = ql.write_quicklook(ev, thumbs, tmp_path)
    assert path == tmp_path / "quicklook" / "BORN" / "42.png"
    img = Image.open(path).convert("RGB")
    assert img.size == (3 * 40 + 2 * ql.GAP, 30 + ql.TITLE_H)
    assert img.getpixel((img.size[0] - 2, 2)) == (170, 25, 25)  # red title bar
    bottom, top = img.getpixel((10, img.size[1] - 1)), img.getpixel((10, ql.TITLE_H + 1))
    assert bottom[0] > 200 and top[0] < 50
    assert img.getpixel((40 + ql.GAP // 2, 40)) == (40, 40, 40)  # the gap between CCD1 and CCD2
    assert "ObsID 42" in ql.title_of(ev) and "FAIL" in ql.title_of(ev) and "BADDATA" in ql.title_of(ev)
    ok = ql.write_quicklook(syn.exposure(43), thumbs, tmp_path)
    assert Image.open(ok).convert("RGB").getpixel((2, 2)) == (20, 120, 40)  # green
    assert not list(path.parent.glob(".*.tmp"))


def test_read_binned_from_a_fits_file(tmp_path):
    data = (np.arange(64 * 48) % 1000 + 20000).astype(np.uint16).reshape(64, 48)
    path = tmp_path / "f.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(data)]).writeto(path)  # uint16 -> BZERO 32768
    out = ql.read_binned(path, 8)
    assert out.shape == (8, 6) == ql.bin_frame(data.astype(np.float32), 8).shape
    assert out[3, 2] == pytest.approx(data[24, 16:24].astype(float).mean())
    ev = syn.exposure(5)
    for ref in ev.files:
        (tmp_path / ref.path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / ref.path).write_bytes(path.read_bytes())
    thumbs = ql.thumbnails(ev, {2: {"thumb": np.ones((3, 3))}}, tmp_path)
    assert thumbs["CCD1"].shape == (8, 6) and thumbs["CCD2"].shape == (3, 3)


def test_write_safely_logs_and_never_raises(tmp_path, caplog):
    (tmp_path / "products").write_text("a file where the folder should be")
    ev = syn.exposure(9)
    with caplog.at_level(logging.WARNING, logger="vison.validator.quicklook"):
        assert ql.write_safely(ev, {}, tmp_path / "no-data", tmp_path / "products") is None
    assert "ObsID 9: quick-look PNG not written" in caplog.text


@pytest.mark.fullsize
def test_validator_writes_the_quicklook_and_survives_a_failure(tmp_path, caplog):
    from services.validator.service import Validator
    from shared.config import Settings
    from shared.events import ExposureValidated
    from tests.test_ingest_data import write_exposure
    from tests.test_validator import _ingested

    settings = Settings(data_root=tmp_path / "data", products_root=tmp_path / "products", state_dir=tmp_path / "state")
    root = Path(settings.data_root)
    info = write_exposure(root, 11, block="BORN")
    validator = Validator(settings, pool="thread", workers=3)
    try:
        (out,) = [e for e in validator.validate(_ingested(root, info)) if isinstance(e, ExposureValidated)]
        png = Path(settings.products_root) / "quicklook" / "BORN" / "11.png"
        img = Image.open(png)
        assert img.size == (3 * (4238 // 8) + 2 * ql.GAP, 4172 // 8 + ql.TITLE_H)
        colour = img.convert("RGB").getpixel((2, 2))
        assert colour == ((20, 120, 40) if out.passed else (170, 25, 25))
        # products root unusable: the exposure is still validated, the failure logged
        png.unlink()
        validator.settings = validator.settings.model_copy(update={"products_root": png.parent / "11.png" / "x"})
        png.write_text("not a folder")
        info2 = write_exposure(root, 12, block="BORN")
        with caplog.at_level(logging.WARNING, logger="vison.validator.quicklook"):
            events = validator.validate(_ingested(root, info2))
        assert [e.obsid for e in events if isinstance(e, ExposureValidated)] == [12]
        assert "ObsID 12: quick-look PNG not written" in caplog.text
    finally:
        validator.close()
