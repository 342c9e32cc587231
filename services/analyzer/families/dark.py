"""DARK01 (engine v2): dark current per quadrant, master dark, hot pixels and the defect mask.

**Extract** (per exposure, CCD and quadrant): reference offset = clipped mean of the virtual
pixels (trimmed prescan, serial and parallel overscan: no dark signal); dark signal = clipped
mean of the trimmed image area minus that offset (ADU); the image-row profile (for the
readout-dark diagnostic); the per-row readout time from the exposure-log registers.

**Solve**:
- bias structure: the ``master_bias`` calibration's ``offset_img - offset_ref`` per quadrant
  (BIAS01/02 image-area level above the virtual pixels), subtracted from the dark signal;
- dark time of canonical image row ``y`` = ``exptime + y * t_row``: charge in row ``y`` is
  shifted ``y`` times towards the serial register during readout and collects dark current all
  that time (``t_row = (4 toi_ro + 14.3 x 2128) us``, campaign.md "Duration of one frame"). The
  dark current is the signal over the mean dark time of the rows measured (``readout_dark =
  "registers"``); ``"none"`` divides by ``exptime`` only (6.3 % high at 565 s, 2066 rows);
- dark current (ADU/s; e-/s with the PTC01 gain), ``dark_row_slope_adu`` (fitted slope of the
  row profile: ``rate x t_row`` expected);
- master dark per CCD: median stack of the offset-subtracted frames, band by band from the files
  (extensions STACK; ERR = ``f(N) std / sqrt(N)`` with the median error factor for N frames, or
  the image noise when N = 1; MASK), defect mask (:func:`~services.analyzer.science.defects.defect_mask`:
  background-subtracted, hot > 50 ADU, cold < -1000 ADU, whole column at >= 200 bad pixels;
  bits 1 hot, 2 cold, 4 whole column). ``n_hot`` counts hot pixels outside whole columns.

Provides ``dark_mask``: files ``{CCD: master_dark_<CCD>.fits}`` (MASK extension).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.analyzer.family import (
    DARK_MASK,
    GAIN,
    MASTER_BIAS,
    Calibrations,
    ExposureFrames,
    Extraction,
    Family,
    Need,
    TestRun,
    exposure_unit,
)
from services.analyzer.model import AnalysisOutput, FigureProduct, ImageProduct, ProductSink, TableProduct
from services.analyzer.science.defects import DEFECT_COLD, DEFECT_COLUMN, DEFECT_HOT, DefectMask, defect_mask
from services.analyzer.science.preprocess import reference_pixels
from services.analyzer.science.stacking import frame_row_map, stack_frames, subtract_row_map
from services.analyzer.science.stats import fast_clipped_stats
from shared.flags import Flag
from shared.geometry import (
    IMAGE_COLS,
    IMAGE_ROWS,
    PRESCAN_COLS,
    QUADRANTS,
    Geometry,
    quadrant,
    standard_region,
)

TESTS = ("DARK01",)
VERSION = "2"
IMG_COLS = slice(PRESCAN_COLS, PRESCAN_COLS + IMAGE_COLS)
SUBSAMPLE = 17
#: serial pixel time (us) and pixels per line of the readout-time formula (campaign.md)
PIXEL_TIME_US = 14.3
LINE_PIXELS = 2128

__all__ = ["DEFECT_COLD", "DEFECT_COLUMN", "DEFECT_HOT", "FAMILY", "DarkParams", "row_time_s"]


class DarkParams(BaseModel):
    """Analysis parameters of DARK01 (defaults are the campaign's)."""

    nsigma: float = Field(4.0, description="sigma-clipping threshold of levels")
    degree: int = Field(5, description="degree of the smooth background model of the master dark")
    nbins: tuple[int, int] = Field((32, 32), description="bins (rows, cols) of the background fit")
    defect_lo: float = Field(-1000.0, description="background-subtracted level (ADU) below which a pixel is a defect")
    defect_hi: float = Field(50.0, description="background-subtracted level (ADU) above which a pixel is hot")
    column_rule: int = Field(200, description="bad pixels in a column from which the whole column is masked")
    fluence_limits: tuple[float, float] = Field((-2.0, 5.0), description="dark signal (ADU) outside which BGD_OOL is flagged")
    use_bias: bool = Field(True, description="subtract the bias structure (img - reference) of the master_bias calibration")
    readout_dark: Literal["registers", "none"] = Field(
        "registers", description="dark time = exptime + mean row index x readout time per row (registers) | exptime (none)")
    stack_chunk_rows: int = Field(128, description="rows per band of the median stack")


class DarkQuadExtraction(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    offset_ref: float = Field(description="clipped mean of the virtual pixels (ADU)")
    signal_adu: float = Field(description="clipped mean of the trimmed image area - offset_ref (ADU)")
    noise_img_adu: float = Field(description="clipping-corrected clipped std of the image area (ADU)")
    row_profile: np.ndarray = Field(description="clipped mean of the trimmed image columns per image row - offset_ref (ADU)")


class DarkCCDExtraction(BaseModel):
    shape: tuple[int, int]
    vstart: int = 0
    vend: int = 2086
    quadrants: dict[str, DarkQuadExtraction]


class DarkExtraction(Extraction):
    exptime: float = Field(description="exposure time (s)")
    t_row_s: float = Field(description="readout time per row from the registers (s)")
    per_ccd: dict[str, DarkCCDExtraction] = Field(default_factory=dict)


class DarkQuadResult(BaseModel):
    """Per-quadrant result of DARK01 (means over frames)."""

    n_frames: int = Field(description="frames analysed")
    exptime: float = Field(description="mean exposure time (s)")
    dark_time_s: float = Field(description="mean dark time of the measured rows: exptime + mean row x t_row (s)")
    t_row_s: float = Field(description="readout time per row (s); 0 when readout_dark = none")
    dark_signal_adu: float = Field(description="image clipped mean - reference offset (ADU), before bias structure")
    dark_current_adu_s: float = Field(description="(dark_signal_adu - bias_structure_adu) / dark_time_s (ADU/s)")
    dark_current_e_s: float | None = Field(None, description="dark_current_adu_s x gain (e-/s)")
    gain: float | None = Field(None, description="gain used (e-/ADU), from PTC01")
    bias_structure_adu: float | None = Field(None, description="master bias offset_img - offset_ref (ADU); None without it")
    dark_row_slope_adu: float = Field(description="slope of the (bias-structure-free) image row profile (ADU per row; "
                                      "readout dark gives dark_current_adu_s x t_row)")
    offset_ref: float = Field(description="mean reference offset (ADU)")
    n_hot: int = Field(description="hot pixels outside the columns masked whole")
    n_hot_all: int = Field(description="all hot pixels (> defect_hi above the background)")
    n_cold: int = Field(description="cold pixels (< defect_lo below the background)")
    n_bad_columns: int = Field(description="columns masked whole (>= column_rule bad pixels)")
    bad_columns: list[int] = Field(description="canonical quadrant columns masked whole (prescan included)")
    n_masked: int = Field(description="pixels set in MASK")


# ----------------------------------------------------------------------------- numerics


def row_time_s(values: dict[str, Any]) -> float:
    """Readout time of one row (s) from the exposure-log registers: ``(4 toi_ro + 14.3 x 2128) us``
    (toi_ro in us, default 1000)."""
    try:
        toi_ro = float(values.get("toi_ro", 1000) or 1000)
    except (TypeError, ValueError):
        toi_ro = 1000.0
    return (4 * toi_ro + PIXEL_TIME_US * LINE_PIXELS) * 1e-6


def image_rows(vstart: int, vend: int) -> slice:
    return slice(max(vstart, 0), min(IMAGE_ROWS, vend))


def quadrant_extraction(quad: np.ndarray, nsigma: float, vstart: int = 0, vend: int = 2086) -> DarkQuadExtraction:
    off = fast_clipped_stats(reference_pixels(quad, vstart, vend), nsigma, subsample=SUBSAMPLE).mean
    img = standard_region(quad, "img", vstart, vend)
    s = fast_clipped_stats(img, nsigma, subsample=SUBSAMPLE)
    keep = (img >= np.float32(s.lo)) & (img <= np.float32(s.hi))  # hot pixels / columns out of the profile
    counts = np.maximum(np.count_nonzero(keep, axis=1), 1)
    prof = (np.sum(img, axis=1, where=keep, dtype=np.float64) / counts - off).astype(np.float32)
    return DarkQuadExtraction(offset_ref=off, signal_adu=s.mean - off, noise_img_adu=s.std_corrected, row_profile=prof)


def extract(exposure: ExposureFrames, calib: Calibrations, params: DarkParams) -> DarkExtraction:
    """Per-exposure levels of every CCD and quadrant."""
    if not exposure.exptime or exposure.exptime <= 0:
        raise ValueError(f"ObsID {exposure.obsid}: dark frame without a positive exptime ({exposure.exptime!r})")
    per_ccd: dict[str, DarkCCDExtraction] = {}
    for ccd in exposure.ccds():
        meta = exposure.meta(ccd)
        quads = exposure.quadrants(ccd)
        per_ccd[ccd] = DarkCCDExtraction(
            shape=exposure.load(ccd).shape, vstart=meta.vstart, vend=meta.vend,
            quadrants={q: quadrant_extraction(quads[q], params.nsigma, meta.vstart, meta.vend) for q in QUADRANTS})
        del quads
        exposure.release(ccd)
    return DarkExtraction(family="dark", unit=exposure_unit(exposure.obsid), obsids=[exposure.obsid], ccds=list(per_ccd),
                          flags=exposure.flags, exptime=exposure.exptime, t_row_s=row_time_s(exposure.values()),
                          per_ccd=per_ccd)


def bias_structure(calib: Calibrations, ccd: str, q: str) -> float | None:
    """``offset_img - offset_ref`` (ADU) of the ``master_bias`` calibration's values, None when
    unknown (the same virtual pixels as the dark's reference offset)."""
    cal = calib.get(MASTER_BIAS)
    if cal is None:
        return None
    try:
        v = cal.values[ccd][q]
        return float(v["offset_img"]) - float(v["offset_ref"])
    except (KeyError, TypeError, ValueError):
        return None


def mask_ccd(master: np.ndarray, geometry: Geometry, rows: slice, params: DarkParams) -> tuple[np.ndarray, dict[str, DefectMask]]:
    """Full-frame defect mask (uint8, raw-frame orientation) of a master dark and the per
    quadrant :class:`DefectMask`."""
    mask = np.zeros(master.shape, dtype=np.uint8)
    out = {}
    for q in QUADRANTS:
        img = quadrant(master, q, geometry)[rows, IMG_COLS]
        dm = defect_mask(img, params.defect_lo, params.defect_hi, params.column_rule, params.degree, params.nbins)
        quadrant(mask, q, geometry)[rows, IMG_COLS] = dm.bits
        out[q] = dm
    return mask, out


# ----------------------------------------------------------------------------- solve


def solve(extractions: list[DarkExtraction], calib: Calibrations, params: DarkParams, run: TestRun,
          sink: ProductSink) -> AnalysisOutput:
    exs = sorted(extractions, key=lambda e: e.obsids[0])
    if not exs:
        raise ValueError(f"{run.label}: no extractions to solve")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    frame_rows: list[dict[str, Any]] = []
    flags = Flag(run.flags)
    thumbs: dict[str, np.ndarray] = {}
    files: dict[str, str] = {}
    ccds = [c for c in ("CCD1", "CCD2", "CCD3") if any(c in e.per_ccd for e in exs)]
    for ccd in ccds:
        mine = [e for e in exs if ccd in e.per_ccd]
        cx = [e.per_ccd[ccd] for e in mine]
        obsids = [e.obsids[0] for e in mine]
        paths, shape = run.stack_paths(ccd, obsids, [c.shape for c in cx])
        geometry = Geometry.from_shape(shape)
        rows = image_rows(cx[0].vstart, cx[0].vend)
        n = len(cx)
        maps = [frame_row_map({q: c.quadrants[q].offset_ref for q in QUADRANTS}, geometry) for c in cx]
        master, err = stack_frames(paths, shape, subtract_row_map(maps, geometry.quad_cols),
                                   params.stack_chunk_rows)
        if n == 1:  # no spread to measure: the image noise of the single frame, per quadrant
            for q in QUADRANTS:
                quadrant(err, q, geometry)[...] = np.float32(cx[0].quadrants[q].noise_img_adu)
        mask, dms = mask_ccd(master, geometry, rows, params)
        mean_row = (rows.start + rows.stop - 1) / 2.0
        y = np.arange(rows.start, rows.stop, dtype=np.float64)
        results[ccd] = {}
        for q in QUADRANTS:
            structure = bias_structure(calib, ccd, q) if params.use_bias else None
            gain = calib.gain(ccd, q)
            rates, times = [], []
            for e, c in zip(mine, cx):
                x = c.quadrants[q]
                t_row = e.t_row_s if params.readout_dark == "registers" else 0.0
                dark_time = e.exptime + mean_row * t_row
                rate = (x.signal_adu - (structure or 0.0)) / dark_time
                rates.append(rate)
                times.append(dark_time)
                frame_rows.append({"obsid": e.obsids[0], "ccd": ccd, "quadrant": q, "exptime": e.exptime,
                                   "dark_time_s": dark_time, "offset_ref": x.offset_ref, "signal_adu": x.signal_adu,
                                   "noise_img_adu": x.noise_img_adu, "bias_structure_adu": structure,
                                   "dark_current_adu_s": rate})
            profile = np.mean([c.quadrants[q].row_profile for c in cx], axis=0)
            slope = float(np.polyfit(y[: profile.size], profile, 1)[0]) if profile.size > 2 else float("nan")
            signal = float(np.mean([c.quadrants[q].signal_adu for c in cx]))
            rate = float(np.mean(rates))
            lo, hi = params.fluence_limits
            if not lo <= signal <= hi:
                flags |= Flag.BGD_OOL
            dm = dms[q]
            qr = DarkQuadResult(
                n_frames=n, exptime=float(np.mean([e.exptime for e in mine])), dark_time_s=float(np.mean(times)),
                t_row_s=float(np.mean([e.t_row_s for e in mine])) if params.readout_dark == "registers" else 0.0,
                dark_signal_adu=signal, dark_current_adu_s=rate, dark_current_e_s=rate * gain if gain else None,
                gain=gain, bias_structure_adu=structure, dark_row_slope_adu=slope,
                offset_ref=float(np.mean([c.quadrants[q].offset_ref for c in cx])),
                n_hot=dm.n_hot_isolated, n_hot_all=dm.n_hot, n_cold=dm.n_cold, n_bad_columns=len(dm.bad_columns),
                bad_columns=dm.bad_columns, n_masked=dm.n_masked,
            )
            results[ccd][q] = qr.model_dump()
        sink.add(ImageProduct(
            name=f"master_dark_{ccd}", ccd=ccd, extensions={"STACK": master, "ERR": err, "MASK": mask},
            header={"BUNIT": "ADU", "NCOMBINE": n, "EXPTIME": float(np.mean([e.exptime for e in mine])),
                    "DEFLO": params.defect_lo, "DEFHI": params.defect_hi, "COLRULE": params.column_rule,
                    "MASKBIT1": "hot (> DEFHI)", "MASKBIT2": "cold (< DEFLO)", "MASKBIT4": "whole-column rule"},
            description="master dark: median stack of offset-subtracted frames; ERR; defect MASK",
        ))
        files[ccd] = f"master_dark_{ccd}.fits"
        sink.add(_defects_table(ccd, master, geometry, rows, dms))
        thumbs[ccd] = _thumb(master)
        del master, err, mask, dms
    sink.add(TableProduct(
        name="dark_frames",
        columns={k: [r[k] if r[k] is not None else np.nan for r in frame_rows] for k in frame_rows[0]},
        units={"signal_adu": "ADU", "offset_ref": "ADU", "dark_current_adu_s": "ADU/s", "exptime": "s", "dark_time_s": "s"},
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
                          parameters=params.model_dump(mode="json"), summary=summary,
                          provides={DARK_MASK: {"values": {}, "files": files}})


def _defects_table(ccd: str, master: np.ndarray, geometry: Geometry, rows: slice, dms: dict[str, DefectMask]) -> TableProduct:
    """Hot / cold pixel list of a CCD (canonical quadrant coordinates, prescan included)."""
    cols: dict[str, list] = {"quadrant": [], "row": [], "col": [], "level_adu": [], "bits": []}
    for q, dm in dms.items():
        pix = np.argwhere(dm.bits & (DEFECT_HOT | DEFECT_COLD))[:100000]
        img = quadrant(master, q, geometry)[rows, IMG_COLS]
        r, c = pix[:, 0], pix[:, 1]
        cols["quadrant"] += [q] * len(pix)
        cols["row"] += (r + rows.start).tolist()
        cols["col"] += (c + PRESCAN_COLS).tolist()
        cols["level_adu"] += (img[r, c] - dm.background[r, c]).astype(float).tolist()
        cols["bits"] += dm.bits[r, c].astype(int).tolist()
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


FAMILY = Family(
    name="dark",
    tests=TESTS,
    params=DarkParams,
    extract=extract,
    solve=solve,
    unit="exposure",
    extraction=DarkExtraction,
    needs=(Need(MASTER_BIAS, "wait", ("BIAS01", "BIAS02")), Need(GAIN, "rerun", ("PTC01",))),
    provides=(DARK_MASK,),
    version=VERSION,
    result=DarkQuadResult,
)
