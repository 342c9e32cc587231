"""``vison sim``: write simulated ELVIS data (FITS frames of the 3 CCDs, exposure log, HK files)
at the real geometry into a data folder, with the injected truth in ``truth.json``.

Frames come from one simple sequence on the command line (``--test --frames --exptime`` or
``--fluence``), from a YAML spec with several sequences (``--spec``), or from the campaign
catalogue (``--tests BIAS01,FLAT01`` at nominal parameters; ``--campaign mini|full|FILE.yaml``).
Options given on the command line win over those of the spec file.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from services.cli import key_value
from services.sim.frames import FrameSpec, SequenceSpec, default_equipment, duration_s, expand_sequences, frame_kind
from services.sim.hk import parse_hk_injection
from services.sim.physics import PhysicsConfig
from services.sim.runner import SimOptions, Simulator, SimTruthError

#: CLI option -> PhysicsConfig field
PHYSICS_OPTIONS = {
    "ron": "ron_adu", "gain": "gain", "offset_scatter": "offset_scatter_adu", "prnu": "prnu_pct",
    "nl": "nl_pct", "nl_at": "nl_at_fraction", "bf_a00": "bf_a00", "bf_anisotropy": "bf_anisotropy",
    "drift": "drift_pct_per_hour", "vignetting": "illum_vignetting", "hot_pixels": "hot_pixels",
    "bad_columns": "bad_columns", "cosmics": "cosmic_rate",
}


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  vison sim --out data --block BORN --seed 1 --test BIAS01 --frames 10\n"
        "  vison sim --out data --test PTC01 --frames 2 --fluence 0.1,0.5,0.9 --wave 4 --nl 1\n"
        "  vison sim --out data --spec run.yaml --realtime --speedup 20\n"
        "  vison sim --out data --tests BIAS01,FLAT01 --hk-ool CCD1_TEMP_T:hi@3\n"
    )
    parser.add_argument("--out", required=True, type=Path, help="data root (day folders DDMMYY are created in it)")
    parser.add_argument("--block", default=None, help="block name: reference offsets and serial numbers (default UNKNOWN)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (same seed + options = same pixels)")
    parser.add_argument("--chamber", default=None, help="chamber (OGSE) profile (default: VISON_CHAMBER setting)")
    parser.add_argument("--start", default=None, help="simulated clock of the first frame, ISO (default: now)")
    parser.add_argument("--obsid-start", type=int, default=None, help="first ObsID (default: after the last one in --out)")
    parser.add_argument("--results-only", action="store_true",
                        help="write no frames: plausible results.json of --blocks blocks (<out>/<block>/<test>/), for the FPA demo")
    parser.add_argument("--blocks", type=int, default=12, help="with --results-only: number of blocks (FPA order, then spares; 12)")

    seq = parser.add_argument_group("a simple sequence")
    seq.add_argument("--test", default=None, help="test name written in the exposure log (e.g. BIAS01)")
    seq.add_argument("--frames", type=_ints, default=None, help="frames per exposure value (N or N1,N2,...)")
    seq.add_argument("--exptime", type=_floats, default=None, help="exposure time(s) in s, comma separated")
    seq.add_argument("--fluence", type=_floats, default=None, help="fluence(s) as fractions of 2^16 ADU (uses the chamber tFWC)")
    seq.add_argument("--wave", type=int, default=None, help="filter-wheel position 1..6 (4 = 800 nm)")
    seq.add_argument("--kind", choices=["bias", "dark", "flat", "point", "chinj"], default=None,
                     help="physics of the frames (default: from the register values)")
    seq.add_argument("--set", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                     help="any script register value, e.g. --set vend=2066 --set source=point")
    seq.add_argument("--spec", type=Path, default=None, help="YAML file: options and a list of sequences")
    seq.add_argument("--tests", default=None, help="catalogue tests at nominal parameters, comma separated (e.g. BIAS01,FLAT01); "
                     "with --campaign: only these tests of the campaign")
    seq.add_argument("--campaign", nargs="?", const="mini", default=None,
                     help="play a campaign: preset mini (default), full, warm, or a campaign YAML file "
                          "(vison scriptgen --config format; its block, chamber and equipment apply); "
                          "--tests selects some of its tests")

    run = parser.add_argument_group("acquisition")
    run.add_argument("--realtime", action="store_true", help="write at the acquisition cadence (frame durations of campaign.md)")
    run.add_argument("--speedup", type=float, default=None, help="with --realtime: run this many times faster")
    run.add_argument("--hk-period", type=float, default=None, help="seconds between HK samples (5)")
    run.add_argument("--hk-ool", action="append", default=[], metavar="KEY:VALUE[@WHEN]",
                     help="push an HK key out of limits: VALUE a number or hi/lo; WHEN = ObsID N (from N on), "
                          "N-M, or tS (S seconds after the start). Repeatable")
    run.add_argument("--naxis2", type=int, choices=[4172, 4132], default=None, help="4132: no parallel overscan (vend 2066)")
    run.add_argument("--overscan", type=int, choices=[20, 29], default=None, help="serial overscan columns (20 ground, 29 flight)")
    run.add_argument("--atomic", action="store_true", help="FITS files appear under their name only once complete")
    run.add_argument("--threads", type=int, default=None, help="CCDs generated in parallel (1..3, default 3)")
    run.add_argument("--dry-run", action="store_true", help="list the frames and the duration, write nothing")
    run.add_argument("--json", action="store_true", help="print a JSON summary")

    phys = parser.add_argument_group("physics (truth recorded in truth.json)")
    phys.add_argument("--physics", choices=("legacy", "realistic"), default=None,
                      help="effect profile: legacy (default; the models the analyses fit) or realistic (boundary-shift "
                           "brighter-fatter, roll-off NL, non-linear drift, shutter offset, flux jitter, CTI, bias "
                           "structure, row noise, ADC DNL, dark during readout, illumination ripple, cosmic rays); "
                           "the other options override single values")
    phys.add_argument("--ron", type=float, default=None, help="read noise, ADU (default: 1.25-1.40 per quadrant)")
    phys.add_argument("--gain", type=float, default=None, help="gain, e-/ADU (default: 3.1-3.5 per quadrant)")
    phys.add_argument("--offset-scatter", type=float, default=None, help="offset delta around the block reference, +/- ADU (3)")
    phys.add_argument("--prnu", type=float, default=None, help="PRNU, %% (1)")
    phys.add_argument("--nl", type=float, default=None, help="non-linearity %% at --nl-at (0 = linear)")
    phys.add_argument("--nl-at", type=float, default=None, help="fluence (fraction of 2^16 ADU) where NL = --nl (0.9)")
    phys.add_argument("--bf-a00", type=float, default=None, help="brighter-fatter a00, 1/e- (-1e-6; 0 disables)")
    phys.add_argument("--bf-anisotropy", type=float, default=None, help="a01/a10 (1.3)")
    phys.add_argument("--drift", type=float, default=None, help="source drift, %% per hour (0)")
    phys.add_argument("--gradient", type=_floats, default=None, help="illumination gradient GX,GY per half CCD (0.01,-0.005)")
    phys.add_argument("--vignetting", type=float, default=None, help="quadratic illumination fall-off (-0.02)")
    phys.add_argument("--hot-pixels", type=int, default=None, help="hot pixels per CCD (0)")
    phys.add_argument("--bad-columns", type=int, default=None, help="bad columns per CCD (0)")
    phys.add_argument("--cosmics", type=float, default=None, help="cosmic rays per cm^2 per s (0; ground ~0.02)")


def _load_spec(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with 'sequences' (and options)")
    return data


def _pick(cli: Any, spec: dict[str, Any], key: str, default: Any) -> Any:
    return cli if cli is not None else spec.get(key, default)


def build(args: argparse.Namespace) -> tuple[SimOptions, PhysicsConfig, list[FrameSpec], Any]:
    """Options, physics and frames from the command line (and spec file). Raises ValueError."""
    from shared.config import get_settings

    spec = _load_spec(args.spec) if args.spec else {}
    physics_data = dict(spec.get("physics") or {})
    for opt, field in PHYSICS_OPTIONS.items():
        value = getattr(args, opt)
        if value is not None:
            physics_data[field] = value
    if args.gradient is not None:
        if len(args.gradient) != 2:
            raise ValueError("--gradient needs GX,GY")
        physics_data["illum_gradient"] = tuple(args.gradient)
    profile = args.physics or physics_data.pop("profile", None) or "legacy"
    physics_data.pop("profile", None)
    physics = PhysicsConfig.realistic(**physics_data) if profile == "realistic" else PhysicsConfig(**physics_data)

    campaign = args.campaign or spec.get("campaign")
    equipment: dict[str, Any] = {}
    if campaign:
        from services.sim.campaign import is_campaign_file, load_campaign_file

        if is_campaign_file(str(campaign)):  # its block, chamber and equipment are the defaults
            config = load_campaign_file(str(campaign))
            spec = {"block": config.block, "chamber": config.chamber, **spec}
            equipment = {k: v for k, v in config.equipment.model_dump().items() if v}
    block = _pick(args.block, spec, "block", "UNKNOWN")
    chamber = _pick(args.chamber, spec, "chamber", get_settings().chamber)
    start = _pick(args.start, spec, "start", None)
    if isinstance(start, str):
        start = datetime.fromisoformat(start)
    injections = [parse_hk_injection(t) for t in [*(spec.get("hk_ool") or []), *args.hk_ool]]
    options = SimOptions(
        out=args.out,
        block=block,
        seed=_pick(args.seed, spec, "seed", 0),
        chamber=chamber,
        start=start,
        overscan=_pick(args.overscan, spec, "overscan", 20),
        naxis2=_pick(args.naxis2, spec, "naxis2", 4172),
        hk_period_s=_pick(args.hk_period, spec, "hk_period", 5.0),
        realtime=args.realtime or bool(spec.get("realtime", False)),
        speedup=_pick(args.speedup, spec, "speedup", 1.0),
        atomic=args.atomic or bool(spec.get("atomic", False)),
        threads=_pick(args.threads, spec, "threads", 3),
        obsid_start=_pick(args.obsid_start, spec, "obsid_start", None),
        hk_injections=injections,
        equipment={**default_equipment(block), **equipment, **(spec.get("equipment") or {})},
    )
    from shared.refdata import chamber_profile

    profile = chamber_profile(chamber)
    frames: list[FrameSpec] = []
    sequence: Any = None
    if campaign:
        from services.sim.campaign import campaign_frames

        tests = args.tests.split(",") if args.tests else spec.get("tests")
        frames, summary = campaign_frames(str(campaign), chamber, options.equipment, tests)
        sequence = {"campaign": str(campaign), "tests": summary}
    elif args.tests or spec.get("tests"):
        from services.sim.campaign import test_frames

        names = args.tests.split(",") if args.tests else list(spec["tests"])
        frames, summary = test_frames([n.strip() for n in names if n.strip()], chamber, options.equipment,
                                      spec.get("test_params"))
        sequence = {"tests": summary}
    else:
        sequences: list[SequenceSpec] = []
        if args.test:
            values = dict(args.set)
            sequences.append(SequenceSpec(
                test=args.test, frames=args.frames or [1], exptime=args.exptime, fluence=args.fluence,
                wave=args.wave, kind=args.kind, values=values,
            ))
        elif args.frames or args.exptime or args.fluence or args.set:
            raise ValueError("--frames / --exptime / --fluence / --set need --test")
        for item in spec.get("sequences") or []:
            sequences.append(SequenceSpec(**item))
        if not sequences:
            raise ValueError("nothing to simulate: give --test, --spec FILE.yaml, --tests or --campaign")
        frames = expand_sequences(sequences, profile)
        sequence = [s.model_dump(mode="json", exclude_defaults=True) for s in sequences]
    return options, physics, frames, sequence


def _dry_run(options: SimOptions, frames: list[FrameSpec]) -> dict[str, Any]:
    total = 0.0
    rows = []
    for f in frames:
        regs = f.registers(options.equipment)
        d = duration_s(regs)
        total += d
        rows.append({"test": f.test, "kind": frame_kind(regs, f.kind), "exptime": regs.get("exptime"),
                     "wave": regs.get("wave"), "duration_s": round(d, 2)})
    return {"frames": len(frames), "duration_s": round(total, 1), "list": rows}


def run(args: argparse.Namespace) -> int:
    if args.results_only:
        from services.sim.results import run_results_only

        return run_results_only(args.out, args.blocks, args.seed, args.tests)
    try:
        options, physics, frames, sequence = build(args)
    except ValidationError as exc:
        from shared.campaign import validation_message

        print(f"vison sim: {exc.title}: {validation_message(exc)}", file=sys.stderr)
        return 2
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        print(f"vison sim: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        plan = _dry_run(options, frames)
        if args.json:
            print(json.dumps(plan, indent=1))
        else:
            for r in plan["list"]:
                print(f"{r['test']:<14} {r['kind']:<6} exptime {r['exptime']:>8} s  wave {r['wave']}  {r['duration_s']:7.1f} s")
            print(f"{plan['frames']} frames, {plan['duration_s'] / 60:.1f} min of acquisition")
        return 0
    try:
        sim = Simulator(options, physics)
    except SimTruthError as exc:
        print(f"vison sim: {exc}", file=sys.stderr)
        return 2

    def progress(rec: dict) -> None:
        if not args.json:
            print(f"ObsID {rec['obsid']:>5}  {rec['test']:<14} {rec['kind']:<6} exptime {rec['exptime']:8.3f} s  "
                  f"{rec['date']}  ({rec['timing_s']['generate']:.1f} s + {rec['timing_s']['write']:.1f} s)", flush=True)

    try:
        records = sim.play(frames, sequence=sequence, progress=progress)
    except KeyboardInterrupt:
        print("vison sim: interrupted (truth.json holds the frames written so far)", file=sys.stderr)
        return 130
    except (ValueError, KeyError) as exc:
        print(f"vison sim: {exc}", file=sys.stderr)
        return 2
    summary = {
        "out": str(options.out),
        "frames": len(records),
        "obsids": [records[0]["obsid"], records[-1]["obsid"]] if records else [],
        "truth": str(Path(options.out) / "truth.json"),
    }
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(f"{len(records)} exposures written to {options.out} (truth: {summary['truth']})")
    return 0
