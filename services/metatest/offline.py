"""``vison metatest --products DIR``: the FPA products from the ``results.json`` already in a
products folder (``<DIR>/<block>/<test>[.<n>]/results.json``, status completed), no broker.

Each result's event id is the one the analyzer published (derived from its job id), so the
offline products and events carry the same ``inputs`` as the live service's."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from services.metatest.aggregate import ResultError, ResultRecord, check_result, family_keys, latest_per_test
from services.metatest.families import Family, families_of
from services.metatest.layout import FPALayout
from shared.events import MetatestCompleted, derived_event_id

log = logging.getLogger("vison.metatest")


def _split_label(label: str) -> tuple[str, int]:
    base, _, rep = label.rpartition(".")
    if base and rep.isdigit():
        return base, int(rep)
    return label, 0


def _produced_at(doc: dict[str, Any], path: Path) -> datetime:
    created = (doc.get("provenance") or {}).get("created")
    try:
        when = datetime.fromisoformat(str(created))
        return when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)


def record_from_file(path: Path, root: Path, layout: FPALayout) -> ResultRecord | None:
    """The record of one ``results.json`` (None when not completed); ResultError when unusable."""
    rel = path.relative_to(root).as_posix()
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ResultError(f"{rel}: not a JSON document ({exc})") from None
    if not isinstance(doc, dict):
        raise ResultError(f"{rel}: not a results document")
    if doc.get("status") != "completed":
        return None
    label = path.parent.name
    base, repeat = _split_label(label)
    test = str(doc.get("test") or base)
    block = str(doc.get("block") or path.parent.parent.name)
    repeat = int(doc.get("repeat") or repeat or 0)
    results = doc.get("results")
    families = families_of(test)
    keys = set().union(*(family_keys(f) for f in families)) if families else set()
    try:
        check_result(block, test, results, layout, keys)
    except ResultError as exc:
        raise ResultError(f"{rel}: {exc}") from None
    prov = doc.get("provenance") or {}
    job_id = prov.get("job_id")
    when = _produced_at(doc, path)
    event_id = str(derived_event_id("analysis.completed", job_id) if job_id else
                   derived_event_id("results.json", rel, when.isoformat()))
    products = [p for p in doc.get("products") or [] if isinstance(p, str)]
    return ResultRecord(block, test, repeat, event_id, when, results, products)


def load_products(root: Path, layout: FPALayout) -> tuple[list[ResultRecord], list[str]]:
    """Every completed result under ``root`` (FPA/ excluded) and the problems met."""
    records, problems = [], []
    for path in sorted(Path(root).glob("*/*/results.json")):
        if path.parent.parent.name == "FPA":
            continue
        try:
            rec = record_from_file(path, Path(root), layout)
        except ResultError as exc:
            problems.append(str(exc))
            continue
        if rec is not None:
            records.append(rec)
    return records, problems


def build_offline(root: Path, families: list[Family], layout: FPALayout, out: Path | None = None,
                  figures: bool = True) -> tuple[list[MetatestCompleted], list[str]]:
    """The events (products written under ``<out>/FPA/``, default ``root``) and the problems."""
    from services.metatest.service import build_family

    records, problems = load_products(root, layout)
    latest = latest_per_test(records)
    events = []
    for family in families:
        event = build_family(family, latest, layout, Path(out or root), products_root=Path(root), figures=figures,
                             trigger="offline", records=records)
        if event is not None:
            events.append(event)
    return events, problems


__all__ = ["build_offline", "load_products", "record_from_file"]
