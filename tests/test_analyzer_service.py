"""The analyzer service (engine v2) on the real broker (own vhost per test), run as processes
(``vison analyzer`` through ``services.tools.stack``) with the small test families of
tests/test_analyzer_support.py (fast frames) and, on full-size frames, the real BIAS01 family:

- live results equal the offline ``vison analyze`` of the same frames (test family + BIAS01);
- a redelivered extraction job, a worker SIGKILLed mid-extraction and mid-solve: exactly one
  distinct ``analysis.completed`` event id per test run, results equal to an undisturbed run;
- a frame unreadable at extraction: ``processing.failed`` naming it, a MISSDATA result;
- declared needs: a dark before its bias waits, then runs; a gain arriving later re-analyses
  the bias (new event id, ``reanalysis`` set);
- a failing solve: ``processing.failed`` + SUBTASKCRASH, the worker lives on;
- ``vison analyzer status``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import test_analyzer_support as support  # noqa: E402

from services.analyzer.coordinator import BINDINGS  # noqa: E402
from services.analyzer.jobs import jobs_queue  # noqa: E402
from services.tools.stack import Stack, free_port  # noqa: E402
from shared.bus import Publisher, Subscription, ensure_queue  # noqa: E402
from shared.config import get_settings  # noqa: E402
from shared.events import AnalysisCompleted, CampaignDefined, ProcessingFailed, TestClose, parse_event  # noqa: E402

pytestmark = pytest.mark.broker


# ----------------------------------------------------------------------------- helpers


@pytest.fixture
def env(vison_env, tmp_path, monkeypatch):
    """The service environment with the test families loaded."""
    extra = {"VISON_ANALYZER_PLUGINS": support.PLUGIN, "VISON_TEST_MARKER": str(tmp_path / "markers")}
    for k, v in extra.items():
        monkeypatch.setenv(k, v)
    get_settings.cache_clear()
    from services.analyzer import registry

    registry.reload()
    yield {**vison_env, **extra}
    registry.reload()


def campaign(block: str, expected: dict[str, int], params: dict[str, dict] | None = None, data_from=None) -> CampaignDefined:
    tests = [{"name": k, "expected_frames": v, "params": (params or {}).get(k), "data_from": (data_from or {}).get(k)}
             for k, v in expected.items()]
    return CampaignDefined(block=block, campaign="test", producer="scriptgen", definition={"tests": tests})


def collect(sub: Subscription, until, timeout: float, settle: float = 2.0) -> list:
    """Events until ``until(events)``, then ``settle`` s more (a duplicate would arrive then)."""
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


def completed(events, test: str | None = None) -> list[AnalysisCompleted]:
    return [e for e in events if isinstance(e, AnalysisCompleted) and (test is None or e.test == test)]


def stack(env: dict, tmp_path: Path, workers: int = 2, services=("analyzer",), extra=None) -> Stack:
    ports = {s: free_port() for s in services}
    args = {"analyzer": ["--workers", str(workers)], **(extra or {})}
    return Stack(list(services), env={**env, "VISON_BLOCK": "BORN"}, ports=ports, log_dir=tmp_path / "logs",
                 restart=False, extra_args=args)


def log_of(tmp_path: Path, name: str = "analyzer") -> str:
    path = tmp_path / "logs" / f"{name}.log"
    return path.read_text(errors="replace")[-8000:] if path.exists() else ""


def offline(data: Path, out: Path, test: str, *args: str) -> dict:
    from services.cli import main

    assert main(["analyze", test, "--data", str(data), "--out", str(out), "--block", "BORN", "--workers", "0",
                 "--no-progress", *args]) == 0
    return support.results_json(out, "BORN", test)


def wait_for(cond, timeout: float, what: str, step: float = 0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def status(env: dict) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "services.cli", "analyzer", "status", "--json"], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


# ----------------------------------------------------------------------------- tests


def test_live_equals_offline_and_redelivered_extraction_changes_nothing(env, tmp_path):
    settings = get_settings()
    data = Path(settings.data_root)
    events_in = support.write_exposures(data, "QMEAN01", [1, 2, 3], seed=1)
    ensure_queue(settings, "analyzer", BINDINGS)
    st = stack(env, tmp_path)
    with Subscription(settings, ["analysis.completed.#", "processing.failed.#"]) as sub, Publisher(settings) as pub:
        st.start()
        try:
            pub.publish(campaign("BORN", {"QMEAN01": 3}))
            for ev in events_in:
                pub.publish(ev)
            events = collect(sub, lambda evs: completed(evs), 120)
            # an extraction job delivered again (same id): answered from the stored output, no new event
            from services.analyzer.store import AnalyzerStore

            store = AnalyzerStore.in_state_dir(settings.state_dir)
            unit = store.units("BORN", "QMEAN01")[0]
            store.close()
            pub.send(jobs_queue(settings), unit["message"].encode(), message_id=unit["job_id"])
            wait_for(lambda: "stored output re-used" in log_of(tmp_path), 60, "the re-delivered job's reply")
            events += collect(sub, lambda evs: False, 0, settle=2)
            rows = status(env)
            import urllib.request

            metrics = urllib.request.urlopen(f"http://127.0.0.1:{st.children[0].port}/metrics", timeout=10).read().decode()
        finally:
            codes = st.stop()
    log = log_of(tmp_path)
    assert codes == {"analyzer": 0}, log
    assert not [e for e in events if isinstance(e, ProcessingFailed)], log
    done = completed(events)
    assert len({e.event_id for e in done}) == 1 and done[0].status == "completed", (done, log)
    ev = done[0]
    assert ev.test == "QMEAN01" and ev.block == "BORN" and ev.obsids == [1, 2, 3] and ev.reanalysis is None
    assert "BORN/QMEAN01/results.json" in ev.products
    doc = support.results_json(Path(settings.products_root), "BORN", "QMEAN01")
    assert doc["results"] == ev.results and doc["provenance"]["job_id"] == ev.provenance["job_id"]
    assert sorted(p.name for p in (Path(settings.products_root) / "BORN/QMEAN01/_extractions/qmean").iterdir()) == \
        ["e1.npz", "e2.npz", "e3.npz"]
    want = offline(data, tmp_path / "offline", "QMEAN01")
    assert want["results"] == ev.results
    assert abs(ev.results["CCD2"]["F"]["mean_adu"] - 1025.0) < 1.0 and ev.results["CCD2"]["F"]["n"] == 3
    row = next(r for r in rows if r["test"] == "QMEAN01")
    assert row["state"] == "completed" and row["event_id"] == str(ev.event_id)
    assert row["exposures"] == 3 and row["expected"] == 3 and row["units"]["done"] == 3
    assert 'vison_analyses_total{status="completed",test="QMEAN01"} 1.0' in metrics
    assert 'vison_analysis_duration_seconds_count{test="QMEAN01"} 1.0' in metrics
    assert 'vison_extraction_seconds_count{family="qmean"} 3.0' in metrics
    assert 'vison_solve_seconds_count{family="qmean"} 1.0' in metrics
    assert 'vison_analyzer_runs{state="completed"} 1.0' in metrics


def test_workers_killed_mid_extraction_and_mid_solve_give_one_result_each(env, tmp_path):
    settings = get_settings()
    data = Path(settings.data_root)
    markers = tmp_path / "markers"
    first = support.write_exposures(data, "QMEAN01", [1, 2], seed=2)
    second = support.write_exposures(data, "QMEAN01.2", [3, 4], seed=3)
    ensure_queue(settings, "analyzer", BINDINGS)
    st = stack(env, tmp_path)
    killed = []

    def kill_first(kind: str) -> int:
        mark = wait_for(lambda: sorted(markers.glob(f"*.{kind}")), 60, f"a worker inside a {kind} job")[0]
        pid = int(mark.name.split(".")[0])
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        return pid

    slow = {"sleep": 1.5}
    with Subscription(settings, ["analysis.completed.#", "processing.failed.#"]) as sub, Publisher(settings) as pub:
        st.start()
        try:
            pub.publish(campaign("BORN", {"QMEAN01": 2, "QMEAN01.2": 2}, {"QMEAN01": slow, "QMEAN01.2": slow}))
            for ev in first:
                pub.publish(ev)
            kill_first("x")
            events = collect(sub, lambda evs: completed(evs), 120)
            for m in markers.glob("*"):
                m.unlink()
            for ev in second:
                pub.publish(ev)
            kill_first("s")
            events += collect(sub, lambda evs: len(completed(evs)) >= 1, 120, settle=3)
        finally:
            codes = st.stop()
    log = log_of(tmp_path)
    assert codes == {"analyzer": 0}, log
    assert not [e for e in events if isinstance(e, ProcessingFailed)], log
    for label, repeat in (("QMEAN01", None), ("QMEAN01.2", 2)):
        mine = [e for e in completed(events) if e.repeat == repeat]
        assert len({e.event_id for e in mine}) == 1 and mine[0].status == "completed", (label, mine, log)
        assert mine[0].flag_names == []
        want = offline(data, tmp_path / "offline", label)
        assert mine[0].results == want["results"], label
    assert all(f"(pid {pid}) exited with code -9; restarting" in log for pid in killed), log


def test_unreadable_frame_gives_processing_failed_and_missdata_result(env, tmp_path):
    settings = get_settings()
    data = Path(settings.data_root)
    events_in = support.write_exposures(data, "QMEAN01", [1, 2, 3], seed=4)
    bad = data / events_in[1].files[1].path
    bad.write_bytes(bad.read_bytes()[:1500])  # truncated after validation
    ensure_queue(settings, "analyzer", BINDINGS)
    st = stack(env, tmp_path, workers=1)
    with Subscription(settings, ["analysis.completed.#", "processing.failed.#"]) as sub, Publisher(settings) as pub:
        st.start()
        try:
            pub.publish(campaign("BORN", {"QMEAN01": 3}))
            for ev in events_in:
                pub.publish(ev)
            events = collect(sub, lambda evs: completed(evs), 120)
        finally:
            codes = st.stop()
    log = log_of(tmp_path)
    assert codes == {"analyzer": 0}, log
    failed = [e for e in events if isinstance(e, ProcessingFailed)]
    assert len(failed) == 1, (events, log)
    assert failed[0].where == events_in[1].files[1].path and bad.name in failed[0].why and failed[0].test == "QMEAN01"
    done = completed(events)
    assert len(done) == 1 and done[0].status == "completed"
    assert "MISSDATA" in done[0].flag_names and done[0].results["CCD1"]["E"]["n"] == 2
    assert done[0].obsids == [1, 3]
    doc = support.results_json(Path(settings.products_root), "BORN", "QMEAN01")
    assert any(bad.name in n for n in doc["notes"])


def test_needs_wait_then_run_and_late_gain_reanalyses(env, tmp_path):
    settings = get_settings()
    data = Path(settings.data_root)
    dark = support.write_exposures(data, "TDARK01", [1, 2], level=1100.0, seed=5)
    bias = support.write_exposures(data, "TBIAS01", [3, 4], level=1000.0, seed=6)
    ptc = support.write_exposures(data, "TPTC01", [5], level=3000.0, seed=7)
    ensure_queue(settings, "analyzer", BINDINGS)
    st = stack(env, tmp_path)
    with Subscription(settings, ["analysis.completed.#", "processing.failed.#"]) as sub, Publisher(settings) as pub:
        st.start()
        try:
            pub.publish(campaign("BORN", {"TDARK01": 2, "TBIAS01": 2, "TPTC01": 1}, {"TPTC01": {"gain": 3.0}}))
            for ev in dark:
                pub.publish(ev)
            waiting = wait_for(lambda: [r for r in status(env) if r["test"] == "TDARK01" and r["state"] == "waiting"],
                               60, "TDARK01 waiting for its master bias", step=0.5)
            assert waiting[0]["waiting"] == ["master_bias"] and waiting[0]["waiting_since"]
            import urllib.request

            gauge = 'vison_analyzer_waiting_needs{block="BORN",need="master_bias",test="TDARK01"} 1.0'
            wait_for(lambda: gauge in urllib.request.urlopen(f"http://127.0.0.1:{st.children[0].port}/metrics",
                                                             timeout=10).read().decode(), 30, "the waiting-needs gauge", step=0.5)
            events = collect(sub, lambda evs: False, 0, settle=1)
            assert not completed(events)  # the dark waits
            for ev in bias:
                pub.publish(ev)
            events += collect(sub, lambda evs: len(completed(evs)) >= 2, 120)
            for ev in ptc:
                pub.publish(ev)
            events += collect(sub, lambda evs: len(completed(evs)) >= 5, 120, settle=3)
        finally:
            codes = st.stop()
    log = log_of(tmp_path)
    assert codes == {"analyzer": 0}, log
    assert not [e for e in events if isinstance(e, ProcessingFailed)], log
    biases, darks, ptcs = completed(events, "TBIAS01"), completed(events, "TDARK01"), completed(events, "TPTC01")
    assert len(ptcs) == 1 and len(biases) == 2 and len(darks) == 2, ([(e.test, e.reanalysis) for e in completed(events)], log)
    b0, b1 = biases
    assert b0.reanalysis is None and b0.results["CCD1"]["E"]["mean_e"] is None
    assert b1.event_id != b0.event_id and b1.reanalysis is not None and b1.reanalysis.of == b0.event_id
    assert "gain" in b1.reanalysis.reason and "TPTC01" in b1.reanalysis.reason
    assert b1.results["CCD1"]["E"]["mean_e"] == pytest.approx(3.0 * b1.results["CCD1"]["E"]["mean_adu"])
    assert [c.name for c in b1.calibrations] == ["gain"] and b1.calibrations[0].event_id == str(ptcs[0].event_id)
    d0, d1 = darks
    assert d0.reanalysis is None and d1.reanalysis.of == d0.event_id
    dark_adu = d0.results["CCD1"]["E"]["dark_adu"]
    assert dark_adu == pytest.approx(d0.results["CCD1"]["E"]["mean_adu"] - b0.results["CCD1"]["E"]["mean_adu"])
    assert 95 < dark_adu < 105 and "MISSDATA" not in d0.flag_names
    assert {c.name for c in d0.calibrations} == {"master_bias"} and d0.calibrations[0].event_id == str(b0.event_id)
    assert d1.results["CCD1"]["E"]["mean_e"] == pytest.approx(3.0 * d1.results["CCD1"]["E"]["mean_adu"])


def test_wait_need_times_out_and_runs_flagged(env, tmp_path):
    settings = get_settings()
    data = Path(settings.data_root)
    dark = support.write_exposures(data, "TDARK01", [1], level=1100.0, seed=8)
    env = {**env, "VISON_CALIB_WAIT_S": "2"}
    ensure_queue(settings, "analyzer", BINDINGS)
    st = stack(env, tmp_path, workers=1)
    with Subscription(settings, ["analysis.completed.#"]) as sub, Publisher(settings) as pub:
        st.start()
        try:
            pub.publish(campaign("BORN", {"TDARK01": 1}))
            pub.publish(dark[0])
            events = collect(sub, lambda evs: completed(evs), 60)
        finally:
            codes = st.stop()
    assert codes == {"analyzer": 0}
    done = completed(events)
    assert len(done) == 1 and "MISSDATA" in done[0].flag_names and done[0].results["CCD1"]["E"]["dark_adu"] is None
    doc = support.results_json(Path(settings.products_root), "BORN", "TDARK01")
    assert any("master_bias" in n and "analysed without it" in n for n in doc["notes"])


def test_failing_solve_publishes_processing_failed_and_worker_lives_on(env, tmp_path):
    settings = get_settings()
    data = Path(settings.data_root)
    a = support.write_exposures(data, "QMEAN01", [1], seed=9)
    b = support.write_exposures(data, "QMEAN01.2", [2], seed=10)
    bad = data / a[0].files[0].path
    for ev in a:  # every frame unreadable: no extraction, the solve fails
        for f in ev.files:
            (data / f.path).unlink()
    ensure_queue(settings, "analyzer", BINDINGS)
    st = stack(env, tmp_path, workers=1)
    with Subscription(settings, ["analysis.completed.#", "processing.failed.#"]) as sub, Publisher(settings) as pub:
        st.start()
        try:
            pub.publish(campaign("BORN", {"QMEAN01": 1, "QMEAN01.2": 1}))
            for ev in a + b:
                pub.publish(ev)
            events = collect(sub, lambda evs: len(completed(evs)) >= 2, 120)
        finally:
            codes = st.stop()
    log = log_of(tmp_path)
    assert codes == {"analyzer": 0}, log
    by = {e.repeat: e for e in completed(events)}
    assert set(by) == {None, 2}, log
    assert by[None].status == "failed" and "SUBTASKCRASH" in by[None].flag_names and "no extraction" in by[None].error
    assert by[2].status == "completed"
    failed = [e for e in events if isinstance(e, ProcessingFailed)]
    assert any(e.what == "fits" and bad.name in e.why for e in failed)
    assert any(e.what == "analysis" and "SUBTASKCRASH" in e.details["flag_names"] for e in failed)
    assert log.count("worker 0 started") == 1  # never restarted


def test_test_close_solves_a_run_without_expected_count(env, tmp_path):
    settings = get_settings()
    data = Path(settings.data_root)
    evs = support.write_exposures(data, "QMEAN01", [1, 2, 3], seed=11)
    ensure_queue(settings, "analyzer", BINDINGS)
    st = stack(env, tmp_path, workers=1)
    with Subscription(settings, ["analysis.completed.#"]) as sub, Publisher(settings) as pub:
        st.start()
        try:
            for ev in evs[:2]:  # no campaign definition and no catalogue entry: only test.close completes it
                pub.publish(ev)
            assert not completed(collect(sub, lambda e: False, 0, settle=2))
            pub.publish(TestClose(test="QMEAN01", block="BORN", operator="jdoe", producer="tool"))
            events = collect(sub, lambda e: completed(e), 60)
            # a late exposure, closed again: solved again with it (close before its extraction ends)
            pub.publish(evs[2])
            pub.publish(TestClose(test="QMEAN01", block="BORN", operator="jdoe", producer="tool"))
            events += collect(sub, lambda e: completed(e), 60)
            pub.publish(TestClose(test="QMEAN01", block="BORN", operator="jdoe", producer="tool"))  # nothing new
            events += collect(sub, lambda e: False, 0, settle=3)
        finally:
            codes = st.stop()
    assert codes == {"analyzer": 0}
    done = completed(events)
    assert len(done) == 2 and done[0].obsids == [1, 2] and done[0].status == "completed", done
    assert done[1].obsids == [1, 2, 3] and done[1].reanalysis.of == done[0].event_id and "closed" in done[1].reanalysis.reason


def _validated_from_logs(data_root: Path, block: str = "BORN") -> list:
    """exposure.validated events of every ObsID of a data folder (as the validator publishes them)."""
    import hashlib

    from shared.events import ExposureValidated, FileRef
    from shared.explog import merge_explogs, read_explog

    rows = merge_explogs([read_explog(p, complete=True) for p in sorted(data_root.rglob("EXP_LOG_*.txt"))]).rows
    out = []
    for obsid in sorted({r.obsid for r in rows}):
        mine = [r for r in rows if r.obsid == obsid]
        files = []
        for r in mine:
            path = next(data_root.rglob(f"{r.file_name}.fits"))
            blob = path.read_bytes()
            files.append(FileRef(ccd=r.ccd, path=path.relative_to(data_root).as_posix(), sha256=hashlib.sha256(blob).hexdigest(),
                                 size=len(blob)))
        out.append(ExposureValidated(obsid=obsid, block=block, test=mine[0].test, files=files,
                                     explog=[{**r.values, "ccd": r.ccd} for r in mine], passed=True, flags=0, flag_names=[],
                                     compliance={}, stats={}, producer="validator"))
    return out


@pytest.mark.fullsize
def test_bias01_live_equals_offline_on_fullsize_frames(env, tmp_path):
    """The real BIAS01 family: extraction per exposure on the workers, the solve (master bias
    stacked band by band) on one; the same results as ``vison analyze``."""
    settings = get_settings()
    data = Path(settings.data_root)
    out = subprocess.run([sys.executable, "-m", "services.cli", "sim", "--out", str(data), "--block", "BORN", "--seed", "41",
                          "--test", "BIAS01", "--frames", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    truth = json.loads((data / "truth.json").read_text())
    events_in = _validated_from_logs(data)
    ensure_queue(settings, "analyzer", BINDINGS)
    st = stack(env, tmp_path, workers=2)
    with Subscription(settings, ["analysis.completed.#", "processing.failed.#"]) as sub, Publisher(settings) as pub:
        st.start()
        try:
            pub.publish(campaign("BORN", {"BIAS01": 2}))
            for ev in events_in:
                pub.publish(ev)
            events = collect(sub, lambda evs: completed(evs), 240)
        finally:
            codes = st.stop()
    log = log_of(tmp_path)
    assert codes == {"analyzer": 0}, log
    assert not [e for e in events if isinstance(e, ProcessingFailed)], log
    done = completed(events)
    assert len({e.event_id for e in done}) == 1 and done[0].status == "completed", (done, log)
    ev = done[0]
    assert "BORN/BIAS01/master_bias_CCD1.fits" in ev.products and ev.obsids == [1, 2]
    for q in ("E", "F", "G", "H"):
        v, t = ev.results["CCD2"][q], truth["ccds"]["CCD2"]["quadrants"][q]
        assert abs(v["offset_pre"] - t["offset_adu"]) < 0.05 and abs(v["ron_img_adu"] / t["ron_adu"] - 1) < 0.02
    want = offline(data, tmp_path / "offline", "BIAS01", "--no-figures", "--expected", "2")
    assert want["results"] == ev.results
