"""Grafana boards (deploy/grafana): committed JSON equals the generator's output, structure of
the JSON models (unique ids, layout, data-source references to the provisioned uid), coverage
of every HK parameter with its limits, provisioning files."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from shared.refdata import elvis_formats

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "deploy" / "grafana"
BOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))


def generator():
    spec = importlib.util.spec_from_file_location("vison_grafana_generate", GRAFANA / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def all_panels(model: dict) -> list[dict]:
    out = []
    for p in model["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def provisioned_uid() -> str:
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "vison.yml").read_text())
    (prom,) = [d for d in doc["datasources"] if d["type"] == "prometheus"]
    assert prom["url"] == "http://prometheus:9090" and prom["isDefault"]
    return prom["uid"]


def test_committed_dashboards_equal_generated():
    gen = generator()
    models = gen.build_dashboards()
    assert sorted(models) == [p.name for p in BOARDS] == ["vison-exposure-qa.json", "vison-hk.json", "vison-pipeline.json"]
    for path in BOARDS:
        assert path.read_text() == gen.render(models[path.name]), f"{path.name}: run python deploy/grafana/generate.py"
    assert gen.main(["--check"]) == 0


@pytest.mark.parametrize("path", BOARDS, ids=lambda p: p.stem)
def test_dashboard_structure(path):
    model = json.loads(path.read_text())
    uid = provisioned_uid()
    for key in ("uid", "title", "panels", "schemaVersion", "templating", "time", "refresh", "tags"):
        assert key in model, key
    assert re.fullmatch(r"[a-z0-9-]{1,40}", model["uid"])
    assert isinstance(model["schemaVersion"], int) and model["schemaVersion"] >= 36
    panels = all_panels(model)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    cells = set()
    for p in panels:
        assert p["type"] in ("row", "timeseries", "stat", "table", "heatmap", "state-timeline", "barchart"), p["type"]
        assert p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):  # no two panels overlap
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps at {x},{y}"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": uid}
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": uid}
            assert t["expr"].strip()
        steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert steps[0]["value"] is None
        values = [s["value"] for s in steps[1:]]
        assert values == sorted(values), f"{p['title']}: threshold steps not increasing"
    for var in model["templating"]["list"]:
        if var["type"] == "query":
            assert var["datasource"]["uid"] == uid
        used = f"${var['name']}"
        assert any(used in t["expr"] for p in panels for t in p.get("targets", [])), f"unused variable {used}"


def test_hk_board_has_every_parameter_grouped_with_limit_bands():
    spec = elvis_formats()
    gen = generator()
    model = json.loads((GRAFANA / "dashboards" / "vison-hk.json").read_text())
    safe = spec["hk_limits_7.5.X"]["S"]
    params = [c for c in spec["hk_columns"]["7.5.X"] if c != "TimeStamp"]
    assert len(params) == 82
    rows = [p["title"] for p in model["panels"] if p["type"] == "row"]
    assert rows == ["Out-of-limit flags (latched over $latch)", "CCD temperatures", "ROE temperatures",
                    "Bias voltages", "ROE supplies", "RPSU", "Status flags"]
    assert all(gen.hk_group_of(p, spec) != "Other" for p in params)
    panels = {p["title"]: p for p in all_panels(model)}
    exprs = " ".join(t["expr"] for p in panels.values() for t in p.get("targets", []))
    for param in params:
        assert f'"{param}"' in exprs or re.search(rf"[~|\"]{re.escape(param)}[|\"]", exprs), param
        if safe[param][0] == "A":
            steps = panels[param]["fieldConfig"]["defaults"]["thresholds"]["steps"]
            assert [(s["color"], s["value"]) for s in steps] == [("red", None), ("green", safe[param][1]),
                                                                 ("red", safe[param][2])], param
            assert panels[param]["fieldConfig"]["defaults"]["custom"]["thresholdsStyle"]["mode"] == "line+area"
    ccd = panels["CCD1_TEMP_T"]
    assert ccd["fieldConfig"]["defaults"]["unit"] == "celsius"
    assert [t["expr"] for t in ccd["targets"]] == ['vison_hk_value{block=~"$block", param="CCD1_TEMP_T"}',
                                                   'max by (bound) (vison_hk_limit{param="CCD1_TEMP_T", kind="P"})']
    assert panels["RPSU_VCCD_I"]["fieldConfig"]["defaults"]["unit"] == "amp"
    grid = panels["Safe (S) limits"]
    assert "max_over_time(vison_hk_out_of_limits{kind=\"S\"}[$latch])" in grid["targets"][0]["expr"]
    spw = panels["SPW_STATUS_REG"]["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in spw] == [None, 12192, 12193]


def test_qa_and_pipeline_boards_use_contract_metrics():
    qa = json.loads((GRAFANA / "dashboards" / "vison-exposure-qa.json").read_text())
    pipe = json.loads((GRAFANA / "dashboards" / "vison-pipeline.json").read_text())
    text = json.dumps(qa) + json.dumps(pipe)
    for metric in ("vison_quadrant_offset_adu", "vison_quadrant_noise_adu", "vison_exposure_flag_total",
                   "vison_validation_latency_seconds_bucket", "vison_exposures_validated_total",
                   "vison_events_published_total", "vison_events_consumed_total", "vison_events_failed_total",
                   "vison_queue_depth", "vison_dead_lettered_total", "vison_processing_seconds_bucket",
                   "vison_analysis_duration_seconds_bucket", "vison_analyses_total", "rabbitmq_queue_messages"):
        assert metric in text, metric
    titles = {p["title"] for p in all_panels(qa)}
    assert {"Offset CCD1", "Offset CCD2", "Offset CCD3", "Noise CCD1", "Noise CCD2", "Noise CCD3"} <= titles


def test_dashboard_provider_points_at_the_mounted_folder():
    doc = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "vison.yml").read_text())
    (prov,) = doc["providers"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{prov['options']['path']}:ro" in compose["volumes"]
    assert compose["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == prov["options"]["path"] + "/vison-hk.json"
    assert generator().DATASOURCE_UID == provisioned_uid() == "vison-prometheus"


SQL_BOARDS = sorted((GRAFANA / "dashboards" / "catalogue").glob("*.json"))


def test_committed_sql_dashboards_equal_generated():
    gen = generator()
    models = gen.build_sql_dashboards()
    assert sorted(models) == [f"catalogue/{p.name}" for p in SQL_BOARDS] == [
        "catalogue/vison-exposure-log.json", "catalogue/vison-fpa.json", "catalogue/vison-results.json"]
    for name, model in models.items():
        assert (GRAFANA / "dashboards" / name).read_text() == gen.render(model), name


@pytest.mark.parametrize("path", SQL_BOARDS, ids=lambda p: p.stem)
def test_sql_dashboard_structure(path):
    """The catalogue boards: unique ids, no overlaps, every query raw SQL on the provisioned
    PostgreSQL data source, every variable used (their queries run in tests/test_dashboards_sql.py)."""
    model = json.loads(path.read_text())
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "vison.yml").read_text())
    (pg,) = [d for d in doc["datasources"] if d["type"] == "grafana-postgresql-datasource"]
    ds = {"type": pg["type"], "uid": pg["uid"]}
    assert re.fullmatch(r"[a-z0-9-]{1,40}", model["uid"]) and model["schemaVersion"] >= 36
    panels = all_panels(model)
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        assert p["type"] in ("row", "timeseries", "stat", "table", "barchart"), p["type"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps at {x},{y}"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"] == ds and p["targets"]
        for t in p["targets"]:
            assert t["datasource"] == ds and t["rawSql"].strip().upper().startswith("SELECT")
            assert t["format"] in ("table", "time_series") and "expr" not in t
    sql = " ".join(t["rawSql"] for p in panels for t in p.get("targets", [])) + " ".join(
        p["title"] for p in panels) + " ".join(v["query"] for v in model["templating"]["list"])
    for var in model["templating"]["list"]:
        assert var["datasource"] == ds
        assert f"${var['name']}" in sql, f"unused variable {var['name']}"
