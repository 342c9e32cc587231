"""Paths stay under their root (shared/paths.py): ``..``, absolute paths and symbolic links out of
the data root are refused with a PathError naming the path; the validator reports such paths of
an ``exposure.ingested`` message as ``processing.failed`` (what = path) and dead-letters the
message without crashing (real broker)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from shared.paths import PathError, ensure_writable_under, resolve_under


@pytest.fixture
def roots(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "010124").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.fits").write_bytes(b"x")
    (data / "010124" / "ok.fits").write_bytes(b"y")
    (data / "010124" / "link.fits").symlink_to(outside / "secret.fits")
    (data / "escape").symlink_to(outside, target_is_directory=True)
    (data / "inner.fits").symlink_to(data / "010124" / "ok.fits")
    return data, outside


def test_paths_inside_the_root_resolve(roots):
    data, _ = roots
    assert resolve_under(data, "010124/ok.fits") == (data / "010124" / "ok.fits").resolve()
    assert resolve_under(data, "inner.fits") == (data / "010124" / "ok.fits").resolve()  # a link inside is fine
    assert resolve_under(data, "010124/missing.fits") == (data / "010124" / "missing.fits").resolve()


@pytest.mark.parametrize("rel,reason", [
    ("../outside/secret.fits", "'..'"),
    ("010124/../../outside/secret.fits", "'..'"),
    ("/etc/passwd", "absolute"),
    ("010124/link.fits", "outside the root"),
    ("escape/secret.fits", "outside the root"),
    ("", "empty"),
    ("a\x00b", "NUL"),
])
def test_escapes_are_refused_naming_the_path(roots, rel, reason):
    data, _ = roots
    with pytest.raises(PathError) as err:
        resolve_under(data, rel)
    assert err.value.path == rel and reason in err.value.reason
    assert repr(rel) in str(err.value)


def test_outputs_stay_under_their_root(roots, tmp_path):
    data, outside = roots
    products = tmp_path / "products"
    products.mkdir()
    out = ensure_writable_under(products, "BORN/BIAS01/results.json")
    assert out == (products / "BORN" / "BIAS01" / "results.json").resolve() and out.parent.is_dir()
    assert ensure_writable_under(products, products / "x.json") == (products / "x.json").resolve()
    (products / "out").symlink_to(outside, target_is_directory=True)
    for bad in ("../x.json", "/tmp/x.json", "out/x.json", str(outside / "x.json"), "."):
        with pytest.raises(PathError):
            ensure_writable_under(products, bad)


@pytest.mark.broker
def test_validator_refuses_and_dead_letters_paths_out_of_the_data_root(vison_env, tmp_path):
    from services.validator.service import BINDINGS, SERVICE, Validator
    from shared.bus import Consumer, Publisher, Subscription, dead_letters
    from shared.config import get_settings
    from shared.events import ExposureIngested, FileRef, ProcessingFailed, parse_event

    settings = get_settings()
    data = Path(settings.data_root)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "EUC_3_010124D120000T_ROE1_CCD1.fits").write_bytes(b"\0" * 2880)
    (data / "010124").mkdir()
    (data / "010124" / "EUC_3_010124D120000T_ROE1_CCD1.fits").symlink_to(outside / "EUC_3_010124D120000T_ROE1_CCD1.fits")
    bad_paths = {1: "../outside/EUC_1.fits", 2: "/etc/passwd", 3: "010124/EUC_3_010124D120000T_ROE1_CCD1.fits"}
    messages = [ExposureIngested(obsid=obsid, block="BORN", test="BIAS01", explog=[{"CCD": "CCD1"}],
                                 files=[FileRef(ccd=1, path=path, sha256="0" * 64, size=2880)])
                for obsid, path in bad_paths.items()]
    validator = Validator(settings, pool="serial", workers=1)
    consumer = Consumer(settings, SERVICE, BINDINGS, validator)
    thread = threading.Thread(target=consumer.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    try:
        assert consumer.ready.wait(20)
        failures: dict[int, ProcessingFailed] = {}
        with Subscription(settings, ["processing.failed.#"]) as sub, Publisher(settings, "test") as pub:
            for m in messages:
                pub.publish(m)
            end = time.monotonic() + 30
            while time.monotonic() < end and len(failures) < 3:
                for rk, _, body in sub.messages(timeout=0.5):
                    ev = parse_event(body, rk)
                    if ev.what == "path":
                        failures[ev.obsid] = ev
        assert sorted(failures) == [1, 2, 3]
        for obsid, ev in failures.items():
            assert ev.where == bad_paths[obsid] and "outside the data root" in ev.why and ev.service == "validator"
        assert "'..'" in failures[1].why and "absolute" in failures[2].why and "symbolic link" in failures[3].why
        end, dead = time.monotonic() + 20, []
        while time.monotonic() < end and len(dead) < 3:
            dead += dead_letters(settings)
            time.sleep(0.2)
        assert sorted(parse_event(body, rk).obsid for rk, _, body in dead) == [1, 2, 3]
        assert thread.is_alive()  # the validator lives on
    finally:
        consumer.stop()
        thread.join(20)
        validator.close()
