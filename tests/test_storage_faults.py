"""Disk full and read-only state folders (a 2 MB tmpfs, as root; skipped where mount is not
permitted): the validator keeps the message unacknowledged (shared.bus.Retry), the service says
why once, ``vison_service_blocked`` is 1 meanwhile, and it goes on when the condition clears with
nothing lost; ingest keeps its pending exposure and records it once space is back, publishing it
exactly once. Plus the error mapping of shared/storage.py."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from shared.metrics import REGISTRY
from shared.storage import StorageBlocked, blocked_reason, storage_guard


@pytest.mark.parametrize("exc,reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "disk_full"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk_quota"),
    (PermissionError(errno.EACCES, "Permission denied"), "permission_denied"),
    (OSError(errno.EROFS, "Read-only file system"), "read_only"),
    (sqlite3.OperationalError("database or disk is full"), "disk_full"),
    (sqlite3.OperationalError("attempt to write a readonly database"), "read_only"),
    (OSError(errno.ENOENT, "No such file"), None),
    (ValueError("bad"), None),
])
def test_blocking_errors_are_recognised(exc, reason):
    assert blocked_reason(exc) == reason
    if reason is None:
        with pytest.raises(type(exc)):
            with storage_guard("state", "/x"):
                raise exc
    else:
        with pytest.raises(StorageBlocked) as err:
            with storage_guard("state", "/var/state"):
                raise exc
        assert err.value.reason == reason and "/var/state" in str(err.value) and err.value.what == "state"
        from shared.bus import Retry

        assert isinstance(err.value, Retry)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 2 MB tmpfs at tmp_path/tinyfs (unmounted after the test)."""
    target = tmp_path / "tinyfs"
    target.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(target)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {out.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(target)], capture_output=True)
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write zeros into folder/filler until the file system is full (unbuffered)."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def blocked(service: str, reason: str) -> float:
    return REGISTRY.get_sample_value("vison_service_blocked", {"service": service, "reason": reason}) or 0.0


def _settings(vison_env, state: Path, monkeypatch):
    from shared.config import get_settings

    monkeypatch.setenv("VISON_STATE_DIR", str(state))
    monkeypatch.setenv("VISON_QUEUE_PREFIX", f"vison-{uuid.uuid4().hex[:8]}")
    monkeypatch.setenv("VISON_BLOCK", "BORN")
    get_settings.cache_clear()
    return get_settings()


def _campaign(n: int):
    from shared.events import CampaignDefined

    return CampaignDefined(block="BORN", campaign=f"c{n}", definition={"tests": [], "pad": "x" * 200_000, "n": n})


@pytest.mark.broker
@pytest.mark.parametrize("fault", ["disk_full", "read_only"])
def test_validator_blocks_on_its_state_folder_then_resumes(vison_env, tiny_fs, monkeypatch, caplog, fault):
    from services.validator.service import BINDINGS, SERVICE, Validator
    from shared.bus import Consumer, Publisher, dead_letters

    settings = _settings(vison_env, tiny_fs, monkeypatch)
    caplog.set_level(logging.WARNING)
    if fault == "read_only":  # read-only from the start (a mount with open files cannot be remounted)
        subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    validator = Validator(settings, pool="serial", workers=1)
    # idempotent=False: the bus's seen-event store (same folder) cannot open on a read-only mount
    consumer = Consumer(settings, SERVICE, BINDINGS, validator, idempotent=fault != "read_only")
    thread = threading.Thread(target=consumer.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        assert consumer.ready.wait(20)
        if fault == "disk_full":
            filler = fill(tiny_fs)
        with Publisher(settings, "test") as pub:
            for n in range(3):
                pub.publish(_campaign(n))
        wait_for(lambda: blocked(SERVICE, fault) == 1.0, what=f"vison_service_blocked {fault}")
        assert consumer.handled == 0
        assert validator._store is None if fault == "read_only" else validator.store.campaign("BORN") is None
        time.sleep(1.5)  # let a few retries happen: still one log line
        if fault == "disk_full":
            filler.unlink()
        else:
            subprocess.run(["mount", "-o", "remount,rw", str(tiny_fs)], check=True)
        wait_for(lambda: consumer.handled == 3, what="the 3 messages handled after the fault cleared")
        assert validator.store.campaign("BORN")["n"] == 2  # all 3 stored, in order
        assert blocked(SERVICE, fault) == 0.0
        said = [r for r in caplog.records if "blocked" in r.getMessage() and r.levelno >= logging.ERROR
                and r.name == "vison.bus"]
        assert len(said) == 1, [r.getMessage() for r in said]
        assert str(tiny_fs) in said[0].getMessage()
        assert dead_letters(settings) == []
    finally:
        consumer.stop()
        thread.join(20)
        validator.close()


@pytest.mark.broker
def test_ingest_keeps_an_exposure_while_its_ledger_is_full(vison_env, tiny_fs, monkeypatch, caplog):
    from services.ingest.service import IngestOptions, IngestService
    from shared.bus import Subscription
    from shared.events import parse_event
    from tests.test_ingest_data import write_exposure

    settings = _settings(vison_env, tiny_fs, monkeypatch)
    caplog.set_level(logging.WARNING)
    with Subscription(settings, ["exposure.ingested.#"]) as sub:
        service = IngestService(settings, IngestOptions(rescan_interval=0.5, stable_seconds=0.05, watch=False,
                                                         hk_interval=3600))
        thread = threading.Thread(target=service.run, daemon=True)
        thread.start()
        try:
            assert service.ready.wait(20)
            filler = fill(tiny_fs)
            write_exposure(Path(settings.data_root), 7, size="tiny", block="BORN")
            wait_for(lambda: blocked("ingest", "disk_full") == 1.0, what="ingest blocked")
            assert not service.ledger.is_published("BORN", 7)
            time.sleep(1.5)  # several retries meanwhile
            filler.unlink()
            wait_for(lambda: service.ledger.is_published("BORN", 7), what="the exposure recorded in the ledger")
            wait_for(lambda: blocked("ingest", "disk_full") == 0.0, what="ingest unblocked")
            got = [parse_event(b, rk) for rk, _, b in sub.messages(timeout=1.0)]
        finally:
            service.stop()
            thread.join(20)
    assert [e.obsid for e in got] == [7]  # published once, not once per retry
    said = [r.getMessage() for r in caplog.records if "blocked" in r.getMessage()]
    assert len(said) == 1 and "disk full" in said[0], said


@pytest.mark.broker
def test_backlog_of_500_drains_exactly_once_without_memory_alarm(vison_env, monkeypatch):
    """A slow (stopped) consumer: 500 exposure.ingested wait in the validator queue, then drain
    with the configured prefetch; each handled exactly once, none left, no broker memory alarm."""
    import importlib.util

    from shared.config import get_settings

    spec = importlib.util.spec_from_file_location("bench_backlog", Path(__file__).resolve().parents[1] / "bench" / "backlog.py")
    backlog = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(backlog)
    monkeypatch.setenv("VISON_QUEUE_PREFIX", f"vison-{uuid.uuid4().hex[:8]}")
    get_settings.cache_clear()
    settings = get_settings()
    r = backlog.run_backlog(settings, 500, timeout=240)
    assert r["prefetch"] == settings.prefetch
    assert (r["handled"], r["lost"], r["duplicated"], r["unexpected"], r["left_in_queue"]) == (500, 0, 0, 0, 0), r
    assert not r["memory_alarm"]


@pytest.mark.broker
def test_ingest_waits_for_a_read_only_state_folder(vison_env, tiny_fs, monkeypatch, caplog):
    """Started on a read-only state folder, ingest waits (logged once, gauge), then runs and
    publishes what arrived meanwhile once the folder is writable."""
    from services.ingest.service import IngestOptions, open_ingest
    from shared.bus import Subscription
    from shared.events import parse_event
    from tests.test_ingest_data import write_exposure

    settings = _settings(vison_env, tiny_fs, monkeypatch)
    caplog.set_level(logging.WARNING)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    stop, box = threading.Event(), {}
    options = IngestOptions(rescan_interval=0.5, stable_seconds=0.05, watch=False, hk_interval=3600)

    def start():
        box["service"] = service = open_ingest(settings, options, stop, max_wait=1.0)
        if service is not None:
            service.run()

    with Subscription(settings, ["exposure.ingested.#"]) as sub:
        thread = threading.Thread(target=start, daemon=True)
        thread.start()
        try:
            wait_for(lambda: blocked("ingest", "read_only") == 1.0, what="ingest waiting on a read-only folder")
            write_exposure(Path(settings.data_root), 9, size="tiny", block="BORN")
            time.sleep(1.5)  # several attempts: one log line
            subprocess.run(["mount", "-o", "remount,rw", str(tiny_fs)], check=True)
            wait_for(lambda: "service" in box and box["service"].ledger.is_published("BORN", 9), what="published")
            assert blocked("ingest", "read_only") == 0.0
            got = [parse_event(b, rk).obsid for rk, _, b in sub.messages(timeout=1.0)]
        finally:
            stop.set()
            if box.get("service") is not None:
                box["service"].stop()
            thread.join(20)
    assert got == [9]
    said = [r.getMessage() for r in caplog.records if "blocked" in r.getMessage()]
    assert len(said) == 1 and str(tiny_fs) in said[0], said
