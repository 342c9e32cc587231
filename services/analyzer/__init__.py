"""The analyzer (engine v2): analysis families (``family.py``, ``families/``, ``science/``) and
the plumbing that runs them in two stages, extract then solve: the coordinator (``coordinator``,
``planner``, ``store``), the stateless workers (``worker``, ``execute``), ``vison analyze``
(``offline``, ``local``) and ``vison reprocess`` (``reprocess``).

Analyses are single-threaded per process (parallelism comes from worker processes): the BLAS
thread pools are limited to one thread unless the environment says otherwise, which also keeps
small least-squares fits from spinning threads on a shared machine (30x faster here).
"""

import os as _os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_var, "1")
