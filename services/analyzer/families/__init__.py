"""Analysis families (engine v2 plug-ins): one module or package per family, each defining
``FAMILY = services.analyzer.family.Family(...)`` (see :mod:`services.analyzer.family`).
Families import the numerics from :mod:`services.analyzer.science`, never from each other."""
