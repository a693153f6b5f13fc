"""What `modelgate demo` prints: the split and the SRM check on users, per-arm latency, the
chaos rule's effect, shadow agreement from the diff log, the canary's transitions, and the
A/B result over users."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

from modelgate.difflog import DiffLogError, read_difflog

__all__ = ["ReportedRun", "ab_summary", "print_report", "shadow_summary"]


class ReportedRun(Protocol):
    """What the report reads of a demo run (modelgate.demo.run's, which imports this module:
    the report does not import the run)."""

    log_dir: Path
    report: dict[str, Any]


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def shadow_summary(run: ReportedRun) -> list[dict[str, Any]]:
    from modelgate.difflog_cli import summarize

    try:
        records, names = read_difflog(run.log_dir)
    except DiffLogError:
        return []
    pairs: list[dict[str, Any]] = summarize(records, names)["pairs"]
    return pairs


def ab_summary(run: ReportedRun) -> dict[str, Any] | None:
    """The gateway's own A/B result (GET /experiments/digits), when it answered."""
    status, body = run.report.get("experiment", (0, None))
    return body if status == 200 and isinstance(body, dict) else None


def print_report(run: ReportedRun) -> None:
    bench = run.report["bench"]
    variants = {k: v for k, v in bench["variants"].items() if k != "-"}
    total = sum(v["responses"] for v in variants.values())
    _section("traffic")
    print(
        f"sent {bench['sent']} requests, {bench['responses']} answered, "
        f"{bench['error_count']} connection errors"
    )

    _section("split (sticky by user) and sample-ratio check on users")
    counts = [variants.get(f"digits={n}", {}).get("responses", 0) for n in ("control", "candidate")]
    for name, count in zip(("control", "candidate"), counts, strict=True):
        share = count / total if total else 0.0
        print(f"  digits={name:<10} {count:>6} responses  {share:6.1%}  (configured 50.0%)")
    result = ab_summary(run)
    srm = (result or {}).get("srm") or {}
    if srm:
        # Users, not requests: the split of requests also depends on how often the users
        # of each arm happened to come back, which is not binomial.
        flag = "MISMATCH" if srm.get("mismatch") else "ok"
        print(
            f"  SRM on distinct users {srm.get('counts')} vs weights {srm.get('weights')}: "
            f"p = {srm.get('p_value', math.nan):.3g}: {flag}"
        )

    _section("latency per arm, from the scheduled send (ms), and the chaos rule")
    print(f"  {'variant':<22}{'p50':>8}{'p90':>8}{'p99':>8}   faulted by chaos")
    for name, group in sorted(variants.items()):
        latency = group["latency_ms"]
        faults = ", ".join(f"{rule} {n}" for rule, n in group.get("faults", {}).items()) or "-"
        print(
            f"  {name:<22}{_ms(latency.get('p50')):>8}{_ms(latency.get('p90')):>8}"
            f"{_ms(latency.get('p99')):>8}   {faults}"
        )
    print("  (slow-candidate delays 25% of candidate requests by ~40 ms: see its p90/p99)")

    _section("shadow model-v3 against the primary, from the diff log")
    for pair in shadow_summary(run):
        low, high = pair["agreement_ci95"] or (math.nan, math.nan)
        agreement = pair["agreement"] or 0.0
        print(
            f"  route {pair['route']}, shadow {pair['shadow']}: {pair['records']} pairs, "
            f"label agreement {agreement:.1%} (95% CI {low:.1%} - {high:.1%})"
        )
        lat = pair["latency_ms"]
        print(
            f"  latency p50 primary {lat['primary']['p50']:.1f} ms, "
            f"shadow {lat['shadow']['p50']:.1f} ms"
        )

    _section("canary: model-v2 ramped in on /rollout (GET /canaries)")
    status, body = run.report.get("canaries", (0, None))
    canaries = body.get("canaries", []) if status == 200 and isinstance(body, dict) else []
    for canary in canaries:
        print(
            f"  {canary['experiment']}: state {canary['state']}, step {canary['step']} of "
            f"{len(canary['steps'])}, candidate weight {canary['weight']:g}%"
        )
        for entry in canary.get("history", []):
            print(
                f"    {entry['time']}  {entry.get('from') or '-':>11} -> {entry['to']:<11} "
                f"weight {entry['weight']:>5g}  {entry['reason']}"
            )
    if not canaries:
        print(f"  (no canary answered /canaries: {body})")
    rollout = run.report.get("rollout", {}).get("variants", {})
    if rollout:
        split = ", ".join(f"{k} {v['responses']}" for k, v in sorted(rollout.items()))
        print(f"  /rollout responses over the whole run: {split}")

    _section("A/B result over users: was the prediction right? (from the true labels)")
    feedback = run.report["feedback"]
    print(f"  {feedback['accepted']} outcomes posted, one per request")
    for name, acc in run.report["accuracy"].items():
        print(f"  offline held-out accuracy {name}: {acc:.1%}")
    if result is None:
        print(f"  the gateway did not answer GET /experiments/digits: {run.report['experiment']}")
        return
    for variant in result["variants"]:
        correct = variant["metrics"].get("correct", {})
        if correct.get("units"):
            print(
                f"  {variant['name']:<10} users {variant['units']:>4}  requests "
                f"{variant['exposures']:>5}  accuracy per request {correct['mean']:.1%}"
            )
    for comparison in result.get("comparisons", []):
        if comparison.get("metric") != "correct" or comparison.get("p_value") is None:
            continue
        print(
            f"  {comparison['variant']} - {comparison['control']}: "
            f"{comparison['diff']:+.1%} (95% CI {comparison['ci_low']:+.1%} .. "
            f"{comparison['ci_high']:+.1%}), {comparison['method']} test over users, "
            f"p = {comparison['p_value']:.3g}"
            + (" -> significant" if comparison.get("significant") else " -> not significant")
        )
    html = run.report.get("html")
    if html:
        print(f"\nHTML report with plots: {html}")
