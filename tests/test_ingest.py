"""ingest against the real broker: exposures assembled once complete, published once (also across
restarts), bad input reported with its reason, paths outside the data root refused, HK tailed."""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from services.ingest.service import IngestOptions, IngestService
from shared.config import get_settings
from shared.events import ExposureIngested, HKSamples, ProcessingFailed, parse_event
from shared.explog import format_explog_row
from shared.filenames import day_folder_name, explog_name, format_fits_name
from shared.metrics import REGISTRY
from tests.test_ingest_data import (
    BASE_DATE,
    append_daily_hk,
    append_log,
    explog_values,
    hk_values,
    sha256,
    write_exposure,
)

pytestmark = pytest.mark.broker

FAST = IngestOptions(rescan_interval=0.5, poll_interval=0.05, stable_seconds=0.1, incomplete_timeout=1.5,
                     exposure_timeout=2.0, hk_interval=0.2)


@pytest.fixture
def settings(vison_env, monkeypatch):
    monkeypatch.setenv("VISON_BLOCK", "BORN")
    get_settings.cache_clear()
    return get_settings()


@pytest.fixture
def subscription(settings):
    from shared.bus import Subscription

    with Subscription(settings, ["exposure.ingested.#", "processing.failed.#", "hk.samples.#"]) as sub:
        yield sub


class Running:
    """An IngestService in a thread."""

    def __init__(self, settings, options=FAST):
        self.service = IngestService(settings, options)
        self.thread = threading.Thread(target=self.service.run, daemon=True)
        self.thread.start()
        assert self.service.ready.wait(10)

    def stop(self):
        self.service.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


def collect(sub, until, timeout=15.0):
    """Events until ``until(events)`` is true or timeout (then returns what came)."""
    events = []
    end = time.monotonic() + timeout
    while time.monotonic() < end and not until(events):
        for rk, _, body in sub.messages(timeout=0.3):
            events.append(parse_event(body, rk))
            if until(events):
                break
    return events


def of(events, cls):
    return [e for e in events if isinstance(e, cls)]


def test_exposure_published_once_with_paths_checksums_and_log_rows(settings, subscription):
    root = Path(settings.data_root)
    svc = Running(settings)
    try:
        info = write_exposure(root, 11, size="tiny", test="BIAS01")
        events = collect(subscription, lambda ev: len(of(ev, ExposureIngested)) >= 1)
        time.sleep(1.2)  # two rescans: nothing more
        events += collect(subscription, lambda ev: False, timeout=0.5)
    finally:
        svc.stop()
    exposures = of(events, ExposureIngested)
    assert len(exposures) == 1, events
    ev = exposures[0]
    assert ev.routing_key() == "exposure.ingested.BIAS01.BORN"
    assert ev.obsid == 11 and ev.block == "BORN" and ev.test == "BIAS01" and ev.roe == 1
    day = day_folder_name(info["date"].date())
    assert [f.ccd for f in ev.files] == [1, 2, 3]
    for ref in ev.files:
        assert ref.path == f"{day}/{format_fits_name(11, info['date'], 1, ref.ccd)}"
        assert ref.sha256 == sha256(root / ref.path) and ref.size == (root / ref.path).stat().st_size
    assert [row["CCD"] for row in ev.explog] == ["CCD1", "CCD2", "CCD3"]
    assert ev.explog[0]["ObsID"] == 11 and ev.explog[0]["vend"] == 2086
    assert ev.hk_file is not None and ev.hk_file.path.startswith(f"{day}/HK_11_")
    assert not of(events, ProcessingFailed)


def test_waits_for_complete_fits_and_terminated_log_line(settings, subscription, tmp_path):
    root = Path(settings.data_root)
    date = BASE_DATE
    svc = Running(settings)
    try:
        info = write_exposure(root, 21, size="tiny", ccds=(1, 2), log_ccds=(1, 2))
        # CCD3 written slowly: half the bytes, a pause, the rest
        write_exposure(tmp_path / "scratch", 21, size="tiny", ccds=(3,), log_ccds=())
        src = next((tmp_path / "scratch").rglob("*CCD3.fits"))
        data = src.read_bytes()
        target = info["folder"] / src.name
        with open(target, "wb") as fh:
            fh.write(data[: len(data) // 2])
            fh.flush()
            time.sleep(0.6)
            assert not collect(subscription, lambda ev: len(of(ev, ExposureIngested)) >= 1, timeout=0.3)
            fh.write(data[len(data) // 2:])
        written = datetime.now().astimezone()
        # the log row of CCD3 without its newline: not a row yet
        log = info["folder"] / explog_name(date.date())
        row = format_explog_row(explog_values(21, 3, info["date"], "BIAS01"))
        with open(log, "a") as fh:
            fh.write(row[:-1])
        assert not collect(subscription, lambda ev: len(of(ev, ExposureIngested)) >= 1, timeout=1.0)
        with open(log, "a") as fh:
            fh.write("\n")
        events = collect(subscription, lambda ev: len(of(ev, ExposureIngested)) >= 1)
    finally:
        svc.stop()
    (ev,) = of(events, ExposureIngested)
    assert ev.obsid == 21 and [f.ccd for f in ev.files] == [1, 2, 3]
    assert ev.files[2].complete_at >= written - timedelta(seconds=0.05)
    assert ev.files[2].sha256 == sha256(target)


def test_restart_neither_republishes_nor_misses(settings, subscription):
    root = Path(settings.data_root)
    svc = Running(settings)
    write_exposure(root, 31, size="tiny")
    first = collect(subscription, lambda ev: len(of(ev, ExposureIngested)) >= 1)
    svc.stop()
    write_exposure(root, 32, size="tiny")  # written while ingest is down
    svc = Running(settings)
    try:
        events = collect(subscription, lambda ev: len(of(ev, ExposureIngested)) >= 1)
        time.sleep(1.2)
        events += collect(subscription, lambda ev: False, timeout=0.5)
    finally:
        svc.stop()
    assert [e.obsid for e in of(first, ExposureIngested)] == [31]
    assert [e.obsid for e in of(events, ExposureIngested)] == [32]


def test_bad_input_is_reported_with_reason(settings, subscription, tmp_path):
    root = Path(settings.data_root)
    svc = Running(settings)
    try:
        # a truncated FITS (CCD2 of ObsID 41), the rest of the exposure fine
        info = write_exposure(root, 41, size="tiny")
        cut = info["files"][2]
        cut.write_bytes(cut.read_bytes()[:4000])
        # a garbage line in the exposure log
        log = info["folder"] / explog_name(info["date"].date())
        append_log(log, "this is not\tan exposure-log row\n")
        # an exposure whose CCD3 never comes
        write_exposure(root, 42, size="tiny", ccds=(1, 2), log_ccds=(1, 2, 3))
        # a FITS with an unrecognised name
        (info["folder"] / "EUC_garbage.fits").write_bytes(b"SIMPLE")
        # a symlink to a file outside the data root
        outside = tmp_path / "outside"
        write_exposure(outside, 43, size="tiny", ccds=(1,), log_ccds=())
        src = next(outside.rglob("*.fits"))
        os.symlink(src, info["folder"] / src.name)
        # and a good exposure after all that
        write_exposure(root, 44, size="tiny")

        def done(events):
            failed = of(events, ProcessingFailed)
            return (len(failed) >= 6 and {41, 42} <= {e.obsid for e in failed if e.what == "exposure"}
                    and any(e.obsid == 44 for e in of(events, ExposureIngested)))

        events = collect(subscription, done, timeout=20)
    finally:
        svc.stop()
    failed = {e.what + ":" + e.where: e for e in of(events, ProcessingFailed)}
    day = info["folder"].name
    fits = failed.get(f"fits:{day}/{cut.name}")
    assert fits is not None and "truncated" in fits.why, failed.keys()
    garbage = [e for e in failed.values() if e.what == "explog"]
    assert len(garbage) == 1 and garbage[0].where.startswith(f"{day}/{log.name}:") and "fields" in garbage[0].why
    incomplete = [e for e in failed.values() if e.what == "exposure"]
    obsids = sorted(e.obsid for e in incomplete)
    assert 42 in obsids and 41 in obsids
    e42 = next(e for e in incomplete if e.obsid == 42)
    assert "missing frame CCD3" in e42.why and e42.test == "BIAS01" and e42.block == "BORN"
    assert any(e.what == "fits" and "EUC_garbage.fits" in e.where and "not an ELVIS FITS name" in e.why
               for e in failed.values())
    assert any(e.what == "path" and src.name in e.where and "outside the data root" in e.why for e in failed.values())
    assert [e.obsid for e in of(events, ExposureIngested)] == [44]
    for e in failed.values():
        assert e.routing_key().startswith("processing.failed.")


def test_hk_daily_file_tailed_published_and_exported(settings, subscription):
    root = Path(settings.data_root)
    date = BASE_DATE
    svc = Running(settings)
    try:
        path = append_daily_hk(root, date, [hk_values(), hk_values(CCD1_TEMP_T=-118.0, VID_PCB_TEMP_T=21.5)])
        events = collect(subscription, lambda ev: sum(len(e.samples) for e in of(ev, HKSamples)) >= 2)
        with open(path, "a") as fh:
            fh.write("02-03-")  # a row still being written
        time.sleep(0.5)
        value = REGISTRY.get_sample_value("vison_hk_value", {"block": "BORN", "roe": "1", "param": "CCD1_TEMP_T"})
        ool_p = REGISTRY.get_sample_value("vison_hk_out_of_limits", {"param": "CCD1_TEMP_T", "kind": "P"})
        ool_s = REGISTRY.get_sample_value("vison_hk_out_of_limits", {"param": "CCD1_TEMP_T", "kind": "S"})
        ok_p = REGISTRY.get_sample_value("vison_hk_out_of_limits", {"param": "CCD2_TEMP_T", "kind": "P"})
        limit = REGISTRY.get_sample_value("vison_hk_limit", {"param": "CCD1_TEMP_T", "kind": "P", "bound": "hi"})
        stamp = REGISTRY.get_sample_value("vison_hk_last_sample_timestamp_seconds", {"block": "BORN", "roe": "1"})
    finally:
        svc.stop()
    samples = [s for e in of(events, HKSamples) for s in e.samples]
    assert len(samples) == 2
    hk_event = of(events, HKSamples)[0]
    assert hk_event.routing_key() == "hk.samples.BORN" and hk_event.source.endswith(".txt")
    assert samples[1].values["CCD1_TEMP_T"] == -118.0 and samples[1].timestamp == date + timedelta(seconds=1)
    assert value == -118.0
    assert (ool_p, ool_s, ok_p) == (1.0, 0.0, 0.0)
    assert limit == -119.0
    assert stamp == pytest.approx((date + timedelta(seconds=1)).timestamp())
    # a restart does not republish the rows already sent
    svc = Running(settings)
    try:
        with open(path, "a") as fh:
            fh.write("\n")  # completes the garbage row: reported, not published
        append_daily_hk(root, date + timedelta(seconds=10), [hk_values(CCD1_TEMP_T=-120.5)])
        events = collect(subscription, lambda ev: len(of(ev, HKSamples)) >= 1, timeout=10)
        time.sleep(0.5)
        events += collect(subscription, lambda ev: False, timeout=0.3)
    finally:
        svc.stop()
    samples = [s for e in of(events, HKSamples) for s in e.samples]
    assert [s.values["CCD1_TEMP_T"] for s in samples] == [-120.5]
    assert any(e.what == "hk" and "unusable HK line" in e.why for e in of(events, ProcessingFailed))
