"""Rebuild the catalogue's analyses, results and FPA maps from a products folder:
``<products>/<block>/<test>[.<n>]/results.json`` and ``<products>/FPA/<family>/<family>_maps.json``.

Event ids are those the live services give (``analysis.completed`` from the analyzer's job id in
the provenance), so a rebuilt catalogue and a live one hold the same rows and a live consumer
running beside a rebuild creates no duplicates. Exposures are not in the products folder: they
stay as they are.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from services.catalogue.fpa import fpa_blocks
from services.catalogue.records import RecordError
from services.catalogue.store import Catalogue
from shared.events import AnalysisCompleted, MetatestCompleted, derived_event_id

log = logging.getLogger("vison.catalogue")


class RebuildReport(BaseModel):
    analyses: int = 0
    families: int = 0
    skipped: list[str] = Field(default_factory=list, description="'<file>: <reason>' of every file left out.")


def _mtime(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)


def analysis_event(doc: dict[str, Any], path: Path, root: Path) -> AnalysisCompleted:
    """The ``analysis.completed`` a ``results.json`` stands for."""
    prov = dict(doc.get("provenance") or {})
    rel = path.relative_to(root).as_posix()
    job = prov.get("job_id")
    event_id = (derived_event_id("analysis.completed", job) if job
                else derived_event_id("catalogue.rebuild", rel, prov.get("created", "")))
    produced = prov.get("created") or _mtime(path)
    for key in ("block", "test"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise RecordError(f"no {key!r} in results.json")
    return AnalysisCompleted(
        event_id=event_id, producer="catalogue", produced_at=produced, test=doc["test"], block=doc["block"],
        repeat=doc.get("repeat") or None, status=doc.get("status", "completed"), results=doc.get("results") or {},
        products=doc.get("products") or [rel], obsids=doc.get("obsids") or [], flags=int(doc.get("flags") or 0),
        flag_names=doc.get("flag_names") or [], error=doc.get("error"), provenance=prov,
    )


def metatest_event(doc: dict[str, Any], family: str, path: Path, root: Path) -> MetatestCompleted:
    """The ``metatest.completed`` a ``<family>_maps.json`` stands for (present blocks: those
    with at least one value)."""
    maps = doc.get("maps")
    if not isinstance(maps, dict):
        raise RecordError("no 'maps' object in the maps file")
    present = sorted({b for per_block in maps.values() if isinstance(per_block, dict)
                      for b, per_ccd in per_block.items()
                      if isinstance(per_ccd, dict) and any(v is not None for q in per_ccd.values()
                                                          if isinstance(q, dict) for v in q.values())})
    rel = path.relative_to(root).as_posix()
    produced = doc.get("produced_at") or _mtime(path)
    fields: dict[str, Any] = dict(
        event_id=doc.get("event_id") or derived_event_id("metatest.completed", rel, str(produced)),
        producer="catalogue", produced_at=produced, family=family, blocks=doc.get("blocks") or present,
        results=maps, products=[rel],
    )
    if "missing" in MetatestCompleted.model_fields:
        fields["missing"] = doc.get("missing", [b for b in fpa_blocks() if b not in fields["blocks"]])
    return MetatestCompleted(**fields)


def rebuild(catalogue: Catalogue, products: Path, clear: bool = True) -> RebuildReport:
    """Refill the catalogue from ``products``; bad files are skipped and reported."""
    root = Path(products).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"products folder {products} does not exist")
    if clear:
        catalogue.clear_products()
    report = RebuildReport()
    for path in sorted(root.glob("*/*/results.json")):
        if path.parts[-3] == "FPA":
            continue
        try:
            catalogue.add(analysis_event(json.loads(path.read_text()), path, root))
            report.analyses += 1
        except (OSError, ValueError, RecordError) as exc:
            report.skipped.append(f"{path.relative_to(root)}: {exc}")
    for path in sorted(root.glob("FPA/*/*_maps.json")):
        family = path.parent.name
        if path.name != f"{family}_maps.json":
            continue
        try:
            catalogue.add(metatest_event(json.loads(path.read_text()), family, path, root))
            report.families += 1
        except (OSError, ValueError, RecordError) as exc:
            report.skipped.append(f"{path.relative_to(root)}: {exc}")
    for line in report.skipped:
        log.warning("rebuild: skipped %s", line)
    return report
