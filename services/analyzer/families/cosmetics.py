"""COSMETICS00 (engine v2): dark and flat defect masks, merged mask, bad columns, defect counts.

The test has bias frames (exptime 0) and flats (800 nm, 50 % of full well).

**Extract** (per exposure, CCD and quadrant): reference offset (clipped mean of the virtual
pixels), image level above it (ADU), the frame kind (bias when exptime is 0, else flat).

**Solve** (per CCD):
- dark mask: :func:`~services.analyzer.science.defects.defect_mask` of the median stack of the
  offset-subtracted bias frames (background-subtracted, [-1000, 50] ADU), merged with the hot /
  cold pixels of the block's DARK01 mask (``dark_mask`` calibration) when it is known (bias
  frames show few hot pixels: they have no exposure time);
- flat mask: master flat (median stack of the offset-subtracted flats) divided by its smooth
  2-D model; pixels outside [0.5, 1.5] are defects;
- merged mask = dark | flat, then the whole-column rule (>= 200 bad pixels in a column).
Mask bits: 1 hot, 2 cold (dark mask), 8 flat low, 16 flat high, 4 whole column.

Provides ``defect_mask``: files ``{CCD: cosmetics_masks_<CCD>.fits}`` (MASK extension).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from services.analyzer.family import (
    DARK_MASK,
    DEFECT_MASK,
    Calibrations,
    ExposureFrames,
    Extraction,
    Family,
    Need,
    TestRun,
    exposure_unit,
)
from services.analyzer.model import AnalysisOutput, FigureProduct, ImageProduct, ProductSink, TableProduct
from services.analyzer.science.defects import DEFECT_COLD, DEFECT_COLUMN, DEFECT_HOT, column_rule, defect_mask
from services.analyzer.science.preprocess import reference_pixels
from services.analyzer.science.smooth import fit_poly_2d
from services.analyzer.science.stacking import frame_row_map, stack_frames, subtract_row_map
from services.analyzer.science.stats import fast_clipped_stats
from shared.flags import Flag
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, QUADRANTS, Geometry, quadrant, standard_region

TESTS = ("COSMETICS00",)
VERSION = "2"
IMG_COLS = slice(PRESCAN_COLS, PRESCAN_COLS + IMAGE_COLS)
SUBSAMPLE = 17

FLAT_LOW = 8
FLAT_HIGH = 16


class CosmeticsParams(BaseModel):
    """Analysis parameters of COSMETICS00 (defaults are the campaign's)."""

    nsigma: float = Field(4.0, description="sigma-clipping threshold of levels")
    degree: int = Field(5, description="degree of the smooth 2-D models")
    nbins: tuple[int, int] = Field((32, 32), description="bins (rows, cols) of the smooth-model fits")
    defect_lo: float = Field(-1000.0, description="dark mask: background-subtracted level (ADU) below which a pixel is bad")
    defect_hi: float = Field(50.0, description="dark mask: background-subtracted level (ADU) above which a pixel is bad")
    flat_lo: float = Field(0.5, description="flat mask: flat / model below which a pixel is bad")
    flat_hi: float = Field(1.5, description="flat mask: flat / model above which a pixel is bad")
    column_rule: int = Field(200, description="bad pixels in a column from which the whole column is masked")
    flat_min_signal: float = Field(1000.0, description="image level (ADU) below which a flat raises FLUENCE_OOL")
    stack_chunk_rows: int = Field(128, description="rows per band of the median stacks")


class CosmeticsQuadExtraction(BaseModel):
    offset_ref: float = Field(description="clipped mean of the virtual pixels (ADU)")
    signal_adu: float = Field(description="clipped mean of the trimmed image area - offset_ref (ADU)")


class CosmeticsCCDExtraction(BaseModel):
    shape: tuple[int, int]
    vstart: int = 0
    vend: int = 2086
    quadrants: dict[str, CosmeticsQuadExtraction]


class CosmeticsExtraction(Extraction):
    kind: str = Field(description="bias (exptime 0) or flat")
    exptime: float = 0.0
    per_ccd: dict[str, CosmeticsCCDExtraction] = Field(default_factory=dict)


class CosmeticsQuadResult(BaseModel):
    """Per-quadrant result of COSMETICS00 (pixel counts of the image area)."""

    dark01_mask_merged: bool = Field(description="the DARK01 defect mask (dark_mask calibration) was merged")
    n_bias: int = Field(description="bias frames stacked")
    n_flats: int = Field(description="flat frames stacked")
    flat_level_adu: float = Field(description="mean flat level above the reference offset (ADU)")
    n_dark_defects: int = Field(description="pixels with a dark-mask bit (hot | cold)")
    n_hot: int = Field(description="hot pixels of the dark mask")
    n_flat_defects: int = Field(description="pixels with a flat-mask bit")
    n_flat_low: int = Field(description="pixels with flat / model < flat_lo (or no response)")
    n_flat_high: int = Field(description="pixels with flat / model > flat_hi")
    n_bad_columns: int = Field(description="columns masked whole in the merged mask")
    bad_columns: list[int] = Field(description="canonical quadrant columns masked whole (prescan included)")
    n_defects: int = Field(description="pixels with any bit in the merged mask")


def flat_defects(image: np.ndarray, lo: float = 0.5, hi: float = 1.5, degree: int = 5,
                 nbins: tuple[int, int] = (32, 32)) -> tuple[np.ndarray, np.ndarray]:
    """(mask bits FLAT_LOW / FLAT_HIGH, normalised flat = image / smooth model) of an
    offset-subtracted master-flat image area (canonical)."""
    img = np.asarray(image, dtype=np.float32)
    model = fit_poly_2d(img, degree=degree, nbins=nbins).model
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(model > 0, img / model, np.nan).astype(np.float32)
    bits = np.zeros(img.shape, dtype=np.uint8)
    bits[~(ratio >= lo)] |= FLAT_LOW  # NaN counts as low (no response)
    bits[ratio > hi] |= FLAT_HIGH
    return bits, ratio


def extract(exposure: ExposureFrames, calib: Calibrations, params: CosmeticsParams) -> CosmeticsExtraction:
    per_ccd: dict[str, CosmeticsCCDExtraction] = {}
    for ccd in exposure.ccds():
        meta = exposure.meta(ccd)
        quads = exposure.quadrants(ccd)
        qx = {}
        for q in QUADRANTS:
            off = fast_clipped_stats(reference_pixels(quads[q], meta.vstart, meta.vend), params.nsigma, subsample=SUBSAMPLE).mean
            s = fast_clipped_stats(standard_region(quads[q], "img", meta.vstart, meta.vend), params.nsigma, subsample=SUBSAMPLE)
            qx[q] = CosmeticsQuadExtraction(offset_ref=off, signal_adu=s.mean - off)
        per_ccd[ccd] = CosmeticsCCDExtraction(shape=exposure.load(ccd).shape, vstart=meta.vstart, vend=meta.vend, quadrants=qx)
        del quads
        exposure.release(ccd)
    kind = "flat" if exposure.exptime and exposure.exptime > 0 else "bias"
    return CosmeticsExtraction(family="cosmetics", unit=exposure_unit(exposure.obsid), obsids=[exposure.obsid],
                               ccds=list(per_ccd), flags=exposure.flags, kind=kind, exptime=exposure.exptime or 0.0,
                               per_ccd=per_ccd)


def _stack(run: TestRun, ccd: str, exs: list[CosmeticsExtraction], params: CosmeticsParams) -> tuple[np.ndarray, Geometry]:
    """Median stack of the offset-subtracted frames of ``exs`` (one CCD)."""
    paths, shape = run.stack_paths(ccd, [e.obsids[0] for e in exs], [e.per_ccd[ccd].shape for e in exs])
    geometry = Geometry.from_shape(shape)
    maps = [frame_row_map({q: e.per_ccd[ccd].quadrants[q].offset_ref for q in QUADRANTS}, geometry) for e in exs]
    stack, _ = stack_frames(paths, shape, subtract_row_map(maps, geometry.quad_cols),
                            params.stack_chunk_rows)
    return stack, geometry


def solve(extractions: list[CosmeticsExtraction], calib: Calibrations, params: CosmeticsParams, run: TestRun,
          sink: ProductSink) -> AnalysisOutput:
    exs = sorted(extractions, key=lambda e: e.obsids[0])
    results: dict[str, dict[str, dict[str, Any]]] = {}
    frame_rows: list[dict[str, Any]] = []
    flags = Flag(run.flags)
    thumbs: dict[str, np.ndarray] = {}
    files: dict[str, str] = {}
    bad_cols_table: dict[str, list] = {"ccd": [], "quadrant": [], "col": [], "n_bad": []}
    ccds = [c for c in ("CCD1", "CCD2", "CCD3") if any(c in e.per_ccd for e in exs)]
    if not ccds:
        raise ValueError(f"{run.label}: no extractions to solve")
    for ccd in ccds:
        biases = [e for e in exs if ccd in e.per_ccd and e.kind == "bias"]
        flats = [e for e in exs if ccd in e.per_ccd and e.kind == "flat"]
        if not biases or not flats:
            raise ValueError(f"{ccd}: COSMETICS00 needs bias frames (exptime 0) and flats (exptime > 0); "
                             f"got {len(biases)} bias and {len(flats)} flat frames")
        for e in flats:
            for q in QUADRANTS:
                x = e.per_ccd[ccd].quadrants[q]
                frame_rows.append({"obsid": e.obsids[0], "ccd": ccd, "quadrant": q, "exptime": e.exptime,
                                   "kind": "flat", "offset_ref": x.offset_ref, "signal_adu": x.signal_adu})
                if x.signal_adu < params.flat_min_signal:
                    flags |= Flag.FLUENCE_OOL
        vstart, vend = biases[0].per_ccd[ccd].vstart, biases[0].per_ccd[ccd].vend
        rows = slice(max(vstart, 0), min(IMAGE_ROWS, vend))
        mbias, geometry = _stack(run, ccd, biases, params)
        dark_mask = np.zeros(mbias.shape, dtype=np.uint8)
        dms = {}
        for q in QUADRANTS:
            dm = defect_mask(quadrant(mbias, q, geometry)[rows, IMG_COLS], params.defect_lo, params.defect_hi,
                             params.column_rule, params.degree, params.nbins)
            quadrant(dark_mask, q, geometry)[rows, IMG_COLS] = dm.bits
            dms[q] = dm
        mflat, _ = _stack(run, ccd, flats, params)
        dark01 = calib.image(DARK_MASK, ccd, "MASK")  # the block's DARK01 defect mask, when known
        if dark01 is not None and dark01.shape != mflat.shape:
            dark01 = None
        flat_mask = np.zeros(mflat.shape, dtype=np.uint8)
        merged = np.zeros(mflat.shape, dtype=np.uint8)
        nflat = np.zeros(mflat.shape, dtype=np.float32)
        results[ccd] = {}
        for q in QUADRANTS:
            fbits, ratio = flat_defects(quadrant(mflat, q, geometry)[rows, IMG_COLS], params.flat_lo, params.flat_hi,
                                        params.degree, params.nbins)
            quadrant(flat_mask, q, geometry)[rows, IMG_COLS] = fbits
            quadrant(nflat, q, geometry)[rows, IMG_COLS] = np.nan_to_num(ratio, nan=0.0)
            dbits = dms[q].bits & (DEFECT_HOT | DEFECT_COLD)
            if dark01 is not None:
                dbits = dbits | (quadrant(dark01, q, geometry)[rows, IMG_COLS] & (DEFECT_HOT | DEFECT_COLD))
            mbits = dbits | fbits
            cols = column_rule(mbits != 0, params.column_rule)
            mbits[:, cols] |= DEFECT_COLUMN
            quadrant(merged, q, geometry)[rows, IMG_COLS] = mbits
            counts = np.count_nonzero(mbits != 0, axis=0)
            for c in cols:
                bad_cols_table["ccd"].append(ccd)
                bad_cols_table["quadrant"].append(q)
                bad_cols_table["col"].append(int(c) + PRESCAN_COLS)
                bad_cols_table["n_bad"].append(int(counts[c]))
            qr = CosmeticsQuadResult(
                dark01_mask_merged=dark01 is not None, n_bias=len(biases), n_flats=len(flats),
                flat_level_adu=float(np.mean([e.per_ccd[ccd].quadrants[q].signal_adu for e in flats])),
                n_dark_defects=int(np.count_nonzero(dbits)), n_hot=int(np.count_nonzero(dbits & DEFECT_HOT)),
                n_flat_defects=int(np.count_nonzero(fbits)), n_flat_low=int(np.count_nonzero(fbits & FLAT_LOW)),
                n_flat_high=int(np.count_nonzero(fbits & FLAT_HIGH)), n_bad_columns=len(cols),
                bad_columns=[int(c) + PRESCAN_COLS for c in cols], n_defects=int(np.count_nonzero(mbits)),
            )
            results[ccd][q] = qr.model_dump()
        sink.add(ImageProduct(
            name=f"cosmetics_masks_{ccd}", ccd=ccd,
            extensions={"MASK": merged, "DARK_MASK": dark_mask, "FLAT_MASK": flat_mask, "FLAT_NORM": nflat, "MBIAS": mbias},
            header={"NBIAS": len(biases), "NFLAT": len(flats), "DEFLO": params.defect_lo, "DEFHI": params.defect_hi,
                    "FLATLO": params.flat_lo, "FLATHI": params.flat_hi, "COLRULE": params.column_rule,
                    "MASKBIT1": "hot (dark mask)", "MASKBIT2": "cold (dark mask)", "MASKBIT4": "whole-column rule",
                    "MASKBIT8": "flat low", "MASKBI16": "flat high"},
            description="merged defect MASK, DARK_MASK, FLAT_MASK, normalised master flat, master bias",
        ))
        files[ccd] = f"cosmetics_masks_{ccd}.fits"
        thumbs[ccd] = _thumb(merged)
        del mflat, mbias, flat_mask, merged, nflat, dark_mask
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
    return AnalysisOutput(results=results, flags=int(flags), frames=frame_rows, parameters=params.model_dump(mode="json"),
                          summary=summary, provides={DEFECT_MASK: {"values": {}, "files": files}})


def _thumb(mask: np.ndarray, factor: int = 8) -> np.ndarray:
    ny, nx = (s // factor * factor for s in mask.shape)
    return (mask[:ny, :nx] != 0).reshape(ny // factor, factor, nx // factor, factor).any(axis=(1, 3))


def _draw_masks(fig: Any, thumbs: dict[str, np.ndarray]) -> None:
    axes = np.atleast_1d(fig.subplots(1, max(len(thumbs), 1)))
    for ax, (ccd, img) in zip(axes, thumbs.items()):
        ax.imshow(img, origin="lower", cmap="gray_r", interpolation="nearest")
        ax.set_title(f"{ccd} defects (8x8 any)")


FAMILY = Family(
    name="cosmetics",
    tests=TESTS,
    params=CosmeticsParams,
    extract=extract,
    solve=solve,
    unit="exposure",
    extraction=CosmeticsExtraction,
    needs=(Need(DARK_MASK, "wait", ("DARK01",)),),
    provides=(DEFECT_MASK,),
    version=VERSION,
    result=CosmeticsQuadResult,
)
