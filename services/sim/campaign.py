"""Thin layer from campaign scripts (``shared.campaign``) to the simulator's frame specs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from services.sim.frames import FrameSpec


def script_frames(script: Any) -> list[FrameSpec]:
    """The frames of a ``shared.campaign`` Script, column by column (``frames`` copies each)."""
    out: list[FrameSpec] = []
    for k, column in enumerate(script.columns):
        values = dict(column.values)
        for _ in range(int(column.frames)):
            out.append(FrameSpec(test=script.test, values=values, column=k, label=script.test))
    return out


def test_frames(names: Iterable[str], chamber: str, equipment: Mapping[str, str] | None = None,
                params: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[list[FrameSpec], list[dict]]:
    """Frames of catalogue tests at their nominal parameters (``params[name]`` overrides);
    returns (frames, per-test summary for the truth)."""
    from shared.campaign.catalogue import get_test

    frames: list[FrameSpec] = []
    summary: list[dict] = []
    for name in names:
        test = get_test(name)
        script = test.script((params or {}).get(name), chamber=chamber, equipment=equipment)
        if not script.columns:  # BF01 re-uses PTC data: nothing to acquire
            summary.append({"test": script.test, "frames": 0, "data_from": script.data_from})
            continue
        frames.extend(script_frames(script))
        summary.append({"test": script.test, "frames": script.total_frames, "columns": len(script.columns),
                        "duration_s": round(script.duration_s, 1)})
    return frames, summary


def campaign_frames(campaign: str, chamber: str, equipment: Mapping[str, str] | None = None,
                    tests: Iterable[str] | None = None) -> tuple[list[FrameSpec], list[dict]]:
    """Frames of a campaign preset ("mini", "full", ...) or campaign file (YAML), optionally only
    some of its tests. Needs ``shared.campaign`` presets; raises RuntimeError when unavailable."""
    try:
        import shared.campaign as sc
    except ImportError as exc:  # pragma: no cover - depends on the campaign part
        raise RuntimeError(f"shared.campaign is not available: {exc}") from None
    preset = getattr(sc, "campaign_preset", None)
    load = getattr(sc, "load_campaign", None)
    if Path(campaign).suffix in (".yaml", ".yml") and load is not None:
        camp = load(campaign)
    elif preset is not None:
        camp = preset(campaign)
    else:
        raise RuntimeError("shared.campaign has no campaign_preset / load_campaign yet: use --tests with catalogue names")
    wanted = set(tests) if tests else None
    scripts = camp.scripts(chamber=chamber, equipment=equipment) if hasattr(camp, "scripts") else camp
    frames: list[FrameSpec] = []
    summary: list[dict] = []
    for script in scripts:
        if wanted is not None and script.test not in wanted:
            continue
        frames.extend(script_frames(script))
        summary.append({"test": script.test, "frames": script.total_frames, "columns": len(script.columns)})
    return frames, summary
