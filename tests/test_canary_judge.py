"""The canary's judgement on given numbers: each check's pass / fail / wait, the window between
two snapshots, the sample-ratio guard, and the config errors of `canary:`."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from modelgate.config import CanarySpec, ConfigError, validate_config
from modelgate.release.judge import (
    Arm,
    ExperimentView,
    Snapshot,
    Sums,
    judge,
    srm_guard,
    window,
)

from .canary_traffic import canary_config


def spec(*checks: dict[str, Any], **extra: Any) -> CanarySpec:
    raw = {"baseline": "a", "candidate": "b", "steps": [10, 100], "min_samples": 20, **extra}
    if checks:
        raw["checks"] = list(checks)
    return CanarySpec.model_validate(raw)


def arm(n: int, errors: int = 0, **feedback: list[float]) -> Arm:
    out = Arm(requests=n, routed=n, errors=errors)
    for metric, values in feedback.items():
        x = np.asarray(values, dtype=float)
        m2 = float(((x - x.mean()) ** 2).sum())
        out.feedback[metric] = Sums.from_moments(x.size, float(x.mean()), m2, int((x == 1).sum()))
    return out


def outcome(canary: CanarySpec, base: Arm, cand: Arm) -> list[str]:
    return [r.outcome for r in judge(canary, base, cand)]


def test_error_rate_passes_fails_or_waits_on_the_one_sided_interval() -> None:
    check = {"metric": "error_rate", "max_increase": 0.01}
    assert outcome(spec(check), arm(1000, 10), arm(1000, 11)) == ["pass"]
    assert outcome(spec(check), arm(1000, 0), arm(1000, 100)) == ["fail"]
    assert outcome(spec(check), arm(100, 1), arm(100, 2)) == ["wait"]  # too few to tell
    ratio = {"metric": "error_rate", "max_ratio": 2.0}
    assert outcome(spec(ratio), arm(5000, 250), arm(5000, 260)) == ["pass"]
    assert outcome(spec(ratio), arm(5000, 50), arm(5000, 400)) == ["fail"]
    value = {"metric": "error_rate", "max_value": 0.05}
    assert outcome(spec(value), arm(1000), arm(1000, 200)) == ["fail"]
    assert outcome(spec(value), arm(1000), arm(1000, 5)) == ["pass"]


def test_feedback_is_non_inferiority_within_the_margin() -> None:
    rng = np.random.default_rng(5)
    same = [float(v) for v in rng.integers(0, 2, 2000)]
    worse = [float(v) for v in (rng.random(2000) < 0.3)]
    converted = {"metric": "converted", "margin": 0.05}
    assert outcome(spec(converted), arm(2000, converted=same), arm(2000, converted=same)) == [
        "pass"
    ]
    assert outcome(spec(converted), arm(2000, converted=same), arm(2000, converted=worse)) == [
        "fail"
    ]
    few = same[:30]
    assert outcome(spec(converted), arm(30, converted=few), arm(30, converted=few)) == ["wait"]
    # Lower is better: the candidate's lower rate is now the better one.
    lower = {**converted, "higher_is_better": False}
    assert outcome(spec(lower), arm(2000, converted=same), arm(2000, converted=worse)) == ["pass"]
    result = judge(spec(converted), arm(2000, converted=same), arm(2000, converted=worse))[0]
    assert result.numbers["test"] == "proportion"
    assert result.numbers["ci"][1] < -0.05  # worse by more than the margin, with confidence


def test_continuous_feedback_uses_welch() -> None:
    rng = np.random.default_rng(6)
    a, b = list(rng.normal(10, 2, 500)), list(rng.normal(10.1, 2, 500))
    revenue = {"metric": "revenue", "margin": 1.0}
    result = judge(spec(revenue), arm(500, revenue=a), arm(500, revenue=b))[0]
    assert (result.outcome, result.numbers["test"]) == ("pass", "welch")
    assert result.baseline == pytest.approx(np.mean(a))


def test_latency_quantiles_compare_point_estimates() -> None:
    base, cand = Arm(requests=100), Arm(requests=100)
    base.buckets[4] = 100  # all in (10 ms, 25 ms]
    cand.buckets[6] = 100  # all in (50 ms, 100 ms]
    ratio = {"metric": "latency_p99_ms", "max_ratio": 1.5}
    assert outcome(spec(ratio), base, base) == ["pass"]
    assert outcome(spec(ratio), base, cand) == ["fail"]
    assert outcome(spec({"metric": "latency_p50_ms", "max_value": 200}), base, cand) == ["pass"]
    assert outcome(spec(ratio), Arm(), cand) == ["wait"]  # nothing measured on the baseline
    defaults = judge(spec(), base, cand)  # no checks: error rate and p99 against the baseline
    assert [(r.metric, r.outcome) for r in defaults] == [
        ("error_rate", "pass"),
        ("latency_p99_ms", "fail"),
    ]


def test_window_subtracts_and_restarts_when_a_total_goes_down() -> None:
    start = Snapshot({"a": arm(100, 1, clicked=[1.0, 0.0])}, 1.0)
    now = Snapshot({"a": arm(250, 4, clicked=[1.0, 0.0, 1.0, 1.0])}, 2.0)
    diff = window(now, start)
    assert diff is not None
    assert (diff["a"].requests, diff["a"].errors) == (150, 3)
    clicked = diff["a"].feedback["clicked"]
    assert (clicked.count, clicked.mean, clicked.variance) == (2, 1.0, 0.0)
    assert window(start, now) is None  # a gateway restarted: counts went down
    assert window(Snapshot(now.arms, 2.0, frozenset({"g1", "g2"})), start) is None


def view(**extra: Any) -> ExperimentView:
    fields: dict[str, Any] = {
        "name": "e",
        "route": "r",
        "variants": ("a", "b"),
        "weights": {"a": 80.0, "b": 20.0},
        "killed": False,
        "default": "a",
        "coverage": 1.0,
        "segments": False,
        "sole": True,
        "canary": None,
        **extra,
    }
    return ExperimentView(**fields)


def test_srm_expects_the_weights_and_the_default_for_units_outside_coverage() -> None:
    arms = {"a": Arm(routed=800), "b": Arm(routed=200)}
    assert srm_guard(view(), spec(), arms)["mismatch"] is False  # type: ignore[index]
    skewed = {"a": Arm(routed=600), "b": Arm(routed=400)}
    assert srm_guard(view(), spec(), skewed)["mismatch"] is True  # type: ignore[index]
    # coverage 0.5: half the units get the default `a`, so a expects 0.5 + 0.5 * 0.8 = 90%.
    covered = {"a": Arm(routed=900), "b": Arm(routed=100)}
    result = srm_guard(view(coverage=0.5), spec(), covered)
    assert result is not None and result["expected"] == {"a": 900.0, "b": 100.0}
    assert srm_guard(view(segments=True), spec(), arms) is None


@pytest.mark.parametrize(
    ("canary", "error"),
    [
        ({"steps": [50, 20]}, "canary: steps must increase, got [50.0, 20.0]"),
        (
            {"checks": [{"metric": "error_rate"}]},
            "canary.checks[0]: error_rate: give at least one limit",
        ),
        (
            {"checks": [{"metric": "clicked"}]},
            "canary.checks[0]: clicked: margin is required for a feedback metric",
        ),
        (
            {"checks": [{"metric": "clicked", "margin": 0.1, "max_ratio": 2}]},
            "clicked: a feedback metric is judged by margin (non-inferiority), not max_ratio",
        ),
        ({"max_wait_s": 0.1}, "max_wait_s (0.1) must be >= interval_s (0.5)"),
        ({"prometheus_url": "prom:9090"}, "expected http(s)://host:port of a Prometheus server"),
        ({"candidate": "control", "baseline": "candidate"}, "canary.candidate: must be the last"),
        ({"steps": [0, 50]}, "canary.steps[0]: must be in (0, 100], got 0"),
        ({"sequential_tuning": 0}, "canary.sequential_tuning: Input should be greater than 0"),
    ],
)
def test_canary_config_errors_name_their_key_path(canary: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config(canary_config(**canary))
    assert any(error in e for e in info.value.errors), info.value.errors
    assert all(e.startswith("routes[0].experiment.canary") for e in info.value.errors)


def test_min_effect_is_another_name_for_margin() -> None:
    check = spec({"metric": "clicked", "min_effect": 0.02}).checks
    assert check is not None and check[0].margin == 0.02


def test_a_local_canary_without_exposure_records_is_refused() -> None:
    """It judges the records: with them turned off it could never decide."""
    config = canary_config()
    config["exposures"] = {"enabled": False}
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    assert info.value.errors == [
        "routes[0].experiment.canary.source: a local canary judges the exposure records "
        "(per unit, with each answer's status and latency): set exposures.enabled: true"
    ]
    config["routes"][0]["experiment"]["canary"].update(
        source="prometheus", prometheus_url="http://127.0.0.1:9090"
    )
    assert validate_config(config).exposures.enabled is False  # a fleet canary does not
