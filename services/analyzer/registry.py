"""Which analysis family analyses which test (engine v2).

Every module or package of :mod:`services.analyzer.families` that defines ``FAMILY`` (a
:class:`~services.analyzer.family.Family`) is a plug-in; ``VISON_ANALYZER_PLUGINS`` adds modules
(dotted names or ``.py`` paths, comma separated: test families, site extensions). A test name is
matched exactly (``PTC01``), then by its catalogue family (``FLAT02_730`` -> ``FLAT02``); a repeat
suffix is ignored (``BIAS01.2`` -> ``BIAS01``). A module that fails to import is reported, not
fatal.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pkgutil
import sys
from functools import lru_cache
from pathlib import Path

from services.analyzer.family import Family
from services.analyzer.model import split_test_name

log = logging.getLogger("vison.analyzer")


class UnknownTest(KeyError):
    """No analysis family handles this test."""

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0]) if self.args else "unknown test"


def _import(spec: str):
    spec = spec.strip()
    if spec.endswith(".py"):
        path = Path(spec).resolve()
        name = f"vison_plugin_{path.stem}"
        if name in sys.modules:
            return sys.modules[name]
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        loader_spec.loader.exec_module(module)
        return module
    return importlib.import_module(spec)


def _families_of(module) -> list[Family]:
    found = getattr(module, "FAMILY", None)
    items = found if isinstance(found, (list, tuple)) else [found] if found is not None else []
    items += list(getattr(module, "FAMILIES", ()) or ())
    return [f for f in items if isinstance(f, Family)]


@lru_cache(maxsize=1)
def plugins() -> tuple[dict[str, Family], dict[str, str]]:
    """``({test or catalogue family: Family}, {module: import error})``."""
    import services.analyzer.families as pkg
    from shared.config import get_settings

    table: dict[str, Family] = {}
    broken: dict[str, str] = {}
    specs = [f"{pkg.__name__}.{info.name}" for info in pkgutil.iter_modules(pkg.__path__) if not info.name.startswith("_")]
    specs += [s for s in get_settings().analyzer_plugins.split(",") if s.strip()]
    for spec in specs:
        try:
            module = _import(spec)
        except Exception as exc:  # a half-written module must not stop the others
            broken[spec] = f"{exc.__class__.__name__}: {exc}"
            log.warning("analysis family %s not loaded: %s", spec, broken[spec])
            continue
        for fam in _families_of(module):
            for test in fam.tests:
                table[str(test)] = fam
    return table, broken


def reload() -> None:
    """Forget the discovered families (tests changing ``VISON_ANALYZER_PLUGINS``)."""
    plugins.cache_clear()


def base_test(name: str) -> str:
    """``BIAS01.2`` -> ``BIAS01``."""
    return split_test_name(name)[0]


def family_of(test: str) -> str:
    """Catalogue family of a test name (``FLAT02_730`` -> ``FLAT02``, ``FLAT_STB`` -> ``FLAT_STB``)."""
    base = base_test(test)
    try:
        from shared.campaign import get_test

        return get_test(base).family.name
    except Exception:
        return base.split("_", 1)[0]


def find(test: str) -> Family | None:
    """The family analysing ``test`` (None when there is none)."""
    table, _ = plugins()
    base = base_test(test)
    if base in table:
        return table[base]
    return table.get(family_of(base))


def get(test: str) -> Family:
    """The family analysing ``test``; :class:`UnknownTest` naming the known tests otherwise."""
    fam = find(test)
    if fam is None:
        table, broken = plugins()
        extra = f"; modules not loaded: {broken}" if broken else ""
        raise UnknownTest(f"no analysis for test {test!r} (analysed: {', '.join(sorted(table))}{extra})")
    return fam


def by_name(name: str) -> Family:
    """A family by its name (jobs carry the family name)."""
    for fam in plugins()[0].values():
        if fam.name == name:
            return fam
    raise UnknownTest(f"no analysis family named {name!r}")


def known_tests() -> list[str]:
    return sorted(plugins()[0])
