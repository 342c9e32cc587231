"""metatest: FPA-level aggregation of the blocks' analysis results (``metatest.md``).

``layout`` (the FPA and its 12 x 12 quadrant grid), ``families`` (family -> tests -> quantities),
``aggregate`` (pure: latest results in, maps out; electrons, spares, crosstalk), ``render`` (PNG
heat maps), ``mosaic`` (FITS mosaics), ``products`` (the files of a family), ``state`` (SQLite),
``service`` (the bus handler), ``offline`` (``--products DIR``), ``main`` (``vison metatest``)."""
