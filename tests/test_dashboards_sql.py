"""Every SQL query of the catalogue boards (Exposure log, Results, FPA: deploy/grafana/generate.py)
against a real PostgreSQL holding a simulated catalogue, filled through services/catalogue from
synthetic events. Grafana's substitutions are done the way Grafana does them for a PostgreSQL
data source: a single-value variable is inserted as is, a multi-value one (or All) as a quoted,
comma-separated list, ``$__timeFilter(col)`` as ``col BETWEEN '<from>' AND '<to>'`` (RFC 3339, UTC).
Each panel must return the rows the events imply."""

from __future__ import annotations

import importlib.util
import json
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from services.catalogue import synthetic as syn
from services.catalogue.fpa import fpa_blocks
from services.catalogue.store import Catalogue

REPO = Path(__file__).resolve().parents[1]
GRAFANA = REPO / "deploy" / "grafana"
RANGE = (datetime(2026, 2, 28, tzinfo=timezone.utc), datetime(2026, 3, 10, tzinfo=timezone.utc))


def generator():
    spec = importlib.util.spec_from_file_location("vison_grafana_generate_sql", GRAFANA / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def substitute(sql: str, variables: dict[str, str | list[str]], time_range=RANGE) -> str:
    """``sql`` as Grafana sends it to PostgreSQL."""
    start, end = (t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in time_range)
    sql = re.sub(r"\$__timeFilter\(([^)]+)\)", lambda m: f"{m.group(1).strip()} BETWEEN '{start}' AND '{end}'", sql)
    sql = sql.replace("$__timeFrom()", f"'{start}'").replace("$__timeTo()", f"'{end}'")
    for name in sorted(variables, key=len, reverse=True):
        value = variables[name]
        text = ",".join(_quote(v) for v in value) if isinstance(value, list) else str(value)
        sql = sql.replace(f"${{{name}}}", text).replace(f"${name}", text)
    assert "$" not in sql, f"unsubstituted Grafana variable or macro in {sql}"
    return sql


@pytest.fixture(scope="module")
def boards():
    return {m["uid"]: m for m in generator().build_sql_dashboards().values()}


@pytest.fixture
def db(pg_url):
    """The simulated catalogue on a fresh PostgreSQL database; yields a query function."""
    import psycopg

    with Catalogue(pg_url) as cat:
        for obsid, test, flags in ((1, "BIAS01", 0), (2, "BIAS01", 0), (3, "BIAS01", 4),
                                   (4, "PTC01", 0), (5, "PTC01", 2), (6, "PTC01", 0)):
            cat.add(syn.exposure(obsid, test=test, flags=flags))
        cat.add(syn.exposure(1, block="DIRAC", test="BIAS01", flags=4))
        cat.add(syn.analysis("PTC01", when=syn.T0 + timedelta(hours=1)))
        cat.add(syn.analysis("PTC01", when=syn.T0 + timedelta(hours=2), values={"turnoff_adu": 60000}))
        cat.add(syn.analysis("BIAS01", when=syn.T0 + timedelta(hours=3)))
        cat.add(syn.analysis("BIAS02", when=syn.T0 + timedelta(days=2), shift=0.1))
        cat.add(syn.analysis("PTC01", block="DIRAC"))
        for family in ("ptc", "bias", "dark", "flat"):  # each holds the 4 quantities: the panels pick theirs
            cat.add(syn.metatest(family, ["BORN", "DIRAC", "CURIE", "SKLODOWSKA"]))
        cat.add(syn.metatest("bf", ["GUYE"]))  # another family with a gain map: not on the Gain panel
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
    conn = psycopg.connect(dsn, autocommit=True)

    def query(sql: str) -> list[tuple]:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()

    yield query
    conn.close()


def panels(model: dict) -> dict[str, dict]:
    return {p["title"]: p for p in model["panels"] if p["type"] != "row"}


def run_panel(db, panel: dict, variables: dict, time_range=RANGE) -> list[tuple]:
    (t,) = panel["targets"]
    return db(substitute(t["rawSql"], variables, time_range))


def resolve_variables(db, model: dict, chosen: dict[str, str]) -> dict[str, str | list[str]]:
    """Run each variable's query in order (later ones may use earlier ones), like Grafana:
    a multi-value variable left at All takes every value its query returns."""
    values: dict[str, str | list[str]] = {}
    for var in model["templating"]["list"]:
        options = [r[0] for r in db(substitute(var["query"], values))]
        assert options, f"variable {var['name']} has no values"
        if var["name"] in chosen:
            assert chosen[var["name"]] in options, (var["name"], options)
            values[var["name"]] = [chosen[var["name"]]] if var.get("multi") else chosen[var["name"]]
        else:
            values[var["name"]] = options if var.get("includeAll") else options[0]
    return values


def test_every_sql_query_runs_and_returns_rows(db, boards):
    chosen = {"vison-exposure-log": {"block": "BORN"}, "vison-results": {"block": "BORN", "test": "PTC01",
                                                                        "quantity": "gain"}, "vison-fpa": {}}
    assert set(boards) == set(chosen)
    n = 0
    for uid, model in boards.items():
        variables = resolve_variables(db, model, chosen[uid])
        for title, panel in panels(model).items():
            assert panel["datasource"]["uid"] == "vison-catalogue"
            for t in panel["targets"]:
                assert db(substitute(t["rawSql"], variables)), f"{uid} / {title}: no rows"
                n += 1
    assert n == 13


def test_variables(db, boards):
    log = boards["vison-exposure-log"]
    assert resolve_variables(db, log, {}) == {"block": "BORN", "test": ["BIAS01", "PTC01"]}
    res = boards["vison-results"]
    v = resolve_variables(db, res, {"block": "BORN", "test": "BIAS01"})
    assert v["quantity"] == "offset_pre"
    quantities = [r[0] for r in db(substitute(res["templating"]["list"][2]["query"], {"block": "BORN", "test": "PTC01"}))]
    assert quantities == ["a00", "bloom_adu", "gain", "turnoff_adu"]


def test_exposure_log_table_counts_and_test_filter(db, boards):
    p = panels(boards["vison-exposure-log"])
    every = {"block": "BORN", "test": ["BIAS01", "PTC01"]}
    rows = run_panel(db, p["Latest exposures"], every)
    assert [r[1] for r in rows] == [6, 5, 4, 3, 2, 1]  # newest first
    t, obsid, test, c1, c2, c3, verdict, flags = rows[3]
    assert (obsid, test, verdict, flags) == (3, "BIAS01", "FAIL", "BADDATA")
    assert (c1, c2, c3) == pytest.approx((1101.5 + 0.003, 1201.5 + 0.003, 1301.5 + 0.003))
    assert t == syn.T0 + timedelta(minutes=3)
    assert [(r[1], r[6], r[7]) for r in run_panel(db, p["Latest exposures"], {"block": "BORN", "test": ["PTC01"]})] \
        == [(6, "PASS", ""), (5, "FAIL", "POORQUALDATA"), (4, "PASS", "")]
    assert run_panel(db, p["Latest exposures"], every, (RANGE[0] - timedelta(days=30), RANGE[0])) == []
    assert run_panel(db, p["Exposures per verdict per test"], every) == [("BIAS01", 2, 1), ("PTC01", 2, 1)]
    assert run_panel(db, p["Exposures per verdict per test"], {"block": "DIRAC", "test": ["BIAS01"]}) == [("BIAS01", 0, 1)]
    assert run_panel(db, p["Exposures by verdict"], every) == [("FAIL", 2), ("PASS", 4)]
    series = run_panel(db, p["Prescan offset per CCD"], {"block": "BORN", "test": ["BIAS01"]})
    assert [r[0] for r in series] == [syn.T0 + timedelta(minutes=i) for i in (1, 2, 3)]
    assert series[0][3] == pytest.approx(1301.5 + 0.001)


def test_results_board_latest_grid_and_history(db, boards):
    p = panels(boards["vison-results"])
    v = {"block": "BORN", "test": "PTC01", "quantity": "gain"}
    grid = run_panel(db, p["$quantity per quadrant ($test, latest analysis)"], v)
    assert grid == [(f"CCD{c}", *[syn.gain_of(c, q) for q in "EFGH"], "e-/ADU") for c in (1, 2, 3)]
    values = run_panel(db, p["$quantity values ($test, latest analysis)"], v)
    assert len(values) == 12
    ccd, q, value, err, unit, repeat, version, produced = values[4]
    assert (ccd, q, value, err, unit, repeat, version) == ("CCD2", "E", syn.gain_of(2, "E"), 0.002, "e-/ADU", 0, "0.1.0")
    assert produced == syn.T0 + timedelta(hours=2)  # the latest of the two PTC01 analyses
    ron = {"block": "BORN", "test": "BIAS01", "quantity": "ron_img_adu"}
    history = run_panel(db, p["History of $quantity (every test)"], ron)
    assert len(history) == 24 and {r[0] for r in history} == {syn.T0 + timedelta(hours=3), syn.T0 + timedelta(days=2)}
    assert history[0][1:] == ("CCD1.E", syn.ron_of(1, "E")) and history[-1][1:] == ("CCD3.H", syn.ron_of(3, "H", 0.1))
    analyses = run_panel(db, p["Analyses of $quantity"], ron)
    assert [(r[1], r[7]) for r in analyses] == [("BIAS02", 12), ("BIAS01", 12)]
    assert analyses[0][4] == pytest.approx(sum(syn.ron_of(c, q, 0.1) for c in (1, 2, 3) for q in "EFGH") / 12)
    assert len(run_panel(db, p["History of $quantity (every test)"], v)) == 24  # both PTC01 analyses


def test_fpa_grids_and_blocks_in(db, boards):
    p = panels(boards["vison-fpa"])
    gen = generator()
    for title, _, quantity, unit, _ in gen.FPA_MAPS:
        rows = run_panel(db, p[f"{title} ({unit})"], {})
        assert len(rows) == 12 and all(len(r) == 13 for r in rows), title
        assert [r[0] for r in rows] == [f"S{s} {h}" for s in range(6, 0, -1) for h in ("top", "bottom")]
        present = sum(v is not None for r in rows for v in r[1:])
        assert present == 3 * 4 * 3, title  # BORN, DIRAC, CURIE (the spare is not on the grid)
    gain = {r[0]: r[1:] for r in run_panel(db, p["Gain (e-/ADU)"], {})}
    born, dirac, curie = (fpa_blocks().index(b) for b in ("BORN", "DIRAC", "CURIE"))
    # slice 1, columns 1-3 = BORN CCD1..3 (E top-left, F top-right, H bottom-left, G bottom-right)
    assert gain["S1 top"][:6] == tuple(syn.gain_of(c, q, born) for c in (1, 2, 3) for q in "EF")
    assert gain["S1 bottom"][:6] == tuple(syn.gain_of(c, q, born) for c in (1, 2, 3) for q in "HG")
    # columns 4-6 = DIRAC CCD3..1 rotated 180 deg (G top-left, H top-right, F bottom-left, E bottom-right)
    assert gain["S1 top"][6:] == tuple(syn.gain_of(c, q, dirac) for c in (3, 2, 1) for q in "GH")
    assert gain["S1 bottom"][6:] == tuple(syn.gain_of(c, q, dirac) for c in (3, 2, 1) for q in "FE")
    assert gain["S6 top"][6:] == tuple(syn.gain_of(c, q, curie) for c in (3, 2, 1) for q in "GH")
    assert gain["S2 top"] == (None,) * 12  # GUYE and FOWLER missing: blank
    rows = run_panel(db, p["Blocks in"], {})
    assert [(r[0], r[1]) for r in rows] == [("bf", 1), ("bias", 3), ("dark", 3), ("flat", 3), ("ptc", 3)]
    family, n_in, names_in, missing, updated = rows[-1]
    assert (family, n_in, names_in) == ("ptc", 3, "BORN DIRAC CURIE")
    order = fpa_blocks()
    assert missing.split() == sorted((b for b in order if b not in ("BORN", "DIRAC", "CURIE")),
                                     key=lambda b: (order.index(b) // 2, b))  # by slice, then name
    assert updated == syn.T0 + timedelta(hours=2)


def test_committed_sql_boards_reference_the_provisioned_postgres_source():
    import yaml

    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "vison.yml").read_text())
    (pg,) = [d for d in doc["datasources"] if d["uid"] == "vison-catalogue"]
    assert pg["type"] == "grafana-postgresql-datasource" and pg["url"] == "postgres:5432"
    assert pg["user"] == "$POSTGRES_USER" and pg["secureJsonData"]["password"] == "$POSTGRES_PASSWORD"
    gen = generator()
    for name, model in gen.build_sql_dashboards().items():
        path = GRAFANA / "dashboards" / name
        assert json.loads(path.read_text()) == model, f"{name}: run python deploy/grafana/generate.py"
        text = json.dumps(model)
        assert "vison-prometheus" not in text and text.count('"uid": "vison-catalogue"') >= len(model["panels"])
