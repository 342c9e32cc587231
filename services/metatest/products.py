"""Products of one family under ``<root>/FPA/<family>/``, each written atomically:

- ``<family>_maps.json``: ``{"layout": {block: {CCD: "<slice>-<col>"}}, "maps": {quantity: {block:
  {CCD: {Q: value}}}}, "grid": {quantity: 12 x 12, row 0 = bottom}}`` (missing blocks null);
- ``<family>_<quantity>.png``: the heat map of each quantity;
- ``<family>_table.fits`` / ``<family>_table.csv``: one row per block / CCD / quadrant (spares
  included) with every quantity (ADU and e-);
- ``<family>_<stem>_<TEST>.fits``: mosaics of master images found in the blocks' products;
- psf: ``psf_crosstalk.json``, the crosstalk requirement per block and victim;
- persistence: ``persistence_median_decay.json``, the median decay curve over all quadrants;
- bias: ``bias_history.csv``, offsets and RON of every test run of each block, by time;
- the family-specific products of :mod:`services.metatest.extras` (NL curves, BF matrices, gain vs
  conditions, crosstalk matrices, offset / RON history figures, the merged defect mask).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from services.analyzer.products import atomic_write, jsonable, software_version, utc_now, write_json
from services.metatest.aggregate import FamilyResult
from services.metatest.extras import extra_products, find_product
from services.metatest.families import FAMILIES
from services.metatest.layout import CCDS, QUADRANTS, FPALayout
from services.metatest.mosaic import MosaicInput, write_mosaic
from services.metatest.render import heatmap_png
from shared.events import derived_event_id

log = logging.getLogger("vison.metatest")


def family_dir(root: Path, family: str) -> Path:
    return Path(root) / "FPA" / family


def safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in text)


def maps_document(result: FamilyResult, layout: FPALayout) -> dict[str, Any]:
    """The ``<family>_maps.json`` document (exactly ``layout``, ``maps``, ``grid``)."""
    maps = result.maps(layout)
    return {"layout": layout.layout_doc(), "maps": maps, "grid": {n: layout.grid(v) for n, v in maps.items()}}


def table_rows(result: FamilyResult, layout: FPALayout) -> tuple[list[str], list[dict[str, Any]]]:
    """Columns and rows (one per block / CCD / quadrant of every block with input, spares included)."""
    names = list(result.quantities)
    columns = ["BLOCK", "CCD", "QUAD", "CCDID", "SLICE", "COL", "ON_FPA", *names]
    rows = []
    for block in result.blocks:
        for ccd in CCDS:
            pos = layout.position(block, ccd)
            for q in QUADRANTS:
                row: dict[str, Any] = {"BLOCK": block, "CCD": ccd, "QUAD": q, "CCDID": pos.ccd_id if pos else "",
                                       "SLICE": pos.slice if pos else 0, "COL": pos.col if pos else 0,
                                       "ON_FPA": pos is not None}
                for n in names:
                    row[n] = ((result.values[n].get(block) or {}).get(ccd) or {}).get(q)
                rows.append(row)
    return columns, rows


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    text = buf.getvalue()
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _write_fits_table(path: Path, result: FamilyResult, columns: list[str], rows: list[dict[str, Any]],
                      provenance: dict[str, Any]) -> Path:
    import warnings

    import numpy as np
    from astropy.io import fits
    from astropy.table import Table

    data: dict[str, Any] = {}
    for c in columns:
        values = [r[c] for r in rows]
        if c in result.quantities:
            data[c] = np.array([math.nan if v is None else float(v) for v in values], dtype=float)
        else:
            data[c] = values
    table = Table(data) if rows else Table(names=columns, dtype=[str, str, str, str, int, int, bool]
                                            + [float] * (len(columns) - 7))
    for name, info in result.quantities.items():
        if info.unit and name in table.colnames:
            table[name].description = f"{info.unit} ({info.test}.{info.key})"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hdu = fits.table_to_hdu(table)
        hdu.name = "TABLE"
        for i, name in enumerate(columns, start=1):
            info = result.quantities.get(name)
            if info is not None and info.unit:
                hdu.header[f"TUNIT{i}"] = info.unit
    primary = fits.PrimaryHDU()
    for key, value in (("ORIGIN", "vison"), ("PRODUCT", f"{result.family}_table"), ("FAMILY", result.family),
                       ("SWVERS", software_version()), ("DATE", utc_now()), ("NBLOCKS", len(result.blocks)),
                       ("MISSING", ",".join(result.missing)[:68]), ("EVENTID", str(provenance.get("event_id", ""))[:68])):
        primary.header[key] = value
    return atomic_write(path, lambda tmp: fits.HDUList([primary, hdu]).writeto(tmp, output_verify="silentfix"))


def _mosaics(result: FamilyResult, layout: FPALayout, products_root: Path, out: Path) -> list[Path]:
    family = FAMILIES[result.family]
    written: list[Path] = []
    for spec in family.mosaics:
        by_test: dict[str, list[MosaicInput]] = {}
        used: dict[str, list[str]] = {}
        for (block, test), rec in sorted(result.records.items()):
            if not layout.on_fpa(block) or not _matches(spec.pattern, test):
                continue
            for ccd in CCDS:
                path = _find_product(products_root, rec, f"{spec.stem}_{ccd}.fits")
                if path is not None:
                    by_test.setdefault(test, []).append(MosaicInput(block, ccd, test, path, spec.extension))
                    used.setdefault(test, []).append(rec.event_id)
        for test, inputs in by_test.items():
            name = f"{result.family}_{spec.stem}_{safe_name(test)}.fits"
            signature = str(derived_event_id("metatest.mosaic", name, *sorted(set(used[test]))))
            path = out / name
            try:
                write_mosaic(path, inputs, layout, title=f"FPA mosaic: {spec.label} {test}", signature=signature,
                             header={"FAMILY": result.family, "TEST": test, "SRCEXT": spec.extension})
                written.append(path)
            except Exception as exc:  # a mosaic must never lose the maps
                log.warning("mosaic %s not written: %s: %s", name, exc.__class__.__name__, exc)
    return written


def _matches(pattern: str, test: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(test, pattern)


_find_product = find_product


def write_family_products(result: FamilyResult, layout: FPALayout, root: Path, *, products_root: Path | None = None,
                          provenance: dict[str, Any] | None = None, figures: bool = True, mosaics: bool = True,
                          history: list[dict[str, Any]] | None = None) -> list[str]:
    """Write every product of ``result`` under ``<root>/FPA/<family>/``; master images are looked up
    under ``products_root`` (default ``root``). Returns the paths relative to ``root``."""
    root = Path(root)
    out = family_dir(root, result.family)
    out.mkdir(parents=True, exist_ok=True)
    provenance = dict(provenance or {})
    paths: list[Path] = []
    doc = maps_document(result, layout)
    paths.append(write_json(out / f"{result.family}_maps.json", doc))
    if figures:
        labels = {}
        for b in layout.fpa_blocks:
            pos = layout.position(b, "CCD2")
            labels[(pos.slice, pos.col)] = b + ("" if b in result.blocks else " (missing)")
        for name, grid in doc["grid"].items():
            info = result.quantities[name]
            meta = {"Title": f"FPA {result.family} {name}", "Software": f"vison {software_version()}",
                    "Creation Time": utc_now(),
                    "Provenance": json.dumps(jsonable({"family": result.family, "quantity": name, "test": info.test,
                                                       "key": info.key, "blocks": result.blocks,
                                                       "missing": result.missing, **provenance}))}
            png = heatmap_png(grid, f"{result.family}: {name} ({info.test})", info.unit, labels=labels, metadata=meta)
            paths.append(atomic_write(out / f"{result.family}_{safe_name(name)}.png", lambda tmp, png=png: Path(tmp).write_bytes(png)))
    columns, rows = table_rows(result, layout)
    paths.append(_write_csv(out / f"{result.family}_table.csv", columns, rows))
    paths.append(_write_fits_table(out / f"{result.family}_table.fits", result, columns, rows, provenance))
    if history:
        paths.append(_write_csv(out / f"{result.family}_history.csv", list(history[0]), history))
    if result.summary.get("crosstalk"):
        paths.append(write_json(out / f"{result.family}_crosstalk.json", result.summary))
    if result.summary.get("median_decay"):
        paths.append(write_json(out / f"{result.family}_median_decay.json", result.summary["median_decay"]))
    if mosaics:
        paths += _mosaics(result, layout, Path(products_root or root), out)
    paths += extra_products(result, layout, Path(products_root or root), out, figures=figures, mosaics=mosaics,
                            history=history)
    return [p.resolve().relative_to(root.resolve()).as_posix() for p in paths]


__all__ = ["family_dir", "maps_document", "table_rows", "write_family_products"]
