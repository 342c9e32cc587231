"""SQLAlchemy 2 tables of the results catalogue (portable: SQLite and PostgreSQL).

- ``exposures``: one row per (block, ObsID): test, time, verdict, flags, mean prescan offset per
  CCD (ADU), the frames (paths relative to the data root), the ``exposure.validated`` event id.
- ``exposure_quadrants``: per (block, ObsID, CCD, quadrant) offsets and noise (ADU) of the
  prescan / image / overscan, saturated and lost pixels.
- ``analyses``: one row per ``analysis.completed`` event (status, flags, software version).
- ``results``: one row per (analysis event, CCD, quadrant, quantity): value, error, unit; the
  quadrant is ``''`` for a per-CCD value, CCD and quadrant ``''`` for a test-level value.
- ``fpa_families`` / ``fpa_values``: the latest ``metatest.completed`` of each family and its
  maps, one row per (family, quantity, block, CCD, quadrant) with the FPA position (slice, col,
  grid x / y; NULL for spares).
Times are UTC (``timestamptz`` on PostgreSQL).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TS = DateTime(timezone=True)


class Base(DeclarativeBase):
    pass


class Exposure(Base):
    __tablename__ = "exposures"
    __table_args__ = (UniqueConstraint("block", "obsid", name="uq_exposures_block_obsid"),
                      Index("ix_exposures_block_time", "block", "obs_time"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    block: Mapped[str] = mapped_column(String(40))
    obsid: Mapped[int] = mapped_column(BigInteger)
    roe: Mapped[int] = mapped_column(Integer, default=1)
    test: Mapped[str] = mapped_column(String(80), index=True)
    obs_time: Mapped[datetime] = mapped_column(TS, doc="Exposure time (file names, ELVIS clock taken as UTC; else ingest time).")
    validated_at: Mapped[datetime] = mapped_column(TS)
    passed: Mapped[bool] = mapped_column(Boolean)
    verdict: Mapped[str] = mapped_column(String(8), doc="PASS | FAIL")
    flags: Mapped[int] = mapped_column(BigInteger, default=0)
    flag_names: Mapped[str] = mapped_column(Text, default="", doc="Comma-separated flag names.")
    offset_ccd1: Mapped[float | None] = mapped_column(Float, doc="Mean prescan offset of CCD1, ADU.")
    offset_ccd2: Mapped[float | None] = mapped_column(Float)
    offset_ccd3: Mapped[float | None] = mapped_column(Float)
    structure: Mapped[str] = mapped_column(Text, default="")
    files: Mapped[list] = mapped_column(JSON, default=list, doc="[{ccd, path}] relative to the data root.")
    event_id: Mapped[str] = mapped_column(String(36))


class ExposureQuadrant(Base):
    __tablename__ = "exposure_quadrants"
    __table_args__ = (UniqueConstraint("block", "obsid", "ccd", "quadrant", name="uq_expquad"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    block: Mapped[str] = mapped_column(String(40))
    obsid: Mapped[int] = mapped_column(BigInteger)
    ccd: Mapped[str] = mapped_column(String(8))
    quadrant: Mapped[str] = mapped_column(String(2))
    offset_pre: Mapped[float] = mapped_column(Float)
    offset_img: Mapped[float] = mapped_column(Float)
    offset_ove: Mapped[float] = mapped_column(Float)
    noise_pre: Mapped[float] = mapped_column(Float)
    noise_img: Mapped[float] = mapped_column(Float)
    noise_ove: Mapped[float] = mapped_column(Float)
    saturated: Mapped[int] = mapped_column(BigInteger)
    lost: Mapped[int] = mapped_column(BigInteger)


class Analysis(Base):
    __tablename__ = "analyses"

    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    block: Mapped[str] = mapped_column(String(40), index=True)
    test: Mapped[str] = mapped_column(String(80))
    repeat: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16))
    flags: Mapped[int] = mapped_column(BigInteger, default=0)
    flag_names: Mapped[str] = mapped_column(Text, default="")
    software_version: Mapped[str] = mapped_column(String(40), default="")
    produced_at: Mapped[datetime] = mapped_column(TS)
    error: Mapped[str | None] = mapped_column(Text)
    products: Mapped[list] = mapped_column(JSON, default=list)


class Result(Base):
    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("event_id", "ccd", "quadrant", "quantity", name="uq_results"),
                      Index("ix_results_block_quantity", "block", "quantity"),
                      Index("ix_results_test", "test"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(36), ForeignKey("analyses.event_id", ondelete="CASCADE"))
    block: Mapped[str] = mapped_column(String(40))
    test: Mapped[str] = mapped_column(String(80))
    repeat: Mapped[int] = mapped_column(Integer, default=0)
    ccd: Mapped[str] = mapped_column(String(8), default="", doc="CCD1..3, '' for a test-level value.")
    quadrant: Mapped[str] = mapped_column(String(2), default="")
    quantity: Mapped[str] = mapped_column(String(80))
    value: Mapped[float | None] = mapped_column(Float)
    error: Mapped[float | None] = mapped_column(Float, doc="From '<quantity>_err' when the analysis gives it.")
    unit: Mapped[str] = mapped_column(String(16), default="")
    software_version: Mapped[str] = mapped_column(String(40), default="")
    produced_at: Mapped[datetime] = mapped_column(TS)


class FpaFamily(Base):
    __tablename__ = "fpa_families"

    family: Mapped[str] = mapped_column(String(40), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36))
    produced_at: Mapped[datetime] = mapped_column(TS)
    blocks: Mapped[list] = mapped_column(JSON, default=list)
    missing: Mapped[list] = mapped_column(JSON, default=list)
    products: Mapped[list] = mapped_column(JSON, default=list)


class FpaBlock(Base):
    """Which FPA blocks a family holds (one row per family and FPA block): the 'blocks in' panel."""

    __tablename__ = "fpa_blocks"
    __table_args__ = (UniqueConstraint("family", "block", name="uq_fpa_blocks"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    family: Mapped[str] = mapped_column(String(40))
    block: Mapped[str] = mapped_column(String(40))
    slice: Mapped[int | None] = mapped_column(Integer)
    present: Mapped[bool] = mapped_column(Boolean)


class FpaValue(Base):
    __tablename__ = "fpa_values"
    __table_args__ = (UniqueConstraint("family", "quantity", "block", "ccd", "quadrant", name="uq_fpa_values"),
                      Index("ix_fpa_values_quantity", "quantity"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    family: Mapped[str] = mapped_column(String(40))
    quantity: Mapped[str] = mapped_column(String(80))
    block: Mapped[str] = mapped_column(String(40))
    ccd: Mapped[str] = mapped_column(String(8))
    quadrant: Mapped[str] = mapped_column(String(2))
    value: Mapped[float | None] = mapped_column(Float)
    slice: Mapped[int | None] = mapped_column(Integer)
    col: Mapped[int | None] = mapped_column(Integer)
    x: Mapped[int | None] = mapped_column(Integer, doc="Grid column 0..11 (left to right).")
    y: Mapped[int | None] = mapped_column(Integer, doc="Grid row 0..11 (0 = bottom).")
    event_id: Mapped[str] = mapped_column(String(36))
    produced_at: Mapped[datetime] = mapped_column(TS)
