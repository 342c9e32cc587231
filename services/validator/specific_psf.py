"""Test-specific checks of the point-source and persistence tests (campaign.md, the tests table),
per exposure:

- FOCUS00_<nm>: background (image - prescan median) in [-5, 10] ADU (BGD_OOL); spot FWHM (median
  over the quadrant's spots) in 0.5 .. 10 px (FOCUS_OOL);
- PSF01_<nm> / PSF02: background in [-1, 5] ADU (BGD_OOL); FWHM in 1.2 .. 3.0 px (FOCUS_OOL);
  spot peak (median of the spots' highest pixel above the local background) within [0.7, 1.3] x
  ``exptime / tFWC_point x 2^16`` (FLUENCE_OOL); no spot in a shutter-open frame: SOURCEOFF,
  fewer than 5: STARS_MISSING;
- PERSIST01: saturated fraction of the saturating exposure (shutter open) over the 3 CCDs in
  0.002 .. 0.2 (SATURATION); dark background (shutter closed, t > 0: image - prescan) in
  0 .. 200 ADU (BGD_OOL).

Spot measurements come from the validator's per-CCD work (:func:`add_spot_stats`, called by
``services.validator.worker``): per quadrant a few spots found on a 16 x 16 block-maximum map and
sized by the second moments of their marginal profiles (about 25 ms per quadrant), stored under
``stats[Q]["spots"]``. Leaves go under ``compliance["test"]``: ``background.<CCD>.<Q>``,
``fwhm.<CCD>.<Q>`` (median), ``spot_fwhm.<CCD>.<Q>.<k>`` (each spot), ``peak.<CCD>.<Q>``
(ratio), ``spots.<CCD>.<Q>`` (count), ``saturation``.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from shared.flags import Flag
from shared.geometry import IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, QUADRANTS, Geometry, quadrant

FULL_SCALE = 65536.0
FWHM_SIGMA = 2.3548200450309493
BLOCK = 16
MAX_SPOTS = 10
FOCUS_BGD_ADU = (-5.0, 10.0)
FOCUS_FWHM_PX = (0.5, 10.0)
PSF_BGD_ADU = (-1.0, 5.0)
PSF_FWHM_PX = (1.2, 3.0)
PSF_PEAK_RATIO = (0.7, 1.3)
PERSIST_SATURATED = (0.002, 0.2)
PERSIST_DARK_BGD_ADU = (0.0, 200.0)
SPOTS_EXPECTED = 5


def _num(value: Any, default: float = float("nan")) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _leaf(value: float | None, lo: float | None, hi: float | None) -> dict[str, Any]:
    v = None if value is None or not math.isfinite(value) else float(value)
    ok = v is not None and (lo is None or v >= lo) and (hi is None or v <= hi)
    return {"passed": bool(ok), "value": v, "lo": lo, "hi": hi}


def lit(values: Mapping[str, Any]) -> bool:
    """Shutter open with an exposure time > 0: ``shuttr`` when given (the 7.5.X exposure log does
    not carry it), else the point-source mirror ``mirr_on`` (1 in FOCUS / PSF frames and in
    PERSIST01's saturating exposure, 0 in its darks)."""
    get = lambda k: values.get(k, values.get(k.upper()))  # noqa: E731 - FITS headers upper-case the keys
    if _num(get("exptime"), 0.0) <= 0:
        return False
    shutter = get("shuttr")
    return bool(_num(shutter, 0.0)) if shutter not in (None, "") else bool(_num(get("mirr_on"), 0.0))


def is_point_frame(header: Mapping[str, Any]) -> bool:
    """A shutter-open point-source exposure, from the FITS header (the exposure-log values)."""
    source = str(header.get("SOURCE", header.get("source", "")) or "").lower()
    return source.startswith("point") and lit(header)


def quadrant_spots(img: np.ndarray, noise: float, max_spots: int = MAX_SPOTS) -> dict[str, Any]:
    """Spot summary of an image area (ADU): ``n``, median ``fwhm_px`` (sqrt of the mean of the x
    and y marginal variances, x 2.3548) and median ``peak_adu`` (highest pixel above the local
    background) of the spots above 20 x ``noise`` on the 16 x 16 block-maximum map."""
    rows, cols = (img.shape[0] // BLOCK) * BLOCK, (img.shape[1] // BLOCK) * BLOCK
    strips = np.maximum.reduce([img[i:rows:BLOCK, :cols] for i in range(BLOCK)])  # (rows / 16, cols): fast on any strides
    blocks = np.maximum.reduce([strips[:, j::BLOCK] for j in range(BLOCK)])
    level = float(np.median(blocks))
    cand = np.argwhere(blocks > level + max(20.0 * noise, 30.0))
    if cand.size == 0:
        return {"n": 0, "fwhm_px": None, "peak_adu": None}
    order = np.argsort(-blocks[cand[:, 0], cand[:, 1]])
    taken: list[tuple[int, int]] = []
    fwhms, peaks = [], []
    for i in order:
        by, bx = (int(v) for v in cand[i])
        if any(abs(by - a) <= 2 and abs(bx - b) <= 2 for a, b in taken):
            continue
        taken.append((by, bx))
        r0, c0 = by * BLOCK, bx * BLOCK
        sub = img[r0:r0 + BLOCK, c0:c0 + BLOCK]
        rr, cc = np.unravel_index(int(np.argmax(sub)), sub.shape)
        y, x = r0 + rr, c0 + cc
        h = 16
        if y - h < 0 or x - h < 0 or y + h >= img.shape[0] or x + h >= img.shape[1]:
            continue
        cut = np.asarray(img[y - h:y + h + 1, x - h:x + h + 1], dtype=np.float64)
        border = np.concatenate([cut[0], cut[-1], cut[:, 0], cut[:, -1]])
        bgd = float(np.median(border))
        cut -= bgd
        peak = float(cut[h, h])
        half = int(min(h, max(3, math.ceil(3 * math.sqrt(max(np.count_nonzero(cut > 0.5 * peak), 1) / math.pi)))))
        win = cut[h - half:h + half + 1, h - half:h + half + 1]
        prof_x, prof_y = win.sum(axis=0), win.sum(axis=1)
        t = np.arange(-half, half + 1, dtype=np.float64)
        var = []
        for p in (prof_x, prof_y):
            s = p.sum()
            if s <= 0:
                break
            m = (p * t).sum() / s
            var.append(max((p * (t - m) ** 2).sum() / s, 1e-6))
        if len(var) == 2:
            fwhms.append(FWHM_SIGMA * math.sqrt(0.5 * (var[0] + var[1])))
            peaks.append(peak)
        if len(taken) >= max_spots:
            break
    # crosstalk ghosts (< 1e-3 of a spot) and faint detections are not spots
    if peaks:
        top = max(peaks)
        keep = [k for k, p in enumerate(peaks) if p >= 0.05 * top]
        fwhms, peaks = [fwhms[k] for k in keep], [peaks[k] for k in keep]
    return {"n": len(peaks), "fwhm_px": float(np.median(fwhms)) if fwhms else None,
            "peak_adu": float(np.median(peaks)) if peaks else None,
            "fwhm_each_px": [round(f, 4) for f in fwhms], "peak_each_adu": [round(p, 1) for p in peaks]}


def add_spot_stats(data: np.ndarray, stats: dict[str, dict[str, Any]]) -> None:
    """``stats[Q]["spots"]`` for the four quadrants of a point-source frame (in place)."""
    g = Geometry.from_shape(data.shape)
    for q in QUADRANTS:
        quad = quadrant(data, q, g)
        pre = stats[q].get("pre", {})
        img = quad[:IMAGE_ROWS, PRESCAN_COLS:PRESCAN_COLS + IMAGE_COLS]
        noise = _num(pre.get("noise"), 1.5)
        stats[q]["spots"] = quadrant_spots(img, noise if math.isfinite(noise) and noise > 0 else 1.5)


def _t_point(row: Mapping[str, Any], chamber: Mapping[str, Any]) -> float | None:
    try:
        nm = chamber["FW"][f"F{int(_num(row.get('wave'), 4))}"]
        return float(chamber["tFWC_point"][f"nm{int(nm)}"])
    except (KeyError, TypeError, ValueError):
        return None


def assess_point_tests(test: str, stats: Mapping[str, Mapping[str, Mapping[str, Any]]], rows: Mapping[str, Mapping[str, Any]],
                       chamber: Mapping[str, Any] | None, tree: dict[str, Any], notes: list[str]) -> Flag:
    """The checks of the module docstring for one exposure; leaves added to ``tree``."""
    base = (test or "").strip().upper().split(".")[0]
    flags = Flag(0)
    if base.startswith("PERSIST01"):
        sat = npix = 0
        open_ = False
        for ccd, quads in stats.items():
            row = rows.get(ccd) or {}
            t, shutter = _num(row.get("exptime"), 0.0), lit(row)
            for q, s in quads.items():
                if shutter:
                    open_ = True
                    sat += int(s.get("saturated", 0))
                    npix += int(s.get("npix", 0))
                elif t > 0:
                    node = _leaf(_num(s["img"]["offset"]) - _num(s["pre"]["offset"]), *PERSIST_DARK_BGD_ADU)
                    tree.setdefault("background", {}).setdefault(ccd, {})[q] = node
                    if not node["passed"]:
                        flags |= Flag.BGD_OOL
        if open_ and npix:
            node = _leaf(sat / npix, *PERSIST_SATURATED)
            tree["saturation"] = node
            if not node["passed"]:
                flags |= Flag.SATURATION
        return flags
    focus = base.startswith("FOCUS00")
    if not (focus or base.startswith(("PSF01", "PSF02"))):
        return flags
    bgd_lim, fwhm_lim = (FOCUS_BGD_ADU, FOCUS_FWHM_PX) if focus else (PSF_BGD_ADU, PSF_FWHM_PX)
    for ccd, quads in stats.items():
        row = rows.get(ccd) or {}
        if not lit(row):
            continue
        tfw = _t_point(row, chamber or {})
        expected = _num(row.get("exptime"), 0.0) / tfw * FULL_SCALE if tfw else None
        for q, s in quads.items():
            node = _leaf(_num(s["img"]["offset"]) - _num(s["pre"]["offset"]), *bgd_lim)
            tree.setdefault("background", {}).setdefault(ccd, {})[q] = node
            if not node["passed"]:
                flags |= Flag.BGD_OOL
            spots = s.get("spots")
            if spots is None:
                notes.append(f"{ccd} {q}: no spot measurement (frame header does not say point source): spots not checked")
                continue
            count = _leaf(float(spots["n"]), SPOTS_EXPECTED, None)
            tree.setdefault("spots", {}).setdefault(ccd, {})[q] = count
            if spots["n"] == 0:
                flags |= Flag.SOURCEOFF
                continue
            if not count["passed"]:
                flags |= Flag.STARS_MISSING
            node = _leaf(spots["fwhm_px"], *fwhm_lim)
            tree.setdefault("fwhm", {}).setdefault(ccd, {})[q] = node
            each = {str(k): _leaf(f, *fwhm_lim) for k, f in enumerate(spots.get("fwhm_each_px", []))}
            tree.setdefault("spot_fwhm", {}).setdefault(ccd, {})[q] = each  # spot-level leaves
            if not node["passed"] or not all(leaf["passed"] for leaf in each.values()):
                flags |= Flag.FOCUS_OOL
            if not focus:
                if expected:
                    node = _leaf(spots["peak_adu"] / expected, *PSF_PEAK_RATIO)
                    tree.setdefault("peak", {}).setdefault(ccd, {})[q] = node
                    if not node["passed"]:
                        flags |= Flag.FLUENCE_OOL
                else:
                    notes.append(f"{ccd}: no tFWC_point for wave={row.get('wave')}: spot peak not checked")
    return flags


__all__ = ["add_spot_stats", "assess_point_tests", "is_point_frame", "lit", "quadrant_spots"]
