"""Which analysis module analyses which test.

Every module of ``services.analyzer.analysis`` that defines ``TESTS`` and ``run_test`` is a
plug-in (see :mod:`services.analyzer.model`). A test name is matched exactly (``PTC01``), then by
its catalogue family (``FLAT02_730`` -> ``FLAT02``); a repeat suffix is ignored
(``BIAS01.2`` -> ``BIAS01``). A module that fails to import is reported, not fatal.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from functools import lru_cache
from types import ModuleType

from services.analyzer.model import split_test_name

log = logging.getLogger("vison.analyzer")
_NOT_PLUGINS = {"common", "__init__"}


class UnknownTest(KeyError):
    """No analysis module handles this test."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else "unknown test"


@lru_cache(maxsize=1)
def plugins() -> tuple[dict[str, ModuleType], dict[str, str]]:
    """``({test: module}, {module name: import error})`` of the analysis package."""
    import services.analyzer.analysis as pkg

    table: dict[str, ModuleType] = {}
    broken: dict[str, str] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in _NOT_PLUGINS or info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception as exc:  # a half-written module must not stop the others
            broken[info.name] = f"{exc.__class__.__name__}: {exc}"
            log.warning("analysis module %s not loaded: %s", info.name, broken[info.name])
            continue
        tests = getattr(module, "TESTS", None)
        if not tests or not callable(getattr(module, "run_test", None)):
            continue
        for test in tests:
            table[str(test)] = module
    return table, broken


def base_test(name: str) -> str:
    """``BIAS01.2`` -> ``BIAS01``."""
    return split_test_name(name)[0]


def find(test: str) -> ModuleType | None:
    """The module analysing ``test`` (None when there is none)."""
    table, _ = plugins()
    base = base_test(test)
    if base in table:
        return table[base]
    return table.get(family_of(base))


def family_of(test: str) -> str:
    """Catalogue family of a test name (``FLAT02_730`` -> ``FLAT02``, ``FLAT_STB`` -> ``FLAT_STB``)."""
    base = base_test(test)
    try:
        from shared.campaign import get_test

        return get_test(base).family.name
    except Exception:
        return base.split("_", 1)[0]


def get(test: str) -> ModuleType:
    """The module analysing ``test``; :class:`UnknownTest` naming the known tests otherwise."""
    module = find(test)
    if module is None:
        table, broken = plugins()
        extra = f"; modules not loaded: {broken}" if broken else ""
        raise UnknownTest(f"no analysis for test {test!r} (analysed: {', '.join(sorted(table))}{extra})")
    return module


def known_tests() -> list[str]:
    return sorted(plugins()[0])
