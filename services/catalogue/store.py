"""The catalogue store: add events (idempotent by event id, upserts), query results.

``Catalogue(url)`` opens (and creates) the tables on any SQLAlchemy URL: the embedded default
``sqlite:///<state_dir>/catalogue.sqlite`` or PostgreSQL (``postgresql+psycopg://user:pw@host/db``).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel
from sqlalchemy import create_engine, delete, event as sa_event, func, select
from sqlalchemy.engine import Connection, Engine

from services.catalogue.models import (
    Analysis,
    Base,
    Exposure,
    ExposureQuadrant,
    FpaBlock,
    FpaFamily,
    FpaValue,
    Result,
)
from services.catalogue.records import RecordError, analysis_rows, exposure_rows, metatest_rows, utc
from shared.config import Settings
from shared.events import AnalysisCompleted, Event, ExposureValidated, MetatestCompleted

log = logging.getLogger("vison.catalogue")


def catalogue_url(settings: Settings) -> str:
    """``VISON_CATALOGUE_URL``, else the SQLite file ``<state_dir>/catalogue.sqlite``."""
    if settings.catalogue_url:
        return settings.catalogue_url
    return f"sqlite:///{(Path(settings.state_dir) / 'catalogue.sqlite').resolve()}"


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and foreign keys."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @sa_event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


class ResultRow(BaseModel):
    """One catalogued value (``vison results query``)."""

    block: str
    test: str
    repeat: int
    ccd: str
    quadrant: str
    quantity: str
    value: float | None
    error: float | None
    unit: str
    software_version: str
    produced_at: datetime
    event_id: str


class ExposureRow(BaseModel):
    """One catalogued exposure (``vison show``)."""

    block: str
    obsid: int
    test: str
    obs_time: datetime
    verdict: str
    flag_names: str
    files: list[dict[str, Any]]


class Catalogue:
    """The results catalogue on one database."""

    def __init__(self, url: str, create: bool = True):
        self.url = url
        self.engine = make_engine(url)
        if create:
            self.create_tables()

    def create_tables(self, attempts: int = 3) -> None:
        """Create the missing tables (another process creating them at the same moment wins: retried)."""
        from sqlalchemy.exc import DBAPIError

        for attempt in range(1, attempts + 1):
            try:
                Base.metadata.create_all(self.engine)
                return
            except DBAPIError:
                if attempt == attempts:
                    raise
                time.sleep(0.2 * attempt)

    @classmethod
    def from_settings(cls, settings: Settings, create: bool = True) -> "Catalogue":
        return cls(catalogue_url(settings), create=create)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Catalogue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ writing
    def _insert(self, model):
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(model.__table__)

    def _upsert(self, conn: Connection, model, rows: list[dict[str, Any]], keys: Iterable[str]) -> None:
        if not rows:
            return
        keys = list(keys)
        stmt = self._insert(model)
        update = {c.name: stmt.excluded[c.name] for c in model.__table__.columns
                  if c.name not in keys and not (c.primary_key and c.autoincrement is not False and c.name == "id")}
        conn.execute(stmt.on_conflict_do_update(index_elements=keys, set_=update), rows)

    def add(self, event: Event) -> bool:
        """Catalogue one event; False when it was already there (same event id) or is not
        catalogued. Raises :class:`RecordError` for content that cannot be catalogued."""
        if isinstance(event, ExposureValidated):
            return self.add_exposure(event)
        if isinstance(event, AnalysisCompleted):
            return self.add_analysis(event)
        if isinstance(event, MetatestCompleted):
            return self.add_metatest(event)
        return False

    def add_exposure(self, ev: ExposureValidated) -> bool:
        row, quads = exposure_rows(ev)
        with self.engine.begin() as conn:
            known = conn.execute(select(Exposure.event_id).where(Exposure.block == ev.block,
                                                                 Exposure.obsid == ev.obsid)).scalar()
            if known == row["event_id"]:
                return False
            self._upsert(conn, Exposure, [row], ["block", "obsid"])
            self._upsert(conn, ExposureQuadrant, quads, ["block", "obsid", "ccd", "quadrant"])
        return True

    def add_analysis(self, ev: AnalysisCompleted) -> bool:
        head, rows = analysis_rows(ev)
        with self.engine.begin() as conn:
            if conn.execute(select(Analysis.event_id).where(Analysis.event_id == head["event_id"])).scalar():
                return False
            self._upsert(conn, Analysis, [head], ["event_id"])
            self._upsert(conn, Result, rows, ["event_id", "ccd", "quadrant", "quantity"])
        return True

    def add_metatest(self, ev: MetatestCompleted) -> bool:
        """Replace a family's maps by a newer event (an older or repeated one changes nothing)."""
        head, blocks, values = metatest_rows(ev)
        with self.engine.begin() as conn:
            known = conn.execute(select(FpaFamily.event_id, FpaFamily.produced_at)
                                 .where(FpaFamily.family == ev.family)).first()
            if known is not None and (known[0] == head["event_id"] or utc(known[1]) > head["produced_at"]):
                return False
            conn.execute(delete(FpaValue).where(FpaValue.family == ev.family))
            conn.execute(delete(FpaBlock).where(FpaBlock.family == ev.family))
            self._upsert(conn, FpaFamily, [head], ["family"])
            if blocks:
                conn.execute(FpaBlock.__table__.insert(), blocks)
            if values:
                conn.execute(FpaValue.__table__.insert(), values)
        return True

    def clear_products(self) -> None:
        """Forget what the products folder holds (analyses, results, FPA): before a rebuild."""
        with self.engine.begin() as conn:
            for model in (Result, Analysis, FpaValue, FpaBlock, FpaFamily):
                conn.execute(delete(model))

    # ------------------------------------------------------------------ reading
    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {m.__tablename__: conn.execute(select(func.count()).select_from(m)).scalar_one()
                    for m in (Exposure, ExposureQuadrant, Analysis, Result, FpaFamily, FpaValue)}

    def results(self, quantity: str, block: str | None = None, test: str | None = None,
                latest: bool = True, status: str = "completed") -> list[ResultRow]:
        """Values of ``quantity`` (``*`` wildcards in ``test``); with ``latest`` only the newest
        analysis of each (block, test, repeat). Ordered by time, block, test, repeat, CCD, quadrant."""
        stmt = (select(*Result.__table__.columns).join(Analysis, Analysis.event_id == Result.event_id)
                .where(Result.quantity == quantity, Analysis.status == status))
        if block:
            stmt = stmt.where(Result.block == block)
        if test:
            stmt = stmt.where(Result.test.like(test.replace("*", "%"))) if "*" in test else stmt.where(Result.test == test)
        stmt = stmt.order_by(Result.produced_at, Result.block, Result.test, Result.repeat, Result.ccd, Result.quadrant)
        with self.engine.connect() as conn:
            rows = [ResultRow(**{k: m[k] for k in ResultRow.model_fields}) for m in conn.execute(stmt).mappings()]
        for r in rows:
            r.produced_at = utc(r.produced_at)
        if latest:
            newest: dict[tuple, tuple[datetime, str]] = {}
            for r in rows:
                key = (r.block, r.test, r.repeat)
                if key not in newest or r.produced_at >= newest[key][0]:
                    newest[key] = (r.produced_at, r.event_id)
            rows = [r for r in rows if newest[(r.block, r.test, r.repeat)][1] == r.event_id]
        return rows

    def exposure(self, obsid: int | None = None, block: str | None = None) -> ExposureRow | None:
        """One exposure (the latest when ``obsid`` is None), optionally of one block."""
        stmt = select(*Exposure.__table__.columns)
        if block:
            stmt = stmt.where(Exposure.block == block)
        if obsid is not None:
            stmt = stmt.where(Exposure.obsid == obsid)
        stmt = stmt.order_by(Exposure.obs_time.desc(), Exposure.obsid.desc()).limit(1)
        with self.engine.connect() as conn:
            r = conn.execute(stmt).mappings().first()
        if r is None:
            return None
        return ExposureRow(block=r["block"], obsid=r["obsid"], test=r["test"], obs_time=utc(r["obs_time"]),
                           verdict=r["verdict"], flag_names=r["flag_names"], files=list(r["files"] or []))


__all__ = ["Catalogue", "ExposureRow", "RecordError", "ResultRow", "catalogue_url", "make_engine"]
