"""Products writer: FITS images / tables, PNG figures and ``results.json`` under
``<products_root>/<block>/<test>[.<repeat>]/``, each file written atomically (temporary file in
the same folder, fsync, rename) and carrying its provenance:

- FITS: primary header ``ORIGIN``, ``SOFTWARE``, ``SWVERS``, ``BLOCK``, ``TEST``, ``REPEAT``,
  ``CCD``, ``QUADS``, ``OBSID0`` / ``OBSID1`` / ``NOBSID``, ``DATE`` (creation, UTC), ``PRODUCT``,
  ``JOBID``, ``PARAM <name>`` (HIERARCH) for every analysis parameter, plus an ``INPUTS``
  binary table (file, ObsID, CCD, SHA-256) of the input frames;
- PNG: text chunks ``Title``, ``Software``, ``Creation Time`` and ``Provenance`` (JSON);
- ``results.json``: a ``provenance`` object (block, test, repeat, ObsIDs, inputs with
  checksums, software, parameters, creation time, job id).
"""

from __future__ import annotations

import json
import math
import os
import platform
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from services.analyzer.model import FigureProduct, ImageProduct, Product, TableProduct
from shared.geometry import QUADRANTS


def software_version() -> str:
    """``vison <version>`` of the installed package."""
    try:
        from importlib.metadata import version

        return version("vison")
    except Exception:  # pragma: no cover - not installed
        return "0"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def jsonable(value: Any) -> Any:
    """A JSON-safe copy: numpy scalars / arrays to Python, NaN / inf to None, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - platform without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Any) -> Path:
    """Call ``write(tmp_path)`` then fsync and rename onto ``path`` (same folder: atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def write_json(path: Path, doc: Any) -> Path:
    """Atomically write ``doc`` as indented JSON (NaN -> null)."""
    text = json.dumps(jsonable(doc), indent=1, allow_nan=False)
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text + "\n"))


class ProductWriter:
    """A :class:`~services.analyzer.model.ProductSink` that writes each product as it arrives.

    ``provenance``: block, test, repeat, obsids, inputs [{file, obsid, ccd, sha256}],
    parameters, job_id. ``root``: the products root (paths are reported relative to it)."""

    def __init__(self, out_dir: str | os.PathLike, provenance: dict[str, Any], root: str | os.PathLike | None = None,
                 figures: bool = True, dpi: int = 90):
        self.out_dir = Path(out_dir)
        self.root = Path(root) if root is not None else self.out_dir
        self.provenance = dict(provenance)
        self.provenance.setdefault("software", {"name": "vison", "version": software_version(),
                                                "python": platform.python_version(), "numpy": np.__version__})
        self.figures = figures
        self.dpi = dpi
        self.paths: list[Path] = []
        self.errors: list[str] = []
        self._remove_stale_temporaries()

    def _remove_stale_temporaries(self, age_s: float = 600.0) -> None:
        """Temporary files of a writer killed mid-write (older than ``age_s``: not a live one)."""
        import time

        if not self.out_dir.is_dir():
            return
        for tmp in self.out_dir.glob(".*.tmp"):
            try:
                if time.time() - tmp.stat().st_mtime > age_s:
                    tmp.unlink()
            except OSError:
                pass

    # -- bookkeeping
    def relative(self, path: Path) -> str:
        try:
            return Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return str(path)

    def product_paths(self) -> list[str]:
        return [self.relative(p) for p in self.paths]

    def _record(self, path: Path) -> Path:
        if path not in self.paths:
            self.paths.append(path)
        return path

    def set_parameters(self, params: dict[str, Any]) -> None:
        self.provenance["parameters"] = jsonable(params)

    # -- sink
    def add(self, product: Product) -> None:
        if isinstance(product, ImageProduct):
            self.write_image(product)
        elif isinstance(product, TableProduct):
            self.write_table(product)
        elif isinstance(product, FigureProduct):
            if self.figures:
                self.write_figure(product)
        else:  # pragma: no cover - programming error
            raise TypeError(f"not a product: {product!r}")

    # -- FITS
    def _primary_header(self, name: str, ccd: str | None, description: str) -> Any:
        from astropy.io import fits

        p = self.provenance
        hdr = fits.Header()
        obsids = sorted(p.get("obsids") or [])
        cards = [
            ("ORIGIN", "vison", "Euclid VIS ground calibration pipeline"),
            ("SOFTWARE", "vison", "software"),
            ("SWVERS", p["software"]["version"], "software version"),
            ("PRODUCT", name[:68], "product name"),
            ("BLOCK", str(p.get("block", "")), "block (ROE + 3 CCDs)"),
            ("TEST", str(p.get("test", "")), "test"),
            ("REPEAT", int(p.get("repeat") or 0), "test repeat (0 = none)"),
            ("CCD", ccd or "ALL", "CCD"),
            ("QUADS", ",".join(QUADRANTS), "quadrants covered"),
            ("OBSID0", obsids[0] if obsids else -1, "first input ObsID"),
            ("OBSID1", obsids[-1] if obsids else -1, "last input ObsID"),
            ("NOBSID", len(obsids), "number of input exposures"),
            ("DATE", utc_now(), "creation time (UTC)"),
            ("JOBID", str(p.get("job_id") or "")[:68], "analysis job id"),
        ]
        for key, value, comment in cards:
            hdr[key] = (value, comment)
        if description:
            hdr["COMMENT"] = description[:2000]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for key, value in (p.get("parameters") or {}).items():
                if isinstance(value, (list, tuple, dict)):
                    value = json.dumps(value)
                if value is None:
                    value = "None"
                if isinstance(value, str) and len(value) > 50:
                    value = value[:50]
                try:
                    hdr[f"HIERARCH PARAM {key}"[:60]] = value
                except (ValueError, TypeError):  # pragma: no cover - exotic value
                    pass
        return hdr

    def _inputs_hdu(self, ccd: str | None) -> Any:
        from astropy.io import fits

        inputs = [i for i in (self.provenance.get("inputs") or []) if ccd is None or i.get("ccd") in (ccd, None)]
        cols = [
            fits.Column("FILE", "A120", array=[str(i.get("file", ""))[-120:] for i in inputs]),
            fits.Column("OBSID", "K", array=[int(i.get("obsid") or -1) for i in inputs]),
            fits.Column("CCD", "A4", array=[str(i.get("ccd") or "") for i in inputs]),
            fits.Column("SHA256", "A64", array=[str(i.get("sha256") or "") for i in inputs]),
        ]
        return fits.BinTableHDU.from_columns(cols, name="INPUTS")

    def write_image(self, product: ImageProduct) -> Path:
        from astropy.io import fits

        hdus = [fits.PrimaryHDU(header=self._primary_header(product.name, product.ccd, product.description))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for extname, array in product.extensions.items():
                hdu = fits.ImageHDU(np.asarray(array), name=extname)
                for key, value in product.header.items():
                    hdu.header[key if len(key) <= 8 else f"HIERARCH {key}"] = value
                hdus.append(hdu)
        hdus.append(self._inputs_hdu(product.ccd))
        path = self.out_dir / f"{product.name}.fits"
        atomic_write(path, lambda tmp: fits.HDUList(hdus).writeto(tmp, output_verify="silentfix"))
        return self._record(path)

    def write_table(self, product: TableProduct) -> Path:
        from astropy.io import fits
        from astropy.table import Table

        columns = {}
        for name, values in product.columns.items():
            if isinstance(values, list) and any(v is None for v in values):
                values = [np.nan if v is None else v for v in values]
            columns[name] = values
        table = Table(columns)
        for name, unit in product.units.items():
            if name in table.colnames:
                table[name].unit = unit
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hdu = fits.table_to_hdu(table)
        hdu.name = "TABLE"
        hdus = [fits.PrimaryHDU(header=self._primary_header(product.name, product.ccd, product.description)), hdu,
                self._inputs_hdu(product.ccd)]
        path = self.out_dir / f"{product.name}.fits"
        atomic_write(path, lambda tmp: fits.HDUList(hdus).writeto(tmp, output_verify="silentfix"))
        return self._record(path)

    # -- PNG
    def write_figure(self, product: FigureProduct) -> Path | None:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=product.size, layout="constrained")
        FigureCanvasAgg(fig)
        path = self.out_dir / f"{product.name}.png"
        try:
            product.draw(fig)
            p = self.provenance
            fig.suptitle(f"{p.get('block', '')} {p.get('label', p.get('test', ''))}: {product.description or product.name}", fontsize=10)
            prov = {k: v for k, v in p.items() if k != "inputs"}
            prov["ccd"] = product.ccd
            prov["n_inputs"] = len(p.get("inputs") or [])
            metadata = {
                "Title": f"{product.name} ({p.get('block', '')} {p.get('test', '')})",
                "Software": f"vison {p['software']['version']}",
                "Creation Time": utc_now(),
                "Provenance": json.dumps(jsonable(prov)),
            }
            atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=self.dpi, metadata=metadata))
        except Exception as exc:  # a figure must never lose the analysis
            self.errors.append(f"figure {product.name}: {exc.__class__.__name__}: {exc}")
            return None
        return self._record(path)

    # -- results.json
    def write_results(self, doc: dict[str, Any], name: str = "results.json") -> Path:
        path = self.out_dir / name
        doc = dict(doc)
        doc["products"] = self.product_paths() + [self.relative(path)]
        doc["provenance"] = {**self.provenance, "created": utc_now()}
        write_json(path, doc)
        return self._record(path)
