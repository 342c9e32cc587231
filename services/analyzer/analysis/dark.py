"""DARK01: master dark, dark current per quadrant, hot pixels and the defect mask.

- Per frame and quadrant: reference offset = sigma-clipped mean of the trimmed prescan, serial
  overscan and parallel overscan pixels together (virtual pixels: no dark signal); dark signal =
  clipped mean of the trimmed image area minus that offset (ADU). When a BIAS01/02 result of the
  block is known, its image-minus-reference level (bias structure) is subtracted as well.
  Dark current = dark signal / exptime (ADU/s), x gain (e-/s) when a gain is known.
- Master dark per CCD: median stack of the offset-subtracted frames (ADU, raw-frame orientation;
  extensions STACK, ERR = 1.2533 std / sqrt(N), or the image noise when N = 1), MASK.
- Defect mask (:func:`defect_mask`): master dark image area minus its smooth 2-D model
  (background); pixels above ``hi`` (50 ADU) are hot, below ``lo`` (-1000 ADU) cold; a column
  with >= 200 bad pixels is masked whole. Bits: 1 hot, 2 cold, 4 whole-column rule.
  ``n_hot`` counts the hot pixels outside the columns masked whole (``n_hot_all``: all of them).

Pure: frames through ``TestData.load``, products to a sink.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from pydantic import BaseModel, Field

from services.analyzer.analysis.common import clipped_stats, fit_smooth_2d, params_of
from services.analyzer.model import (
    AnalysisOutput,
    FigureProduct,
    FrameMeta,
    ImageProduct,
    ProductSink,
    TableProduct,
    TestData,
)
from shared.flags import Flag
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, QUADRANTS, Geometry, quadrant, region, standard_region

TESTS = ("DARK01",)

DEFECT_HOT = 1
DEFECT_COLD = 2
DEFECT_COLUMN = 4
IMG_COLS = slice(PRESCAN_COLS, PRESCAN_COLS + IMAGE_COLS)
#: clipping bounds iterated on every 17th pixel (prime: no column aliasing) of large regions, statistics on all pixels
SUBSAMPLE = 17


class DarkParams(BaseModel):
    """Analysis parameters of DARK01 (defaults are the campaign's)."""

    nsigma: float = Field(4.0, description="sigma-clipping threshold of levels")
    degree: int = Field(5, description="degree of the smooth background model of the master dark")
    nbins: tuple[int, int] = Field((32, 32), description="bins (rows, cols) of the background fit")
    defect_lo: float = Field(-1000.0, description="background-subtracted level (ADU) below which a pixel is a defect")
    defect_hi: float = Field(50.0, description="background-subtracted level (ADU) above which a pixel is hot")
    column_rule: int = Field(200, description="bad pixels in a column from which the whole column is masked")
    fluence_limits: tuple[float, float] = Field((-2.0, 5.0), description="dark signal (ADU) outside which BGD_OOL is flagged")
    use_bias: bool = Field(True, description="subtract the bias structure (img - reference) of a BIAS result when known")
    stack_chunk_rows: int = 256


# ----------------------------------------------------------------------------- levels


def reference_pixels(quad: np.ndarray, vstart: int = 0, vend: int = 2086) -> np.ndarray:
    """Virtual pixels of a canonical quadrant (no photo-charge): trimmed prescan and serial
    overscan over the image rows, and the parallel overscan rows of the trimmed image columns."""
    parts = [standard_region(quad, "pre", vstart, vend).ravel(), standard_region(quad, "ove", vstart, vend).ravel()]
    if quad.shape[0] > IMAGE_ROWS and vend > IMAGE_ROWS:
        parts.append(region(quad, "povr", (5, 5), row_border=2).ravel())
    return np.concatenate(parts)


def reference_offset(quad: np.ndarray, nsigma: float = 4.0, vstart: int = 0, vend: int = 2086) -> float:
    """Offset (ADU): clipped mean of the virtual pixels (:func:`reference_pixels`)."""
    return clipped_stats(reference_pixels(quad, vstart, vend), nsigma, subsample=SUBSAMPLE).mean


def image_level(quad: np.ndarray, offset: float, nsigma: float = 4.0, vstart: int = 0, vend: int = 2086) -> tuple[float, float]:
    """(clipped mean - offset, clipped std) of the trimmed image area, ADU."""
    s = clipped_stats(standard_region(quad, "img", vstart, vend), nsigma, subsample=SUBSAMPLE)
    return s.mean - offset, s.std_corrected


# ----------------------------------------------------------------------------- defects


@dataclass
class DefectMask:
    """Defects of one quadrant's image area (canonical, 2066 x 2048 or fewer rows)."""

    bits: np.ndarray  # uint8, image-area shape
    n_hot: int
    n_cold: int
    bad_columns: list[int]  # canonical quadrant column indices (prescan included)
    background: np.ndarray = field(repr=False, default=None)

    @property
    def n_masked(self) -> int:
        return int(np.count_nonzero(self.bits))

    @property
    def n_hot_isolated(self) -> int:
        """Hot pixels outside the columns masked whole."""
        return int(np.count_nonzero(((self.bits & DEFECT_HOT) != 0) & ((self.bits & DEFECT_COLUMN) == 0)))


def column_rule(bad: np.ndarray, min_bad: int = 200) -> np.ndarray:
    """Indices (image-area columns) of columns holding >= ``min_bad`` bad pixels."""
    return np.flatnonzero(np.count_nonzero(bad, axis=0) >= min_bad)


def defect_mask(
    image: np.ndarray,
    lo: float = -1000.0,
    hi: float = 50.0,
    min_bad: int = 200,
    degree: int = 5,
    nbins: tuple[int, int] = (32, 32),
) -> DefectMask:
    """Defect mask of an image area (ADU, canonical): background-model-subtracted, hot above
    ``hi``, cold below ``lo``; whole column masked when it holds >= ``min_bad`` bad pixels."""
    img = np.asarray(image, dtype=np.float32)
    background = fit_smooth_2d(img, degree=degree, nbins=nbins).model
    resid = img - background
    hot = resid > hi
    cold = resid < lo
    bits = np.zeros(img.shape, dtype=np.uint8)
    bits[hot] |= DEFECT_HOT
    bits[cold] |= DEFECT_COLD
    cols = column_rule(hot | cold, min_bad)
    bits[:, cols] |= DEFECT_COLUMN
    return DefectMask(bits, int(hot.sum()), int(cold.sum()), [int(c) + PRESCAN_COLS for c in cols], background)


def image_rows(vstart: int, vend: int) -> slice:
    return slice(max(vstart, 0), min(IMAGE_ROWS, vend))


# ----------------------------------------------------------------------------- stacking


def median_err_stack(stack: np.ndarray, chunk_rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Median along axis 0 and its error 1.2533 std / sqrt(N) (NaN for N = 1), float32, in row
    chunks to bound the temporary memory."""
    n, ny, nx = stack.shape
    med = np.empty((ny, nx), dtype=np.float32)
    err = np.full((ny, nx), np.nan, dtype=np.float32)
    for r0 in range(0, ny, chunk_rows):
        block = stack[:, r0 : r0 + chunk_rows]
        med[r0 : r0 + chunk_rows] = np.median(block, axis=0)
        if n > 1:
            err[r0 : r0 + chunk_rows] = 1.2533 * block.std(axis=0, ddof=1) / np.sqrt(n)
    return med, err


@dataclass
class StackedCCD:
    """Offset-subtracted median stack of a CCD's frames and the per-frame quadrant levels."""

    ccd: str
    geometry: Geometry
    master: np.ndarray
    err: np.ndarray
    rows: list[dict[str, Any]]
    vstart: int = 0
    vend: int = 2086


def stack_ccd(
    ccd: str, frames: Iterable[tuple[FrameMeta, np.ndarray]], n_frames: int, nsigma: float = 4.0, chunk_rows: int = 256
) -> StackedCCD:
    """Per frame and quadrant: reference offset and image level (ADU); then the median stack of
    the frames minus their per-quadrant offsets (raw-frame orientation). Frames are streamed."""
    stack = None
    geometry = None
    rows: list[dict[str, Any]] = []
    vstart, vend = 0, 2086
    n = 0
    for i, (meta, data) in enumerate(frames):
        if i >= n_frames:
            raise ValueError(f"{ccd}: more frames than announced ({n_frames})")
        g = Geometry.from_shape(data.shape)
        if geometry is None:
            geometry, vstart, vend = g, meta.vstart, meta.vend
            stack = np.empty((n_frames, *data.shape), dtype=np.float32)
        elif g != geometry:
            raise ValueError(f"{ccd} ObsID {meta.obsid}: frame shape {data.shape} differs from the first frame's {geometry.shape}")
        for q in QUADRANTS:
            quad = quadrant(data, q, geometry)
            off = reference_offset(quad, nsigma, vstart, vend)
            level, noise = image_level(quad, off, nsigma, vstart, vend)
            rows.append({"obsid": meta.obsid, "ccd": ccd, "quadrant": q, "exptime": meta.exptime,
                         "offset_ref": off, "signal_adu": level, "noise_img_adu": noise})
            quadrant(stack[i], q, geometry)[...] = quad - np.float32(off)
        n = i + 1
        del data
    if stack is None:
        raise ValueError(f"{ccd}: no frames")
    master, err = median_err_stack(stack[:n], chunk_rows)
    del stack
    if n == 1:  # no spread to measure: the image noise of the single frame, per quadrant
        for q in QUADRANTS:
            noise = np.mean([r["noise_img_adu"] for r in rows if r["quadrant"] == q])
            quadrant(err, q, geometry)[...] = np.float32(noise)
    return StackedCCD(ccd, geometry, master, err, rows, vstart, vend)


def mask_ccd(st: StackedCCD, lo: float, hi: float, min_bad: int, degree: int, nbins: tuple[int, int]) -> tuple[np.ndarray, dict[str, DefectMask]]:
    """Full-frame defect mask (uint8, raw-frame orientation) of a stacked CCD and the per
    quadrant :class:`DefectMask`."""
    mask = np.zeros(st.master.shape, dtype=np.uint8)
    out = {}
    rows = image_rows(st.vstart, st.vend)
    for q in QUADRANTS:
        img = quadrant(st.master, q, st.geometry)[rows, IMG_COLS]
        dm = defect_mask(img, lo, hi, min_bad, degree, nbins)
        quadrant(mask, q, st.geometry)[rows, IMG_COLS] = dm.bits
        out[q] = dm
    return mask, out


# ----------------------------------------------------------------------------- test level


def bias_structure(calib: dict[str, Any], ccd: str, q: str) -> float | None:
    """Image-minus-reference level (ADU) of bias frames from a BIAS01/02 result
    (``calib["bias"]``: its results.json ``results``): ``offset_img - offset_ref``, with
    ``offset_ref`` measured on the same virtual pixels as :func:`reference_offset`."""
    res = ((calib.get("bias") or {}).get(ccd) or {}).get(q)
    try:
        return float(res["offset_img"]) - float(res["offset_ref"])
    except (KeyError, TypeError):
        return None


def run_test(data: TestData, sink: ProductSink) -> AnalysisOutput:
    """DARK01 analysis of a whole test: master darks, masks and tables to ``sink``, results out."""
    params = params_of(DarkParams, data.params)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    frame_rows: list[dict[str, Any]] = []
    flags = Flag(0)
    thumbs: dict[str, np.ndarray] = {}
    for ccd in data.ccds():
        metas = data.frames_of(ccd)
        bad_t = [m.obsid for m in metas if not m.exptime or m.exptime <= 0]
        if bad_t:
            raise ValueError(f"{ccd}: dark frames without a positive exptime (ObsIDs {bad_t})")
        st = stack_ccd(ccd, ((m, data.load(m)) for m in metas), len(metas), params.nsigma, params.stack_chunk_rows)
        mask, dms = mask_ccd(st, params.defect_lo, params.defect_hi, params.column_rule, params.degree, params.nbins)
        results[ccd] = {}
        for q in QUADRANTS:
            sel = [r for r in st.rows if r["quadrant"] == q]
            structure = bias_structure(data.calib, ccd, q) if params.use_bias else None
            for r in sel:
                r["bias_structure_adu"] = structure
                r["dark_current_adu_s"] = (r["signal_adu"] - (structure or 0.0)) / r["exptime"]
            signal = float(np.mean([r["signal_adu"] for r in sel]))
            rate = float(np.mean([r["dark_current_adu_s"] for r in sel]))
            gain = data.gain(ccd, q)
            dm = dms[q]
            lo, hi = params.fluence_limits
            if not lo <= signal <= hi:
                flags |= Flag.BGD_OOL
            results[ccd][q] = {
                "n_frames": len(sel),
                "exptime": float(np.mean([r["exptime"] for r in sel])),
                "dark_signal_adu": signal,
                "dark_current_adu_s": rate,
                "dark_current_e_s": rate * gain if gain else None,
                "gain": gain,
                "bias_structure_adu": structure,
                "offset_ref": float(np.mean([r["offset_ref"] for r in sel])),
                "n_hot": dm.n_hot_isolated,
                "n_hot_all": dm.n_hot,
                "n_cold": dm.n_cold,
                "n_bad_columns": len(dm.bad_columns),
                "bad_columns": dm.bad_columns,
                "n_masked": dm.n_masked,
            }
        frame_rows += st.rows
        sink.add(ImageProduct(
            name=f"master_dark_{ccd}",
            ccd=ccd,
            extensions={"STACK": st.master, "ERR": st.err, "MASK": mask},
            header={"BUNIT": "ADU", "NCOMBINE": len(metas), "EXPTIME": float(np.mean([m.exptime for m in metas])),
                    "DEFLO": params.defect_lo, "DEFHI": params.defect_hi, "COLRULE": params.column_rule,
                    "MASKBIT1": "hot (> DEFHI)", "MASKBIT2": "cold (< DEFLO)", "MASKBIT4": "whole-column rule"},
            description="master dark: median stack of offset-subtracted frames; ERR; defect MASK",
        ))
        sink.add(_defects_table(ccd, st, dms))
        thumbs[ccd] = _thumb(st.master)
        del st, mask
    if not results:
        raise ValueError(f"{data.label}: no frames to analyse")
    sink.add(TableProduct(
        name="dark_frames",
        columns={k: [r[k] if r[k] is not None else np.nan for r in frame_rows] for k in frame_rows[0]},
        units={"signal_adu": "ADU", "offset_ref": "ADU", "dark_current_adu_s": "ADU/s", "exptime": "s"},
        description="dark signal per frame, CCD and quadrant",
    ))
    sink.add(FigureProduct("master_dark", lambda fig: _draw_masters(fig, thumbs), size=(14, 5), description="master dark per CCD"))
    sink.add(FigureProduct("dark_current", lambda fig: _draw_rates(fig, results), description="dark current per quadrant"))
    summary = [f"{'CCD':<5}{'Q':<2} {'signal ADU':>10} {'ADU/s':>10} {'e-/s':>9} {'N hot':>6} {'bad cols':>8} {'masked':>8}"]
    for ccd, quads in results.items():
        for q, v in quads.items():
            e = f"{v['dark_current_e_s']:9.5f}" if v["dark_current_e_s"] is not None else f"{'-':>9}"
            summary.append(f"{ccd:<5}{q:<2} {v['dark_signal_adu']:10.3f} {v['dark_current_adu_s']:10.6f} {e} "
                           f"{v['n_hot']:6d} {v['n_bad_columns']:8d} {v['n_masked']:8d}")
    return AnalysisOutput(results=results, flags=int(flags), frames=frame_rows,
                          parameters=params.model_dump(mode="json"), summary=summary)


def _defects_table(ccd: str, st: StackedCCD, dms: dict[str, DefectMask]) -> TableProduct:
    """Hot / cold pixel list of a CCD (canonical quadrant coordinates, prescan included)."""
    cols: dict[str, list] = {"quadrant": [], "row": [], "col": [], "level_adu": [], "bits": []}
    rows = image_rows(st.vstart, st.vend)
    for q, dm in dms.items():
        pix = np.argwhere(dm.bits & (DEFECT_HOT | DEFECT_COLD))
        img = quadrant(st.master, q, st.geometry)[rows, IMG_COLS]
        for r, c in pix[:100000]:
            cols["quadrant"].append(q)
            cols["row"].append(int(r) + rows.start)
            cols["col"].append(int(c) + PRESCAN_COLS)
            cols["level_adu"].append(float(img[r, c] - dm.background[r, c]))
            cols["bits"].append(int(dm.bits[r, c]))
    return TableProduct(name=f"dark_defects_{ccd}", ccd=ccd, columns=cols, units={"level_adu": "ADU"},
                        description="hot and cold pixels (background-subtracted master dark), canonical coordinates")


def _thumb(image: np.ndarray, factor: int = 8) -> np.ndarray:
    ny, nx = (s // factor * factor for s in image.shape)
    return image[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor).max(axis=(1, 3)).astype(np.float32)


def _draw_masters(fig: Any, thumbs: dict[str, np.ndarray]) -> None:
    axes = np.atleast_1d(fig.subplots(1, max(len(thumbs), 1)))
    for ax, (ccd, img) in zip(axes, thumbs.items()):
        lo, hi = np.percentile(img, [1, 99.5])
        im = ax.imshow(img, origin="lower", cmap="magma", vmin=lo, vmax=max(hi, lo + 1))
        ax.set_title(f"{ccd} master dark (ADU, 8x8 max)")
        fig.colorbar(im, ax=ax, shrink=0.8)


def _draw_rates(fig: Any, results: dict[str, dict[str, dict[str, Any]]]) -> None:
    ax = fig.subplots(1, 1)
    labels, values = [], []
    for ccd, quads in results.items():
        for q, v in quads.items():
            labels.append(f"{ccd}.{q}")
            values.append(v["dark_current_adu_s"])
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)), labels, rotation=90)
    ax.set_ylabel("dark current (ADU/s)")


#: Parameters model of this plug-in (the runner records the resolved values as provenance).
PARAMS = DarkParams
