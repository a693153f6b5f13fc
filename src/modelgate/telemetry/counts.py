"""What the gateway counts on the request path: plain integer counters, cheap to bump, kept
apart by the config version serving when they were counted. Also the log filter that stamps
every log line with that version. The request path never formats metrics.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "LATENCY_BUCKETS_S",
    "OLDER_VERSIONS",
    "SCALAR_COUNTERS",
    "TRACKED_FAMILIES",
    "CountSlice",
    "Counters",
    "VersionLogFilter",
    "VersionedTally",
    "merge_exports",
]

# Histogram buckets fit for model servers, 1 ms to 30 s (upper bounds, seconds; +Inf last).
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# Counts that other parts of the gateway keep cumulatively (chaos rules, shadows, feedback,
# record logs), read through `Counters.track` sources, by family -> the labels of their keys.
TRACKED_FAMILIES: dict[str, tuple[str, ...]] = {
    "chaos_faults": ("route", "rule", "kind"),
    "chaos_skipped": ("route", "rule", "reason"),
    "shadow_requests": ("route", "shadow", "outcome"),
    "shadow_verdicts": ("route", "shadow", "verdict"),
    "feedback": ("result",),
    "log_records": ("log", "result"),
    "log_write_errors": ("log",),
}
Source = Callable[[], Mapping[Any, int]]  # keys: tuples of label values, as in TRACKED_FAMILIES

# Counters bumped as plain attributes by the request path (`counters.replays += 1`).
SCALAR_COUNTERS = (
    "unit_fallbacks",
    "replays",
    "bad_requests",
    "client_aborts",
    "client_timeouts",
    "rejected_connections",
)
# Versions kept apart; counts of older ones are folded into one "older" slice so the number
# of metric series stays bounded however often the config is reloaded.
MAX_VERSIONS = 16
OLDER_VERSIONS = "older"


@dataclass
class CountSlice:
    """What was counted while one config version was serving."""

    responses: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    upstream_errors: Counter[str] = field(default_factory=Counter)
    scalars: Counter[str] = field(default_factory=Counter)
    # (route, variant, bucket index) -> observations; the last index is +Inf.
    latency: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    latency_sum: dict[tuple[str, str], float] = field(default_factory=dict)
    families: dict[str, Counter[tuple[str, ...]]] = field(default_factory=dict)

    def add(self, other: CountSlice) -> None:
        self.responses.update(other.responses)
        self.upstream_errors.update(other.upstream_errors)
        self.scalars.update(other.scalars)
        self.latency.update(other.latency)
        for key, seconds in other.latency_sum.items():
            self.latency_sum[key] = self.latency_sum.get(key, 0.0) + seconds
        for name, counts in other.families.items():
            self.families.setdefault(name, Counter()).update(counts)

    def minus(self, base: CountSlice) -> CountSlice:
        """What was counted since `base` (cumulative counts taken earlier). Counter
        subtraction drops keys that did not grow: a slice holds only what happened."""
        return CountSlice(
            responses=self.responses - base.responses,
            upstream_errors=self.upstream_errors - base.upstream_errors,
            scalars=self.scalars - base.scalars,
            latency=self.latency - base.latency,
            latency_sum={
                key: seconds - base.latency_sum.get(key, 0.0)
                for key, seconds in self.latency_sum.items()
                if seconds != base.latency_sum.get(key, 0.0)
            },
            families={
                name: counts - base.families.get(name, Counter())
                for name, counts in self.families.items()
            },
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "responses": [[r, v, s, n] for (r, v, s), n in sorted(self.responses.items())],
            "upstream_errors": dict(self.upstream_errors),
            "scalars": dict(self.scalars),
            "latency": [[r, v, i, n] for (r, v, i), n in sorted(self.latency.items())],
            "latency_sum": [[r, v, x] for (r, v), x in sorted(self.latency_sum.items())],
            "families": {
                name: [[*key, n] for key, n in sorted(counts.items())]
                for name, counts in self.families.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CountSlice:
        return cls(
            responses=Counter(
                {(str(r), str(v), int(s)): int(n) for r, v, s, n in data["responses"]}
            ),
            upstream_errors=Counter({str(k): int(n) for k, n in data["upstream_errors"].items()}),
            scalars=Counter({str(k): int(n) for k, n in data["scalars"].items()}),
            latency=Counter(
                {(str(r), str(v), int(i)): int(n) for r, v, i, n in data.get("latency", [])}
            ),
            latency_sum={(str(r), str(v)): float(x) for r, v, x in data.get("latency_sum", [])},
            families={
                name: Counter({tuple(str(k) for k in row[:-1]): int(row[-1]) for row in rows})
                for name, rows in data.get("families", {}).items()
            },
        )


def _fold_old(slices: dict[str, CountSlice]) -> None:
    numbered = sorted((int(label), label) for label in slices if label != OLDER_VERSIONS)
    for _, label in numbered[: max(0, len(numbered) - MAX_VERSIONS)]:
        slices.setdefault(OLDER_VERSIONS, CountSlice()).add(slices.pop(label))


class Counters:
    """Per-process counters. Response counts are keyed by (route, variant, status).

    The request path bumps cumulative counters; a Plan swap calls `begin_version`, which
    notes where the counts stood, so `export()` can say what each version saw. Counts kept
    elsewhere (chaos, shadows, feedback) are read through `track`ed sources the same way."""

    __slots__ = (
        "responses",
        "upstream_errors",
        *SCALAR_COUNTERS,
        "latency",
        "latency_sum",
        "version",
        "_base",
        "_archive",
        "_sources",
    )

    def __init__(self, version: int = 1) -> None:
        self.responses: Counter[tuple[str, str, int]] = Counter()
        self.upstream_errors: Counter[str] = Counter()
        self.unit_fallbacks = 0
        self.replays = 0
        self.bad_requests = 0
        self.client_aborts = 0
        self.client_timeouts = 0
        self.rejected_connections = 0
        self.latency: Counter[tuple[str, str, int]] = Counter()
        self.latency_sum: dict[tuple[str, str], float] = {}
        self.version = version
        self._base = CountSlice()  # the cumulative counts when `version` began
        self._archive: dict[str, CountSlice] = {}
        self._sources: dict[str, Source] = {}

    def count_response(self, route: str, variant: str, status: int) -> None:
        self.responses[(route, variant, status)] += 1

    def observe_latency(self, route: str, variant: str, seconds: float) -> None:
        """One response's time from the request's start to the response's end."""
        self.latency[(route, variant, bisect_left(LATENCY_BUCKETS_S, seconds))] += 1
        key = (route, variant)
        self.latency_sum[key] = self.latency_sum.get(key, 0.0) + seconds

    def count_upstream_error(self, kind: str) -> None:
        self.upstream_errors[kind] += 1

    def track(self, family: str, source: Source) -> None:
        """Reads the cumulative counts of `family` (one of TRACKED_FAMILIES) from `source`
        whenever counts are exported or a version begins."""
        if family not in TRACKED_FAMILIES:
            raise ValueError(f"unknown counter family {family!r}")
        self._sources[family] = source

    def _cumulative(self) -> CountSlice:
        return CountSlice(
            responses=self.responses.copy(),
            upstream_errors=self.upstream_errors.copy(),
            scalars=Counter({name: getattr(self, name) for name in SCALAR_COUNTERS}),
            latency=self.latency.copy(),
            latency_sum=dict(self.latency_sum),
            families={name: Counter(source()) for name, source in self._sources.items()},
        )

    def begin_version(self, version: int) -> None:
        """A new Plan is serving: what was counted so far belongs to the previous version."""
        if version == self.version:
            return
        now = self._cumulative()
        label = str(self.version)
        self._archive.setdefault(label, CountSlice()).add(now.minus(self._base))
        _fold_old(self._archive)
        self._base = now
        self.version = version

    def export(self) -> dict[str, CountSlice]:
        """Counts by config version label (a version number, or "older")."""
        out = {label: CountSlice() for label in self._archive}
        for label, counted in self._archive.items():
            out[label].add(counted)
        out.setdefault(str(self.version), CountSlice()).add(self._cumulative().minus(self._base))
        return out

    def snapshot(self) -> dict[str, object]:
        return {
            "version": self.version,
            "responses": [
                {"route": r, "variant": v, "status": s, "count": n}
                for (r, v, s), n in sorted(self.responses.items())
            ],
            "upstream_errors": dict(self.upstream_errors),
            **{name: getattr(self, name) for name in SCALAR_COUNTERS},
        }


def merge_exports(exports: list[dict[str, CountSlice]]) -> dict[str, CountSlice]:
    """Sums the exports of several processes (workers share the parent's version numbers)."""
    total: dict[str, CountSlice] = {}
    for export in exports:
        for label, counted in export.items():
            total.setdefault(label, CountSlice()).add(counted)
    _fold_old(total)
    return total


class VersionedTally:
    """Named event counts (e.g. reload results) kept apart by the version serving at the time."""

    def __init__(self, version: int = 1) -> None:
        self.version = version
        self._slices: dict[str, CountSlice] = {}

    def begin_version(self, version: int) -> None:
        self.version = version

    def count(self, name: str) -> None:
        self._slices.setdefault(str(self.version), CountSlice()).scalars[name] += 1
        _fold_old(self._slices)

    def export(self) -> dict[str, Counter[str]]:
        return {label: counted.scalars.copy() for label, counted in self._slices.items()}

    def totals(self) -> Counter[str]:
        """Counts by name over every version."""
        out: Counter[str] = Counter()
        for counted in self._slices.values():
            out.update(counted.scalars)
        return out


class VersionLogFilter(logging.Filter):
    """Stamps each record with `config_version`, the version this process serves."""

    version: int | str = "-"

    def filter(self, record: logging.LogRecord) -> bool:
        record.config_version = VersionLogFilter.version
        return True

    @staticmethod
    def set_version(version: int) -> None:
        VersionLogFilter.version = version
