"""The chaos harness shared by ``tests/test_chaos.py`` and ``bench/chaos.py``: services run as local
processes (:class:`services.tools.stack.Stack`), every event of the run recorded from a durable
queue bound to ``#`` (it survives broker restarts), SIGKILL faults at seeded random moments, and
the accounting at the end (exposures / analyses lost or duplicated by distinct event id, messages
left in queues, duplicate or partial product files, recovery times, latencies).

Thin I/O around the broker (``rabbitmqctl``), ``/proc`` and the stack; the accounting functions
are pure (records in, typed summaries out)."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from shared.bus import Subscription
from shared.config import Settings
from shared.events import AnalysisCompleted, Event, ExposureValidated

REPO = Path(__file__).resolve().parents[1]

#: Ingest options for short runs (rescans every second, short timeouts).
FAST_INGEST = ["--rescan-interval", "1", "--stable-seconds", "0.2", "--incomplete-timeout", "20",
               "--exposure-timeout", "40"]


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------- services


def startable_services(wanted: Iterable[str], timeout: float = 90.0) -> list[str]:
    """The services of ``wanted`` that ``vison stack`` knows and whose ``vison <service> --help``
    exits 0 (a service whose module is being rewritten and does not import is left out)."""
    from services.tools.stack import available_services

    known = set(available_services())
    out = []
    for name in wanted:
        if name not in known:
            continue
        try:
            rc = subprocess.run([sys.executable, "-m", "services.cli", name, "--help"], capture_output=True,
                                timeout=timeout, cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            rc = -1
        if rc == 0:
            out.append(name)
    return out


def _proc_stat(pid: int) -> tuple[int, int, float] | None:
    """(ppid, pgid, cpu seconds) of a live process from /proc, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2:].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(rest[1]), int(rest[2]), (int(rest[11]) + int(rest[12])) / ticks


def children(pid: int) -> list[int]:
    """Live child processes of ``pid``."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _proc_stat(int(entry.name))
            if st is not None and st[0] == pid:
                out.append(int(entry.name))
    return sorted(out)


def group_members(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (a stack child and what it spawned)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            st = _proc_stat(int(entry.name))
            if st is not None and st[1] == pgid:
                out.append(int(entry.name))
    return sorted(out)


def busy_process(pids: Iterable[int], window: float = 1.0, min_cpu: float = 0.03) -> int | None:
    """The process of ``pids`` that used the most CPU over ``window`` s, if at least ``min_cpu``
    s (an analyzer worker in the middle of a job; idle ones use ~0: on a machine at load 20 a busy
    one gets only ~0.1 s per s), else None."""
    before = {p: _proc_stat(p) for p in pids}
    time.sleep(window)
    best, best_cpu = None, min_cpu
    for p, st in before.items():
        after = _proc_stat(p)
        if st is None or after is None:
            continue
        used = after[2] - st[2]
        if used >= best_cpu:
            best, best_cpu = p, used
    return best


def busy_child(pid: int, window: float = 1.0, min_cpu: float = 0.03) -> int | None:
    """A child of ``pid`` busy with a job (see :func:`busy_process`), else None."""
    return busy_process(children(pid), window, min_cpu)


def metrics_consumed(port: int, timeout: float = 2.0) -> float | None:
    """Sum of ``vison_events_consumed_total`` on a service's /metrics (None: not answering)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout).read().decode()
    except OSError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("vison_events_consumed_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --------------------------------------------------------------------------- broker


class BrokerControl:
    """``rabbitmqctl`` on one node: vhosts, queue depths, and the restarts the bench makes.

    ``node=None``: the machine's broker (default node); otherwise a node of its own started with
    :meth:`start_private` (own name, ports and folders), so that restarting it disturbs nobody."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5672, node: str | None = None,
                 env: dict[str, str] | None = None, user: str = "guest", password: str = "guest"):
        self.host, self.port, self.node = host, port, node
        self.env = env or dict(os.environ)
        self.user, self.password = user, password
        self.dir: Path | None = None

    # -- commands
    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        node = ["-n", self.node] if self.node else []
        return subprocess.run(["rabbitmqctl", "-q", *node, *args], capture_output=True, text=True, timeout=timeout,
                              env=self.env)

    def url(self, vhost: str) -> str:
        from urllib.parse import quote

        return f"amqp://{self.user}:{self.password}@{self.host}:{self.port}/{quote(vhost, safe='')}"

    def add_vhost(self, vhost: str) -> None:
        for args in (("add_vhost", vhost), ("set_permissions", "-p", vhost, self.user, ".*", ".*", ".*")):
            r = self.ctl(*args)
            if r.returncode != 0:
                raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}")

    def delete_vhost(self, vhost: str) -> None:
        self.ctl("delete_vhost", vhost)

    def list_queues(self, vhost: str) -> dict[str, dict[str, int]]:
        """``{queue: {messages, ready, unacked, consumers}}`` of a vhost (``rabbitmqctl list_queues``)."""
        r = self.ctl("list_queues", "-p", vhost, "name", "messages", "messages_ready", "messages_unacknowledged",
                     "consumers", timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"rabbitmqctl list_queues -p {vhost} failed: {r.stderr.strip()}")
        out = {}
        for line in r.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) == 5 and parts[1].strip().isdigit():
                out[parts[0]] = dict(zip(("messages", "ready", "unacked", "consumers"), map(int, parts[1:])))
        return out

    # -- liveness
    def answers(self) -> bool:
        import pika

        from shared.bus import connection_parameters

        try:
            pika.BlockingConnection(connection_parameters(self.url("/"))).close()
            return True
        except Exception:  # noqa: BLE001 - any failure means "not up"
            return False

    def wait_up(self, timeout: float = 120.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.answers():
                return True
            time.sleep(0.5)
        return False

    # -- faults (bench only)
    def stop_app(self) -> None:
        r = self.ctl("stop_app", timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"rabbitmqctl stop_app failed: {r.stderr.strip()}")

    def start_app(self, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while True:  # the listener socket can take a moment to be released
            if self.ctl("start_app", timeout=120).returncode == 0 and self.wait_up(20):
                return
            if time.monotonic() > end:
                raise RuntimeError("rabbitmqctl start_app: the broker did not come back")
            time.sleep(1.0)

    def stop_node(self) -> None:
        r = self.ctl("stop", timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"rabbitmqctl stop failed: {r.stderr.strip()}")

    def start_node(self, timeout: float = 180.0) -> None:
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, capture_output=True, timeout=120)
        if not self.wait_up(timeout):
            raise RuntimeError("rabbitmq-server -detached: the node did not answer in time")

    def ensure_up(self, timeout: float = 180.0) -> bool:
        """Bring the broker back whatever state a fault left it in (app stopped, node down)."""
        if self.answers():
            return True
        if self.ctl("status", timeout=30).returncode == 0:  # node up, app stopped
            self.ctl("start_app", timeout=120)
            if self.wait_up(60):
                return True
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, capture_output=True, timeout=120)
        return self.wait_up(timeout)

    @classmethod
    def start_private(cls) -> "BrokerControl":
        """A RabbitMQ node of its own (own name, AMQP and distribution ports, folders; needs root)."""
        from services.tools.stack import free_port

        tmp = Path(tempfile.mkdtemp(prefix="vison-chaos-broker-"))
        os.chmod(tmp, 0o777)
        (tmp / "enabled_plugins").write_text("[].\n")
        os.chmod(tmp / "enabled_plugins", 0o666)
        port = free_port()
        node = f"vison-chaos-{uuid.uuid4().hex[:8]}@localhost"
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": node,
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(tmp / "mnesia"),
            "RABBITMQ_LOG_BASE": str(tmp / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(tmp / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(tmp / "pid"),
            "RABBITMQ_CONFIG_FILE": str(tmp / "none"),
        }
        broker = cls(port=port, node=node, env=env)
        broker.dir = tmp
        broker.start_node()
        return broker

    def discard_private(self) -> None:
        """Stop a private node and remove its folder (no-op for the machine's broker)."""
        if self.dir is None:
            return
        try:
            self.ctl("stop", timeout=60)
        except subprocess.SubprocessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- recorder


@dataclass
class Record:
    """One event as the recorder received it."""

    event: Event
    routing_key: str
    received_at: datetime


class Recorder:
    """Every event of the exchange, from a durable named queue bound to ``#`` (so nothing is missed
    while the broker restarts: ``Subscription.events(reconnect=True)``), on a background thread.
    ``tick`` (e.g. ``Stack.poll``) is called between batches."""

    def __init__(self, settings: Settings, queue: str, tick: Callable[[], None] | None = None):
        self.sub = Subscription(settings, ["#"], queue=queue)
        self.queue = queue
        self.tick = tick
        self.records: list[Record] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, name="chaos-recorder", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for rec_key_event in self._batch():
                    with self._lock:
                        self.records.append(rec_key_event)
                    if self._stop.is_set():
                        break
            except Exception as exc:  # noqa: BLE001 - keep recording; report at the end
                self.errors.append(f"{exc.__class__.__name__}: {exc}")
                time.sleep(0.5)
            if self.tick is not None:
                self.tick()

    def _batch(self):
        deadline = time.monotonic() + 0.5
        for rk, _, body in self.sub.messages(timeout=0.3, reconnect=True):
            from shared.events import EventError, parse_event

            try:
                yield Record(parse_event(body, rk), rk, now_utc())
            except EventError:
                pass
            if time.monotonic() > deadline or self._stop.is_set():
                return

    def snapshot(self) -> list[Record]:
        with self._lock:
            return list(self.records)

    def of(self, cls: type) -> list[Record]:
        return [r for r in self.snapshot() if isinstance(r.event, cls)]

    def validated_obsids(self) -> set[int]:
        return {r.event.obsid for r in self.of(ExposureValidated)}

    def analysed_tests(self) -> set[str]:
        return {r.event.test for r in self.of(AnalysisCompleted)}

    def wait(self, predicate: Callable[["Recorder"], bool], timeout: float, poll: float = 0.2) -> bool:
        """Wait until ``predicate(self)`` holds (True) or ``timeout`` s passed (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self):
                return True
            time.sleep(poll)
        return predicate(self)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(15)
        self.sub.close()


def wait_for(predicate: Callable[[], bool], timeout: float, poll: float = 0.3) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll)
    return predicate()


# --------------------------------------------------------------------------- faults


@dataclass
class Fault:
    """One injected fault: what, when (UTC) and when the victim was seen working again."""

    target: str  # service name, "analyzer-worker", "broker (stop_app)", "broker (node restart)"
    at: datetime
    pid: int | None = None
    restarted_at: datetime | None = None  # process up again (metrics answering) / broker answering
    recovered_at: datetime | None = None  # first event of the victim after the fault
    working_at: datetime | None = None  # first message handled again (its /metrics), or every consumer back (broker)
    note: str = ""

    @property
    def recovery_s(self) -> float | None:
        return (self.recovered_at - self.at).total_seconds() if self.recovered_at else None


def kill_service(stack: Any, name: str) -> Fault:
    """SIGKILL a stack service's main process (as the OOM killer would; its children, e.g.
    analyzer workers, are left to fend for themselves) and return the fault."""
    pid = stack.running().get(name)
    if not pid:
        raise RuntimeError(f"{name} is not running: cannot kill it")
    at = now_utc()
    os.kill(pid, signal.SIGKILL)
    for child in stack.children:  # the stack's usual restart delay, not a growing backoff
        if child.name == name:
            child.restarts = 0
    return Fault(name, at, pid)


def kill_worker(stack: Any, analyzer: str = "analyzer", timeout: float = 60.0,
                old_pids: Iterable[int] = ()) -> Fault | None:
    """SIGKILL an analyzer worker while it is busy with a job (None if none was busy in time).
    Candidates: the workers of the running analyzer and those left by killed ones (``old_pids``:
    their process groups), since the orphans keep taking jobs."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pid = stack.running().get(analyzer)
        mains = {pid, *old_pids}
        cands = set(children(pid)) if pid else set()
        for old in old_pids:
            cands |= set(group_members(old))
        cands -= mains
        busy = busy_process(sorted(cands)) if cands else None
        if busy is None:
            time.sleep(0.3)
            continue
        at = now_utc()
        try:
            os.kill(busy, signal.SIGKILL)
        except ProcessLookupError:
            continue
        orphan = "" if busy in children(pid or 0) else " (an orphan of a killed coordinator)"
        return Fault("analyzer-worker", at, busy, note=f"killed during a job{orphan}")
    return None


def producers_after(records: list[Record], producer: str, after: datetime) -> datetime | None:
    """Time the first event produced by ``producer`` after ``after`` was received."""
    times = [r.received_at for r in records if r.event.producer == producer and r.event.produced_at > after]
    return min(times) if times else None


# --------------------------------------------------------------------------- accounting


@dataclass
class ExposureAccount:
    played: list[int]
    lost: list[int]
    duplicated: dict[int, int]  # ObsID -> distinct event ids
    unexpected: list[int]
    redeliveries: int  # events received more than once with the same id (harmless)


def account_exposures(records: list[Record], played: Iterable[int]) -> ExposureAccount:
    """Distinct ``exposure.validated`` event ids per ObsID against the ObsIDs played."""
    ids: dict[int, set] = defaultdict(set)
    copies = 0
    for r in records:
        if isinstance(r.event, ExposureValidated):
            if r.event.event_id in ids[r.event.obsid]:
                copies += 1
            ids[r.event.obsid].add(r.event.event_id)
    played = sorted(set(played))
    return ExposureAccount(
        played=played,
        lost=[o for o in played if not ids.get(o)],
        duplicated={o: len(v) for o, v in ids.items() if len(v) > 1},
        unexpected=sorted(set(ids) - set(played)),
        redeliveries=copies,
    )


@dataclass
class AnalysisAccount:
    expected: list[str]
    lost: list[str]
    duplicated: dict[str, int]  # "TEST" or "TEST re-analysis of ID" -> distinct event ids
    reanalyses: dict[str, int]  # test -> distinct re-analysis events (legitimate: a calibration arrived)
    failed: dict[str, str]  # test -> error of a status=failed analysis
    unexpected: list[str]


def account_analyses(records: list[Record], expected: Iterable[str]) -> AnalysisAccount:
    """Distinct ``analysis.completed`` event ids per test run against the tests expected. A first
    analysis is keyed by the test; a re-analysis (``reanalysis.of``) by the analysis it supersedes,
    so two events for the same key are a duplicate, never a legitimate re-run."""
    first: dict[str, set] = defaultdict(set)
    again: dict[tuple[str, str], set] = defaultdict(set)
    failed: dict[str, str] = {}
    for r in records:
        ev = r.event
        if not isinstance(ev, AnalysisCompleted):
            continue
        label = ev.test if not ev.repeat else f"{ev.test}.{ev.repeat}"
        if ev.status == "failed":
            failed[label] = ev.error or "?"
        if ev.reanalysis is None:
            first[label].add(ev.event_id)
        else:
            again[(label, str(ev.reanalysis.of))].add(ev.event_id)
    expected = sorted(set(expected))
    dup = {t: len(v) for t, v in first.items() if len(v) > 1}
    dup.update({f"{t} re-analysis of {of}": len(v) for (t, of), v in again.items() if len(v) > 1})
    re_n: dict[str, int] = defaultdict(int)
    for (t, _), v in again.items():
        re_n[t] += len(v)
    return AnalysisAccount(expected, [t for t in expected if not first.get(t)], dup, dict(re_n), failed,
                           sorted(set(first) - set(expected)))


_RUN = re.compile(r"^(?P<test>[A-Za-z0-9_]+?)(?:\.(?P<repeat>\d+))?$")


def duplicate_products(products: Path, tests: Iterable[str], block: str, obsids: Iterable[int]) -> list[str]:
    """Product files that should not be there after the run: temporary / partial files left by an
    interrupted write, run folders of repeats that were never played (``BIAS01.2``: a redelivery
    taken for a new run), and quick-look PNGs other than one ``<ObsID>.png`` per exposure."""
    out: list[str] = []
    if not products.is_dir():
        return out
    for path in products.rglob("*"):
        if path.is_file() and (path.name.endswith((".tmp", ".part", ".partial")) or ".tmp." in path.name):
            out.append(f"partial file {path.relative_to(products)}")
    root = products / block
    if root.is_dir():
        wanted = set(tests)
        for folder in sorted(root.iterdir()):
            m = _RUN.match(folder.name)
            if folder.is_dir() and m and m["repeat"] and m["test"] in wanted:
                out.append(f"extra run folder {folder.relative_to(products)}")
    ql = products / "quicklook" / block
    if ql.is_dir():
        names = defaultdict(list)
        for png in ql.iterdir():
            stem = png.name.split(".")[0]
            names[stem].append(png.name)
        for stem, files in names.items():
            if len(files) > 1:
                out.append(f"quick-look duplicates {sorted(files)}")
            if stem.isdigit() and int(stem) not in set(obsids):
                out.append(f"quick-look of an ObsID never played: {files}")
    return out


def percentiles(values: list[float], qs: Iterable[int] = (50, 90, 95, 99)) -> dict[int, float]:
    """Percentiles (nearest rank on the sorted values); empty dict without values."""
    if not values:
        return {}
    s = sorted(values)
    return {q: s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))] for q in qs}


#: Faults on the path file -> exposure.validated (the others cannot delay a validation).
VALIDATION_PATH = ("ingest", "validator", "broker")


def latencies(records: list[Record], faults: list[Fault]) -> tuple[list[float], list[float]]:
    """File complete -> ``exposure.validated`` received (s) of every ObsID's first event, split
    into (during recovery, steady state): an exposure is "during recovery" when the interval from
    its completion to its validation overlaps the window of a fault on the validation path
    (ingest, validator, broker: fault -> the victim's next event, or +60 s if none came)."""
    faults = [f for f in faults if f.target.startswith(VALIDATION_PATH)]
    first: dict[int, Record] = {}
    for r in records:
        if isinstance(r.event, ExposureValidated) and r.event.obsid not in first:
            first[r.event.obsid] = r
    windows = []
    for f in faults:
        end = f.recovered_at or f.working_at or f.restarted_at
        windows.append((f.at, end if end else f.at + timedelta(seconds=60)))
    recovery, steady = [], []
    for r in first.values():
        done = r.received_at
        start = r.event.complete_at or r.event.produced_at
        lat = (done - start).total_seconds()
        (recovery if any(start <= w1 and done >= w0 for w0, w1 in windows) else steady).append(lat)
    return recovery, steady


def fmt_pct(values: list[float]) -> str:
    if not values:
        return "n/a (no exposure)"
    p = percentiles(values)
    return (f"n={len(values)}  p50 {p[50]:.2f} s  p90 {p[90]:.2f} s  p95 {p[95]:.2f} s  p99 {p[99]:.2f} s  "
            f"max {max(values):.2f} s  mean {statistics.fmean(values):.2f} s")


def service_queues(queues: dict[str, dict[str, int]], prefix: str, services: Iterable[str]) -> dict[str, dict[str, int]]:
    """The queues of the running services (``P.<service>``, the analyzer's work queues)."""
    names = {f"{prefix}.{s}" for s in services}
    if "analyzer" in services:
        names |= {f"{prefix}.analyzer.jobs", f"{prefix}.analyzer.done"}
    return {q: v for q, v in queues.items() if q in names}


def consumers_back(broker: BrokerControl, vhost: str, prefix: str, services: Iterable[str]) -> bool:
    """True when every running service's queue has a consumer again (after a broker restart)."""
    try:
        qs = service_queues(broker.list_queues(vhost), prefix, list(services))
    except (RuntimeError, subprocess.SubprocessError):
        return False
    return bool(qs) and all(v["consumers"] > 0 for v in qs.values())


def queues_drained(broker: BrokerControl, vhost: str, prefix: str, services: Iterable[str]) -> bool:
    """True when every running service's queue holds no message (ready or unacknowledged)."""
    try:
        qs = service_queues(broker.list_queues(vhost), prefix, list(services))
    except (RuntimeError, subprocess.SubprocessError):
        return False
    return bool(qs) and all(v["messages"] == 0 and v["unacked"] == 0 for v in qs.values())


def cleanup_orphans(pgids: Iterable[int]) -> list[int]:
    """SIGKILL processes still alive in the process groups of services this run started (analyzer
    workers orphaned when their coordinator was killed); returns their pids."""
    killed = []
    for pgid in set(pgids):
        for pid in group_members(pgid):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


__all__ = [
    "AnalysisAccount", "BrokerControl", "ExposureAccount", "FAST_INGEST", "Fault", "Record", "Recorder",
    "account_analyses", "account_exposures", "busy_child", "busy_process", "children", "cleanup_orphans", "consumers_back", "duplicate_products",
    "fmt_pct", "group_members", "kill_service", "kill_worker", "latencies", "metrics_consumed", "now_utc",
    "percentiles", "producers_after", "queues_drained", "service_queues", "startable_services", "wait_for",
]
