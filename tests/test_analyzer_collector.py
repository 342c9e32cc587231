"""The analyzer's collector and job store: completeness per test definition (catalogue default or
campaign), operator close, idempotent enqueueing by (block, test run, frame set), derived tests,
restart safety (pending jobs re-published), and the worker-side claim / publish state machine.
Jobs go to the real broker's job queue (own vhost per test)."""

from __future__ import annotations

import json
from pathlib import Path

import pika
import pytest

from services.analyzer import registry
from services.analyzer.collector import Collector
from services.analyzer.jobs import AnalysisJob, JobPublisher, declare_jobs_queue, jobs_queue
from services.analyzer.model import FrameMeta, split_test_name
from services.analyzer.store import AnalyzerStore, frame_set_hash
from shared.bus import connection_parameters
from shared.config import get_settings
from shared.events import CampaignDefined, ExposureValidated, FileRef, TestClose


def _event(obsid: int, test: str, block: str = "BORN", ccds=(1, 2, 3)) -> ExposureValidated:
    files = [FileRef(ccd=c, path=f"011125/EUC_{obsid}_011125D120000T_ROE1_CCD{c}.fits", sha256=f"{obsid:02d}{c}" * 16,
                     size=1) for c in ccds]
    return ExposureValidated(obsid=obsid, block=block, test=test, files=files,
                             explog=[{"ccd": c, "exptime": 0.0, "vstart": 0, "vend": 2086, "test": test} for c in ccds],
                             passed=True, flags=0, flag_names=[], compliance={}, stats={})


def _drain(settings) -> list[AnalysisJob]:
    conn = pika.BlockingConnection(connection_parameters(settings.amqp_url))
    out = []
    try:
        ch = conn.channel()
        declare_jobs_queue(ch, settings)
        while True:
            method, _, body = ch.basic_get(jobs_queue(settings), auto_ack=True)
            if method is None:
                return out
            out.append(AnalysisJob.model_validate_json(body))
    finally:
        conn.close()


@pytest.fixture
def collector(vison_env):
    settings = get_settings()
    store = AnalyzerStore.in_state_dir(settings.state_dir)
    pub = JobPublisher(settings)
    yield Collector(settings, store, pub), settings
    pub.close()
    store.close()


def test_split_test_name_and_frame_set_hash():
    assert split_test_name("BIAS01.2") == ("BIAS01", 2) and split_test_name("FLAT02_730") == ("FLAT02_730", 0)
    a = [FrameMeta(obsid=i, ccd=c, path=f"/d/EUC_{i}_{c}.fits", sha256="x") for i in (1, 2) for c in (1, 2, 3)]
    assert frame_set_hash(a) == frame_set_hash(list(reversed(a)))
    assert frame_set_hash(a) != frame_set_hash(a[:-1])
    assert registry.find("BIAS01.3").__name__ == "services.analyzer.analysis.bias"
    assert registry.find("COSMETICS00").__name__ == "services.analyzer.analysis.cosmetics"
    assert registry.find("NOSUCH01") is None and registry.family_of("FLAT02_730") == "FLAT02"
    assert registry.family_of("FLAT_STB") == "FLAT_STB"


@pytest.mark.broker
def test_complete_per_definition_close_and_idempotent_enqueue(collector):
    col, settings = collector
    for obsid in (1, 2, 3):
        col.handle(_event(obsid, "BIAS01"))
    assert _drain(settings) == []  # the catalogue's BIAS01 expects 10 exposures
    col.handle(CampaignDefined(block="BORN", definition={"tests": [{"name": "BIAS01", "expected_frames": 3},
                                                                   {"name": "DARK01", "expected_frames": 2}]}))
    jobs = _drain(settings)
    assert [(j.test, j.reason, j.obsids, j.expected_frames) for j in jobs] == [("BIAS01", "complete", [1, 2, 3], 3)]
    job = jobs[0]
    assert len(job.frames) == 9 and job.frames[0].path == str(Path(settings.data_root) / "011125/EUC_1_011125D120000T_ROE1_CCD1.fits")
    assert job.frames[0].sha256 == "011" * 16 and job.job_id.startswith("BIAS01.BORN.")
    # redelivered / duplicated exposures and a close of the same complete set: no new job
    col.handle(_event(3, "BIAS01"))
    col.handle(TestClose(test="BIAS01", block="BORN"))
    assert _drain(settings) == []
    # an exposure without all its CCDs does not count
    col.handle(_event(10, "DARK01"))
    col.handle(_event(11, "DARK01", ccds=(1, 2)))
    assert _drain(settings) == []
    # the operator closes DARK01 early: one job with what is complete (flagged MISSDATA by the run)
    col.handle(TestClose(test="DARK01", block="BORN", operator="op"))
    jobs = _drain(settings)
    assert [(j.test, j.reason, j.obsids, j.expected_frames) for j in jobs] == [("DARK01", "closed", [10], 2)]
    col.handle(_event(11, "DARK01", ccds=(3,)))  # the missing CCD arrives: now complete -> new frame set
    jobs = _drain(settings)
    assert [(j.test, j.reason, j.obsids) for j in jobs] == [("DARK01", "complete", [10, 11])]
    # a repeat is its own test run; a test without analysis only records frames
    col.handle(_event(20, "BIAS01.2"))
    col.handle(TestClose(test="BIAS01", repeat=2, block="BORN"))
    col.handle(_event(30, "CHINJ01"))
    col.handle(TestClose(test="CHINJ01", block="BORN"))
    jobs = _drain(settings)
    assert [(j.test, j.base, j.repeat, j.reason) for j in jobs] == [("BIAS01.2", "BIAS01", 2, "closed")]
    store = col.store
    assert [j["status"] for j in store.jobs()] == ["queued"] * 4
    assert len(store.frames("BORN", "CHINJ01")) == 3


@pytest.mark.broker
def test_failed_job_rerun_pending_republished_and_derived_tests(collector):
    col, settings = collector
    col.handle(CampaignDefined(block="CURIE", definition={"tests": [{"name": "BIAS02", "expected_frames": 1}]}))
    col.handle(_event(5, "BIAS02", block="CURIE"))
    (job,) = _drain(settings)
    store = col.store
    ok, before = store.claim(job.job_id, "w1", takeover=False)
    assert ok and before == "queued"
    assert store.begin_publish(job.job_id, "w1")
    store.set_status(job.job_id, "failed", error="boom")
    col.handle(TestClose(test="BIAS02", block="CURIE"))  # the operator asks again: a new generation
    (again,) = _drain(settings)
    assert again.job_id == job.job_id + ".g1" and again.reason == "closed"
    # a job stored but not published before a crash is published at the next start
    fh = frame_set_hash(again.frames[:1])
    jid, created = store.create_job("CURIE", "BIAS02", fh, "closed",
                                    lambda j: AnalysisJob(job_id=j, block="CURIE", test="BIAS02", reason="closed",
                                                          frame_hash=fh, frames=again.frames[:1]).model_dump_json())
    assert created and store.job(jid)["status"] == "pending"
    restarted = Collector(settings, AnalyzerStore.in_state_dir(settings.state_dir), JobPublisher(settings))
    assert restarted.republish_pending() == 1
    assert [j.job_id for j in _drain(settings)] == [jid] and store.job(jid)["status"] == "queued"
    # a test analysing another test's frames (BF01 <- PTC01) is enqueued with them
    if registry.find("BF01") is None or registry.find("PTC01") is None:
        return  # the flat-family analyses are not there
    col.handle(CampaignDefined(block="BORN", definition={"tests": [
        {"name": "PTC01", "expected_frames": 2}, {"name": "BF01", "expected_frames": 0, "data_from": "PTC01"}]}))
    col.handle(_event(1, "PTC01"))
    col.handle(_event(2, "PTC01"))
    jobs = _drain(settings)
    assert [(j.test, j.reason, j.obsids) for j in jobs] == [("PTC01", "complete", [1, 2]), ("BF01", "derived", [1, 2])]


def test_claim_takeover_and_single_publisher(tmp_path):
    store = AnalyzerStore(tmp_path / "a.sqlite")
    msg = json.dumps({"block": "B", "test": "BIAS01", "frame_hash": "h", "reason": "complete"})
    jid, created = store.create_job("B", "BIAS01", "h", "complete", lambda j: msg)
    assert created and store.create_job("B", "BIAS01", "h", "complete", lambda j: msg) == (jid, False)
    assert store.claim(jid, "w1", takeover=False) == (True, "pending")
    assert not store.mark_queued(jid)  # the collector's late "queued" must not undo the worker's claim
    # a duplicate message while w1 runs it: refused; a redelivery (w1 died): taken over
    assert store.claim(jid, "w2", takeover=False) == (False, "running")
    assert store.claim(jid, "w2", takeover=True) == (True, "running")
    assert store.attempts(jid) == 2
    assert not store.begin_publish(jid, "w1")  # w1 was alive after all: it must not publish
    assert store.begin_publish(jid, "w2") and not store.begin_publish(jid, "w2")
    store.set_status(jid, "completed")
    assert store.claim(jid, "w3", takeover=True) == (False, "completed")
    # graceful stop: the job is given back without counting the attempt
    j2, _ = store.create_job("B", "DARK01", "h2", "complete", lambda j: msg)
    store.claim(j2, "w1", takeover=False)
    store.release(j2, "w1")
    assert store.job(j2)["status"] == "queued" and store.attempts(j2) == 0
    # an unknown job (store lost): inserted from its message
    assert store.claim("X.B.h3", "w1", takeover=False, message=msg) == (True, "queued")
