"""Shared preprocessing and robust statistics for the analyses (pure functions, no I/O).

Everything works on *canonical* quadrant arrays (``shared.geometry.quadrant``): columns 0..50
prescan, 51..2098 image, 2099.. serial overscan; rows 0..2065 image, 2066.. parallel overscan.
Values are ADU. Functions return new arrays (float32 images, float64 statistics) and never
modify their inputs.

Main entry points
- :func:`row_offsets` / :func:`subtract_offset`: bias level from the prescan (per-row median of
  the trimmed prescan, default) or a global median; optional overscan.
- :func:`preprocess_quadrant`: offset subtraction + optional master bias / master flat / mask
  (masked pixels become NaN).
- :func:`clipped_stats`: iterative sigma clipping with the Gaussian correction of the variance
  lost to clipping (``var_corrected``).
- :func:`fit_smooth_2d`: smooth 2-D model of an image (binned medians fitted by a Legendre
  polynomial of total degree ``degree`` or a smoothing spline), evaluated on the full grid.
- :func:`mad_std`, :func:`robust_mean`, :func:`iterative_fit` (scipy.optimize with n-sigma
  outlier rejection).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence, TypeVar

import numpy as np
from pydantic import BaseModel

# The numerics moved to services.analyzer.science (stats, preprocess, smooth, fitting); re-exported
# here for the analysis modules not yet ported to services.analyzer.families (to be removed).
from services.analyzer.science.fitting import FitResult, iterative_fit, weighted_polyfit  # noqa: F401
from services.analyzer.science.preprocess import (  # noqa: F401
    IMG_COLS, OffsetMethod, OffsetRegion, image_area, preprocess_quadrant, row_offsets, subtract_offset,
)
from services.analyzer.science.smooth import BinnedImage, Smooth2DModel, bin_image, fit_smooth_2d  # noqa: F401
from services.analyzer.science.stats import (  # noqa: F401
    ClippedStats, clip_mask, clip_variance_correction, clipped_stats, group_by, mad_std, robust_mean,
    truncated_variance_fraction,
)

P = TypeVar("P", bound=BaseModel)



# --------------------------------------------------------------------------------------------
# Frame input of the pure analyses
# --------------------------------------------------------------------------------------------


@dataclass
class FrameInput:
    """One CCD frame as the pure analyses (flat, ptc, nl, bf) take it.

    ``quads``: ``{quadrant: canonical float32 array}`` (full quadrant, prescan and overscan
    included) or a zero-argument callable returning it (lazy: the analysis loads a frame only
    when it needs it and drops it after). ``time``: seconds (any origin) or a datetime.
    ``meta``: other exposure-log values (``vstart``, ``vend``, ``role`` = ``"stability"`` /
    ``"background"`` for NL, ...)."""

    quads: Mapping[str, np.ndarray] | Callable[[], Mapping[str, np.ndarray]]
    exptime: float
    obsid: int = 0
    ccd: str = "CCD1"
    wave: float | None = None
    time: float | datetime | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Mapping[str, np.ndarray]:
        """The canonical quadrants (calls the loader when ``quads`` is lazy)."""
        return self.quads() if callable(self.quads) else self.quads

    @property
    def t_seconds(self) -> float:
        """``time`` as float seconds (POSIX for a datetime); NaN when unknown."""
        if self.time is None:
            return float("nan")
        if isinstance(self.time, datetime):
            return self.time.timestamp()
        return float(self.time)


def params_of(model: type[P], params: P | Mapping[str, Any] | None) -> P:
    """An analysis' parameters as its pydantic ``model``: an instance as is, else the model built
    from the keys of ``params`` it knows (others, e.g. campaign parameters, are ignored)."""
    if isinstance(params, model):
        return params
    return model(**{k: v for k, v in (params or {}).items() if k in model.model_fields})


def ccd_label(ccd: int | str) -> str:
    """``1 -> "CCD1"``; ``"ccd2" -> "CCD2"``."""
    if isinstance(ccd, str) and ccd.upper().startswith("CCD"):
        return ccd.upper()
    return f"CCD{int(ccd)}"


def as_frames(frames: Iterable[Any]) -> list[FrameInput]:
    """Normalise frames given as :class:`FrameInput`, as dicts (``{"quads": {...}, "exptime":
    ..., ...}`` or quadrant keys E/F/G/H at top level beside the metadata) or as objects with
    the same attributes."""
    out: list[FrameInput] = []
    for f in frames:
        if isinstance(f, FrameInput):
            out.append(f)
            continue
        get = f.get if isinstance(f, Mapping) else (lambda k, d=None, _f=f: getattr(_f, k, d))
        quads = get("quads")
        if quads is None and isinstance(f, Mapping):
            quads = {q: f[q] for q in ("E", "F", "G", "H") if q in f}
        meta = dict(get("meta") or {})
        out.append(
            FrameInput(
                quads=quads,
                exptime=float(get("exptime", 0.0) or 0.0),
                obsid=int(get("obsid", 0) or 0),
                ccd=ccd_label(get("ccd", 1) or 1),
                wave=get("wave"),
                time=get("time"),
                meta=meta,
            )
        )
    return out


def frame_inputs(data: Any, frames: Iterable[Any] | None = None) -> list[FrameInput]:
    """Lazy :class:`FrameInput` s from an analyzer ``TestData`` (``services.analyzer.model``):
    pixels through ``data.load_quadrants(meta)`` when an analysis asks for them; exposure-log
    values (``wave``, ``comments``, ``vstart`` ...) in ``meta``; ``time`` = the frame date.
    Uses ``data.frame_inputs()`` when the TestData provides it."""
    if frames is None and callable(getattr(data, "frame_inputs", None)):
        return list(data.frame_inputs())
    out = []
    for m in frames if frames is not None else data.frames:
        values = dict(getattr(m, "values", {}) or {})
        wave = values.get("wave")
        try:
            wave = float(wave) if wave not in (None, "") else None
        except (TypeError, ValueError):
            wave = None
        out.append(FrameInput(quads=(lambda m=m: data.load_quadrants(m)), exptime=float(m.exptime), obsid=int(m.obsid),
                              ccd=ccd_label(m.ccd), wave=wave, time=getattr(m, "date", None), meta=values))
    return out


__all__ = [
    "IMG_COLS",
    "FrameInput",
    "as_frames",
    "frame_inputs",
    "ccd_label",
    "group_by",
    "BinnedImage",
    "ClippedStats",
    "FitResult",
    "Smooth2DModel",
    "bin_image",
    "clip_mask",
    "clip_variance_correction",
    "clipped_stats",
    "fit_smooth_2d",
    "image_area",
    "iterative_fit",
    "mad_std",
    "preprocess_quadrant",
    "robust_mean",
    "row_offsets",
    "subtract_offset",
    "truncated_variance_fraction",
    "weighted_polyfit",
]
