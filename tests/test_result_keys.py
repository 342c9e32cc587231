"""The result-key documentation (issue 11): generated from the families' result models, every
key documented, and the committed docs/results.md up to date."""

from __future__ import annotations

from pathlib import Path

from services.tools.resultkeys import families, markdown, undocumented, unit_of

DOC = Path(__file__).resolve().parents[1] / "docs" / "results.md"


def test_units_from_key_suffixes():
    assert unit_of("ron_img_adu") == "ADU" and unit_of("dark_current_e_s") == "e-/s" and unit_of("slope_adu_per_v") == "ADU/V"
    assert unit_of("steepness_per_v") == "1/V" and unit_of("best_focus_err_mm") == "mm" and unit_of("gain") == ""


def test_every_family_documents_every_key():
    fams = families()
    assert {"bias", "dark", "ptc", "chinj", "tp"} <= {f.name for f in fams}
    missing_models = [f.name for f in fams if f.result is None]
    assert not missing_models, f"families without a result model: {missing_models}"
    assert undocumented() == []


def test_committed_documentation_is_up_to_date():
    assert DOC.is_file(), "run: vison schemas --result-keys docs/results.md"
    assert DOC.read_text() == markdown(), "docs/results.md is stale: run vison schemas --result-keys docs/results.md"
