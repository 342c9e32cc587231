"""Stacking of frames into master images (pure numerics): the median of ``n`` frames with its
error, computed in row bands so that no more than one band of the stack is in memory."""

from __future__ import annotations

from typing import Callable

import numpy as np


def median_error_factor(n: int) -> float:
    """std of the median of ``n`` Gaussian samples / std of their mean (1 for n <= 2, tends to
    sqrt(pi / 2) = 1.2533); Monte Carlo with a fixed seed (precision ~0.3 %)."""
    if n <= 2:
        return 1.0
    if n > 200:
        return float(np.sqrt(np.pi / 2))
    rng = np.random.default_rng(n)
    x = rng.standard_normal((max(20000, 400000 // n), n))
    return float(np.std(np.median(x, axis=1)) / np.std(x.mean(axis=1)))


def median_stack(stack: np.ndarray, chunk_rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Median and std (ddof=1; 0 for a single frame) along axis 0 of ``stack`` (n, rows, cols),
    in row chunks to bound the temporary memory. float32."""
    n, ny, nx = stack.shape
    med = np.empty((ny, nx), dtype=np.float32)
    std = np.zeros((ny, nx), dtype=np.float32)
    for r0 in range(0, ny, chunk_rows):
        block = stack[:, r0 : r0 + chunk_rows]
        med[r0 : r0 + chunk_rows] = np.median(block, axis=0)
        if n > 1:
            std[r0 : r0 + chunk_rows] = block.std(axis=0, ddof=1)
    return med, std


def median_err_stack(stack: np.ndarray, chunk_rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Median along axis 0 and its error ``f(N) std / sqrt(N)`` (:func:`median_error_factor`; NaN
    for N = 1), float32, in row chunks."""
    n = stack.shape[0]
    med, std = median_stack(stack, chunk_rows)
    if n < 2:
        return med, np.full(med.shape, np.nan, dtype=np.float32)
    return med, (std * np.float32(median_error_factor(n) / np.sqrt(n))).astype(np.float32)


def read_rows(path: str, r0: int, r1: int, hdu: int = -1) -> np.ndarray:
    """Rows ``[r0, r1)`` of a frame file (full width, array orientation) as float32 ADU, reading
    only those bytes (memory-mapped; BZERO / BSCALE applied)."""
    from astropy.io import fits

    with fits.open(path, memmap=True, do_not_scale_image_data=True) as hdul:
        h = hdul[hdu]
        raw = np.asarray(h.section[r0:r1, :], dtype=np.float32)
        bscale, bzero = float(h.header.get("BSCALE", 1.0)), float(h.header.get("BZERO", 0.0))
    if bscale != 1.0:
        raw *= np.float32(bscale)
    if bzero:
        raw += np.float32(bzero)
    return raw


def stack_frames(
    paths: list[str],
    shape: tuple[int, int],
    transform: "Callable[[int, np.ndarray, int, int], np.ndarray] | None" = None,
    chunk_rows: int = 128,
    statistic: str = "median",
) -> tuple[np.ndarray, np.ndarray]:
    """Median (or ``"mean"``) stack of frames read band by band from their files (no frame is
    ever held whole: the memory is ``len(paths) x chunk_rows x width`` float32).

    ``transform(i, band, r0, r1)`` corrects the rows ``[r0, r1)`` of frame ``i`` in place or
    returns a new band (e.g. subtract that frame's offsets, divide by its smooth model).
    Returns ``(stack, error)``: the error of the median is ``f(N) std / sqrt(N)``
    (:func:`median_error_factor`), of the mean ``std / sqrt(N)``; NaN for a single frame."""
    n = len(paths)
    if n == 0:
        raise ValueError("no frames to stack")
    ny, nx = shape
    out = np.empty((ny, nx), dtype=np.float32)
    err = np.full((ny, nx), np.nan, dtype=np.float32)
    factor = (median_error_factor(n) if statistic == "median" else 1.0) / np.sqrt(max(n, 1))
    band = np.empty((n, min(chunk_rows, ny), nx), dtype=np.float32)
    for r0 in range(0, ny, chunk_rows):
        r1 = min(ny, r0 + chunk_rows)
        b = band[:, : r1 - r0]
        for i, p in enumerate(paths):
            rows = read_rows(p, r0, r1)
            if transform is not None:
                rows = transform(i, rows, r0, r1)
            b[i] = rows
        out[r0:r1] = np.median(b, axis=0) if statistic == "median" else b.mean(axis=0)
        if n > 1:
            err[r0:r1] = b.std(axis=0, ddof=1) * np.float32(factor)
    return out, err
