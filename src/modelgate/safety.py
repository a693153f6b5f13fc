"""The reload safety report: per experiment, which share of units a new config moves to
another variant, counted exactly over the 10,000 buckets (re-salted experiments: expected).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from modelgate.config import RESTART_ONLY_KEYS, ExperimentSpec, GatewayConfig
from modelgate.core import BUCKETS, VariantTable

__all__ = ["ExperimentChange", "SafetyReport", "safety_report"]

Status = Literal["added", "removed", "unchanged", "reweighted", "re-randomized"]


@dataclass(frozen=True)
class ExperimentChange:
    """What happens to one experiment's units when the new config replaces the old one."""

    experiment: str
    status: Status
    share_changed: float | None = None  # fraction of units whose variant changes
    exact: bool = True  # False: an expectation (the salt changed), not a count
    buckets_changed: int | None = None
    transitions: dict[str, int] = field(default_factory=dict)  # "a->b": buckets
    upstream_changes: dict[str, list[str]] = field(default_factory=dict)  # variant: [old, new]
    note: str = ""

    def describe(self) -> str:
        if self.status == "added":
            return f"{self.experiment}: new experiment"
        if self.status == "removed":
            return f"{self.experiment}: removed experiment"
        assert self.share_changed is not None
        text = f"{self.experiment}: {self.note}"
        for variant, (old, new) in self.upstream_changes.items():
            text += f"; variant {variant!r} moves from upstream {old!r} to {new!r}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "status": self.status,
            "share_changed": self.share_changed,
            "exact": self.exact,
            "buckets_changed": self.buckets_changed,
            "transitions": self.transitions,
            "upstream_changes": self.upstream_changes,
            "note": self.note,
        }


@dataclass(frozen=True)
class SafetyReport:
    experiments: list[ExperimentChange]
    restart_required: list[str]

    def lines(self) -> list[str]:
        out = [change.describe() for change in self.experiments]
        out += [
            f"{key}: changed; it takes effect only after a restart" for key in self.restart_required
        ]
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "experiments": [change.to_json() for change in self.experiments],
            "restart_required": self.restart_required,
        }


def _experiments(config: GatewayConfig) -> dict[str, tuple[ExperimentSpec, dict[str, str]]]:
    """Experiments by name, each with its variants' upstreams."""
    found = {}
    for route in config.routes:
        exp = route.experiment
        if exp is not None:
            upstreams = {v.name: v.upstream or str(route.upstream) for v in exp.variants}
            found[exp.name] = (exp, upstreams)
    return found


def _bucket_names(exp: ExperimentSpec) -> list[str]:
    """The variant name owning each of the 10,000 buckets."""
    table = VariantTable([v.weight for v in exp.variants])
    names = [v.name for v in exp.variants]
    return [names[table.choose(b)] for b in range(BUCKETS)]


def _compare(name: str, old: ExperimentSpec, new: ExperimentSpec) -> ExperimentChange:
    old_names, new_names = _bucket_names(old), _bucket_names(new)
    if old.effective_salt != new.effective_salt:
        # A new salt hashes every unit afresh: old and new variants are independent draws,
        # so a unit keeps its variant name with probability sum_v p_old(v) * p_new(v).
        p_old, p_new = Counter(old_names), Counter(new_names)
        same = sum(p_old[v] * p_new[v] for v in p_old) / BUCKETS**2
        share = 1.0 - same
        note = (
            f"re-randomized (salt {old.effective_salt!r} -> {new.effective_salt!r}): about "
            f"{share:.2%} of units change variant (expected under independent assignment)"
        )
        return ExperimentChange(name, "re-randomized", share, exact=False, note=note)
    transitions: Counter[str] = Counter(
        f"{a}->{b}" for a, b in zip(old_names, new_names, strict=True) if a != b
    )
    moved = sum(transitions.values())
    share = moved / BUCKETS
    if moved:
        moves = ", ".join(f"{k} {n}" for k, n in sorted(transitions.items()))
        note = f"{share:.2%} of units change variant ({moved} of {BUCKETS} buckets: {moves})"
    else:
        note = "no unit changes variant"
    status: Status = "reweighted" if moved or old.variants != new.variants else "unchanged"
    return ExperimentChange(
        name, status, share, buckets_changed=moved, transitions=dict(transitions), note=note
    )


def safety_report(old: GatewayConfig, new: GatewayConfig) -> SafetyReport:
    """What replacing `old` by `new` does to the units of every experiment."""
    before, after = _experiments(old), _experiments(new)
    changes: list[ExperimentChange] = []
    for name, (new_exp, new_upstreams) in after.items():
        if name not in before:
            changes.append(ExperimentChange(name, "added"))
            continue
        old_exp, old_upstreams = before[name]
        change = _compare(name, old_exp, new_exp)
        moved_upstreams = {
            v: [old_upstreams[v], up]
            for v, up in new_upstreams.items()
            if v in old_upstreams and old_upstreams[v] != up
        }
        if moved_upstreams:
            change = ExperimentChange(**{**change.__dict__, "upstream_changes": moved_upstreams})
        changes.append(change)
    changes += [ExperimentChange(name, "removed") for name in before if name not in after]
    restart = [k for k in RESTART_ONLY_KEYS if getattr(old, k) != getattr(new, k)]
    return SafetyReport(changes, restart)
