"""``vison sim --results-only``: plausible analysis **results** of several blocks, without any
frame (results-only mode, for the FPA demo and tests of the metatest service).

Writes ``<out>/<block>/<test>/results.json`` (status completed, ``results[CCD][Q][key]`` with the
keys the analyses publish) for the first N blocks of the FPA layout (then the spares), and gives
the matching ``analysis.completed`` events. Values are drawn around the simulator's defaults
(gain 3.1-3.5 e-/ADU, RON 1.25-1.40 ADU, offsets from the block reference, ...) with a seed.
"""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from shared.geometry import CCDS, QUADRANTS

DEFAULT_TESTS = ("BIAS01", "DARK01", "PTC01", "NL01", "BF01", "FLAT01", "COSMETICS00")
RESULTS_ONLY_NOTE = "results-only simulation: no frames, no master images; values drawn around the simulator defaults"


def sim_blocks(n: int) -> list[str]:
    """The first ``n`` blocks of the FPA (slice by slice), then the spares."""
    from services.metatest.layout import fpa_layout

    layout = fpa_layout()
    names = layout.fpa_blocks + layout.spares
    if not 1 <= n <= len(names):
        raise ValueError(f"--blocks must be 1..{len(names)} (12 FPA blocks + {len(layout.spares)} spares), got {n}")
    return names[:n]


def _offset(block: str, ccd: str, q: str, rng: random.Random) -> float:
    from shared.refdata import block_offsets

    try:
        return float(block_offsets(block)[ccd][q])
    except (KeyError, ValueError):
        return rng.uniform(2400, 2900)


def quadrant_values(test: str, block: str, ccd: str, q: str, rng: random.Random, gain: float) -> dict[str, Any]:
    """``results[ccd][q]`` of one test (the keys the analyses publish)."""
    u = rng.uniform
    if test.startswith("BIAS"):
        off = _offset(block, ccd, q, rng)
        ron = u(1.25, 1.40)
        return {"n_frames": 10, "offset_pre": off, "offset_img": off + u(-0.5, 0.5), "offset_ove": off + u(-1, 1),
                "ron_pre_adu": ron * u(0.98, 1.02), "ron_img_adu": ron, "ron_ove_adu": ron * u(0.98, 1.02),
                "ron_pre_e": None, "ron_img_e": None, "ron_ove_e": None, "gain": None, "dnl_spread_ratio": u(0.9, 1.1)}
    if test.startswith("DARK"):
        rate = u(0.0005, 0.002)
        return {"n_frames": 3, "exptime": 565.0, "dark_current_adu_s": rate, "dark_current_e_s": None,
                "n_hot": rng.randint(0, 40), "n_cold": rng.randint(0, 5), "n_bad_columns": rng.randint(0, 2)}
    if test.startswith("PTC"):
        return {"gain": gain, "gain_err": gain * u(0.002, 0.005), "a00": -u(1.0, 2.0) * 1e-6, "noise_e": u(4.0, 4.8),
                "turnoff_adu": u(58000, 62000), "bloom_adu": u(60000, 64000), "her": u(-8e-4, 8e-4), "n_fit": 12}
    if test.startswith("NL"):
        return {"max_nl_pct": u(-1.5, 1.5), "max_nl_fluence_adu": u(50000, 60000), "rms_nl_resid_pct": u(0.01, 0.05),
                "fit_ok": True}
    if test.startswith("BF"):
        return {"gain": gain, "a00": -u(1.0, 2.0) * 1e-6, "a10": u(1e-7, 3e-7), "a01": u(2e-7, 5e-7), "a11": u(0, 1e-7),
                "fwhm_x_half": u(1.45, 1.6), "fwhm_y_half": u(1.5, 1.7), "fwhm_x_growth_pct": u(1, 4),
                "fwhm_y_growth_pct": u(2, 6), "fit_ok": True}
    if test.startswith("FLAT"):
        prnu = u(0.8, 1.3)
        return {"n_frames": 10, "n_columns": 2, "prnu_pct": prnu, "prnu_raw_pct": prnu * u(1.05, 1.2),
                "prnu_master_pct": prnu * u(0.95, 1.05), "n_defects": rng.randint(0, 100), "n_bad_columns": rng.randint(0, 2)}
    if test.startswith("COSMETICS"):
        nd, nf = rng.randint(0, 60), rng.randint(0, 60)
        return {"n_defects": nd + nf, "n_dark_defects": nd, "n_flat_defects": nf, "n_bad_columns": rng.randint(0, 2)}
    raise ValueError(f"results-only simulation does not know test {test!r} (known: {', '.join(DEFAULT_TESTS)})")


def simulate(blocks: list[str], tests: tuple[str, ...] | list[str] = DEFAULT_TESTS, seed: int = 1,
             start: datetime | None = None) -> list[dict[str, Any]]:
    """``results.json`` documents, one per block and test (block-major order, produced 1 s apart)."""
    start = start or datetime.now(timezone.utc)
    docs = []
    k = 0
    for block in blocks:
        rng = random.Random(f"{seed}:{block}")
        gains = {c: {q: rng.uniform(3.1, 3.5) for q in QUADRANTS} for c in CCDS}
        for test in tests:
            trng = random.Random(f"{seed}:{block}:{test}")
            results = {c: {q: quadrant_values(test, block, c, q, trng, gains[c][q]) for q in QUADRANTS} for c in CCDS}
            created = (start + timedelta(seconds=k)).isoformat(timespec="seconds")
            k += 1
            job_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"vison-sim-results:{seed}:{block}:{test}"))
            docs.append({
                "schema": "vison.results/1", "test": test, "repeat": 0, "label": test, "block": block,
                "status": "completed", "flags": 0, "flag_names": [], "results": results, "obsids": [],
                "note": RESULTS_ONLY_NOTE,
                "provenance": {"block": block, "test": test, "job_id": job_id, "created": created,
                               "simulated": "results-only", "seed": seed},
            })
    return docs


def write(out: Path, docs: list[dict[str, Any]]) -> list[Path]:
    """Write each document to ``<out>/<block>/<test>/results.json`` (atomically)."""
    from services.analyzer.products import write_json

    paths = []
    for doc in docs:
        path = Path(out) / doc["block"] / doc["label"] / "results.json"
        doc = dict(doc, products=[f"{doc['block']}/{doc['label']}/results.json"])
        paths.append(write_json(path, doc))
    return paths


def events(docs: list[dict[str, Any]]) -> list[Any]:
    """The ``analysis.completed`` events of the documents (event ids as the analyzer derives them)."""
    from shared.events import AnalysisCompleted, derived_event_id

    out = []
    for doc in docs:
        prov = doc["provenance"]
        out.append(AnalysisCompleted(
            event_id=derived_event_id("analysis.completed", prov["job_id"]), producer="sim",
            produced_at=datetime.fromisoformat(prov["created"]), test=doc["test"], block=doc["block"],
            repeat=doc["repeat"] or None, status="completed", results=doc["results"],
            products=[f"{doc['block']}/{doc['label']}/results.json"], provenance=prov,
        ))
    return out


def run_results_only(out: Path, n_blocks: int, seed: int | None, tests: str | None = None) -> int:
    """The ``vison sim --results-only`` command."""
    try:
        blocks = sim_blocks(n_blocks)
        test_list = tuple(t.strip() for t in tests.split(",") if t.strip()) if tests else DEFAULT_TESTS
        docs = simulate(blocks, test_list, seed if seed is not None else 1)
    except ValueError as exc:
        print(f"vison sim: {exc}")
        return 2
    paths = write(out, docs)
    print(f"vison sim --results-only: {len(paths)} results.json ({len(blocks)} blocks x {len(test_list)} tests: "
          f"{', '.join(test_list)}) under {out}")
    print(f"  blocks: {', '.join(blocks)}")
    print(f"  ({RESULTS_ONLY_NOTE})")
    return 0


__all__ = ["DEFAULT_TESTS", "RESULTS_ONLY_NOTE", "events", "quadrant_values", "run_results_only", "sim_blocks",
           "simulate", "write"]
