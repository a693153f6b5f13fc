"""The compiled, immutable Plan: the one object a request reads.

A reload builds a new Plan beside the old one and swaps one reference; a request keeps the
Plan it started with. Everything a request needs is precomputed here (bucket tables, header
bytes), so the request path parses nothing and allocates no per-experiment tables.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from modelgate.config import (
    ChaosRule,
    CompareSpec,
    ExperimentSpec,
    FeedbackSpec,
    GatewayConfig,
    LimitsSpec,
    RouteSpec,
    UpstreamSpec,
    route_experiments,
)
from modelgate.core import Layer, VariantTable
from modelgate.feedback_tokens import FeedbackKeys, feedback_keys
from modelgate.targeting import Targeting, compile_targeting
from modelgate.unit import UnitSource, parse_unit_sources

__all__ = [
    "CompiledExperiment",
    "CompiledRoute",
    "Plan",
    "UpstreamTarget",
    "VariantTarget",
    "compile_plan",
    "config_digest",
]


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """Where one named upstream lives, and the bytes the proxy sends it for every request."""

    name: str
    host: str
    port: int
    host_header: bytes  # b"host: 127.0.0.1:9001\r\n"
    base_path: bytes  # prepended to the forwarded path; b"" for none
    timeout_s: float
    connect_timeout_s: float
    max_idle: int
    max_connections: int
    queue_timeout_s: float = 5.0
    retry_non_idempotent: bool = False
    max_header_bytes: int = 64 * 1024  # of a response head, and of its trailers

    @property
    def pool_key(self) -> tuple[str, int, float, int, int]:
        """Two targets with the same key can share one connection pool across a reload."""
        return (self.host, self.port, self.connect_timeout_s, self.max_idle, self.max_connections)


@dataclass(frozen=True, slots=True)
class VariantTarget:
    name: str
    upstream: str
    assignment: bytes  # b"ranker=control", the x-modelgate-variant value
    routes_traffic: bool = True  # False: a flag variant that leaves the route's upstream
    header_line: bytes = b""  # b"x-modelgate-variant: ranker=control\r\n"
    record: tuple[str, str, bool] = ("", "", True)  # (experiment, variant, enrolled)


@dataclass(frozen=True, slots=True)
class CompiledExperiment:
    name: str
    salt: str
    table: VariantTable
    variants: tuple[VariantTarget, ...]
    by_name: dict[str, int]
    targeting: Targeting


@dataclass(frozen=True, slots=True)
class CompiledShadow:
    """One shadow of a route, with its sampling threshold in basis points."""

    name: str  # unique within the route; the upstream's name unless set
    upstream: str
    threshold: int  # a request is teed when its sample bucket < threshold (0..10000)
    sample_by: str  # "unit" or "request"
    salt: str  # for sample_by unit: bucket(salt, unit), so the same users are teed
    methods: frozenset[bytes] | None
    timeout_s: float
    max_inflight: int
    compare: CompareSpec


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    index: int
    name: str
    path_prefix: bytes
    separated: bool  # the prefix matches only at a segment boundary
    methods: frozenset[bytes] | None
    match_headers: tuple[tuple[bytes, bytes], ...]
    unit_sources: tuple[UnitSource, ...]
    unit_fallback: str
    needs_body_for_unit: bool
    upstream: str | None
    experiment: CompiledExperiment | None  # the first of `experiments`
    route_header: bytes  # b"x-modelgate-route: predict\r\n"
    spec: RouteSpec
    shadows: tuple[CompiledShadow, ...] = ()
    chaos: tuple[ChaosRule, ...] = ()
    experiments: tuple[CompiledExperiment, ...] = ()

    def matches(
        self, method: bytes, path: bytes, headers: Sequence[tuple[bytes, bytes, bytes]]
    ) -> bool:
        prefix = self.path_prefix
        if not path.startswith(prefix):
            return False
        if self.separated and len(path) > len(prefix) and path[len(prefix)] != 0x2F:
            return False  # /predictions is not under /predict
        if self.methods is not None and method not in self.methods:
            return False
        for wanted_name, wanted_value in self.match_headers:
            for lname, _, value in headers:
                if lname == wanted_name and value == wanted_value:
                    break
            else:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Plan:
    version: int
    digest: str
    config: GatewayConfig
    routes: tuple[CompiledRoute, ...]
    upstreams: dict[str, UpstreamTarget]
    force_header: bytes | None
    limits: LimitsSpec
    experiments: dict[str, CompiledExperiment] = field(default_factory=dict)
    feedback_path: bytes | None = None  # None: feedback disabled
    exposures: bool = True
    remember_requests: bool = True  # keep recent request ids for feedback by request id
    # Who may post feedback (secrets: never shown); compile_plan reads them from the config.
    feedback_keys: FeedbackKeys = field(default_factory=lambda: feedback_keys(FeedbackSpec()))

    def match(
        self, method: bytes, path: bytes, headers: Sequence[tuple[bytes, bytes, bytes]]
    ) -> CompiledRoute | None:
        """First matching route wins, in config order."""
        for route in self.routes:
            if route.matches(method, path, headers):
                return route
        return None


def config_digest(config: GatewayConfig) -> str:
    """A content hash of the validated config: equal configs give equal digests."""
    canonical = orjson.dumps(config.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:16]


def _upstream_target(name: str, spec: UpstreamSpec, limits: LimitsSpec) -> UpstreamTarget:
    host = spec.host
    authority = f"[{host}]" if ":" in host else host
    if spec.port != 80:
        authority = f"{authority}:{spec.port}"
    return UpstreamTarget(
        name=name,
        host=host,
        port=spec.port,
        host_header=b"host: " + authority.encode("idna") + b"\r\n",
        base_path=spec.base_path.encode("utf-8"),
        timeout_s=spec.timeout_ms / 1000.0,
        connect_timeout_s=spec.connect_timeout_ms / 1000.0,
        max_idle=spec.max_idle,
        max_connections=spec.max_connections,
        queue_timeout_s=spec.queue_timeout_ms / 1000.0,
        retry_non_idempotent=spec.retry_non_idempotent,
        max_header_bytes=limits.max_upstream_header_bytes,
    )


def _compile_shadows(
    spec: RouteSpec, upstreams: dict[str, UpstreamTarget]
) -> tuple[CompiledShadow, ...]:
    shadows = []
    for shadow in spec.shadows:
        name = shadow.name or shadow.upstream
        target = upstreams[shadow.upstream]
        shadows.append(
            CompiledShadow(
                name=name,
                upstream=shadow.upstream,
                threshold=int(round(shadow.sample * 10000)),
                sample_by=shadow.sample_by,
                salt=f"shadow:{spec.name}:{name}",
                methods=frozenset(m.encode("ascii") for m in shadow.methods)
                if shadow.methods is not None
                else None,
                timeout_s=(shadow.timeout_ms / 1000.0)
                if shadow.timeout_ms is not None
                else target.timeout_s,
                max_inflight=shadow.max_inflight,
                compare=shadow.compare,
            )
        )
    return tuple(shadows)


def _compile_experiment(
    route: RouteSpec, exp: ExperimentSpec, layers: dict[str, Layer]
) -> CompiledExperiment:
    variants = tuple(
        VariantTarget(
            name=v.name,
            upstream=v.upstream if v.upstream is not None else str(route.upstream),
            assignment=f"{exp.name}={v.name}".encode(),
            routes_traffic=v.upstream is not None,
            header_line=f"x-modelgate-variant: {exp.name}={v.name}\r\n".encode(),
            record=(exp.name, v.name, True),
        )
        for v in exp.variants
    )
    targeting = compile_targeting(exp, layers)
    return CompiledExperiment(
        name=exp.name,
        salt=exp.effective_salt,
        table=targeting.table,
        variants=variants,
        by_name={v.name: i for i, v in enumerate(exp.variants)},
        targeting=targeting,
    )


def _compile_layers(config: GatewayConfig) -> dict[str, Layer]:
    """One bucket space per layer name, split between its experiments in config order."""
    allocations: dict[str, list[tuple[str, float]]] = {}
    for route in config.routes:
        for _, exp in route_experiments(route):
            if exp.layer is not None and exp.layer_share is not None:
                allocations.setdefault(exp.layer, []).append((exp.name, exp.layer_share))
    return {name: Layer(name, shares) for name, shares in allocations.items()}


def _compile_route(
    index: int,
    spec: RouteSpec,
    upstreams: dict[str, UpstreamTarget],
    layers: dict[str, Layer],
) -> CompiledRoute:
    experiments = tuple(
        _compile_experiment(spec, exp, layers) for _, exp in route_experiments(spec)
    )
    experiment = experiments[0] if experiments else None
    sources = parse_unit_sources(spec.unit)
    methods = (
        frozenset(m.encode("ascii") for m in spec.match.methods)
        if spec.match.methods is not None
        else None
    )
    return CompiledRoute(
        index=index,
        name=spec.name,
        path_prefix=(spec.match.path_separated_prefix or spec.match.path_prefix).encode("utf-8"),
        separated=spec.match.path_separated_prefix is not None,
        methods=methods,
        match_headers=tuple(
            (name.encode("latin-1"), value.encode("latin-1"))
            for name, value in spec.match.headers.items()
        ),
        unit_sources=sources,
        unit_fallback=spec.unit_fallback,
        needs_body_for_unit=any(s.kind == "json" for s in sources)
        and (experiment is not None or any(sh.sample_by == "unit" for sh in spec.shadows)),
        upstream=spec.upstream,
        experiment=experiment,
        route_header=b"x-modelgate-route: " + spec.name.encode("ascii") + b"\r\n",
        spec=spec,
        shadows=_compile_shadows(spec, upstreams),
        chaos=tuple(spec.chaos),
        experiments=experiments,
    )


def compile_plan(config: GatewayConfig, version: int = 1) -> Plan:
    """Builds every table a request will read; the config is already validated."""
    upstreams = {
        name: _upstream_target(name, spec, config.limits) for name, spec in config.upstreams.items()
    }
    layers = _compile_layers(config)
    routes = tuple(
        _compile_route(i, spec, upstreams, layers) for i, spec in enumerate(config.routes)
    )
    experiments = {e.name: e for r in routes for e in r.experiments}
    return Plan(
        version=version,
        digest=config_digest(config),
        config=config,
        routes=routes,
        upstreams=upstreams,
        force_header=config.force.header.encode("latin-1") if config.force.enabled else None,
        limits=config.limits,
        experiments=experiments,
        feedback_path=config.feedback.path.encode("utf-8") if config.feedback.enabled else None,
        exposures=config.exposures.enabled,
        remember_requests=config.feedback.enabled and config.feedback.max_request_ids > 0,
        feedback_keys=feedback_keys(config.feedback),
    )
