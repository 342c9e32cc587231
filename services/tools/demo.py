"""``vison demo`` (``make demo``): the live pipeline in two minutes.

Starts the stack on a temporary data folder against the configured broker (its own exchange and
queue names, removed at the end, so it never disturbs another run), plays a short bias + flat
sequence with ``vison sim --realtime --speedup``, prints each validated exposure as it arrives
(ObsID, test, flags, latency, prescan offsets per CCD and quadrant), then closes the bias test as
an operator would (``test.close``) and prints the analyzer's BIAS01 result (read noise per CCD and
quadrant, products folder), then stops everything cleanly. Exit code 0 when every simulated
exposure was validated, 1 otherwise (2: no broker).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DEMO_SPEC = """\
sequences:
  - test: BIAS01
    frames: {bias}
  - test: FLAT01
    frames: {flats}
    fluence: 0.5
    wave: 4
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bias", type=int, default=3, help="bias frames (3)")
    parser.add_argument("--flats", type=int, default=2, help="flat frames at 50%% full well (2)")
    parser.add_argument("--speedup", type=float, default=20.0, help="acquisition speed-up (20: a 93 s bias every 4.7 s)")
    parser.add_argument("--block", default="BORN", help="block name (BORN)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (data, state, logs)")
    parser.add_argument("--timeout", type=float, default=240.0, help="give up after this many seconds (240)")
    parser.add_argument("--no-analysis", action="store_true", help="skip closing BIAS01 and waiting for its analysis")
    parser.add_argument("--fpa", action="store_true",
                        help="the focal-plane demo: metatest service + simulated results of 12 blocks -> gain map")


def _broker_ok(url: str) -> str | None:
    import pika

    from shared.bus import connection_parameters

    try:
        pika.BlockingConnection(connection_parameters(url)).close()
        return None
    except Exception as exc:  # noqa: BLE001 - any reason means "no broker"
        return f"{exc.__class__.__name__}: {exc}"


def _row(ev: Any, latency: float | None) -> str:
    flags = ",".join(ev.flag_names) or "-"
    offs = ev.offsets("pre")
    cells = " | ".join("/".join(f"{offs[ccd][q]:.0f}" for q in "EFGH") for ccd in ("CCD1", "CCD2", "CCD3") if ccd in offs)
    lat = f"{latency:5.2f} s" if latency is not None else "    - "
    return f"{ev.obsid:>5}  {ev.test:<8} {'PASS' if ev.passed else 'FAIL'}  {flags:<22} {lat}  {cells}"


def _analysis_summary(ev: Any, products_root: Path) -> str:
    """A few lines on an analysis.completed event: status, RON per CCD/quadrant, products."""
    lines = [f"analysis.completed.{ev.test}.{ev.block}: {ev.status}, {len(ev.obsids)} exposures, "
             f"flags {','.join(ev.flag_names) or '-'}"]
    results = ev.results.get("results", ev.results)
    for ccd in ("CCD1", "CCD2", "CCD3"):
        quads = results.get(ccd) if isinstance(results, dict) else None
        if isinstance(quads, dict):
            cells = "  ".join(f"{q} {quads[q].get('ron_img_adu', float('nan')):.3f}" for q in "EFGH" if q in quads)
            lines.append(f"  {ccd} image RON (ADU): {cells}")
    if ev.products:
        lines.append(f"  {len(ev.products)} products under {products_root / Path(ev.products[0]).parts[0]}/")
    if ev.error:
        lines.append(f"  error: {ev.error}")
    return "\n".join(lines)


def _cleanup_broker(settings, names: list[str]) -> None:
    """Delete the demo's queues and exchanges (best effort)."""
    import pika

    from shared.bus import connection_parameters, dead_letter_exchange

    queues = set(names)
    try:
        vhost = settings.amqp_url.rsplit("/", 1)[-1] or "%2F"
        from urllib.parse import unquote

        out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", unquote(vhost), "name"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            queues |= {q.strip() for q in out.stdout.splitlines() if q.strip().startswith(settings.queue_prefix + ".")}
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        conn = pika.BlockingConnection(connection_parameters(settings.amqp_url))
        ch = conn.channel()
        for q in sorted(queues):
            try:
                ch.queue_delete(q)
            except Exception:  # noqa: BLE001
                ch = conn.channel()
        for ex in (settings.exchange, dead_letter_exchange(settings)):
            try:
                ch.exchange_delete(ex)
            except Exception:  # noqa: BLE001
                ch = conn.channel()
        conn.close()
    except Exception as exc:  # noqa: BLE001
        print(f"(could not clean the demo queues: {exc})", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if args.fpa:
        from services.tools.demo_fpa import run_fpa

        return run_fpa(args)
    from services.tools.stack import Stack, available_services, free_port
    from shared.bus import Subscription, dead_queue_name, queue_name
    from shared.config import get_settings
    from shared.bus import Publisher
    from shared.events import AnalysisCompleted, ExposureValidated, ProcessingFailed, TestClose, parse_event

    base = get_settings()
    problem = _broker_ok(base.amqp_url)
    if problem:
        from shared.bus import mask_url

        print(f"vison demo: no RabbitMQ broker at the configured VISON_AMQP_URL {mask_url(base.amqp_url)} ({problem}).\n"
              "Start one (e.g. `rabbitmq-server -detached`, or `docker compose up rabbitmq`) and retry.", file=sys.stderr)
        return 2
    tag = uuid.uuid4().hex[:8]
    tmp = Path(tempfile.mkdtemp(prefix="vison-demo-"))
    for sub in ("data", "products", "state", "logs"):
        (tmp / sub).mkdir()
    env = {
        "VISON_EXCHANGE": f"vison-demo-{tag}",
        "VISON_QUEUE_PREFIX": f"vison-demo-{tag}",
        "VISON_DATA_ROOT": str(tmp / "data"),
        "VISON_PRODUCTS_ROOT": str(tmp / "products"),
        "VISON_STATE_DIR": str(tmp / "state"),
        "VISON_BLOCK": args.block,
    }
    settings = base.model_copy(update={"exchange": env["VISON_EXCHANGE"], "queue_prefix": env["VISON_QUEUE_PREFIX"],
                                       "data_root": tmp / "data", "state_dir": tmp / "state"})
    names = available_services()
    ports = {name: free_port() for name in names}
    stack = Stack(names, env=env, ports=ports, log_dir=tmp / "logs")
    spec = tmp / "demo.yaml"
    spec.write_text(DEMO_SPEC.format(bias=args.bias, flats=args.flats))
    expected = args.bias + args.flats
    interrupted = {"flag": False}

    def on_signal(*_):
        interrupted["flag"] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    validated: dict[int, Any] = {}
    analyses: list[Any] = []
    failures: list[Any] = []
    latencies: list[float] = []
    sim = None
    t0 = time.monotonic()
    print(f"vison demo: {expected} exposures ({args.bias} bias + {args.flats} flats at 50 % full well), "
          f"acquisition sped up x{args.speedup:g}; services: {', '.join(names)}; folder {tmp}", flush=True)
    try:
        with Subscription(settings, ["exposure.validated.#", "processing.failed.#", "analysis.completed.#"]) as sub:
            stack.start()  # declares the whole topology (shared.topology.declare_all) first
            sim_log = open(tmp / "logs" / "sim.log", "wb")
            sim = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "sim", "--out", str(tmp / "data"), "--block", args.block,
                 "--seed", "1", "--spec", str(spec), "--realtime", "--speedup", str(args.speedup), "--atomic"],
                env={**os.environ, **env}, stdout=sim_log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            print(f"\n{'ObsID':>5}  {'test':<8} {'':4}  {'flags':<22} {'latency':>7}  prescan offsets E/F/G/H (ADU): CCD1 | CCD2 | CCD3")
            sim_done_at = None
            while not interrupted["flag"] and time.monotonic() - t0 < args.timeout:
                for rk, _, body in sub.messages(timeout=0.5):
                    ev = parse_event(body, rk)
                    if isinstance(ev, ExposureValidated) and ev.obsid not in validated:
                        latency = None
                        if ev.complete_at is not None:
                            latency = (datetime.now(timezone.utc) - ev.complete_at).total_seconds()
                            latencies.append(latency)
                        validated[ev.obsid] = ev
                        print(_row(ev, latency), flush=True)
                    elif isinstance(ev, AnalysisCompleted):
                        analyses.append(ev)
                    elif isinstance(ev, ProcessingFailed):
                        failures.append(ev)
                        print(f"{'':>5}  FAILED {ev.what} {ev.where}: {ev.why}", flush=True)
                    break
                stack.poll()
                if sim.poll() is not None and sim_done_at is None:
                    sim_done_at = time.monotonic()
                    if sim.returncode != 0:
                        print(f"vison demo: the simulator failed (exit {sim.returncode}); see {tmp / 'logs' / 'sim.log'}",
                              file=sys.stderr)
                        break
                if len(validated) + len({f.obsid for f in failures if f.obsid is not None}) >= expected:
                    break
                if sim_done_at is not None and time.monotonic() - sim_done_at > 60:
                    break
            sim_log.close()
            if validated and not args.no_analysis and "analyzer" in names and not interrupted["flag"]:
                print(f"\noperator: test.close BIAS01 ({args.bias} frames) -> the analyzer runs BIAS01 ...", flush=True)
                with Publisher(settings, service="demo") as publisher:
                    publisher.publish(TestClose(test="BIAS01", block=args.block, operator="demo", reason="demo"))
                deadline = time.monotonic() + 180
                while not interrupted["flag"] and time.monotonic() < deadline and not analyses:
                    for rk, _, body in sub.messages(timeout=0.5):
                        ev = parse_event(body, rk)
                        if isinstance(ev, AnalysisCompleted):
                            analyses.append(ev)
                        break
                    stack.poll()
                print(_analysis_summary(analyses[0], tmp / "products") if analyses
                      else "no analysis.completed within 180 s (see the analyzer log)", flush=True)
                if analyses and not args.keep:
                    print("  (the demo folder is removed at the end: run with --keep to browse the products)")
    finally:
        if sim is not None and sim.poll() is None:
            sim.send_signal(signal.SIGINT)
            try:
                sim.wait(15)
            except subprocess.TimeoutExpired:
                sim.kill()
        codes = stack.stop()
        from shared.topology import all_queues

        _cleanup_broker(settings, [queue_name(settings, n) for n in names] + [q for q, _ in all_queues(settings)]
                        + [dead_queue_name(settings)])
        for s, h in old.items():
            signal.signal(s, h)
    elapsed = time.monotonic() - t0
    truth = tmp / "data" / "truth.json"
    n_truth = len(json.loads(truth.read_text()).get("frames", [])) if truth.exists() else 0
    print(f"\n{len(validated)} of {n_truth or expected} exposures validated in {elapsed:.0f} s"
          + (f"; latency file complete -> validated: median {statistics.median(latencies):.2f} s, "
             f"max {max(latencies):.2f} s" if latencies else "")
          + (f"; {len(failures)} failures reported" if failures else ""))
    print("services stopped: " + ", ".join(f"{k} (exit {v})" for k, v in codes.items()))
    if args.keep or not validated:
        print(f"data, state and logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    if interrupted["flag"]:
        return 130
    return 0 if validated and len(validated) >= (n_truth or expected) else 1
