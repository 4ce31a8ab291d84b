"""The registry of benchmark suites: every module in :mod:`fastdl.bench.suites` that defines
``SUITE`` is one, so a new kernel family plugs in by adding one module there."""

from __future__ import annotations

import functools
import importlib
import pkgutil

from fastdl.bench.core import Suite


@functools.cache
def _discover() -> dict[str, Suite]:
    from fastdl.bench import suites as package

    found: dict[str, Suite] = {}
    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        suite = getattr(module, "SUITE", None)
        if not isinstance(suite, Suite):
            continue
        if suite.name in found:
            raise RuntimeError(f"two modules in fastdl.bench.suites register a suite named {suite.name!r}")
        found[suite.name] = suite
    return found


def suite_names() -> list[str]:
    """Names of every registered suite, in a stable order."""
    return list(_discover())


def get_suite(name: str) -> Suite:
    """The suite called ``name``; a ValueError lists the valid names."""
    suites = _discover()
    if name not in suites:
        raise ValueError(f"unknown benchmark suite {name!r}; available: {', '.join(suites) or 'none'}")
    return suites[name]
