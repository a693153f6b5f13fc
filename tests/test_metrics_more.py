"""/metrics beyond the request counts: the latency histogram by route and variant, chaos
faults, shadow copies and verdicts, feedback and record-log counts, in-flight gauges; all by
config version, parsed with prometheus_client."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from modelgate.mock.server import MockSettings
from modelgate.telemetry.counts import LATENCY_BUCKETS_S, Counters, CountSlice, merge_exports

from .support import ab_config, admin_stack, async_test, wait_until
from .test_outcomes import variant_of

MOCKS = {
    "model-a": MockSettings(name="model-a"),
    "model-b": MockSettings(name="model-b"),
    "model-c": MockSettings(name="model-c"),
}


def chaos_shadow_config(log_dir: Path) -> dict[str, Any]:
    config = ab_config(log_dir=str(log_dir))
    config["upstreams"]["model-c"] = {"url": "http://127.0.0.1:1"}
    route = config["routes"][0]
    route["chaos"] = [{"name": "slow-candidate", "variant": "candidate", "delay_ms": 20}]
    route["shadows"] = [{"upstream": "model-c", "compare": {"ignore": ["/model"]}}]
    return config


def samples(text: str) -> dict[str, list[Sample]]:
    found: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(sample)
    return found


def test_histogram_chaos_shadow_and_feedback_counts(tmp_path: Path) -> None:
    @async_test
    async def run() -> None:
        async with admin_stack(chaos_shadow_config(tmp_path), MOCKS) as admin:
            units = [f"m{i}" for i in range(40)]
            async with aiohttp.ClientSession() as session:
                for unit in units:
                    async with session.post(
                        admin.stack.url + "/predict", json={"x": 1}, headers={"x-user-id": unit}
                    ) as response:
                        assert response.status == 200
                feedback = [
                    {"experiment": "ranker", "unit": u, "metric": "clicked", "value": 1}
                    for u in units[:5]
                ]
                async with session.post(
                    admin.stack.url + "/_modelgate/feedback", json=feedback
                ) as response:
                    assert response.status == 202

                async def text() -> str:
                    async with session.get(admin.admin_url + "/metrics") as response:
                        return await response.text()

                async def verdicts_in() -> bool:
                    found = samples(await text()).get("modelgate_shadow_verdicts_total", [])
                    return sum(s.value for s in found) == len(units)

                await wait_until(verdicts_in, "every shadow pair compared and counted")
                exposition = await text()
                found = samples(exposition)

        per_variant = Counter(variant_of(u) for u in units)
        counts = {
            s.labels["variant"]: s.value
            for s in found["modelgate_request_duration_seconds_count"]
            if s.labels["route"] == "predict"
        }
        assert counts == per_variant
        buckets = [
            s
            for s in found["modelgate_request_duration_seconds_bucket"]
            if s.labels["variant"] == "candidate"
        ]
        assert [float(s.labels["le"]) for s in buckets] == [*LATENCY_BUCKETS_S, float("inf")]
        by_le = {float(s.labels["le"]): s.value for s in buckets}
        assert by_le[0.01] == 0  # every candidate request waited the 20 ms fault
        assert by_le[float("inf")] == per_variant["candidate"]
        (total,) = [
            s
            for s in found["modelgate_request_duration_seconds_sum"]
            if s.labels["variant"] == "candidate"
        ]
        assert total.value >= 0.02 * per_variant["candidate"]

        (faults,) = found["modelgate_chaos_faults_total"]
        assert faults.labels == {
            "config_version": "1",
            "route": "predict",
            "rule": "slow-candidate",
            "kind": "delay",
        }
        assert faults.value == per_variant["candidate"]
        shadows = {s.labels["outcome"]: s.value for s in found["modelgate_shadow_requests_total"]}
        assert shadows["sent"] == shadows["answered"] == len(units)
        verdicts = {s.labels["verdict"]: s.value for s in found["modelgate_shadow_verdicts_total"]}
        assert sum(verdicts.values()) == len(units)
        fed = {s.labels["result"]: s.value for s in found["modelgate_feedback_total"]}
        assert fed == {"accepted": 5, "counted": 5}
        logs = {
            (s.labels["log"], s.labels["result"]): s.value
            for s in found["modelgate_log_records_total"]
        }
        assert logs.get(("exposure", "written"), 0) <= len(units)  # flushed once a second
        (in_flight,) = found["modelgate_requests_in_flight"]
        assert in_flight.value == 0
        families = {f.name for f in text_string_to_metric_families(exposition)}
        for name in dashboard_metrics():
            assert re.sub(r"_(total|bucket|count|sum)$", "", name) in families, name
        for name, listed in found.items():
            for sample in listed:
                assert sample.labels["config_version"] == "1", (name, sample)

    run()


def test_tracked_counts_and_latency_are_split_by_version() -> None:
    faults: Counter[tuple[str, str, str]] = Counter()
    counters = Counters(version=1)
    counters.track("chaos_faults", lambda: faults)
    counters.observe_latency("predict", "control", 0.003)
    faults[("predict", "slow", "delay")] += 2
    counters.begin_version(2)
    counters.observe_latency("predict", "control", 40.0)  # beyond 30 s: the +Inf bucket
    faults[("predict", "slow", "delay")] += 1
    export = counters.export()
    one, two = export["1"], export["2"]
    assert one.latency == Counter({("predict", "control", 2): 1})
    assert two.latency == Counter({("predict", "control", len(LATENCY_BUCKETS_S)): 1})
    assert one.latency_sum == {("predict", "control"): 0.003}
    assert one.families["chaos_faults"] == Counter({("predict", "slow", "delay"): 2})
    assert two.families["chaos_faults"] == Counter({("predict", "slow", "delay"): 1})
    # Workers' exports travel as JSON and sum.
    again = {k: CountSlice.from_json(v.to_json()) for k, v in export.items()}
    merged = merge_exports([export, again])
    assert merged["2"].families["chaos_faults"][("predict", "slow", "delay")] == 2
    assert merged["1"].latency_sum[("predict", "control")] == 0.006


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def dashboard_metrics() -> set[str]:
    """Every metric name the Grafana dashboard's queries use."""
    dashboard = json.loads((CONFIGS / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [a["expr"] for a in dashboard["annotations"]["list"]]
    return set(re.findall(r"modelgate_[a-z_]+", " ".join(exprs)))


def test_the_prometheus_config_scrapes_the_admin_api() -> None:
    config = yaml.safe_load((CONFIGS / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8081"]
    assert len(dashboard_metrics()) >= 10
