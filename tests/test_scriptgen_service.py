"""scriptgen as a bus service: scriptgen.request -> campaign.defined.<block> (real broker)."""

from __future__ import annotations

import threading

import pytest

from shared.bus import Publisher, Subscription
from shared.campaign import CampaignDefinition
from shared.config import get_settings
from shared.events import CampaignDefined, ProcessingFailed, ScriptgenRequest

pytestmark = pytest.mark.broker


def test_request_publishes_campaign_definition(vison_env, tmp_path):
    from services.scriptgen.main import make_consumer

    settings = get_settings()
    consumer = make_consumer(settings)
    thread = threading.Thread(target=consumer.run, kwargs={"install_signals": False}, daemon=True)
    thread.start()
    assert consumer.ready.wait(10)
    try:
        with Subscription(settings, ["campaign.defined.#", "processing.failed.#"]) as sub, \
                Publisher(settings, "tester") as pub:
            good = ScriptgenRequest(block="BORN", out_dir="scripts", config={
                "chamber": "CHAMBER_B_BORN", "operator": "jdoe", "preset": "mini", "date": "2024-03-01"})
            pub.publish(good)
            pub.publish(ScriptgenRequest(block="BORN", config={"chamber": "NOPE", "operator": "x", "tests": ["BIAS01"]}))
            got = []
            for event in sub.events(timeout=15):
                got.append(event)
                if len(got) == 2:
                    break
        defined = [e for e in got if isinstance(e, CampaignDefined)]
        failed = [e for e in got if isinstance(e, ProcessingFailed)]
        assert len(defined) == 1 and len(failed) == 1
        event = defined[0]
        assert event.routing_key() == "campaign.defined.BORN" and event.producer == "scriptgen"
        definition = CampaignDefinition.model_validate(event.definition)
        assert definition.test("BIAS01").expected_frames == 3 and definition.campaign == "mini"
        assert "chamber" in failed[0].why
        assert (settings.products_root / "scripts" / "CHECK_SUMS_010324.txt").is_file()
    finally:
        consumer.stop()
        thread.join(10)


def test_request_out_dir_must_stay_under_the_products_root(tmp_path):
    """A ``scriptgen.request`` naming ``..`` or an absolute folder outside the products root is
    refused (PathError, a ValueError: the consumer dead-letters it) and writes nothing."""
    import pytest

    from services.scriptgen.main import handle_request
    from shared.paths import PathError

    config = {"block": "BORN", "chamber": "CHAMBER_A_JUN18", "operator": "x", "preset": "mini", "tests": ["BIAS01"]}
    root = tmp_path / "products"
    for bad in ("../escape", str(tmp_path / "elsewhere")):
        with pytest.raises(PathError):
            handle_request({"block": "BORN", "config": config, "out_dir": bad}, out_root=root)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "elsewhere").exists()
    handle_request({"block": "BORN", "config": config, "out_dir": "scripts"}, out_root=root)
    assert any((root / "scripts").glob("*.xlsx"))
