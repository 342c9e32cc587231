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


def _summary(scripts: Iterable[Any]) -> list[dict]:
    return [{"test": s.test, "frames": s.total_frames, "columns": len(s.columns), "duration_s": round(s.duration_s, 1),
             **({"data_from": s.data_from} if s.data_from else {})} for s in scripts]


def _select(scripts: list[Any], tests: Iterable[str] | None) -> list[Any]:
    if not tests:
        return scripts
    wanted = [t.strip() for t in tests if t.strip()]
    known = {s.test for s in scripts}
    missing = [t for t in wanted if t not in known]
    if missing:
        raise ValueError(f"--tests {','.join(missing)}: not in the campaign (its tests: {', '.join(s.test for s in scripts)})")
    return [s for s in scripts if s.test in set(wanted)]


def test_frames(names: Iterable[str], chamber: str, equipment: Mapping[str, str] | None = None,
                params: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[list[FrameSpec], list[dict]]:
    """Frames of catalogue tests at their nominal parameters (``params[name]`` overrides);
    returns (frames, per-test summary for the truth)."""
    from shared.campaign import get_test

    scripts = [get_test(n).script((params or {}).get(n), chamber=chamber, equipment=equipment) for n in names]
    return [f for s in scripts for f in script_frames(s)], _summary(scripts)


def is_campaign_file(campaign: str) -> bool:
    return Path(campaign).suffix in (".yaml", ".yml")


def load_campaign_file(path: str) -> Any:
    """A campaign configuration (``shared.campaign.load_campaign``): block, chamber, equipment, tests."""
    from shared.campaign import load_campaign

    return load_campaign(Path(path))


def campaign_frames(campaign: str, chamber: str, equipment: Mapping[str, str] | None = None,
                    tests: Iterable[str] | None = None) -> tuple[list[FrameSpec], list[dict]]:
    """Frames of a campaign preset ("mini", "full", "warm") or campaign configuration file
    (YAML, whose own chamber and equipment are used), optionally only some of its tests
    (in campaign order)."""
    if is_campaign_file(campaign):
        scripts = load_campaign_file(campaign).scripts()
    else:
        from shared.campaign import campaign_preset

        scripts = campaign_preset(campaign).scripts(chamber, equipment)  # type: ignore[arg-type]
    scripts = _select(scripts, tests)
    return [f for s in scripts for f in script_frames(s)], _summary(scripts)
