"""A log-linear latency histogram (HdrHistogram's bucket layout) on numpy: bounded relative
error, constant memory, mergeable across processes (it pickles)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["RELATIVE_ERROR", "LatencyHistogram"]

# Values are integer nanoseconds. Below 2**_SUB_BITS every value has its own bucket; above,
# each power of two [2**k, 2**(k+1)) is cut into 2**(_SUB_BITS - 1) equal buckets, so a
# bucket is at most 1/64 of its lower bound wide and its midpoint is within 1/128 of any
# value in it: the 1% bound holds with room for the seconds -> ns rounding.
_SUB_BITS = 7
_LINEAR = 1 << _SUB_BITS  # 128 exact buckets: 0..127 ns
_HALF = _LINEAR >> 1  # 64 buckets per power of two above
_TOP_NS = 1 << 37  # ~137 s; larger values are clamped into the last bucket
_BUCKETS = _LINEAR + (37 - _SUB_BITS) * _HALF
_FLUSH_AT = 4096

RELATIVE_ERROR = 1.0 / (2 * _HALF)


def _indices(values: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The bucket of each value (already clipped to [0, _TOP_NS))."""
    # frexp's exponent is the bit length, exact for integers below 2**53.
    _, bits = np.frexp(values.astype(np.float64))
    shift = np.maximum(bits.astype(np.int64) - _SUB_BITS, 0)
    linear = shift == 0
    sub = values >> shift
    index = _LINEAR + (shift - 1) * _HALF + (sub - _HALF)
    return np.where(linear, values, index)


def _bucket_bounds(index: int) -> tuple[int, int]:
    """Lower bound and width (ns) of a bucket."""
    if index < _LINEAR:
        return index, 1
    shift = (index - _LINEAR) // _HALF + 1
    return ((index - _LINEAR) % _HALF + _HALF) << shift, 1 << shift


class LatencyHistogram:
    """Latencies in seconds, kept as counts per log-linear bucket of nanoseconds.

    `record` only appends to a Python list (the request path's cost); the list is folded
    into the counts in batches with numpy. Quantiles are the midpoint of the bucket holding
    the order statistic of rank ceil(q * n), clamped to the exact min and max, so each is
    within RELATIVE_ERROR (0.78%) of a true sample value.
    """

    __slots__ = ("_counts", "_pending", "_min_ns", "_max_ns", "_sum_ns", "_clamped")

    def __init__(self) -> None:
        self._counts: npt.NDArray[np.int64] = np.zeros(_BUCKETS, dtype=np.int64)
        self._pending: list[int] = []
        self._min_ns = -1
        self._max_ns = 0
        self._sum_ns = 0
        self._clamped = 0

    def record(self, seconds: float) -> None:
        pending = self._pending
        pending.append(int(seconds * 1e9))
        if len(pending) >= _FLUSH_AT:
            self._flush()

    def record_many(self, seconds: Sequence[float] | npt.NDArray[np.float64]) -> None:
        self._fold(np.asarray(np.asarray(seconds, dtype=np.float64) * 1e9).astype(np.int64))

    def _flush(self) -> None:
        if self._pending:
            values = np.array(self._pending, dtype=np.int64)
            self._pending.clear()
            self._fold(values)

    def _fold(self, values: npt.NDArray[np.int64]) -> None:
        if values.size == 0:
            return
        values = np.maximum(values, 0)
        high = int(values.max())
        low = int(values.min())
        self._max_ns = max(self._max_ns, high)
        self._min_ns = low if self._min_ns < 0 else min(self._min_ns, low)
        self._sum_ns += int(values.sum())
        over = values >= _TOP_NS
        if over.any():
            self._clamped += int(over.sum())
            values = np.minimum(values, _TOP_NS - 1)
        self._counts += np.bincount(_indices(values), minlength=_BUCKETS)

    def merge(self, other: LatencyHistogram) -> None:
        """Adds `other`'s samples to this histogram (other is left as it was)."""
        other._flush()
        self._flush()
        if other.count == 0:
            return
        self._counts += other._counts
        self._max_ns = max(self._max_ns, other._max_ns)
        self._min_ns = other._min_ns if self._min_ns < 0 else min(self._min_ns, other._min_ns)
        self._sum_ns += other._sum_ns
        self._clamped += other._clamped

    @classmethod
    def merged(cls, parts: Iterable[LatencyHistogram]) -> LatencyHistogram:
        total = cls()
        for part in parts:
            total.merge(part)
        return total

    def __getstate__(self) -> tuple[npt.NDArray[np.int64], int, int, int, int]:
        self._flush()
        return (self._counts, self._min_ns, self._max_ns, self._sum_ns, self._clamped)

    def __setstate__(self, state: tuple[npt.NDArray[np.int64], int, int, int, int]) -> None:
        self._counts, self._min_ns, self._max_ns, self._sum_ns, self._clamped = state
        self._pending = []

    @property
    def count(self) -> int:
        self._flush()
        return int(self._counts.sum())

    @property
    def clamped(self) -> int:
        """Samples above ~137 s, counted in the top bucket (max stays exact)."""
        self._flush()
        return self._clamped

    @property
    def max(self) -> float:
        self._flush()
        return self._max_ns / 1e9

    @property
    def min(self) -> float:
        self._flush()
        return max(self._min_ns, 0) / 1e9

    @property
    def mean(self) -> float:
        count = self.count
        return self._sum_ns / count / 1e9 if count else math.nan

    def quantile(self, q: float) -> float:
        return self.quantiles([q])[0]

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """Seconds at each quantile q in [0, 1]; NaN for an empty histogram."""
        self._flush()
        cumulative = np.cumsum(self._counts)
        total = int(cumulative[-1])
        if total == 0:
            return [math.nan for _ in qs]
        out = []
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantile must be in [0, 1], got {q!r}")
            rank = min(max(math.ceil(q * total), 1), total)
            if rank == 1 or rank == total:  # the extremes are kept exactly
                out.append((self._min_ns if rank == 1 else self._max_ns) / 1e9)
                continue
            low, width = _bucket_bounds(int(np.searchsorted(cumulative, rank)))
            middle = low + (width - 1) / 2.0
            out.append(min(max(middle, self._min_ns), self._max_ns) / 1e9)
        return out
