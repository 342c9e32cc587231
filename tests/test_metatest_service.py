"""Metatest: the service against the real broker, the exported event schema, the offline command."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from services.metatest.service import BINDINGS, SERVICE, Metatest, Recomputer
from services.sim import results as simres
from shared.bus import Consumer, Publisher, Subscription
from shared.config import Settings
from shared.events import AnalysisCompleted, MetatestCompleted, ProcessingFailed, json_schemas, parse_event
from shared.geometry import CCDS, QUADRANTS

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _gains(value: float) -> dict:
    return {c: {q: {"gain": value + 0.01 * i, "turnoff_adu": 60000.0} for i, q in enumerate(QUADRANTS)} for c in CCDS}


def _next(sub: Subscription, deadline: float, pattern: tuple[type, ...]) -> object | None:
    while time.monotonic() < deadline:
        for rk, _, body in sub.messages(timeout=0.5):
            ev = parse_event(body, rk)
            if isinstance(ev, pattern):
                return ev
            break
    return None


@pytest.mark.broker
def test_service_end_to_end_on_the_broker(vison_env, tmp_path):
    settings = Settings(_env_file=None, amqp_url=vison_env["VISON_AMQP_URL"], exchange=vison_env["VISON_EXCHANGE"],
                        products_root=Path(vison_env["VISON_PRODUCTS_ROOT"]), state_dir=Path(vison_env["VISON_STATE_DIR"]))
    service = Metatest(settings, batch_seconds=0.2, figures=False)
    consumer = Consumer(settings, SERVICE, BINDINGS, service)
    recomputer = Recomputer(service, settings, interval=0.1)
    thread = threading.Thread(target=consumer.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    recomputer.start()
    try:
        assert consumer.ready.wait(15)
        with Subscription(settings, ["metatest.completed.#", "processing.failed.#"]) as sub, \
                Publisher(settings, "test") as pub:
            born = AnalysisCompleted(test="PTC01", block="BORN", results=_gains(3.2), produced_at=T0)
            pub.publish(born)
            first = _next(sub, time.monotonic() + 60, (MetatestCompleted,))
            assert first is not None, "no metatest.completed.ptc within 60 s"
            assert first.family == "ptc" and first.blocks == ["BORN"]
            assert len(first.missing) == 11 and "BORN" not in first.missing and "DIRAC" in first.missing
            assert first.inputs == [str(born.event_id)]
            assert first.results["gain"]["BORN"]["CCD3"]["H"] == pytest.approx(3.23)
            assert first.results["gain"]["DIRAC"]["CCD1"]["E"] is None
            assert first.results["turnoff_e"]["BORN"]["CCD1"]["F"] == pytest.approx(60000.0 * 3.21)
            maps = json.loads((settings.products_root / "FPA/ptc/ptc_maps.json").read_text())
            assert maps["maps"]["gain"]["BORN"]["CCD3"]["H"] == pytest.approx(3.23)
            assert "FPA/ptc/ptc_maps.json" in first.products

            # the same input again, then a malformed one, then a good one: one event each, service alive
            pub.publish(born)
            bad = AnalysisCompleted(test="PTC01", block="NOBODY", results=_gains(3.0), produced_at=T0)
            pub.publish(bad)
            failure = _next(sub, time.monotonic() + 60, (ProcessingFailed, MetatestCompleted))
            assert isinstance(failure, ProcessingFailed), f"expected processing.failed, got {failure!r}"
            assert "unknown block" in failure.why and failure.block == "NOBODY"
            dirac = AnalysisCompleted(test="PTC01", block="DIRAC", results=_gains(3.4),
                                      produced_at=T0 + timedelta(minutes=5))
            pub.publish(dirac)
            second = _next(sub, time.monotonic() + 60, (MetatestCompleted, ProcessingFailed))
            assert isinstance(second, MetatestCompleted), f"expected metatest.completed, got {second!r}"
            assert second.blocks == ["BORN", "DIRAC"] and len(second.missing) == 10
            assert sorted(second.inputs) == sorted([str(born.event_id), str(dirac.event_id)])
            assert second.event_id != first.event_id
            assert _next(sub, time.monotonic() + 2, (MetatestCompleted,)) is None  # the duplicate gave nothing
        assert thread.is_alive() and recomputer.is_alive()
        assert service.store.published_count("ptc") == 2
    finally:
        consumer.stop()
        recomputer.stop()
        thread.join(30)
        recomputer.join(30)
        service.close()


def test_exported_schema_carries_missing_and_inputs(tmp_path):
    import jsonschema

    from services.cli import main

    assert main(["schemas", "--out", str(tmp_path)]) == 0
    schema = json.loads((tmp_path / "metatest.completed.json").read_text())
    assert schema == json_schemas()["metatest.completed"]
    for name in ("family", "blocks", "missing", "results", "products", "inputs", "provenance"):
        assert name in schema["properties"], name
    assert schema["properties"]["missing"]["type"] == "array"
    assert schema["properties"]["inputs"]["items"]["type"] == "string"
    ev = MetatestCompleted(family="ptc", blocks=["BORN"], missing=["DIRAC"], inputs=["a"],
                           results={"gain": {"BORN": {"CCD1": {"E": 3.2, "F": None}}}})
    jsonschema.validate(json.loads(ev.to_json()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**json.loads(ev.to_json()), "missing": "DIRAC"}, schema)


def test_offline_command_builds_the_products_of_a_products_folder(tmp_path, capsys):
    from services.cli import main

    products = tmp_path / "products"
    assert main(["sim", "--results-only", "--blocks", "3", "--out", str(products), "--tests", "PTC01,BIAS01"]) == 0
    assert "results-only" in capsys.readouterr().out
    # a failed analysis and a malformed result beside them: skipped, the rest is built
    (products / "CURIE" / "PTC01").mkdir(parents=True)
    (products / "CURIE" / "PTC01" / "results.json").write_text(json.dumps({"status": "failed", "test": "PTC01"}))
    (products / "NOBODY" / "PTC01").mkdir(parents=True)
    (products / "NOBODY" / "PTC01" / "results.json").write_text(json.dumps(
        {"status": "completed", "test": "PTC01", "block": "NOBODY", "results": {}}))
    out = tmp_path / "out"
    assert main(["metatest", "--products", str(products), "--families", "ptc,bias", "--out", str(out),
                 "--no-figures"]) == 0
    captured = capsys.readouterr()
    assert "NOBODY" in captured.err and "unknown block" in captured.err
    doc = json.loads((out / "FPA/ptc/ptc_maps.json").read_text())
    born = json.loads((products / "BORN/PTC01/results.json").read_text())["results"]
    for ccd in CCDS:
        for q in QUADRANTS:
            assert doc["maps"]["gain"]["GUYE"][ccd][q] is not None
            assert doc["maps"]["gain"]["BORN"][ccd][q] == pytest.approx(born[ccd][q]["gain"])
            assert doc["maps"]["gain"]["CURIE"][ccd][q] is None
    event = parse_event((out / "FPA/ptc/ptc_event.json").read_bytes())
    assert event.blocks == ["BORN", "DIRAC", "GUYE"] and "CURIE" in event.missing and len(event.missing) == 9
    # the inputs are the event ids the analyzer publishes (derived from the job id)
    assert sorted(event.inputs) == sorted(str(e.event_id) for e in simres.events(simres.simulate(
        ["BORN", "DIRAC", "GUYE"], ("PTC01",))))
    bias = json.loads((out / "FPA/bias/bias_maps.json").read_text())["maps"]
    gain = born["CCD2"]["G"]["gain"]
    ron = json.loads((products / "BORN/BIAS01/results.json").read_text())["results"]["CCD2"]["G"]["ron_img_adu"]
    assert bias["ron_img_e"]["BORN"]["CCD2"]["G"] == pytest.approx(ron * gain)
    assert not (out / "FPA/dark").exists()
    assert main(["metatest", "--products", str(products), "--families", "nope"]) == 2
