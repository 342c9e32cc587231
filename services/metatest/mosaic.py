"""FITS mosaics of master images on the FPA: a primary HDU and one image extension per quadrant
(144 on a complete FPA), ``EXTNAME = '<slice>-<col>.<Q>'``, ``CCDID``, ``BLOCK``, ``CCD``, ``QUAD``,
the quadrant in its FPA orientation: as read in the frame for CCD columns 1-3, rotated by 180 deg
for columns 4-6. Spares are never in a mosaic."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.metatest.layout import CCDS, QUADRANTS, FPALayout
from shared.geometry import Geometry, GeometryError


@dataclass(frozen=True)
class MosaicInput:
    """One CCD's master image file and the extension to take from it."""

    block: str
    ccd: str
    test: str
    path: Path
    extension: str
    #: more masks ORed into this one: ``(path, extension, ((bit in, bit out), ...))`` (empty: bits kept)
    merge: tuple[tuple[Path, str, tuple[tuple[int, int], ...]], ...] = ()
    bits: tuple[tuple[int, int], ...] = ()  # remapping of this image's own mask bits


def remap_bits(mask: np.ndarray, bits: tuple[tuple[int, int], ...]) -> np.ndarray:
    """``mask`` (integer) with each bit ``in`` moved to ``out`` (other bits dropped); unchanged when
    ``bits`` is empty."""
    mask = np.asarray(mask).astype(np.int32)
    if not bits:
        return mask
    out = np.zeros_like(mask)
    for b_in, b_out in bits:
        out |= np.where(mask & b_in, b_out, 0).astype(np.int32)
    return out


def _load(item: MosaicInput) -> np.ndarray:
    """The image of ``item`` with its ``merge`` masks ORed in (a mask of another shape is skipped)."""
    from astropy.io import fits

    masks = bool(item.merge or item.bits)
    with fits.open(str(item.path), memmap=not masks) as hdul:
        data = hdul[item.extension].data
        if not masks:
            return data
        data = remap_bits(data, item.bits)
    for path, ext, bits in item.merge:
        with fits.open(str(path)) as hdul:
            other = hdul[ext].data
            if other is None or other.shape != data.shape:
                continue
            data |= remap_bits(other, bits)
    return data


def frame_quadrant(frame: np.ndarray, q: str) -> np.ndarray:
    """Quadrant ``q`` of a frame as read (E top-left, F top-right, H bottom-left, G bottom-right;
    row 0 at the bottom), a view. Full-size frames use the CCD273 geometry; any other even-sized
    array is split into halves."""
    try:
        rows, cols = Geometry.from_shape(frame.shape).quadrant_block(q)
    except GeometryError:
        if frame.ndim != 2:
            raise
        r, c = frame.shape[0] // 2, frame.shape[1] // 2
        rows = slice(r, 2 * r) if q in ("E", "F") else slice(0, r)
        cols = slice(c, 2 * c) if q in ("F", "G") else slice(0, c)
    return frame[rows, cols]


def fpa_quadrant(frame: np.ndarray, q: str, rotated: bool) -> np.ndarray:
    """Quadrant ``q`` in its FPA orientation (rotated 180 deg when ``rotated``)."""
    quad = frame_quadrant(frame, q)
    return quad[::-1, ::-1] if rotated else quad


def write_mosaic(path: Path, inputs: list[MosaicInput], layout: FPALayout, *, title: str, signature: str,
                 header: dict[str, object] | None = None) -> bool:
    """Write (atomically) the mosaic of ``inputs`` (CCDs off the FPA are skipped). Returns False
    without writing when ``path`` already holds a mosaic of the same ``signature``."""
    from astropy.io import fits

    from services.analyzer.products import atomic_write

    path = Path(path)
    if path.exists():
        try:
            if fits.getval(str(path), "INPUTSIG", 0) == signature:
                return False
        except (OSError, KeyError):
            pass
    primary = fits.PrimaryHDU()
    primary.header["ORIGIN"] = "vison"
    primary.header["PRODUCT"] = title[:68]
    primary.header["INPUTSIG"] = (signature, "id of the analysis results used")
    for key, value in (header or {}).items():
        primary.header[key] = value
    items = []
    for item in sorted(inputs, key=lambda i: (layout.fpa_blocks.index(i.block) if layout.on_fpa(i.block) else 99,
                                              CCDS.index(i.ccd) if i.ccd in CCDS else 9)):
        pos = layout.position(item.block, item.ccd)
        if pos is not None:
            items.append((item, pos))
    primary.header["NQUADS"] = (4 * len(items), "quadrant extensions")

    def write(tmp: Path) -> None:
        # one quadrant in memory at a time: the primary first, then each extension appended
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            primary.writeto(tmp, output_verify="silentfix")
            for item, pos in items:
                data = _load(item)
                for q in QUADRANTS:
                    h = fits.Header()
                    h["EXTNAME"] = f"{pos.ccd_id}.{q}"
                    h["CCDID"] = (pos.ccd_id, "<slice>-<col> on the FPA")
                    h["BLOCK"] = item.block
                    h["CCD"] = item.ccd
                    h["QUAD"] = q
                    h["SLICE"] = pos.slice
                    h["COL"] = pos.col
                    h["ROTATED"] = (pos.rotated, "rotated 180 deg (CCD columns 4-6)")
                    h["TEST"] = item.test[:68]
                    h["SRCEXT"] = item.extension
                    h["SRCFILE"] = item.path.name[:68]
                    if item.merge:
                        h["NMERGED"] = (len(item.merge), "masks ORed into SRCFILE's")
                        for k, (mpath, _, _) in enumerate(item.merge[:9], start=1):
                            h[f"MERGE{k}"] = mpath.name[:68]
                    fits.append(str(tmp), np.ascontiguousarray(fpa_quadrant(data, q, pos.rotated)), header=h,
                                verify=False)
                del data

    atomic_write(path, write)
    return True


__all__ = ["MosaicInput", "fpa_quadrant", "frame_quadrant", "remap_bits", "write_mosaic"]
