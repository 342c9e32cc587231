"""Reference data shipped with the package: ELVIS formats, HK limits, block offsets, FPA layout,
chamber (OGSE) profiles. Copies of the project specification's JSON files live in
``shared/spec/`` so that nothing depends on the specification folder at run time."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from typing import Any

from shared.geometry import CCDS, QUADRANTS


@lru_cache(maxsize=None)
def _load(name: str) -> dict[str, Any]:
    return json.loads(resources.files("shared").joinpath("spec", name).read_text())


def elvis_formats() -> dict[str, Any]:
    """``elvis-formats.json``: exposure-log and HK columns per version, HK limits, sentinels."""
    return _load("elvis-formats.json")


def reference_data() -> dict[str, Any]:
    """``reference-data.json``: block offsets, FPA layout, chamber profiles."""
    return _load("reference-data.json")


def block_offsets(block: str) -> dict[str, dict[str, float]]:
    """Nominal offsets (ADU) ``{CCD: {quadrant: offset}}`` of a block (UNKNOWN when not listed)."""
    table = reference_data()["block_offsets_adu"]
    return table.get(block, table["UNKNOWN"])


def chamber_profile(name: str) -> dict[str, Any]:
    """A chamber (OGSE) profile; raises KeyError naming the known profiles."""
    profiles = reference_data()["chamber_profiles"]
    if name not in profiles or name.startswith("_"):
        known = ", ".join(k for k in profiles if not k.startswith("_"))
        raise KeyError(f"unknown chamber profile {name!r} (known: {known})")
    return profiles[name]


def chamber_names() -> list[str]:
    """Names of every known chamber profile."""
    return [k for k in reference_data()["chamber_profiles"] if not k.startswith("_")]


def fpa_layout() -> dict[str, Any]:
    """Focal-plane layout: ``slices`` (6 x [left block, right block]) and ``spares``."""
    return reference_data()["fpa_layout"]


__all__ = [
    "CCDS",
    "QUADRANTS",
    "block_offsets",
    "chamber_names",
    "chamber_profile",
    "elvis_formats",
    "fpa_layout",
    "reference_data",
]
