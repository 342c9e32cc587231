"""The results catalogue: every exposure's verdict, every analysis result per block / CCD /
quadrant / quantity and every FPA aggregate in one SQL store (SQLAlchemy 2; SQLite embedded by
default, PostgreSQL in the lab), filled from the bus by ``vison catalogue`` and rebuildable from
the products folder (``vison catalogue rebuild``)."""
