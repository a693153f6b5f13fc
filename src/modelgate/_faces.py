"""Lazy faces for the subpackages (PEP 562): a package's `__init__` names its public names
and the module of each, and a name is imported on first use. So `import
modelgate.analysis.sql` does not load DuckDB, scipy and the rest of the package with it,
which every gateway process would then carry."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_face"]


def lazy_face(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """The package's module `__getattr__`: `exports` maps each public name to the submodule
    (relative to `package`) that defines it."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
