"""``vison results query`` / ``history`` on a catalogue filled from synthetic events (SQLite and
PostgreSQL): the table, CSV and JSON outputs hold the catalogued values; the catalogue URL comes
from VISON_CATALOGUE_URL; ``results tail`` keeps its arguments."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from services.catalogue import synthetic as syn
from services.catalogue.store import Catalogue
from services.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def filled(catalogue_db_url):
    with Catalogue(catalogue_db_url) as cat:
        cat.add(syn.analysis("PTC01", when=syn.T0))
        cat.add(syn.analysis("PTC01", when=syn.T0 + timedelta(hours=1)))  # the latest PTC01
        cat.add(syn.analysis("PTC01", block="DIRAC"))
        cat.add(syn.analysis("BIAS01", when=syn.T0, version="0.1.0"))
        cat.add(syn.analysis("BIAS02", when=syn.T0 + timedelta(days=1), shift=0.1, version="0.2.0"))
    return catalogue_db_url


def test_query_table_csv_json(filled, capsys):
    assert main(["results", "query", "gain", "--test", "PTC01", "--block", "BORN", "--url", filled]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["block", "ccd", "quadrant", "value", "error", "unit", "test", "repeat", "produced"]
    assert len(lines) == 13
    assert lines[6].split() == ["BORN", "CCD2", "F", "3.21", "0.002", "e-/ADU", "PTC01", "0", "2026-03-01T09:00:00Z"]

    assert main(["results", "query", "gain", "--test", "PTC01", "--block", "BORN", "--url", filled, "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 12 and rows[11]["ccd"] == "CCD3" and rows[11]["quadrant"] == "H"
    assert float(rows[11]["value"]) == syn.gain_of(3, "H")

    assert main(["results", "query", "gain", "--url", filled, "--json", "--all"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data) == 36 and {d["block"] for d in data} == {"BORN", "DIRAC"}
    assert data[0]["produced"] == "2026-03-01T08:00:00Z" and data[0]["value"] == syn.gain_of(1, "E")


def test_history_across_tests_and_time(filled, capsys):
    assert main(["results", "history", "ron_img_adu", "--block", "BORN", "--url", filled, "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["test"], r["version"], r["produced"]) for r in rows] == [
        ("BIAS01", "0.1.0", "2026-03-01T08:00:00Z"), ("BIAS02", "0.2.0", "2026-03-02T08:00:00Z")]
    assert float(rows[0]["CCD2.G"]) == syn.ron_of(2, "G")
    assert float(rows[1]["CCD2.G"]) == pytest.approx(syn.ron_of(2, "G", 0.1))
    assert rows[0]["unit"] == "ADU" and len(rows[0]) == 6 + 12
    assert main(["results", "history", "ron_img_adu", "--block", "BORN", "--url", filled]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0].split()[:7] == ["produced", "block", "test", "repeat", "version", "unit", "CCD1.E"]
    assert text[2].split()[2] == "BIAS02"


def test_errors_are_clear(filled, capsys, tmp_path):
    assert main(["results", "query", "no_such", "--url", filled]) == 1
    assert "no no_such in the catalogue" in capsys.readouterr().err
    assert main(["results", "history", "gain", "--url", filled]) == 2
    assert "--block is required" in capsys.readouterr().err
    assert main(["results", "query", "gain", "--url", "postgresql+psycopg://postgres@127.0.0.1:1/none"]) == 2
    assert "vison results: catalogue" in capsys.readouterr().err
    assert main(["results", "query", "gain", "--url", f"sqlite:///{tmp_path / 'absent.sqlite'}"]) == 2
    assert "no catalogue at" in capsys.readouterr().err and not (tmp_path / "absent.sqlite").exists()


def test_url_from_the_environment_and_tail_still_parses(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    with Catalogue(url) as cat:
        cat.add(syn.analysis("DARK01"))
    env = dict(os.environ, VISON_CATALOGUE_URL=url)
    out = subprocess.run([sys.executable, "-m", "services.cli", "results", "query", "dark_current_e_s", "--json"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [d["value"] for d in data if d["ccd"] == "CCD3"] == [0.003] * 4 and data[0]["unit"] == "e-/s"
    from services.tools import results

    import argparse

    parser = argparse.ArgumentParser()
    results.add_arguments(parser)
    args = parser.parse_args(["tail", "exposure.validated.#", "processing.failed.#", "--count", "2"])
    assert args.patterns == ["exposure.validated.#", "processing.failed.#"] and args.count == 2
