"""Builds the Cython core (ext/ -> modelgate._core) or, failing that, a pure-Python install.

MODELGATE_NO_EXTENSIONS=1 skips the build on purpose; a missing compiler or Cython skips it
with a warning. Either way the build says which variant it produced.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext


def _banner(text: str) -> None:
    line = "*" * 72
    print(f"\n{line}\n* modelgate: {text}\n{line}\n", file=sys.stderr)


class _OptionalBuildExt(build_ext):
    """Falls back to the pure-Python twin when the C build fails."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure degrades gracefully
            _banner(f"C extension not built ({exc}); installed the pure-Python build")
            return
        if self.extensions:
            _banner("built the accelerated Cython core (modelgate._core)")

    def build_extension(self, ext: Any) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            _banner(f"C extension {ext.name} not built ({exc}); pure-Python build")


def _extensions() -> list[Any]:
    if os.environ.get("MODELGATE_NO_EXTENSIONS"):
        _banner("MODELGATE_NO_EXTENSIONS is set: installing the pure-Python build")
        return []
    if sys.implementation.name != "cpython":
        _banner("not CPython: installing the pure-Python build")
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        _banner("Cython not available: installing the pure-Python build")
        return []
    from setuptools import Extension

    ext = Extension(
        "modelgate._core",
        ["ext/_core.pyx"],
        extra_compile_args=["-O3"],
    )
    return list(
        cythonize(
            [ext],
            compiler_directives={
                "language_level": "3",
                "boundscheck": False,
                "wraparound": False,
                "cdivision": True,
                "initializedcheck": False,
            },
        )
    )


setup(ext_modules=_extensions(), cmdclass={"build_ext": _OptionalBuildExt})
