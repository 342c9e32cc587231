"""BIAS01 / BIAS02 (engine v2): offsets, read noise, profiles, master bias, prescan DNL diagnostic.

**Extract** (per exposure, CCD and quadrant; canonical orientation, standard regions of
``formats.md``):
- offsets ``offset_pre`` / ``offset_img`` / ``offset_ove`` = 4-sigma clipped mean (ADU; a mean,
  not a median, so that digitised data give sub-ADU accuracy), ``offset_ref`` = clipped mean of
  all virtual pixels (prescan, serial and parallel overscan);
- read noise ``ron_pre_adu`` / ``ron_ove_adu`` = clipped std (clipping-corrected) of the region;
  ``ron_img_adu`` = the same after removing a smooth 2-D model of the image area (Legendre
  polynomial of total degree 5 through 32 x 32 block medians of every 2nd row and column). The
  RON is the std of the digitised data as measured (the ADC's 1/12 ADU^2 included);
- row / column profiles (mean over image columns / rows, minus ``offset_pre``), prescan-column
  means and stds (the differential non-linearity diagnostic), and the offset subtracted from the
  frame before stacking (``offset_pre``, or the per-row prescan median with ``offset_method=row``).

**Solve** (per test run): quadrant means over frames; ``ron_diff_adu`` = clipped std of the
difference of consecutive frames (ObsID order, pairs 1-2, 3-4, ...) / sqrt(2) over
``diff_rows`` central image rows: the read noise without the fixed pattern; master bias per CCD
= median stack (:func:`~services.analyzer.science.stacking.stack_frames`, band by band from the
files) of the offset-subtracted frames (extensions STACK, STD = pixel std across frames, MASK;
raw-frame orientation); RON in e- with the PTC01 gain when known (a re-solve when it arrives).

Provides ``master_bias``: files ``{CCD: master_bias_<CCD>.fits}``, values
``{CCD: {Q: {offset_pre, offset_img, offset_ove, offset_ref, ron_img_adu, mb_img_mean}}}`` (the
DARK01 bias structure is ``offset_img - offset_ref``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.analyzer.family import (
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
from services.analyzer.science.images import thumbnail
from services.analyzer.science.preprocess import reference_pixels, row_offsets
from services.analyzer.science.smooth import fit_poly_2d
from services.analyzer.science.stacking import (
    frame_row_map,
    median_error_factor,
    read_rows,
    stack_frames,
    subtract_row_map,
)
from services.analyzer.science.stats import fast_clipped_stats, mad_std
from shared.flags import Flag
from shared.geometry import (
    IMAGE_COLS,
    IMAGE_ROWS,
    PRESCAN_COLS,
    QUADRANTS,
    STANDARD_TRIMS,
    Geometry,
    quadrant,
    standard_region,
)

TESTS = ("BIAS01", "BIAS02")
VERSION = "2"

#: Mask bits of the master bias MASK extension.
MASK_OUTLIER = 1  # |master - smooth model| > mask_nsigma x robust std
MASK_NOISY = 2  # pixel std across frames > noisy_factor x median std
#: clipping bounds iterated on every 17th pixel (prime: no column aliasing) of large regions, statistics on all pixels
SUBSAMPLE = 17
IMG_COLS = slice(PRESCAN_COLS, PRESCAN_COLS + IMAGE_COLS)


class BiasParams(BaseModel):
    """Analysis parameters of BIAS01/02 (defaults are the campaign's)."""

    nsigma: float = Field(4.0, description="sigma-clipping threshold of offsets and RON")
    degree: int = Field(5, description="total degree of the smooth 2-D model of the image area")
    nbins: tuple[int, int] = Field((32, 32), description="bins (rows, cols) of the smooth-model fit")
    model_step: int = Field(2, description="the smooth model's bin medians use every n-th row and column (speed)")
    offset_method: str = Field("global", description="offset subtracted before stacking: global (clipped mean of "
                               "the prescan, per frame and quadrant) | row (per-row prescan median, adds row noise)")
    mask_nsigma: float = Field(6.0, description="master-bias outlier threshold (robust sigmas)")
    noisy_factor: float = Field(5.0, description="pixel std / median std above which a pixel is noisy")
    ron_limits: tuple[float, float] = Field((0.86, 1.44), description="RON (ADU) outside which RON_OOL is flagged")
    stack_chunk_rows: int = Field(128, description="rows per band of the median stack (memory bound)")
    diff_rows: int = Field(512, description="central image rows per quadrant used for the frame-difference RON "
                           "(0: all image rows)")


# ----------------------------------------------------------------------------- extraction model


class BiasQuadExtraction(BaseModel):
    """One exposure's quadrant (ADU)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    offset_ref: float
    offset_pre: float
    offset_img: float
    offset_ove: float
    ron_pre_adu: float
    ron_img_adu: float
    ron_ove_adu: float
    row_profile: np.ndarray = Field(description="mean over image columns of every row - offset_pre (float32)")
    col_profile: np.ndarray = Field(description="mean over image rows of every column - offset_pre (float32)")
    dnl_mean: np.ndarray = Field(description="mean of each prescan column over the image rows (51)")
    dnl_std: np.ndarray = Field(description="std of each prescan column over the image rows (51)")
    stack_offset: np.ndarray = Field(description="offset per canonical row subtracted before stacking (ADU)")


class BiasCCDExtraction(BaseModel):
    shape: tuple[int, int]
    vstart: int = 0
    vend: int = 2086
    quadrants: dict[str, BiasQuadExtraction]


class BiasExtraction(Extraction):
    """What the BIAS solve needs from one exposure."""

    per_ccd: dict[str, BiasCCDExtraction] = Field(default_factory=dict)


# ----------------------------------------------------------------------------- results model


class BiasQuadResult(BaseModel):
    """Per-quadrant result of a BIAS test (means over frames; ADU unless named ``_e``)."""

    n_frames: int = Field(description="frames analysed")
    offset_pre: float = Field(description="bias level of the trimmed prescan: clipped mean (ADU)")
    offset_img: float = Field(description="bias level of the trimmed image area: smooth-model mean + clipped mean of the residual (ADU)")
    offset_ove: float = Field(description="bias level of the trimmed serial overscan: clipped mean (ADU)")
    offset_ref: float = Field(description="clipped mean of all virtual pixels (pre, ove, parallel overscan) (ADU)")
    offset_pre_scatter: float = Field(description="frame-to-frame std of offset_pre (ADU)")
    ron_pre_adu: float = Field(description="read noise of the prescan: clipping-corrected clipped std (ADU)")
    ron_img_adu: float = Field(description="read noise of the image area after its smooth 2-D model (ADU)")
    ron_ove_adu: float = Field(description="read noise of the serial overscan (ADU)")
    ron_diff_adu: float | None = Field(None, description="read noise from consecutive-frame differences / sqrt(2) "
                                       "(image area; excludes the fixed pattern) (ADU); None with one frame")
    ron_pre_e: float | None = Field(None, description="ron_pre_adu x gain (e-)")
    ron_img_e: float | None = Field(None, description="ron_img_adu x gain (e-)")
    ron_ove_e: float | None = Field(None, description="ron_ove_adu x gain (e-)")
    ron_diff_e: float | None = Field(None, description="ron_diff_adu x gain (e-)")
    gain: float | None = Field(None, description="gain used for the e- values (e-/ADU), from PTC01")
    mb_img_mean: float = Field(description="clipped mean of the master bias image area (offset-subtracted, ADU)")
    mb_img_std: float = Field(description="clipped std of the master bias image area after its smooth model (ADU)")
    mb_model_p2p: float = Field(description="peak-to-peak of the smooth model of the master bias image (gradient, ADU)")
    n_masked: int = Field(description="pixels of the image area set in MASK")
    dnl_std_spread: float = Field(description="std of the trimmed prescan column stds (ADU)")
    dnl_spread_ratio: float = Field(description="dnl_std_spread / its expectation without DNL (~1 when none)")


# ----------------------------------------------------------------------------- per quadrant numerics


def region_offset_noise(quad: np.ndarray, name: str, nsigma: float, vstart: int = 0, vend: int = 2086) -> tuple[float, float]:
    """(clipped mean, clipping-corrected clipped std) in ADU of a standard region."""
    s = fast_clipped_stats(standard_region(quad, name, vstart, vend), nsigma, subsample=SUBSAMPLE)
    return s.mean, s.std_corrected


def image_ron(quad: np.ndarray, params: BiasParams, vstart: int = 0, vend: int = 2086) -> tuple[float, float]:
    """(offset, RON) of the standard image region (ADU): RON = clipped std of the image minus its
    smooth 2-D model; offset = mean of the model + clipped mean of that residual (the clipped
    mean of the image, without clipping real gradients)."""
    img = standard_region(quad, "img", vstart, vend)
    model = fit_poly_2d(img, degree=params.degree, nbins=params.nbins, step=params.model_step).model
    mean_model = float(np.mean(model, dtype=np.float64))
    np.subtract(img, model, out=model)  # the residual, in the model's buffer
    s = fast_clipped_stats(model, params.nsigma, subsample=SUBSAMPLE)
    return mean_model + s.mean, s.std_corrected


def prescan_columns(quad: np.ndarray, vstart: int = 0, vend: int = 2086) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (ADU) of every prescan column (51) over the image rows: the DNL diagnostic
    (an ADC with differential non-linearity gives column stds that depend on the mean)."""
    rows = slice(max(vstart, 0), min(IMAGE_ROWS, vend))
    pre = np.asarray(quad[rows, :PRESCAN_COLS], dtype=np.float64)
    return pre.mean(axis=0), pre.std(axis=0, ddof=1)


def dnl_spread(col_std: np.ndarray, nrows: int) -> tuple[float, float]:
    """(std of the trimmed prescan column stds, ratio to the spread expected from Gaussian noise
    alone, sigma / sqrt(2 (n - 1)))."""
    lead, trail = STANDARD_TRIMS["pre"]
    s = np.asarray(col_std, dtype=np.float64)[lead : PRESCAN_COLS - trail]
    spread = float(s.std(ddof=1)) if s.size > 1 else float("nan")
    expected = float(np.median(s)) / np.sqrt(2.0 * max(nrows - 1, 1))
    return spread, spread / expected if expected > 0 else float("nan")


def quadrant_profiles(quad: np.ndarray, offset: float, vstart: int = 0, vend: int = 2086) -> tuple[np.ndarray, np.ndarray]:
    """(row profile over all rows = mean over image columns, column profile over all columns =
    mean over image rows), offset-subtracted, ADU, canonical orientation, float32."""
    rows = slice(max(vstart, 0), min(IMAGE_ROWS, vend))
    row_prof = np.mean(quad[:, IMG_COLS], axis=1, dtype=np.float64) - offset
    col_prof = np.mean(quad[rows, :], axis=0, dtype=np.float64) - offset
    return row_prof.astype(np.float32), col_prof.astype(np.float32)


def quadrant_extraction(quad: np.ndarray, params: BiasParams, vstart: int = 0, vend: int = 2086) -> BiasQuadExtraction:
    """Every per-exposure statistic of one canonical bias quadrant."""
    off_pre, ron_pre = region_offset_noise(quad, "pre", params.nsigma, vstart, vend)
    off_ove, ron_ove = region_offset_noise(quad, "ove", params.nsigma, vstart, vend)
    off_img, ron_img = image_ron(quad, params, vstart, vend)
    off_ref = fast_clipped_stats(reference_pixels(quad, vstart, vend), params.nsigma, subsample=SUBSAMPLE).mean
    row_prof, col_prof = quadrant_profiles(quad, off_pre, vstart, vend)
    dnl_mean, dnl_std = prescan_columns(quad, vstart, vend)
    if params.offset_method == "row":
        stack_offset = row_offsets(quad, "row").astype(np.float32)
    else:
        stack_offset = np.full(quad.shape[0], off_pre, dtype=np.float32)
    return BiasQuadExtraction(
        offset_ref=off_ref, offset_pre=off_pre, offset_img=off_img, offset_ove=off_ove,
        ron_pre_adu=ron_pre, ron_img_adu=ron_img, ron_ove_adu=ron_ove,
        row_profile=row_prof, col_profile=col_prof, dnl_mean=dnl_mean, dnl_std=dnl_std, stack_offset=stack_offset,
    )


# ----------------------------------------------------------------------------- extract


def extract(exposure: ExposureFrames, calib: Calibrations, params: BiasParams) -> BiasExtraction:
    """Per-exposure statistics of every CCD and quadrant (one CCD's pixels in memory at a time)."""
    per_ccd: dict[str, BiasCCDExtraction] = {}
    for ccd in exposure.ccds():
        meta = exposure.meta(ccd)
        quads = exposure.quadrants(ccd)
        shape = exposure.load(ccd).shape
        per_ccd[ccd] = BiasCCDExtraction(
            shape=shape, vstart=meta.vstart, vend=meta.vend,
            quadrants={q: quadrant_extraction(quads[q], params, meta.vstart, meta.vend) for q in QUADRANTS},
        )
        del quads
        exposure.release(ccd)
    return BiasExtraction(family="bias", unit=exposure_unit(exposure.obsid), obsids=[exposure.obsid],
                          ccds=list(per_ccd), flags=exposure.flags, per_ccd=per_ccd)


# ----------------------------------------------------------------------------- solve helpers


def _canonical_rows(n_rows: int, diff_rows: int, vstart: int, vend: int) -> tuple[int, int]:
    lo, hi = max(vstart, 0), min(IMAGE_ROWS, vend, n_rows)
    if diff_rows <= 0 or diff_rows >= hi - lo:
        return lo, hi
    c0 = lo + (hi - lo - diff_rows) // 2
    return c0, c0 + diff_rows


def read_quadrant_rows(path: str, geometry: Geometry, c0: int, c1: int) -> dict[str, np.ndarray]:
    """Canonical rows ``[c0, c1)`` of the four quadrants of a frame file (float32 ADU), reading
    only those rows of each half."""
    out: dict[str, np.ndarray] = {}
    qr = geometry.quad_rows
    bottom = read_rows(path, c0, c1)  # H, G: canonical row = array row
    top = read_rows(path, 2 * qr - c1, 2 * qr - c0)  # E, F: flipped
    qc = geometry.quad_cols
    out["H"] = bottom[:, :qc]
    out["G"] = bottom[:, qc:][:, ::-1]
    out["E"] = top[::-1, :qc]
    out["F"] = top[::-1, qc:][:, ::-1]
    return out


def difference_ron(
    paths: list[str], extractions: list[BiasCCDExtraction], geometry: Geometry, params: BiasParams
) -> dict[str, float | None]:
    """Read noise (ADU) per quadrant from consecutive-frame differences (pairs 0-1, 2-3, ...):
    clipped std of the offset-subtracted difference of the trimmed image columns over the
    central ``diff_rows`` rows, / sqrt(2); mean over pairs. None with fewer than 2 frames."""
    if len(paths) < 2:
        return {q: None for q in QUADRANTS}
    first = extractions[0]
    c0, c1 = _canonical_rows(geometry.quad_rows, params.diff_rows, first.vstart, first.vend)
    lead, trail = STANDARD_TRIMS["img"]
    cols = slice(PRESCAN_COLS + lead, PRESCAN_COLS + IMAGE_COLS - trail)
    values: dict[str, list[float]] = {q: [] for q in QUADRANTS}
    for k in range(0, len(paths) - 1, 2):
        a = read_quadrant_rows(paths[k], geometry, c0, c1)
        b = read_quadrant_rows(paths[k + 1], geometry, c0, c1)
        for q in QUADRANTS:
            values[q].append(pair_difference_ron(a[q][:, cols], b[q][:, cols], params.nsigma))
    return {q: float(np.mean(v)) for q, v in values.items()}


def pair_difference_ron(a: np.ndarray, b: np.ndarray, nsigma: float = 4.0) -> float:
    """Read noise (ADU) of two bias images of the same pixels: clipping-corrected clipped std of
    ``a - b`` / sqrt(2). Fixed pattern and gradients cancel; a difference of offsets does not
    matter (the clipping centre follows it)."""
    diff = np.subtract(a, b, dtype=np.float32)
    return fast_clipped_stats(diff, nsigma, subsample=SUBSAMPLE).std_corrected / np.sqrt(2.0)


def master_quadrant_mask(
    mb_quad: np.ndarray, std_quad: np.ndarray, params: BiasParams, vstart: int = 0, vend: int = 2086
) -> tuple[np.ndarray, dict[str, float]]:
    """MASK bits of one canonical quadrant of the master bias (image area only) and the master's
    image statistics (mean, std, smooth-model peak-to-peak)."""
    mask = np.zeros(mb_quad.shape, dtype=np.uint8)
    rows = slice(max(vstart, 0), min(IMAGE_ROWS, vend))
    img = np.asarray(mb_quad[rows, IMG_COLS], dtype=np.float32)
    model = fit_poly_2d(img, degree=params.degree, nbins=params.nbins).model
    p2p = float(model.max() - model.min())
    model_mean = float(np.mean(model, dtype=np.float64))
    resid = img - model
    s = fast_clipped_stats(resid, params.nsigma, subsample=SUBSAMPLE)
    sigma = s.std_corrected
    outlier = np.abs(resid - np.float32(s.mean)) > params.mask_nsigma * sigma if sigma > 0 else np.zeros(img.shape, bool)
    std_img = np.asarray(std_quad[rows, IMG_COLS])
    med_std = float(np.median(std_img[::7, ::7]))
    noisy = std_img > params.noisy_factor * med_std if med_std > 0 else np.zeros(img.shape, bool)
    sub = mask[rows, IMG_COLS]
    sub[outlier] |= MASK_OUTLIER
    sub[noisy] |= MASK_NOISY
    stats = {"mb_img_mean": model_mean + s.mean, "mb_img_std": sigma, "mb_model_p2p": p2p,
             "n_masked": int(np.count_nonzero(sub))}
    return mask, stats


def _mean(values: list[float]) -> float:
    return float(np.mean(values))


def _with_electrons(values: dict[str, Any], gain: float | None) -> BiasQuadResult:
    out = dict(values)
    if gain:
        out["gain"] = gain
        for region in ("pre", "img", "ove", "diff"):
            v = values.get(f"ron_{region}_adu")
            out[f"ron_{region}_e"] = v * gain if v is not None else None
    return BiasQuadResult(**out)


# ----------------------------------------------------------------------------- solve


def solve(extractions: list[BiasExtraction], calib: Calibrations, params: BiasParams, run: TestRun,
          sink: ProductSink) -> AnalysisOutput:
    """BIAS results from the extractions; master bias per CCD stacked from the frame files."""
    exs = sorted(extractions, key=lambda e: e.obsids[0])
    if not exs:
        raise ValueError(f"{run.label}: no extractions to solve")
    results: dict[str, dict[str, dict[str, Any]]] = {}
    frame_rows: list[dict[str, Any]] = []
    flags = Flag(run.flags)
    figs: dict[str, Any] = {}
    provides_values: dict[str, dict[str, dict[str, float]]] = {}
    files: dict[str, str] = {}
    ccds = [c for c in ("CCD1", "CCD2", "CCD3") if any(c in e.per_ccd for e in exs)]
    for ccd in ccds:
        mine = [e for e in exs if ccd in e.per_ccd]
        cx = [e.per_ccd[ccd] for e in mine]
        obsids = [e.obsids[0] for e in mine]
        paths, shape = run.stack_paths(ccd, obsids, [c.shape for c in cx])
        geometry = Geometry.from_shape(shape)
        vstart, vend = cx[0].vstart, cx[0].vend
        n = len(paths)
        maps = [frame_row_map({q: c.quadrants[q].stack_offset for q in QUADRANTS}, geometry) for c in cx]
        stack, err = stack_frames(paths, shape, subtract_row_map(maps, geometry.quad_cols), params.stack_chunk_rows)
        if n > 1:
            err *= np.float32(np.sqrt(n) / median_error_factor(n))  # back to the pixel std across frames
            std = err
        else:
            std = np.zeros(shape, dtype=np.float32)
        del err
        ron_diff = difference_ron(paths, cx, geometry, params)
        mask = np.zeros(shape, dtype=np.uint8)
        nrows = min(IMAGE_ROWS, vend) - max(vstart, 0)
        results[ccd] = {}
        provides_values[ccd] = {}
        for q in QUADRANTS:
            qmask, mstats = master_quadrant_mask(quadrant(stack, q, geometry), quadrant(std, q, geometry), params, vstart, vend)
            quadrant(mask, q, geometry)[...] = qmask
            qs = [c.quadrants[q] for c in cx]
            spreads = [dnl_spread(x.dnl_std, nrows) for x in qs]
            off_pre = np.array([x.offset_pre for x in qs])
            values = {
                "n_frames": len(qs),
                "offset_pre": float(off_pre.mean()),
                "offset_img": _mean([x.offset_img for x in qs]),
                "offset_ove": _mean([x.offset_ove for x in qs]),
                "offset_ref": _mean([x.offset_ref for x in qs]),
                "offset_pre_scatter": float(off_pre.std(ddof=1)) if len(qs) > 1 else 0.0,
                "ron_pre_adu": _mean([x.ron_pre_adu for x in qs]),
                "ron_img_adu": _mean([x.ron_img_adu for x in qs]),
                "ron_ove_adu": _mean([x.ron_ove_adu for x in qs]),
                "ron_diff_adu": ron_diff[q],
                **mstats,
                "dnl_std_spread": _mean([s[0] for s in spreads]),
                "dnl_spread_ratio": _mean([s[1] for s in spreads]),
            }
            qr = _with_electrons(values, calib.gain(ccd, q))
            results[ccd][q] = qr.model_dump()
            lo, hi = params.ron_limits
            if not lo <= qr.ron_img_adu <= hi:
                flags |= Flag.RON_OOL
            provides_values[ccd][q] = {k: results[ccd][q][k] for k in
                                       ("offset_pre", "offset_img", "offset_ove", "offset_ref", "ron_img_adu", "mb_img_mean")}
        for o, c in zip(obsids, cx):
            for q in QUADRANTS:
                x = c.quadrants[q]
                frame_rows.append({"obsid": o, "ccd": ccd, "quadrant": q, **{k: getattr(x, k) for k in _FRAME_KEYS[3:]}})
        sink.add(ImageProduct(
            name=f"master_bias_{ccd}", ccd=ccd, extensions={"STACK": stack, "STD": std, "MASK": mask},
            header={"BUNIT": "ADU", "NCOMBINE": n, "OFFSMETH": params.offset_method,
                    "MASKBIT1": "outlier vs smooth model", "MASKBIT2": "noisy (std across frames)"},
            description="master bias: median stack of offset-subtracted frames (raw-frame orientation)",
        ))
        files[ccd] = f"master_bias_{ccd}.fits"
        sink.add(_profiles_table(ccd, obsids, cx))
        sink.add(_dnl_table(ccd, obsids, cx))
        figs[ccd] = {
            "thumb": thumbnail(stack),
            "row": {q: np.mean([c.quadrants[q].row_profile for c in cx], axis=0) for q in QUADRANTS},
            "col": {q: np.mean([c.quadrants[q].col_profile for c in cx], axis=0) for q in QUADRANTS},
            "dnl": {q: (np.concatenate([c.quadrants[q].dnl_mean for c in cx]),
                        np.concatenate([c.quadrants[q].dnl_std for c in cx])) for q in QUADRANTS},
        }
        del stack, std, mask
    sink.add(TableProduct(
        name="bias_frames",
        columns={k: [r[k] for r in frame_rows] for k in _FRAME_KEYS},
        units={k: "ADU" for k in _FRAME_KEYS if k.startswith(("offset", "ron"))},
        description="offsets and RON per frame, CCD and quadrant",
    ))
    sink.add(TableProduct(name="bias_summary", columns=_summary_columns(results),
                          description="offsets and RON per CCD and quadrant (means over frames)"))
    sink.add(FigureProduct("bias_offsets", lambda fig: _draw_per_frame(fig, frame_rows, "offset", "offset (ADU)"),
                           description="offsets per frame"))
    sink.add(FigureProduct("bias_ron", lambda fig: _draw_per_frame(fig, frame_rows, "ron", "RON (ADU)"),
                           description="RON per frame"))
    sink.add(FigureProduct("master_bias", lambda fig: _draw_masters(fig, figs), size=(14, 5),
                           description="master bias per CCD"))
    sink.add(FigureProduct("bias_profiles", lambda fig: _draw_profiles(fig, figs), size=(12, 8),
                           description="row and column profiles (mean over frames)"))
    sink.add(FigureProduct("bias_dnl", lambda fig: _draw_dnl(fig, figs), size=(12, 4.5),
                           description="prescan columns: std vs mean (DNL diagnostic)"))
    summary = [f"{'CCD':<5}{'Q':<2} {'off_pre':>9} {'off_img':>9} {'off_ove':>9} {'RON_pre':>8} {'RON_img':>8} "
               f"{'RON_ove':>8} {'RON_diff':>8}"]
    for ccd, quads in results.items():
        for q, v in quads.items():
            rd = f"{v['ron_diff_adu']:8.3f}" if v["ron_diff_adu"] is not None else f"{'-':>8}"
            summary.append(f"{ccd:<5}{q:<2} {v['offset_pre']:9.2f} {v['offset_img']:9.2f} {v['offset_ove']:9.2f} "
                           f"{v['ron_pre_adu']:8.3f} {v['ron_img_adu']:8.3f} {v['ron_ove_adu']:8.3f} {rd}")
    return AnalysisOutput(results=results, flags=int(flags), frames=frame_rows,
                          parameters=params.model_dump(mode="json"), summary=summary,
                          provides={MASTER_BIAS: {"values": provides_values, "files": files}})


_FRAME_KEYS = ("obsid", "ccd", "quadrant", "offset_ref", "offset_pre", "offset_img", "offset_ove",
               "ron_pre_adu", "ron_img_adu", "ron_ove_adu")


def _summary_columns(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, list]:
    keys = ["offset_pre", "offset_img", "offset_ove", "ron_pre_adu", "ron_img_adu", "ron_ove_adu", "ron_diff_adu", "n_masked"]
    cols: dict[str, list] = {"ccd": [], "quadrant": [], **{k: [] for k in keys}}
    for ccd, quads in results.items():
        for q, v in quads.items():
            cols["ccd"].append(ccd)
            cols["quadrant"].append(q)
            for k in keys:
                cols[k].append(v[k] if v[k] is not None else np.nan)
    return cols


def _profiles_table(ccd: str, obsids: list[int], cx: list[BiasCCDExtraction]) -> TableProduct:
    keys = sorted((o, q, i) for i, o in enumerate(obsids) for q in QUADRANTS)
    return TableProduct(
        name=f"bias_profiles_{ccd}", ccd=ccd,
        columns={
            "obsid": [k[0] for k in keys],
            "quadrant": [k[1] for k in keys],
            "row_profile": np.stack([cx[i].quadrants[q].row_profile for _, q, i in keys]),
            "col_profile": np.stack([cx[i].quadrants[q].col_profile for _, q, i in keys]),
        },
        units={"row_profile": "ADU", "col_profile": "ADU"},
        description="offset-subtracted row (mean over image columns) and column (mean over image rows) "
                    "profiles per frame and quadrant, canonical orientation",
    )


def _dnl_table(ccd: str, obsids: list[int], cx: list[BiasCCDExtraction]) -> TableProduct:
    keys = sorted((o, q, i) for i, o in enumerate(obsids) for q in QUADRANTS)
    return TableProduct(
        name=f"bias_dnl_{ccd}", ccd=ccd,
        columns={
            "obsid": [k[0] for k in keys],
            "quadrant": [k[1] for k in keys],
            "col_mean": np.stack([cx[i].quadrants[q].dnl_mean for _, q, i in keys]),
            "col_std": np.stack([cx[i].quadrants[q].dnl_std for _, q, i in keys]),
        },
        units={"col_mean": "ADU", "col_std": "ADU"},
        description="mean and std of each of the 51 prescan columns over the image rows",
    )


# ----------------------------------------------------------------------------- figures


def _draw_per_frame(fig: Any, rows: list[dict[str, Any]], prefix: str, ylabel: str) -> None:
    keys = [f"{prefix}_{r}" if prefix == "offset" else f"ron_{r}_adu" for r in ("pre", "img", "ove")]
    axes = fig.subplots(1, 3, sharex=True)
    combos = sorted({(r["ccd"], r["quadrant"]) for r in rows})
    obsids = sorted({r["obsid"] for r in rows})
    for ax, key in zip(axes, keys):
        for ccd, q in combos:
            sel = sorted((r for r in rows if r["ccd"] == ccd and r["quadrant"] == q), key=lambda r: r["obsid"])
            ax.plot([obsids.index(r["obsid"]) for r in sel], [r[key] for r in sel], marker=".", label=f"{ccd} {q}")
        ax.set_title(key)
        ax.set_xlabel("frame #")
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=6, ncol=2)


def _draw_masters(fig: Any, per_ccd: dict[str, Any]) -> None:
    axes = np.atleast_1d(fig.subplots(1, max(len(per_ccd), 1)))
    for ax, (ccd, d) in zip(axes, per_ccd.items()):
        img = d["thumb"]
        med, s = float(np.median(img)), mad_std(img)
        im = ax.imshow(img, origin="lower", cmap="viridis", vmin=med - 5 * s, vmax=med + 5 * s)
        ax.set_title(f"{ccd} master bias (ADU, 8x8 binned)")
        fig.colorbar(im, ax=ax, shrink=0.8)


def _draw_profiles(fig: Any, per_ccd: dict[str, Any]) -> None:
    ax_row, ax_col = fig.subplots(2, 1)
    kernel = np.ones(16) / 16.0
    for ccd, d in per_ccd.items():
        for q in QUADRANTS:
            ax_row.plot(np.convolve(d["row"][q], kernel, mode="valid"), lw=0.7, label=f"{ccd} {q}")
            ax_col.plot(np.convolve(d["col"][q], kernel, mode="valid"), lw=0.7, label=f"{ccd} {q}")
    ax_row.set_title("running mean of 16", fontsize=8)
    ax_row.set_xlabel("row (canonical)")
    ax_row.set_ylabel("mean - offset_pre (ADU)")
    ax_col.set_xlabel("column (canonical; 0-50 prescan)")
    ax_col.set_ylabel("mean - offset_pre (ADU)")
    ax_row.legend(fontsize=6, ncol=6)


def _draw_dnl(fig: Any, per_ccd: dict[str, Any]) -> None:
    axes = np.atleast_1d(fig.subplots(1, max(len(per_ccd), 1)))
    for ax, (ccd, d) in zip(axes, per_ccd.items()):
        for q in QUADRANTS:
            mean, std = d["dnl"][q]
            ax.plot(mean - np.median(mean), std, ".", ms=2, label=q)
        ax.set_title(f"{ccd} prescan columns")
        ax.set_xlabel("column mean - median (ADU)")
        ax.set_ylabel("column std (ADU)")
        ax.legend(fontsize=7)


FAMILY = Family(
    name="bias",
    tests=TESTS,
    params=BiasParams,
    extract=extract,
    solve=solve,
    unit="exposure",
    extraction=BiasExtraction,
    needs=(Need(GAIN, "rerun", ("PTC01",)),),
    provides=(MASTER_BIAS,),
    version=VERSION,
    result=BiasQuadResult,
)
