"""``vison catalogue`` as a consumer on the real broker: exposures, analyses and FPA aggregates
published on the bus land in the catalogue once (a repeated event adds nothing), content that
cannot be catalogued is dead-lettered with a processing.failed, and the service keeps going."""

from __future__ import annotations

import json
import threading
import time

import pytest

from services.catalogue import synthetic as syn
from services.catalogue.main import make_consumer
from services.catalogue.store import Catalogue
from shared.bus import Publisher, Subscription, dead_letters
from shared.config import Settings
from shared.events import AnalysisCompleted, event_body

pytestmark = pytest.mark.broker


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_consumer_fills_the_catalogue_idempotently(vison_env, tmp_path, backend, request):
    url = f"sqlite:///{tmp_path / 'cat.sqlite'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    settings = Settings(catalogue_url=url)
    cat = Catalogue(url)
    consumer = make_consumer(settings, cat)
    thread = threading.Thread(target=consumer.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        assert consumer.ready.wait(30), "consumer not connected"
        with Subscription(settings, ["processing.failed.#"]) as failures, Publisher(settings, "test") as pub:
            events = [syn.exposure(1), syn.exposure(2, flags=4), syn.analysis("PTC01"), syn.metatest("ptc", ["BORN"])]
            for ev in events + events[:2]:  # the first two twice
                pub.publish(ev)
            bad = AnalysisCompleted(test="BIAS01", block="BORN", results={"CCD1": {"Z": {"ron_img_adu": 1}}})
            pub.publish(bad)
            pub.publish(syn.exposure(3))  # still alive after the bad one
            wait_for(lambda: cat.counts()["exposures"] == 3, what="3 exposures")
            failed = next(failures.events(timeout=30))
        counts = cat.counts()
        assert counts == {"exposures": 3, "exposure_quadrants": 36, "analyses": 1, "results": 36,
                          "fpa_families": 1, "fpa_values": 48}
        assert cat.exposure(2).verdict == "FAIL" and cat.exposure(2).flag_names == "BADDATA"
        assert [r.value for r in cat.results("gain")][:2] == [syn.gain_of(1, "E"), syn.gain_of(1, "F")]
        assert failed.what == "message" and "results.CCD1.Z" in failed.why and failed.service == "catalogue"
        dead = dead_letters(settings)
        assert len(dead) == 1
        rk, headers, body = dead[0]
        assert rk == "analysis.completed.BIAS01.BORN" and json.loads(body)["event_id"] == str(bad.event_id)
        assert "results.CCD1.Z" in headers["x-vison-reason"] and headers["x-vison-service"] == "catalogue"
        assert consumer.handled == 7  # 5 distinct + 2 repeats acknowledged, the bad one dead-lettered
    finally:
        consumer.stop()
        thread.join(30)
        cat.close()
    assert not thread.is_alive()


def test_vison_catalogue_process_consumes_and_stops_cleanly(vison_env, tmp_path):
    """The command itself (as `vison stack up` runs it): events in, rows out, SIGTERM -> exit 0."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    url = f"sqlite:///{tmp_path / 'cat.sqlite'}"
    env = dict(os.environ, **vison_env, VISON_CATALOGUE_URL=url)
    repo = Path(__file__).resolve().parents[1]
    Catalogue(url).close()  # the tables exist before the process starts
    proc = subprocess.Popen([sys.executable, "-m", "services.cli", "catalogue"], env=env, cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        settings = Settings()
        with Catalogue(url) as cat:
            from shared.bus import ensure_queue
            from services.catalogue.main import BINDINGS, SERVICE

            ensure_queue(settings, SERVICE, BINDINGS)  # the queue exists before we publish
            with Publisher(settings, "test") as pub:
                pub.publish(syn.analysis("BIAS01"))
                pub.publish(syn.exposure(4))
            wait_for(lambda: cat.counts()["results"] == 24 and cat.counts()["exposures"] == 1, 60, "rows")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_consumer_waits_for_the_database_and_loses_nothing(vison_env, pg_url, caplog):
    """PostgreSQL refusing connections for a while (ALLOW_CONNECTIONS false + backends ended):
    the event is stored once the database is back, nothing is dead-lettered."""
    import logging

    import psycopg

    name = pg_url.rsplit("/", 1)[1]
    admin = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    settings = Settings(catalogue_url=pg_url)
    cat = Catalogue(pg_url)
    consumer = make_consumer(settings, cat)
    thread = threading.Thread(target=consumer.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        assert consumer.ready.wait(30)
        with Publisher(settings, "test") as pub:
            pub.publish(syn.exposure(1))
            wait_for(lambda: cat.counts()["exposures"] == 1, what="first exposure")
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            with caplog.at_level(logging.WARNING, logger="vison.catalogue"):
                pub.publish(syn.exposure(2))
                wait_for(lambda: "waiting for the database" in caplog.text, what="the consumer to wait")
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            wait_for(lambda: cat.counts()["exposures"] == 2, what="the second exposure after the outage")
        assert cat.exposure(2).obsid == 2 and dead_letters(settings) == []
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        consumer.stop()
        thread.join(30)
        cat.close()
