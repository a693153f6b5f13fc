"""The Prometheus exposition: a prometheus_client Collector over a snapshot of the gateway's
counters (summed over workers) and the control plane's state. Every sample carries
`config_version`, the version serving when the event was counted (or serving now, for gauges).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from modelgate.telemetry.counts import (
    LATENCY_BUCKETS_S,
    SCALAR_COUNTERS,
    TRACKED_FAMILIES,
    CountSlice,
)

__all__ = ["MetricsSnapshot", "render_metrics"]

_SCALAR_HELP = {
    "unit_fallbacks": "Requests with no unit id that got a random one",
    "replays": "Requests replayed once on a fresh upstream connection",
    "bad_requests": "Requests refused as malformed (400)",
    "client_aborts": "Requests whose client went away before the response",
    "client_timeouts": "Client connections closed for a header, body or keep-alive timeout",
    "rejected_connections": "Connections refused at max_connections",
}
# Metric names of the scalar counters (without the _total the exposition appends).
_SCALAR_NAME = {
    "unit_fallbacks": "modelgate_unit_fallbacks",
    "replays": "modelgate_upstream_replays",
    "bad_requests": "modelgate_bad_requests",
    "client_aborts": "modelgate_client_aborts",
    "client_timeouts": "modelgate_client_timeouts",
    "rejected_connections": "modelgate_rejected_connections",
}

# Families read from chaos, shadows, feedback and the record logs: metric name, help.
_FAMILY = {
    "chaos_faults": ("modelgate_chaos_faults", "Faults injected by chaos rules, by kind"),
    "chaos_skipped": (
        "modelgate_chaos_skipped",
        "Requests a chaos rule would have faulted but left untouched (max_active reached)",
    ),
    "shadow_requests": (
        "modelgate_shadow_requests",
        "Shadow copies by outcome (sent, answered, timeout, dropped_*, ...)",
    ),
    "shadow_verdicts": (
        "modelgate_shadow_verdicts",
        "Shadow answers compared with the primary's, by verdict",
    ),
    "feedback": (
        "modelgate_feedback",
        "Feedback by result: accepted (items), counted (values added to a variant's "
        "statistics), bad, unauthorized, unknown_request_id, ambiguous_request_id and duplicate "
        "(posts refused; duplicate: a second value for a request id and metric), "
        "request_id_collisions (an id reused by another unit or variant)",
    ),
    "log_records": (
        "modelgate_log_records",
        "Exposure, feedback and diff-log records written, or dropped with the reason "
        "(dropped_write_error: lost to a full disk or an I/O error)",
    ),
    "log_write_errors": (
        "modelgate_log_write_errors",
        "Failed writes to the log files (full disk, I/O error, unusable log_dir), by log",
    ),
}


@dataclass(frozen=True)
class MetricsSnapshot:
    """Everything one scrape shows, gathered before rendering (workers answer asynchronously;
    a Collector's collect() cannot await)."""

    version: int
    digest: str
    counts: dict[str, CountSlice]
    reloads: dict[str, dict[str, int]]  # version label -> result -> count
    last_reload_ok: bool
    last_success_time: float | None
    started_at: float
    workers: list[dict[str, Any]]
    telemetry: list[dict[str, Any]] = field(default_factory=list)  # each process's live state


class _SnapshotCollector(Collector):
    def __init__(self, snap: MetricsSnapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        snap = self.snap
        now_label = str(snap.version)
        requests = CounterMetricFamily(
            "modelgate_requests",
            "Responses sent, by route, variant and HTTP status code",
            labels=["config_version", "route", "variant", "code"],
        )
        errors = CounterMetricFamily(
            "modelgate_upstream_errors",
            "Upstream failures by kind (connect_failed, timeout, reset, ...)",
            labels=["config_version", "kind"],
        )
        scalars = {
            name: CounterMetricFamily(
                _SCALAR_NAME[name], _SCALAR_HELP[name], labels=["config_version"]
            )
            for name in SCALAR_COUNTERS
        }
        for label, counted in sorted(snap.counts.items()):
            for (route, variant, status), n in sorted(counted.responses.items()):
                requests.add_metric([label, route, variant, str(status)], n)
            for kind, n in sorted(counted.upstream_errors.items()):
                errors.add_metric([label, kind], n)
            for name in SCALAR_COUNTERS:
                scalars[name].add_metric([label], counted.scalars.get(name, 0))
        yield requests
        yield errors
        yield from scalars.values()
        yield _latency_histogram(snap.counts)
        yield from _tracked_families(snap.counts)

        reloads = CounterMetricFamily(
            "modelgate_config_reloads",
            "Reload attempts by result (ok, unchanged, invalid, unparseable, restart_required...)",
            labels=["config_version", "result"],
        )
        for label, results in sorted(snap.reloads.items()):
            for result, n in sorted(results.items()):
                reloads.add_metric([label, result], n)
        yield reloads

        info = GaugeMetricFamily(
            "modelgate_config_info",
            "The running config: its version and content digest (always 1)",
            labels=["config_version", "digest"],
        )
        info.add_metric([now_label, snap.digest], 1)
        yield info
        yield _gauge(
            "modelgate_config_version", "The running config version", now_label, snap.version
        )
        yield _gauge(
            "modelgate_config_last_reload_successful",
            "1 when the last reload attempt was applied (or none failed yet), else 0",
            now_label,
            1 if snap.last_reload_ok else 0,
        )
        if snap.last_success_time is not None:
            yield _gauge(
                "modelgate_config_last_reload_success_timestamp_seconds",
                "When the running config was applied (Unix time)",
                now_label,
                snap.last_success_time,
            )
        yield _gauge(
            "modelgate_start_time_seconds",
            "When the gateway started (Unix time)",
            now_label,
            snap.started_at,
        )
        alive = [w for w in snap.workers if w.get("alive", True)]
        yield _gauge("modelgate_workers", "Serving processes alive", now_label, len(alive))
        yield from _worker_families(snap.workers, now_label)
        yield _gauge(
            "modelgate_open_connections",
            "Open client connections, summed over workers",
            now_label,
            sum(int(w.get("connections", 0)) for w in alive),
        )
        yield _gauge(
            "modelgate_requests_in_flight",
            "Requests being handled (read, not yet answered), summed over workers",
            now_label,
            sum(int(t.get("requests_in_flight", 0)) for t in snap.telemetry),
        )
        yield _gauge(
            "modelgate_upstream_requests_in_flight",
            "Requests waiting on an upstream, summed over workers",
            now_label,
            sum(int(t.get("upstream_requests_in_flight", 0)) for t in snap.telemetry),
        )


def _latency_histogram(counts: dict[str, CountSlice]) -> HistogramMetricFamily:
    histogram = HistogramMetricFamily(
        "modelgate_request_duration_seconds",
        "Time from a request's start to its response's end, by route and variant",
        labels=["config_version", "route", "variant"],
    )
    bounds = [*(f"{b:g}" for b in LATENCY_BUCKETS_S), "+Inf"]
    for label, counted in sorted(counts.items()):
        series: dict[tuple[str, str], list[int]] = {}
        for (route, variant, index), n in counted.latency.items():
            series.setdefault((route, variant), [0] * len(bounds))[index] += n
        for (route, variant), buckets in sorted(series.items()):
            cumulative, running = [], 0
            for bound, n in zip(bounds, buckets, strict=True):
                running += n
                cumulative.append((bound, running))
            histogram.add_metric(
                [label, route, variant],
                buckets=cumulative,
                sum_value=counted.latency_sum.get((route, variant), 0.0),
            )
    return histogram


def _tracked_families(counts: dict[str, CountSlice]) -> Iterator[CounterMetricFamily]:
    for family, labels in TRACKED_FAMILIES.items():
        name, documentation = _FAMILY[family]
        metric = CounterMetricFamily(name, documentation, labels=["config_version", *labels])
        for label, counted in sorted(counts.items()):
            for key, n in sorted(counted.families.get(family, {}).items()):
                metric.add_metric([label, *key], n)
        yield metric


def _worker_families(workers: list[dict[str, Any]], now_label: str) -> Iterator[Metric]:
    """Per serving process: the config version it serves (its generation), and the reload
    rounds it missed, so workers left on different configs show on a dashboard."""
    labels = ["config_version", "worker", "pid"]
    generation = GaugeMetricFamily(
        "modelgate_worker_config_generation",
        "The config version each serving process serves (the running one when current)",
        labels=labels,
    )
    events = CounterMetricFamily(
        "modelgate_worker_reload_events",
        "Per worker: commits not acknowledged in time, catch-ups done and failed",
        labels=[*labels, "event"],
    )
    for index, worker in enumerate(workers):
        key = [now_label, str(worker.get("worker", index)), str(worker.get("pid", ""))]
        generation.add_metric(key, int(worker.get("version", 0)))
        for event, n in sorted(worker.get("reload_events", {}).items()):
            events.add_metric([*key, event], n)
    yield generation
    yield events


def _gauge(name: str, documentation: str, label: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=["config_version"])
    gauge.add_metric([label], value)
    return gauge


def render_metrics(
    snap: MetricsSnapshot, accept: str = "", extra: Sequence[Collector] = ()
) -> tuple[bytes, str]:
    """The exposition in the format the scraper asked for; returns (body, content type)."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in (_SnapshotCollector(snap), *extra):
        registry.register(collector)
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
