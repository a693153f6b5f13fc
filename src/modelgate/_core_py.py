"""Pure-Python twin of the assignment core: XXH64 (via `xxhash`), buckets, variant tables, layers.

The reference for behaviour and types; ext/_core.pyx matches it bit for bit. The formulas:
  bucket(salt, unit) = XXH64(utf8(salt + ":" + unit), seed=0) mod 10000
  variant i (weights w_1..w_n):  C_(i-1) <= bucket < C_i,  C_i = floor(10000 * S_i / W + 0.5),
      S_i = w_1 + ... + w_i summed left to right in double precision, W = S_n, C_0 = 0
  experiment j of a Layer named L (shares f_1..f_m, fractions summing to <= 1):
      E_(j-1) <= bucket(L, unit) < E_j,  E_j = min(10000, floor(10000 * T_j + 0.5)),
      T_j = f_1 + ... + f_j, E_0 = 0; buckets from E_m up are in no experiment of the layer.
"""

from __future__ import annotations

import math
import numbers
import operator
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt
from xxhash import xxh64_intdigest as _xxh64_intdigest

__all__ = ["BUCKETS", "Layer", "Units", "VariantTable", "bucket", "bucket_many", "xxh64"]

BUCKETS = 10000  # basis points: bucket(salt, unit) is in [0, BUCKETS)

# Batch inputs: a list/tuple/iterable of str, or a 1-D numpy array of dtype str ('<U..') or
# object holding str. Batch outputs are always int32 (buckets, variant indices, -1 for "none").
Units: TypeAlias = Iterable[str] | npt.NDArray[Any]

_SEED_LIMIT = 1 << 64
# Shares of a layer are fractions; their sum may exceed 1 by float noise (0.1 + 0.2 + 0.7 is
# 1.0000000000000002).
_SHARE_SLACK = 1e-9


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64 of `data` as an unsigned int; `seed` must be in [0, 2**64)."""
    if not isinstance(data, bytes):
        raise TypeError(f"data: expected bytes, got {type(data).__name__}")
    if type(seed) is not int:
        _check_seed_type(seed)
    # xxhash wraps an out-of-range seed silently; the compiled twin could not, so neither does.
    if not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed: must be in [0, 2**64), got {seed!r}")
    return int(_xxh64_intdigest(data, seed))


def _check_seed_type(seed: object) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed: expected int, got {type(seed).__name__}")


def bucket(salt: str, unit: str) -> int:
    """XXH64(utf8(salt + ":" + unit), seed=0) mod 10000: the unit's bucket in [0, 10000)."""
    try:
        return int(_xxh64_intdigest((salt + ":" + unit).encode())) % BUCKETS
    except TypeError:
        _raise_not_str(salt, unit)
        raise


def _raise_not_str(salt: object, unit: object) -> None:
    # Only on the error path, so the happy path pays nothing for the compiled twin's message.
    bad, what = ("salt", salt) if not isinstance(salt, str) else ("unit", unit)
    if not isinstance(what, str):
        raise TypeError(f"{bad}: expected str, got {type(what).__name__}") from None


def bucket_many(salt: str, units: Units) -> npt.NDArray[np.int32]:
    """`bucket(salt, u)` for every unit, as a 1-D int32 array."""
    prefix = _prefix(salt)
    seq = _unit_list(units)
    h = _xxh64_intdigest
    try:
        return np.array([h((prefix + u).encode()) % BUCKETS for u in seq], np.int32)
    except TypeError:
        for i, u in enumerate(seq):
            if not isinstance(u, str):
                raise TypeError(f"units[{i}]: expected str, got {type(u).__name__}") from None
        raise


def _prefix(salt: str) -> str:
    if not isinstance(salt, str):
        raise TypeError(f"salt: expected str, got {type(salt).__name__}")
    return salt + ":"


def _unit_list(units: Units) -> Sequence[str]:
    """Checks the container of a batch; elements are checked by the `+` that uses them."""
    if isinstance(units, np.ndarray):
        if units.ndim != 1:
            raise ValueError(f"units: expected a 1-D array, got {units.ndim}-D")
        if units.dtype.kind not in "UO":
            raise TypeError(f"units: expected str elements, got an array of dtype {units.dtype}")
        result: list[str] = units.tolist()
        return result
    if isinstance(units, str | bytes | bytearray):
        raise TypeError(f"units: expected a sequence of str, got {type(units).__name__}")
    if isinstance(units, list | tuple):
        return units
    try:
        return list(units)
    except TypeError:
        raise TypeError(f"units: expected a sequence of str, got {type(units).__name__}") from None


def _check_weights(weights: Iterable[float]) -> tuple[float, ...]:
    """Validates weights and returns them as floats; every message names the faulty entry."""
    if isinstance(weights, str | bytes | bytearray) or not isinstance(weights, Iterable):
        raise TypeError(f"weights: expected a sequence of numbers, got {type(weights).__name__}")
    result = []
    for i, w in enumerate(weights):
        result.append(_check_number(f"weights[{i}]", w))
    if not result:
        raise ValueError("weights: must not be empty")
    return tuple(result)


def _check_number(where: str, value: object) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool | np.bool_):
        raise ValueError(f"{where}: must be a number, got {value!r}")
    try:
        x = float(value)
    except OverflowError:
        raise ValueError(f"{where}: must be finite, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{where}: must be finite, got {value!r}")
    if x < 0:
        raise ValueError(f"{where}: must be >= 0, got {value!r}")
    return x


def _boundaries(weights: tuple[float, ...]) -> tuple[int, ...]:
    """C_i = floor(10000 * S_i / W + 0.5), S_i summed left to right in double precision."""
    sums = []
    s = 0.0
    for w in weights:
        s += w
        sums.append(s)
    if s == 0.0:
        raise ValueError("weights: must not all be zero")
    if not math.isfinite(s):
        raise ValueError("weights: their sum overflows a double")
    # S_n / W == 1.0 exactly, so C_n == BUCKETS and every bucket has a variant.
    return tuple(math.floor(BUCKETS * si / s + 0.5) for si in sums)


def _check_bucket(value: int) -> int:
    b = operator.index(value)
    if not 0 <= b < BUCKETS:
        raise ValueError(f"bucket: must be in [0, {BUCKETS}), got {b!r}")
    return b


class VariantTable:
    """Variants in order take contiguous bucket ranges [C_(i-1), C_i) sized by their weights."""

    __slots__ = ("_weights", "_bounds", "_bounds_array")

    def __init__(self, weights: Iterable[float]) -> None:
        self._weights = _check_weights(weights)
        self._bounds = _boundaries(self._weights)
        self._bounds_array = np.array(self._bounds, dtype=np.int32)

    @property
    def weights(self) -> tuple[float, ...]:
        return self._weights

    @property
    def boundaries(self) -> tuple[int, ...]:
        """C_1..C_n; C_n is always 10000."""
        return self._bounds

    def __len__(self) -> int:
        return len(self._bounds)

    def __repr__(self) -> str:
        return f"VariantTable({list(self._weights)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VariantTable):
            return NotImplemented
        return self._weights == other._weights

    def __hash__(self) -> int:
        return hash(self._weights)

    def __reduce__(self) -> tuple[type[VariantTable], tuple[list[float]]]:
        return (VariantTable, (list(self._weights),))

    def choose(self, bucket: int) -> int:
        """The variant index i with C_(i-1) <= bucket < C_i (zero-weight variants never)."""
        return bisect_right(self._bounds, _check_bucket(bucket))

    def assign(self, salt: str, unit: str) -> int:
        """The variant index of `unit` under `salt`: choose(bucket(salt, unit))."""
        try:
            b = int(_xxh64_intdigest((salt + ":" + unit).encode())) % BUCKETS
        except TypeError:
            _raise_not_str(salt, unit)
            raise
        return bisect_right(self._bounds, b)

    def assign_many(self, salt: str, units: Units) -> npt.NDArray[np.int32]:
        """`assign(salt, u)` for every unit, as a 1-D int32 array."""
        buckets = bucket_many(salt, units)
        return np.searchsorted(self._bounds_array, buckets, side="right").astype(np.int32)


def _check_allocations(
    layer: str, allocations: Iterable[tuple[str, float]]
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    if isinstance(allocations, str | bytes | bytearray) or not isinstance(allocations, Iterable):
        raise TypeError(
            f"allocations: expected a sequence of (name, share), got {type(allocations).__name__}"
        )
    names: list[str] = []
    shares: list[float] = []
    for i, item in enumerate(allocations):
        where = f"allocations[{i}]"
        if not isinstance(item, Sequence) or isinstance(item, str | bytes) or len(item) != 2:
            raise ValueError(f"{where}: expected a (name, share) pair, got {item!r}")
        name, share = item
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}: name must be a non-empty str, got {name!r}")
        if name in names:
            raise ValueError(f"{where}: duplicate experiment name {name!r}")
        if name == layer:
            # Its salt (the name, by default) would equal the layer's: its variants would
            # split the layer's slice instead of the experiment's units.
            raise ValueError(f"{where}: an experiment cannot be named like its layer")
        x = _check_number(f"{where}.share", share)
        if x > 1.0:
            raise ValueError(f"{where}.share: must be <= 1, got {share!r}")
        names.append(name)
        shares.append(x)
    if not names:
        raise ValueError("allocations: must not be empty")
    return tuple(names), tuple(shares)


def _layer_boundaries(shares: tuple[float, ...]) -> tuple[int, ...]:
    """E_j = min(10000, floor(10000 * T_j + 0.5)), T_j summed left to right in double."""
    bounds = []
    t = 0.0
    for x in shares:
        t += x
        bounds.append(min(BUCKETS, math.floor(BUCKETS * t + 0.5)))
    if t > 1.0 + _SHARE_SLACK:
        raise ValueError(f"allocations: shares sum to {t!r}, must be <= 1")
    return tuple(bounds)


def _check_layer_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name: expected str, got {type(name).__name__}")
    if not name:
        raise ValueError("name: must not be empty")
    return name


class Layer:
    """Experiments sharing one bucket space, salted by the layer name, so no unit is in two.

    Experiment j owns the buckets [E_(j-1), E_j) of bucket(layer name, unit), E_0 = 0; the
    buckets from E_m up belong to no experiment.
    """

    __slots__ = ("_name", "_names", "_shares", "_bounds", "_bounds_array")

    def __init__(self, name: str, allocations: Iterable[tuple[str, float]]) -> None:
        self._name = _check_layer_name(name)
        self._names, self._shares = _check_allocations(self._name, allocations)
        self._bounds = _layer_boundaries(self._shares)
        self._bounds_array = np.array(self._bounds, dtype=np.int32)

    @property
    def name(self) -> str:
        return self._name

    @property
    def experiments(self) -> tuple[str, ...]:
        return self._names

    @property
    def shares(self) -> tuple[float, ...]:
        return self._shares

    @property
    def boundaries(self) -> tuple[int, ...]:
        """E_1..E_m; buckets >= E_m are in no experiment."""
        return self._bounds

    def __len__(self) -> int:
        return len(self._names)

    def __repr__(self) -> str:
        pairs = list(zip(self._names, self._shares, strict=True))
        return f"Layer({self._name!r}, {pairs!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Layer):
            return NotImplemented
        return (self._name, self._names, self._shares) == (
            other._name,
            other._names,
            other._shares,
        )

    def __hash__(self) -> int:
        return hash((self._name, self._names, self._shares))

    def __reduce__(self) -> tuple[type[Layer], tuple[str, list[tuple[str, float]]]]:
        return (Layer, (self._name, list(zip(self._names, self._shares, strict=True))))

    def index_for(self, unit: str) -> int:
        """The index of the unit's experiment in this layer, or -1 for none."""
        b = bucket(self._name, unit)
        i = bisect_right(self._bounds, b)
        return i if i < len(self._bounds) else -1

    def experiment_for(self, unit: str) -> str | None:
        """The name of the unit's experiment in this layer, or None."""
        i = self.index_for(unit)
        return self._names[i] if i >= 0 else None

    def experiment_for_many(self, units: Units) -> npt.NDArray[np.int32]:
        """`index_for(u)` for every unit, as a 1-D int32 array (-1: no experiment)."""
        idx = np.searchsorted(self._bounds_array, bucket_many(self._name, units), side="right")
        return np.where(idx < len(self._bounds), idx, -1).astype(np.int32)
