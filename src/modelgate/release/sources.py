"""Where a fleet canary's numbers come from: a Prometheus server scraping every gateway
(`source: prometheus`), which reads back the `modelgate_canary_*` series that
`CanaryCollector` adds to each gateway's /metrics (built from the control plane's totals,
`local_totals`). A `source: local` canary reads the records instead (release.records).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from modelgate.outcomes import LATENCY_BUCKETS_S
from modelgate.release.canary import STATES, CanaryError
from modelgate.release.judge import Arm, ExperimentView, Snapshot, Sums, Totals
from modelgate.telemetry.counts import CountSlice

if TYPE_CHECKING:
    pass

__all__ = [
    "CanaryCollector",
    "PrometheusSource",
    "local_totals",
]

PROMETHEUS_TIMEOUT_S = 5.0
_LE = [f"{b:g}" for b in LATENCY_BUCKETS_S] + ["+Inf"]
# Totals per variant: name suffix -> Arm attribute (the counters) or feedback sums.
_COUNTERS = {"routed": "routed", "requests": "requests", "errors": "errors"}
_FEEDBACK = {"values": "count", "sum": "total", "squares": "squares", "ones": "ones"}


def local_totals(
    view: ExperimentView, outcomes: Mapping[str, Any], counts: Mapping[str, CountSlice]
) -> Totals:
    """Cumulative totals of one experiment from the control plane's merged outcomes
    (enrolled requests, errors, latency, feedback) and request counts (every response)."""
    arms: Totals = {v: Arm() for v in view.variants}
    for counted in counts.values():  # every config version's slice: summed, cumulative
        for (route, variant, _), n in counted.responses.items():
            if route == view.route and variant in arms:
                arms[variant].routed += n
    for row in outcomes["system"]:
        arm = arms.get(row["variant"]) if row["experiment"] == view.name else None
        if arm is not None:
            arm.requests, arm.errors = row["requests"], row["errors"]
            arm.buckets = [float(n) for n in row["buckets"]]
            arm.latency_sum = row["latency"]["mean"] * row["latency"]["count"]
    for row in outcomes["outcomes"]:
        arm = arms.get(row["variant"]) if row["experiment"] == view.name else None
        if arm is not None:
            arm.feedback[row["metric"]] = Sums.from_moments(
                row["count"], row["mean"], row["m2"], row["ones"]
            )
    return arms


# --- the exposition that a Prometheus source reads back ---------------------------------------


class CanaryCollector(Collector):
    """The canaries' gauges (`modelgate_canary_weight`, `modelgate_canary_state`) and, per
    experiment with a canary, its cumulative totals by variant. These are per process since
    start and carry the config version serving at the scrape (sum them without it)."""

    def __init__(self, version: int, canaries: list[tuple[ExperimentView, str, Totals]]) -> None:
        self.version = str(version)
        self.canaries = canaries  # (view, state, totals)

    def collect(self) -> Iterator[Metric]:
        v = self.version
        labels = ["config_version", "experiment"]
        weight = GaugeMetricFamily(
            "modelgate_canary_weight",
            "The canary candidate's weight in force (0-100)",
            labels=labels,
        )
        state = GaugeMetricFamily(
            "modelgate_canary_state",
            "1 for the canary's state (running, paused, promoted, rolled_back, inconclusive, "
            "external: run by `modelgate canary`), 0 for the others",
            labels=[*labels, "state"],
        )
        by_variant = [*labels, "variant"]
        counters = {
            key: CounterMetricFamily(f"modelgate_canary_{key}", help_text, labels=by_variant)
            for key, help_text in (
                ("routed", "Responses of the canary's route by variant, every unit (SRM counts)"),
                ("requests", "Enrolled requests measured by variant"),
                ("errors", "Enrolled requests answered 5xx or failed, by variant"),
            )
        }
        latency = HistogramMetricFamily(
            "modelgate_canary_latency_seconds",
            "Latency of enrolled requests by variant",
            labels=by_variant,
        )
        feedback = {
            key: GaugeMetricFamily(
                f"modelgate_canary_feedback_{key}",
                f"Feedback values by variant: {what}",
                labels=[*by_variant, "metric"],
            )
            for key, what in (
                ("values", "how many"),
                ("sum", "their sum"),
                ("squares", "the sum of their squares"),
                ("ones", "how many were exactly 1"),
            )
        }
        for view, current, totals in self.canaries:
            weight.add_metric(
                [v, view.name], view.weights[view.canary.candidate] if view.canary else math.nan
            )
            for name in (*STATES, "external"):
                state.add_metric([v, view.name, name], 1.0 if name == current else 0.0)
            for variant, arm in sorted(totals.items()):
                key = [v, view.name, variant]
                for suffix, attr in _COUNTERS.items():
                    counters[suffix].add_metric(key, getattr(arm, attr))
                running, cumulative = 0.0, []
                for le, n in zip(_LE, arm.buckets, strict=True):
                    running += n
                    cumulative.append((le, running))
                latency.add_metric(key, cumulative, arm.latency_sum)
                for metric, sums in sorted(arm.feedback.items()):
                    for suffix, attr in _FEEDBACK.items():
                        feedback[suffix].add_metric([*key, metric], getattr(sums, attr))
        yield weight
        yield state
        yield from counters.values()
        yield latency
        yield from feedback.values()


class PrometheusSource:
    """The fleet's numbers: the gateways' `modelgate_canary_*` series summed over instances
    by PromQL. `as_of` is the oldest gateway's last scrape, so a window opens only once
    every gateway was scraped after the weights changed."""

    def __init__(self, url: str, session: aiohttp.ClientSession, gateways: int) -> None:
        self.url = url.rstrip("/")
        self.session = session
        self.gateways = gateways  # instances that must be scraped before numbers count

    async def _query(self, promql: str) -> list[dict[str, Any]]:
        endpoint = f"{self.url}/api/v1/query"
        try:
            async with self.session.get(
                endpoint,
                params={"query": promql},
                timeout=aiohttp.ClientTimeout(total=PROMETHEUS_TIMEOUT_S),
            ) as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise CanaryError(f"prometheus {endpoint}: {exc!r}") from exc
        if not isinstance(body, dict) or body.get("status") != "success":
            error = body.get("error") if isinstance(body, dict) else body
            raise CanaryError(f"prometheus {endpoint}: query {promql!r} failed: {error}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def snapshot(self, view: ExperimentView) -> Snapshot:
        selector = f'experiment="{view.name}"'  # names are [A-Za-z0-9_.-]: nothing to escape
        scraped = await self._query(f"timestamp(modelgate_canary_weight{{{selector}}})")
        instances = frozenset(row["metric"].get("instance", "") for row in scraped)
        if len(instances) < self.gateways:
            # A gateway not scraped yet would add all it ever counted to the next window.
            raise CanaryError(
                f"prometheus {self.url}: {len(instances)} of {self.gateways} gateways expose "
                f"modelgate_canary_weight{{{selector}}} (is it scraping every gateway, and do "
                "they run this canary's config?)"
            )
        families = "|".join(
            [f"modelgate_canary_{k}_total" for k in _COUNTERS]
            + ["modelgate_canary_latency_seconds_bucket", "modelgate_canary_latency_seconds_sum"]
            + [f"modelgate_canary_feedback_{k}" for k in _FEEDBACK]
        )
        rows = await self._query(
            f'sum by (__name__, variant, le, metric) ({{__name__=~"{families}", {selector}}})'
        )
        arms: Totals = {v: Arm() for v in view.variants}
        cumulative: dict[str, list[float]] = {v: [0.0] * len(_LE) for v in view.variants}
        for row in rows:
            labels, value = row["metric"], float(row["value"][1])
            arm = arms.get(labels.get("variant", ""))
            if arm is None:
                continue
            name = labels["__name__"].removeprefix("modelgate_canary_")
            if name == "latency_seconds_bucket":
                cumulative[labels["variant"]][_bucket_index(labels["le"])] = value
            elif name == "latency_seconds_sum":
                arm.latency_sum = value
            elif name.startswith("feedback_"):
                sums = arm.feedback.setdefault(labels["metric"], Sums())
                setattr(sums, _FEEDBACK[name.removeprefix("feedback_")], value)
            else:
                setattr(arm, _COUNTERS[name.removesuffix("_total")], value)
        for variant, counts in cumulative.items():
            arms[variant].buckets = [b - a for a, b in zip([0.0, *counts], counts, strict=False)]
        as_of = min(float(row["value"][1]) for row in scraped)
        return Snapshot(arms, as_of, instances)


def _bucket_index(le: str) -> int:
    if le == "+Inf":
        return len(_LE) - 1
    bound = float(le)
    for index, b in enumerate(LATENCY_BUCKETS_S):
        if math.isclose(bound, b):
            return index
    raise CanaryError(f"unexpected latency bucket le={le!r} (expected one of {_LE})")
