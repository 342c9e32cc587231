"""Point sources of the simulator (families.md, "Point sources"): the spot mask, the focus law,
the slightly elliptical near-Gaussian profile integrated over pixels and the brighter-fatter
growth of the spots. Pure functions; the per-block truth is drawn by
:class:`services.sim.physics.DetectorModel` and recorded in ``truth.json``.

Coordinates: canonical quadrant orientation, image area (``x`` = image column 0..2047, ``y`` =
image row 0..2065), pixel centres at integers.

Profile of a spot (axis-aligned elliptical Gaussian, pixel-integrated): optical variances
``sigma_x^2 = s^2 (1 + e)``, ``sigma_y^2 = s^2 (1 - e)`` with ``2.3548 s = FWHM(lambda, z) =
fwhm_lambda sqrt(1 + ((z - z_best) / 0.2 mm)^2)``. The *pixel-sampled* FWHM (what a Gaussian fit
on pixels measures) is ``F = 2.3548 sqrt(s^2 + 1/12)`` (mean over x and y of the squares); the
*amplitude* of the pixel-sampled Gaussian is ``A = flux / (2 pi sx_p sy_p)`` with ``sx_p^2 =
sigma_x^2 + 1/12``. Brighter-fatter on spots: ``F = F_0 + k A / 10^4`` (``k`` =
``bf_slope_px_per_10k``, px per 10 000 ADU of amplitude, per quadrant), solved self-consistently.
The flux is set so that an in-focus spot without brighter-fatter, centred on a pixel, peaks at
``exptime / tFWC_point x 2^16`` ADU at the reference gain (the chamber's definition).
"""

from __future__ import annotations

import math

import numpy as np
from pydantic import BaseModel, Field
from scipy.special import erf

from shared.geometry import IMAGE_COLS, IMAGE_ROWS

FWHM_SIGMA = 2.3548200450309493
FOCUS_SCALE_MM = 0.2  # FWHM grows by sqrt(2) at 0.2 mm from best focus
SPOTS_PER_QUADRANT = 5
SPOT_MARGIN_PX = 200  # spots this far from the image-area edges
SPOT_SEPARATION_PX = 150  # minimum distance between any two spots of the 12 quadrants (canonical)
SUBPIXEL_JITTER = 0.2  # spot centres within +/- this of a pixel centre (peak checks stay meaningful)


class QuadSpots(BaseModel):
    """The spots of one quadrant (canonical image-area coordinates, px) and their profile."""

    x: list[float] = Field(description="image column of each spot centre (canonical, prescan excluded)")
    y: list[float] = Field(description="image row of each spot centre (canonical)")
    ellipticity: float = Field(description="e: sigma_x^2 = s^2 (1 + e), sigma_y^2 = s^2 (1 - e) (optical, axis-aligned)")
    bf_slope_px_per_10k: float = Field(description="brighter-fatter: pixel-sampled FWHM growth per 10 000 ADU of amplitude (px)")


class PointTruth(BaseModel):
    """Point-source truth of one CCD."""

    z_best_offset_mm: float = Field(description="best-focus mirror position = mirror_nom (chamber, per filter) + this (mm)")
    quadrants: dict[str, QuadSpots]


def draw_positions(rng: np.random.Generator, n_quadrants: int = 12, per_quadrant: int = SPOTS_PER_QUADRANT) -> np.ndarray:
    """Spot centres ``(n_quadrants, per_quadrant, 2)`` as (x, y) image-area px: inside the margin,
    all mutually >= SPOT_SEPARATION_PX apart in canonical coordinates (so that a source's spots
    never overlap a victim's own spots at the same canonical position), sub-pixel offsets within
    +/- SUBPIXEL_JITTER of a pixel centre."""
    pts: list[tuple[float, float]] = []
    lo_x, hi_x = SPOT_MARGIN_PX, IMAGE_COLS - 1 - SPOT_MARGIN_PX
    lo_y, hi_y = SPOT_MARGIN_PX, IMAGE_ROWS - 1 - SPOT_MARGIN_PX
    need = n_quadrants * per_quadrant
    for _ in range(200 * need):
        if len(pts) == need:
            break
        x = float(rng.integers(lo_x, hi_x)) + float(rng.uniform(-SUBPIXEL_JITTER, SUBPIXEL_JITTER))
        y = float(rng.integers(lo_y, hi_y)) + float(rng.uniform(-SUBPIXEL_JITTER, SUBPIXEL_JITTER))
        if all((x - a) ** 2 + (y - b) ** 2 >= SPOT_SEPARATION_PX**2 for a, b in pts):
            pts.append((round(x, 3), round(y, 3)))
    if len(pts) < need:  # pragma: no cover - the image area holds far more
        raise RuntimeError("could not place the spot mask")
    return np.asarray(pts).reshape(n_quadrants, per_quadrant, 2)


def fwhm_optical(fwhm_lambda: float, z_mm: float, z_best_mm: float) -> float:
    """Optical FWHM (px) at mirror position ``z``: ``fwhm_lambda sqrt(1 + ((z - z_best) / 0.2)^2)``."""
    return float(fwhm_lambda * math.sqrt(1.0 + ((z_mm - z_best_mm) / FOCUS_SCALE_MM) ** 2))


def pixel_fwhm(fwhm_opt: float) -> float:
    """Pixel-sampled FWHM ``2.3548 sqrt(s^2 + 1/12)`` of an optical FWHM (px)."""
    s = fwhm_opt / FWHM_SIGMA
    return FWHM_SIGMA * math.sqrt(s * s + 1.0 / 12.0)


def _pix(lo_edges: np.ndarray, centre: float, sigma: float) -> np.ndarray:
    a = (lo_edges - centre) / (math.sqrt(2) * sigma)
    return 0.5 * (erf(a + 1 / (math.sqrt(2) * sigma)) - erf(a))


def centre_fraction(fwhm: float) -> float:
    """Fraction of a circular Gaussian's flux in its central pixel (centred on the pixel)."""
    return float(_pix(np.array([-0.5]), 0.0, fwhm / FWHM_SIGMA)[0] ** 2)


def spot_profile(fwhm_opt0: float, ellipticity: float, slope_px_per_10k: float, flux_adu: float) -> dict[str, float]:
    """Optical and pixel-sampled sizes of one spot with brighter-fatter (module docstring):
    ``sigma_x, sigma_y`` (optical, px), ``fwhm_x_px, fwhm_y_px, fwhm_px`` (pixel-sampled),
    ``amplitude_adu`` (pixel-sampled Gaussian amplitude) for a flux in ADU."""
    f0 = pixel_fwhm(fwhm_opt0)
    f = f0
    for _ in range(30):
        s2 = max((f / FWHM_SIGMA) ** 2 - 1.0 / 12.0, 1e-4)
        sxp = math.sqrt(s2 * (1 + ellipticity) + 1.0 / 12.0)
        syp = math.sqrt(s2 * (1 - ellipticity) + 1.0 / 12.0)
        amp = flux_adu / (2 * math.pi * sxp * syp)
        new = f0 + slope_px_per_10k * amp / 1e4
        if abs(new - f) < 1e-9:
            break
        f = new
    s2 = max((f / FWHM_SIGMA) ** 2 - 1.0 / 12.0, 1e-4)
    sx, sy = math.sqrt(s2 * (1 + ellipticity)), math.sqrt(s2 * (1 - ellipticity))
    sxp, syp = math.sqrt(sx * sx + 1 / 12), math.sqrt(sy * sy + 1 / 12)
    return {"sigma_x": sx, "sigma_y": sy, "fwhm_x_px": FWHM_SIGMA * sxp, "fwhm_y_px": FWHM_SIGMA * syp, "fwhm_px": f,
            "amplitude_adu": flux_adu / (2 * math.pi * sxp * syp),
            "e1": (sxp * sxp - syp * syp) / (sxp * sxp + syp * syp)}


def elliptical_stamp(shape: tuple[int, int], row: float, col: float, sigma_x: float, sigma_y: float,
                     flux: float) -> tuple[slice, slice, np.ndarray]:
    """A pixel-integrated axis-aligned Gaussian (sigma_x along columns, sigma_y along rows, px) of
    total ``flux`` centred at (row, col): (row slice, col slice, float32 stamp)."""
    half_r = max(int(math.ceil(6 * sigma_y)), 4) + 1
    half_c = max(int(math.ceil(6 * sigma_x)), 4) + 1
    r0, c0 = int(round(row)), int(round(col))
    rs = slice(max(r0 - half_r, 0), min(r0 + half_r + 1, shape[0]))
    cs = slice(max(c0 - half_c, 0), min(c0 + half_c + 1, shape[1]))
    pr = _pix(np.arange(rs.start, rs.stop) - 0.5, row, sigma_y)
    pc = _pix(np.arange(cs.start, cs.stop) - 0.5, col, sigma_x)
    return rs, cs, (np.outer(pr, pc) * flux).astype(np.float32)


def render_spots(spots: QuadSpots, fwhm_opt0: float, flux_adu: float, gain: float) -> tuple[np.ndarray, list[dict]]:
    """Expected charge (e-, float32, image area) of one quadrant's spots and their per-spot truth
    (``x, y`` image px, ``row, col`` array indices with the prescan, pixel-sampled FWHMs, amplitude
    and fluence in ADU)."""
    from shared.geometry import PRESCAN_COLS

    lam = np.zeros((IMAGE_ROWS, IMAGE_COLS), dtype=np.float32)
    prof = spot_profile(fwhm_opt0, spots.ellipticity, spots.bf_slope_px_per_10k, flux_adu)
    info = []
    for x, y in zip(spots.x, spots.y):
        rs, cs, stamp = elliptical_stamp(lam.shape, y, x, prof["sigma_x"], prof["sigma_y"], flux_adu * gain)
        lam[rs, cs] += stamp
        info.append({"x": x, "y": y, "row": y, "col": round(x + PRESCAN_COLS, 3),
                     "fwhm_x_px": round(prof["fwhm_x_px"], 5), "fwhm_y_px": round(prof["fwhm_y_px"], 5),
                     "fwhm_px": round(prof["fwhm_px"], 5), "e1": round(prof["e1"], 5), "e2": 0.0,
                     "amplitude_adu": round(prof["amplitude_adu"], 2), "fluence_adu": round(flux_adu, 2),
                     "peak_adu": round(float(stamp.max()) / gain, 1)})
    return lam, info


def defocused_stamp(shape: tuple[int, int], row: float, col: float, core_fwhm: float, disk_px: float, flux: float,
                    halo_fraction: float, halo_scale: float) -> tuple[slice, slice, np.ndarray]:
    """Far from focus (geometric optics): a uniform pupil disk of diameter ``disk_px`` (5 x 5
    sub-pixel sampling) convolved with the in-focus core (FWHM ``core_fwhm``) and, for
    ``halo_fraction`` of the flux, with a halo of FWHM ``halo_scale x core_fwhm``; total ``flux``."""
    from scipy.ndimage import gaussian_filter

    sig_c = core_fwhm / FWHM_SIGMA
    sig_h = halo_scale * sig_c
    half = int(np.ceil(disk_px / 2 + 5 * sig_h)) + 1
    r0, c0 = int(round(row)), int(round(col))
    rr = np.arange(r0 - half, r0 + half + 1)
    cc = np.arange(c0 - half, c0 + half + 1)
    sub = (np.arange(5) - 2) / 5.0
    dr = (rr[:, None] + sub[None, :]).reshape(-1) - row
    dc = (cc[:, None] + sub[None, :]).reshape(-1) - col
    inside = (dr[:, None] ** 2 + dc[None, :] ** 2) <= (disk_px / 2) ** 2
    disk = inside.reshape(rr.size, 5, cc.size, 5).sum(axis=(1, 3)).astype(np.float64)
    disk /= max(disk.sum(), 1.0)
    stamp = (1 - halo_fraction) * gaussian_filter(disk, sig_c, mode="constant", truncate=5.0)
    if halo_fraction > 0:
        stamp += halo_fraction * gaussian_filter(disk, sig_h, mode="constant", truncate=5.0)
    stamp *= flux / stamp.sum()
    rs = slice(max(rr[0], 0), min(rr[-1] + 1, shape[0]))
    cs = slice(max(cc[0], 0), min(cc[-1] + 1, shape[1]))
    stamp = stamp[rs.start - rr[0]: rs.stop - rr[0], cs.start - cc[0]: cs.stop - cc[0]]
    return rs, cs, stamp.astype(np.float32)


def render_defocused(spots: QuadSpots, fwhm0: float, disk_px: float, peak_e: float, halo_fraction: float,
                     halo_scale: float) -> tuple[np.ndarray, list[dict], float]:
    """Far-defocused spots (PERSIST01's saturating exposure): ``(lam e-, per-spot truth, flux e-)``.
    The flux of such a spot includes the optical wings (``halo_fraction``) normalised so that the
    same spot in focus would peak at ``peak_e`` in its centred pixel."""
    from shared.geometry import PRESCAN_COLS

    flux = peak_e / ((1 - halo_fraction) * centre_fraction(fwhm0) + halo_fraction * centre_fraction(halo_scale * fwhm0))
    lam = np.zeros((IMAGE_ROWS, IMAGE_COLS), dtype=np.float32)
    info = []
    for x, y in zip(spots.x, spots.y):
        rs, cs, stamp = defocused_stamp(lam.shape, y, x, fwhm0, disk_px, flux, halo_fraction, halo_scale)
        lam[rs, cs] += stamp
        info.append({"x": x, "y": y, "row": y, "col": round(x + PRESCAN_COLS, 3), "disk_px": round(disk_px, 3),
                     "peak_e": round(float(stamp.max()), 1)})
    return lam, info, flux
