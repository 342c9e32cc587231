"""BIAS01 / BIAS02: offsets, read noise, profiles, master bias, prescan DNL diagnostic.

Per frame, CCD and quadrant (canonical orientation, standard regions of ``formats.md``):
- offsets ``offset_pre`` / ``offset_img`` / ``offset_ove`` = sigma-clipped mean (ADU; a mean, not
  a median, so that digitised data give sub-ADU accuracy);
- read noise ``ron_pre_adu`` / ``ron_ove_adu`` = clipped std (clipping-corrected) of the
  region; ``ron_img_adu`` = the same after removing a smooth 2-D model of the image area
  (Legendre polynomial of total degree 5 fitted to binned medians). The RON is the std of the
  digitised data as measured: the ADC's 1/12 ADU^2 is included;
- row / column profiles (mean over image columns / rows, offset-subtracted), prescan-column
  means and stds (the differential non-linearity diagnostic).
Per CCD: master bias = median stack of the offset-subtracted frames (extensions STACK, STD, MASK;
raw-frame orientation), quadrant summaries (mean over frames).

Pure: frames come in as arrays (through ``TestData.load``), products go out to a sink.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
from pydantic import BaseModel, Field

from services.analyzer.analysis.common import clipped_stats, fit_smooth_2d, mad_std, params_of, subtract_offset
from services.analyzer.analysis.dark import reference_offset
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
from shared.geometry import (
    IMAGE_ROWS,
    PRESCAN_COLS,
    QUADRANTS,
    STANDARD_TRIMS,
    Geometry,
    quadrant,
    standard_region,
)

TESTS = ("BIAS01", "BIAS02")

#: Mask bits of the master bias MASK extension.
MASK_OUTLIER = 1  # |master - smooth model| > mask_nsigma x robust std
MASK_NOISY = 2  # pixel std across frames > noisy_factor x median std
#: clipping bounds iterated on every 17th pixel (prime: no column aliasing) of large regions, statistics on all pixels
SUBSAMPLE = 17


class BiasParams(BaseModel):
    """Analysis parameters of BIAS01/02 (defaults are the campaign's)."""

    nsigma: float = Field(4.0, description="sigma-clipping threshold of offsets and RON")
    degree: int = Field(5, description="total degree of the smooth 2-D model of the image area")
    nbins: tuple[int, int] = Field((32, 32), description="bins (rows, cols) of the smooth-model fit")
    offset_method: str = Field("global", description="offset subtracted before stacking: global (clipped mean of "
                               "the prescan, per frame and quadrant) | row (per-row prescan median, adds row noise)")
    mask_nsigma: float = Field(6.0, description="master-bias outlier threshold (robust sigmas)")
    noisy_factor: float = Field(5.0, description="pixel std / median std above which a pixel is noisy")
    ron_limits: tuple[float, float] = Field((0.86, 1.44), description="RON (ADU) outside which RON_OOL is flagged")
    stack_chunk_rows: int = Field(256, description="rows per chunk of the median stack (memory bound)")


class BiasFrameQuad(BaseModel):
    """Statistics of one frame's quadrant (ADU)."""

    obsid: int
    ccd: str
    quadrant: str
    offset_ref: float = Field(description="clipped mean of all virtual pixels (pre, ove, parallel overscan)")
    offset_pre: float
    offset_img: float
    offset_ove: float
    ron_pre_adu: float
    ron_img_adu: float
    ron_ove_adu: float


class BiasQuadResult(BaseModel):
    """Per-quadrant result of a BIAS test (means over frames; ADU unless named ``_e``)."""

    n_frames: int
    offset_pre: float
    offset_img: float
    offset_ove: float
    offset_ref: float = Field(description="clipped mean of all virtual pixels (pre, ove, parallel overscan)")
    offset_pre_scatter: float = Field(description="frame-to-frame std of offset_pre (ADU)")
    ron_pre_adu: float
    ron_img_adu: float
    ron_ove_adu: float
    ron_pre_e: float | None = None
    ron_img_e: float | None = None
    ron_ove_e: float | None = None
    gain: float | None = Field(None, description="gain used for the e- values (e-/ADU)")
    mb_img_mean: float = Field(description="clipped mean of the master bias image area (offset-subtracted)")
    mb_img_std: float = Field(description="clipped std of the master bias image area")
    mb_model_p2p: float = Field(description="peak-to-peak of the smooth model of the master bias image (gradient)")
    n_masked: int = Field(description="pixels of the image area set in MASK")
    dnl_std_spread: float = Field(description="std of the trimmed prescan column stds (ADU)")
    dnl_spread_ratio: float = Field(description="dnl_std_spread / its expectation without DNL (~1 when none)")


# ----------------------------------------------------------------------------- per quadrant


def region_offset_noise(quad: np.ndarray, name: str, nsigma: float, vstart: int = 0, vend: int = 2086) -> tuple[float, float]:
    """(clipped mean, clipping-corrected clipped std) in ADU of a standard region."""
    s = clipped_stats(standard_region(quad, name, vstart, vend), nsigma, subsample=SUBSAMPLE)
    return s.mean, s.std_corrected


def image_ron(quad: np.ndarray, params: BiasParams, vstart: int = 0, vend: int = 2086) -> tuple[float, float, np.ndarray]:
    """(offset, RON, model) of the standard image region (ADU): RON = clipped std of the image
    minus its smooth 2-D model; offset = mean of the model + clipped mean of that residual (the
    clipped mean of the image, without clipping real gradients)."""
    img = standard_region(quad, "img", vstart, vend)
    model = fit_smooth_2d(img, degree=params.degree, nbins=params.nbins).model
    resid = np.asarray(img, dtype=np.float32) - model
    s_res = clipped_stats(resid, params.nsigma, subsample=SUBSAMPLE)
    return float(model.mean(dtype=np.float64)) + s_res.mean, s_res.std_corrected, model


def frame_quadrant_stats(quad: np.ndarray, params: BiasParams, vstart: int = 0, vend: int = 2086) -> dict[str, float]:
    """Offsets and RON of one canonical quadrant of a bias frame (ADU)."""
    off_pre, ron_pre = region_offset_noise(quad, "pre", params.nsigma, vstart, vend)
    off_ove, ron_ove = region_offset_noise(quad, "ove", params.nsigma, vstart, vend)
    off_img, ron_img, _ = image_ron(quad, params, vstart, vend)
    return {
        "offset_ref": reference_offset(quad, params.nsigma, vstart, vend),
        "offset_pre": off_pre,
        "offset_img": off_img,
        "offset_ove": off_ove,
        "ron_pre_adu": ron_pre,
        "ron_img_adu": ron_img,
        "ron_ove_adu": ron_ove,
    }


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
    mean over image rows), offset-subtracted, ADU, canonical orientation."""
    rows = slice(max(vstart, 0), min(IMAGE_ROWS, vend))
    img_cols = slice(PRESCAN_COLS, PRESCAN_COLS + 2048)
    row_prof = np.asarray(quad[:, img_cols], dtype=np.float64).mean(axis=1) - offset
    col_prof = np.asarray(quad[rows, :], dtype=np.float64).mean(axis=0) - offset
    return row_prof.astype(np.float32), col_prof.astype(np.float32)


# ----------------------------------------------------------------------------- stacking


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


def master_quadrant_mask(
    mb_quad: np.ndarray, std_quad: np.ndarray, params: BiasParams, vstart: int = 0, vend: int = 2086
) -> tuple[np.ndarray, dict[str, float]]:
    """MASK bits of one canonical quadrant of the master bias (image area only) and the master's
    image statistics (mean, std, smooth-model peak-to-peak)."""
    mask = np.zeros(mb_quad.shape, dtype=np.uint8)
    rows = slice(max(vstart, 0), min(IMAGE_ROWS, vend))
    cols = slice(PRESCAN_COLS, PRESCAN_COLS + 2048)
    img = np.asarray(mb_quad[rows, cols], dtype=np.float32)
    model = fit_smooth_2d(img, degree=params.degree, nbins=params.nbins).model
    resid = img - model
    s = clipped_stats(resid, params.nsigma, subsample=SUBSAMPLE)
    sigma = s.std_corrected
    outlier = np.abs(resid - s.mean) > params.mask_nsigma * sigma if sigma > 0 else np.zeros(img.shape, bool)
    std_img = np.asarray(std_quad[rows, cols])
    med_std = float(np.median(std_img[::7, ::7]))
    noisy = std_img > params.noisy_factor * med_std if med_std > 0 else np.zeros(img.shape, bool)
    sub = mask[rows, cols]
    sub[outlier] |= MASK_OUTLIER
    sub[noisy] |= MASK_NOISY
    stats = {
        "mb_img_mean": float(model.mean(dtype=np.float64)) + s.mean,
        "mb_img_std": sigma,
        "mb_model_p2p": float(model.max() - model.min()),
        "n_masked": int(np.count_nonzero(sub)),
    }
    return mask, stats


# ----------------------------------------------------------------------------- per CCD


@dataclass
class BiasCCDResult:
    """Everything computed for one CCD."""

    ccd: str
    frames: list[BiasFrameQuad]
    quads: dict[str, dict[str, Any]]
    stack: np.ndarray
    std: np.ndarray
    mask: np.ndarray
    row_profiles: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    col_profiles: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    dnl_mean: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)
    dnl_std: dict[tuple[int, str], np.ndarray] = field(default_factory=dict)


def analyze_bias_ccd(
    ccd: str, frames: Iterable[tuple[FrameMeta, np.ndarray]], n_frames: int, params: BiasParams | None = None
) -> BiasCCDResult:
    """All BIAS statistics of one CCD from its ``n_frames`` frames (``(meta, full-frame array)``
    pairs, streamed: each array is used then dropped). Master bias in raw-frame orientation."""
    params = params or BiasParams()
    rows_out: list[BiasFrameQuad] = []
    stack: np.ndarray | None = None
    geometry: Geometry | None = None
    row_profiles, col_profiles, dnl_mean, dnl_std = {}, {}, {}, {}
    vstart, vend = 0, 2086
    for i, (meta, data) in enumerate(frames):
        if i >= n_frames:
            raise ValueError(f"{ccd}: more frames than announced ({n_frames})")
        g = Geometry.from_shape(data.shape)
        if geometry is None:
            geometry = g
            stack = np.empty((n_frames, *data.shape), dtype=np.float32)
            vstart, vend = meta.vstart, meta.vend
        elif g != geometry:
            raise ValueError(f"{ccd} ObsID {meta.obsid}: frame shape {data.shape} differs from the first frame's {geometry.shape}")
        for q in QUADRANTS:
            quad = quadrant(data, q, geometry)
            st = frame_quadrant_stats(quad, params, vstart, vend)
            rows_out.append(BiasFrameQuad(obsid=meta.obsid, ccd=ccd, quadrant=q, **st))
            row_profiles[(meta.obsid, q)], col_profiles[(meta.obsid, q)] = quadrant_profiles(quad, st["offset_pre"], vstart, vend)
            dnl_mean[(meta.obsid, q)], dnl_std[(meta.obsid, q)] = prescan_columns(quad, vstart, vend)
            if params.offset_method == "row":
                quadrant(stack[i], q, geometry)[...] = subtract_offset(quad, "row")
            else:
                quadrant(stack[i], q, geometry)[...] = quad - np.float32(st["offset_pre"])
        del data
    if stack is None or geometry is None:
        raise ValueError(f"{ccd}: no frames")
    n = len({r.obsid for r in rows_out})
    if n != n_frames:
        stack = stack[:n]
    mb, std = median_stack(stack, params.stack_chunk_rows)
    del stack
    mask = np.zeros(mb.shape, dtype=np.uint8)
    quads: dict[str, dict[str, Any]] = {}
    nrows = min(IMAGE_ROWS, vend) - max(vstart, 0)
    for q in QUADRANTS:
        qmask, mstats = master_quadrant_mask(quadrant(mb, q, geometry), quadrant(std, q, geometry), params, vstart, vend)
        quadrant(mask, q, geometry)[...] = qmask
        sel = [r for r in rows_out if r.quadrant == q]
        spreads = [dnl_spread(dnl_std[(r.obsid, q)], nrows) for r in sel]
        off_pre = np.array([r.offset_pre for r in sel])
        quads[q] = {
            "n_frames": len(sel),
            "offset_pre": float(off_pre.mean()),
            "offset_img": float(np.mean([r.offset_img for r in sel])),
            "offset_ove": float(np.mean([r.offset_ove for r in sel])),
            "offset_ref": float(np.mean([r.offset_ref for r in sel])),
            "offset_pre_scatter": float(off_pre.std(ddof=1)) if len(sel) > 1 else 0.0,
            "ron_pre_adu": float(np.mean([r.ron_pre_adu for r in sel])),
            "ron_img_adu": float(np.mean([r.ron_img_adu for r in sel])),
            "ron_ove_adu": float(np.mean([r.ron_ove_adu for r in sel])),
            **mstats,
            "dnl_std_spread": float(np.mean([s[0] for s in spreads])),
            "dnl_spread_ratio": float(np.mean([s[1] for s in spreads])),
        }
    return BiasCCDResult(ccd, rows_out, quads, mb, std, mask, row_profiles, col_profiles, dnl_mean, dnl_std)


# ----------------------------------------------------------------------------- test level


def _with_electrons(values: dict[str, Any], gain: float | None) -> BiasQuadResult:
    out = dict(values)
    if gain:
        out["gain"] = gain
        for region in ("pre", "img", "ove"):
            out[f"ron_{region}_e"] = values[f"ron_{region}_adu"] * gain
    return BiasQuadResult(**out)


def run_test(data: TestData, sink: ProductSink) -> AnalysisOutput:
    """BIAS01 / BIAS02 analysis of a whole test: per-CCD products to ``sink``, results out."""
    params = params_of(BiasParams, data.params)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    frame_rows: list[dict[str, Any]] = []
    flags = Flag(0)
    figs: dict[str, Any] = {"ccd": {}}
    for ccd in data.ccds():
        metas = data.frames_of(ccd)
        res = analyze_bias_ccd(ccd, ((m, data.load(m)) for m in metas), len(metas), params)
        results[ccd] = {}
        for q in QUADRANTS:
            qr = _with_electrons(res.quads[q], data.gain(ccd, q))
            results[ccd][q] = qr.model_dump()
            lo, hi = params.ron_limits
            if not lo <= qr.ron_img_adu <= hi:
                flags |= Flag.RON_OOL
        frame_rows += [r.model_dump() for r in res.frames]
        sink.add(
            ImageProduct(
                name=f"master_bias_{ccd}",
                ccd=ccd,
                extensions={"STACK": res.stack, "STD": res.std, "MASK": res.mask},
                header={"BUNIT": "ADU", "NCOMBINE": len(metas), "OFFSMETH": params.offset_method,
                        "MASKBIT1": "outlier vs smooth model", "MASKBIT2": "noisy (std across frames)"},
                description="master bias: median stack of offset-subtracted frames (raw-frame orientation)",
            )
        )
        sink.add(_profiles_table(res))
        sink.add(_dnl_table(res))
        figs["ccd"][ccd] = {
            "thumb": _thumbnail(res.stack),
            "row": {q: np.mean([res.row_profiles[(m.obsid, q)] for m in metas], axis=0) for q in QUADRANTS},
            "col": {q: np.mean([res.col_profiles[(m.obsid, q)] for m in metas], axis=0) for q in QUADRANTS},
            "dnl": {q: (np.concatenate([res.dnl_mean[(m.obsid, q)] for m in metas]),
                        np.concatenate([res.dnl_std[(m.obsid, q)] for m in metas])) for q in QUADRANTS},
        }
        del res
    if not results:
        raise ValueError(f"{data.label}: no frames to analyse")
    sink.add(TableProduct(
        name="bias_frames",
        columns={k: [r[k] for r in frame_rows] for k in BiasFrameQuad.model_fields},
        units={k: "ADU" for k in BiasFrameQuad.model_fields if k.startswith(("offset", "ron"))},
        description="offsets and RON per frame, CCD and quadrant",
    ))
    sink.add(TableProduct(
        name="bias_summary",
        columns=_summary_columns(results),
        description="offsets and RON per CCD and quadrant (means over frames)",
    ))
    sink.add(FigureProduct("bias_offsets", lambda fig: _draw_per_frame(fig, frame_rows, "offset", "offset (ADU)"),
                           description="offsets per frame"))
    sink.add(FigureProduct("bias_ron", lambda fig: _draw_per_frame(fig, frame_rows, "ron", "RON (ADU)"),
                           description="RON per frame"))
    sink.add(FigureProduct("master_bias", lambda fig: _draw_masters(fig, figs["ccd"]), size=(14, 5),
                           description="master bias per CCD"))
    sink.add(FigureProduct("bias_profiles", lambda fig: _draw_profiles(fig, figs["ccd"]), size=(12, 8),
                           description="row and column profiles (mean over frames)"))
    sink.add(FigureProduct("bias_dnl", lambda fig: _draw_dnl(fig, figs["ccd"]), size=(12, 4.5),
                           description="prescan columns: std vs mean (DNL diagnostic)"))
    summary = [f"{'CCD':<5}{'Q':<2} {'off_pre':>9} {'off_img':>9} {'off_ove':>9} {'RON_pre':>8} {'RON_img':>8} {'RON_ove':>8}"]
    for ccd, quads in results.items():
        for q, v in quads.items():
            summary.append(f"{ccd:<5}{q:<2} {v['offset_pre']:9.2f} {v['offset_img']:9.2f} {v['offset_ove']:9.2f} "
                           f"{v['ron_pre_adu']:8.3f} {v['ron_img_adu']:8.3f} {v['ron_ove_adu']:8.3f}")
    return AnalysisOutput(results=results, flags=int(flags), frames=frame_rows,
                          parameters=params.model_dump(mode="json"), summary=summary)


def _summary_columns(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, list]:
    keys = ["offset_pre", "offset_img", "offset_ove", "ron_pre_adu", "ron_img_adu", "ron_ove_adu", "n_masked"]
    cols: dict[str, list] = {"ccd": [], "quadrant": [], **{k: [] for k in keys}}
    for ccd, quads in results.items():
        for q, v in quads.items():
            cols["ccd"].append(ccd)
            cols["quadrant"].append(q)
            for k in keys:
                cols[k].append(v[k])
    return cols


def _profiles_table(res: BiasCCDResult) -> TableProduct:
    keys = sorted(res.row_profiles)
    return TableProduct(
        name=f"bias_profiles_{res.ccd}",
        ccd=res.ccd,
        columns={
            "obsid": [k[0] for k in keys],
            "quadrant": [k[1] for k in keys],
            "row_profile": np.stack([res.row_profiles[k] for k in keys]),
            "col_profile": np.stack([res.col_profiles[k] for k in keys]),
        },
        units={"row_profile": "ADU", "col_profile": "ADU"},
        description="offset-subtracted row (mean over image columns) and column (mean over image rows) "
                    "profiles per frame and quadrant, canonical orientation",
    )


def _dnl_table(res: BiasCCDResult) -> TableProduct:
    keys = sorted(res.dnl_mean)
    return TableProduct(
        name=f"bias_dnl_{res.ccd}",
        ccd=res.ccd,
        columns={
            "obsid": [k[0] for k in keys],
            "quadrant": [k[1] for k in keys],
            "col_mean": np.stack([res.dnl_mean[k] for k in keys]),
            "col_std": np.stack([res.dnl_std[k] for k in keys]),
        },
        units={"col_mean": "ADU", "col_std": "ADU"},
        description="mean and std of each of the 51 prescan columns over the image rows",
    )


def _thumbnail(image: np.ndarray, factor: int = 8) -> np.ndarray:
    ny, nx = (s // factor * factor for s in image.shape)
    return image[:ny, :nx].reshape(ny // factor, factor, nx // factor, factor).mean(axis=(1, 3)).astype(np.float32)


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


#: Parameters model of this plug-in (the runner records the resolved values as provenance).
PARAMS = BiasParams
