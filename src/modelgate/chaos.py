"""Chaos: which faults a request gets, and the model-level faults applied to JSON answers.

Rules live in the Plan (they reload like everything else); what must survive a reload lives
here, keyed by (route, rule name): the runtime enable/disable switch, the faults in flight
(for `max_active`), the seeded random stream and the counters. The exchange asks `decide()`
once per request and applies what it gets back.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from modelgate.core import bucket
from modelgate.jsonpointer import locate, parse

if TYPE_CHECKING:
    from modelgate.config import ChaosRule, DelaySpec, ModelFaultSpec

__all__ = ["ChaosDecision", "ChaosRuntime", "RuleState", "mutate_json", "sample_delay_ms"]


@dataclass
class RuleState:
    """A rule's live state; it outlives Plans so switches and counters survive a reload."""

    rng: random.Random
    enabled: bool | None = None  # the admin API's override of the config's `enabled`
    active: int = 0
    counts: Counter[str] = field(default_factory=Counter)


@dataclass
class ChaosDecision:
    """The faults one request gets, merged from every rule that fired."""

    states: list[RuleState] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    delay_s: float = 0.0
    abort: tuple[int, bytes | None] | None = None
    reset: bool = False
    hang: bool = False
    truncate_bytes: int | None = None
    slow_bytes_per_s: int | None = None
    model: ModelFaultSpec | None = None
    rng: random.Random | None = None
    model_counts: Counter[str] | None = None  # the model rule's counts (to count skips)

    @property
    def header_value(self) -> bytes:
        return ",".join(self.names).encode("ascii")


def sample_delay_ms(spec: DelaySpec, rng: random.Random) -> float:
    """One draw from the rule's latency distribution, clipped to [0, max_ms]."""
    kind = spec.distribution
    if kind == "fixed":
        value = spec.ms or 0.0
    elif kind == "uniform":
        value = rng.uniform(spec.low_ms or 0.0, spec.high_ms or 0.0)
    elif kind == "normal":
        value = rng.gauss(spec.mean_ms or 0.0, spec.sd_ms or 0.0)
    elif kind == "lognormal":
        value = rng.lognormvariate(math.log(spec.median_ms or 1.0), spec.sigma or 0.0)
    else:  # pareto: scale * Pareto(alpha), whose minimum is scale
        value = (spec.scale_ms or 1.0) * rng.paretovariate(spec.alpha or 1.0)
    return min(max(value, 0.0), spec.max_ms)


def _parse_request_header(value: bytes) -> dict[str, str]:
    """`delay=200, abort=503, reset` -> {"delay": "200", "abort": "503", "reset": ""}."""
    wanted: dict[str, str] = {}
    for item in value.decode("latin-1").split(","):
        key, _, arg = item.strip().partition("=")
        if key:
            wanted[key.lower()] = arg.strip()
    return wanted


class ChaosRuntime:
    """Per gateway process."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, str], RuleState] = {}

    def state(self, route: str, rule: ChaosRule) -> RuleState:
        key = (route, rule.name)
        state = self.states.get(key)
        if state is None:
            seed = rule.seed if rule.seed is not None else int.from_bytes(os.urandom(8), "little")
            state = self.states[key] = RuleState(rng=random.Random(seed))
        return state

    def set_enabled(self, route: str, rule: ChaosRule, enabled: bool) -> None:
        self.state(route, rule).enabled = enabled

    def is_enabled(self, route: str, rule: ChaosRule) -> bool:
        state = self.states.get((route, rule.name))
        if state is None or state.enabled is None:
            return rule.enabled
        return state.enabled

    def decide(
        self,
        route: str,
        rules: tuple[ChaosRule, ...] | list[ChaosRule],
        variant: str,
        upstream: str,
        headers: list[tuple[bytes, bytes, bytes]],
        unit: str | None,
        requested: bytes | None,
    ) -> ChaosDecision | None:
        """The faults for one request, or None. `requested` is the x-modelgate-chaos
        header when the config lets requests ask for faults."""
        decision: ChaosDecision | None = None
        wanted = _parse_request_header(requested) if requested else None
        for rule in rules:
            if not self.is_enabled(route, rule) or not _in_scope(rule, variant, upstream, headers):
                continue
            state = self.state(route, rule)
            by_header = wanted is not None and rule.header_control
            if not by_header and not self._fires(route, rule, state, unit):
                continue
            if rule.max_active is not None and state.active >= rule.max_active:
                state.counts["skipped_max_active"] += 1
                continue
            if decision is None:
                decision = ChaosDecision()
            applied = (
                _apply_requested(decision, rule, state, wanted or {})
                if by_header
                else _apply_rule(decision, rule, state)
            )
            if applied:
                state.active += 1
                decision.states.append(state)
                decision.names.append(rule.name)
        if decision is None or not decision.names:
            return None
        return decision

    @staticmethod
    def _fires(route: str, rule: ChaosRule, state: RuleState, unit: str | None) -> bool:
        if rule.probability >= 1.0:
            return True
        if rule.probability <= 0.0:
            return False
        if rule.by == "unit" and unit is not None:
            return bucket(f"chaos:{route}:{rule.name}", unit) < rule.probability * 10000
        return state.rng.random() < rule.probability

    @staticmethod
    def release(decision: ChaosDecision) -> None:
        for state in decision.states:
            state.active -= 1
        decision.states = []

    def snapshot(self, routes: list[tuple[str, tuple[ChaosRule, ...]]]) -> list[dict[str, Any]]:
        out = []
        for route, rules in routes:
            for rule in rules:
                state = self.states.get((route, rule.name))
                out.append(
                    {
                        "route": route,
                        "rule": rule.name,
                        "enabled": self.is_enabled(route, rule),
                        "configured_enabled": rule.enabled,
                        "probability": rule.probability,
                        "by": rule.by,
                        "active": state.active if state else 0,
                        "counts": dict(state.counts) if state else {},
                    }
                )
        return out


def _in_scope(
    rule: ChaosRule, variant: str, upstream: str, headers: list[tuple[bytes, bytes, bytes]]
) -> bool:
    if rule.variant is not None and rule.variant != variant:
        return False
    if rule.upstream is not None and rule.upstream != upstream:
        return False
    for name, value in rule.headers.items():
        lname = name.encode("latin-1")
        if not any(h == lname and v == value.encode("latin-1") for h, _, v in headers):
            return False
    return True


def _apply_rule(decision: ChaosDecision, rule: ChaosRule, state: RuleState) -> bool:
    counts = state.counts
    if rule.delay_ms is not None:
        decision.delay_s += rule.delay_ms / 1000.0
        counts["delay"] += 1
    elif rule.delay is not None:
        decision.delay_s += sample_delay_ms(rule.delay, state.rng) / 1000.0
        counts["delay"] += 1
    if decision.abort is None and not decision.reset and not decision.hang:
        if rule.abort is not None:
            body = rule.abort.body.encode("utf-8") if rule.abort.body is not None else None
            decision.abort = (rule.abort.status, body)
            counts["abort"] += 1
        elif rule.reset:
            decision.reset = True
            counts["reset"] += 1
        elif rule.hang:
            decision.hang = True
            counts["hang"] += 1
    if rule.truncate_bytes is not None and decision.truncate_bytes is None:
        decision.truncate_bytes = rule.truncate_bytes
        counts["truncate"] += 1
    if rule.slow_body_bytes_per_s is not None and decision.slow_bytes_per_s is None:
        decision.slow_bytes_per_s = rule.slow_body_bytes_per_s
        counts["slow_body"] += 1
    if rule.model is not None and decision.model is None:
        decision.model = rule.model
        decision.rng = state.rng
        decision.model_counts = counts
        counts["model"] += 1
    return True


def _apply_requested(
    decision: ChaosDecision, rule: ChaosRule, state: RuleState, wanted: dict[str, str]
) -> bool:
    """Faults a request asked for, each only if the rule allows that kind, capped by it."""
    applied = False
    counts = state.counts
    if "delay" in wanted:
        cap = rule.delay.max_ms if rule.delay is not None else rule.delay_ms
        try:
            asked = float(wanted["delay"])
        except ValueError:
            asked = -1.0
        if cap is not None and asked >= 0:
            decision.delay_s += min(asked, cap) / 1000.0
            counts["delay"] += 1
            applied = True
    if "abort" in wanted and rule.abort is not None and decision.abort is None:
        status = wanted["abort"]
        code = int(status) if status.isdigit() and 400 <= int(status) <= 599 else rule.abort.status
        decision.abort = (code, None)
        counts["abort"] += 1
        applied = True
    if "reset" in wanted and rule.reset:
        decision.reset = True
        counts["reset"] += 1
        applied = True
    if "hang" in wanted and rule.hang:
        decision.hang = True
        counts["hang"] += 1
        applied = True
    return applied


# --- model faults -------------------------------------------------------------------------


def _resolve(document: Any, pointer: str) -> tuple[Any, str | int] | None:
    """The container and key a JSON pointer names, or None when absent."""
    return locate(document, parse(pointer))


def _numbers_at(document: Any, pointer: str) -> list[tuple[Any, str | int]]:
    """Number slots at a pointer: the number itself, or each number of a list there."""
    found = _resolve(document, pointer)
    if found is None:
        return []
    container, key = found
    value = container[key]
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [(container, key)]
    if isinstance(value, list):
        return [(value, i) for i, v in enumerate(value) if isinstance(v, (int, float))]
    return []


def mutate_json(body: bytes, spec: ModelFaultSpec, rng: random.Random) -> bytes | None:
    """The degraded answer, or None when the body is not JSON (then it passes untouched)."""
    if spec.stale is not None:
        return orjson.dumps(spec.stale)
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if spec.noise is not None:
        for pointer in spec.noise.pointers:
            for container, key in _numbers_at(document, pointer):
                container[key] = container[key] + rng.gauss(0.0, spec.noise.sd)
    if spec.bias is not None:
        for pointer in spec.bias.pointers:
            for container, key in _numbers_at(document, pointer):
                container[key] = container[key] + spec.bias.shift
    if spec.flip is not None:
        found = _resolve(document, spec.flip.pointer)
        if found is not None and rng.random() < spec.flip.probability:
            container, key = found
            others = [label for label in spec.flip.labels if label != container[key]]
            if others:
                container[key] = rng.choice(others)
    if spec.replace is not None:
        replacement = math.nan if spec.replace.value == "nan" else None
        for pointer in spec.replace.pointers:
            found = _resolve(document, pointer)
            if found is not None:
                container, key = found
                container[key] = replacement
    if spec.replace is not None and spec.replace.value == "nan":
        # orjson writes NaN as null; the fault is meant to put a literal NaN on the wire.
        return json.dumps(document, separators=(",", ":")).encode("utf-8")
    return orjson.dumps(document)
