"""Chaos run at campaign scale on the real broker with full-size frames (issue 15).

``vison sim --spec --realtime --speedup`` plays ``--exposures`` (100) exposures of BIAS01 (10,
solved on its own), DARK01 (4, short exposure time), FLAT01 and PTC01 subsets (closed with
``test.close`` at the end) into a temporary data root, while the services run as local processes
(``vison stack``: ingest, validator, analyzer with ``--workers`` 2, metatest, catalogue: those
whose ``vison <service> --help`` runs). At seeded random moments each service's main process is
SIGKILLed (the stack restarts it), an analyzer worker is SIGKILLed during a job, and the broker
is restarted twice: ``rabbitmqctl stop_app`` / ``start_app``, then a full node restart
(``rabbitmqctl stop``, ``rabbitmq-server -detached``). Every event is recorded from a durable
queue bound to ``#`` (``Subscription(queue=...).events(reconnect=True)``).

By default the broker faults hit a RabbitMQ node of the bench's own (same installation, own name,
ports and folders: needs root), so that the developers sharing the machine's broker are not
disturbed; ``--shared-broker`` runs everything on the machine's broker (127.0.0.1:5672) and
restarts *it* (announced; kept short; brought back up in any case). Each run uses its own vhost
(deleted at the end) and its own data / products / state folders under a temporary directory.

Prints: exposures lost / duplicated (distinct ``exposure.validated`` event ids per ObsID vs the
ObsIDs played), analyses lost / duplicated (distinct ``analysis.completed`` event ids per test run
vs the tests expected; re-analyses after a calibration arrived counted apart), duplicate or
partial product files, messages left in every queue (``rabbitmqctl list_queues``), recovery time
after each fault (fault -> the victim's next event; the catalogue publishes nothing, so its next
consumed message from its /metrics), latency percentiles file complete -> ``exposure.validated``
during recovery vs steady state.

Run: ``.venv/bin/python bench/chaos.py [--exposures 100] [--speedup 30] [--seed 1] [--workers 2]
[--shared-broker] [--no-broker-faults] [--keep]``. Exit status 0 when nothing was lost or
duplicated, 1 otherwise, 0 with a message when no broker can be controlled (skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.chaos_support import (  # noqa: E402
    FAST_INGEST,
    BrokerControl,
    Fault,
    Recorder,
    account_analyses,
    account_exposures,
    children,
    cleanup_orphans,
    consumers_back,
    duplicate_products,
    fmt_pct,
    kill_service,
    kill_worker,
    latencies,
    metrics_consumed,
    now_utc,
    producers_after,
    queues_drained,
    startable_services,
    wait_for,
)

from shared.events import AnalysisCompleted  # noqa: E402

BLOCK = "BORN"
NOMINAL = {"BIAS01": 10, "DARK01": 4}  # the analyzer's expected exposures at nominal parameters
WANTED = ["ingest", "validator", "analyzer", "metatest", "catalogue"]


def plan_sequences(n: int) -> tuple[str, dict[str, int]]:
    """The simulator spec for ``n`` exposures and the frames per test: BIAS01 10 and DARK01 4 (their
    nominal counts, so the analyzer solves them on its own), then FLAT01 (1/4 of the rest, at 40 %
    full well) and PTC01 (pairs over increasing fluences) subsets."""
    bias = min(10, max(1, n // 5))
    dark = min(4, max(0, n - bias - 2))
    rest = n - bias - dark
    flat = max(1, rest // 4) if rest > 1 else rest
    ptc = rest - flat
    seqs = [f"  - {{test: BIAS01, frames: {bias}}}"]
    if dark:
        seqs.append(f"  - {{test: DARK01, frames: {dark}, exptime: 10.0}}")
    if flat:
        seqs.append(f"  - {{test: FLAT01, frames: {flat}, fluence: 0.4, wave: 4}}")
    counts = {"BIAS01": bias, "DARK01": dark, "FLAT01": flat, "PTC01": ptc}
    if ptc:
        pairs, odd = divmod(ptc, 2)
        levels = max(1, pairs)
        fluences = [round(0.05 + 0.85 * i / max(1, levels - 1), 3) for i in range(levels)]
        frames = [2] * levels if pairs else [1]
        if odd and pairs:
            frames[-1] += 1
        seqs.append(f"  - {{test: PTC01, frames: {frames}, fluence: {fluences}, wave: 4}}")
    return "sequences:\n" + "\n".join(seqs) + "\n", {k: v for k, v in counts.items() if v}


def say(text: str) -> None:
    print(f"[{now_utc():%H:%M:%S}] {text}", flush=True)


def analyzer_exposures(env: dict[str, str], test: str) -> int:
    try:
        r = subprocess.run([sys.executable, "-m", "services.cli", "analyzer", "status", "--json"], capture_output=True,
                           text=True, timeout=90, env={**os.environ, **env})
        rows = json.loads(r.stdout or "[]")
    except (subprocess.SubprocessError, ValueError):
        return -1
    return max((int(row.get("exposures") or 0) for row in rows if row.get("test") == test), default=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exposures", type=int, default=100, help="exposures played (100)")
    ap.add_argument("--speedup", type=float, default=30.0, help="acquisition speed-up of vison sim --realtime (30)")
    ap.add_argument("--seed", type=int, default=1, help="seed of the simulator and of the fault moments (1)")
    ap.add_argument("--workers", type=int, default=2, help="analyzer worker processes (2)")
    ap.add_argument("--shared-broker", action="store_true",
                    help="run on the machine's broker and restart IT (disturbs everyone using it)")
    ap.add_argument("--no-broker-faults", action="store_true", help="no broker restarts")
    ap.add_argument("--timeout", type=float, default=3600.0, help="give up waiting after this many seconds (3600)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (data, products, state, logs)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM cleans up too (broker up, vhost gone)

    if not shutil.which("rabbitmqctl"):
        print("bench/chaos.py: skipped (rabbitmqctl not installed: the broker cannot be controlled)")
        return 0
    rng = random.Random(args.seed)
    tag = uuid.uuid4().hex[:8]
    tmp = Path(tempfile.mkdtemp(prefix="vison-chaos-"))
    for sub in ("data", "products", "state", "logs"):
        (tmp / sub).mkdir()
    broker: BrokerControl | None = None
    vhost = f"vison-chaos-{tag}"
    stack = rec = sim = None
    faults: list[Fault] = []
    pgids: list[int] = []
    status = 1
    t_start = time.monotonic()
    try:
        if args.shared_broker:
            broker = BrokerControl()
            if not broker.answers():
                print("bench/chaos.py: skipped (no broker on 127.0.0.1:5672)")
                return 0
            say("broker: the machine's broker (127.0.0.1:5672), shared: its restarts are announced below")
        else:
            say("broker: starting a RabbitMQ node of the bench's own (its restarts disturb nobody) ...")
            try:
                broker = BrokerControl.start_private()
            except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                print(f"bench/chaos.py: skipped (could not start a private RabbitMQ node: {exc}; "
                      "--shared-broker uses the machine's broker)")
                return 0
            say(f"broker: node {broker.node} on port {broker.port}")
        broker.add_vhost(vhost)
        from services.tools.stack import Stack, free_port
        from shared.config import Settings

        env = {
            "VISON_AMQP_URL": broker.url(vhost),
            "VISON_EXCHANGE": f"vison-chaos-{tag}",
            "VISON_QUEUE_PREFIX": f"vison-chaos-{tag}",
            "VISON_DATA_ROOT": str(tmp / "data"),
            "VISON_PRODUCTS_ROOT": str(tmp / "products"),
            "VISON_STATE_DIR": str(tmp / "state"),
            "VISON_BLOCK": BLOCK,
        }
        settings = Settings(amqp_url=env["VISON_AMQP_URL"], exchange=env["VISON_EXCHANGE"],
                            queue_prefix=env["VISON_QUEUE_PREFIX"], data_root=tmp / "data",
                            products_root=tmp / "products", state_dir=tmp / "state", block=BLOCK)
        services = startable_services(WANTED)
        spec, counts = plan_sequences(args.exposures)
        (tmp / "chaos.yaml").write_text(spec)
        ports = {s: free_port() for s in services}
        stack = Stack(services, env=env, ports=ports, log_dir=tmp / "logs",
                      extra_args={"ingest": FAST_INGEST, "analyzer": ["--workers", str(args.workers)]})
        say(f"{args.exposures} full-size exposures ({', '.join(f'{t} {n}' for t, n in counts.items())}), "
            f"vison sim --realtime --speedup {args.speedup:g}; services: {', '.join(services)} "
            f"(not startable: {', '.join(sorted(set(WANTED) - set(services))) or 'none'}); vhost {vhost}; folder {tmp}")
        analyzer = "analyzer" in services

        # the fault plan: (trigger = validated exposures, target), seeded
        n = args.exposures
        # metatest only works on analyses: it is killed just after the first analysis.completed (k = 0)
        plan: list[tuple[int, str]] = [(0 if s == "metatest" and analyzer else rng.randint(max(1, n // 10), max(2, (7 * n) // 10)), s)
                                       for s in services]
        if analyzer and args.workers > 0:
            plan.append((rng.randint(max(1, n // 5), max(2, (6 * n) // 10)), "analyzer-worker"))
        if not args.no_broker_faults:
            plan.append((max(2, int(n * rng.uniform(0.25, 0.4))), "broker-stop_app"))
            plan.append((max(3, int(n * rng.uniform(0.55, 0.75))), "broker-node"))
        plan.sort(key=lambda p: (p[0] == 0, p[0]))
        say("fault plan (after N exposures validated; @0: after the first analysis): "
            + ", ".join(f"{t} @{k}" for k, t in plan))

        stack.start()
        pgids += [p for p in stack.running().values() if p]
        rec = Recorder(settings, queue=f"chaos-recorder-{tag}", tick=stack.poll)
        sim_log = open(tmp / "logs" / "sim.log", "wb")
        sim = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "sim", "--out", str(tmp / "data"), "--block", BLOCK,
             "--seed", str(args.seed), "--spec", str(tmp / "chaos.yaml"), "--realtime", "--speedup", str(args.speedup),
             "--atomic"], env={**os.environ, **env}, stdout=sim_log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + args.timeout
        watchers: list[threading.Thread] = []

        def watch_restart(fault: Fault, name: str) -> None:
            """restarted_at: a new process answers on its metrics port; working_at: it handled its
            first message (the catalogue publishes nothing: that is its recovery)."""
            port = ports[name]
            ok = wait_for(lambda: stack.running().get(name) not in (None, fault.pid) and metrics_consumed(port) is not None,
                          600, poll=0.3)
            if ok:
                fault.restarted_at = now_utc()
                if wait_for(lambda: (metrics_consumed(port) or 0) > 0, 1200, poll=0.5):
                    fault.working_at = now_utc()

        def run_faults(items: list[tuple[int, str]]) -> None:
            for k, target in items:
                if k == 0:
                    trigger = lambda r: bool(r.of(AnalysisCompleted))  # noqa: E731
                else:
                    trigger = lambda r: len(r.validated_obsids()) >= k or sim.poll() is not None  # noqa: E731
                if not rec.wait(trigger, max(1.0, deadline - time.monotonic()), 0.5):
                    say(f"timed out waiting for {k} validated exposures: {target} not injected")
                    return
                time.sleep(rng.uniform(0.0, 2.0))  # the random moment (not a synchronisation)
                n_val = len(rec.validated_obsids())
                if target == "analyzer-worker":
                    f = kill_worker(stack, timeout=120, old_pids=[x.pid for x in faults if x.target == "analyzer" and x.pid])
                    if f is None:
                        say("no analyzer worker was busy within 120 s: worker fault not injected")
                        continue
                    faults.append(f)
                    say(f"FAULT SIGKILL analyzer worker pid {f.pid} during a job ({n_val} validated)")
                    apid = stack.running().get("analyzer")

                    def _w(f=f, apid=apid):
                        if wait_for(lambda: len(children(stack.running().get("analyzer") or 0)) >= args.workers
                                    and f.pid not in children(stack.running().get("analyzer") or 0), 300, poll=0.5):
                            f.restarted_at = now_utc()
                    watchers.append(threading.Thread(target=_w, daemon=True))
                    watchers[-1].start()
                elif target.startswith("broker"):
                    where = "the machine's SHARED broker" if args.shared_broker else f"the bench's node {broker.node}"
                    if target == "broker-stop_app":
                        say(f"FAULT *** BROKER RESTART 1/2: rabbitmqctl stop_app / start_app on {where} ({n_val} validated) ***")
                        f = Fault("broker (stop_app/start_app)", now_utc())
                        broker.stop_app()
                        time.sleep(2.0)  # down for a moment, as a real outage would be
                        broker.start_app()
                    else:
                        say(f"FAULT *** BROKER RESTART 2/2: rabbitmqctl stop + rabbitmq-server -detached on {where} "
                            f"({n_val} validated) ***")
                        f = Fault("broker (node restart)", now_utc())
                        broker.stop_node()
                        broker.start_node()
                    f.restarted_at = now_utc()
                    faults.append(f)
                    say(f"broker back after {(f.restarted_at - f.at).total_seconds():.1f} s")

                    def _c(f=f):
                        if wait_for(lambda: consumers_back(broker, vhost, settings.queue_prefix, services), 600, poll=1.0):
                            f.working_at = now_utc()
                    watchers.append(threading.Thread(target=_c, daemon=True))
                    watchers[-1].start()
                else:
                    f = kill_service(stack, target)
                    faults.append(f)
                    say(f"FAULT SIGKILL {target} pid {f.pid} ({n_val} validated)")
                    watchers.append(threading.Thread(target=watch_restart, args=(f, target), daemon=True))
                    watchers[-1].start()
                pgids.extend(p for p in stack.running().values() if p)

        run_faults([p for p in plan if p[0] > 0])
        rc = sim.wait(max(1.0, deadline - time.monotonic()))
        sim_log.close()
        truth = json.loads((tmp / "data" / "truth.json").read_text())
        played = [fr["obsid"] for fr in truth["frames"]]
        by_test: dict[str, list[int]] = {}
        for fr in truth["frames"]:
            by_test.setdefault(fr["test"], []).append(fr["obsid"])
        say(f"simulator done (exit {rc}): {len(played)} exposures written; waiting for the pipeline")
        rec.wait(lambda r: set(played) <= r.validated_obsids(), max(1.0, deadline - time.monotonic()), 1.0)
        say(f"{len(rec.validated_obsids() & set(played))} of {len(played)} exposures validated")
        # BF01 acquires nothing: it is derived from PTC01's data (solved when PTC01 is)
        expected = sorted(set(by_test) | ({"BF01"} if "PTC01" in by_test else set())) if analyzer else []
        if analyzer:
            to_close = [t for t in by_test if len(by_test[t]) != NOMINAL.get(t)]  # the others solve on their own
            for t in to_close:
                wait_for(lambda: analyzer_exposures(env, t) >= len(by_test[t]), 600, poll=5.0)
            from shared.bus import Publisher
            from shared.events import TestClose

            with Publisher(settings, service="chaos-bench") as pub:
                for t in to_close:
                    pub.publish(TestClose(test=t, block=BLOCK, operator="chaos", reason="end of the test"))
            say(f"test.close {', '.join(to_close)}; waiting for {', '.join(expected)} (and their re-analyses)")
            run_faults([p for p in plan if p[0] == 0])
            rec.wait(lambda r: set(expected) <= r.analysed_tests(), max(1.0, deadline - time.monotonic()), 1.0)
        # settled: every service queue empty twice in a row (re-analyses after PTC01 included)
        for _ in range(2):
            wait_for(lambda: queues_drained(broker, vhost, settings.queue_prefix, services), max(1.0, deadline - time.monotonic()), 2.0)
        for w in watchers:
            w.join(5)
        queues = broker.list_queues(vhost)
        running = stack.running()

        records = rec.snapshot()
        for f in faults:
            if f.recovered_at is not None:
                continue
            if f.target == "analyzer-worker":
                f.recovered_at = producers_after(records, "analyzer", f.at)
            elif f.target.startswith("broker"):
                times = [r.received_at for r in records if r.event.produced_at > f.at]
                f.recovered_at = min(times) if times else None
            elif f.target == "catalogue":
                f.recovered_at = f.working_at  # it publishes nothing
            else:
                f.recovered_at = producers_after(records, f.target, f.at)
        exp = account_exposures(records, played)
        ana = account_analyses(records, expected)
        dups = duplicate_products(tmp / "products", expected, BLOCK, played)
        recovery, steady = latencies(records, faults)
        elapsed = time.monotonic() - t_start

        print(f"\n=== chaos run: {len(played)} exposures, {len(faults)} faults, {elapsed / 60:.1f} min ===")
        print(f"exposures: {len(played)} played, lost {len(exp.lost)} {exp.lost or ''}, duplicated {len(exp.duplicated)} "
              f"{exp.duplicated or ''}, unexpected {exp.unexpected or 0}; same-id redeliveries seen {exp.redeliveries}")
        if analyzer:
            print(f"analyses: {len(expected)} expected ({', '.join(expected)}), lost {len(ana.lost)} {ana.lost or ''}, "
                  f"duplicated {len(ana.duplicated)} {ana.duplicated or ''}, failed {ana.failed or 0}, "
                  f"unexpected {ana.unexpected or 0}, re-analyses (calibration arrived / closed) {ana.reanalyses or 0}")
        else:
            print("analyses: not measured (the analyzer does not start: `vison analyzer --help` fails)")
        print(f"duplicate / partial product files: {len(dups)}" + "".join(f"\n  {d}" for d in dups))
        print("messages left in every queue (messages / unacked / consumers):")
        for q, v in sorted(queues.items()):
            note = "  (this bench's recorder)" if q == rec.queue else ""
            print(f"  {q:<44} {v['messages']:>5} / {v['unacked']:>3} / {v['consumers']:>2}{note}")
        print("recovery after each fault, seconds from the fault to: up (process answering / broker answering), "
              "working (first message handled / every consumer back), next event of the victim (catalogue: = working):")

        def secs(t):
            return f"{(t - f.at).total_seconds():6.1f}" if t else "     -"
        for f in faults:
            print(f"  {f.at:%H:%M:%S} {f.target:<30} up {secs(f.restarted_at)}  working {secs(f.working_at)}  "
                  f"next event {secs(f.recovered_at)}  {f.note}")
        print(f"latency file complete -> exposure.validated\n  during recovery: {fmt_pct(recovery)}\n"
              f"  steady state:    {fmt_pct(steady)}")
        down = [s for s in services if not running.get(s)]
        if down:
            print(f"services not running at the end: {down}")
        if rec.errors:
            print(f"recorder errors: {rec.errors[:3]}")
        bad = exp.lost or exp.duplicated or (analyzer and (ana.lost or ana.duplicated)) or dups
        status = 1 if bad else 0
    finally:
        if sim is not None and sim.poll() is None:
            sim.kill()
            sim.wait(10)
        if rec is not None:
            try:
                rec.close()
            except Exception:  # noqa: BLE001 - the broker may be down
                pass
        if stack is not None:
            stack.stop()
        orphans = cleanup_orphans([f.pid for f in faults if f.pid and f.target in WANTED])
        if orphans:
            print(f"orphaned processes of killed services, still running at the end (killed now): {orphans}")
        cleanup_orphans(pgids)  # e.g. a multiprocessing resource tracker still exiting
        if broker is not None:
            if broker.dir is None:  # the machine's broker: up again whatever happened
                if not broker.ensure_up():
                    print("WARNING: the machine's broker did not come back: run `rabbitmq-server -detached`", file=sys.stderr)
            else:
                broker.ensure_up(60)
            broker.delete_vhost(vhost)
            broker.discard_private()
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
