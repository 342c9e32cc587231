"""When is a test's data set complete? The expected number of exposures (ObsIDs) of a test run,
from the campaign definition of the block (``campaign.defined`` event / a campaign file) or, by
default, from the catalogue definition of the test at its nominal parameters."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from services.analyzer.model import run_label, split_test_name


@dataclass(frozen=True)
class Plan:
    """What the analyzer expects of one test run."""

    label: str
    expected_frames: int | None  # None: unknown (only an operator's test.close triggers)
    data_from: str | None = None  # analyse the frames of this test (BF01 -> PTC01)
    params: Mapping[str, Any] | None = None
    source: str = "default"  # "default" | "campaign"


def default_plan(label: str) -> Plan:
    """The catalogue definition of a test at nominal parameters (``expected_frames`` None for an
    unknown test name)."""
    base, repeat = split_test_name(label)
    try:
        from shared.campaign import get_test

        definition = get_test(run_label(base, repeat))
        script = definition.script()
        return Plan(label, int(script.total_frames), definition.data_from, None, "default")
    except Exception:
        return Plan(label, None, None, None, "default")


def plans_from_definition(definition: Mapping[str, Any]) -> dict[str, Plan]:
    """``{test label: Plan}`` of a campaign definition (the ``definition`` of a CampaignDefined
    event, i.e. ``CampaignDefinition.model_dump()``: ``tests: [{name, expected_frames, params,
    data_from}]``). Lenient: entries without a name are skipped."""
    out: dict[str, Plan] = {}
    for entry in definition.get("tests") or []:
        if not isinstance(entry, Mapping) or not entry.get("name"):
            continue
        name = str(entry["name"])
        n = entry.get("expected_frames")
        if n is None and isinstance(entry.get("script"), Mapping):
            n = entry["script"].get("total_frames")
        out[name] = Plan(name, int(n) if n is not None else None, entry.get("data_from"), entry.get("params"), "campaign")
    return out


def load_definition(path: str | Path) -> dict[str, Any]:
    """A campaign definition from a file: a definition JSON (``tests`` with ``expected_frames``)
    or a campaign configuration (YAML / JSON) that is defined here."""
    import json

    text = Path(path).read_text()
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and any(isinstance(t, dict) and "expected_frames" in t for t in doc.get("tests") or []):
        return doc
    from shared.campaign import load_campaign_config

    return load_campaign_config(doc if isinstance(doc, dict) else text).define().model_dump(mode="json")


def derived_tests(label: str, plans: Mapping[str, Plan] | None = None) -> list[str]:
    """Tests analysing the frames of ``label`` (``PTC01`` -> ``["BF01"]``), from the campaign
    plans when given, else from the catalogue."""
    if plans:
        return [name for name, p in plans.items() if p.data_from == label]
    base, repeat = split_test_name(label)
    out = []
    try:
        from shared.campaign import FAMILIES, get_test

        for fam in FAMILIES:
            try:
                d = get_test(run_label(fam, repeat))
            except Exception:
                continue
            if d.data_from == label:
                out.append(d.name)
    except Exception:  # pragma: no cover - campaign package unavailable
        pass
    return out
