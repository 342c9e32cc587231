"""Data model shared by the analyzer's parts: the frame metadata of a test run (FrameMeta), the
products an analysis hands to its sink (FITS images and tables, PNG figures) and what a solve
returns (AnalysisOutput). The plug-in interface itself is :mod:`services.analyzer.family`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


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
