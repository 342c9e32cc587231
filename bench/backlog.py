#!/usr/bin/env python3
"""A slow consumer's backlog: publish N ``exposure.ingested`` messages (default 500) to the
validator's queue while no consumer runs, then start one (``shared.bus.Consumer`` with the
validator's queue, bindings and ``VISON_PREFETCH``) with a trivial handler, and print the publish
and drain rates, the broker's memory alarms and whether every message was handled exactly once.

    .venv/bin/python bench/backlog.py [--messages 500] [--prefetch N] [--handler-ms 0]

Against ``VISON_AMQP_URL`` (own exchange and queue names, deleted at the end).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def memory_alarm() -> bool | None:
    """True while the local broker raises a resource alarm (None: rabbitmq-diagnostics unavailable)."""
    try:
        out = subprocess.run(["rabbitmq-diagnostics", "-q", "check_local_alarms"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.returncode != 0


def ingested(i: int) -> Any:
    from shared.events import ExposureIngested, FileRef

    return ExposureIngested(
        obsid=i, block="BORN", test="BIAS01", producer="backlog",
        files=[FileRef(ccd=c, path=f"010124/EUC_{i}_010124D120000T_ROE1_CCD{c}.fits", sha256="ab" * 32, size=35369280)
               for c in (1, 2, 3)],
        explog=[{"ObsID": i, "CCD": f"CCD{c}", "exptime": 0.0, "test": "BIAS01"} for c in (1, 2, 3)],
    )


def run_backlog(settings, messages: int = 500, handler_seconds: float = 0.0, timeout: float = 300.0) -> dict[str, Any]:
    """Publish the backlog, drain it, and return the figures (see the module docstring)."""
    from services.validator.service import BINDINGS, SERVICE
    from shared.bus import Consumer, Publisher, ensure_queue, queue_name

    ensure_queue(settings, SERVICE, BINDINGS)  # the consumer is "stopped": its queue exists, nobody reads it
    alarms = [memory_alarm()]
    sent = [ingested(i) for i in range(1, messages + 1)]
    t0 = time.perf_counter()
    with Publisher(settings, "backlog") as pub:
        for ev in sent:
            pub.publish(ev)
    publish_s = time.perf_counter() - t0
    alarms.append(memory_alarm())
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def handler(event, delivery) -> None:
        if handler_seconds:
            time.sleep(handler_seconds)
        with lock:
            seen[str(event.event_id)] += 1

    consumer = Consumer(settings, SERVICE, BINDINGS, handler, idempotent=False)
    thread = threading.Thread(target=consumer.run, kwargs={"install_signals": False}, daemon=True)
    t1 = time.perf_counter()
    thread.start()
    end = time.monotonic() + timeout
    while time.monotonic() < end and sum(seen.values()) < messages:
        time.sleep(0.02)
        if len(alarms) < 3 and sum(seen.values()) >= messages // 2:
            alarms.append(memory_alarm())  # mid-drain
    drain_s = time.perf_counter() - t1
    time.sleep(0.5)  # would-be duplicates (redeliveries) have time to show
    consumer.stop()
    thread.join(30)
    import pika

    from shared.bus import connection_parameters

    conn = pika.BlockingConnection(connection_parameters(settings.amqp_url))
    left = conn.channel().queue_declare(queue_name(settings, SERVICE), passive=True).method.message_count
    conn.close()
    want = {str(e.event_id) for e in sent}
    return {
        "messages": messages, "prefetch": consumer.prefetch, "publish_s": publish_s, "drain_s": drain_s,
        "handled": sum(seen.values()), "lost": len(want - set(seen)), "duplicated": sum(n - 1 for n in seen.values() if n > 1),
        "unexpected": len(set(seen) - want), "left_in_queue": left, "memory_alarm": any(a for a in alarms if a),
        "alarm_checked": any(a is not None for a in alarms),
    }


def _cleanup(settings) -> None:
    import pika

    from services.validator.service import SERVICE
    from shared.bus import connection_parameters, dead_letter_exchange, dead_queue_name, queue_name

    try:
        conn = pika.BlockingConnection(connection_parameters(settings.amqp_url))
        ch = conn.channel()
        for q in (queue_name(settings, SERVICE), dead_queue_name(settings)):
            ch.queue_delete(q)
        for ex in (settings.exchange, dead_letter_exchange(settings)):
            ch.exchange_delete(ex)
        conn.close()
    except Exception as exc:  # noqa: BLE001
        print(f"(cleanup: {exc})", file=sys.stderr)


def main() -> int:
    import tempfile

    from shared.config import get_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--prefetch", type=int, default=None, help="override VISON_PREFETCH")
    parser.add_argument("--handler-ms", type=float, default=0.0, help="time the handler takes per message (ms)")
    args = parser.parse_args()
    tag = uuid.uuid4().hex[:8]
    state = tempfile.mkdtemp(prefix="vison-backlog-")
    update = {"exchange": f"vison-backlog-{tag}", "queue_prefix": f"vison-backlog-{tag}", "state_dir": Path(state)}
    if args.prefetch:
        update["prefetch"] = args.prefetch
    settings = get_settings().model_copy(update=update)
    try:
        r = run_backlog(settings, args.messages, args.handler_ms / 1000)
    finally:
        _cleanup(settings)
    print(f"backlog of {r['messages']} exposure.ingested, prefetch {r['prefetch']}, handler {args.handler_ms:g} ms")
    print(f"  published in {r['publish_s']:.2f} s ({r['messages'] / r['publish_s']:.0f} msg/s, publisher confirms)")
    print(f"  drained in {r['drain_s']:.2f} s ({r['handled'] / r['drain_s']:.0f} msg/s)")
    print(f"  handled {r['handled']}, lost {r['lost']}, duplicated {r['duplicated']}, left in queue {r['left_in_queue']}, "
          f"memory alarm {'YES' if r['memory_alarm'] else 'no'}{'' if r['alarm_checked'] else ' (not checked)'}")
    ok = r["lost"] == 0 and r["duplicated"] == 0 and r["left_in_queue"] == 0 and not r["memory_alarm"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
