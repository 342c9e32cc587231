"""Detector and source effects of the simulator that are *physically* different from the models
the analyses fit (issue 11): each a pure function on canonical-quadrant arrays, switched by an
option of :class:`services.sim.physics.PhysicsConfig` and recorded in ``truth.json``.

- :func:`deposit_boundary_shifts`: brighter-fatter as charge-dependent pixel-boundary shifts.
  The exposure is deposited in ``steps`` increments; the collecting area of each pixel is
  ``1 + sum_n a_n (Q_n - Q_p)`` over its 4 nearest neighbours (Q the charge already collected,
  evaluated at the middle of the step), which conserves charge (the areas sum to the number of
  pixels). The covariances that result follow Astier et al. only to first order; nothing imposes
  the exponential PTC on the variance.
- :func:`rolloff_nonlinearity`: a smooth roll-off towards full well, ``S' = S_r tanh(S / S_r)``
  (not a polynomial).
- :func:`drift_factor`: source flux drift, linear plus a slow sinusoidal wander (not linear in
  time); :func:`shutter_exposure`: the shutter's timing offset (the exposure lasts ``exptime +
  offset``) and a frame-to-frame flux jitter.
- :func:`apply_cti`: charge-transfer inefficiency, parallel and serial: each transfer defers a
  fraction ``eps`` of a pixel's charge into the pixel read after it (first-order trail), so the
  hard-edge response at the image -> serial overscan transition is ``~ eps_s x transfers``.
- :func:`bias_structure`: a fixed pattern (column offsets and a low-order ramp, the same in every
  frame) and row noise (an offset per row and frame, common to prescan, image and overscan).
- :func:`apply_dnl`: ADC differential non-linearity: code widths ``1 + d_k`` (random, rms
  ``dnl_rms`` LSB), applied to the analogue value before the 16-bit rounding.
- :func:`readout_dark_rows`: dark current collected while the rows ahead are read out: row ``y``
  (canonical, 0 next to the serial register) waits ``y x t_row`` more than row 0.
- :func:`ripple`: an illumination ripple (period ~300 px) on top of the vignetting.
"""

from __future__ import annotations

import math

import numpy as np

from shared.geometry import IMAGE_ROWS, PRESCAN_COLS


def _neighbour_sum(q: np.ndarray, a10: float, a01: float) -> np.ndarray:
    """``sum_n a_n (Q_n - Q_p)`` over the 4 nearest neighbours (edges: missing neighbours count
    as equal charge), float32."""
    out = np.zeros_like(q)
    if a10:
        d = q[:, 1:] - q[:, :-1]  # Q(x+1) - Q(x)
        out[:, :-1] += np.float32(a10) * d
        out[:, 1:] -= np.float32(a10) * d
    if a01:
        d = q[1:, :] - q[:-1, :]
        out[:-1, :] += np.float32(a01) * d
        out[1:, :] -= np.float32(a01) * d
    return out


def deposit_boundary_shifts(lam: np.ndarray, a10: float, a01: float, rng: np.random.Generator, steps: int = 4) -> np.ndarray:
    """Collected charge (e-, float32) for the expected charge ``lam`` (e-) with brighter-fatter
    pixel-boundary shifts of area coefficients ``a10`` (serial neighbours) and ``a01`` (parallel
    neighbours), 1/e-, positive. Shot noise is drawn per step (Gaussian limit: use it above a few
    hundred e-). Midpoint scheme: the areas of a step use the charge at the middle of that step,
    so the nearest-neighbour covariance is ``a mu^2`` to first order whatever ``steps``."""
    lam = np.asarray(lam, dtype=np.float32)
    steps = max(int(steps), 1)
    step = lam / np.float32(steps)
    sd = np.sqrt(np.maximum(step, 0)).astype(np.float32)
    q = np.zeros_like(lam)
    for _ in range(steps):
        dq = rng.standard_normal(lam.shape, dtype=np.float32)
        dq *= sd
        dq += step
        mid = q + np.float32(0.5) * dq
        area = _neighbour_sum(mid, a10, a01)
        area += np.float32(1.0)
        dq *= area
        q += dq
    return q


def rolloff_nonlinearity(signal_adu: np.ndarray, rolloff_adu: float) -> np.ndarray:
    """``S_r tanh(S / S_r)`` in place (S offset-subtracted ADU); identity when ``rolloff_adu``
    is 0 or infinite."""
    if rolloff_adu and math.isfinite(rolloff_adu):
        r = np.float32(rolloff_adu)
        np.divide(signal_adu, r, out=signal_adu)
        np.tanh(signal_adu, out=signal_adu)
        signal_adu *= r
    return signal_adu


def rolloff_for(nl_pct: float, at_adu: float) -> float:
    """Roll-off scale ``S_r`` (ADU) whose non-linearity ``tanh(x)/x - 1`` is ``-|nl_pct|`` % at
    ``at_adu`` (0 when ``nl_pct`` is 0)."""
    target = abs(nl_pct) / 100.0
    if target <= 0:
        return 0.0
    lo, hi = 1e-6, 10.0  # solve 1 - tanh(x)/x = target for x = at / S_r
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 1.0 - math.tanh(mid) / mid < target:
            lo = mid
        else:
            hi = mid
    return at_adu / (0.5 * (lo + hi))


def rolloff_nl_pct(signal_adu: float | np.ndarray, rolloff_adu: float) -> float | np.ndarray:
    """Non-linearity (%) of the roll-off at true signal ``signal_adu``: ``100 (tanh(x)/x - 1)``."""
    x = np.asarray(signal_adu, dtype=np.float64) / rolloff_adu if rolloff_adu else np.zeros_like(signal_adu, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(x > 1e-8, np.tanh(x) / np.where(x > 0, x, 1) - 1.0, -x * x / 3.0) * 100.0
    return float(out) if np.ndim(out) == 0 else out


def drift_factor(hours: float, linear_pct_per_hour: float, wobble_pct: float, wobble_period_h: float, phase: float = 0.0) -> float:
    """Relative source flux at ``hours`` since the start of the run: ``1 + l t + w sin(2 pi t / P +
    phase)`` (percent coefficients)."""
    out = 1.0 + linear_pct_per_hour / 100.0 * hours
    if wobble_pct and wobble_period_h > 0:
        out += wobble_pct / 100.0 * (math.sin(2 * math.pi * hours / wobble_period_h + phase) - math.sin(phase))
    return out


def shutter_exposure(exptime: float, offset_s: float) -> float:
    """Effective illumination time (s) of a shutter-open frame: ``exptime + offset`` (>= 0)."""
    return max(exptime + offset_s, 0.0) if exptime > 0 else 0.0


def apply_cti(image: np.ndarray, eps_parallel: float, eps_serial: float) -> np.ndarray:
    """First-order charge-transfer trails on a canonical image area (e- or ADU, in place).

    Parallel: row ``y`` is transferred ``y + 1`` times towards the serial register, each transfer
    deferring ``eps_parallel`` of its charge into the row read after it (``y + 1``). Serial:
    column ``x`` of the image (canonical, 0 next to the prescan) is transferred ``51 + x + 1``
    times; the deferred charge goes into the column read after it, and the last image column's
    trail into the first serial-overscan column (returned separately: see
    :func:`serial_overscan_trail`)."""
    if eps_parallel:
        frac = (np.arange(image.shape[0], dtype=np.float32) + 1) * np.float32(eps_parallel)
        moved = image * frac[:, None]
        image -= moved
        image[1:] += moved[:-1]
    if eps_serial:
        frac = (PRESCAN_COLS + np.arange(image.shape[1], dtype=np.float32) + 1) * np.float32(eps_serial)
        moved = image * frac[None, :]
        image -= moved
        image[:, 1:] += moved[:, :-1]
    return image


def serial_overscan_trail(image: np.ndarray, eps_serial: float) -> np.ndarray:
    """Charge (same unit as ``image``) deferred by serial CTI from the last image column into the
    first serial-overscan column, per row: ``eps_s x transfers x last column``."""
    transfers = PRESCAN_COLS + image.shape[1]
    return image[:, -1] * np.float32(eps_serial * transfers)


def bias_structure(shape: tuple[int, int], fixed_rms: float, ramp_adu: float, rng_fixed: np.random.Generator) -> np.ndarray:
    """Fixed bias pattern of a canonical quadrant (ADU, float32, every frame the same): column
    offsets of rms ``fixed_rms`` plus a ramp of ``ramp_adu`` peak-to-peak along the rows (the
    first rows read after the idle are higher)."""
    rows, cols = shape
    col = rng_fixed.standard_normal(cols).astype(np.float32) * np.float32(fixed_rms)
    ramp = (np.float32(ramp_adu) * np.exp(-np.arange(rows, dtype=np.float32) / 200.0)).astype(np.float32)
    return ramp[:, None] + col[None, :]


def row_noise(rows: int, rms: float, rng: np.random.Generator) -> np.ndarray:
    """Per-row offset of one frame (ADU): white, rms ``rms`` (common to all columns of a row)."""
    return (rng.standard_normal(rows).astype(np.float32) * np.float32(rms)) if rms else np.zeros(rows, np.float32)


def dnl_table(rms: float, rng: np.random.Generator, codes: int = 65536) -> np.ndarray:
    """Lower edges (analogue ADU) of every ADC code for code widths ``1 + d_k`` (``d_k`` Gaussian
    of rms ``rms``, clipped to [-0.9, 0.9], mean width 1): ``edges[k]`` = analogue value where code
    ``k`` starts."""
    widths = 1.0 + np.clip(rng.normal(0.0, rms, codes), -0.9, 0.9)
    widths *= codes / widths.sum()
    edges = np.concatenate([[0.0], np.cumsum(widths)[:-1]]) - 0.5
    return edges.astype(np.float64)


def apply_dnl(analog_adu: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Digitise with code edges (:func:`dnl_table`): the code ``k`` with ``edges[k] <= v <
    edges[k+1]``, returned as float32 integers (the FITS writer's rounding keeps them)."""
    codes = np.searchsorted(edges, np.asarray(analog_adu, dtype=np.float64).ravel(), side="right") - 1
    np.clip(codes, 0, edges.size - 1, out=codes)
    return codes.reshape(np.shape(analog_adu)).astype(np.float32)


def readout_dark_rows(rate_e_per_s: float, t_row_s: float, rows: int = IMAGE_ROWS) -> np.ndarray:
    """Extra dark charge (e-) of each canonical image row collected during the readout of the rows
    read before it: ``rate x y x t_row``, shape (rows, 1)."""
    return (np.arange(rows, dtype=np.float32) * np.float32(rate_e_per_s * t_row_s))[:, None]


def ripple(q_x: np.ndarray, q_y: np.ndarray, amplitude: float, period_px: float) -> np.ndarray:
    """Illumination ripple ``1 + A sin(2 pi x / P) cos(2 pi y / (1.3 P))`` on CCD coordinates."""
    return (1.0 + amplitude * np.sin(2 * np.pi * q_x / period_px) * np.cos(2 * np.pi * q_y / (1.3 * period_px))).astype(np.float32)


__all__ = [
    "apply_cti", "apply_dnl", "bias_structure", "deposit_boundary_shifts", "dnl_table", "drift_factor", "readout_dark_rows",
    "ripple", "rolloff_for", "rolloff_nl_pct", "rolloff_nonlinearity", "row_noise", "serial_overscan_trail", "shutter_exposure",
]

