"""Who gets which variant, beyond the plain weights: kill switch, overrides, coverage,
segments and layers, evaluated in that order. Compiled once per Plan; read per request.

- layer: the unit is in this experiment only if the layer's bucket space puts it here
  (`Layer(layer, shares).index_for(unit)`); otherwise the experiment does not apply.
- killed: every unit gets the default variant (not enrolled: left out of the analysis).
- overrides: a unit id listed gets its variant (QA and beta testers; not enrolled).
- coverage: a unit is enrolled when `bucket(salt + ":coverage", unit) < coverage * 10000`;
  a separate hash, so raising coverage adds units and never moves an enrolled one.
- segments: the first whose conditions all hold assigns with its own weights, same salt.
- otherwise the experiment's weights: `VariantTable.assign(salt, unit)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from modelgate.config import ConditionSpec, ExperimentSpec
from modelgate.core import Layer, VariantTable, bucket

__all__ = [
    "Assignment",
    "CompiledCondition",
    "CompiledSegment",
    "Lookup",
    "Targeting",
    "compile_targeting",
    "parse_semver",
]

Lookup = Callable[[str, str], "str | None"]  # (kind, name) -> the request's value


def parse_semver(text: str) -> tuple[int, int, int] | None:
    """`1.2.3`, `v2.0` or `3` -> a comparable triple; pre-release and build tags ignored."""
    found = re.match(r"^\s*v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", text)
    if found is None:
        return None
    major, minor, patch = (int(g) if g is not None else 0 for g in found.groups())
    return (major, minor, patch)


_SEMVER_OPS: dict[str, Callable[[tuple[int, int, int], tuple[int, int, int]], bool]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}


@dataclass(frozen=True, slots=True)
class CompiledCondition:
    kind: str  # header, cookie, query
    name: str
    test: Callable[[str], bool]

    def holds(self, lookup: Lookup) -> bool:
        value = lookup(self.kind, self.name)
        return value is not None and self.test(value)


def _compile_condition(spec: ConditionSpec) -> CompiledCondition:
    kind = "header" if spec.header is not None else "cookie" if spec.cookie is not None else "query"
    name = spec.header or spec.cookie or spec.query or ""
    if kind == "header":
        name = name.lower()
    test: Callable[[str], bool]
    if spec.equals is not None:
        wanted = spec.equals
        test = lambda v: v == wanted  # noqa: E731
    elif spec.in_ is not None:
        allowed = frozenset(spec.in_)
        test = lambda v: v in allowed  # noqa: E731
    elif spec.regex is not None:
        pattern = re.compile(spec.regex)
        test = lambda v: pattern.search(v) is not None  # noqa: E731
    elif spec.prefix is not None:
        prefix = spec.prefix
        test = lambda v: v.startswith(prefix)  # noqa: E731
    else:
        assert spec.semver is not None
        found = re.match(r"^\s*(==|!=|>=|<=|>|<)?\s*(.+)$", spec.semver)
        assert found is not None
        op = _SEMVER_OPS[found.group(1) or "=="]
        bound = parse_semver(found.group(2))
        assert bound is not None

        def test(value: str) -> bool:
            version = parse_semver(value)
            return version is not None and op(version, bound)

    return CompiledCondition(kind, name, test)


@dataclass(frozen=True, slots=True)
class CompiledSegment:
    name: str
    conditions: tuple[CompiledCondition, ...]
    table: VariantTable

    def matches(self, lookup: Lookup) -> bool:
        return all(condition.holds(lookup) for condition in self.conditions)


@dataclass(frozen=True, slots=True)
class Assignment:
    index: int
    enrolled: bool  # counted in the analysis (False: killed, override, outside coverage)


@dataclass(frozen=True, slots=True)
class Targeting:
    """Everything an experiment needs beyond its weights; `plain` when none of it is set."""

    salt: str
    table: VariantTable
    default: int
    killed: bool
    overrides: dict[str, int]
    coverage_threshold: int  # 10000 = everyone
    coverage_salt: str
    segments: tuple[CompiledSegment, ...]
    layer: Layer | None
    layer_index: int
    plain: bool

    def assign(self, unit: str, lookup: Lookup) -> Assignment | None:
        """The unit's variant, or None when its layer puts it outside this experiment."""
        if self.plain:
            return Assignment(self.table.assign(self.salt, unit), True)
        if self.layer is not None and self.layer.index_for(unit) != self.layer_index:
            return None
        if self.killed:
            return Assignment(self.default, False)
        override = self.overrides.get(unit)
        if override is not None:
            return Assignment(override, False)
        if (
            self.coverage_threshold < 10000
            and bucket(self.coverage_salt, unit) >= self.coverage_threshold
        ):
            return Assignment(self.default, False)
        for segment in self.segments:
            if segment.matches(lookup):
                return Assignment(segment.table.assign(self.salt, unit), True)
        return Assignment(self.table.assign(self.salt, unit), True)


def compile_targeting(spec: ExperimentSpec, layers: dict[str, Layer]) -> Targeting:
    names = [v.name for v in spec.variants]
    index = {name: i for i, name in enumerate(names)}
    segments = tuple(
        CompiledSegment(
            name=segment.name,
            conditions=tuple(_compile_condition(c) for c in segment.when),
            table=VariantTable([segment.weights.get(name, 0.0) for name in names]),
        )
        for segment in spec.segments
    )
    layer = layers.get(spec.layer) if spec.layer is not None else None
    layer_index = layer.experiments.index(spec.name) if layer is not None else -1
    coverage_threshold = int(round(spec.coverage * 10000))
    salt = spec.effective_salt
    return Targeting(
        salt=salt,
        table=VariantTable([v.weight for v in spec.variants]),
        default=index[spec.default] if spec.default is not None else 0,
        killed=spec.killed,
        overrides={unit: index[variant] for unit, variant in spec.overrides.items()},
        coverage_threshold=coverage_threshold,
        coverage_salt=f"{salt}:coverage",
        segments=segments,
        layer=layer,
        layer_index=layer_index,
        plain=not (
            spec.killed
            or spec.overrides
            or segments
            or layer is not None
            or coverage_threshold < 10000
        ),
    )
