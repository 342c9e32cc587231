"""Prometheus configuration and alert rules (deploy/prometheus): generated rules equal the
committed ones, every HK key is covered with the right severity, and promtool accepts the config
and the rules and passes the rule unit tests (deploy/prometheus/tests/*.test.yml)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from shared.refdata import elvis_formats

REPO = Path(__file__).resolve().parents[1]
PROM = REPO / "deploy" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus: make system-deps, as root)")


def _generator():
    spec = importlib.util.spec_from_file_location("vison_generate_rules", PROM / "generate_rules.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rules(name: str) -> list[dict]:
    doc = yaml.safe_load((PROM / "rules" / name).read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def test_committed_hk_rules_equal_generated():
    gen = _generator()
    assert (PROM / "rules" / "hk.rules.yml").read_text() == gen.render(gen.build_rules(elvis_formats())), \
        "run: python deploy/prometheus/generate_rules.py"
    assert gen.main(["--check"]) == 0


def test_every_safe_limit_key_has_a_rule_with_its_bounds():
    spec = elvis_formats()
    safe = spec["hk_limits_7.5.X"]["S"]
    rules = _rules("hk.rules.yml")
    by_key: dict[str, list[dict]] = {}
    for r in rules:
        by_key.setdefault(r["labels"]["hk_key"], []).append(r)
    assert set(by_key) == set(safe)
    assert len(safe) == 82
    lo, hi = safe["RPSU_VCCD_V"][1:]
    (r,) = by_key["RPSU_VCCD_V"]
    assert r["alert"] == "HKSafeLimit" and r["labels"]["severity"] == "warning"
    assert r["expr"] == f'vison_hk_value{{param="RPSU_VCCD_V"}} <= {lo} or vison_hk_value{{param="RPSU_VCCD_V"}} >= {hi:g}'
    (r,) = by_key["SPW_STATUS_REG"]
    assert r["expr"] == 'vison_hk_value{param="SPW_STATUS_REG"} != 12192'
    for r in rules:  # latched
        assert r["for"] == "1m" and r["keep_firing_for"] == "10m"


def test_critical_keys_have_one_rule_per_side_with_their_severity():
    spec = elvis_formats()
    crit = {k: v for k, v in spec["hk_critical_keys"].items() if not k.startswith("_")}
    safe = spec["hk_limits_7.5.X"]["S"]
    rules = [r for r in _rules("hk.rules.yml") if r["alert"] == "HKCriticalLimit"]
    assert len(rules) == 2 * len(crit) == 20
    sev = {1: "warning", 2: "page"}
    for r in rules:
        key, side = r["labels"]["hk_key"], r["labels"]["side"]
        assert r["labels"]["severity"] == sev[crit[key][side]]
        bound = safe[key][2] if side == "above" else safe[key][1]
        op = ">=" if side == "above" else "<="
        assert r["expr"] == f'vison_hk_value{{param="{key}"}} {op} {bound:g}'
    vid_below = next(r for r in rules if r["labels"]["hk_key"] == "VID_PCB_TEMP_T" and r["labels"]["side"] == "below")
    assert vid_below["labels"]["severity"] == "warning"


def test_pipeline_rules_cover_stall_dead_letters_and_down():
    names = {r["alert"] for r in _rules("pipeline.rules.yml")}
    assert {"VisonServiceDown", "VisonPipelineStalled", "VisonDeadLetters", "HKStale"} <= names
    for r in _rules("pipeline.rules.yml") + _rules("hk.rules.yml"):
        assert r["labels"]["severity"] in ("info", "warning", "page"), r["alert"]


def test_scrape_config_covers_every_service_and_the_broker():
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    ports = {"ingest": 9101, "validator": 9102, "analyzer": 9103, "metatest": 9104, "scriptgen": 9105}
    for service, port in ports.items():
        (sd,) = jobs[service]["dns_sd_configs"]  # DNS: every replica of a scaled service
        assert sd["names"] == [service] and sd["port"] == port and sd["type"] == "A"
    assert jobs["rabbitmq"]["static_configs"][0]["targets"] == ["rabbitmq:15692"]
    assert cfg["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    for service, port in ports.items():
        assert compose[service]["environment"]["VISON_METRICS_PORT"] == str(port)


@needs_promtool
def test_promtool_check_config_and_rules():
    out = subprocess.run([PROMTOOL, "check", "config", "prometheus.yml"], cwd=PROM, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 2 rule files found" in out.stdout + out.stderr
    rules = sorted(str(p) for p in (PROM / "rules").glob("*.yml"))
    out = subprocess.run([PROMTOOL, "check", "rules", *rules], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 92 rules found" in out.stdout


@needs_promtool
def test_promtool_rule_unit_tests_pass():
    tests = sorted(str(p) for p in (PROM / "tests").glob("*.test.yml"))
    assert len(tests) == 2
    out = subprocess.run([PROMTOOL, "test", "rules", *tests], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_promtool_unit_tests_catch_a_broken_latch(tmp_path):
    """The unit tests can fail: with the latch shortened to 1 min the CCD-temperature test fails."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    text = (PROM / "rules" / "hk.rules.yml").read_text().replace("keep_firing_for: 10m", "keep_firing_for: 1m")
    (tmp_path / "rules" / "hk.rules.yml").write_text(text)
    shutil.copy(PROM / "tests" / "hk.test.yml", tmp_path / "tests")
    out = subprocess.run([PROMTOOL, "test", "rules", str(tmp_path / "tests" / "hk.test.yml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "ccd temperature above the safe limit pages, latched then resolved" in out.stdout + out.stderr
