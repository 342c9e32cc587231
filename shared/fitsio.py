"""FITS I/O for ELVIS frames: read the image HDU as float32 with its header, write ELVIS-like
frames (empty primary + ``ROE<r>_CCD<c>`` image extension, uint16 through BZERO 32768).

Errors are typed and name the file and the reason: :class:`TruncatedFitsError` for a file
shorter than its headers promise (still being written, or cut), :class:`FrameGeometryError` for an
image that is not a CCD273 frame, :class:`FitsFormatError` for anything else unreadable.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyUserWarning

from shared.geometry import Geometry, GeometryError

FITS_BLOCK = 2880


class FrameError(Exception):
    """A frame file that cannot be used; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class TruncatedFitsError(FrameError):
    """The file ends before the data its headers announce (incomplete or cut)."""


class FitsFormatError(FrameError):
    """Not a readable FITS file, or no image HDU where one was asked for."""


class FrameGeometryError(FrameError):
    """The image is not a CCD273 frame (wrong NAXIS1 / NAXIS2)."""


@dataclass
class Frame:
    """One CCD image: ``data`` float32 [row, col] in ADU, its FITS ``header``, its geometry."""

    data: np.ndarray
    header: fits.Header
    path: str
    geometry: Geometry


MAX_NAXIS = 999  # the FITS standard's bound; astropy loops over every NAXISn of a larger value
MAX_HDUS = 1000


def _card_int(card: bytes) -> int | None:
    value = card[10:].split(b"/", 1)[0].strip()
    try:
        return int(value)
    except ValueError:
        return None


def _precheck(path: Path) -> None:
    """Walk the headers before astropy does: refuse NAXIS outside 0..999 (astropy would loop over
    up to 2**63 NAXISn keys: a hang) and absurd HDU counts. Anything else is left to astropy."""
    size = path.stat().st_size
    offset = index = 0
    with open(path, "rb") as f:
        while offset + FITS_BLOCK <= size and index < MAX_HDUS:
            f.seek(offset)
            cards: dict[bytes, int | None] = {}
            header_len, ended = 0, False
            while not ended:
                block = f.read(FITS_BLOCK)
                if len(block) < FITS_BLOCK:
                    return  # truncated: astropy reports it
                header_len += FITS_BLOCK
                for i in range(0, FITS_BLOCK, 80):
                    card = block[i:i + 80]
                    key = card[:8].rstrip()
                    if key == b"END":
                        ended = True
                        break
                    if key == b"NAXIS":  # every NAXIS card (astropy may read any of duplicates)
                        value = _card_int(card) if card[8:10] == b"= " else None
                        if value is None or not 0 <= value <= MAX_NAXIS:
                            shown = card[10:].split(b"/", 1)[0].strip().decode("ascii", "replace")[:20]
                            raise FitsFormatError(path, f"HDU {index}: NAXIS = {shown!r} (FITS requires an integer 0..{MAX_NAXIS})")
                    if card[8:10] == b"= " and (key in (b"BITPIX", b"PCOUNT", b"GCOUNT") or key.startswith(b"NAXIS")):
                        cards.setdefault(key, _card_int(card))
            naxis, bitpix = cards.get(b"NAXIS"), cards.get(b"BITPIX")
            if naxis is None or bitpix is None:
                return
            dims = [cards.get(b"NAXIS%d" % n) for n in range(1, naxis + 1)]
            if any(d is None or d < 0 for d in dims):
                return
            count = 1
            for d in dims[1:] if dims and dims[0] == 0 else dims:  # random groups: NAXIS1 = 0
                count *= d
            if not dims:
                count = 0
            count = ((cards.get(b"GCOUNT") or 1) * ((cards.get(b"PCOUNT") or 0) + count)) if dims else 0
            data = abs(bitpix) // 8 * count
            offset += header_len + -(-data // FITS_BLOCK) * FITS_BLOCK
            index += 1
    if index >= MAX_HDUS:
        raise FitsFormatError(path, f"more than {MAX_HDUS} HDUs")


def _check_complete(path: Path, hdul: fits.HDUList) -> None:
    size = path.stat().st_size
    for index, hdu in enumerate(hdul):
        info = hdu.fileinfo()
        end = info["datLoc"] + info["datSpan"]
        if end > size:
            raise TruncatedFitsError(path, f"HDU {index} needs {end} bytes, the file has {size} (truncated or still being written)")


def is_complete_fits(path: str | os.PathLike) -> bool:
    """True when the file is a whole FITS file: every HDU's header and data are present."""
    try:
        _precheck(Path(path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(path, memmap=False, lazy_load_hdus=False, do_not_scale_image_data=True) as hdul:
                _check_complete(Path(path), hdul)
        return Path(path).stat().st_size % FITS_BLOCK == 0
    except Exception:
        return False


def read_frame(path: str | os.PathLike, hdu: int | str = -1, check_geometry: bool = True) -> Frame:
    """Read one image HDU (the last by default) as float32 ADU with its header.

    Raises :class:`TruncatedFitsError`, :class:`FrameGeometryError` or :class:`FitsFormatError`.
    """
    path = Path(path)
    try:
        _precheck(path)
        with warnings.catch_warnings():
            warnings.simplefilter("error", AstropyUserWarning)
            with fits.open(path, memmap=True, lazy_load_hdus=False, do_not_scale_image_data=True) as hdul:
                _check_complete(path, hdul)
                try:
                    image = hdul[hdu]
                except (IndexError, KeyError):
                    raise FitsFormatError(path, f"no HDU {hdu!r} (file has {len(hdul)})") from None
                header = image.header.copy()
                raw = image.data
                if raw is None or raw.ndim != 2:
                    raise FitsFormatError(path, f"HDU {hdu!r} holds no 2-D image")
                data = raw.astype(np.float32)
                bscale = header.get("BSCALE", 1.0)
                bzero = header.get("BZERO", 0.0)
                if bscale != 1.0:
                    data *= np.float32(bscale)
                if bzero:
                    data += np.float32(bzero)
                del raw
    except FrameError:
        raise
    except FileNotFoundError:
        raise FitsFormatError(path, "file not found") from None
    except AstropyUserWarning as exc:
        if "truncated" in str(exc):
            raise TruncatedFitsError(path, f"truncated or still being written ({exc})") from None
        raise FitsFormatError(path, f"unreadable FITS: {exc}") from None
    except (OSError, ValueError, TypeError) as exc:
        raise FitsFormatError(path, f"unreadable FITS: {exc}") from None
    except Exception as exc:  # astropy on a malformed header (a missing BITPIX: KeyError, ...)
        raise FitsFormatError(path, f"malformed FITS header: {exc.__class__.__name__}: {exc}") from None
    for key in ("BSCALE", "BZERO"):
        header.remove(key, ignore_missing=True)
    try:
        geometry = Geometry.from_shape(data.shape) if check_geometry else Geometry()
    except GeometryError as exc:
        raise FrameGeometryError(path, str(exc)) from None
    return Frame(data=data, header=header, path=str(path), geometry=geometry)


def to_uint16(data: np.ndarray) -> np.ndarray:
    """Digitise ADU values as the 16-bit ADC does: round, clip to [0, 65535]."""
    if data.dtype == np.uint16:
        return data
    return np.clip(np.rint(data), 0, 65535).astype(np.uint16)


def _header_value(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return value


def write_frame(
    path: str | os.PathLike,
    data: np.ndarray,
    ccd: int,
    roe: int = 1,
    header: Mapping[str, Any] | None = None,
    atomic: bool = False,
) -> Path:
    """Write an ELVIS-like frame: empty primary HDU + image extension ``ROE<roe>_CCD<ccd>``
    holding ``data`` as uint16 (BITPIX 16, BZERO 32768). ``header`` values go into the
    extension header (keys longer than 8 characters become HIERARCH cards). With ``atomic``
    the file appears under its name only once complete (temp file + rename)."""
    path = Path(path)
    ext = fits.ImageHDU(data=to_uint16(data), name=f"ROE{roe}_CCD{ccd}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HIERARCH notices
        for key, value in (header or {}).items():
            if value is None:
                continue
            ext.header[key if len(key) <= 8 else f"HIERARCH {key}"] = _header_value(value)
    hdul = fits.HDUList([fits.PrimaryHDU(), ext])
    target = path.with_name(path.name + ".part") if atomic else path
    hdul.writeto(target, overwrite=True)
    if atomic:
        os.replace(target, path)
    return path
