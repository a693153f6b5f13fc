"""Picks the assignment core: the compiled modelgate._core, else its pure-Python twin.

MODELGATE_NO_EXTENSIONS (non-empty) forces the twin; non-CPython or a missing build falls back.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Literal

from ._core_py import Units  # a type alias, the same for both twins

__all__ = [
    "BUCKETS",
    "IMPLEMENTATION",
    "Layer",
    "Units",
    "VariantTable",
    "bucket",
    "bucket_many",
    "xxh64",
]

NO_EXTENSIONS = bool(os.environ.get("MODELGATE_NO_EXTENSIONS"))

IMPLEMENTATION: Literal["cython", "python"]

# Type checkers read the twin: it is the reference for behaviour and types.
if TYPE_CHECKING or NO_EXTENSIONS or sys.implementation.name != "cpython":
    from ._core_py import BUCKETS, Layer, VariantTable, bucket, bucket_many, xxh64

    IMPLEMENTATION = "python"
else:
    try:
        from ._core import BUCKETS, Layer, VariantTable, bucket, bucket_many, xxh64

        IMPLEMENTATION = "cython"
    except ImportError:
        from ._core_py import BUCKETS, Layer, VariantTable, bucket, bucket_many, xxh64

        IMPLEMENTATION = "python"
