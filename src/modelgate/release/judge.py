"""How a canary step is judged: cumulative per-variant totals, the window between two of them,
the sample-ratio guard and each check's verdict (pass, fail, or wait for more data).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

from modelgate.config import CanaryCheck, CanarySpec, GatewayConfig, route_experiments
from modelgate.outcomes import LATENCY_BUCKETS_S, latency_quantile
from modelgate.stats import proportion_test, srm_test, welch_test, wilson_interval

__all__ = [
    "DEFAULT_CHECKS",
    "Arm",
    "CheckResult",
    "ExperimentView",
    "Snapshot",
    "Sums",
    "Totals",
    "against",
    "checks_of",
    "experiment_view",
    "judge",
    "srm_guard",
    "window",
    "worst",
]

Outcome = Literal["pass", "fail", "wait"]
N_BUCKETS = len(LATENCY_BUCKETS_S) + 1
LATENCY_FLOOR_MS = LATENCY_BUCKETS_S[0] * 1000.0  # below the first bucket, all look alike

# When `checks:` is omitted: at most one point more errors than the baseline (shown with
# confidence), and a p99 at most 1.5 times the baseline's.
DEFAULT_CHECKS = (
    CanaryCheck(metric="error_rate", max_increase=0.01),
    CanaryCheck(metric="latency_p99_ms", max_ratio=1.5),
)


@dataclass
class Sums:
    """Power sums of one feedback metric's values: they subtract, unlike mean and M2."""

    count: float = 0.0
    total: float = 0.0
    squares: float = 0.0
    ones: float = 0.0

    @classmethod
    def from_moments(cls, count: float, mean: float, m2: float, ones: float) -> Sums:
        return cls(count, mean * count, m2 + count * mean * mean, ones)

    def minus(self, other: Sums) -> Sums:
        return Sums(
            self.count - other.count,
            self.total - other.total,
            self.squares - other.squares,
            self.ones - other.ones,
        )

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def variance(self) -> float:
        if self.count < 2:
            return math.nan
        return max(0.0, self.squares - self.total * self.total / self.count) / (self.count - 1)

    @property
    def binary(self) -> bool:
        """Every value 0 or 1: the sum and the sum of squares both equal the count of ones."""
        return abs(self.total - self.ones) < 1e-6 and abs(self.squares - self.ones) < 1e-6


@dataclass
class Arm:
    """One variant's cumulative totals (or, after `window`, what a window added)."""

    routed: float = 0.0  # responses of the route in this variant, every unit (the SRM counts)
    requests: float = 0.0  # enrolled requests the gateway measured
    errors: float = 0.0  # of those, 5xx or failed
    buckets: list[float] = field(default_factory=lambda: [0.0] * N_BUCKETS)
    latency_sum: float = 0.0  # seconds, over the measured requests
    feedback: dict[str, Sums] = field(default_factory=dict)


Totals = dict[str, Arm]


@dataclass(frozen=True)
class Snapshot:
    """Totals per variant as of a wall-clock time (Prometheus lags by its scrape interval),
    and who contributed them (Prometheus: the instances; empty for the local source)."""

    arms: Totals
    as_of: float
    sources: frozenset[str] = frozenset()


def window(now: Snapshot, start: Snapshot) -> Totals | None:
    """What happened between two snapshots; None when a total went down (a gateway restarted
    and its counters began again) or the gateways counted changed: the caller starts anew."""
    if now.sources != start.sources:
        return None
    out: Totals = {}
    for name, arm in now.arms.items():
        before = start.arms.get(name, Arm())
        diff = Arm(
            routed=arm.routed - before.routed,
            requests=arm.requests - before.requests,
            errors=arm.errors - before.errors,
            buckets=[a - b for a, b in zip(arm.buckets, before.buckets, strict=True)],
            latency_sum=arm.latency_sum - before.latency_sum,
            feedback={
                metric: sums.minus(before.feedback.get(metric, Sums()))
                for metric, sums in arm.feedback.items()
            },
        )
        counts = [diff.routed, diff.requests, diff.errors, *diff.buckets]
        counts += [s.count for s in diff.feedback.values()]
        if min(counts) < -1e-9:
            return None
        out[name] = diff
    return out


@dataclass(frozen=True)
class ExperimentView:
    """What the controller needs of one experiment in a running config."""

    name: str
    route: str
    variants: tuple[str, ...]
    weights: dict[str, float]
    killed: bool
    default: str
    coverage: float
    segments: bool
    sole: bool  # the route's only experiment: its request counts are this experiment's
    canary: CanarySpec | None


def experiment_view(config: GatewayConfig, name: str) -> ExperimentView | None:
    for route in config.routes:
        experiments = route_experiments(route)
        for _, spec in experiments:
            if spec.name == name:
                return ExperimentView(
                    name=name,
                    route=route.name,
                    variants=tuple(v.name for v in spec.variants),
                    weights={v.name: v.weight for v in spec.variants},
                    killed=spec.killed,
                    default=spec.default or spec.variants[0].name,
                    coverage=spec.coverage,
                    segments=bool(spec.segments),
                    sole=len(experiments) == 1,
                    canary=spec.canary,
                )
    return None


def srm_guard(view: ExperimentView, spec: CanarySpec, arms: Totals) -> dict[str, Any] | None:
    """Sample-ratio check of the window's requests per variant against the weights in force.

    On the route's only experiment the counts are every response of the route (so overrides
    and forced variants count), expected from the weights with the units outside `coverage`
    on the default variant; otherwise the enrolled requests against the weights. Segments
    assign by their own weights: no expectation to test, so None."""
    if view.segments:
        return None
    total = sum(view.weights.values())
    shares = [view.weights[v] / total for v in view.variants]
    if view.sole:
        counts = [arms.get(v, Arm()).routed for v in view.variants]
        off = 1.0 - view.coverage
        shares = [
            view.coverage * s + (off if v == view.default else 0.0)
            for v, s in zip(view.variants, shares, strict=True)
        ]
    else:
        counts = [arms.get(v, Arm()).requests for v in view.variants]
    result = srm_test(counts, shares, threshold=spec.srm_threshold)
    return {
        "counts": dict(zip(view.variants, counts, strict=True)),
        "expected": dict(zip(view.variants, (round(e, 1) for e in result.expected), strict=True)),
        "chi2": round(result.chi2, 4) if math.isfinite(result.chi2) else None,
        "p_value": result.p_value,
        "threshold": result.threshold,
        "mismatch": result.mismatch,
    }


@dataclass(frozen=True)
class CheckResult:
    metric: str
    outcome: Outcome
    baseline: float  # NaN when not measured
    candidate: float
    detail: str
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "outcome": self.outcome,
            "baseline": _finite(self.baseline),
            "candidate": _finite(self.candidate),
            "detail": self.detail,
            **self.numbers,
        }


def _finite(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def against(low: float, high: float, limit: float) -> Outcome:
    """A one-sided decision from an interval of a "worse" quantity allowed up to `limit`:
    all of it within the limit passes, all of it beyond fails, straddling waits for data."""
    if high <= limit:
        return "pass"
    if low > limit:
        return "fail"
    return "wait"


def worst(outcomes: list[Outcome]) -> Outcome:
    return "fail" if "fail" in outcomes else "wait" if "wait" in outcomes else "pass"


def _error_rate(check: CanaryCheck, base: Arm, cand: Arm, alpha: float) -> CheckResult:
    # Two-sided 1 - 2 alpha intervals are one-sided 1 - alpha bounds.
    test = proportion_test(
        round(base.errors),
        round(base.requests),
        round(cand.errors),
        round(cand.requests),
        alpha=2 * alpha,
    )
    verdicts: list[tuple[str, Outcome]] = []
    if check.max_increase is not None:
        limit = check.max_increase
        verdicts.append((f"increase <= {limit:g}", against(test.ci_low, test.ci_high, limit)))
    if check.max_ratio is not None:
        limit = (check.max_ratio - 1.0) * test.p_a
        verdicts.append(
            (f"ratio <= {check.max_ratio:g}", against(test.ci_low, test.ci_high, limit))
        )
    if check.max_value is not None:
        z = statistics.NormalDist().inv_cdf(1.0 - alpha)
        low, high = wilson_interval(round(cand.errors), round(cand.requests), z)
        verdicts.append((f"rate <= {check.max_value:g}", against(low, high, check.max_value)))
    outcome = worst([v for _, v in verdicts])
    return CheckResult(
        check.metric,
        outcome,
        test.p_a,
        test.p_b,
        ", ".join(f"{what}: {v}" for what, v in verdicts),
        {
            "diff": round(test.diff, 6),
            "ci": [round(test.ci_low, 6), round(test.ci_high, 6)],
            "p_value": test.p_value,
            "n": [int(base.requests), int(cand.requests)],
            "errors": [int(base.errors), int(cand.errors)],
        },
    )


def _latency(check: CanaryCheck, base: Arm, cand: Arm) -> CheckResult:
    q = float(check.metric.removeprefix("latency_p").removesuffix("_ms")) / 100.0
    b = latency_quantile([round(x) for x in base.buckets], q) * 1000.0
    c = latency_quantile([round(x) for x in cand.buckets], q) * 1000.0
    if math.isnan(b) or math.isnan(c):
        return CheckResult(check.metric, "wait", b, c, "no latency measured yet")
    # Quantiles are point estimates from the histograms: no test; noise is met by min_samples
    # and failure_limit.
    verdicts: list[tuple[str, bool]] = []
    if check.max_increase is not None:
        verdicts.append(
            (f"increase {c - b:.1f} ms <= {check.max_increase:g}", c - b <= check.max_increase)
        )
    if check.max_ratio is not None:
        ratio = c / max(b, LATENCY_FLOOR_MS)
        verdicts.append((f"ratio {ratio:.2f} <= {check.max_ratio:g}", ratio <= check.max_ratio))
    if check.max_value is not None:
        verdicts.append((f"{c:.1f} ms <= {check.max_value:g}", c <= check.max_value))
    outcome: Outcome = "pass" if all(ok for _, ok in verdicts) else "fail"
    detail = ", ".join(f"{what}: {'pass' if ok else 'fail'}" for what, ok in verdicts)
    return CheckResult(check.metric, outcome, b, c, detail)


def _feedback(check: CanaryCheck, base: Arm, cand: Arm, spec: CanarySpec) -> CheckResult:
    a, b = base.feedback.get(check.metric, Sums()), cand.feedback.get(check.metric, Sums())
    need = max(spec.min_samples, 2)
    if a.count < need or b.count < need:
        return CheckResult(
            check.metric,
            "wait",
            a.mean,
            b.mean,
            f"{int(a.count)} and {int(b.count)} values; {need} per arm needed",
        )
    numbers: dict[str, Any]
    if a.binary and b.binary:
        prop = proportion_test(
            round(a.ones), round(a.count), round(b.ones), round(b.count), 2 * spec.alpha
        )
        low, high, numbers = (
            prop.ci_low,
            prop.ci_high,
            {"test": "proportion", "p_value": prop.p_value},
        )
    else:
        welch = welch_test(
            round(a.count), a.mean, a.variance, round(b.count), b.mean, b.variance, 2 * spec.alpha
        )
        low, high, numbers = (
            welch.ci_low,
            welch.ci_high,
            {"test": "welch", "p_value": welch.p_value},
        )
    margin = check.margin or 0.0
    # "Worse" is the baseline minus the candidate when higher is better, else the reverse.
    worse = (-high, -low) if check.higher_is_better else (low, high)
    outcome = against(worse[0], worse[1], margin)
    numbers.update(
        diff=round(b.mean - a.mean, 6),
        ci=[round(low, 6), round(high, 6)],
        margin=margin,
        n=[int(a.count), int(b.count)],
    )
    direction = "higher" if check.higher_is_better else "lower"
    detail = f"non-inferiority ({direction} is better, margin {margin:g}): {outcome}"
    return CheckResult(check.metric, outcome, a.mean, b.mean, detail, numbers)


def checks_of(spec: CanarySpec) -> tuple[CanaryCheck, ...]:
    """The canary's checks, or the defaults when `checks:` is omitted."""
    return tuple(spec.checks) if spec.checks is not None else DEFAULT_CHECKS


def judge(spec: CanarySpec, base: Arm, cand: Arm) -> list[CheckResult]:
    """Each check's verdict on one window; the caller has seen min_samples on both arms."""
    results = []
    for check in checks_of(spec):
        if check.metric == "error_rate":
            results.append(_error_rate(check, base, cand, spec.alpha))
        elif check.is_system:
            results.append(_latency(check, base, cand))
        else:
            results.append(_feedback(check, base, cand, spec))
    return results
