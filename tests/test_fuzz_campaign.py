"""Fuzzed campaign YAML through ``shared.campaign.load_campaign_config``: valid configurations
(round-trip), fields replaced by random YAML values (wrong types, unknown keys and tests, huge
numbers, deep nesting), malformed YAML and alias bombs. Property: a :class:`CampaignConfig` or a
``ValidationError`` (naming the field) / ``ValueError`` (naming the source and the reason), no
other exception, within the deadline."""

from __future__ import annotations

import string
import tempfile
from pathlib import Path

import yaml
from hypothesis import example, given, strategies as st
from pydantic import ValidationError

from shared.campaign import CampaignConfig, load_campaign_config
from shared.refdata import chamber_names
from tests.test_fuzz_strategies import assert_names, count, json_values, junk_text, scaled

CHEAP_TESTS = ["BIAS01", "BIAS02", "DARK01", "FLAT01", "COSMETICS00", "MOT_WARM", "FLAT02_730", "PTC01", "NL01"]
names = st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)


@st.composite
def configs(draw):
    tests = draw(st.lists(st.sampled_from(CHEAP_TESTS), min_size=0, max_size=4, unique=True))
    entries = [t if draw(st.booleans()) or t != "BIAS01" else {"name": t, "params": {"N": draw(st.integers(1, 20))}}
               for t in tests]
    cfg = {"block": draw(names), "chamber": draw(st.sampled_from(chamber_names())), "operator": draw(names),
           "tests": entries}
    if not tests or draw(st.booleans()):
        cfg["preset"] = draw(st.sampled_from(["mini", "warm"]))
    if draw(st.booleans()):
        cfg["equipment"] = {"sn_ccd1": draw(names), "sn_roe": draw(names)}
    return cfg


@st.composite
def broken_configs(draw):
    cfg = draw(configs())
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(["block", "chamber", "operator", "tests", "preset", "equipment", "date", "name",
                                    "bogus"]))
        cfg[key] = draw(st.one_of(json_values, st.just([{"name": "NOPE01"}]), st.just([{"name": "BIAS01",
                                  "params": {"N": 10**30}}]), st.just([{"name": "PTC01", "params": {"frames": "x"}}])))
    return cfg


def _check_load(source, name: str):
    count("campaign")
    try:
        config = load_campaign_config(source)
    except ValidationError as exc:
        assert exc.errors() and all(e["msg"] for e in exc.errors())
        return None
    except ValueError as exc:
        assert_names(exc, name)
        return None
    assert isinstance(config, CampaignConfig) and config.tests
    return config


@scaled(0.4)
@given(configs())
def test_valid_configurations_load_and_round_trip(cfg):
    config = _check_load(yaml.safe_dump(cfg) + "\n", "<text>")
    assert config is not None, cfg
    assert config.block == cfg["block"] and config.chamber == cfg["chamber"]
    again = load_campaign_config(yaml.safe_dump(config.model_dump(mode="json")) + "\n")
    assert again.model_dump() == config.model_dump()


@scaled(0.5)
@given(broken_configs())
def test_broken_fields_give_a_validation_error_naming_the_field(cfg):
    _check_load(yaml.safe_dump(cfg, allow_unicode=True) + "\n", "<text>")


@given(st.one_of(junk_text.map(lambda t: t + "\n"), st.sampled_from([
    "a: [\n", "- 1\n- 2\n", "block: *nope\n", "? [a]\n: 1\n", "block: !!python/object:os.system x\n",
    "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n", "x: " + "[" * 200 + "]" * 200 + "\n",
])))
@example("a: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
         "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\ntests: [*e,*e,*e,*e,*e,*e,*e,*e,*e]\n")
def test_malformed_yaml_text_gives_a_value_error_naming_the_source(text):
    _check_load(text, "<text>")


@scaled(0.3)
@given(st.binary(max_size=300))
def test_yaml_files_name_the_file(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "campaign.yaml"
        path.write_bytes(raw)
        _check_load(path, str(path))
