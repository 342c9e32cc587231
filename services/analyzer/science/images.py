"""Small image helpers for figures (pure)."""

from __future__ import annotations

import numpy as np


def thumbnail(image: np.ndarray, factor: int = 8) -> np.ndarray:
    """Block mean of ``factor x factor`` pixels (edges that do not fill a block dropped), float32;
    NaN-aware when the image has NaN (masked pixels)."""
    img = np.asarray(image, dtype=np.float32)
    ny, nx = (s // factor * factor for s in img.shape)
    blocks = img[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor)
    if np.isfinite(blocks).all():
        return blocks.mean(axis=(1, 3)).astype(np.float32)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(blocks, axis=(1, 3)).astype(np.float32)
