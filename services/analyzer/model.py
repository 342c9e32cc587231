"""Data model shared by the analyzer's parts: what an analysis receives (frame metadata, a frame
loader), what it hands back (typed results, products to write) and the plug-in interface every
test family implements.

An analysis module (``services/analyzer/analysis/<family>.py``) is a plug-in when it defines

- ``TESTS``: tuple of the test names it analyses (base names, e.g. ``("BIAS01", "BIAS02")``);
- ``run_test(data: TestData, sink: ProductSink) -> AnalysisOutput``;
- optionally ``PARAMS``: its pydantic parameters model (resolved values go into provenance).

``run_test`` does no file I/O itself: it reads frames through ``data.load(frame)`` and hands its
products (images, tables, figures) to ``sink.add(...)`` as soon as they exist (so that a CCD's
arrays can be freed before the next CCD is loaded). The registry (``services.analyzer.registry``)
finds plug-ins by scanning the package; nothing has to be edited to add one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterable, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shared.geometry import CCDS, Geometry, quadrants

_REPEAT = re.compile(r"^(?P<base>.+?)\.(?P<repeat>\d+)$")


def split_test_name(name: str) -> tuple[str, int]:
    """``"BIAS01.2" -> ("BIAS01", 2)``; ``"BIAS01" -> ("BIAS01", 0)`` (0 = no repeat suffix)."""
    m = _REPEAT.match(name.strip())
    if m:
        return m.group("base"), int(m.group("repeat"))
    return name.strip(), 0


def run_label(test: str, repeat: int = 0) -> str:
    """The folder / display name of a test run: ``BIAS01`` or ``BIAS01.2``."""
    return f"{test}.{repeat}" if repeat else test


def ccd_name(ccd: int | str) -> str:
    """``1 -> "CCD1"``; ``"CCD2" -> "CCD2"``."""
    if isinstance(ccd, str) and ccd.upper().startswith("CCD"):
        return ccd.upper()
    return f"CCD{int(ccd)}"


class FrameMeta(BaseModel):
    """One CCD frame of a test: identity, file and the exposure-log values of that frame."""

    model_config = ConfigDict(extra="ignore")

    obsid: int
    ccd: int = Field(ge=1, le=3)
    path: str = Field(description="absolute path of the FITS file")
    sha256: str | None = Field(None, description="SHA-256 of the file (from ingest); checked before use")
    exptime: float = Field(0.0, description="exposure time (s)")
    date: datetime | None = None
    test: str = ""
    flags: int = Field(0, description="validator flag bitmask of this exposure")
    values: dict[str, Any] = Field(default_factory=dict, description="exposure-log values of this frame")

    @property
    def ccd_name(self) -> str:
        return f"CCD{self.ccd}"

    @property
    def vstart(self) -> int:
        return int(_num(self.values.get("vstart"), 0))

    @property
    def vend(self) -> int:
        return int(_num(self.values.get("vend"), 2086))


def _num(value: Any, default: float) -> float:
    try:
        if value is None or value == "":
            return default
        return float(value)
    except (TypeError, ValueError):
        return default


@dataclass
class TestData:
    """Everything one analysis run gets: the frames of one (block, test, repeat), a loader for
    their pixels, the campaign parameters and analysis parameters."""

    __test__ = False  # not a pytest class

    test: str
    block: str
    frames: list[FrameMeta]
    loader: Callable[[FrameMeta], np.ndarray]
    repeat: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    expected_frames: int | None = None
    flags: int = 0
    #: Calibration inputs found for this block (e.g. ``{"gain": {"CCD1": {"E": 3.3, ...}}}``).
    calib: dict[str, Any] = field(default_factory=dict)
    #: Loads a calibration image of the block: ``(kind, ccd) -> array | None`` (e.g. the DARK01
    #: defect mask, kind ``"dark_mask"``), None when there is none.
    calib_loader: Callable[[str, str], np.ndarray | None] | None = None

    @property
    def label(self) -> str:
        return run_label(self.test, self.repeat)

    def ccds(self) -> list[str]:
        """CCD names present, in order CCD1..3."""
        present = {f.ccd_name for f in self.frames}
        return [c for c in CCDS if c in present]

    def frames_of(self, ccd: str | int) -> list[FrameMeta]:
        """Frames of one CCD, by ObsID."""
        name = ccd_name(ccd)
        return sorted((f for f in self.frames if f.ccd_name == name), key=lambda f: f.obsid)

    def obsids(self) -> list[int]:
        return sorted({f.obsid for f in self.frames})

    def load(self, frame: FrameMeta) -> np.ndarray:
        """Pixels of a frame: float32 ADU ``[row, col]`` (full frame, array orientation)."""
        return self.loader(frame)

    def load_quadrants(self, frame: FrameMeta) -> dict[str, np.ndarray]:
        """The four canonical quadrant views of a frame."""
        data = self.load(frame)
        return quadrants(data, Geometry.from_shape(data.shape))

    def frame_inputs(self, ccd: str | int | None = None) -> list[Any]:
        """The frames (of one CCD, or all) as lazy ``analysis.common.FrameInput`` objects: each
        loads its canonical quadrants only when asked (``.load()``)."""
        from services.analyzer.analysis.common import FrameInput

        metas = self.frames_of(ccd) if ccd is not None else sorted(self.frames, key=lambda f: (f.obsid, f.ccd))
        return [
            FrameInput(quads=(lambda m=m: self.load_quadrants(m)), exptime=m.exptime, obsid=m.obsid, ccd=m.ccd_name,
                       wave=_num(m.values.get("wave"), float("nan")) if m.values.get("wave") not in (None, "") else None,
                       time=m.date, meta={**m.values, "path": m.path, "flags": m.flags})
            for m in metas
        ]

    def calib_image(self, kind: str, ccd: str) -> np.ndarray | None:
        """A calibration image of the block (full frame, raw orientation) or None."""
        return self.calib_loader(kind, ccd) if self.calib_loader is not None else None

    def gain(self, ccd: str, quadrant: str) -> float | None:
        """Gain (e-/ADU) of a quadrant when known (analysis parameter or a PTC result)."""
        table = self.params.get("gain") or self.calib.get("gain") or {}
        if isinstance(table, (int, float)):
            return float(table)
        value = (table.get(ccd) or {}).get(quadrant) if isinstance(table, dict) else None
        return float(value) if value else None


# ---------------------------------------------------------------------------- products


@dataclass
class ImageProduct:
    """A FITS image product: one image extension per ``EXTNAME`` (full-frame arrays keep the
    raw-frame orientation so that they can be applied to frames directly)."""

    name: str
    extensions: dict[str, np.ndarray]
    ccd: str | None = None
    header: dict[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass
class TableProduct:
    """A FITS binary-table product (columns of equal length)."""

    name: str
    columns: dict[str, Any]
    ccd: str | None = None
    units: dict[str, str] = field(default_factory=dict)
    description: str = ""


@dataclass
class FigureProduct:
    """A PNG figure: ``draw(fig)`` fills a :class:`matplotlib.figure.Figure` (no pyplot)."""

    name: str
    draw: Callable[[Any], None]
    ccd: str | None = None
    size: tuple[float, float] = (10.0, 7.0)
    description: str = ""


Product = ImageProduct | TableProduct | FigureProduct


class ProductSink(Protocol):
    """Where an analysis hands its products (the writer, or a list in tests)."""

    def add(self, product: Product) -> None: ...


class ListSink:
    """A sink that keeps products in memory (tests, dry runs)."""

    def __init__(self) -> None:
        self.products: list[Product] = []

    def add(self, product: Product) -> None:
        self.products.append(product)

    def get(self, name: str) -> Product:
        for p in self.products:
            if p.name == name:
                return p
        raise KeyError(name)

    def names(self) -> list[str]:
        return [p.name for p in self.products]


@dataclass
class AnalysisOutput:
    """What an analysis returns: ``results[<CCD>][<Q>][key]`` (JSON-able), per-frame rows,
    test-level values, the test flag bitmask and a short human summary."""

    results: dict[str, dict[str, dict[str, Any]]]
    flags: int = 0
    frames: list[dict[str, Any]] = field(default_factory=list)
    test_values: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)
    #: Calibrations this result provides to other tests (engine v2): ``{name: {"values": {...},
    #: "files": {CCD or "ALL": product file name in this run's products folder}}}``.
    provides: dict[str, dict[str, Any]] = field(default_factory=dict)


def iter_quadrant_results(results: dict[str, dict[str, dict[str, Any]]]) -> Iterable[tuple[str, str, dict[str, Any]]]:
    for ccd, quads in results.items():
        for q, values in quads.items():
            yield ccd, q, values
