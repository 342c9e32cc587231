"""COSMETICS00: dark and flat defect masks, merged mask, bad columns, defect counts.

The test has bias frames (exptime 0) and flats (800 nm, 50 % of full well). Per CCD:
- dark mask: :func:`services.analyzer.analysis.dark.defect_mask` of the median stack of the
  offset-subtracted bias frames (background-subtracted, [-1000, 50] ADU), merged with the hot /
  cold pixels of the block's DARK01 defect mask when DARK01 was analysed before (bias frames
  show few hot pixels: they have no exposure time);
- flat mask: master flat (median stack of the offset-subtracted flats) divided by its smooth
  2-D model; pixels outside [0.5, 1.5] are defects;
- merged mask = dark | flat, then the whole-column rule (>= 200 bad pixels in a column).
Mask bits: 1 hot, 2 cold (dark mask), 8 flat low, 16 flat high, 4 whole column.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from services.analyzer.analysis.common import fit_smooth_2d, params_of
from services.analyzer.analysis.dark import (
    DEFECT_COLD,
    DEFECT_COLUMN,
    DEFECT_HOT,
    IMG_COLS,
    column_rule,
    image_rows,
    mask_ccd,
    stack_ccd,
)
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
from shared.geometry import PRESCAN_COLS, QUADRANTS, quadrant

TESTS = ("COSMETICS00",)

FLAT_LOW = 8
FLAT_HIGH = 16


class CosmeticsParams(BaseModel):
    """Analysis parameters of COSMETICS00 (defaults are the campaign's)."""

    nsigma: float = 4.0
    degree: int = 5
    nbins: tuple[int, int] = (32, 32)
    defect_lo: float = Field(-1000.0, description="dark mask: background-subtracted level (ADU) below which a pixel is bad")
    defect_hi: float = Field(50.0, description="dark mask: background-subtracted level (ADU) above which a pixel is bad")
    flat_lo: float = Field(0.5, description="flat mask: flat / model below which a pixel is bad")
    flat_hi: float = Field(1.5, description="flat mask: flat / model above which a pixel is bad")
    column_rule: int = Field(200, description="bad pixels in a column from which the whole column is masked")
    flat_min_signal: float = Field(1000.0, description="image level (ADU) above which a frame counts as a flat when exptime is not known")
    stack_chunk_rows: int = 256


def flat_defects(image: np.ndarray, lo: float = 0.5, hi: float = 1.5, degree: int = 5, nbins: tuple[int, int] = (32, 32)) -> tuple[np.ndarray, np.ndarray]:
    """(mask bits FLAT_LOW / FLAT_HIGH, normalised flat = image / smooth model) of an
    offset-subtracted master-flat image area (canonical)."""
    img = np.asarray(image, dtype=np.float32)
    model = fit_smooth_2d(img, degree=degree, nbins=nbins).model
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(model > 0, img / model, np.nan).astype(np.float32)
    bits = np.zeros(img.shape, dtype=np.uint8)
    bits[~(ratio >= lo)] |= FLAT_LOW  # NaN counts as low (no response)
    bits[ratio > hi] |= FLAT_HIGH
    return bits, ratio


def split_frames(metas: list[FrameMeta]) -> tuple[list[FrameMeta], list[FrameMeta]]:
    """(bias frames, flat frames) by exposure time."""
    return [m for m in metas if not m.exptime], [m for m in metas if m.exptime and m.exptime > 0]


def run_test(data: TestData, sink: ProductSink) -> AnalysisOutput:
    """COSMETICS00 analysis: defect masks per CCD to ``sink``, defect counts out."""
    p = params_of(CosmeticsParams, data.params)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    frame_rows: list[dict[str, Any]] = []
    flags = Flag(0)
    thumbs: dict[str, np.ndarray] = {}
    bad_cols_table: dict[str, list] = {"ccd": [], "quadrant": [], "col": [], "n_bad": []}
    for ccd in data.ccds():
        biases, flats = split_frames(data.frames_of(ccd))
        if not biases or not flats:
            raise ValueError(f"{ccd}: COSMETICS00 needs bias frames (exptime 0) and flats (exptime > 0); "
                             f"got {len(biases)} bias and {len(flats)} flat frames")
        st_b = stack_ccd(ccd, ((m, data.load(m)) for m in biases), len(biases), p.nsigma, p.stack_chunk_rows)
        dark_mask, dms = mask_ccd(st_b, p.defect_lo, p.defect_hi, p.column_rule, p.degree, p.nbins)
        for r in st_b.rows:
            r["kind"] = "bias"
        mbias = st_b.master
        del st_b
        st_f = stack_ccd(ccd, ((m, data.load(m)) for m in flats), len(flats), p.nsigma, p.stack_chunk_rows)
        for r in st_f.rows:
            r["kind"] = "flat"
            if r["signal_adu"] < p.flat_min_signal:
                flags |= Flag.FLUENCE_OOL
        frame_rows += [*(r for r in st_f.rows)]
        rows = image_rows(st_f.vstart, st_f.vend)
        dark01 = data.calib_image("dark_mask", ccd)  # the block's DARK01 defect mask, when analysed
        if dark01 is not None and dark01.shape != st_f.master.shape:
            dark01 = None
        flat_mask = np.zeros(st_f.master.shape, dtype=np.uint8)
        merged = np.zeros(st_f.master.shape, dtype=np.uint8)
        nflat = np.zeros(st_f.master.shape, dtype=np.float32)
        results[ccd] = {}
        for q in QUADRANTS:
            fbits, ratio = flat_defects(quadrant(st_f.master, q, st_f.geometry)[rows, IMG_COLS], p.flat_lo, p.flat_hi, p.degree, p.nbins)
            quadrant(flat_mask, q, st_f.geometry)[rows, IMG_COLS] = fbits
            quadrant(nflat, q, st_f.geometry)[rows, IMG_COLS] = np.nan_to_num(ratio, nan=0.0)
            dbits = dms[q].bits & (DEFECT_HOT | DEFECT_COLD)
            if dark01 is not None:
                dbits = dbits | (quadrant(dark01, q, st_f.geometry)[rows, IMG_COLS] & (DEFECT_HOT | DEFECT_COLD))
            mbits = dbits | fbits
            cols = column_rule(mbits != 0, p.column_rule)
            mbits[:, cols] |= DEFECT_COLUMN
            quadrant(merged, q, st_f.geometry)[rows, IMG_COLS] = mbits
            counts = np.count_nonzero(mbits != 0, axis=0)
            for c in cols:
                bad_cols_table["ccd"].append(ccd)
                bad_cols_table["quadrant"].append(q)
                bad_cols_table["col"].append(int(c) + PRESCAN_COLS)
                bad_cols_table["n_bad"].append(int(counts[c]))
            flat_level = float(np.mean([r["signal_adu"] for r in st_f.rows if r["quadrant"] == q]))
            results[ccd][q] = {
                "dark01_mask_merged": dark01 is not None,
                "n_bias": len(biases),
                "n_flats": len(flats),
                "flat_level_adu": flat_level,
                "n_dark_defects": int(np.count_nonzero(dbits)),
                "n_hot": int(np.count_nonzero(dbits & DEFECT_HOT)),
                "n_flat_defects": int(np.count_nonzero(fbits)),
                "n_flat_low": int(np.count_nonzero(fbits & FLAT_LOW)),
                "n_flat_high": int(np.count_nonzero(fbits & FLAT_HIGH)),
                "n_bad_columns": len(cols),
                "bad_columns": [int(c) + PRESCAN_COLS for c in cols],
                "n_defects": int(np.count_nonzero(mbits)),
            }
        sink.add(ImageProduct(
            name=f"cosmetics_masks_{ccd}",
            ccd=ccd,
            extensions={"MASK": merged, "DARK_MASK": dark_mask, "FLAT_MASK": flat_mask, "FLAT_NORM": nflat, "MBIAS": mbias},
            header={"NBIAS": len(biases), "NFLAT": len(flats), "DEFLO": p.defect_lo, "DEFHI": p.defect_hi,
                    "FLATLO": p.flat_lo, "FLATHI": p.flat_hi, "COLRULE": p.column_rule,
                    "MASKBIT1": "hot (dark mask)", "MASKBIT2": "cold (dark mask)", "MASKBIT4": "whole-column rule",
                    "MASKBIT8": "flat low", "MASKBI16": "flat high"},
            description="merged defect MASK, DARK_MASK, FLAT_MASK, normalised master flat, master bias",
        ))
        thumbs[ccd] = _thumb(merged)
        del st_f, flat_mask, merged, nflat, dark_mask, mbias
    if not results:
        raise ValueError(f"{data.label}: no frames to analyse")
    sink.add(TableProduct(name="cosmetics_bad_columns", columns=bad_cols_table,
                          description="columns masked by the whole-column rule (canonical quadrant column, prescan included)"))
    sink.add(TableProduct(name="cosmetics_flats",
                          columns={k: [r[k] for r in frame_rows] for k in ("obsid", "ccd", "quadrant", "exptime", "signal_adu")},
                          units={"signal_adu": "ADU", "exptime": "s"}, description="flat levels per frame"))
    sink.add(FigureProduct("cosmetics_masks", lambda fig: _draw_masks(fig, thumbs), size=(14, 5), description="merged defect masks"))
    summary = [f"{'CCD':<5}{'Q':<2} {'dark def':>9} {'flat def':>9} {'bad cols':>8} {'defects':>9}"]
    for ccd, quads in results.items():
        for q, v in quads.items():
            summary.append(f"{ccd:<5}{q:<2} {v['n_dark_defects']:9d} {v['n_flat_defects']:9d} {v['n_bad_columns']:8d} {v['n_defects']:9d}")
    return AnalysisOutput(results=results, flags=int(flags), frames=frame_rows,
                          parameters=p.model_dump(mode="json"), summary=summary)


def _thumb(mask: np.ndarray, factor: int = 8) -> np.ndarray:
    ny, nx = (s // factor * factor for s in mask.shape)
    return (mask[:ny, :nx] != 0).reshape(ny // factor, factor, nx // factor, factor).any(axis=(1, 3))


def _draw_masks(fig: Any, thumbs: dict[str, np.ndarray]) -> None:
    axes = np.atleast_1d(fig.subplots(1, max(len(thumbs), 1)))
    for ax, (ccd, img) in zip(axes, thumbs.items()):
        ax.imshow(img, origin="lower", cmap="gray_r", interpolation="nearest")
        ax.set_title(f"{ccd} defects (8x8 any)")


#: Parameters model of this plug-in (the runner records the resolved values as provenance).
PARAMS = CosmeticsParams
