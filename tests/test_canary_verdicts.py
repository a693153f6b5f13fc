"""The per-unit canary checks (modelgate.release.verdicts) on simulated traffic with repeat
visitors: A/A canaries looked at again and again roll back at most at alpha, and the same
checks over requests (the old way) do not; a real regression is caught."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import stats as sps  # type: ignore[import-untyped]

from modelgate.analysis.system import ArmQuantiles, SystemUnits
from modelgate.config import CanarySpec
from modelgate.release.judge import ExperimentView
from modelgate.release.records import Evidence
from modelgate.release.verdicts import judge_evidence, unit_srm_guard
from modelgate.stats import UnitStats

ARMS = ("control", "candidate")
LEVELS = (0.5, 0.99)  # the quantiles the checks below judge
SPEC = CanarySpec(baseline="control", candidate="candidate", steps=[20, 50, 100], min_samples=20)


@dataclass
class Requests:
    """Per request of one arm: its unit, whether it failed, its latency (ms)."""

    units: np.ndarray
    errors: np.ndarray
    latency: np.ndarray


def users(
    rng: np.random.Generator,
    n_units: int,
    error_rate: float = 0.01,
    slow: float = 1.0,
    heavy: bool = True,
) -> Requests:
    """Repeat visitors: requests per unit heavy-tailed (most 1-3, a few dozens), each unit
    with its own error propensity and its own speed (a slow client is slow every time)."""
    counts = np.minimum(rng.zipf(1.8, n_units), 80) if heavy else np.ones(n_units, dtype=np.int64)
    units = np.repeat(np.arange(n_units), counts)
    propensity = rng.beta(0.5, 0.5 / error_rate - 0.5, n_units)  # mean error_rate, spread
    speed = rng.lognormal(0.0, 0.6, n_units)  # per-unit latency factor
    errors = rng.random(units.size) < propensity[units]
    latency = slow * 20.0 * speed[units] * rng.lognormal(0.0, 0.3, units.size)
    return Requests(units, errors.astype(np.float64), latency)


def evidence(arms: dict[str, Requests], step_units: dict[str, int] | None = None) -> Evidence:
    errors, latency, latencies = {}, {}, {}
    for name, r in arms.items():
        per_unit_n = np.bincount(r.units).astype(np.float64)
        seen = per_unit_n > 0
        errors[name] = UnitStats.from_samples(
            np.bincount(r.units, weights=r.errors)[seen], per_unit_n[seen]
        )
        latency[name] = UnitStats.from_samples(
            np.bincount(r.units, weights=r.latency)[seen], per_unit_n[seen]
        )
        latencies[name] = ArmQuantiles.of(r.latency, r.units, LEVELS)
    counted = step_units or {name: int(np.unique(r.units).size) for name, r in arms.items()}
    requests = {name: int(r.units.size) for name, r in arms.items()}
    return Evidence(SystemUnits(errors, latency, latencies, counted, requests))


def looks(rng: np.random.Generator, spec: CanarySpec, heavy: bool, as_requests: bool) -> bool:
    """One A/A canary looked at 12 times as its users arrive (weights 80/20 then 50/50):
    True when any look fails a check (a false rollback with failure_limit 1)."""
    a, b = users(rng, 3000, heavy=heavy), users(rng, 3000, heavy=heavy)
    for fraction in np.linspace(0.08, 1.0, 12):
        arms = {}
        for name, full, share in (("control", a, 1.0), ("candidate", b, 0.6)):
            keep = full.units < int(3000 * fraction * share)
            units = full.units[keep]
            if as_requests:  # the old way: each request its own sample
                units = np.arange(units.size)
            arms[name] = Requests(units, full.errors[keep], full.latency[keep])
        if any(r.outcome == "fail" for r in judge_evidence(spec, evidence(arms))):
            return True
    return False


def binomial_ceiling(n: int, p: float) -> int:
    """Rollbacks beyond this happen with probability below 1e-4 when the rate is p."""
    return int(sps.binom.isf(1e-4, n, p))


CHECKS = [
    {"metric": "error_rate", "max_increase": 0.005},
    {"metric": "latency_p99_ms", "max_ratio": 1.1},
    {"metric": "latency_p50_ms", "max_increase": 1.0},
]


def test_aa_canaries_looked_at_often_roll_back_at_most_at_alpha() -> None:
    rng = np.random.default_rng(13)
    spec = CanarySpec.model_validate({**SPEC.model_dump(), "checks": CHECKS})
    runs = 150
    rolled = sum(looks(rng, spec, heavy=True, as_requests=False) for _ in range(runs))
    assert rolled <= binomial_ceiling(runs, spec.alpha), rolled


def test_the_same_checks_over_requests_roll_back_far_more_often() -> None:
    """The control: judging requests as independent, as the old canary did, on the same
    repeat-visitor traffic, rolls back A/A canaries far beyond alpha."""
    rng = np.random.default_rng(13)
    spec = CanarySpec.model_validate({**SPEC.model_dump(), "checks": CHECKS})
    runs = 30
    rolled = sum(looks(rng, spec, heavy=True, as_requests=True) for _ in range(runs))
    assert rolled > binomial_ceiling(runs, spec.alpha), rolled


@pytest.mark.parametrize(
    ("candidate", "metric"),
    [
        ({"error_rate": 0.08}, "error_rate"),
        ({"slow": 2.5}, "latency_p99_ms"),
    ],
)
def test_a_real_regression_fails_its_check(candidate: dict[str, float], metric: str) -> None:
    rng = np.random.default_rng(5)
    worse = users(rng, 4000, candidate.get("error_rate", 0.01), candidate.get("slow", 1.0))
    arms = {"control": users(rng, 4000), "candidate": worse}
    results = {r.metric: r for r in judge_evidence(SPEC, evidence(arms))}
    assert results[metric].outcome == "fail", results[metric]
    assert results[metric].numbers["interval"] == "confidence-sequence"


def test_an_equal_candidate_with_enough_users_passes_the_default_checks() -> None:
    rng = np.random.default_rng(8)
    arms = {"control": users(rng, 20000), "candidate": users(rng, 20000)}
    results = judge_evidence(SPEC, evidence(arms))
    assert [r.outcome for r in results] == ["pass", "pass"], results


def test_too_few_units_wait_rather_than_judge() -> None:
    rng = np.random.default_rng(1)
    arms = {"control": users(rng, 1), "candidate": users(rng, 1)}
    assert {r.outcome for r in judge_evidence(SPEC, evidence(arms))} == {"wait"}


def view(weights: tuple[float, float]) -> ExperimentView:
    return ExperimentView(
        name="ranker",
        route="predict",
        variants=ARMS,
        weights=dict(zip(ARMS, weights, strict=True)),
        killed=False,
        default="control",
        coverage=1.0,
        segments=False,
        sole=True,
        canary=SPEC,
    )


def test_the_sample_ratio_guard_counts_units_and_keeps_its_running_p_value() -> None:
    rng = np.random.default_rng(2)
    arms = {"control": users(rng, 800), "candidate": users(rng, 200)}
    # Requests are 80/20 only in expectation; heavy users skew them, units are what count.
    fine = unit_srm_guard(view((80, 20)), SPEC, evidence(arms), 1.0)
    assert fine is not None and fine["mismatch"] is False and fine["unit"] == "units"
    skewed = evidence(arms, {"control": 700, "candidate": 300})
    found = unit_srm_guard(view((80, 20)), SPEC, skewed, 1.0)
    assert found is not None and found["mismatch"] is True
    # The running minimum: a later, better-looking look keeps the earlier alarm's p.
    again = unit_srm_guard(view((80, 20)), SPEC, evidence(arms), found["p_value"])
    assert again is not None and again["p_value"] == found["p_value"] and again["mismatch"]
    assert math.isfinite(found["p_value"])


def test_no_error_on_either_arm_is_not_proof_of_a_low_error_rate() -> None:
    """0 errors in 100 requests against 0 in 12000: the delta method alone has variance 0
    and a zero-width interval; the binomial floor at the smoothed rate makes it wait, as a
    candidate failing 2% of requests shows no error in 100 about 13% of the time."""
    zero = {
        name: Requests(np.arange(n), np.zeros(n), np.full(n, 20.0))
        for name, n in (("control", 12000), ("candidate", 100))
    }
    spec = CanarySpec.model_validate(
        {**SPEC.model_dump(), "checks": [{"metric": "error_rate", "max_increase": 0.01}]}
    )
    (result,) = judge_evidence(spec, evidence(zero))
    assert result.outcome == "wait", result
    assert result.numbers["ci"][1] > 0.01
    # With ten times the candidate's requests, still no error, it passes.
    zero["candidate"] = Requests(np.arange(3000), np.zeros(3000), np.full(3000, 20.0))
    (result,) = judge_evidence(spec, evidence(zero))
    assert result.outcome == "pass", result
