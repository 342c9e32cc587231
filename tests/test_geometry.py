"""Geometry and FITS round trip: quadrants read back in canonical orientation for every
frame variant; truncated and wrong-sized files raise typed errors naming the file."""

from __future__ import annotations

import numpy as np
import pytest

from shared import fitsio
from shared.geometry import (
    QUADRANTS,
    Geometry,
    GeometryError,
    assemble,
    quadrant,
    quadrants,
    region,
    standard_region,
)

VARIANTS = [Geometry(20, True), Geometry(20, False), Geometry(29, True), Geometry(29, False)]
OFFSETS = {"E": 1000.0, "F": 2000.0, "G": 3000.0, "H": 4000.0}


def _marked_frame(geometry: Geometry) -> np.ndarray:
    """A frame whose quadrants have distinct offsets, a marked readout node (canonical (0,0))
    and a column ramp in canonical coordinates."""
    quads = {}
    for q in QUADRANTS:
        arr = np.full((geometry.quad_rows, geometry.quad_cols), OFFSETS[q], np.float32)
        arr[0, 0] = 7
        arr[:, 60] += 11  # an image column near the readout node
        quads[q] = arr
    return assemble(quads, geometry)


@pytest.mark.parametrize("geometry", VARIANTS, ids=lambda g: f"ov{g.overscan}-{g.shape[0]}")
def test_layout_and_canonical_orientation(geometry):
    frame = _marked_frame(geometry)
    assert frame.shape == geometry.shape
    assert Geometry.from_shape(frame.shape) == geometry
    r, c = geometry.quad_rows, geometry.quad_cols
    # raw layout: H bottom-left, G bottom-right, E top-left, F top-right; nodes at the outer corners
    assert frame[0, 0] == 7 and frame[1, 1] == OFFSETS["H"]
    assert frame[0, 2 * c - 1] == 7 and frame[1, 2 * c - 2] == OFFSETS["G"]
    assert frame[2 * r - 1, 0] == 7 and frame[2 * r - 2, 1] == OFFSETS["E"]
    assert frame[2 * r - 1, 2 * c - 1] == 7 and frame[2 * r - 2, 2 * c - 2] == OFFSETS["F"]
    for q, quad in quadrants(frame).items():
        assert quad.shape == (r, c)
        assert quad[0, 0] == 7
        assert quad[5, 60] == OFFSETS[q] + 11
        assert np.shares_memory(quad, frame), "quadrant extraction must not copy"


def test_regions_have_the_documented_sizes():
    geometry = Geometry(20, True)
    quad = quadrant(np.zeros(geometry.shape, np.float32), "F")
    assert region(quad, "pre").shape == (2066, 51)
    assert region(quad, "img").shape == (2066, 2048)
    assert region(quad, "ove").shape == (2066, 20)
    assert region(quad, "povr").shape == (20, 2048)
    assert standard_region(quad, "pre").shape == (2066, 21)
    assert standard_region(quad, "img").shape == (2066, 2038)
    assert standard_region(quad, "ove", vstart=10, vend=100).shape == (90, 10)
    with pytest.raises(GeometryError):
        region(quadrant(np.zeros(Geometry(20, False).shape, np.float32), "E"), "povr")


@pytest.mark.parametrize("shape", [(4172, 4200), (4100, 4238), (4172,), (4238, 4172)])
def test_wrong_shapes_are_refused(shape):
    with pytest.raises(GeometryError):
        Geometry.from_shape(shape)


@pytest.mark.fullsize
@pytest.mark.parametrize("geometry", [VARIANTS[0], VARIANTS[3]], ids=["4238x4172", "4256x4132"])
def test_fits_round_trip(tmp_path, geometry):
    frame = _marked_frame(geometry)
    frame[10, 10] = 65535
    frame[11, 11] = 0
    path = fitsio.write_frame(tmp_path / "f.fits", frame, ccd=2, header={"OBSID": 42, "vstart": 0, "exptime": 1.5})
    back = fitsio.read_frame(path)
    assert back.data.dtype == np.float32
    assert back.geometry == geometry
    np.testing.assert_array_equal(back.data, frame)
    assert back.header["OBSID"] == 42 and back.header["EXPTIME"] == 1.5
    assert back.header["EXTNAME"] == "ROE1_CCD2"
    from astropy.io import fits

    with fits.open(path) as hdul:
        assert len(hdul) == 2 and hdul[0].data is None
        assert hdul[1].header["BITPIX"] == 16 and hdul[1].header["BZERO"] == 32768


def test_truncated_and_wrong_files_raise_typed_errors(tmp_path):
    geometry = Geometry(20, False)
    good = fitsio.write_frame(tmp_path / "good.fits", np.full(geometry.shape, 100, np.float32), ccd=1)
    cut = tmp_path / "cut.fits"
    cut.write_bytes(good.read_bytes()[:5_000_000])
    with pytest.raises(fitsio.TruncatedFitsError) as err:
        fitsio.read_frame(cut)
    assert "cut.fits" in str(err.value)
    assert not fitsio.is_complete_fits(cut) and fitsio.is_complete_fits(good)
    small = fitsio.write_frame(tmp_path / "small.fits", np.zeros((100, 200), np.float32), ccd=1)
    with pytest.raises(fitsio.FrameGeometryError) as err:
        fitsio.read_frame(small)
    assert "small.fits" in str(err.value) and "NAXIS" in err.value.reason
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"not a fits file" * 300)
    with pytest.raises(fitsio.FitsFormatError):
        fitsio.read_frame(garbage)
    with pytest.raises(fitsio.FitsFormatError):
        fitsio.read_frame(tmp_path / "missing.fits")
