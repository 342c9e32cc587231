"""The analyzer service on the real broker (own vhost per test), run as a process (``vison
analyzer`` through ``services.tools.stack``): a simulated BIAS01 played as ``exposure.validated``
events yields exactly one ``analysis.completed.BIAS01`` and its products; a worker killed
(SIGKILL) mid-analysis still gives exactly one result; a failing analysis publishes
``processing.failed`` + SUBTASKCRASH and the worker lives on; the real chain ingest -> validator
-> analyzer."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from services.analyzer.collector import BINDINGS
from services.tools.stack import Stack, free_port
from shared.bus import Publisher, Subscription, ensure_queue
from shared.config import get_settings
from shared.events import AnalysisCompleted, CampaignDefined, ExposureValidated, FileRef, ProcessingFailed, parse_event
from shared.explog import merge_explogs, read_explog
from shared.geometry import QUADRANTS

pytestmark = pytest.mark.broker


# ----------------------------------------------------------------------------- helpers


def _sim(data: Path, test: str, frames: int, seed: int, *extra: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "services.cli", "sim", "--out", str(data), "--block", "BORN", "--seed",
                          str(seed), "--test", test, "--frames", str(frames), *extra],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads((data / "truth.json").read_text())


def _validated(data_root: Path, block: str = "BORN", test: str | None = None) -> list[ExposureValidated]:
    """One exposure.validated event per ObsID of the data folder, as the validator publishes them
    (files relative to the data root with their SHA-256, exposure-log rows)."""
    logs = sorted(data_root.rglob("EXP_LOG_*.txt"))
    rows = merge_explogs([read_explog(p, complete=True) for p in logs]).rows
    events = []
    for obsid in sorted({r.obsid for r in rows}):
        mine = [r for r in rows if r.obsid == obsid]
        files = []
        for r in mine:
            path = next(data_root.rglob(f"{r.file_name}.fits"))
            blob = path.read_bytes()
            files.append(FileRef(ccd=r.ccd, path=path.relative_to(data_root).as_posix(),
                                 sha256=hashlib.sha256(blob).hexdigest(), size=len(blob)))
        events.append(ExposureValidated(obsid=obsid, block=block, test=test or mine[0].test, files=files,
                                        explog=[{**r.values, "ccd": r.ccd} for r in mine], passed=True, flags=0,
                                        flag_names=[], compliance={}, stats={}, producer="validator"))
    return events


def _campaign(block: str, expected: dict[str, int]) -> CampaignDefined:
    return CampaignDefined(block=block, campaign="test", producer="scriptgen",
                           definition={"tests": [{"name": k, "expected_frames": v} for k, v in expected.items()]})


def _collect(sub: Subscription, until, timeout: float, settle: float = 3.0) -> list:
    """Events from the subscription until ``until(events)`` is true, then ``settle`` s more
    (anything extra, e.g. a duplicate, would arrive then)."""
    events: list = []
    end = time.monotonic() + timeout
    while time.monotonic() < end and not until(events):
        for rk, _, body in sub.messages(timeout=0.5):
            events.append(parse_event(body, rk))
    end = time.monotonic() + settle
    while time.monotonic() < end:
        for rk, _, body in sub.messages(timeout=0.5):
            events.append(parse_event(body, rk))
    return events


def _jobs(state_dir: Path) -> list[dict]:
    path = state_dir / "analyzer.sqlite"
    if not path.exists():
        return []
    con = sqlite3.connect(str(path), timeout=10)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM jobs ORDER BY created_at")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


def _stack(vison_env: dict, tmp_path: Path, workers: int, services=("analyzer",), extra=None) -> tuple[Stack, dict]:
    ports = {s: free_port() for s in services}
    args = {"analyzer": ["--workers", str(workers)], **(extra or {})}
    return Stack(list(services), env={**vison_env, "VISON_BLOCK": "BORN"}, ports=ports, log_dir=tmp_path / "logs",
                 restart=False, extra_args=args), ports


def _log(tmp_path: Path, name: str = "analyzer") -> str:
    path = tmp_path / "logs" / f"{name}.log"
    return path.read_text(errors="replace")[-6000:] if path.exists() else ""


# ----------------------------------------------------------------------------- tests


@pytest.mark.fullsize
def test_simulated_bias01_yields_one_completed_analysis_with_products(vison_env, tmp_path):
    settings = get_settings()
    data, products = Path(settings.data_root), Path(settings.products_root)
    truth = _sim(data, "BIAS01", 1, 41)
    events_in = _validated(data)
    ensure_queue(settings, "analyzer", BINDINGS)
    stack, ports = _stack(vison_env, tmp_path, workers=1)
    with Subscription(settings, ["analysis.completed.#", "processing.failed.#"]) as sub, Publisher(settings) as pub:
        stack.start()
        try:
            pub.publish(_campaign("BORN", {"BIAS01": 1}))
            for ev in events_in:
                pub.publish(ev)
            # the same exposure again (new event id, as after an ingest restart): no second job
            pub.publish(events_in[0].model_copy(update={"event_id": uuid.uuid4()}))
            events = _collect(sub, lambda evs: any(isinstance(e, AnalysisCompleted) for e in evs), 180, settle=2)
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports['analyzer']}/metrics", timeout=10).read().decode()
        finally:
            codes = stack.stop()
    log = _log(tmp_path)
    assert codes == {"analyzer": 0}, log
    assert not [e for e in events if isinstance(e, ProcessingFailed)], log
    done = [e for e in events if isinstance(e, AnalysisCompleted)]
    assert len(done) == 1, (done, log)
    ev = done[0]
    assert ev.routing_key() == "analysis.completed.BIAS01.BORN" and ev.status == "completed"
    assert ev.test == "BIAS01" and ev.block == "BORN" and ev.obsids == [1] and ev.producer == "analyzer"
    for ccd in ("CCD1", "CCD2", "CCD3"):
        for q in QUADRANTS:
            v, t = ev.results[ccd][q], truth["ccds"][ccd]["quadrants"][q]
            assert abs(v["offset_pre"] - t["offset_adu"]) < 0.05 and abs(v["ron_img_adu"] / t["ron_adu"] - 1) < 0.02
    assert "BORN/BIAS01/results.json" in ev.products and "BORN/BIAS01/master_bias_CCD1.fits" in ev.products
    assert all((products / p).is_file() for p in ev.products)
    doc = json.loads((products / "BORN" / "BIAS01" / "results.json").read_text())
    assert doc["status"] == "completed" and doc["provenance"]["job_id"] == ev.provenance["job_id"]
    jobs = _jobs(Path(settings.state_dir))
    assert [(j["test"], j["status"], j["reason"], j["attempts"]) for j in jobs] == [("BIAS01", "completed", "complete", 1)]
    assert 'vison_analyses_total{status="completed",test="BIAS01"} 1.0' in metrics
    assert 'vison_analysis_duration_seconds_count{test="BIAS01"} 1.0' in metrics


@pytest.mark.fullsize
def test_worker_killed_mid_analysis_gives_exactly_one_result(vison_env, tmp_path):
    settings = get_settings()
    data, products = Path(settings.data_root), Path(settings.products_root)
    _sim(data, "BIAS01", 1, 42)
    events_in = _validated(data)
    ensure_queue(settings, "analyzer", BINDINGS)
    stack, _ = _stack(vison_env, tmp_path, workers=2)
    killed = None
    with Subscription(settings, ["analysis.completed.#", "processing.failed.#"]) as sub, Publisher(settings) as pub:
        stack.start()
        try:
            pub.publish(_campaign("BORN", {"BIAS01": 1}))
            for ev in events_in:
                pub.publish(ev)
            # wait until a worker is inside the analysis (first CCD's master bias written), then SIGKILL it
            end = time.monotonic() + 120
            first_product = products / "BORN" / "BIAS01" / "master_bias_CCD1.fits"
            while time.monotonic() < end and killed is None:
                running = [j for j in _jobs(Path(settings.state_dir)) if j["status"] == "running"]
                if running and first_product.exists():
                    killed = int(running[0]["owner"].split(":")[1])
                    os.kill(killed, signal.SIGKILL)
                time.sleep(0.05)
            assert killed is not None, _log(tmp_path)
            events = _collect(sub, lambda evs: any(isinstance(e, AnalysisCompleted) for e in evs), 180, settle=5)
        finally:
            codes = stack.stop()
    log = _log(tmp_path)
    assert codes == {"analyzer": 0}, log
    done = [e for e in events if isinstance(e, AnalysisCompleted)]
    assert len(done) == 1 and done[0].status == "completed", (done, log)
    assert not [e for e in events if isinstance(e, ProcessingFailed)], log
    jobs = _jobs(Path(settings.state_dir))
    assert len(jobs) == 1 and jobs[0]["status"] == "completed"
    assert jobs[0]["attempts"] == 2  # the killed run and the one that completed
    assert int(jobs[0]["owner"].split(":")[1]) != killed
    assert f"(pid {killed}) exited with code -9; restarting" in log
    assert json.loads((products / "BORN" / "BIAS01" / "results.json").read_text())["status"] == "completed"


@pytest.mark.fullsize
def test_service_stopped_mid_analysis_and_restarted_gives_one_result(vison_env, tmp_path):
    """SIGTERM to the analyzer during an analysis: the job goes back to the queue (attempt not
    counted); the restarted service (same state dir) runs it once; nothing is enqueued twice."""
    settings = get_settings()
    data, products = Path(settings.data_root), Path(settings.products_root)
    _sim(data, "BIAS01", 1, 44)
    events_in = _validated(data)
    ensure_queue(settings, "analyzer", BINDINGS)
    with Subscription(settings, ["analysis.completed.#", "processing.failed.#"]) as sub, Publisher(settings) as pub:
        first, _ = _stack(vison_env, tmp_path, workers=1)
        first.start()
        try:
            pub.publish(_campaign("BORN", {"BIAS01": 1}))
            for ev in events_in:
                pub.publish(ev)
            end = time.monotonic() + 120
            first_product = products / "BORN" / "BIAS01" / "master_bias_CCD1.fits"
            while time.monotonic() < end and not first_product.exists():
                time.sleep(0.05)
            assert first_product.exists(), _log(tmp_path)
        finally:
            codes = first.stop()
        assert codes == {"analyzer": 0}, _log(tmp_path)
        jobs = _jobs(Path(settings.state_dir))
        assert [(j["status"], j["attempts"]) for j in jobs] == [("queued", 0)], jobs
        early = [parse_event(b, rk) for rk, _, b in sub.messages(timeout=0.5)]
        second, _ = _stack(vison_env, tmp_path, workers=1)
        second.start()
        try:
            events = early + _collect(sub, lambda evs: any(isinstance(e, AnalysisCompleted) for e in evs), 180, settle=2)
        finally:
            codes = second.stop()
    log = _log(tmp_path)
    assert codes == {"analyzer": 0}, log
    done = [e for e in events if isinstance(e, AnalysisCompleted)]
    assert len(done) == 1 and done[0].status == "completed", (events, log)
    jobs = _jobs(Path(settings.state_dir))
    assert [(j["status"], j["attempts"]) for j in jobs] == [("completed", 1)]
    assert "goes back to the queue" in log


def test_failed_analysis_publishes_processing_failed_and_worker_lives_on(vison_env, tmp_path):
    """DARK01 frames without exposure time cannot be analysed: processing.failed with the
    traceback summary, analysis.completed status failed + SUBTASKCRASH, results.json failed;
    the same worker then takes the next job (DARK01.2)."""
    settings = get_settings()
    data = Path(settings.data_root)
    events_in = []
    for obsid, label in ((1, "DARK01"), (2, "DARK01.2")):
        files, rows = [], []
        for ccd in (1, 2, 3):
            path = data / "011125" / f"EUC_{obsid}_011125D120000T_ROE1_CCD{ccd}.fits"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not really a frame")  # never read: the analysis fails on its metadata
            files.append(FileRef(ccd=ccd, path=path.relative_to(data).as_posix(),
                                 sha256=hashlib.sha256(path.read_bytes()).hexdigest(), size=path.stat().st_size))
            rows.append({"ccd": ccd, "exptime": 0.0, "test": label})
        events_in.append(ExposureValidated(obsid=obsid, block="BORN", test=label, files=files, explog=rows, passed=True,
                                           flags=0, flag_names=[], compliance={}, stats={}, producer="validator"))
    ensure_queue(settings, "analyzer", BINDINGS)
    stack, _ = _stack(vison_env, tmp_path, workers=1)
    with Subscription(settings, ["analysis.completed.#", "processing.failed.#"]) as sub, Publisher(settings) as pub:
        stack.start()
        try:
            pub.publish(_campaign("BORN", {"DARK01": 1, "DARK01.2": 1}))
            for ev in events_in:
                pub.publish(ev)
            events = _collect(sub, lambda evs: sum(isinstance(e, AnalysisCompleted) for e in evs) >= 2, 120, settle=2)
        finally:
            codes = stack.stop()
    log = _log(tmp_path)
    assert codes == {"analyzer": 0}, log
    failed = [e for e in events if isinstance(e, ProcessingFailed)]
    done = [e for e in events if isinstance(e, AnalysisCompleted)]
    assert len(failed) == 2 and len(done) == 2, (events, log)
    for f in failed:
        assert f.what == "analysis" and f.block == "BORN" and "dark frames without a positive exptime" in f.why
        assert "SUBTASKCRASH" in f.details["flag_names"] and "run_test" in f.details["traceback"]
    assert {d.repeat for d in done} == {None, 2} and {d.status for d in done} == {"failed"}
    assert all(d.flag_names == ["SUBTASKCRASH"] and d.error for d in done)
    doc = json.loads((Path(settings.products_root) / "BORN" / "DARK01.2" / "results.json").read_text())
    assert doc["status"] == "failed" and "SUBTASKCRASH" in doc["flag_names"] and doc["traceback"]
    jobs = _jobs(Path(settings.state_dir))
    assert [j["status"] for j in jobs] == ["failed", "failed"]
    owners = {j["owner"] for j in jobs}
    assert len(owners) == 1  # one worker (no restart) handled both


@pytest.mark.fullsize
def test_real_chain_ingest_validator_analyzer(vison_env, tmp_path):
    """The simulator writes BIAS01 into the watched folder; ingest and validator (processes)
    publish the validated exposures; the analyzer analyses the complete test once."""
    settings = get_settings()
    data, products = Path(settings.data_root), Path(settings.products_root)
    fast_ingest = ["--rescan-interval", "1", "--stable-seconds", "0.2", "--incomplete-timeout", "10", "--exposure-timeout", "20"]
    ensure_queue(settings, "analyzer", BINDINGS)
    stack, _ = _stack(vison_env, tmp_path, workers=1, services=("ingest", "validator", "analyzer"),
                      extra={"ingest": fast_ingest})
    with Subscription(settings, ["analysis.completed.#", "processing.failed.#", "exposure.validated.#"]) as sub, \
            Publisher(settings) as pub:
        pub.publish(_campaign("BORN", {"BIAS01": 1}))
        stack.start()
        try:
            truth = _sim(data, "BIAS01", 1, 43, "--atomic")
            events = _collect(sub, lambda evs: any(isinstance(e, AnalysisCompleted) for e in evs), 240, settle=3)
        finally:
            codes = stack.stop()
    logs = {n: _log(tmp_path, n) for n in ("ingest", "validator", "analyzer")}
    assert codes == {"ingest": 0, "validator": 0, "analyzer": 0}, logs
    assert [e.obsid for e in events if isinstance(e, ExposureValidated)] == [1], logs
    done = [e for e in events if isinstance(e, AnalysisCompleted)]
    assert len(done) == 1 and done[0].status == "completed" and done[0].obsids == [1], (done, logs["analyzer"])
    v, t = done[0].results["CCD2"]["G"], truth["ccds"]["CCD2"]["quadrants"]["G"]
    assert abs(v["offset_img"] - t["offset_adu"]) < 0.05 and abs(v["ron_img_adu"] / t["ron_adu"] - 1) < 0.02
    assert (products / "BORN" / "BIAS01" / "master_bias_CCD3.fits").is_file()
