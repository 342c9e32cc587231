"""End to end on the real broker: the simulator writes frames into the watched folder, ingest and
validator run as processes (``vison stack``), and every exposure comes back validated once with
the injected offsets and noise recovered (compared with the simulator's truth.json)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from services.tools.stack import Stack, free_port
from shared.bus import Subscription
from shared.config import get_settings
from shared.events import ExposureValidated, ProcessingFailed, parse_event
from shared.geometry import QUADRANTS

pytestmark = [pytest.mark.broker, pytest.mark.fullsize]

SPEC = """\
sequences:
  - test: BIAS01
    frames: 2
  - test: FLAT01
    frames: 1
    fluence: 0.4
    wave: 4
"""
FAST_INGEST = ["--rescan-interval", "1", "--stable-seconds", "0.2", "--incomplete-timeout", "10",
               "--exposure-timeout", "20"]


def test_simulated_acquisition_validated_with_truth_recovered(vison_env, tmp_path, monkeypatch):
    monkeypatch.setenv("VISON_BLOCK", "BORN")
    get_settings.cache_clear()
    settings = get_settings()
    data = Path(settings.data_root)
    ports = {"ingest": free_port(), "validator": free_port()}
    stack = Stack(["ingest", "validator"], env={**vison_env, "VISON_BLOCK": "BORN"}, ports=ports,
                  log_dir=tmp_path / "logs", extra_args={"ingest": FAST_INGEST})
    spec = tmp_path / "seq.yaml"
    spec.write_text(SPEC)
    events = []
    with Subscription(settings, ["exposure.validated.#", "processing.failed.#"]) as sub:
        stack.start()
        try:
            sim = subprocess.run(
                [sys.executable, "-m", "services.cli", "sim", "--out", str(data), "--block", "BORN", "--seed", "7",
                 "--spec", str(spec), "--atomic"],
                capture_output=True, text=True, timeout=300,
            )
            assert sim.returncode == 0, sim.stderr[-2000:]
            truth = json.loads((data / "truth.json").read_text())
            expected = {f["obsid"]: f for f in truth["frames"]}
            assert len(expected) == 3
            end = time.monotonic() + 120
            while time.monotonic() < end and len({e.obsid for e in events if isinstance(e, ExposureValidated)}) < 3:
                for rk, _, body in sub.messages(timeout=0.5):
                    events.append(parse_event(body, rk))
            time.sleep(2.0)  # anything extra (duplicates) would arrive now
            events += [parse_event(b, rk) for rk, _, b in sub.messages(timeout=0.5)]
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{ports['validator']}/metrics", timeout=10).read().decode()
        finally:
            codes = stack.stop()
    assert codes == {"ingest": 0, "validator": 0}, (tmp_path / "logs").glob("*.log")
    failures = [e for e in events if isinstance(e, ProcessingFailed)]
    assert not failures, [f"{e.what} {e.where}: {e.why}" for e in failures]
    validated = [e for e in events if isinstance(e, ExposureValidated)]
    assert sorted(e.obsid for e in validated) == sorted(expected)  # each exactly once
    quads_truth = truth["ccds"]
    for ev in validated:
        rec = expected[ev.obsid]
        assert ev.test == rec["test"] and ev.block == "BORN"
        assert ev.routing_key() == f"exposure.validated.{rec['test']}.BORN"
        assert sorted(f.path for f in ev.files) == sorted(rec["files"])
        bias = rec["kind"] == "bias"
        ron_out = False
        for ccd in ("CCD1", "CCD2", "CCD3"):
            for q in QUADRANTS:
                t = quads_truth[ccd]["quadrants"][q]
                s = ev.stats[ccd][q]
                assert abs(s.pre.offset - t["offset_adu"]) <= 1.0, (ev.obsid, ccd, q, s.pre.offset, t["offset_adu"])
                assert abs(s.ove.offset - t["offset_adu"]) <= 1.0
                assert s.pre.noise == pytest.approx(t["ron_adu"], rel=0.06)
                if bias:
                    assert abs(s.img.offset - t["offset_adu"]) <= 1.5
                ron_out |= not 0.86 <= t["ron_adu"] <= 1.44
        # RON_OOL exactly when the truth's read noise is outside the limits (bias frames only)
        assert ("RON_OOL" in ev.flag_names) == (bias and ron_out), (ev.obsid, ev.flag_names)
        assert not {"SATURATION", "LOSTPIXELS", "HK_OOL", "CCDTEMP_OOL", "POORQUALDATA"} & set(ev.flag_names)
        assert ev.compliance["hk"]["P"]["CCD1_TEMP_T"]["passed"]
        assert ev.complete_at is not None and ev.processing_seconds < 30
    assert "vison_exposures_validated_total{block=\"BORN\",test=\"BIAS01\"} 2.0" in metrics
    assert 'vison_quadrant_offset_adu{block="BORN",ccd="CCD1",quadrant="E",region="pre"}' in metrics
    assert "vison_validation_latency_seconds_count 3.0" in metrics
