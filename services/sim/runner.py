"""Play a list of frame specs into an ELVIS-like data folder.

For every exposure (one ObsID = 3 CCDs), in the order ELVIS writes them:
1. the daily HK master file ``<DDMMYY>/HK_<DD-MM-YY>_ROE<r>.txt`` gets one row per HK sample
   of the frame (streamed at the sample times with ``realtime``);
2. the 3 FITS files ``EUC_<ObsID>_<DDMMYY>D<HHMMSS>T_ROE<r>_CCD<c>.fits``;
3. the per-exposure HK file ``HK_<ObsID>_<DDMMYY>D<HHMMSS>T_ROE<r>.txt``;
4. the 3 exposure-log rows appended to ``EXP_LOG_<DDMMYY>.txt`` (header written on creation),
so a reader never sees a log row before its FITS files exist.

The simulated clock starts at ``start`` and advances by each frame's duration (campaign.md
formula: a bias frame takes about 93.5 s); file dates come from it. ``truth.json`` in the output
folder records the detector model and every frame.
"""

from __future__ import annotations

import json
import logging
import os
import time as _time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.sim import hk as simhk
from services.sim.frames import (
    EXPLOG_VERSION,
    FrameSpec,
    default_equipment,
    duration_s,
    exposure_conditions,
    explog_values,
    fits_header,
    frame_geometry,
    frame_kind,
    wavelength_nm,
)
from services.sim import effects
from services.sim import crosstalk as xtalk
from services.sim import persistence as simpersist
from services.sim.physics import DetectorModel, PhysicsConfig
from shared.explog import explog_header, format_explog_row
from shared.filenames import (
    day_folder_name,
    explog_name,
    format_fits_name,
    hk_daily_name,
    hk_exposure_name,
    parse_fits_name,
)
from shared.fitsio import write_frame
from shared.geometry import CCDS, QUADRANTS, assemble
from shared.hk import hk_header, format_hk_row
from shared.refdata import chamber_profile

log = logging.getLogger("vison.sim")

TRUTH_SCHEMA = "vison.sim.truth/1"
TRUTH_FILE = "truth.json"


class SimOptions(BaseModel):
    """Run options (everything but the physics, which is :class:`PhysicsConfig`)."""

    model_config = ConfigDict(extra="forbid")

    out: Path
    block: str = "UNKNOWN"
    seed: int = 0
    chamber: str = "CHAMBER_A_JUN18"
    start: datetime | None = Field(None, description="simulated clock at the first frame (default: now)")
    roe: int = 1
    overscan: int = Field(20, description="serial overscan columns: 20 (ground models) or 29 (flight)")
    naxis2: int = Field(4172, description="4172 (parallel overscan read) or 4132 (vend - vstart <= 2066)")
    hk_period_s: float = Field(5.0, gt=0, description="seconds between HK samples")
    realtime: bool = False
    speedup: float = Field(1.0, gt=0)
    atomic: bool = Field(False, description="write FITS files under a temporary name, then rename")
    threads: int = Field(3, ge=1, le=3, description="CCDs generated in parallel")
    obsid_start: int | None = Field(None, description="first ObsID (default: after the last in the folder, or 1)")
    hk_injections: list[simhk.HKInjection] = Field(default_factory=list)
    equipment: dict[str, str] | None = None


class SimTruthError(RuntimeError):
    """The output folder holds a truth.json of a different detector model."""


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, datetime):
        return obj.isoformat(timespec="seconds")
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default))
    os.replace(tmp, path)


def _append(path: Path, text: str, header: str) -> None:
    """Append complete lines in one write; the header first when the file is new."""
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", encoding="utf-8", newline="") as fh:
        fh.write((header if new else "") + text)
        fh.flush()


def last_obsid(root: Path) -> int:
    """Highest ObsID of the FITS files under ``root`` (0 when none)."""
    best = 0
    if root.is_dir():
        for path in root.glob("*/EUC_*.fits"):
            try:
                best = max(best, parse_fits_name(path.name).obsid)
            except ValueError:
                continue
    return best


MODEL_NOTES = {
    "orientation": "per-quadrant values and pixel positions are in canonical orientation "
    "(readout node at [0, 0]; rows parallel, columns serial; columns include the 51 prescan columns)",
    "offset_adu": "bias level added to every pixel (block reference + per-quadrant delta)",
    "ron_adu": "standard deviation of the digitised read noise (ADU), ADC quantisation (1/12 ADU^2) "
    "included; the analogue noise injected is ron_analog_adu",
    "fluence": "fluence fractions / tFWC refer to 2^16 ADU at the reference gain 3.2 e-/ADU: the flat "
    "source gives 2^16 * 3.2 / tFWC_flat e-/s (flux_e_per_s, drift included) on average over the CCD; "
    "per-quadrant ADU = e- / gain (the same photon flux on every quadrant)",
    "illumination": "response = (1 + gx u + gy v + vig (u^2 + v^2 - <u^2 + v^2>)) x (1 + PRNU) x dead-column "
    "factor, u, v in [-1, 1] across the CCD image area (x = columns, y = rows as displayed); mean 1",
    "prnu_pct": "std (%) of the Gaussian pixel-to-pixel response map",
    "shot_noise": "Poisson in electrons (Gaussian limit above 200 e- mean)",
    "bf": "brighter-fatter: Q = lam + h (*) (N - lam), 5-point charge-conserving kernel; pixel variance "
    "follows exactly C00 = (exp(2 a00 mu) - 1)/(2 a00) (e-^2, mu in e-); C10 ~ a10 mu^2, C01 ~ a01 mu^2 "
    "to first order (10 = serial / x lag, 01 = parallel / y lag); per-frame expected_cov_e2 are exact "
    "for a uniform field; a00 = -2 (a10 + a01) (Astier et al. 2019 convention)",
    "full_well": "charge above full_well_e blooms along the column (half up, half down) into pixels below "
    "full well; the ADC clips at 65535",
    "nl": "S_meas = S (1 + beta S), S = offset-subtracted signal in ADU; NL % = 100 beta S, pct at at_adu",
    "dark": "dark current (e-/s) x exptime, hot pixels and hot columns add their rate; bias frames have none",
    "drift": "source flux x (1 + drift_pct_per_hour/100 x hours since the run start, at mid-exposure)",
    "cosmic_rays": "rate per cm^2 per s over exptime + readout time; straight tracks of 1-12 px",
    "chinj": "injected lines (chinj_on on / chinj_of off) at 600 + max(0, IG2 - IG1) x 6000 ADU, "
    "logistic cut-off at IDL = IG1 + 7.5 V, 2 % per-column non-uniformity; no traps simulated",
    "point": "5 spots per quadrant at positions drawn per block (ccds.<CCD>.point.quadrants.<Q>.x/y, canonical image-area "
    "px, prescan excluded; all 60 >= 150 px apart in canonical coordinates); an axis-aligned pixel-integrated Gaussian with "
    "optical FWHM(z) = fwhm_lambda sqrt(1 + ((z - z_best)/0.2 mm)^2), z = mirr_pos, z_best = mirror_nom + z_best_offset_mm "
    "(per CCD), sigma_x^2 = s^2 (1 + e), sigma_y^2 = s^2 (1 - e); pixel-sampled FWHM = 2.3548 sqrt(s^2 + 1/12); brighter-"
    "fatter: pixel-sampled FWHM = F0 + bf_slope_px_per_10k x amplitude / 1e4 (amplitude = flux / (2 pi sx_p sy_p), ADU); "
    "flux such that the in-focus spot without BF centred on a pixel peaks at exptime / tFWC_point x 2^16 ADU (reference "
    "gain); per frame and quadrant 'spots' gives each spot's fwhm_x_px, fwhm_y_px, fwhm_px (pixel-sampled), e1, e2, "
    "amplitude_adu, fluence_adu. Beyond physics.far_defocus_mm from z_best (PERSIST01's saturating exposure) a spot is a "
    "pupil disk of |dz| x defocus_px_per_mm px convolved with the core and wings (point_halo_fraction of the flux)",
    "crosstalk": "optical crosstalk (truth 'crosstalk': {source: {victim: c}}, 'crosstalk_requirement_met': {victim: bool}) "
    "in point-source frames: victim += c x (source - source offset) at the same canonical array position, inside the boxes "
    "of the source's spots; applied after the 3 CCDs are simulated (services/sim/crosstalk.py)",
    "persistence": "pixels digitised to 65535 in a point-source exposure release R0 exp(-t/tau) e-/s (ccds.<CCD>.persistence."
    "<Q>) into the following darks, t = s since that exposure ended; per dark frame and quadrant persistence_adu (excess "
    "per masked pixel), persistence_pixels, persistence_t_mid_s (services/sim/persistence.py); a point frame records "
    "n_saturated per quadrant",
    "ramp": "MOT_WARM ROE ramp frame (comments RAMP): every read row y gets ramp_slope_adu_per_row x y x (1 + ramp_nl_pct/100 x "
    "y / (vend - vstart)) on top of the bias",
    "readout_window": "rows outside [vstart, vend) are 0 (not read out)",
    "effects": "with physics.bf_model 'boundary' the brighter-fatter effect is a charge-dependent pixel-boundary "
    "shift during collection (area 1 + sum_n a_n (Q_n - Q_p), midpoint scheme; no expected_cov_e2 then); "
    "nl_model 'rolloff': S_meas = S_r tanh(S / S_r) (rolloff_adu per quadrant); drift 1 + l t + w (sin(2 pi t/P)); "
    "shutter_offset_s lengthens the illumination of shutter-open frames (illumination_s per frame); flux_jitter "
    "per frame; cti_parallel / cti_serial: first-order trails (her_expected = eps_s x 2099 transfers); "
    "bias_fixed_rms_adu / bias_ramp_adu: a fixed pattern in every frame; row_noise_adu: an offset per row and "
    "frame; adc_dnl_rms: code widths 1 + d_k; dark_during_readout: row y collects y x readout_row_time_s more; "
    "illum_ripple_pct: 1 + A sin(2 pi x / P) cos(2 pi y / 1.3 P); see services/sim/effects.py",
    "not_simulated": "offset drifts; crosstalk and persistence outside point-source frames and darks",
}


class Simulator:
    """Plays frame specs into ``options.out``; keeps the truth."""

    def __init__(self, options: SimOptions, physics: PhysicsConfig | None = None, sleep: Callable[[float], None] = _time.sleep):
        self.opts = options
        self.physics = physics or PhysicsConfig()
        self.model = DetectorModel(self.physics, options.block, options.seed)
        self.chamber = chamber_profile(options.chamber)
        self.root = Path(options.out)
        self.root.mkdir(parents=True, exist_ok=True)
        self.equipment = options.equipment or default_equipment(options.block)
        self._sleep = sleep
        self.truth = self._load_truth()
        self._truth_written = 0.0
        self.persistence = simpersist.PersistenceState()  # masks of the latest saturating point exposure

    # -- truth -----------------------------------------------------------------------------
    def _model_truth(self) -> dict[str, Any]:
        return {
            "schema": TRUTH_SCHEMA,
            "seed": self.opts.seed,
            "block": self.opts.block,
            "roe": self.opts.roe,
            "chamber": self.opts.chamber,
            "geometry": {"overscan": self.opts.overscan, "naxis2": self.opts.naxis2},
            "physics": self.physics.model_dump(mode="json"),
            "ccds": {ccd: t.model_dump(mode="json") for ccd, t in self.model.truth.items()},
            "crosstalk": self.model.crosstalk,
            "crosstalk_requirement_met": {v: xtalk.requirement_met({s: c[v] for s, c in self.model.crosstalk.items() if v in c})
                                          for v in xtalk.labels()},
        }

    def _load_truth(self) -> dict[str, Any]:
        path = self.root / TRUTH_FILE
        model = self._model_truth()
        if path.exists():
            old = json.loads(path.read_text())
            same = all(old.get(k) == model[k] for k in ("seed", "block", "physics", "ccds", "chamber"))
            if not same:
                raise SimTruthError(
                    f"{path} describes another detector model (seed / block / physics / chamber differ): "
                    "use another --out folder or the same options"
                )
            old.setdefault("runs", [])
            old.setdefault("frames", [])
            return old
        return {**model, "notes": MODEL_NOTES, "runs": [], "hk_injections": [], "frames": []}

    def save_truth(self, force: bool = True) -> None:
        now = _time.monotonic()
        if force or now - self._truth_written > 10.0:
            write_json_atomic(self.root / TRUTH_FILE, self.truth)
            self._truth_written = now

    # -- playing ---------------------------------------------------------------------------
    def play(self, frames: Iterable[FrameSpec], sequence: Any = None, progress: Callable[[dict], None] | None = None) -> list[dict]:
        """Acquire every frame in order; returns the per-frame truth records."""
        frames = list(frames)
        opts = self.opts
        start = (opts.start or datetime.now()).replace(microsecond=0)
        obsid = opts.obsid_start if opts.obsid_start is not None else last_obsid(self.root) + 1
        run = {
            "started": datetime.now().isoformat(timespec="seconds"),
            "sim_start": start.isoformat(timespec="seconds"),
            "first_obsid": obsid,
            "frames": len(frames),
            "sequence": sequence,
            "realtime": opts.realtime,
            "speedup": opts.speedup,
        }
        self.truth["runs"].append(run)
        for inj in opts.hk_injections:
            self.truth["hk_injections"].append(inj.model_dump(mode="json"))
        self.save_truth()
        clock = start
        wall0 = _time.monotonic()
        records = []
        pool = ThreadPoolExecutor(max_workers=opts.threads, thread_name_prefix="vison-sim")
        try:
            for spec in frames:
                rec = self._one_frame(spec, obsid, clock, start, wall0, pool)
                records.append(rec)
                self.truth["frames"].append(rec)
                self.save_truth(force=opts.realtime)
                if progress:
                    progress(rec)
                clock += timedelta(seconds=rec["duration_s"])
                obsid += 1
        finally:
            pool.shutdown()
            run["last_obsid"] = obsid - 1
            run["sim_end"] = clock.isoformat(timespec="seconds")
            self.save_truth()
        return records

    def _wait_until(self, wall0: float, sim_start: datetime, when: datetime) -> None:
        if not self.opts.realtime:
            return
        target = wall0 + (when - sim_start).total_seconds() / self.opts.speedup
        delay = target - _time.monotonic()
        if delay > 0:
            self._sleep(delay)

    def _simulate_ccd(self, ccd: str, obsid: int, exposure, geometry) -> tuple[dict[str, np.ndarray], dict]:
        quads, infos = {}, {}
        for q in QUADRANTS:
            res = self.model.simulate_quadrant(ccd, q, exposure, self.model.rng("frame", obsid, ccd, q), geometry)
            quads[q] = res.data
            infos[q] = res.info
        return quads, infos

    def _persistence_for(self, exposure, t0: datetime) -> dict[tuple[str, str], float]:
        """Set the persistence excess of a dark from the latest saturating exposure; returns the
        seconds since saturation at mid-dark per (CCD, Q)."""
        t_mid: dict[tuple[str, str], float] = {}
        if exposure.kind != "dark" or not self.physics.persistence or exposure.exptime <= 0:
            return t_mid
        start = t0.timestamp()
        for ccd in CCDS:
            for q in QUADRANTS:
                got = self.persistence.excess(ccd, q, self.model.truth[ccd].persistence[q], start, start + exposure.exptime)
                if got is not None:
                    exposure.persistence[(ccd, q)] = (got[0], got[1])
                    t_mid[(ccd, q)] = got[2]
        return t_mid

    def _point_effects(self, results: dict[str, tuple[dict, dict]], exposure, t0: datetime) -> None:
        """Crosstalk between the 12 quadrants, then the saturation masks left for persistence."""
        if exposure.kind != "point":
            return
        quads = {ccd: r[0] for ccd, r in results.items()}
        if self.physics.crosstalk:
            xtalk.apply_point_crosstalk(self.model, quads, {ccd: r[1] for ccd, r in results.items()})
        end = t0.timestamp() + exposure.exptime
        for ccd, (qd, infos) in results.items():
            for q in qd:
                idx = simpersist.saturated_indices(qd[q])
                infos[q]["n_saturated"] = int(idx.size)
                if self.physics.persistence:
                    self.persistence.record(ccd, q, idx, end)

    def _one_frame(self, spec: FrameSpec, obsid: int, t0: datetime, sim_start: datetime, wall0: float, pool) -> dict:
        opts = self.opts
        regs = spec.registers(self.equipment)
        if opts.naxis2 == 4132 and float(regs["vend"]) - float(regs["vstart"]) > 2066:
            regs["vend"] = int(float(regs["vstart"])) + 2066
        kind = frame_kind(regs, spec.kind)
        geometry = frame_geometry(regs, opts.overscan)
        dur = duration_s(regs)
        exptime = float(regs.get("exptime", 0) or 0)
        hours = ((t0 - sim_start).total_seconds() + exptime / 2) / 3600.0
        cfg = self.physics
        drift = effects.drift_factor(hours, cfg.drift_pct_per_hour, cfg.drift_wobble_pct, cfg.drift_wobble_period_h)
        jitter = 1.0
        if cfg.flux_jitter_pct and kind in ("flat", "point"):
            jitter = 1.0 + cfg.flux_jitter_pct / 100.0 * float(self.model.rng("jitter", obsid).standard_normal())
        drift *= jitter
        exposure = exposure_conditions(regs, kind, self.chamber, drift)
        t_mid = self._persistence_for(exposure, t0)

        # HK over the frame
        times = simhk.sample_times(t0, dur, opts.hk_period_s)
        hk_rows = simhk.hk_samples(times, regs, self.model.rng("hk", obsid), obsid, sim_start, opts.hk_injections)
        temps = simhk.mean_temperatures(hk_rows)
        injected = sorted({inj.key for inj in opts.hk_injections
                           if inj.active(obsid, (t0 - sim_start).total_seconds())})

        # pixels, generated in the background while the daily HK rows stream (real time)
        tic = _time.perf_counter()
        futures = {ccd: pool.submit(self._simulate_ccd, ccd, obsid, exposure, geometry) for ccd in CCDS}
        for t, row in hk_rows:
            self._wait_until(wall0, sim_start, t)
            folder = self.root / day_folder_name(t.date())
            folder.mkdir(exist_ok=True)
            _append(folder / hk_daily_name(t.date(), opts.roe), format_hk_row(t, row), hk_header())
        parts = {ccd: f.result() for ccd, f in futures.items()}
        self._point_effects(parts, exposure, t0)
        for (ccd, q), t in t_mid.items():
            parts[ccd][1][q]["persistence_t_mid_s"] = round(t, 2)
        results = {ccd: (assemble(qd, geometry), infos) for ccd, (qd, infos) in parts.items()}
        gen_s = _time.perf_counter() - tic
        self._wait_until(wall0, sim_start, t0 + timedelta(seconds=dur))

        # FITS files, then the per-exposure HK file, then the exposure-log rows
        tic = _time.perf_counter()
        folder = self.root / day_folder_name(t0.date())
        folder.mkdir(exist_ok=True)
        log_rows, files = [], []
        for ccd in CCDS:
            c = int(ccd[-1])
            name = format_fits_name(obsid, t0, opts.roe, c)
            values = explog_values(regs, obsid, c, opts.roe, t0, name[: -len(".fits")], temps)
            header = fits_header(values, regs, opts.block, opts.seed, kind)
            write_frame(folder / name, results[ccd][0], c, roe=opts.roe, header=header, atomic=opts.atomic)
            files.append(f"{folder.name}/{name}")
            log_rows.append(format_explog_row(values, EXPLOG_VERSION))
        hk_name = hk_exposure_name(obsid, t0, opts.roe)
        (folder / hk_name).write_text(hk_header() + "".join(format_hk_row(t, row) for t, row in hk_rows))
        _append(folder / explog_name(t0.date()), "".join(log_rows), explog_header(EXPLOG_VERSION))
        write_s = _time.perf_counter() - tic
        log.debug("ObsID %d %s %s exptime %.3g s: generated in %.2f s, written in %.2f s",
                 obsid, spec.test, kind, exptime, gen_s, write_s)

        record: dict[str, Any] = {
            "obsid": obsid,
            "test": spec.test,
            "kind": kind,
            "column": spec.column,
            "label": spec.label,
            "date": t0.isoformat(timespec="seconds"),
            "exptime": exptime,
            "duration_s": round(dur, 3),
            "wave": regs.get("wave"),
            "nm": wavelength_nm(regs, self.chamber) if kind in ("flat", "point") else None,
            "vstart": exposure.vstart,
            "vend": exposure.vend,
            "drift_factor": drift,
            "flux_jitter": jitter,
            "flux_e_per_s": exposure.flux_e_per_s,
            "files": files,
            "hk_file": f"{folder.name}/{hk_name}",
            "hk_injected": injected,
            "temperatures": temps,
            "ccds": {ccd: results[ccd][1] for ccd in CCDS},
            "timing_s": {"generate": round(gen_s, 3), "write": round(write_s, 3)},
        }
        if kind == "point":
            record["fwhm0_px"] = exposure.fwhm0_px
            record["mirror_mm"] = exposure.mirror_mm
            record["mirror_nominal_mm"] = exposure.mirror_nominal_mm
            record["point_peak_e"] = exposure.point_peak_e
        return record
