"""Analyzer faults on the real broker: a malformed job is dead-lettered (standard headers,
``processing.failed``) and the worker lives on; the whole analyzer stopped (SIGTERM) while a
solve runs and started again gives exactly one result (the reply waits in the durable
``<prefix>.analyzer.done`` queue; nothing is queued twice)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import test_analyzer_support as support  # noqa: E402
from test_analyzer_service import campaign, collect, completed, env, log_of, stack, wait_for  # noqa: E402,F401

from services.analyzer.coordinator import BINDINGS  # noqa: E402
from services.analyzer.jobs import jobs_queue  # noqa: E402
from shared.bus import Publisher, Subscription, dead_letters, ensure_queue  # noqa: E402
from shared.config import get_settings  # noqa: E402
from shared.events import ProcessingFailed  # noqa: E402

pytestmark = pytest.mark.broker


def test_malformed_job_is_dead_lettered_and_the_worker_lives_on(env, tmp_path):
    settings = get_settings()
    evs = support.write_exposures(Path(settings.data_root), "QMEAN01", [1], seed=31)
    ensure_queue(settings, "analyzer", BINDINGS)
    st = stack(env, tmp_path, workers=1)
    with Subscription(settings, ["analysis.completed.#", "processing.failed.#"]) as sub, Publisher(settings) as pub:
        st.start()
        try:
            pub.send(jobs_queue(settings), b'{"kind": "extract", "job_id": 5}', message_id="bad-1")
            pub.send(jobs_queue(settings), b"not json", message_id="bad-2")
            pub.publish(campaign("BORN", {"QMEAN01": 1}))
            pub.publish(evs[0])
            events = collect(sub, lambda e: completed(e) and sum(isinstance(x, ProcessingFailed) for x in e) >= 2, 120)
        finally:
            codes = st.stop()
    log = log_of(tmp_path)
    assert codes == {"analyzer": 0}, log
    assert len(completed(events)) == 1 and completed(events)[0].status == "completed"
    failed = [e for e in events if isinstance(e, ProcessingFailed)]
    assert len(failed) == 2 and all(jobs_queue(settings) in e.where for e in failed), failed
    dead = dead_letters(settings)
    assert sorted(b for _, _, b in dead) == sorted([b'{"kind": "extract", "job_id": 5}', b"not json"])
    for _, headers, _ in dead:
        assert headers["x-vison-queue"] == jobs_queue(settings) and headers["x-vison-service"] == "analyzer"
        assert "malformed analyzer job" in headers["x-vison-reason"]
    assert log.count("worker 0 started") == 1


def test_analyzer_stopped_during_a_solve_and_restarted_gives_one_result(env, tmp_path):
    settings = get_settings()
    evs = support.write_exposures(Path(settings.data_root), "QMEAN01", [1, 2], seed=32)
    markers = tmp_path / "markers"
    ensure_queue(settings, "analyzer", BINDINGS)
    with Subscription(settings, ["analysis.completed.#", "processing.failed.#"]) as sub, Publisher(settings) as pub:
        first = stack(env, tmp_path, workers=1)
        first.start()
        try:
            pub.publish(campaign("BORN", {"QMEAN01": 2}, {"QMEAN01": {"sleep": 1.0}}))
            for ev in evs:
                pub.publish(ev)
            wait_for(lambda: list(markers.glob("*.s")), 90, "the solve to start")
        finally:
            assert first.stop() == {"analyzer": 0}, log_of(tmp_path)
        early = collect(sub, lambda e: False, 0, settle=1)
        second = stack(env, tmp_path, workers=1)
        second.start()
        try:
            events = early + collect(sub, lambda e: completed(e), 120, settle=3)
        finally:
            assert second.stop() == {"analyzer": 0}, log_of(tmp_path)
    done = completed(events)
    assert len({e.event_id for e in done}) == 1 and done[0].status == "completed", (events, log_of(tmp_path))
    assert not [e for e in events if isinstance(e, ProcessingFailed)]
    assert done[0].results["CCD3"]["H"]["n"] == 2
    doc = json.loads((Path(settings.products_root) / "BORN/QMEAN01/results.json").read_text())
    assert doc["provenance"]["job_id"] == done[0].provenance["job_id"]


@pytest.mark.broker
def test_workers_of_a_killed_analyzer_do_not_linger(vison_env, tmp_path):
    """SIGKILL of the analyzer's main process: its worker processes notice that their parent is
    gone and stop (before the fix they were re-parented to init and kept taking jobs, doubling
    the consumers after each restart)."""
    import os
    import signal
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "analyzer", "--no-collector", "--workers", "1"],
                            env={**os.environ, **vison_env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        children: list[int] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not children:
            try:
                children = [int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
            except OSError:
                pass
            time.sleep(0.2)
        assert children, "the analyzer started no worker process"
        time.sleep(3)  # the worker imports and connects
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 60
        alive = list(children)
        while alive and time.monotonic() < deadline:
            alive = [c for c in alive if Path(f"/proc/{c}").exists() and "Z" not in Path(f"/proc/{c}/stat").read_text().split()[2]]
            time.sleep(0.5)
        assert not alive, f"orphaned workers still running: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
