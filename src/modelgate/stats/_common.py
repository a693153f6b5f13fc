"""What the stats modules share: argument checks that name the bad argument, and the result base.

Package-private: import from `modelgate.stats`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


def real(name: str, value: object) -> float:
    """`value` as a finite float. A wrong type is a TypeError, NaN or infinity a ValueError.

    `numbers.Real` rather than `float(value)`: `float("1.5")` would let a string through.
    """
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        x = float(value)
    except OverflowError:  # an int beyond the float range
        x = math.inf
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    return x


def at_least(name: str, value: object, low: float) -> float:
    """`value` as a finite float >= `low`."""
    x = real(name, value)
    if x < low:
        raise ValueError(f"{name} must be >= {low:g}, got {x:g}")
    return x


def count(name: str, value: object, low: int = 0) -> int:
    """A count: an int, or an integral float such as numpy's sums give, >= `low`."""
    x = real(name, value)
    if not x.is_integer():
        raise ValueError(f"{name} must be a whole number, got {x:g}")
    if x < low:
        raise ValueError(f"{name} must be >= {low}, got {x:g}")
    return int(x)


def positive(name: str, value: object) -> float:
    """`value` as a finite float > 0."""
    x = real(name, value)
    if x <= 0:
        raise ValueError(f"{name} must be > 0, got {x:g}")
    return x


def probability(name: str, value: object, *, open_interval: bool = True) -> float:
    """A level or probability: in (0, 1) (alpha, power), or in [0, 1] with open_interval=False."""
    x = real(name, value)
    if open_interval:
        if not 0.0 < x < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {x:g}")
    elif not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {x:g}")
    return x


def vector(name: str, values: npt.ArrayLike, *, min_size: int = 0, copy: bool = True) -> FloatArray:
    """A 1-D float64 copy of `values` (a sequence or an array): finite numbers, `min_size` or more.
    `copy=False`: `values` itself when it is such an array already (a caller that only reads
    it: 10^7 latencies are 80 MB).

    The dtype is checked before converting because numpy would turn `["1.5"]` into 1.5.
    """
    raw = np.asarray(values)
    if raw.dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {raw.dtype}")
    if raw.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {raw.shape}")
    if raw.size < min_size:
        raise ValueError(f"{name} must hold at least {min_size} values, got {raw.size}")
    out = raw.astype(np.float64, copy=copy)
    bad = ~np.isfinite(out)
    if bad.any():
        raise ValueError(f"{name} must be finite, got {out[bad][0]} at index {int(np.argmax(bad))}")
    return out


def counts_and_weights(
    counts: npt.ArrayLike, weights: npt.ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """An SRM test's inputs: counts >= 0 per variant, and as many weights, >= 0, not all 0."""
    observed = vector("counts", counts, min_size=1)
    if (observed < 0).any():
        raise ValueError(f"counts must be >= 0, got {observed.tolist()}")
    w = vector("weights", weights, min_size=1)
    if w.size != observed.size:
        raise ValueError(
            f"weights must have one entry per count: {w.size} weights, {observed.size} counts"
        )
    if (w < 0).any() or w.sum() == 0.0:
        raise ValueError(f"weights must be >= 0 and not all 0, got {w.tolist()}")
    return observed, w


def _json_value(value: Any) -> Any:
    """JSON has no NaN or infinity: they become None (null), as orjson writes them anyway."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, tuple | list):
        return [_json_value(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class Result:
    """Base of the frozen result types: one method, `as_dict`, for JSON."""

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict: tuples become lists, NaN and +-inf become None."""
        return {f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}
