"""Durable storage of extractions: one ``.npz`` file per (test run, family, unit), written
atomically (temporary file + fsync + rename), so that a redelivered extraction job overwrites
its own output and a solve never double-counts.

An :class:`~services.analyzer.family.Extraction` (pydantic, possibly holding numpy arrays and
nested models) is stored as a JSON document in which every array is replaced by a reference
``{"__array__": "a<k>"}`` to an entry of the same ``.npz`` archive (no pickle)."""

from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel

from services.analyzer.family import Extraction

E = TypeVar("E", bound=Extraction)
_DOC = "__doc__.json"


def _encode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, np.ndarray):
        key = f"a{len(arrays)}"
        arrays[key] = value
        return {"__array__": key}
    if isinstance(value, BaseModel):
        return {name: _encode(getattr(value, name), arrays) for name in type(value).model_fields}
    if isinstance(value, dict):
        return {str(k): _encode(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_encode(v, arrays) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value != value:  # NaN survives JSON as a marker
        return {"__nan__": True}
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def _decode(value: Any, arrays: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            return np.asarray(arrays[value["__array__"]])
        if set(value) == {"__nan__"}:
            return float("nan")
        return {k: _decode(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, arrays) for v in value]
    return value


def dumps(extraction: Extraction, job_id: str | None = None) -> bytes:
    """The ``.npz`` bytes of an extraction (``job_id``: the job that computed it, recorded)."""
    arrays: dict[str, np.ndarray] = {}
    doc = _encode(extraction, arrays)
    doc["__class__"] = f"{type(extraction).__module__}.{type(extraction).__qualname__}"
    if job_id:
        doc["__job_id__"] = job_id
    buf = io.BytesIO()
    np.savez(buf, **{_DOC: np.frombuffer(json.dumps(doc, allow_nan=False).encode(), dtype=np.uint8)}, **arrays)
    return buf.getvalue()


def loads(data: bytes, model: type[E]) -> E:
    """The extraction stored in ``data`` as ``model``."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        doc = json.loads(bytes(npz[_DOC]).decode())
        doc.pop("__class__", None)
        doc.pop("__job_id__", None)
        return model.model_validate(_decode(doc, npz))


def stored_job_id(path: str | Path) -> str | None:
    """The job id recorded in a stored extraction (None: absent, unreadable or not recorded)."""
    try:
        with np.load(Path(path), allow_pickle=False) as npz:
            return json.loads(bytes(npz[_DOC]).decode()).get("__job_id__")
    except (OSError, ValueError, KeyError, EOFError):
        return None
    except Exception:  # a truncated archive raises zipfile errors
        return None


def save(path: str | Path, extraction: Extraction, job_id: str | None = None) -> Path:
    """Write atomically (same-folder temporary file, fsync, rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    data = dumps(extraction, job_id)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load(path: str | Path, model: type[E]) -> E:
    return loads(Path(path).read_bytes(), model)
