"""Benchmark: accuracy of the analysis families on the simulator's *realistic* profile (issue 11
"Accuracy"): for each target, the error against truth with every effect on
(``PhysicsConfig.realistic()``), with the effect switched off in the simulator
(``realistic(<effect>=off)``) and, where the analysis has an option to ignore the effect, with
that option.

Frames are the catalogue scripts (CHAMBER_A_JUN18, nominal registers) simulated in memory,
full-size quadrants, digitised to 16 bits; the source drift and flux jitter follow the
simulator's runner (drift at the middle of each exposure, frame durations of the campaign).
Quadrants that are not measured are filled with a flat bias (offset + white read noise).

Quantities and truth:

- RON (BIAS01): every RON key against ``ron``, ``ron_rows = sqrt(ron^2 + row_noise^2)`` and
  ``ron_rows_fixed = sqrt(ron^2 + row_noise^2 + fixed^2)`` (target 2 %). Measured: the
  frame-difference ``ron_diff_adu`` is ``ron_rows`` (row offsets differ frame to frame, so the
  difference keeps them; the fixed pattern cancels); the image ``ron_img_adu`` is
  ``ron_rows_fixed`` + ~1 % (not identified; the 200-row bias ramp is a candidate); ``ron_pre`` / ``ron_ove``
  carry the bias ramp (+5..8 %);
- dark current (DARK01, 565 s): ``dark_current_e_s`` vs ``dark_e_per_s`` (target 5 %), with the
  BIAS01 result as the ``master_bias`` calibration and the true gains;
- PTC gain (target 0.2 %), a00 (10 %), full well (2 %: ``full_well_adu`` after the roll-off when
  ``saturation_first`` is full_well, else a lower limit >= ``adc_limit_adu``);
- NL (NL01): max |fitted NL - rolloff_nl_pct| over 0.5-90 % of the full well (target 0.1
  points; the full well after the roll-off, or the ADC limit when it comes first);
- PRNU (FLAT01): ``prnu_pct`` vs the injected ``prnu_pct`` (target 5 % relative).

Run: ``.venv/bin/python bench/accuracy_realistic.py [--quick] [--only ron,dark,ptc,nl,prnu]
[--quads E,H] [--seed N]`` (nominal volumes take long: a realistic flat quadrant is ~4 s to
simulate; ``--quick`` keeps a reduced volume: fewer frames per fluence / column).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.analyzer.family import GAIN, MASTER_BIAS, Calibration, Calibrations, ExposureFrames, TestRun, run_inprocess  # noqa: E402
from services.analyzer.model import FrameMeta, ListSink  # noqa: E402
from services.sim import effects  # noqa: E402
from services.sim.campaign import test_frames as catalogue_frames  # noqa: E402
from services.sim.frames import duration_s, exposure_conditions, frame_geometry, frame_kind  # noqa: E402
from services.sim.physics import DetectorModel, PhysicsConfig  # noqa: E402
from shared.fitsio import to_uint16, write_frame  # noqa: E402
from shared.geometry import QUADRANTS, assemble  # noqa: E402
from shared.refdata import chamber_profile  # noqa: E402

CHAMBER = "CHAMBER_A_JUN18"
START = datetime(2026, 1, 1, tzinfo=timezone.utc)
BLOCK = "BENCH"

#: what "the effect switched off" means in the simulator, per effect name
EFFECT_OFF: dict[str, dict[str, Any]] = {
    "bias_structure": dict(bias_fixed_rms_adu=0.0, bias_ramp_adu=0.0),
    "row_noise": dict(row_noise_adu=0.0),
    "readout_dark": dict(dark_during_readout=False),
    "cosmics": dict(cosmic_rate=0.0),
    "dnl": dict(adc_dnl_rms=0.0),
    "bf_boundary": dict(bf_model="kernel"),  # the exponential model the PTC fits
    "bf": dict(bf_a00=0.0),  # no brighter-fatter at all
    "nl": dict(nl_pct=0.0),  # a linear detector
    "rolloff": dict(nl_model="quadratic"),  # the polynomial NL of the legacy profile (same -1 % at 90 %)
    "drift_wobble": dict(drift_wobble_pct=0.0),
    "shutter": dict(shutter_offset_s=0.0),
    "ripple": dict(illum_ripple_pct=0.0),
    "cti": dict(cti_parallel=0.0, cti_serial=0.0),
    "jitter": dict(flux_jitter_pct=0.0),
}


def realistic(*off: str, **overrides: Any) -> PhysicsConfig:
    """``PhysicsConfig.realistic()`` with the named effects (:data:`EFFECT_OFF`) switched off."""
    values: dict[str, Any] = {}
    for name in off:
        values.update(EFFECT_OFF[name])
    values.update(overrides)
    return PhysicsConfig.realistic(**values)


# ----------------------------------------------------------------------------- frames


def campaign_exposures(test: str, model: DetectorModel, ccd: str = "CCD1", quads: Iterable[str] = QUADRANTS,
                       keep: Callable[[int, dict], bool] | None = None, write_to: Path | None = None) -> list[ExposureFrames]:
    """The catalogue script of ``test`` as in-memory exposures of one CCD: frame ``k`` (0-based)
    with registers ``regs`` is kept when ``keep(k, regs)``; its quadrants ``quads`` are simulated
    when the analysis loads it (others: a flat bias), times and drift follow the whole script.
    ``write_to``: simulate now and write FITS files there (families whose solve stacks files)."""
    quads = [q for q in QUADRANTS if q in set(quads)]
    specs, _ = catalogue_frames([test], CHAMBER)
    chamber = chamber_profile(CHAMBER)
    cfg = model.config
    out: list[ExposureFrames] = []
    t = 0.0
    for k, spec in enumerate(specs):
        regs = spec.registers()
        obsid = k + 1
        kind = frame_kind(regs)
        exptime = float(regs.get("exptime", 0) or 0)
        hours = (t + exptime / 2) / 3600.0
        date = START + timedelta(seconds=t)
        t += duration_s(regs)
        if keep is not None and not keep(k, regs):
            continue
        drift = effects.drift_factor(hours, cfg.drift_pct_per_hour, cfg.drift_wobble_pct, cfg.drift_wobble_period_h)
        if cfg.flux_jitter_pct and kind in ("flat", "point"):
            drift *= 1.0 + cfg.flux_jitter_pct / 100.0 * float(model.rng("jitter", obsid).standard_normal())
        exp = exposure_conditions(regs, kind, chamber, drift)
        geo = frame_geometry(regs)

        def load(meta: FrameMeta, exp=exp, geo=geo, obsid=obsid) -> np.ndarray:
            data = {}
            for q in QUADRANTS:
                if q in quads:
                    data[q] = model.simulate_quadrant(ccd, q, exp, model.rng("frame", obsid, ccd, q), geo).data
                else:
                    tq = model.truth[ccd].quadrants[q]
                    rng = model.rng("filler", obsid, ccd, q)
                    data[q] = (tq.offset_adu + tq.ron_analog_adu * rng.standard_normal((geo.quad_rows, geo.quad_cols), dtype=np.float32))
            return to_uint16(assemble(data, geo)).astype(np.float32)

        path = f"/mem/{test}_{obsid}_{ccd}.fits"
        meta = FrameMeta(obsid=obsid, ccd=int(ccd[-1]), path=path, exptime=exptime, date=date, test=test, values=dict(regs))
        if write_to is not None:
            path = str(Path(write_to) / f"{test}_{obsid:05d}_{ccd}.fits")
            write_frame(path, load(meta), int(ccd[-1]))
            meta = meta.model_copy(update={"path": path})
            out.append(ExposureFrames.from_frames([meta], BLOCK))
        else:
            out.append(ExposureFrames.from_frames([meta], BLOCK, loader=load))
    return out


def run_of(test: str, exposures: list[ExposureFrames]) -> TestRun:
    return TestRun.of(test, BLOCK, [m for e in exposures for m in e.frames.values()])


def gain_calibration(model: DetectorModel) -> Calibration:
    gains = {c: {q: model.truth[c].quadrants[q].gain_e_per_adu for q in QUADRANTS} for c in model.truth}
    return Calibration(name=GAIN, block=BLOCK, test="PTC01", values={"gain": gains})


def every_nth_per_group(n_keep: int) -> Callable[[int, dict], bool]:
    """Keep the first ``n_keep`` frames of each (exptime, comments) group of a script."""
    seen: dict[tuple, int] = {}

    def keep(k: int, regs: dict) -> bool:
        key = (float(regs.get("exptime", 0) or 0), str(regs.get("comments", "")))
        seen[key] = seen.get(key, 0) + 1
        return seen[key] <= n_keep

    return keep


def rel(measured: float | None, truth: float) -> float:
    """Relative error (%)."""
    return float("nan") if measured is None or not truth else 100.0 * (float(measured) / truth - 1.0)


# ----------------------------------------------------------------------------- measurements


def measure_ron(config: PhysicsConfig, seed: int, quick: bool, ccd: str = "CCD1") -> dict[str, dict[str, float]]:
    """BIAS01 (10 frames; quick 3) of one CCD: per quadrant the relative errors (%) of every RON
    key against both truths (``ron`` and ``sqrt(ron^2 + row^2)``), and the result values."""
    from services.analyzer.families.bias import FAMILY as BIAS

    model = DetectorModel(config, BLOCK, seed)
    with tempfile.TemporaryDirectory(prefix="acc_bias_") as tmp:  # the solve stacks frame files
        exps = campaign_exposures("BIAS01", model, ccd, keep=(lambda k, r: k < 3) if quick else None, write_to=Path(tmp))
        out = run_inprocess(BIAS, exps, run_of("BIAS01", exps))
    res: dict[str, dict[str, float]] = {}
    for q in QUADRANTS:
        t = model.truth[ccd].quadrants[q]
        v = out.results[ccd][q]
        with_rows = math.hypot(t.ron_adu, t.row_noise_adu)
        with_fixed = math.hypot(with_rows, config.bias_fixed_rms_adu)
        row = {"ron": t.ron_adu, "ron_rows": with_rows, "ron_rows_fixed": with_fixed,
               "offset_img": v["offset_img"], "offset_ref": v["offset_ref"]}
        for key in ("ron_pre_adu", "ron_img_adu", "ron_ove_adu", "ron_diff_adu"):
            row[key] = v.get(key)
            row[key + ":vs_ron"] = rel(v.get(key), t.ron_adu)
            row[key + ":vs_ron_rows"] = rel(v.get(key), with_rows)
            row[key + ":vs_ron_rows_fixed"] = rel(v.get(key), with_fixed)
        res[q] = row
    return res


def master_bias_calibration(ron: dict[str, dict[str, float]], ccd: str = "CCD1") -> Calibration:
    return Calibration(name=MASTER_BIAS, block=BLOCK, test="BIAS01",
                       values={ccd: {q: {"offset_img": ron[q]["offset_img"], "offset_ref": ron[q]["offset_ref"]} for q in QUADRANTS}})


def measure_dark(config: PhysicsConfig, seed: int, quick: bool, ccd: str = "CCD1",
                 variants: dict[str, dict[str, Any]] | None = None, ron: dict[str, dict[str, float]] | None = None) -> dict[str, dict[str, float]]:
    """DARK01 (4 x 565 s; quick 2) of one CCD with the BIAS01 master-bias values of the same
    detector (``ron``: a :func:`measure_ron` result of the same config and seed, else measured)
    and the true gains: relative error (%) of ``dark_current_e_s`` per quadrant for the default
    analysis and each analysis variant (``{name: params}``, solved from the same extractions)."""
    from services.analyzer.families.dark import FAMILY as DARK

    variants = {"default": {}, **(variants or {})}
    model = DetectorModel(config, BLOCK, seed)
    ron = ron or measure_ron(config, seed, True, ccd)
    calib = Calibrations([gain_calibration(model), master_bias_calibration(ron, ccd)])
    res: dict[str, dict[str, float]] = {q: {"truth": model.truth[ccd].quadrants[q].dark_e_per_s} for q in QUADRANTS}
    with tempfile.TemporaryDirectory(prefix="acc_dark_") as tmp:  # the solve stacks frame files
        exps = campaign_exposures("DARK01", model, ccd, keep=(lambda k, r: k < 2) if quick else None, write_to=Path(tmp))
        run = run_of("DARK01", exps)
        p = DARK.parameters({})
        extractions = []
        for e in exps:
            extractions.append(DARK.run_extraction([e], calib, p))
            e.release()
        for name, params in variants.items():
            out = run_inprocess(DARK, [], run, calib=calib, params=params, extractions=extractions)
            for q in QUADRANTS:
                res[q][name] = rel(out.results[ccd][q]["dark_current_e_s"], res[q]["truth"])
    return res


def measure_ptc(config: PhysicsConfig, seed: int, quick: bool, quads: list[str], ccd: str = "CCD1") -> dict[str, dict[str, Any]]:
    """PTC01 (92 frames; quick: 1 pair per fluence, 22 frames) on ``quads`` of one CCD: gain, a00,
    full well (relative errors, %), with the PTC's own fit details."""
    from services.analyzer.families.ptc import FAMILY as PTC

    model = DetectorModel(config, BLOCK, seed)
    exps = campaign_exposures("PTC01", model, ccd, quads, keep=every_nth_per_group(2) if quick else None)
    out = run_inprocess(PTC, exps, run_of("PTC01", exps))
    res = {}
    for q in quads:
        t = model.truth[ccd].quadrants[q]
        v = out.results[ccd][q]
        fw_signal = saturation_signal_adu(t) if t.saturation_first == "full_well" else (
            t.rolloff_adu * math.tanh(t.full_well_adu / t.rolloff_adu) if t.rolloff_adu else t.full_well_adu)
        row = {"gain": rel(v.get("gain"), t.gain_e_per_adu), "gain_quad": rel(v.get("gain_quad"), t.gain_e_per_adu),
               "gain_full": rel(v.get("gain_full"), t.gain_e_per_adu), "a00": rel(v.get("a00"), t.bf.a00),
               "a00_full": rel(v.get("a00_full"), t.bf.a00), "saturation_first": t.saturation_first,
               "saturation_limit": v.get("saturation_limit"), "full_well_adu": v.get("full_well_adu"),
               "full_well_is_lower_limit": v.get("full_well_is_lower_limit"), "full_well_method": v.get("full_well_method"),
               "fw_truth_adu": t.full_well_adu, "fw_truth_signal_adu": fw_signal, "adc_limit_adu": t.adc_limit_adu,
               "gain_err": 100.0 * v.get("gain_err", float("nan")) / t.gain_e_per_adu,
               "a00_err": 100.0 * v.get("a00_err", float("nan")) / abs(t.bf.a00) if t.bf.a00 else float("nan"),
               "n_pairs": v.get("n_pairs"), "n_rejected": v.get("n_rejected"), "n_fit": v.get("n_fit"),
               "noise_ron_ratio": v.get("noise_ron_ratio")}
        if t.saturation_first == "full_well":
            row["full_well"] = rel(v.get("full_well_adu"), fw_signal)
            row["full_well_vs_e_over_gain"] = rel(v.get("full_well_adu"), t.full_well_adu)
        else:
            row["full_well"] = rel(v.get("full_well_adu"), t.adc_limit_adu)
        res[q] = row
    return res


def saturation_signal_adu(t) -> float:
    """The level (offset-subtracted, measured ADU) where a quadrant's PTC / NL ends: the full well
    after the roll-off when it comes first, else the ADC limit."""
    fw = t.rolloff_adu * math.tanh(t.full_well_adu / t.rolloff_adu) if t.rolloff_adu else t.full_well_adu
    return fw if t.saturation_first == "full_well" else t.adc_limit_adu


def nl_error(result: dict, rolloff_adu: float, hi_adu: float, lo_frac: float = 0.005, hi_frac: float = 0.9) -> float:
    """Largest |fitted NL % - true roll-off NL %| over linear fluences [lo_frac, hi_frac] x
    ``hi_adu`` (the quadrant's full well or ADC limit: :func:`saturation_signal_adu`), points."""
    from services.analyzer.families.nl import nl_at

    grid = np.linspace(lo_frac * hi_adu, hi_frac * hi_adu, 300)
    truth = effects.rolloff_nl_pct(grid, rolloff_adu) if rolloff_adu else np.zeros_like(grid)
    return float(np.max(np.abs(nl_at(result, grid) - truth)))


def nl_truth_quadratic(result: dict, t, lo: float = 0.005, hi: float = 0.9) -> float:
    """Same as :func:`nl_error` for the quadratic NL ``S (1 + beta S)`` (the legacy model)."""
    from services.analyzer.families.nl import nl_at

    top = saturation_signal_adu(t)
    grid = np.linspace(lo * top, hi * top, 300)
    return float(np.max(np.abs(nl_at(result, grid) - 100.0 * t.nl.beta_per_adu * grid)))


def measure_nl(config: PhysicsConfig, seed: int, quick: bool, quads: list[str], ccd: str = "CCD1",
               variants: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, float]]:
    """NL01 (109 frames; quick: 1 per fluence, 1 stability frame in 4: 30 frames) on ``quads``:
    max NL error (points) over 0.5-90 % of 2^16 ADU, default analysis and ``variants``."""
    from services.analyzer.families.nl import FAMILY as NL

    variants = {"default": {}, **(variants or {})}
    model = DetectorModel(config, BLOCK, seed)
    if quick:
        per = every_nth_per_group(1)
        keep = lambda k, r: (k % 4 == 0) if str(r.get("comments", "")) == "STAB" else (per(k, r) or r.get("comments") == "BGD")  # noqa: E731
    else:
        keep = None
    exps = campaign_exposures("NL01", model, ccd, quads, keep=keep)
    run = run_of("NL01", exps)
    p = NL.parameters({"quadrants": tuple(quads)})
    extractions = []
    for e in exps:
        extractions.append(NL.run_extraction([e], Calibrations(), p))
        e.release()
    res: dict[str, dict[str, float]] = {q: {} for q in quads}
    for name, params in variants.items():
        out = run_inprocess(NL, [], run, params={"quadrants": tuple(quads), **params}, extractions=extractions)
        for q in quads:
            t = model.truth[ccd].quadrants[q]
            v = out.results[ccd][q]
            res[q][name] = nl_error(v, t.rolloff_adu, saturation_signal_adu(t)) if t.rolloff_adu else nl_truth_quadratic(v, t)
            res[q][name + ":shutter_s"] = v.get("shutter_offset_s")
    return res


def measure_prnu(config: PhysicsConfig, seed: int, quick: bool, quads: list[str], ccd: str = "CCD1",
                 variants: dict[str, dict[str, Any]] | None = None, n_per_column: int = 2) -> dict[str, dict[str, float]]:
    """FLAT01 (170 frames; quick: ``n_per_column`` per column) on ``quads`` (frames written as
    FITS files in a temporary folder: the solve stacks files): relative PRNU error (%)."""
    from services.analyzer.families.flat import FAMILY as FLAT

    variants = {"default": {}, **(variants or {})}
    model = DetectorModel(config, BLOCK, seed)
    calib = Calibrations([gain_calibration(model)])
    res: dict[str, dict[str, float]] = {q: {"truth": model.truth[ccd].quadrants[q].prnu_pct} for q in quads}
    with tempfile.TemporaryDirectory(prefix="acc_flat_") as tmp:
        exps = campaign_exposures("FLAT01", model, ccd, quads, keep=every_nth_per_group(n_per_column) if quick else None,
                                  write_to=Path(tmp))
        run = run_of("FLAT01", exps)
        for name, params in variants.items():
            out = run_inprocess(FLAT, exps, run, calib=calib, params={"quadrants": tuple(quads), **params})
            for q in quads:
                res[q][name] = rel(out.results[ccd][q]["prnu_pct"], res[q]["truth"])
    return res


# ----------------------------------------------------------------------------- report


def table(title: str, target: str, columns: list[str], rows: dict[str, dict[str, Any]]) -> None:
    print(f"\n## {title} (target {target})")
    print(f"{'quadrant':<10}" + "".join(f"{c:>26}" for c in columns))
    for q, row in rows.items():
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(f"{v:>+26.3f}" if isinstance(v, float) and math.isfinite(v) else f"{str(v):>26}")
        print(f"{q:<10}" + "".join(cells), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced volumes")
    ap.add_argument("--only", default="ron,dark,ptc,nl,prnu")
    ap.add_argument("--quads", default="E,F", help="quadrants of the flat-based measurements (seed 11, CCD1: E reaches full well first, F the ADC)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--nl-off", default="rolloff,drift_wobble,shutter", help="effects switched off, one NL run each")
    args = ap.parse_args(argv)
    only = set(args.only.split(","))
    quads = args.quads.split(",")
    seed, quick = args.seed, args.quick
    tic = time.perf_counter()

    if "ron" in only:
        real = measure_ron(realistic(), seed, quick)
        nodnl = measure_ron(realistic("dnl"), seed, quick)
        flat = measure_ron(realistic("dnl", "bias_structure", "row_noise"), seed, quick)
        rows = {}
        for q in QUADRANTS:
            rows[q] = {"diff/ron realistic": real[q]["ron_diff_adu:vs_ron"], "diff/ron no DNL": nodnl[q]["ron_diff_adu:vs_ron"],
                       "diff/ron_rows no DNL": nodnl[q]["ron_diff_adu:vs_ron_rows"],
                       "diff/ron no DNL,struct": flat[q]["ron_diff_adu:vs_ron"],
                       "img/ron_rows no DNL": nodnl[q]["ron_img_adu:vs_ron_rows"],
                       "img/ron_rows_fixed no DNL": nodnl[q]["ron_img_adu:vs_ron_rows_fixed"], "img/ron no DNL": nodnl[q]["ron_img_adu:vs_ron"],
                       "pre/ron_rows no DNL": nodnl[q]["ron_pre_adu:vs_ron_rows"], "ove/ron_rows no DNL": nodnl[q]["ron_ove_adu:vs_ron_rows"],
                       "img/ron no DNL,struct": flat[q]["ron_img_adu:vs_ron"]}
        table("RON (BIAS01, CCD1), error %: <key>/<truth>; ron_rows = sqrt(ron^2 + row_noise^2); 'no X' = X off in the sim",
              "2 %", list(rows["E"]), rows)

    if "dark" in only:
        var = {"readout_dark=none": {"readout_dark": "none"}, "use_bias=False": {"use_bias": False}}
        real = measure_dark(realistic(), seed, quick, variants=var)
        off = measure_dark(realistic("readout_dark"), seed, quick)
        rows = {q: {"realistic": real[q]["default"], "no readout dark (sim)": off[q]["default"],
                    "readout_dark=none": real[q]["readout_dark=none"], "use_bias=False": real[q]["use_bias=False"]} for q in QUADRANTS}
        table("Dark current (DARK01 565 s, CCD1), error %", "5 %", list(rows["E"]), rows)

    if "ptc" in only:
        real = measure_ptc(realistic(), seed, quick, quads)
        for q in quads:
            print("PTC01 realistic", q, real[q], flush=True)
        off = measure_ptc(realistic("bf_boundary"), seed, quick, quads)
        for key, tgt in (("gain", "0.2 %"), ("a00", "10 %"), ("full_well", "2 %")):
            rows = {q: {"realistic": real[q][key], "kernel BF (sim)": off[q][key]} for q in quads}
            if key == "gain":
                for q in quads:
                    rows[q].update({"gain_quad realistic": real[q]["gain_quad"], "gain_full realistic": real[q]["gain_full"]})
            if key == "full_well":
                for q in quads:
                    rows[q].update({"first": real[q]["saturation_first"], "found": real[q]["saturation_limit"],
                                    "method": real[q]["full_well_method"]})
            table(f"PTC01 {key} (CCD1), error %", tgt, list(rows[quads[0]]), rows)
        for q in quads:
            print(q, {k: v for k, v in real[q].items() if not isinstance(v, float) or k.startswith(("fw", "adc", "full_well_adu"))})

    if "nl" in only:
        var = {"shutter_offset=False": {"shutter_offset": False}, "drift_method=poly": {"drift_method": "poly", "drift_degree": 1},
               "method=global": {"method": "global"}}
        real = measure_nl(realistic(), seed, quick, quads, variants=var)
        rows = {q: {"realistic": real[q]["default"], **{k: real[q][k] for k in var}, "dt_est_s": real[q]["default:shutter_s"]} for q in quads}
        table("NL01 (realistic only) max |NL error| over 0.5-90 % of full well (CCD1), points", "0.1", list(rows[quads[0]]), rows)
        for eff in args.nl_off.split(","):
            if not eff:
                continue
            off = measure_nl(realistic(eff), seed, quick, quads)
            for q in quads:
                rows[q][f"{eff} off (sim)"] = off[q]["default"]
            print(f"NL01 with {eff} off in the simulator:", {q: round(off[q]["default"], 4) for q in quads}, flush=True)
        table("NL01 max |NL error| over 0.5-90 % of full well (CCD1), points", "0.1", list(rows[quads[0]]), rows)

    if "prnu" in only:
        var = {"model=poly": {"model": "poly"}}
        real = measure_prnu(realistic(), seed, quick, quads, variants=var)
        print("FLAT01 realistic", real, flush=True)
        off = measure_prnu(realistic("ripple"), seed, quick, quads)
        rows = {q: {"realistic": real[q]["default"], "no ripple (sim)": off[q]["default"], "model=poly": real[q]["model=poly"]} for q in quads}
        table("FLAT01 PRNU (CCD1), error %", "5 %", list(rows[quads[0]]), rows)

    print(f"\ntotal {time.perf_counter() - tic:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
