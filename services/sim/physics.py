"""Detector physics of the acquisition simulator: pure functions on numpy arrays, in canonical
quadrant orientation (readout node at [0, 0]; rows = parallel direction, columns = serial).

Units: charge in electrons (e-), signal in ADU, time in seconds, gain in e-/ADU.

The chain for one quadrant of one frame (``simulate_quadrant``):

1. expected charge per image pixel ``lam`` (e-): illumination ``flux * t * response`` (flux with
   the source drift)
   (``response`` = smooth large-scale pattern x (1 + PRNU) x bad-column factor) + dark current
   (quadrant rate + hot pixels) x dark time (+ point sources or injected charge);
2. shot noise: exact Poisson where ``lam`` is small (mean < ``POISSON_EXACT_BELOW`` e-),
   otherwise the Gaussian limit ``lam + sqrt(lam) z`` (same mean and variance);
3. brighter-fatter (:func:`bf_kernel`): the shot-noise deviation ``n = N - lam`` is
   redistributed between nearest neighbours, ``Q = lam + h (*) n`` with a 5-point kernel
   ``h`` that conserves charge (sum 1). ``h`` is chosen per quadrant and frame from the mean
   fluence ``mu`` so that the pixel variance is *exactly* the exponential model
   ``C00 = (exp(2 a00 mu) - 1) / (2 a00)`` (e-^2) and the nearest-neighbour covariances are
   ``C10 = a10 mu^2``, ``C01 = a01 mu^2`` to first order (Astier et al. 2019 conventions:
   ``a00 < 0``, ``a10, a01 > 0``, ``a00 = -2 (a10 + a01)``; lag 10 = serial / x, 01 = parallel / y);
4. cosmic rays (short tracks, charge added);
5. full well: charge above ``full_well_e`` blooms along the column, half up, half down, filling
   the next pixels below full well (charge leaving the column ends is lost);
6. conversion to ADU (``/ gain``) and non-linearity ``S' = S (1 + beta S)`` (S in ADU, offset
   subtracted); ``beta = nl_pct / 100 / nl_at_adu`` so the non-linearity is ``nl_pct`` % at
   ``nl_at_adu``;
7. readout: offset + Gaussian read noise on every pixel (prescan / serial overscan / parallel
   overscan are virtual: offset + noise only). The analogue noise is
   ``sqrt(ron^2 - 1/12)`` so that the *digitised* standard deviation is ``ron_adu`` (the
   quantity an analysis measures); the 16-bit ADC (round, clip to [0, 65535]) is applied by
   :func:`shared.fitsio.to_uint16` when the frame is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy.special import erf

from shared.geometry import CCDS, IMAGE_COLS, IMAGE_ROWS, PRESCAN_COLS, QUADRANTS, Geometry
from services.sim import crosstalk as xtalk
from services.sim import effects, injection, spots as simspots
from services.sim import persistence as simpersist
from services.sim.injection import InjectionTruth, SerialTrap, VerticalTrap
from shared.refdata import block_offsets

ADC_MAX = 65535
FULL_SCALE_ADU = 2**16  # the campaign's "full well" reference for fluence fractions and tFWC
POISSON_EXACT_BELOW = 200.0  # e-: mean charge below which shot noise is drawn exactly (Poisson)
PIXEL_CM = 12e-4  # pixel pitch 12 um
CCD_IMAGE_ROWS = 2 * IMAGE_ROWS  # 4132 rows x 4096 columns of photosensitive pixels per CCD
CCD_IMAGE_COLS = 2 * IMAGE_COLS
REFERENCE_GAIN = 3.2  # e-/ADU: the source gives 2^16 ADU in tFWC at this gain (chamber profiles);
# below the middle of the gain range so that 90 % flats of low-gain quadrants stay under the ADC limit

FrameKind = Literal["bias", "dark", "flat", "point", "chinj"]


# --------------------------------------------------------------------------------------------
# Configuration and truth models
# --------------------------------------------------------------------------------------------


class PhysicsConfig(BaseModel):
    """Knobs of the detector model. Ranges draw one value per quadrant from the model seed;
    a fixed value (``ron_adu`` etc.) overrides the range for every quadrant."""

    model_config = ConfigDict(extra="forbid")

    offset_scatter_adu: float = Field(3.0, ge=0, description="per-quadrant offset delta drawn in +/- this (ADU) around the block reference")
    ron_range_adu: tuple[float, float] = (1.25, 1.40)  # within the validator's 0.86..1.44 ADU
    ron_adu: float | None = Field(None, description="read noise (digitised std, ADU) for every quadrant")
    gain_range: tuple[float, float] = (3.10, 3.50)
    gain: float | None = Field(None, description="gain (e-/ADU) for every quadrant")
    dark_range_e_per_s: tuple[float, float] = (0.001, 0.003)
    full_well_range_e: tuple[float, float] = Field((220_000.0, 240_000.0), description="full well (e-); above ~62000 ADU so that flats to 90 % of 2^16 ADU do not bloom")
    prnu_pct: float = Field(1.0, ge=0, description="pixel-to-pixel response std (%)")
    illum_gradient: tuple[float, float] = Field((0.01, -0.005), description="linear illumination gradient across the CCD (x, y) per half-width")
    illum_vignetting: float = Field(-0.02, description="quadratic fall-off (u^2 + v^2) of the illumination")
    nl_pct: float = Field(0.0, description="non-linearity (%) at nl_at_fraction of 2^16 ADU (0 = linear)")
    nl_at_fraction: float = Field(0.9, gt=0, description="fluence (fraction of 2^16 ADU) where NL equals nl_pct")
    bf_a00: float = Field(-1.0e-6, le=0, description="brighter-fatter a00 (1/e-, Astier convention, <= 0; 0 disables)")
    bf_anisotropy: float = Field(1.3, gt=0, description="a01 / a10 (parallel / serial nearest-neighbour strength)")
    drift_pct_per_hour: float = Field(0.0, description="linear source flux drift (% per hour from the start of the run)")
    hot_pixels: int = Field(0, ge=0, description="hot pixels per CCD")
    hot_pixel_range_e_per_s: tuple[float, float] = (5.0, 100.0)
    bad_columns: int = Field(0, ge=0, description="bad columns per CCD (half dead, half hot)")
    cosmic_rate: float = Field(0.0, ge=0, description="cosmic rays per cm^2 per s (ground ~0.02); 0 disables")
    point_bf_slope_range_px_per_10k: tuple[float, float] = Field((0.010, 0.020), description="brighter-fatter on spots: per-quadrant "
                                                                  "growth of the pixel-sampled FWHM per 10 000 ADU of amplitude (px)")
    point_ellipticity_range: tuple[float, float] = Field((0.02, 0.08), description="per-quadrant spot ellipticity e (sigma_x^2 = s^2 (1 + e))")
    focus_offset_range_mm: tuple[float, float] = Field((-0.06, 0.06), description="per-CCD best focus z_best - mirror_nom (mm)")
    far_defocus_mm: float = Field(1.5, gt=0, description="beyond this |mirr_pos - z_best| (mm) a spot is a geometric pupil disk "
                                  "(PERSIST01's saturating exposure), not the near-focus Gaussian")
    defocus_px_per_mm: float = Field(4.0, gt=0, description="far defocus: pupil-disk diameter (px) per mm of defocus")
    point_halo_fraction: float = Field(0.6, ge=0, lt=1, description="far defocus: fraction of the flux in the optical wings")
    point_halo_scale: float = Field(5.0, ge=1, description="far defocus: wing FWHM / in-focus FWHM")
    crosstalk: bool = Field(True, description="optical crosstalk between the 12 quadrants in point-source frames")
    persistence: bool = Field(True, description="persistence of pixels saturated by a point-source exposure in the following darks")
    ramp_slope_adu_per_row: float = Field(20.0, description="MOT_WARM ROE ramp frame (comments RAMP): ramp slope (ADU per row)")
    ramp_nl_pct: float = Field(0.4, description="MOT_WARM ROE ramp: quadratic non-linearity (% of the ramp at its top row)")
    # --- effects physically different from the analyses' models (services/sim/effects.py); the
    # defaults keep the legacy behaviour, PhysicsConfig.realistic() turns them all on
    bf_model: Literal["kernel", "boundary"] = Field("kernel", description="brighter-fatter: 'kernel' (legacy: the exponential PTC "
                                                    "imposed on the variance) or 'boundary' (charge-dependent pixel-boundary shifts)")
    bf_steps: int = Field(2, ge=1, description="deposition steps of the boundary-shift model (midpoint scheme)")
    nl_model: Literal["quadratic", "rolloff"] = Field("quadratic", description="non-linearity: 'quadratic' S(1 + beta S) or "
                                                      "'rolloff' S_r tanh(S / S_r) (-|nl_pct| % at nl_at_fraction)")
    drift_wobble_pct: float = Field(0.0, description="sinusoidal source drift amplitude (%) on top of the linear drift")
    drift_wobble_period_h: float = Field(2.0, gt=0, description="period (h) of the sinusoidal drift")
    shutter_offset_s: float = Field(0.0, description="shutter timing offset: a shutter-open frame is lit exptime + offset (s)")
    flux_jitter_pct: float = Field(0.0, ge=0, description="frame-to-frame flux jitter (rms %) of the flat source")
    cti_parallel: float = Field(0.0, ge=0, description="parallel CTI per transfer (fraction deferred into the next row)")
    cti_serial: float = Field(0.0, ge=0, description="serial CTI per transfer (fraction deferred into the next column)")
    bias_fixed_rms_adu: float = Field(0.0, ge=0, description="fixed bias pattern: column offsets rms (ADU), same in every frame")
    bias_ramp_adu: float = Field(0.0, description="fixed bias pattern: decaying ramp along the rows (ADU at row 0)")
    row_noise_adu: float = Field(0.0, ge=0, description="row noise: an offset per row and frame, rms (ADU)")
    adc_dnl_rms: float = Field(0.0, ge=0, description="ADC differential non-linearity: rms of the code widths (LSB)")
    dark_during_readout: bool = Field(False, description="dark current also collected during the readout (later rows see more)")
    illum_ripple_pct: float = Field(0.0, ge=0, description="illumination ripple amplitude (%)")
    illum_ripple_period_px: float = Field(300.0, gt=0, description="illumination ripple period (px)")
    traps_vertical: int = Field(200, ge=0, le=5000, description="vertical traps per quadrant (seen only in pumped frames)")
    traps_serial: int = Field(20, ge=0, le=500, description="serial-register traps per quadrant (seen only in pumped frames)")

    @classmethod
    def realistic(cls, **overrides: Any) -> "PhysicsConfig":
        """Every effect on at a realistic level (issue 11): boundary-shift brighter-fatter, a
        roll-off non-linearity of 1 % at 90 % of 2^16 ADU, a non-linear drift, a 30 ms shutter
        offset, flux jitter, CTI, bias structure, row noise, ADC DNL, dark during readout, an
        illumination ripple, cosmic rays, and full wells on both sides of the ADC ceiling."""
        values: dict[str, Any] = dict(
            bf_model="boundary", nl_model="rolloff", nl_pct=1.0, drift_pct_per_hour=0.2, drift_wobble_pct=0.3,
            shutter_offset_s=0.03, flux_jitter_pct=0.1, cti_parallel=2e-6, cti_serial=4e-7, bias_fixed_rms_adu=0.3,
            bias_ramp_adu=1.5, row_noise_adu=0.3, adc_dnl_rms=0.05, dark_during_readout=True, illum_ripple_pct=1.0,
            cosmic_rate=0.02, full_well_range_e=(195_000.0, 235_000.0), ron_range_adu=(1.2, 1.32),
        )
        values.update(overrides)
        return cls(**values)


class BFTruth(BaseModel):
    """Brighter-fatter a-matrix (1/e-, Astier et al. 2019 sign convention)."""

    a00: float
    a10: float
    a01: float


class NLTruth(BaseModel):
    """Quadratic non-linearity ``S' = S (1 + beta S)`` on the offset-subtracted signal S (ADU)."""

    beta_per_adu: float
    beta_per_e: float
    pct: float
    at_adu: float


class QuadrantTruth(BaseModel):
    """The injected values of one CCD quadrant."""

    offset_adu: float
    ron_adu: float = Field(description="read noise as the std of digitised data (ADU), quantisation included")
    ron_analog_adu: float = Field(description="analogue noise injected before the 16-bit ADC (ADU)")
    ron_e: float
    gain_e_per_adu: float
    dark_e_per_s: float
    full_well_e: float
    full_well_adu: float
    prnu_pct: float
    nl: NLTruth
    bf: BFTruth
    rolloff_adu: float | None = Field(None, description="roll-off scale S_r (ADU) when nl_model is 'rolloff'")
    row_noise_adu: float = Field(0.0, description="rms of the per-row offset noise (ADU); the temporal noise of a pixel is sqrt(ron^2 + row^2)")
    her_expected: float = Field(0.0, description="hard-edge response of the serial CTI at the image -> overscan edge")
    saturation_first: Literal["full_well", "adc"] = Field("full_well", description="which limit a bright flat reaches first")
    adc_limit_adu: float = Field(0.0, description="offset-subtracted signal (ADU) at which the 16-bit ADC clips")
    injection: InjectionTruth | None = Field(None, description="charge-injection response (well-injected half)")


class HotPixel(BaseModel):
    """A hot pixel at canonical quadrant array indices (row, col; col includes the 51 prescan columns)."""

    quadrant: str
    row: int
    col: int
    dark_e_per_s: float


class BadColumn(BaseModel):
    """A defective column segment (canonical quadrant indices, rows [row_start, 2066)).
    ``dead``: response multiplied by ``response``; ``hot``: extra dark current per pixel."""

    quadrant: str
    col: int
    row_start: int
    kind: Literal["dead", "hot"]
    response: float = 1.0
    dark_e_per_s: float = 0.0


class CCDTruth(BaseModel):
    quadrants: dict[str, QuadrantTruth]
    hot_pixels: list[HotPixel] = []
    bad_columns: list[BadColumn] = []
    vertical_traps: dict[str, list[VerticalTrap]] = Field(default_factory=dict, description="per quadrant; x, y image-area (canonical)")
    serial_traps: dict[str, list[SerialTrap]] = Field(default_factory=dict, description="per quadrant; x image column (canonical)")
    point: simspots.PointTruth | None = Field(None, description="point-source mask, focus and spot profile (services/sim/spots.py)")
    persistence: dict[str, simpersist.PersistenceTruth] = Field(default_factory=dict, description="per quadrant (services/sim/persistence.py)")


# --------------------------------------------------------------------------------------------
# Pure physics functions
# --------------------------------------------------------------------------------------------


def bf_coefficients(a00: float, anisotropy: float = 1.0) -> BFTruth:
    """Nearest-neighbour a-matrix from a00 with charge conservation ``a00 = -2 (a10 + a01)``
    and ``a01 = anisotropy * a10``."""
    a10 = -a00 / (2.0 * (1.0 + anisotropy))
    return BFTruth(a00=a00, a10=a10, a01=anisotropy * a10)


def exponential_c00(mu_e: float | np.ndarray, a00: float) -> float | np.ndarray:
    """Shot-noise variance (e-^2) of the exponential brighter-fatter model at fluence mu (e-):
    ``(exp(2 a00 mu) - 1) / (2 a00)``; ``mu`` when ``a00 == 0``."""
    if a00 == 0:
        return mu_e
    return np.expm1(2.0 * a00 * np.asarray(mu_e, dtype=float)) / (2.0 * a00)


def bf_kernel(mu_e: float, bf: BFTruth) -> tuple[float, float, float]:
    """The charge-conserving 5-point kernel ``(h0, hx, hy)`` (centre, each serial neighbour,
    each parallel neighbour) applied to the shot-noise deviation at mean fluence ``mu_e``.

    ``h0 + 2 hx + 2 hy = 1``; ``hx : hy = a10 : a01``; ``h0^2 + 2 hx^2 + 2 hy^2`` equals
    ``exponential_c00(mu) / mu``, so the pixel variance follows the exponential model exactly.
    To first order ``hx = a10 mu / 2`` and the covariance ``C10 = mu * 2 h0 hx ~ a10 mu^2``."""
    if bf.a00 == 0 or mu_e <= 0:
        return 1.0, 0.0, 0.0
    target = float(exponential_c00(mu_e, bf.a00)) / mu_e  # < 1
    x = mu_e * (bf.a10 + bf.a01)  # first-order charge fraction leaving a pixel
    w = mu_e**2 * (bf.a10**2 + bf.a01**2) / 2.0
    disc = x * x - (x * x + w) * (1.0 - target)
    if disc < 0:  # beyond the model's validity: take the minimum-variance kernel
        disc = 0.0
    s = (x - math.sqrt(disc)) / (x * x + w)
    hx = s * mu_e * bf.a10 / 2.0
    hy = s * mu_e * bf.a01 / 2.0
    return 1.0 - 2.0 * hx - 2.0 * hy, hx, hy


def bf_expected_covariances(mu_e: float, bf: BFTruth) -> dict[str, float]:
    """Covariances (e-^2) the BF kernel produces at fluence ``mu_e`` for lags (0,0), (1,0),
    (0,1), (1,1), (2,0), (0,2) (first index = serial / x): ``mu * autocorrelation(h)``."""
    h0, hx, hy = bf_kernel(mu_e, bf)
    return {
        "C00": mu_e * (h0 * h0 + 2 * hx * hx + 2 * hy * hy),
        "C10": mu_e * 2 * h0 * hx,
        "C01": mu_e * 2 * h0 * hy,
        "C11": mu_e * 2 * hx * hy,
        "C20": mu_e * hx * hx,
        "C02": mu_e * hy * hy,
    }


def apply_bf(dev: np.ndarray, kernel: tuple[float, float, float]) -> np.ndarray:
    """Convolve a deviation image (rows = parallel, cols = serial) with the 5-point kernel;
    charge pushed past the array edge is dropped (edges are a negligible fraction)."""
    h0, hx, hy = kernel
    if hx == 0 and hy == 0:
        return dev
    out = dev * np.float32(h0)
    if hx:
        out[:, 1:] += np.float32(hx) * dev[:, :-1]
        out[:, :-1] += np.float32(hx) * dev[:, 1:]
    if hy:
        out[1:, :] += np.float32(hy) * dev[:-1, :]
        out[:-1, :] += np.float32(hy) * dev[1:, :]
    return out


def shot_noise(lam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Deviation ``N - lam`` (e-, float32) of a Poisson draw ``N`` of mean ``lam``: exact
    Poisson when the mean charge is below :data:`POISSON_EXACT_BELOW`, else its Gaussian limit."""
    lam = np.asarray(lam, dtype=np.float32)
    if float(lam.mean()) < POISSON_EXACT_BELOW:
        dev = rng.poisson(np.maximum(lam, 0)).astype(np.float32)
        dev -= lam
        return dev
    dev = rng.standard_normal(lam.shape, dtype=np.float32)
    dev *= np.sqrt(np.maximum(lam, 0))
    return dev


def shot_noise_sparse(lam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Like :func:`shot_noise` (exact Poisson) for a mostly uniform faint image (point-source
    frames: spots on a dark-current floor), in a fraction of the time: the pixels above the floor
    ``b = min(lam)`` are drawn one by one; the floor's events elsewhere are a Poisson total
    ``Poisson(b n)`` placed uniformly (the same distribution: independent Poisson(b) counts)."""
    lam = np.asarray(lam, dtype=np.float32)
    flat = lam.reshape(-1)
    base = max(float(flat.min()), 0.0)
    idx = np.flatnonzero(flat > np.float32(base))
    dev = np.full(flat.shape, -base, dtype=np.float32)
    rest = flat.size - idx.size
    if base > 0 and rest:
        k = int(rng.poisson(base * rest))
        if k:
            mask = np.ones(flat.size, bool)
            mask[idx] = False
            where = np.flatnonzero(mask)[rng.integers(0, rest, k)]
            np.add.at(dev, where, np.float32(1.0))
    if idx.size:
        dev[idx] = rng.poisson(np.maximum(flat[idx], 0)).astype(np.float32) - flat[idx]
    return dev.reshape(lam.shape)


def _accumulate_rows(arr: np.ndarray, ufunc: np.ufunc) -> None:
    """In-place running ``ufunc`` along axis 0 (a row loop: several times faster than
    ``ufunc.accumulate(axis=0)`` on wide C-ordered arrays)."""
    for i in range(1, arr.shape[0]):
        ufunc(arr[i], arr[i - 1], out=arr[i])


def bloom(charge: np.ndarray, full_well_e: float) -> tuple[np.ndarray, int]:
    """Charge above ``full_well_e`` flows along its column (axis 0), half towards each end,
    filling the next pixels below full well; charge leaving the column ends is lost.

    Exact for isolated saturated runs (a Lindley scan per direction, vectorised with cumulative
    sums); returns ``(charge, number of pixels that were above full well)``. In place."""
    fw32 = charge.dtype.type(full_well_e)
    over = charge > fw32
    n_over = int(np.count_nonzero(over))
    if n_over == 0:
        return charge, 0
    # columns holding at least a full well per pixel end up saturated from end to end (the
    # excess leaves through the column ends): shortcut
    full = charge.sum(axis=0, dtype=np.float64) >= charge.shape[0] * float(full_well_e)
    if full.any():
        charge[:, full] = fw32
        over[:, full] = False
    # isolated pixels: a few sparse steps of half up / half down
    rows, width = charge.shape
    flat = charge.reshape(-1)
    idx = np.flatnonzero(over.reshape(-1))
    for _ in range(6):
        if idx.size == 0 or idx.size > flat.size // 50:
            break
        ex = flat[idx] - fw32
        flat[idx] = fw32
        half = ex * charge.dtype.type(0.5)
        up, down = idx + width, idx - width
        ok_up, ok_down = up < flat.size, down >= 0
        flat[up[ok_up]] += half[ok_up]
        flat[down[ok_down]] += half[ok_down]
        cand = np.unique(np.concatenate([up[ok_up], down[ok_down]]))
        idx = cand[flat[cand] > fw32]
    if idx.size == 0:
        return charge, n_over
    over = charge > fw32
    cols = np.flatnonzero(over.any(axis=0))
    whole = cols.size > width // 2
    # float64 scan: cumulative sums over a column reach ~4e8 e-
    sub = charge.astype(np.float64) if whole else charge[:, cols].astype(np.float64)
    fw = float(full_well_e)
    half = sub - fw
    np.maximum(half, 0.0, out=half)
    half *= 0.5
    np.minimum(sub, fw, out=sub)
    capacity = fw - sub
    flow = np.empty_like(sub)
    low = np.empty_like(sub)
    absorbed = np.empty_like(sub)
    for direction in (1, -1):
        h = half[::direction]
        c = capacity[::direction]
        # Lindley recursion F_i = max(0, F_{i-1} + h_i - c_i): F = S - min(0, running min of S)
        np.subtract(h, c, out=flow)
        _accumulate_rows(flow, np.add)
        low[:] = flow
        _accumulate_rows(low, np.minimum)
        np.minimum(low, 0.0, out=low)
        flow -= low
        # absorbed = inflow (F_{i-1} + h_i) - outflow F_i; 0 on saturated pixels (c = 0)
        absorbed[:] = h
        absorbed[1:] += flow[:-1]
        absorbed -= flow
        sub[::direction] += absorbed
        c -= absorbed
    np.minimum(sub, fw, out=sub)
    if whole:
        charge[...] = sub
    else:
        charge[:, cols] = sub.astype(charge.dtype)
    return charge, n_over


def nl_beta(nl_pct: float, at_adu: float) -> float:
    """Quadratic coefficient (1/ADU) giving ``nl_pct`` % non-linearity at ``at_adu``."""
    return nl_pct / 100.0 / at_adu if at_adu > 0 else 0.0


def apply_nl(signal_adu: np.ndarray, beta_per_adu: float) -> np.ndarray:
    """``S (1 + beta S)`` in place (S offset-subtracted, ADU)."""
    if beta_per_adu:
        signal_adu *= 1.0 + np.float32(beta_per_adu) * signal_adu
    return signal_adu


def analog_noise(ron_adu: float) -> float:
    """Analogue noise (ADU) whose digitised standard deviation is ``ron_adu``."""
    return math.sqrt(max(ron_adu**2 - 1.0 / 12.0, 0.0))


def readout(
    image_adu: np.ndarray | None,
    offset_adu: float,
    ron_analog_adu: float,
    rng: np.random.Generator,
    geometry: Geometry,
    vstart: int = 0,
    vend: int | None = None,
) -> np.ndarray:
    """A canonical quadrant (float32, ADU): offset + read noise everywhere, ``image_adu``
    (2066 x 2048, offset-subtracted) added in the image area. Rows outside the readout window
    ``[vstart, vend)`` are 0 (not read)."""
    shape = (geometry.quad_rows, geometry.quad_cols)
    quad = rng.standard_normal(shape, dtype=np.float32)
    quad *= np.float32(ron_analog_adu)
    quad += np.float32(offset_adu)
    if image_adu is not None:
        quad[:IMAGE_ROWS, PRESCAN_COLS : PRESCAN_COLS + IMAGE_COLS] += image_adu[: geometry.quad_rows]
    vend = geometry.quad_rows if vend is None else vend
    if vstart > 0:
        quad[: min(vstart, shape[0])] = 0
    if vend < shape[0]:
        quad[max(vend, 0) :] = 0
    return quad


def quadrant_ccd_coords(q: str, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CCD image-area coordinates (x 0..4095, y 0..4131, origin bottom-left as displayed) of
    canonical image-area indices (row 0..2065, col 0..2047 counted from the readout corner)."""
    x = cols if q in ("H", "E") else CCD_IMAGE_COLS - 1 - cols
    y = rows if q in ("H", "G") else CCD_IMAGE_ROWS - 1 - rows
    return x, y


def illumination_pattern(q: str, gradient: tuple[float, float], vignetting: float) -> np.ndarray:
    """Smooth large-scale illumination of a quadrant's image area (float32, 2066 x 2048,
    canonical), ``1 + gx u + gy v + vig (u^2 + v^2 - m)`` with u, v in [-1, 1] across the CCD
    and ``m`` the mean of ``u^2 + v^2``, so that the pattern averages to 1 over the CCD."""
    rows = np.arange(IMAGE_ROWS, dtype=np.float32)[:, None]
    cols = np.arange(IMAGE_COLS, dtype=np.float32)[None, :]
    x, y = quadrant_ccd_coords(q, rows, cols)
    u = (x - (CCD_IMAGE_COLS - 1) / 2) / (CCD_IMAGE_COLS / 2)
    v = (y - (CCD_IMAGE_ROWS - 1) / 2) / (CCD_IMAGE_ROWS / 2)
    r2 = u * u + v * v
    gx, gy = gradient
    return (1.0 + gx * u + gy * v + vignetting * (r2 - float(r2.mean()))).astype(np.float32)


def cosmic_rays(
    image_e: np.ndarray, n: int, rng: np.random.Generator, max_len: int = 12, charge_range_e: tuple[float, float] = (2e3, 3e4)
) -> list[tuple[int, int]]:
    """Add ``n`` straight cosmic-ray tracks (random start, direction, length 1..max_len pixels,
    total charge log-uniform in ``charge_range_e``) to an image (e-), in place; returns starts."""
    if n <= 0:
        return []
    rows, cols = image_e.shape
    r0 = rng.uniform(0, rows, n)
    c0 = rng.uniform(0, cols, n)
    length = rng.integers(1, max_len + 1, n)
    angle = rng.uniform(0, np.pi, n)
    total = np.exp(rng.uniform(np.log(charge_range_e[0]), np.log(charge_range_e[1]), n))
    steps = np.concatenate([np.arange(k) for k in length])
    idx = np.repeat(np.arange(n), length)
    rr = np.clip((r0[idx] + steps * np.sin(angle[idx])).astype(int), 0, rows - 1)
    cc = np.clip((c0[idx] + steps * np.cos(angle[idx])).astype(int), 0, cols - 1)
    np.add.at(image_e, (rr, cc), (total[idx] / length[idx]).astype(image_e.dtype))
    return [(int(a), int(b)) for a, b in zip(r0.astype(int), c0.astype(int))]


# --------------------------------------------------------------------------------------------
# The detector model (truth + fixed maps) and one frame
# --------------------------------------------------------------------------------------------


@dataclass
class Exposure:
    """Conditions of one frame, for the physics (derived from the exposure-log values)."""

    kind: FrameKind
    exptime: float = 0.0
    flux_e_per_s: float = 0.0  # flat source, CCD average (pattern mean 1), drift included
    dark_time: float = 0.0
    readout_time: float = 72.0  # cosmic rays also hit during the readout
    vstart: int = 0
    vend: int = 2086
    point_peak_e: float = 0.0  # peak (e-) of an in-focus spot (FWHM fwhm0_px): sets the spot flux
    fwhm0_px: float = 2.0  # fwhm_lambda: in-focus optical FWHM (px) at this wavelength
    mirror_mm: float = 0.0  # focus mirror position mirr_pos (mm)
    mirror_nominal_mm: float = 0.0  # the chamber's mirror_nom for the filter (mm); z_best = this + the CCD's offset
    values: dict[str, Any] = field(default_factory=dict)  # all exposure-log values (injection etc.)
    #: persistence excess of a dark per (CCD, Q): (image-area flat indices, e- per pixel), set by the runner
    persistence: dict[tuple[str, str], tuple[np.ndarray, float]] = field(default_factory=dict)


@dataclass
class QuadrantResult:
    """One canonical quadrant (ADU, float32) and what was injected in it."""

    data: np.ndarray
    info: dict[str, Any]


def _seed_words(*parts: int | str) -> list[int]:
    out = []
    for p in parts:
        if isinstance(p, str):
            out.extend(p.encode())
        else:
            out.append(int(p))
    return out


class DetectorModel:
    """The simulated block: per CCD and quadrant truth (drawn once from ``seed``) and the fixed
    pixel maps (response = illumination pattern x PRNU x bad columns; dark map), built lazily.

    Reproducible: everything derives from ``numpy.random.SeedSequence`` keyed by the seed,
    CCD, quadrant and (for frames) the frame index, whatever the order of generation."""

    def __init__(self, config: PhysicsConfig | None = None, block: str = "UNKNOWN", seed: int = 0):
        self.config = config or PhysicsConfig()
        self.block = block
        self.seed = int(seed)
        self.truth: dict[str, CCDTruth] = self._draw_truth()
        #: optical crosstalk {source "CCD1.E": {victim: c}} of the block (services/sim/crosstalk.py)
        self.crosstalk: dict[str, dict[str, float]] = xtalk.draw_crosstalk(self.rng("crosstalk"))
        self._response: dict[tuple[str, str], np.ndarray] = {}
        self._dark: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._fixed: dict[tuple, np.ndarray] = {}  # bias structure, ADC code tables (fixed per quadrant)

    # -- random streams -------------------------------------------------------------------
    def rng(self, *key: int | str) -> np.random.Generator:
        """An independent generator for a named stream (e.g. ("frame", 12, "CCD1", "E"))."""
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, *_seed_words(*key)])))

    def _draw_truth(self) -> dict[str, CCDTruth]:
        cfg = self.config
        ref = block_offsets(self.block)
        bf = bf_coefficients(cfg.bf_a00, cfg.bf_anisotropy)
        positions = simspots.draw_positions(self.rng("spot_positions"))
        truth: dict[str, CCDTruth] = {}
        for ccd in CCDS:
            rng = self.rng("truth", ccd)
            quads = {}
            for q in QUADRANTS:
                offset = ref[ccd][q] + rng.uniform(-cfg.offset_scatter_adu, cfg.offset_scatter_adu)
                ron = cfg.ron_adu if cfg.ron_adu is not None else rng.uniform(*cfg.ron_range_adu)
                gain = cfg.gain if cfg.gain is not None else rng.uniform(*cfg.gain_range)
                dark = rng.uniform(*cfg.dark_range_e_per_s)
                fw = rng.uniform(*cfg.full_well_range_e)
                at_adu = cfg.nl_at_fraction * FULL_SCALE_ADU
                beta = nl_beta(cfg.nl_pct, at_adu)
                quads[q] = QuadrantTruth(
                    offset_adu=round(float(offset), 3),
                    ron_adu=round(float(ron), 4),
                    ron_analog_adu=analog_noise(float(round(ron, 4))),
                    ron_e=float(round(ron, 4) * gain),
                    gain_e_per_adu=round(float(gain), 4),
                    dark_e_per_s=float(dark),
                    full_well_e=round(float(fw), 1),
                    full_well_adu=float(round(fw, 1) / round(gain, 4)),
                    prnu_pct=cfg.prnu_pct,
                    nl=NLTruth(beta_per_adu=beta if cfg.nl_model == "quadratic" else 0.0,
                               beta_per_e=(beta if cfg.nl_model == "quadratic" else 0.0) / round(float(gain), 4),
                               pct=cfg.nl_pct if cfg.nl_model == "quadratic" else -abs(cfg.nl_pct), at_adu=at_adu),
                    bf=bf,
                    rolloff_adu=effects.rolloff_for(cfg.nl_pct, at_adu) if cfg.nl_model == "rolloff" and cfg.nl_pct else None,
                    row_noise_adu=cfg.row_noise_adu,
                    her_expected=cfg.cti_serial * (PRESCAN_COLS + IMAGE_COLS),
                    saturation_first="full_well" if round(fw, 1) / round(gain, 4) < ADC_MAX - offset else "adc",
                    adc_limit_adu=float(ADC_MAX - offset),
                    injection=injection.draw_injection(self.rng("injection", ccd, q)),
                )
            hot = []
            for _ in range(cfg.hot_pixels):
                q = QUADRANTS[int(rng.integers(4))]
                hot.append(HotPixel(quadrant=q, row=int(rng.integers(0, IMAGE_ROWS)),
                                    col=int(rng.integers(PRESCAN_COLS, PRESCAN_COLS + IMAGE_COLS)),
                                    dark_e_per_s=float(rng.uniform(*cfg.hot_pixel_range_e_per_s))))
            bad = []
            for k in range(cfg.bad_columns):
                q = QUADRANTS[int(rng.integers(4))]
                col = int(rng.integers(PRESCAN_COLS + 10, PRESCAN_COLS + IMAGE_COLS - 10))
                row_start = int(rng.integers(0, IMAGE_ROWS // 2))
                if k % 2 == 0:
                    bad.append(BadColumn(quadrant=q, col=col, row_start=row_start, kind="dead",
                                         response=round(float(rng.uniform(0.05, 0.5)), 3)))
                else:
                    bad.append(BadColumn(quadrant=q, col=col, row_start=row_start, kind="hot",
                                         dark_e_per_s=round(float(rng.uniform(2.0, 20.0)), 3)))
            vertical, serial = {}, {}
            for q in QUADRANTS:
                vertical[q], serial[q] = injection.draw_traps(self.rng("traps", ccd, q), cfg.traps_vertical, cfg.traps_serial)
            point = simspots.PointTruth(
                z_best_offset_mm=round(float(self.rng("focus", ccd).uniform(*cfg.focus_offset_range_mm)), 4),
                quadrants={q: simspots.QuadSpots(
                    x=[float(v) for v in positions[CCDS.index(ccd) * 4 + k, :, 0]],
                    y=[float(v) for v in positions[CCDS.index(ccd) * 4 + k, :, 1]],
                    ellipticity=round(float(self.rng("spot_shape", ccd, q).uniform(*cfg.point_ellipticity_range)), 4),
                    bf_slope_px_per_10k=round(float(self.rng("spot_bf", ccd, q).uniform(*cfg.point_bf_slope_range_px_per_10k)), 5))
                    for k, q in enumerate(QUADRANTS)})
            persist = {q: simpersist.draw_persistence(self.rng("persistence", ccd, q)) for q in QUADRANTS}
            truth[ccd] = CCDTruth(quadrants=quads, hot_pixels=hot, bad_columns=bad, vertical_traps=vertical, serial_traps=serial,
                                  point=point, persistence=persist)
        return truth

    # -- fixed maps ------------------------------------------------------------------------
    def response(self, ccd: str, q: str) -> np.ndarray:
        """Relative response of the image area (2066 x 2048, float32): illumination pattern x
        (1 + PRNU) x dead-column factors. Cached."""
        key = (ccd, q)
        if key not in self._response:
            cfg = self.config
            resp = illumination_pattern(q, cfg.illum_gradient, cfg.illum_vignetting)
            if cfg.illum_ripple_pct:
                x, y = quadrant_ccd_coords(q, np.arange(IMAGE_ROWS, dtype=np.float32)[:, None], np.arange(IMAGE_COLS, dtype=np.float32)[None, :])
                resp *= effects.ripple(x, y, cfg.illum_ripple_pct / 100.0, cfg.illum_ripple_period_px)
            if cfg.prnu_pct > 0:
                prnu = self.rng("prnu", ccd, q).standard_normal(resp.shape, dtype=np.float32)
                prnu *= np.float32(cfg.prnu_pct / 100.0)
                prnu += 1.0
                resp *= prnu
            for bc in self.truth[ccd].bad_columns:
                if bc.quadrant == q and bc.kind == "dead":
                    resp[bc.row_start :, bc.col - PRESCAN_COLS] *= np.float32(bc.response)
            self._response[key] = resp
        return self._response[key]

    def dark_sources(self, ccd: str, q: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Hot pixels and hot-column pixels of a quadrant: (rows, image cols, e-/s) arrays."""
        key = (ccd, q)
        if key not in self._dark:
            rows, cols, rates = [], [], []
            for hp in self.truth[ccd].hot_pixels:
                if hp.quadrant == q:
                    rows.append(hp.row), cols.append(hp.col - PRESCAN_COLS), rates.append(hp.dark_e_per_s)
            for bc in self.truth[ccd].bad_columns:
                if bc.quadrant == q and bc.kind == "hot":
                    n = IMAGE_ROWS - bc.row_start
                    rows.extend(range(bc.row_start, IMAGE_ROWS))
                    cols.extend([bc.col - PRESCAN_COLS] * n)
                    rates.extend([bc.dark_e_per_s] * n)
            self._dark[key] = (np.asarray(rows, dtype=int), np.asarray(cols, dtype=int), np.asarray(rates, dtype=np.float32))
        return self._dark[key]

    def injection_profiles(self, ccd: str, q: str) -> tuple[np.ndarray, np.ndarray]:
        """Fixed column profiles of the injection (mean 1): the well-injected half (a few %
        non-uniformity) and the poorly injected half (strongly non-uniform, smooth). Cached."""
        key = ("injection_profiles", ccd, q)
        if key not in self._fixed:
            rng = self.rng("injection_columns", ccd, q)
            pct = self.truth[ccd].quadrants[q].injection.column_nonuniformity_pct
            good = (1.0 + pct / 100.0 * rng.standard_normal(IMAGE_COLS)).astype(np.float32)
            walk = np.cumsum(rng.standard_normal(IMAGE_COLS))
            walk = (walk - walk.mean()) / (walk.std() or 1.0)
            poor = np.clip(1.0 + 0.5 * walk, 0.05, None).astype(np.float32)
            self._fixed[key] = np.stack([good, poor])
        good, poor = self._fixed[key]
        return good, poor

    def pump(self, ccd: str, q: str, charge: np.ndarray, exp: Exposure, rng: np.random.Generator) -> dict[str, Any]:
        """Trap pumping of an injected frame (in place, e-): vertical (v_tpump) and / or serial
        (s_tpump) with the cycle counts, modes and phase times of the frame's registers."""
        v = exp.values
        num = lambda k, d=0.0: float(v.get(k, d) or d)  # noqa: E731
        info: dict[str, Any] = {}
        if num("v_tpump"):
            info["v_traps_pumped"] = injection.pump_vertical(charge, self.truth[ccd].vertical_traps.get(q, []), int(num("v_tpmod", 123)),
                                                             num("toi_tp", 1000.0), int(num("v_tp_cnt", 1000)), rng)
        if num("s_tpump"):
            rows = slice(max(exp.vstart, 0), min(exp.vend, IMAGE_ROWS))
            info["s_traps_pumped"] = injection.pump_serial(charge, self.truth[ccd].serial_traps.get(q, []), int(num("s_tpmod", 23)),
                                                           num("dwell_s", 0.0), int(num("s_tp_cnt", 1000)), rows, rng)
        return info

    # -- one quadrant ----------------------------------------------------------------------
    def expected_charge(self, ccd: str, q: str, exp: Exposure, rng: np.random.Generator) -> tuple[np.ndarray | None, dict[str, Any]]:
        """Expected charge ``lam`` (e-) of the image area, or None for a pure bias."""
        t = self.truth[ccd].quadrants[q]
        info: dict[str, Any] = {}
        lam: np.ndarray | None = None
        if exp.kind == "flat" and exp.flux_e_per_s > 0 and exp.exptime > 0:
            lit = effects.shutter_exposure(exp.exptime, self.config.shutter_offset_s)
            lam = self.response(ccd, q) * np.float32(exp.flux_e_per_s * lit)
            info["illumination_s"] = lit
        elif exp.kind == "point":
            pt = self.truth[ccd].point
            z_best = exp.mirror_nominal_mm + pt.z_best_offset_mm
            cfg = self.config
            fwhm_opt = simspots.fwhm_optical(exp.fwhm0_px, exp.mirror_mm, z_best)
            if abs(exp.mirror_mm - z_best) > cfg.far_defocus_mm:
                disk = abs(exp.mirror_mm - z_best) * cfg.defocus_px_per_mm
                lam, spots, flux_e = simspots.render_defocused(pt.quadrants[q], exp.fwhm0_px, disk, exp.point_peak_e,
                                                               cfg.point_halo_fraction, cfg.point_halo_scale)
                info["spot_flux_e"] = flux_e
                info["defocus_disk_px"] = round(disk, 3)
            else:
                # in focus, without brighter-fatter, centred on a pixel, the peak is point_peak_e
                flux_adu = exp.point_peak_e / simspots.centre_fraction(exp.fwhm0_px) / t.gain_e_per_adu
                lam, spots = simspots.render_spots(pt.quadrants[q], fwhm_opt, flux_adu, t.gain_e_per_adu)
                info["spot_flux_e"] = flux_adu * t.gain_e_per_adu
            info["z_best_mm"] = round(z_best, 4)
            info["fwhm_optical_px"] = round(fwhm_opt, 5)
            info["spots"] = spots
        elif exp.kind == "chinj":
            lam, extra = injection.injection_charge(exp.values, q, int(ccd[-1]), t.injection, t.gain_e_per_adu,
                                                    *self.injection_profiles(ccd, q))
            info.update(extra)
        dark_time = exp.dark_time
        if dark_time > 0:
            if lam is None:
                lam = np.full((IMAGE_ROWS, IMAGE_COLS), t.dark_e_per_s * dark_time, dtype=np.float32)
            else:
                lam += np.float32(t.dark_e_per_s * dark_time)
            rows, cols, rates = self.dark_sources(ccd, q)
            if rows.size:
                np.add.at(lam, (rows, cols), rates * np.float32(dark_time))
            excess = exp.persistence.get((ccd, q)) if exp.kind == "dark" else None
            if excess is not None:
                idx, e_per_px = excess
                lam.reshape(-1)[idx] += np.float32(e_per_px)
                info["persistence_e"] = round(float(e_per_px), 4)
                info["persistence_adu"] = round(float(e_per_px) / t.gain_e_per_adu, 4)
                info["persistence_pixels"] = int(idx.size)
        if self.config.dark_during_readout and exp.readout_time > 0:
            t_row = exp.readout_time / max(exp.vend - exp.vstart, 1)
            extra = effects.readout_dark_rows(t.dark_e_per_s, t_row)
            lam = np.broadcast_to(extra, (IMAGE_ROWS, IMAGE_COLS)).astype(np.float32) if lam is None else lam + extra
            info["readout_row_time_s"] = t_row
        return lam, info

    def simulate_quadrant(self, ccd: str, q: str, exp: Exposure, rng: np.random.Generator, geometry: Geometry) -> QuadrantResult:
        """One canonical quadrant (ADU, float32, before digitisation) and its per-frame truth."""
        t = self.truth[ccd].quadrants[q]
        lam, info = self.expected_charge(ccd, q, exp, rng)
        image_adu = None
        n_cosmic = 0
        if self.config.cosmic_rate > 0:
            area_cm2 = IMAGE_ROWS * IMAGE_COLS * PIXEL_CM**2
            n_cosmic = int(rng.poisson(self.config.cosmic_rate * area_cm2 * (exp.exptime + exp.readout_time)))
        if lam is not None or n_cosmic:
            if lam is None:
                lam = np.zeros((IMAGE_ROWS, IMAGE_COLS), dtype=np.float32)
            cfg = self.config
            mu = float(lam.mean())
            boundary = cfg.bf_model == "boundary" and t.bf.a00 != 0 and mu >= POISSON_EXACT_BELOW
            if boundary:  # brighter-fatter by pixel-boundary shifts while the charge is collected
                charge = effects.deposit_boundary_shifts(lam, t.bf.a10, t.bf.a01, rng, cfg.bf_steps)
            else:
                sparse = exp.kind == "point" and mu < POISSON_EXACT_BELOW
                charge = shot_noise_sparse(lam, rng) if sparse else shot_noise(lam, rng)
                kernel = bf_kernel(mu, t.bf)
                if not sparse or max(kernel[1], kernel[2]) > 1e-6:  # a point frame's mean fluence leaves h ~ identity
                    charge = apply_bf(charge, kernel)
                charge += lam
            if exp.kind == "chinj":
                info.update(self.pump(ccd, q, charge, exp, rng))
            if n_cosmic:
                cosmic_rays(charge, n_cosmic, rng)
            charge, n_bloomed = bloom(charge, t.full_well_e)
            np.maximum(charge, 0, out=charge)
            trail = None
            if cfg.cti_parallel or cfg.cti_serial:
                trail = effects.serial_overscan_trail(charge, cfg.cti_serial) if cfg.cti_serial else None
                effects.apply_cti(charge, cfg.cti_parallel, cfg.cti_serial)
            charge *= np.float32(1.0 / t.gain_e_per_adu)
            mean_adu = np.array([mu / t.gain_e_per_adu], dtype=np.float64)
            if t.rolloff_adu:
                image_adu = effects.rolloff_nonlinearity(charge, t.rolloff_adu)
                signal = float(t.rolloff_adu * np.tanh(mean_adu[0] / t.rolloff_adu))
            else:
                image_adu = apply_nl(charge, t.nl.beta_per_adu)
                signal = float(apply_nl(mean_adu, t.nl.beta_per_adu)[0])
            info.update(
                fluence_e=mu,
                fluence_adu=mu / t.gain_e_per_adu,
                signal_adu=signal,
                pixels_above_full_well=n_bloomed,
            )
            if trail is not None:
                info["_serial_trail_adu"] = trail / np.float32(t.gain_e_per_adu)
            if exp.kind == "flat" and t.bf.a00 != 0 and not boundary:
                info["bf_kernel"] = {"h0": kernel[0], "h10": kernel[1], "h01": kernel[2]}
                info["expected_cov_e2"] = bf_expected_covariances(mu, t.bf)
        if n_cosmic:
            info["cosmic_rays"] = n_cosmic
        data = readout(image_adu, t.offset_adu, t.ron_analog_adu, rng, geometry, exp.vstart, exp.vend)
        self._readout_effects(ccd, q, data, info, rng, geometry, exp)
        return QuadrantResult(data=data, info=info)

    def _readout_effects(self, ccd: str, q: str, data: np.ndarray, info: dict[str, Any], rng: np.random.Generator,
                         geometry: Geometry, exp: Exposure) -> None:
        """Serial-CTI trail into the overscan, bias structure, row noise and ADC DNL (in place)."""
        cfg = self.config
        if exp.kind == "bias" and str(exp.values.get("comments", "")).strip().upper() == "RAMP" and cfg.ramp_slope_adu_per_row:
            # MOT_WARM ROE ramp: the video chain sees a ramp along the rows (whole rows, prescan included)
            rows = np.arange(data.shape[0], dtype=np.float32)
            top = float(max(exp.vend - exp.vstart, 1))
            ramp = np.float32(cfg.ramp_slope_adu_per_row) * rows * (1 + np.float32(cfg.ramp_nl_pct / 100.0) * rows / np.float32(top))
            window = slice(max(exp.vstart, 0), min(exp.vend, data.shape[0]))
            data[window] += ramp[window, None]
            info["ramp_slope_adu_per_row"] = cfg.ramp_slope_adu_per_row
            info["ramp_nl_pct"] = cfg.ramp_nl_pct
        trail = info.pop("_serial_trail_adu", None)
        if trail is not None:
            data[: trail.shape[0], PRESCAN_COLS + IMAGE_COLS] += trail[: geometry.quad_rows]
        if cfg.bias_fixed_rms_adu or cfg.bias_ramp_adu:
            key = ("bias_structure", ccd, q, geometry.quad_rows, geometry.quad_cols)
            if key not in self._fixed:
                self._fixed[key] = effects.bias_structure((geometry.quad_rows, geometry.quad_cols), cfg.bias_fixed_rms_adu,
                                                          cfg.bias_ramp_adu, self.rng("bias_structure", ccd, q))
            data += self._fixed[key]
        if cfg.row_noise_adu:
            data += effects.row_noise(data.shape[0], cfg.row_noise_adu, rng)[:, None]
        if cfg.adc_dnl_rms:
            key = ("dnl", ccd, q)
            if key not in self._fixed:
                self._fixed[key] = effects.dnl_table(cfg.adc_dnl_rms, self.rng("dnl", ccd, q))
            window = slice(max(exp.vstart, 0), min(exp.vend, data.shape[0]))
            data[window] = effects.apply_dnl(data[window], self._fixed[key])


#: Spots per quadrant (positions are drawn per block: ``DetectorModel.truth[ccd].point``).
SPOTS_PER_QUADRANT = simspots.SPOTS_PER_QUADRANT
