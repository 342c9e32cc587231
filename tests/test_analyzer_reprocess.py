"""``vison reprocess`` on the real broker: a small simulated campaign (test families, fast
frames) analysed live, then reprocessed by two ``vison analyzer --no-collector`` processes into a
fresh products root: the same results (and, the inputs being unchanged, the same event ids); a
second reprocess recomputes nothing and publishes no new event id."""

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
from test_analyzer_service import campaign, collect, completed, env, log_of, stack, wait_for  # noqa: E402,F401

from services.analyzer.coordinator import BINDINGS  # noqa: E402
from shared.bus import Publisher, Subscription, ensure_queue  # noqa: E402
from shared.config import get_settings  # noqa: E402
from shared.events import AnalysisCompleted  # noqa: E402

pytestmark = pytest.mark.broker


def _workers(env: dict, tmp_path: Path, n: int = 2) -> list[subprocess.Popen]:
    procs = []
    for i in range(n):
        out = open(tmp_path / f"worker{i}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "services.cli", "analyzer", "--no-collector", "--workers", "1"],
                                      env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT))
    return procs


def _stop(procs: list[subprocess.Popen]) -> list[int]:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    return [p.wait(60) for p in procs]


def _reprocess(env: dict, data: Path, definition: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "reprocess", "--data", str(data), "--block", "BORN",
                           "--campaign", str(definition), "--timeout", "240", "--no-progress"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def _final(events: list) -> dict[str, AnalysisCompleted]:
    out: dict[str, AnalysisCompleted] = {}
    for e in completed(events):
        out[e.test] = e  # the last one (a re-analysis supersedes)
    return out


def test_reprocess_reproduces_live_results_and_a_second_run_publishes_nothing_new(env, tmp_path):
    settings = get_settings()
    data = Path(settings.data_root)
    ptc = support.write_exposures(data, "TPTC01", [1], level=3000.0, seed=21)
    bias = support.write_exposures(data, "TBIAS01", [2, 3], level=1000.0, seed=22)
    qmean = support.write_exposures(data, "QMEAN01", [4, 5, 6], seed=23)
    ensure_queue(settings, "analyzer", BINDINGS)
    st = stack(env, tmp_path, workers=2)
    with Subscription(settings, ["analysis.completed.#"]) as sub, Publisher(settings) as pub:
        st.start()
        try:
            defined = campaign("BORN", {"TPTC01": 1, "TBIAS01": 2, "QMEAN01": 3}, {"TPTC01": {"gain": 3.0}})
            definition = tmp_path / "campaign.json"
            definition.write_text(json.dumps(defined.definition))
            pub.publish(defined)
            pub.publish(ptc[0])
            live = collect(sub, lambda evs: completed(evs), 120, settle=0)
            for ev in bias + qmean:
                pub.publish(ev)
            live += collect(sub, lambda evs: len(completed(evs)) >= 2, 120, settle=2)
        finally:
            assert st.stop() == {"analyzer": 0}, log_of(tmp_path)
    live_final = _final(live)
    assert set(live_final) == {"TPTC01", "TBIAS01", "QMEAN01"} and len(completed(live)) == 3
    assert live_final["TBIAS01"].results["CCD1"]["E"]["mean_e"] is not None  # the gain was there

    fresh = {**env, "VISON_PRODUCTS_ROOT": str(tmp_path / "products2"), "VISON_STATE_DIR": str(tmp_path / "state2")}
    workers = _workers(fresh, tmp_path)
    try:
        for i in range(2):  # both consuming before the jobs come (else one may take them all)
            wait_for(lambda: "[long jobs]" in (tmp_path / f"worker{i}.log").read_text(), 120, f"worker {i} consuming")
        with Subscription(settings, ["analysis.completed.#"]) as sub:
            first = _reprocess(fresh, data, definition)
            assert first.returncode == 0, first.stdout + first.stderr
            events1 = collect(sub, lambda evs: False, 0, settle=2)
            second = _reprocess(fresh, data, definition)
            assert second.returncode == 0, second.stdout + second.stderr
            events2 = collect(sub, lambda evs: False, 0, settle=2)
    finally:
        codes = _stop(workers)
    logs = "".join((tmp_path / f"worker{i}.log").read_text() for i in range(2))
    assert codes == [0, 0], logs
    assert "completed in" in (tmp_path / "worker0.log").read_text() and "completed in" in (tmp_path / "worker1.log").read_text()
    final1 = _final(events1)
    assert set(final1) == set(live_final), first.stdout
    for test, ev in live_final.items():
        assert final1[test].results == ev.results, test
        assert final1[test].provenance["reprocess"] and final1[test].event_id == ev.event_id
    assert (tmp_path / "products2" / "BORN" / "QMEAN01" / "results.json").is_file()
    ids1 = {e.event_id for e in completed(events1)}
    ids2 = {e.event_id for e in completed(events2)}
    assert ids2 <= ids1, second.stdout  # nothing new
    assert all(e.provenance["reused"] for e in completed(events2) if e.test == "QMEAN01")
    assert _final(events2)["QMEAN01"].results == live_final["QMEAN01"].results
