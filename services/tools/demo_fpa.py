"""``vison demo --fpa``: the focal plane from 12 blocks' results in a few seconds.

Starts the metatest service against the configured broker (its own exchange and queue names,
removed at the end), publishes the simulated ``analysis.completed`` of the 12 FPA blocks
(``vison sim --results-only``: results only, no frames), waits for the ``metatest.completed.ptc``
covering all of them, and prints where the gain map PNG is and a text rendering of the 12 x 12
gain grid. Exit 0 when the gain map of the 12 blocks arrived, 1 otherwise (2: no broker).
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

DEMO_TESTS = ("PTC01", "BIAS01")


def run_fpa(args: Any) -> int:
    from services.metatest.render import text_grid
    from services.metatest.service import BINDINGS
    from services.sim import results as simres
    from services.tools.demo import _broker_ok, _cleanup_broker
    from services.tools.stack import Stack, free_port
    from shared.bus import Publisher, Subscription, dead_queue_name, ensure_queue, queue_name
    from shared.config import get_settings
    from shared.events import MetatestCompleted, ProcessingFailed, parse_event

    base = get_settings()
    problem = _broker_ok(base.amqp_url)
    if problem:
        print(f"vison demo --fpa: no RabbitMQ broker at the configured VISON_AMQP_URL ({problem}).", file=sys.stderr)
        return 2
    tag = uuid.uuid4().hex[:8]
    tmp = Path(tempfile.mkdtemp(prefix="vison-demo-fpa-"))
    for sub in ("products", "state", "logs"):
        (tmp / sub).mkdir()
    env = {"VISON_EXCHANGE": f"vison-demo-{tag}", "VISON_QUEUE_PREFIX": f"vison-demo-{tag}",
           "VISON_PRODUCTS_ROOT": str(tmp / "products"), "VISON_STATE_DIR": str(tmp / "state")}
    settings = base.model_copy(update={"exchange": env["VISON_EXCHANGE"], "queue_prefix": env["VISON_QUEUE_PREFIX"],
                                       "products_root": tmp / "products", "state_dir": tmp / "state"})
    blocks = simres.sim_blocks(12)
    docs = simres.simulate(blocks, DEMO_TESTS, seed=1)
    events = simres.events(docs)
    stack = Stack(["metatest"], env=env, ports={"metatest": free_port()}, log_dir=tmp / "logs")
    interrupted = {"flag": False}

    def on_signal(*_: Any) -> None:
        interrupted["flag"] = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.monotonic()
    final: MetatestCompleted | None = None
    print(f"vison demo --fpa: {len(events)} simulated analysis.completed ({', '.join(DEMO_TESTS)} of {len(blocks)} blocks; "
          f"{simres.RESULTS_ONLY_NOTE}); folder {tmp}", flush=True)
    try:
        ensure_queue(settings, "metatest", BINDINGS)  # the events wait in the queue until the service is up
        with Subscription(settings, ["metatest.completed.#", "processing.failed.#"]) as sub:
            stack.start()
            with Publisher(settings, service="demo") as pub:
                for ev in events:
                    pub.publish(ev)
            print(f"published {len(events)} events in {time.monotonic() - t0:.1f} s; waiting for metatest.completed.ptc ...",
                  flush=True)
            while not interrupted["flag"] and time.monotonic() - t0 < args.timeout and final is None:
                for rk, _, body in sub.messages(timeout=0.5):
                    ev = parse_event(body, rk)
                    if isinstance(ev, MetatestCompleted):
                        print(f"  {time.monotonic() - t0:5.1f} s  metatest.completed.{ev.family}: {len(ev.blocks)} blocks, "
                              f"{len(ev.missing)} missing, {len(ev.results)} quantities, {len(ev.inputs)} inputs", flush=True)
                        if ev.family == "ptc" and not ev.missing:
                            final = ev
                    elif isinstance(ev, ProcessingFailed):
                        print(f"  FAILED {ev.what} {ev.where}: {ev.why}", flush=True)
                    break
                stack.poll()
    finally:
        codes = stack.stop()
        _cleanup_broker(settings, [queue_name(settings, "metatest"), dead_queue_name(settings)])
        for s, h in old.items():
            signal.signal(s, h)
    if final is None:
        print(f"no complete metatest.completed.ptc within {args.timeout:.0f} s; logs in {tmp / 'logs'}")
        return 130 if interrupted["flag"] else 1
    products = tmp / "products"
    png = products / "FPA" / "ptc" / "ptc_gain.png"
    grid = json.loads((products / "FPA" / "ptc" / "ptc_maps.json").read_text())["grid"]["gain"]
    print(f"\ngain map of the FPA ({len(final.blocks)} blocks) after {time.monotonic() - t0:.1f} s: {png}")
    print("gain (e-/ADU), 12 x 12 quadrant cells as on the FPA (top row: slice 6; CCD columns 4-6 rotated 180 deg):")
    print(text_grid(grid, "{:4.2f}"))
    print(f"products: {products / 'FPA'} (maps JSON, PNG per quantity, tables FITS + CSV)")
    print("services stopped: " + ", ".join(f"{k} (exit {v})" for k, v in codes.items()))
    if not args.keep:
        for sub in ("state", "logs"):
            shutil.rmtree(tmp / sub, ignore_errors=True)
        print(f"(the products are kept in {products}; --keep also keeps state and logs)")
    return 0


__all__ = ["DEMO_TESTS", "run_fpa"]
