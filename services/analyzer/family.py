"""The analysis-family plug-in interface (engine v2): **extract** per exposure (or per pair), then
**solve** per test run from the extractions only (the split of the Rubin calibration pipeline).

A family is a module of :mod:`services.analyzer.families` (a module or a package) that defines
``FAMILY = Family(...)``:

- ``params``: its pydantic parameters model (defaults = the campaign's analysis);
- ``extract(exposure, calib, params) -> Extraction``: everything the solve needs from one
  exposure (its 3 CCD frames), computed as soon as the validator passed it; pure apart from
  reading the exposure's own frames through :meth:`ExposureFrames.load`. ``unit="pair"``
  families (PTC) define ``extract_pair(first, second, calib, params)`` instead: the engine forms
  the pairs with :func:`pair_exposures`;
- ``solve(extractions, calib, params, run, sink) -> AnalysisOutput``: the test's results from
  the extractions (and master images stacked from the frames listed in ``run``, band by band:
  :mod:`services.analyzer.science.stacking`); products go to ``sink`` as soon as they exist;
- ``needs``: the calibrations the solve needs, each :class:`Need` with its waiting mode
  (``required`` | ``wait`` | ``rerun``); ``extract_needs``: calibrations the extraction uses
  when they are already available (never waited for); ``provides``: what a completed solve
  offers to other tests (``AnalysisOutput.provides``).

Calibrations come from the analyzer's store (what completed analyses provided), never from
scanning the products folder. Extractions are typed (:class:`Extraction` subclasses may hold
numpy arrays) and stored by :mod:`services.analyzer.extractions`; a redelivered extraction
overwrites its own file, so nothing is double-counted.

:func:`run_inprocess` runs both stages in the calling process (tests, small offline runs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from services.analyzer.model import (
    AnalysisOutput,
    FrameMeta,
    ListSink,
    ProductSink,
    run_label,
    split_test_name,
)
from shared.geometry import CCDS, Geometry, quadrants

P = TypeVar("P", bound=BaseModel)

NeedMode = Literal["required", "wait", "rerun"]

#: Calibration names used across families (a family may add its own).
MASTER_BIAS = "master_bias"  # BIAS01/02: files {CCD: master_bias_<CCD>.fits}, values = BIAS results
GAIN = "gain"  # PTC01: values {CCD: {Q: e-/ADU}}
DARK_MASK = "dark_mask"  # DARK01: files {CCD: master_dark_<CCD>.fits} (MASK extension)
DEFECT_MASK = "defect_mask"  # COSMETICS00: files {CCD: ...}
PTC_COVARIANCES = "ptc_covariances"  # PTC01/02: files {"ALL": ptc_covariances.fits}
LINEARITY = "linearity"  # NL01/02: values per CCD / quadrant
BF_KERNEL = "bf_kernel"  # BF01


@dataclass(frozen=True)
class Need:
    """A calibration a solve needs.

    ``mode``: ``required`` (the solve waits; never runs without it), ``wait`` (waits up to
    ``VISON_CALIB_WAIT_S`` then runs without it, flagged), ``rerun`` (runs at once without it and
    is solved again, as a re-analysis, when it arrives). ``sources``: the tests providing it, in
    order of preference (e.g. ``("BIAS01", "BIAS02")``)."""

    name: str
    mode: NeedMode = "rerun"
    sources: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------ inputs


def load_frame_data(meta: FrameMeta) -> np.ndarray:
    """Pixels of a frame file: float32 ADU ``[row, col]`` (full frame, array orientation)."""
    from shared.fitsio import read_frame

    return read_frame(meta.path).data


@dataclass
class ExposureFrames:
    """One exposure (ObsID) as an extraction sees it: its CCD frames (metadata + a loader) and
    exposure-log values. Pixels are read on demand and cached for the life of the object."""

    obsid: int
    block: str
    test: str  # test run label as in the exposure log (BIAS01, BIAS01.2, FLAT02_730)
    frames: dict[str, FrameMeta]  # "CCD1".."CCD3" -> frame
    date: datetime | None = None
    flags: int = 0  # validator flag bitmask of the exposure
    loader: Callable[[FrameMeta], np.ndarray] = load_frame_data
    _cache: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def from_frames(cls, metas: Iterable[FrameMeta], block: str, loader: Callable[[FrameMeta], np.ndarray] | None = None) -> "ExposureFrames":
        metas = list(metas)
        if not metas:
            raise ValueError("an exposure needs at least one frame")
        first = metas[0]
        return cls(obsid=first.obsid, block=block, test=first.test, frames={m.ccd_name: m for m in metas},
                   date=first.date, flags=max(m.flags for m in metas), loader=loader or load_frame_data)

    def ccds(self) -> list[str]:
        """CCD names present, CCD1..3 order."""
        return [c for c in CCDS if c in self.frames]

    def meta(self, ccd: str) -> FrameMeta:
        return self.frames[ccd]

    def load(self, ccd: str) -> np.ndarray:
        """Full frame of one CCD (float32 ADU, array orientation), read once."""
        if ccd not in self._cache:
            self._cache[ccd] = self.loader(self.frames[ccd])
        return self._cache[ccd]

    def quadrants(self, ccd: str) -> dict[str, np.ndarray]:
        """The four canonical quadrant views (readout node at [0, 0]) of one CCD's frame."""
        data = self.load(ccd)
        return quadrants(data, Geometry.from_shape(data.shape))

    def release(self, ccd: str | None = None) -> None:
        """Drop cached pixels (one CCD, or all)."""
        if ccd is None:
            self._cache.clear()
        else:
            self._cache.pop(ccd, None)

    def values(self, ccd: str | None = None) -> dict[str, Any]:
        """Exposure-log values of one CCD's row (the first CCD's when None)."""
        meta = self.frames[ccd] if ccd else self.frames[self.ccds()[0]]
        return dict(meta.values)

    @property
    def exptime(self) -> float:
        return float(self.frames[self.ccds()[0]].exptime)

    @property
    def wave(self) -> float | None:
        value = self.values().get("wave")
        try:
            return float(value) if value not in (None, "") else None
        except (TypeError, ValueError):
            return None


@dataclass
class TestRun:
    """What a solve knows of its test run besides the extractions: identity, campaign
    parameters, the frames (for stacks) and the input flags (e.g. MISSDATA of a partial set)."""

    __test__ = False  # not a pytest class

    block: str
    test: str  # base name (BIAS01)
    repeat: int = 0
    frames: list[FrameMeta] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)  # campaign parameters of the test
    expected_exposures: int | None = None
    flags: int = 0
    notes: list[str] = field(default_factory=list)  # e.g. "ObsID 12 CCD2 unreadable: ..."

    @property
    def label(self) -> str:
        return run_label(self.test, self.repeat)

    @classmethod
    def of(cls, label: str, block: str, frames: Iterable[FrameMeta] = (), **kw: Any) -> "TestRun":
        base, repeat = split_test_name(label)
        return cls(block=block, test=base, repeat=repeat, frames=list(frames), **kw)

    def ccds(self) -> list[str]:
        present = {f.ccd_name for f in self.frames}
        return [c for c in CCDS if c in present]

    def frames_of(self, ccd: str) -> list[FrameMeta]:
        """Frames of one CCD, by ObsID."""
        return sorted((f for f in self.frames if f.ccd_name == ccd), key=lambda f: f.obsid)

    def obsids(self) -> list[int]:
        return sorted({f.obsid for f in self.frames})

    def stack_paths(self, ccd: str, obsids: Sequence[int], shapes: Sequence[Sequence[int]]) -> tuple[list[str], tuple[int, int]]:
        """The frame files of ``ccd`` for ``obsids`` (in that order: the inputs of a master
        stack) and their common frame shape; ``shapes`` are the shapes the extractions saw.
        ValueError naming the ObsIDs without a file, or whose shape differs from the first's."""
        by_obsid = {f.obsid: f for f in self.frames_of(ccd)}
        missing = [o for o in obsids if o not in by_obsid]
        if missing:
            raise ValueError(f"{self.label} {ccd}: no frame file for ObsID(s) {missing} (the stack needs the frames)")
        shape = tuple(int(n) for n in shapes[0])
        bad = [o for o, sh in zip(obsids, shapes) if tuple(int(n) for n in sh) != shape]
        if bad:
            raise ValueError(f"{self.label} {ccd}: frame shape of ObsID(s) {bad} differs from the first frame's {shape}")
        return [by_obsid[o].path for o in obsids], shape  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ calibrations


class Calibration(BaseModel):
    """What a completed analysis provides to others: small values (JSON) and product files
    (absolute paths, keyed by CCD or ``"ALL"``), with the identity of the analysis."""

    name: str
    block: str
    test: str = Field(description="test run label that provided it (BIAS01, PTC01.2)")
    event_id: str | None = Field(None, description="analysis.completed event id of the provider")
    produced_at: datetime | None = None
    values: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "test": self.test, "event_id": self.event_id,
                "produced_at": self.produced_at.isoformat() if self.produced_at else None,
                "files": dict(self.files)}


class Calibrations:
    """The calibrations available to one extraction or solve (by name), with typed accessors."""

    def __init__(self, items: Mapping[str, Calibration] | Iterable[Calibration] | None = None):
        if items is None:
            items = {}
        if not isinstance(items, Mapping):
            items = {c.name: c for c in items}
        self._items: dict[str, Calibration] = dict(items)
        self._images: dict[tuple[str, str, str | int], np.ndarray | None] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(self._items.values())

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> Calibration | None:
        return self._items.get(name)

    def gain(self, ccd: str, quadrant: str) -> float | None:
        """Gain (e-/ADU) of a quadrant from the ``gain`` calibration (PTC01), None if unknown."""
        cal = self._items.get(GAIN)
        if cal is None:
            return None
        table = cal.values.get("gain", cal.values)
        try:
            value = table[ccd][quadrant]
        except (KeyError, TypeError):
            return None
        return float(value) if value else None

    def image(self, name: str, key: str, extension: str | int = 1) -> np.ndarray | None:
        """A calibration image (FITS extension of ``files[key]``), float32 or the stored dtype;
        None when the calibration or the file is absent. Cached."""
        cache_key = (name, key, extension)
        if cache_key not in self._images:
            cal = self._items.get(name)
            path = cal.files.get(key) if cal else None
            array = None
            if path and Path(path).is_file():
                from astropy.io import fits

                with fits.open(path, memmap=False) as hdul:
                    array = np.asarray(hdul[extension].data)
            self._images[cache_key] = array
        return self._images[cache_key]

    def provenance(self) -> list[dict[str, Any]]:
        return [c.provenance() for c in self._items.values()]


# ------------------------------------------------------------------------------------ extractions


class Extraction(BaseModel):
    """Base of every family's extraction (what the solve needs from one exposure or pair).
    Subclasses add fields: numbers, lists, dicts, nested models and numpy arrays (stored by
    :mod:`services.analyzer.extractions` as .npz + JSON). ``unit`` identifies it within its test
    run (``"e123"`` for ObsID 123, ``"p123-124"`` for a pair)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    family: str
    unit: str
    obsids: list[int]
    ccds: list[str] = Field(default_factory=list)
    flags: int = Field(0, description="validator flags of the input exposure(s)")
    calibrations: list[str] = Field(default_factory=list, description="calibration names used by the extraction")
    notes: list[str] = Field(default_factory=list)


def exposure_unit(obsid: int) -> str:
    return f"e{int(obsid)}"


def pair_unit(first: int, second: int) -> str:
    return f"p{int(first)}-{int(second)}"


def pair_exposures(exposures: Sequence[tuple[int, float, float | None]], rel_tol: float = 1e-3) -> list[tuple[int, int]]:
    """Pairs of exposures ``(obsid, exptime, wave)`` at equal exposure time (relative ``rel_tol``)
    and wavelength: in ObsID order, (1st, 2nd), (3rd, 4th), ... of each group; an odd one out
    stays unpaired. Deterministic for a given set (live and offline pair alike)."""
    groups: dict[Any, list[tuple[int, float]]] = {}
    for obsid, exptime, wave in sorted(exposures):
        key = None
        for (w, t) in groups:
            if w == wave and abs(t - exptime) <= max(1e-9, rel_tol * abs(t)):
                key = (w, t)
                break
        groups.setdefault(key or (wave, exptime), []).append((obsid, exptime))
    out: list[tuple[int, int]] = []
    for members in groups.values():
        ids = [o for o, _ in members]
        out += [(ids[k], ids[k + 1]) for k in range(0, len(ids) - 1, 2)]
    return sorted(out)


# ------------------------------------------------------------------------------------ the plug-in


ExtractFn = Callable[[ExposureFrames, Calibrations, Any], Extraction]
ExtractPairFn = Callable[[ExposureFrames, ExposureFrames, Calibrations, Any], Extraction]
SolveFn = Callable[[list, Calibrations, Any, TestRun, ProductSink], AnalysisOutput]


@dataclass(frozen=True)
class Family:
    """An analysis family plug-in (see the module docstring)."""

    name: str
    tests: tuple[str, ...]  # base test names or catalogue families (FLAT02 matches FLAT02_730)
    params: type[BaseModel]
    solve: SolveFn
    extract: ExtractFn | None = None
    extract_pair: ExtractPairFn | None = None
    unit: Literal["exposure", "pair", "none"] = "exposure"  # "none": no extraction (BF01 uses PTC01's dataset)
    extraction: type[Extraction] = Extraction  # the family's extraction model (for loading)
    needs: tuple[Need, ...] = ()
    extract_needs: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    version: str = "1"  # bump when the extraction changes: old stored extractions are not re-used
    #: Model of ``results[CCD][Q]`` (every key a field whose description gives meaning, unit and
    #: sign): the documentation of the result keys is generated from it.
    result: type[BaseModel] | None = None
    #: Model of the test-level keys of ``results`` (e.g. crosstalk), if any.
    test_result: type[BaseModel] | None = None

    def parameters(self, params: BaseModel | Mapping[str, Any] | None) -> BaseModel:
        """The family's parameters from a model instance or a dict (unknown keys ignored)."""
        return params_of(self.params, params)

    def units(self, exposures: Sequence[ExposureFrames]) -> list[tuple[str, tuple[ExposureFrames, ...]]]:
        """Extraction units of a set of exposures: ``[(unit, (exposure,) | (first, second))]``."""
        if self.unit == "none":
            return []
        if self.unit == "exposure":
            return [(exposure_unit(e.obsid), (e,)) for e in sorted(exposures, key=lambda e: e.obsid)]
        by_id = {e.obsid: e for e in exposures}
        pairs = pair_exposures([(e.obsid, e.exptime, e.wave) for e in exposures])
        return [(pair_unit(a, b), (by_id[a], by_id[b])) for a, b in pairs]

    def run_extraction(self, inputs: Sequence[ExposureFrames], calib: Calibrations, params: BaseModel) -> Extraction:
        """Call ``extract`` (one exposure) or ``extract_pair`` (two)."""
        if len(inputs) == 2:
            if self.extract_pair is None:
                raise TypeError(f"family {self.name} has no pair extraction")
            return self.extract_pair(inputs[0], inputs[1], calib, params)
        if self.extract is None:
            raise TypeError(f"family {self.name} has no extraction")
        return self.extract(inputs[0], calib, params)


def params_of(model: type[P], params: P | Mapping[str, Any] | None) -> P:
    """An analysis' parameters as its pydantic ``model``: an instance as is, else the model built
    from the keys of ``params`` it knows (others, e.g. campaign parameters, are ignored)."""
    if isinstance(params, model):
        return params
    return model(**{k: v for k, v in (params or {}).items() if k in model.model_fields})


def run_inprocess(
    family: Family,
    exposures: Sequence[ExposureFrames],
    run: TestRun,
    *,
    calib: Calibrations | None = None,
    params: BaseModel | Mapping[str, Any] | None = None,
    sink: ProductSink | None = None,
    extractions: Sequence[Extraction] | None = None,
) -> AnalysisOutput:
    """Both stages in this process (tests, small offline runs): extract every unit, then solve.
    ``extractions`` given: solve only (e.g. BF01 from another test's dataset)."""
    calib = calib or Calibrations()
    p = family.parameters(params if params is not None else run.params)
    if extractions is None:
        extractions = []
        for _, inputs in family.units(exposures):
            extractions.append(family.run_extraction(inputs, calib, p))
            for e in inputs:
                e.release()
    return family.solve(list(extractions), calib, p, run, sink if sink is not None else ListSink())


def exposures_of(frames: Iterable[FrameMeta], block: str, loader: Callable[[FrameMeta], np.ndarray] | None = None) -> list[ExposureFrames]:
    """Group frames by ObsID into :class:`ExposureFrames` (ObsID order)."""
    by_obsid: dict[int, list[FrameMeta]] = {}
    for f in frames:
        by_obsid.setdefault(f.obsid, []).append(f)
    return [ExposureFrames.from_frames(sorted(v, key=lambda m: m.ccd), block, loader) for _, v in sorted(by_obsid.items())]


__all__ = [
    "BF_KERNEL", "Calibration", "Calibrations", "DARK_MASK", "DEFECT_MASK", "ExposureFrames", "Extraction",
    "Family", "GAIN", "LINEARITY", "MASTER_BIAS", "Need", "PTC_COVARIANCES", "TestRun", "exposure_unit",
    "exposures_of", "load_frame_data", "pair_exposures", "pair_unit", "params_of", "run_inprocess",
]
