"""Pure analysis modules of the analyzer: arrays of canonical quadrants + exposure metadata in,
typed results out (no I/O, no bus).

- ``common``: shared preprocessing (prescan offsets, master bias / flat / mask), sigma-clipped
  statistics with the clipping correction of the variance, smooth 2-D models, fits, and
  :class:`common.FrameInput` (one CCD frame: lazy canonical quadrants + exptime, ObsID, CCD,
  wavelength, time, exposure-log values).
- one module per test family, each with a pure entry point and an analyzer plug-in
  (``TESTS``, ``PARAMS``, ``run_test(data, sink)``, see ``services.analyzer.model``):
  ``bias`` (BIAS01/02), ``dark`` (DARK01), ``cosmetics`` (COSMETICS00),
  ``flat.analyse_flat`` (FLAT01/02), ``ptc.analyse_ptc`` (PTC01/02), ``nl.analyse_nl``
  (NL01/02), ``bf.analyse_bf`` (BF01, on PTC frames). The pure entry points take
  ``(frames, definition=None, params=None, quadrants=QUADRANTS)`` and return a dataclass whose
  ``results()`` / ``results_dict()`` gives ``results[CCD][Q]`` as JSON-able dicts.
"""
