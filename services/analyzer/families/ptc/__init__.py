"""PTC01 / PTC02 family (photon transfer curve, gain, brighter-fatter a-matrix, saturation, HER):

- :mod:`.params`: parameters; :mod:`.measure`: the pair measurement (pure);
- :mod:`.models`: exponential, full covariance (shared with BF01 via ``science.covariance``)
  and quadratic models and fits; :mod:`.solve`: per-quadrant fits and the results model;
- :mod:`.plugin`: ``extract_pair`` / ``solve`` / products; :mod:`.figures`.
"""

from services.analyzer.families.ptc.plugin import FAMILY  # noqa: F401
