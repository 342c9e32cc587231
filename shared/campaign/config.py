"""Campaign configuration (YAML), presets and the self-contained campaign definition (payload of
``campaign.defined.<block>``)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shared.campaign.catalogue import TestDefinition, get_test, validation_message
from shared.campaign.keys import SCRIPT_KEYS
from shared.campaign.script import Script
from shared.refdata import chamber_names, chamber_profile

PresetName = Literal["full", "mini", "warm"]


class Equipment(BaseModel):
    """Equipment values written in every script column (they win over every other layer)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    operator: str = ""
    sn_ccd1: str = ""
    sn_ccd2: str = ""
    sn_ccd3: str = ""
    sn_roe: str = ""
    sn_rpsu: str = ""


class TestEntry(BaseModel):
    """One test of a campaign: full name and parameter overrides (validated against the test's
    parameter model; after validation ``params`` holds every parameter)."""

    __test__ = False
    model_config = ConfigDict(extra="forbid")

    name: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _validate(self) -> "TestEntry":
        try:
            definition = get_test(self.name)
        except KeyError as exc:
            raise ValueError(f"name: {exc.args[0]}") from None
        except ValueError as exc:
            raise ValueError(f"name: {exc}") from None
        try:
            params = definition.params(self.params)
        except ValidationError as exc:
            raise ValueError(f"{definition.name} params.{validation_message(exc)}") from None
        except ValueError as exc:
            raise ValueError(f"{definition.name} params.{exc}") from None
        self.name = definition.name
        self.params = params.model_dump(mode="json")
        return self

    @property
    def definition(self) -> TestDefinition:
        return get_test(self.name)


class PresetTests(list):
    """The tests of a preset (a list of TestEntry) that can also give their scripts."""

    def scripts(self, chamber: str, equipment: Mapping[str, Any] | Equipment | None = None) -> list[Script]:
        """Scripts of every test for a chamber profile and equipment values."""
        return [t.definition.script(t.params, chamber, equipment) for t in self]


def campaign_preset(name: PresetName) -> PresetTests:
    """The tests (with parameter overrides) of a preset of campaign.md:
    ``full`` (every test at nominal parameters), ``mini`` (functional check with few frames),
    ``warm`` (warm functional: MOT_WARM + 3 biases). ``.scripts(chamber, equipment)`` gives the
    scripts directly."""
    return PresetTests(_preset(name))


def _preset(name: str) -> list[TestEntry]:
    if name == "full":
        names = (["BIAS01", "DARK01", "CHINJ01", "CHINJ02", "TP01", "TP11", "TP02", "TP21", "FLAT01"]
                 + [f"FLAT02_{nm}" for nm in (590, 730, 880)] + ["FLAT_STB", "PTC01"]
                 + [f"PTC02_{nm}" for nm in (590, 730, 880)] + ["PTC02_150K", "PTC02_156K"]
                 + [f"PTC02_{v}R" for v in ("15.5", "16.0", "16.5")]
                 + ["NL01", "NL02", "NL02_15.5R", "NL02_16.5R", "BF01"] + [f"BF01_{nm}" for nm in (590, 730, 880)]
                 + [f"FOCUS00_{nm}" for nm in (590, 730, 800, 880)] + [f"PSF01_{nm}" for nm in (590, 730, 800, 880)]
                 + ["PSF02", "PERSIST01", "COSMETICS00", "BIAS02"])
        return [TestEntry(name=n) for n in names]
    if name == "mini":
        return [
            TestEntry(name="BIAS01", params={"N": 3}),
            TestEntry(name="DARK01", params={"N": 1}),
            TestEntry(name="CHINJ01", params={"id_delays": [1250.0], "IG1_min": 2.5, "IG1_max": 6.5, "IG1_step": 1.0}),
            TestEntry(name="CHINJ02", params={"id_delays": [1250.0], "IDL_min": 9.5, "IDL_max": 12.5, "IDL_step": 1.0}),
            TestEntry(name="TP01", params={"cycles": 500, "tois": [200, 1000, 4000]}),
            TestEntry(name="TP02", params={"cycles": 500, "dwells": [0.0, 4.75, 14.3]}),
            TestEntry(name="FLAT01", params={"frames": [1, 1, 1]}),
            TestEntry(name="FLAT02_730", params={"fluences": [50.0], "frames": [2]}),
            *[TestEntry(name=f"FOCUS00_{nm}") for nm in (590, 800, 880)],
            TestEntry(name="PSF01_800", params={"fluences": [25.0, 50.0, 75.0], "frames": [4, 4, 4]}),
        ]
    if name == "warm":
        return [TestEntry(name="MOT_WARM"), TestEntry(name="BIAS01", params={"N": 3})]
    raise ValueError(f"preset: unknown preset {name!r} (full, mini, warm)")


class CampaignConfig(BaseModel):
    """What ``vison scriptgen --config`` reads (YAML). ``tests`` entries are a name or
    ``{name, params}``; with a ``preset``, entries of the same name override the preset's
    parameters and other entries are appended."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="campaign name (default: the preset name or 'custom')")
    block: str = Field(min_length=1, description="block name (BORN, CURIE, ...)")
    chamber: str = Field(description="chamber (OGSE) profile name of reference-data.json")
    operator: str | None = Field(None, description="operator initials (or equipment.operator)")
    equipment: Equipment = Field(default_factory=Equipment)
    date: dt.date | None = Field(None, description="date of the scripts (file names); default today")
    preset: PresetName | None = None
    tests: list[TestEntry] = Field(default_factory=list)

    @field_validator("chamber")
    @classmethod
    def _chamber(cls, value: str) -> str:
        if value not in chamber_names():
            raise ValueError(f"unknown chamber profile {value!r} (known: {', '.join(chamber_names())})")
        return value

    @model_validator(mode="after")
    def _complete(self) -> "CampaignConfig":
        op = self.operator or self.equipment.operator
        if not op:
            raise ValueError("operator: required (top level or equipment.operator)")
        if self.operator and self.equipment.operator and self.operator != self.equipment.operator:
            raise ValueError("operator: differs from equipment.operator")
        self.operator = op
        self.equipment = self.equipment.model_copy(update={"operator": op})
        tests = list(self.tests)
        if self.preset:
            preset = campaign_preset(self.preset)
            given = {t.name: t for t in tests}
            names = [t.name for t in preset]
            merged = [TestEntry(name=t.name, params={**_overrides(t), **_overrides(given[t.name])})
                      if t.name in given else t for t in preset]
            tests = merged + [t for t in tests if t.name not in names]
        if not tests:
            raise ValueError("tests: a campaign needs at least one test (or a preset)")
        seen: set[str] = set()
        for i, t in enumerate(tests):
            if t.name in seen:
                raise ValueError(f"tests.{i}: {t.name} appears twice (name repeats NAME.2, NAME.3, ...)")
            seen.add(t.name)
        for i, t in enumerate(tests):
            needs = t.definition.data_from
            if needs and needs not in seen:
                raise ValueError(f"tests.{i}: {t.name} re-uses the frames of {needs}, which is not in the campaign")
            try:
                t.definition.script(t.params, self.chamber, self.equipment)
            except ValueError as exc:
                raise ValueError(f"tests.{i}: {t.name} with chamber {self.chamber}: {exc}") from None
        self.tests = tests  # complete: re-validating with the same preset changes nothing
        return self

    def define(self) -> "CampaignDefinition":
        """The campaign definition (scripts, expected frames, durations)."""
        return define_campaign(self)

    def scripts(self, chamber: str | None = None, equipment: Mapping[str, Any] | Equipment | None = None) -> list[Script]:
        """Scripts of every test (default: the configuration's chamber and equipment)."""
        chamber = chamber or self.chamber
        equip = self.equipment if equipment is None else equipment
        return [t.definition.script(t.params, chamber, equip) for t in self.tests]


def _overrides(entry: TestEntry) -> dict[str, Any]:
    """Parameters of an entry that differ from the nominal ones."""
    nominal = entry.definition.params().model_dump(mode="json")
    return {k: v for k, v in entry.params.items() if nominal.get(k) != v}


class TestPlan(BaseModel):
    """One test of a campaign definition."""

    __test__ = False
    model_config = ConfigDict(frozen=True)

    name: str
    family: str
    order: int = Field(description="position in the campaign (0-based)")
    params: dict[str, Any]
    script: Script
    expected_frames: int = Field(description="frames the test acquires (0 when it re-uses data)")
    duration_s: float = Field(description="estimated duration (s)")
    start_offset_s: float = Field(description="estimated start after the campaign start (s)")
    data_from: str | None = Field(None, description="test whose frames are analysed (BF01 -> PTC01)")


class CampaignDefinition(BaseModel):
    """Everything the validator and analyzer need to know what to expect (JSON-serialisable)."""

    model_config = ConfigDict(frozen=True)

    schema_version: int = 1
    campaign: str = Field("custom", description="campaign name (or preset)")
    block: str
    chamber: str
    chamber_profile: dict[str, Any]
    equipment: Equipment
    date: dt.date | None = None
    script_keys: list[str] = Field(default_factory=lambda: list(SCRIPT_KEYS))
    tests: list[TestPlan]
    total_frames: int
    duration_s: float

    def test(self, name: str) -> TestPlan:
        """The plan of a test by name (KeyError when absent)."""
        for t in self.tests:
            if t.name == name:
                return t
        raise KeyError(f"test {name!r} is not in the campaign of block {self.block}")

    def expected_frames(self) -> dict[str, int]:
        return {t.name: t.expected_frames for t in self.tests}


def define_campaign(config: CampaignConfig) -> CampaignDefinition:
    """Scripts, frame counts and durations of every test of a validated configuration."""
    plans: list[TestPlan] = []
    offset = 0.0
    for i, entry in enumerate(config.tests):
        definition = entry.definition
        script = definition.script(entry.params, config.chamber, config.equipment)
        plans.append(TestPlan(name=definition.name, family=definition.family.name, order=i, params=entry.params,
                              script=script, expected_frames=script.total_frames, duration_s=script.duration_s,
                              start_offset_s=offset, data_from=definition.data_from))
        offset += script.duration_s
    return CampaignDefinition(campaign=config.name or config.preset or "custom", block=config.block, chamber=config.chamber, chamber_profile=chamber_profile(config.chamber),
                              equipment=config.equipment, date=config.date, tests=plans,
                              total_frames=sum(p.expected_frames for p in plans), duration_s=offset)


#: most YAML nodes a configuration may expand to (aliases counted each time they are used):
#: a "billion laughs" document is refused instead of hanging the validation
MAX_YAML_NODES = 100_000


def _expanded_nodes(node: yaml.Node, memo: dict[int, int]) -> int:
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias counts once (the constructor handles the cycle)
    if isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_nodes(n, memo) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_nodes(k, memo) + _expanded_nodes(v, memo) for k, v in node.value)
    else:
        total = 1
    memo[key] = min(total, MAX_YAML_NODES + 1)
    return memo[key]


def _load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` that refuses malformed YAML and alias bombs with a ValueError naming the source."""
    try:
        loader = yaml.SafeLoader(text)
    except yaml.YAMLError as exc:  # the reader checks the characters at once
        raise ValueError(f"campaign configuration {source}: invalid YAML: {exc}") from None
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, {}) > MAX_YAML_NODES:
            raise ValueError(f"campaign configuration {source}: more than {MAX_YAML_NODES} YAML nodes "
                             "once aliases are expanded (refused)")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ValueError(f"campaign configuration {source}: invalid YAML: {exc}") from None
    except RecursionError:
        raise ValueError(f"campaign configuration {source}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def load_campaign_config(source: str | Path | Mapping[str, Any]) -> CampaignConfig:
    """A configuration from a YAML file path, YAML text or a mapping (ValidationError on a bad
    field; ValueError naming the file or ``<text>`` for malformed YAML or a non-mapping)."""
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        path = Path(source) if not (isinstance(source, str) and "\n" in source) else None
        name = str(path) if path is not None else "<text>"
        try:
            text = path.read_bytes().decode("utf-8") if path is not None else str(source)
        except UnicodeDecodeError as exc:
            raise ValueError(f"campaign configuration {name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        data = _load_yaml(text, name) or {}
        if not isinstance(data, dict):
            raise ValueError(f"campaign configuration {name}: expected a mapping at the top level, "
                             f"got {type(data).__name__}")
    return CampaignConfig.model_validate(data)


#: Alias (a campaign YAML file -> CampaignConfig).
load_campaign = load_campaign_config
