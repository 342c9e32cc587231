"""Quick-look PNG of one exposure for operators: the 3 CCD frames side by side (CCD1, CCD2,
CCD3), binned, histogram-equalised, the verdict in the title bar (green PASS / red FAIL, flags).

Written by the validator under ``<products>/quicklook/<block>/<obsid>.png`` (atomically). The
pixels come from a binned copy the validator's worker made of the frame it had in memory
(``result["thumb"]``) when there is one, else from a strided read of the file (every
``factor``-th row, binned along the row): either way well under 0.3 s per exposure
(``bench/quicklook.py``). :func:`write_safely` never raises: a quick-look that cannot be written
is logged, the validation goes on.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

log = logging.getLogger("vison.validator.quicklook")

#: Binning factor (pixels per side): a 4238 x 4172 frame becomes 529 x 521.
FACTOR = 8
GAP = 8  # pixels between the CCDs
TITLE_H = 22


def quicklook_path(products_root: str | os.PathLike, block: str, obsid: int) -> Path:
    """``<products>/quicklook/<block>/<obsid>.png``."""
    return Path(products_root) / "quicklook" / block / f"{int(obsid)}.png"


def bin_frame(data: np.ndarray, factor: int = FACTOR) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` blocks (float32; trailing rows / columns that do not fill
    a block are dropped). ``data``: [row, col] in ADU."""
    if data.ndim != 2 or min(data.shape) < factor:
        raise ValueError(f"frame of shape {data.shape}: expected a 2-D image of at least {factor} x {factor}")
    r, c = (data.shape[0] // factor) * factor, (data.shape[1] // factor) * factor
    rows = data[:r, :c].reshape(r // factor, factor, c)
    acc = rows[:, 0, :].astype(np.float32)  # strided adds: several times faster than mean(axis=(1, 3))
    for i in range(1, factor):
        acc += rows[:, i, :]
    cols = acc.reshape(r // factor, c // factor, factor)
    out = cols[:, :, 0].copy()
    for i in range(1, factor):
        out += cols[:, :, i]
    out *= np.float32(1.0 / (factor * factor))
    return out


def read_binned(path: str | os.PathLike, factor: int = FACTOR) -> np.ndarray:
    """A binned view of a FITS frame read from disk: every ``factor``-th row (memory-mapped, so
    only those rows are read), each binned by ``factor`` along the row. ADU, float32."""
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=True, lazy_load_hdus=False, do_not_scale_image_data=True) as hdul:
            hdu = next((h for h in reversed(hdul) if h.data is not None and h.data.ndim == 2), None)
            if hdu is None:
                raise ValueError(f"{path}: no 2-D image")
            n = (hdu.data.shape[0] // factor) * factor  # as many rows as bin_frame gives
            rows = np.asarray(hdu.data[:n:factor], dtype=np.float32)
            bzero, bscale = float(hdu.header.get("BZERO", 0.0)), float(hdu.header.get("BSCALE", 1.0))
    c = (rows.shape[1] // factor) * factor
    binned = rows[:, :c].reshape(rows.shape[0], c // factor, factor).mean(axis=2, dtype=np.float32)
    return binned * np.float32(bscale) + np.float32(bzero)


def equalise(image: np.ndarray, levels: int = 254, bins: int = 4096) -> np.ndarray:
    """Histogram equalisation to uint8 levels 0..``levels - 1``; non-finite pixels become 0."""
    finite = np.isfinite(image)
    out = np.zeros(image.shape, dtype=np.uint8)
    values = image[finite]
    if values.size == 0:
        return out
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        out[finite] = levels // 2
        return out
    index = ((values - lo) * ((bins - 1) / (hi - lo))).astype(np.intp)
    cdf = np.cumsum(np.bincount(index, minlength=bins)).astype(np.float64)
    lut = np.clip((cdf - cdf[0]) / max(cdf[-1] - cdf[0], 1.0) * (levels - 1), 0, levels - 1).astype(np.uint8)
    out[finite] = lut[index]
    return out


#: palette: 0..253 greys, 254 the title bar (set per verdict), 255 white text
_GREYS = [v for i in range(254) for v in (round(i * 255 / 253),) * 3]


def compose(thumbs: Mapping[str, np.ndarray], title: str, passed: bool):
    """The PIL image (palette mode): title bar (green PASS / red FAIL) over the equalised CCDs
    side by side, each with its first row at the bottom."""
    from PIL import Image, ImageDraw

    ccds = [thumbs[k] for k in sorted(thumbs)]
    h = max(t.shape[0] for t in ccds)
    w = sum(t.shape[1] for t in ccds) + GAP * (len(ccds) - 1)
    canvas = np.full((h + TITLE_H, w), 40, dtype=np.uint8)
    canvas[:TITLE_H] = 254
    x = 0
    for t in ccds:
        canvas[TITLE_H:TITLE_H + t.shape[0], x:x + t.shape[1]] = equalise(t)[::-1]
        x += t.shape[1] + GAP
    img = Image.fromarray(canvas, mode="P")
    img.putpalette(_GREYS + list((20, 120, 40) if passed else (170, 25, 25)) + [255, 255, 255])
    ImageDraw.Draw(img).text((6, 5), title, fill=255)
    return img


def title_of(ev: Any) -> str:
    verdict = "PASS" if ev.passed else "FAIL"
    flags = ",".join(ev.flag_names) or "no flags"
    return f"ObsID {ev.obsid}  {ev.test}  {ev.block}  {verdict}  ({flags})   CCD1 | CCD2 | CCD3"


def write_quicklook(ev: Any, thumbs: Mapping[str, np.ndarray], products_root: str | os.PathLike) -> Path:
    """Write the PNG of a validated exposure (``ev``: ExposureValidated) atomically; its path."""
    path = quicklook_path(products_root, ev.block, ev.obsid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        compose(thumbs, title_of(ev), ev.passed).save(tmp, format="PNG", compress_level=1)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def thumbnails(ev: Any, results: Mapping[int, Mapping[str, Any]], data_root: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{CCDn: binned frame}`` from the worker results (``thumb``) or, failing that, the files."""
    out = {}
    root = Path(data_root)
    for ref in ev.files:
        ccd = int(ref.ccd or 0)
        thumb = (results.get(ccd) or {}).get("thumb")
        out[f"CCD{ccd}"] = np.asarray(thumb, dtype=np.float32) if thumb is not None else read_binned(root / ref.path)
    return out


def write_safely(ev: Any, results: Mapping[int, Mapping[str, Any]], data_root: str | os.PathLike,
                 products_root: str | os.PathLike) -> Path | None:
    """:func:`write_quicklook` that logs instead of raising (never fails a validation)."""
    try:
        return write_quicklook(ev, thumbnails(ev, results, data_root), products_root)
    except Exception as exc:
        log.warning("ObsID %s: quick-look PNG not written: %s: %s", getattr(ev, "obsid", "?"),
                    exc.__class__.__name__, exc)
        return None
