"""Faults on the live pipeline (real broker, services as processes):

- ingest and validator killed (SIGKILL) and restarted mid-stream, with bad input in the same
  stream (a truncated FITS, a wrong geometry, a garbage exposure-log line, a malformed message on
  the queue): every good exposure validated exactly once, every bad input reported with its
  reason, the malformed message dead-lettered, no queue left blocked;
- the broker restarted mid-stream (``rabbitmqctl stop_app`` / ``start_app``) on a private broker
  node started for the test, so that other users of the machine's broker are not disturbed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import pika
import pytest

from services.tools.stack import Stack, free_port
from shared.bus import Publisher, Subscription, connection_parameters, dead_letters, queue_name
from shared.config import Settings, get_settings
from shared.events import ExposureValidated, ProcessingFailed, parse_event
from shared.filenames import format_fits_name
from shared.fitsio import write_frame
from shared.geometry import QUADRANTS
from tests.test_ingest_data import append_log, write_exposure

pytestmark = [pytest.mark.broker, pytest.mark.fullsize]

FAST_INGEST = ["--rescan-interval", "1", "--stable-seconds", "0.2", "--incomplete-timeout", "3",
               "--exposure-timeout", "5"]


class Collector:
    """Events of a subscription gathered by a background thread (and stack restarts polled)."""

    def __init__(self, settings: Settings, stack: Stack, durable_queue: str | None = None):
        self.sub = Subscription(settings, ["exposure.validated.#", "processing.failed.#"], queue=durable_queue)
        self.stack = stack
        self.events: list = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            for rk, _, body in self.sub.messages(timeout=0.3, reconnect=True):
                self.events.append(parse_event(body, rk))
                break
            self.stack.poll()

    def validated(self) -> dict[int, list[ExposureValidated]]:
        out: dict[int, list] = defaultdict(list)
        for e in list(self.events):
            if isinstance(e, ExposureValidated):
                out[e.obsid].append(e)
        return out

    def failures(self) -> list[ProcessingFailed]:
        return [e for e in list(self.events) if isinstance(e, ProcessingFailed)]

    def wait(self, predicate, timeout: float = 90.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self):
                return True
            time.sleep(0.2)
        return predicate(self)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.sub.close()


def _pid(stack: Stack, name: str) -> int:
    pid = stack.running()[name]
    assert pid, f"{name} is not running"
    return pid


def _check_offsets(ev: ExposureValidated, injected: dict) -> None:
    for ccd in ("CCD1", "CCD2", "CCD3"):
        for q in QUADRANTS:
            assert abs(ev.stats[ccd][q].pre.offset - injected[ccd][q]) <= 0.5


def _depth(settings: Settings, queue: str) -> int:
    conn = pika.BlockingConnection(connection_parameters(settings.amqp_url))
    try:
        return conn.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        conn.close()


def test_services_killed_mid_stream_and_bad_input(vison_env, tmp_path, monkeypatch):
    monkeypatch.setenv("VISON_BLOCK", "BORN")
    get_settings.cache_clear()
    settings = get_settings()
    data = Path(settings.data_root)
    stack = Stack(["ingest", "validator"], env={**vison_env, "VISON_BLOCK": "BORN"},
                  ports={"ingest": free_port(), "validator": free_port()}, log_dir=tmp_path / "logs",
                  extra_args={"ingest": FAST_INGEST})
    injected = {}
    stack.start()
    col = Collector(settings, stack)
    try:
        for obsid in (1, 2):
            injected[obsid] = write_exposure(data, obsid, block="BORN")["offsets"]
        assert col.wait(lambda c: 1 in c.validated(), 60), "first exposure never validated"
        # the validator dies while exposure 3 is being handled
        injected[3] = write_exposure(data, 3, block="BORN")["offsets"]
        time.sleep(0.4)
        os.kill(_pid(stack, "validator"), signal.SIGKILL)
        # ingest dies right after exposure 4 is written
        injected[4] = write_exposure(data, 4, block="BORN")["offsets"]
        time.sleep(0.3)
        os.kill(_pid(stack, "ingest"), signal.SIGKILL)
        # bad input while they restart
        bad5 = write_exposure(data, 5, block="BORN", ccds=(1, 3), log_ccds=(1, 2, 3))
        whole = write_exposure(tmp_path / "elsewhere", 5, block="BORN", ccds=(2,), log_ccds=())["files"][2]
        cut = bad5["folder"] / whole.name
        cut.write_bytes(whole.read_bytes()[: 20_000_000])  # CCD2 cut short
        bad6 = write_exposure(data, 6, block="BORN", ccds=(1, 2), log_ccds=(1, 2, 3))
        wrong = bad6["folder"] / format_fits_name(6, bad6["date"], 1, 3)
        write_frame(wrong, np.full((4172, 4000), 2000.0, dtype=np.float32), 3, atomic=True)
        log = next(bad6["folder"].glob("EXP_LOG_*.txt"))
        append_log(log, "garbage\tline\twritten by a confused operator\n")
        with Publisher(settings, "tester") as pub:
            pub.publish_raw(b'{"kind": "exposure.ingested", "obsid": "not a number"', "exposure.ingested.BIAS01.BORN")

        def done(c):
            whats = {(f.what, f.obsid) for f in c.failures()}
            return ({1, 2, 3, 4} <= set(c.validated()) and ("fits", None) in whats and ("exposure", 5) in whats
                    and ("fits", 6) in whats and ("message", None) in whats and ("explog", None) in whats)

        ok = col.wait(done, 120)
        time.sleep(2.0)  # late duplicates would show now
        assert stack.running()["validator"] and stack.running()["ingest"]
        depth = _depth(settings, queue_name(settings, "validator"))
    finally:
        col.close()
        codes = stack.stop()
    validated = col.validated()
    failures = col.failures()
    summary = [f"{f.what} {f.obsid} {f.where}: {f.why}" for f in failures]
    assert ok, (sorted(validated), summary, [p.read_text()[-3000:] for p in (tmp_path / "logs").glob("*.log")])
    assert sorted(validated) == [1, 2, 3, 4], summary
    for obsid, events in validated.items():
        # exactly once: one result per exposure (a redelivery re-sends the same event id at most)
        assert len({e.event_id for e in events}) == 1, (obsid, len(events))
        _check_offsets(events[0], injected[obsid])
    day = bad5["folder"].name
    by_what = defaultdict(list)
    for f in failures:
        by_what[f.what].append(f)
    truncated = [f for f in by_what["fits"] if f.where == f"{day}/{cut.name}"]
    assert truncated and "truncated" in truncated[0].why and truncated[0].service == "ingest"
    assert any(f.obsid == 5 and "missing frame CCD2" in f.why for f in by_what["exposure"])
    geometry = [f for f in by_what["fits"] if f.obsid == 6]
    assert geometry and "NAXIS1=4000" in geometry[0].why and geometry[0].where.endswith("CCD3.fits")
    assert geometry[0].service == "validator"
    assert any(f.where.startswith(f"{day}/{log.name}:") and "fields" in f.why for f in by_what["explog"])
    malformed = [f for f in by_what["message"] if "malformed JSON" in f.why]
    assert malformed and malformed[0].service == "validator"
    dead = dead_letters(settings)
    assert [h["x-vison-reason"].split(":")[0] for _, h, _ in dead] == ["json"]
    assert depth == 0  # nothing stuck in the validator's queue
    assert codes == {"ingest": 0, "validator": 0}  # the restarted services stop cleanly on SIGTERM


# ----------------------------------------------------------------------------- broker restart


class PrivateBroker:
    """A RabbitMQ node of its own (own name, ports and data folder), stopped at the end."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="vison-broker-"))
        os.chmod(self.dir, 0o777)
        (self.dir / "enabled_plugins").write_text("[].\n")
        os.chmod(self.dir / "enabled_plugins", 0o666)
        self.node = f"vison-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "none"),
        }
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(["rabbitmqctl", "-q", "-n", self.node, *args], capture_output=True, text=True,
                              timeout=timeout, env=self.env)

    def _port_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def wait_up(self, timeout: float = 90) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._port_open():
                try:
                    pika.BlockingConnection(connection_parameters(self.url)).close()
                    return True
                except Exception:
                    pass
            time.sleep(0.5)
        return False

    def start(self) -> None:
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, capture_output=True, timeout=60)
        if not self.wait_up():
            log = "\n".join(p.read_text()[-1500:] for p in (self.dir / "log").glob("*.log")) if (self.dir / "log").exists() else ""
            self.stop()
            pytest.skip(f"could not start a private RabbitMQ node for the broker-restart test:\n{log}")

    def stop_app(self) -> None:
        assert self.ctl("stop_app").returncode == 0

    def start_app(self) -> None:
        end = time.monotonic() + 60
        while True:  # the listener socket can take a moment to be released
            if self.ctl("start_app").returncode == 0 and self.wait_up(15):
                return
            assert time.monotonic() < end, "broker did not come back"
            time.sleep(1.0)

    def stop(self) -> None:
        try:
            self.ctl("stop", timeout=60)
        except subprocess.SubprocessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def private_broker():
    if not (shutil.which("rabbitmq-server") and shutil.which("rabbitmqctl")):
        pytest.skip("rabbitmq-server / rabbitmqctl not installed here: the broker-restart test needs to control a broker")
    if os.geteuid() != 0:
        pytest.skip("starting a private RabbitMQ node needs root (rabbitmq-server switches to the rabbitmq user)")
    broker = PrivateBroker()
    broker.start()
    yield broker
    broker.stop()


def test_broker_restart_mid_stream(private_broker, tmp_path, monkeypatch):
    """It once failed under load with "pipeline never validated the first exposures": the code was
    wrong, not the test. ``Stack.start`` started ingest and the validator side by side; when the
    validator (slower to import) had not declared its queue yet, ingest's first
    ``exposure.ingested`` matched no queue and the broker dropped it (no ``mandatory``). Now the
    stack declares the topology first, ingest declares the validator's queue on connect, and a
    returned message is re-published (tests/test_topology.py and tests/test_bus_api.py test each)."""
    tag = uuid.uuid4().hex[:8]
    env = {
        "VISON_AMQP_URL": private_broker.url,
        "VISON_EXCHANGE": f"vison-{tag}",
        "VISON_DATA_ROOT": str(tmp_path / "data"),
        "VISON_PRODUCTS_ROOT": str(tmp_path / "products"),
        "VISON_STATE_DIR": str(tmp_path / "state"),
        "VISON_BLOCK": "BORN",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    settings = get_settings()
    data = Path(settings.data_root)
    data.mkdir(parents=True)
    stack = Stack(["ingest", "validator"], env=env, ports={"ingest": free_port(), "validator": free_port()},
                  log_dir=tmp_path / "logs", extra_args={"ingest": FAST_INGEST})
    injected = {}
    col = Collector(settings, stack, durable_queue=f"collector-{tag}")  # durable: survives the restart
    stack.start()
    try:
        for obsid in (1, 2):
            injected[obsid] = write_exposure(data, obsid, block="BORN")["offsets"]
        assert col.wait(lambda c: {1, 2} <= set(c.validated()), 60), "pipeline never validated the first exposures"
        private_broker.stop_app()
        injected[3] = write_exposure(data, 3, block="BORN")["offsets"]  # written while the broker is down
        time.sleep(3.0)
        private_broker.start_app()
        injected[4] = write_exposure(data, 4, block="BORN")["offsets"]
        ok = col.wait(lambda c: {1, 2, 3, 4} <= set(c.validated()), 120)
        time.sleep(2.0)
    finally:
        col.close()
        codes = stack.stop()
        settings_copy = settings
    validated = col.validated()
    logs = {p.name: p.read_text()[-2000:] for p in (tmp_path / "logs").glob("*.log")}
    assert ok, (sorted(validated), [f.why for f in col.failures()], logs)
    assert sorted(validated) == [1, 2, 3, 4]
    for obsid, events in validated.items():
        assert len({e.event_id for e in events}) == 1
        _check_offsets(events[0], injected[obsid])
    assert not col.failures(), [f"{f.what} {f.where}: {f.why}" for f in col.failures()]
    assert "connection lost" in logs["validator.log"] or "reconnecting" in logs["validator.log"]
    assert codes == {"ingest": 0, "validator": 0}
    assert _depth(settings_copy, queue_name(settings_copy, "validator")) == 0
