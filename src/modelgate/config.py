"""The YAML config: its schema, its defaults, and validation that names every error's key path.

`load_config(path)` and `parse_config(text)` return a `GatewayConfig` or raise `ConfigError`
carrying every problem as `routes[0].experiment.variants[1].upstream: unknown upstream 'x'`.
Nothing here touches the network or the running gateway.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from modelgate.config_document import DocumentError, check_document, load_yaml, path_key
from modelgate.jsonpointer import check as check_pointer

__all__ = [
    "METRIC_KINDS",
    "AnalysisMetricSpec",
    "AnalysisSpec",
    "CanaryCheck",
    "CanarySpec",
    "ChaosRule",
    "CompareSpec",
    "ConfigError",
    "ExperimentSpec",
    "ForceSpec",
    "GatewayConfig",
    "FeedbackSpec",
    "LimitsSpec",
    "MetricSpec",
    "RESTART_ONLY_KEYS",
    "RouteSpec",
    "ShadowSpec",
    "UpstreamSpec",
    "VariantSpec",
    "load_config",
    "parse_config",
    "parse_hostport",
]

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"
_UNIT_SOURCE = re.compile(r"^(header|cookie|query|json):(.+)$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

Name = Annotated[str, Field(pattern=_NAME, max_length=128)]
_METRIC_NAME = r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$"  # as feedback metrics are named


class ConfigError(Exception):
    """Every problem found in a config, each as `key.path: message`."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class _Strict(BaseModel):
    # Unknown keys are errors: a typo ("wieght") must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


def _absolute_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must start with '/', got {value!r}")
    return value


def _lowercase_header_names(value: dict[str, str]) -> dict[str, str]:
    """Header matches are exact on values, case-insensitive on names (stored lowercase)."""
    for name in value:
        if not _HEADER_NAME.match(name):
            raise ValueError(f"not a header name: {name!r}")
    return {name.lower(): v for name, v in value.items()}


# A Host header's value: a DNS name or IPv4 address, or a bracketed IPv6 one, maybe a port.
_ADMIN_HOST = re.compile(
    r"([A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?"
)


def parse_hostport(value: str) -> tuple[str, int]:
    """`127.0.0.1:8080`, `[::1]:8080` or `localhost:8080` -> (host, port)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be an integer in [0, 65535], got {port_text!r}")
    return host, int(port_text)


class LimitsSpec(_Strict):
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=0)
    max_header_bytes: int = Field(64 * 1024, ge=1024)
    max_connections: int = Field(10_000, ge=1)
    client_header_timeout_ms: int = Field(10_000, ge=1)
    client_body_timeout_ms: int = Field(60_000, ge=1)
    keepalive_timeout_ms: int = Field(75_000, ge=1)
    drain_timeout_ms: int = Field(30_000, ge=0)
    # Shadows need whole bodies: a request or primary response larger than this is not teed.
    shadow_body_max_bytes: int = Field(1024 * 1024, ge=0)
    # After the grace, a request body must arrive at this average rate (0: no minimum), so
    # a client trickling bytes cannot hold a request, nor the upstream it streams to.
    client_body_min_rate_bytes_per_s: int = Field(1024, ge=0)
    client_body_min_rate_grace_ms: int = Field(10_000, ge=0)
    # A client that leaves the gateway's answers unread this long is disconnected.
    client_send_timeout_ms: int = Field(60_000, ge=1)
    # Bodies up to this size are read whole before an upstream connection is taken (as
    # nginx's proxy_request_buffering does), so slow senders never pin the upstream pools.
    request_buffer_bytes: int = Field(256 * 1024, ge=0)
    # An upstream response head (or its trailers) beyond this is a broken upstream: 502.
    max_upstream_header_bytes: int = Field(64 * 1024, ge=1024)
    # With --workers: how long the parent waits for a worker's answer (a reload's prepare or
    # commit, a status or metrics query) before it counts the worker as not responding.
    worker_reply_timeout_ms: int = Field(10_000, ge=100, le=600_000)


class UpstreamSpec(_Strict):
    url: str
    timeout_ms: int = Field(30_000, ge=1)
    connect_timeout_ms: int = Field(2_000, ge=1)
    max_idle: int = Field(64, ge=0)
    max_connections: int = Field(1024, ge=1)
    # A request waiting for a connection (the pool at max_connections) gets 503 after this.
    queue_timeout_ms: int = Field(5_000, ge=1)
    # A request is sent again on a fresh connection when a reused one dies before any answer
    # only if its method is idempotent or it carries an Idempotency-Key, unless this says
    # the upstream's answers have no side effects (as nginx's proxy_next_upstream does).
    retry_non_idempotent: bool = False

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme != "http":
            raise ValueError(f"only http:// upstreams are supported, got {value!r}")
        if not parts.hostname:
            raise ValueError(f"no host in {value!r}")
        try:
            parts.hostname.encode("idna")  # as the Plan writes the Host header
        except UnicodeError as exc:
            raise ValueError(f"bad host in {value!r} (an empty or too long label)") from exc
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise ValueError(f"bad port in {value!r}") from exc
        if parts.query or parts.fragment:
            raise ValueError("an upstream url takes no query or fragment")
        return value

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80

    @property
    def base_path(self) -> str:
        """A path prefix the gateway prepends to every forwarded path (`/v1` in `.../v1`)."""
        return urlsplit(self.url).path.rstrip("/")


class MatchSpec(_Strict):
    """Paths are matched after normalization (dot segments removed, %-encoded unreserved
    characters decoded). `path_prefix` is a plain byte prefix (`/predict` also matches
    `/predictions`); `path_separated_prefix` matches the prefix only at a segment boundary
    (`/predict`, `/predict/...`, `/predict?...`), as Envoy's key of that name does."""

    path_prefix: str = "/"
    path_separated_prefix: str | None = None
    methods: list[str] | None = None
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("path_prefix")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return _absolute_path(value)

    @field_validator("path_separated_prefix")
    @classmethod
    def _separated(cls, value: str | None) -> str | None:
        if value is None:
            return None
        _absolute_path(value)
        if value.endswith("/"):
            raise ValueError(f"must not end with '/' (it matches at '/' itself), got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_prefix(self) -> MatchSpec:
        if self.path_separated_prefix is not None and "path_prefix" in self.model_fields_set:
            raise ValueError("give path_prefix or path_separated_prefix, not both")
        return self

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("an empty list matches nothing; omit the key to match every method")
        upper = [m.upper() for m in value]
        for method in upper:
            if not _HEADER_NAME.match(method):
                raise ValueError(f"not an HTTP method: {method!r}")
        return upper

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        return _lowercase_header_names(value)


class VariantSpec(_Strict):
    name: Name
    upstream: str | None = None
    weight: float

    @field_validator("weight")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"must be a finite number >= 0, got {value!r}")
        return value


_LATENCY_METRIC = re.compile(r"^latency_p(\d+(\.\d+)?)_ms$")  # latency_p95_ms, p99.9


class CanaryCheck(_Strict):
    """One guard of a canary step, candidate against baseline over the step's window.

    System metrics (`error_rate`, `latency_pNN_ms`) take one or more limits: `max_increase`
    (absolute), `max_ratio` (relative to the baseline), `max_value`. Any other name is a
    feedback metric, judged for non-inferiority: not worse than the baseline by more than
    `margin` (alias `min_effect`, in the metric's units) in the direction `higher_is_better`.
    """

    metric: str
    max_increase: float | None = Field(None, ge=0, allow_inf_nan=False)
    max_ratio: float | None = Field(None, gt=0, allow_inf_nan=False)
    max_value: float | None = Field(None, ge=0, allow_inf_nan=False)
    margin: float | None = Field(
        None, ge=0, allow_inf_nan=False, validation_alias=AliasChoices("margin", "min_effect")
    )
    higher_is_better: bool = True

    @property
    def is_system(self) -> bool:
        return self.metric == "error_rate" or _LATENCY_METRIC.match(self.metric) is not None

    @property
    def latency_quantile(self) -> float | None:
        """The quantile a `latency_pNN_ms` check judges (0.99 for p99), else None."""
        found = _LATENCY_METRIC.match(self.metric)
        return float(found.group(1)) / 100.0 if found else None

    @model_validator(mode="after")
    def _limits(self) -> CanaryCheck:
        limits = [
            k for k in ("max_increase", "max_ratio", "max_value") if getattr(self, k) is not None
        ]
        if self.is_system:
            if not limits:
                raise ValueError(
                    f"{self.metric}: give at least one limit (max_increase, max_ratio, max_value)"
                )
            if self.margin is not None or not self.higher_is_better:
                raise ValueError(
                    f"{self.metric}: margin and higher_is_better are for feedback metrics; "
                    "system metrics take max_increase, max_ratio, max_value"
                )
            quantile = _LATENCY_METRIC.match(self.metric)
            if quantile is not None and not 0 < float(quantile.group(1)) < 100:
                raise ValueError(f"{self.metric}: the quantile must be in (0, 100)")
        else:
            if not re.match(_METRIC_NAME, self.metric):
                raise ValueError(
                    f"metric must be error_rate, latency_pNN_ms or a feedback metric's name, "
                    f"got {self.metric!r}"
                )
            if limits:
                raise ValueError(
                    f"{self.metric}: a feedback metric is judged by margin (non-inferiority), "
                    f"not {', '.join(limits)}"
                )
            if self.margin is None:
                raise ValueError(
                    f"{self.metric}: margin is required for a feedback metric (how much worse "
                    "than the baseline the candidate may be, in the metric's units)"
                )
        return self


class CanarySpec(_Strict):
    """A canary release of one experiment (see modelgate.release.canary for what each key does)."""

    baseline: str
    candidate: str
    steps: list[float] = Field(min_length=1)  # the candidate's weight at each step, 0..100
    interval_s: float = Field(60.0, gt=0, allow_inf_nan=False)
    min_samples: int = Field(200, ge=1)  # per arm, in the step's window
    max_wait_s: float | None = Field(None, gt=0, allow_inf_nan=False)  # 10 x interval_s
    failure_limit: int = Field(1, ge=1)  # consecutive failed evaluations before rollback
    # The canary's false-rollback rate: `source: local` splits it over the checks (each a
    # one-sided test over units, read at every look); `prometheus` uses it for each check.
    alpha: float = Field(0.05, gt=0, lt=0.5)
    # Where the confidence sequences of a local canary are tightest, in units (arms
    # together): about the number of users a step sees (GrowthBook's tuning parameter).
    sequential_tuning: float = Field(1000.0, gt=0, allow_inf_nan=False)
    srm_threshold: float = Field(0.001, gt=0, lt=1)
    on_inconclusive: Literal["hold", "rollback", "promote"] = "hold"
    source: Literal["local", "prometheus"] = "local"
    prometheus_url: str | None = None
    checks: list[CanaryCheck] | None = None  # None: error rate and p99 latency

    @property
    def wait_limit_s(self) -> float:
        return self.max_wait_s if self.max_wait_s is not None else 10.0 * self.interval_s

    @field_validator("prometheus_url")
    @classmethod
    def _prometheus_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"expected http(s)://host:port of a Prometheus server, got {value!r}"
                )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> CanarySpec:
        for before, after in zip(self.steps, self.steps[1:], strict=False):
            if after <= before:
                raise ValueError(f"steps must increase, got {self.steps}")
        if self.max_wait_s is not None and self.max_wait_s < self.interval_s:
            raise ValueError(
                f"max_wait_s ({self.max_wait_s:g}) must be >= interval_s ({self.interval_s:g})"
            )
        if self.baseline == self.candidate:
            raise ValueError(f"baseline and candidate are the same variant {self.baseline!r}")
        return self


class ConditionSpec(_Strict):
    """One test on the request: a source (`header`, `cookie` or `query`) and one operator."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    header: str | None = None
    cookie: str | None = None
    query: str | None = None
    equals: str | None = None
    in_: list[str] | None = Field(None, alias="in")
    regex: str | None = None
    prefix: str | None = None
    semver: str | None = None  # ">=2.3.0", "<3", "==1.2.3", "!=1.0.0"

    @model_validator(mode="after")
    def _one_source_one_operator(self) -> ConditionSpec:
        sources = [k for k in ("header", "cookie", "query") if getattr(self, k) is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one of header, cookie, query")
        operators = [
            k
            for k in ("equals", "in_", "regex", "prefix", "semver")
            if getattr(self, k) is not None
        ]
        if len(operators) != 1:
            raise ValueError("give exactly one of equals, in, regex, prefix, semver")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"bad regex {self.regex!r}: {exc}") from exc
        if self.semver is not None and not _SEMVER_SPEC.match(self.semver.strip()):
            raise ValueError(
                f"semver must look like '>=1.2.3' (operators ==, !=, >=, <=, >, <), "
                f"got {self.semver!r}"
            )
        return self


_SEMVER_SPEC = re.compile(r"^(==|!=|>=|<=|>|<)?\s*v?\d+(\.\d+){0,2}$")


class SegmentSpec(_Strict):
    """Requests matching every condition get these weights instead of the default ones."""

    name: Name
    when: list[ConditionSpec] = Field(min_length=1)
    weights: dict[str, float] = Field(min_length=1)


METRIC_KINDS = ("mean", "proportion", "ratio")


class AnalysisMetricSpec(_Strict):
    """How one feedback metric is analysed over units (issue 13). `kind`: `mean` (the unit's
    sum, e.g. revenue per user), `proportion` (the share of units with any value 1) or `ratio`
    (sum of the metric over sum of `denominator` across units: `exposures` or another
    metric). Unset: `mean` with a covariate, else `proportion` when every value seen is 0 or
    1, else `mean`. `covariate`: a metric posted per unit before exposure, for CUPED."""

    kind: Literal["mean", "proportion", "ratio"] | None = None
    denominator: Annotated[str, Field(pattern=_METRIC_NAME)] | None = None
    covariate: Annotated[str, Field(pattern=_METRIC_NAME)] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> AnalysisMetricSpec:
        if self.kind == "ratio" and self.denominator is None:
            raise ValueError("a ratio needs a denominator (`exposures` or another metric)")
        if self.kind != "ratio" and self.denominator is not None:
            raise ValueError("denominator is for kind ratio only")
        if self.covariate is not None and self.kind in ("ratio", "proportion"):
            raise ValueError(
                f"a covariate (CUPED) adjusts a mean: not available for kind {self.kind}"
            )
        return self


class AnalysisSpec(_Strict):
    """How `GET /experiments/{name}` and `modelgate analyze` judge the experiment: the test
    level, the power wanted, per metric the minimum detectable effect (an absolute
    difference of means, or of rates for 0/1 metrics) to size the experiment for, each
    metric's kind, and fixed-horizon or always-valid (sequential) intervals."""

    alpha: float = Field(0.05, gt=0, lt=1)
    power: float = Field(0.8, gt=0, lt=1)
    mde: dict[
        Annotated[str, Field(pattern=_METRIC_NAME)],
        Annotated[float, Field(gt=0, allow_inf_nan=False)],
    ] = Field(default_factory=dict)
    metrics: dict[Annotated[str, Field(pattern=_METRIC_NAME)], AnalysisMetricSpec] = Field(
        default_factory=dict
    )
    # Confidence sequences (valid at every look) instead of t intervals read once.
    sequential: bool = False
    # The number of units (both arms) where the confidence sequence is tightest (gbstats').
    sequential_tuning: float = Field(5000.0, gt=0, allow_inf_nan=False)


class ExperimentSpec(_Strict):
    name: Name
    salt: str | None = None
    variants: list[VariantSpec] = Field(min_length=1)
    canary: CanarySpec | None = None
    default: str | None = None  # the variant for killed, unenrolled units; the first if unset
    overrides: dict[str, str] = Field(default_factory=dict)  # unit id -> variant
    segments: list[SegmentSpec] = Field(default_factory=list)
    coverage: float = Field(1.0, ge=0, le=1)
    killed: bool = False
    layer: str | None = Field(None, pattern=_NAME, max_length=128)
    layer_share: float | None = Field(None, gt=0, le=1)
    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)

    @property
    def effective_salt(self) -> str:
        return self.salt if self.salt is not None else self.name


class CompareSpec(_Strict):
    """How a shadow's answer is compared with the primary's (see modelgate.diff).

    Every key is a list of RFC 6901 JSON pointers or a tolerance: `fields` restricts the
    comparison (default: the whole document), `ignore` skips subtrees, numbers compare within
    `abs` or `rel`, `ranked` lists compare by top-`topk` overlap (>= `min_overlap` agrees), and
    `argmax` probability vectors compare by their argmax alone.
    """

    fields: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)
    abs: float = Field(0.0, ge=0)
    rel: float = Field(0.0, ge=0)
    ranked: list[str] = Field(default_factory=list)
    topk: int = Field(5, ge=1)
    min_overlap: float = Field(1.0, ge=0, le=1)
    argmax: list[str] = Field(default_factory=list)

    @field_validator("fields", "ignore", "ranked", "argmax")
    @classmethod
    def _pointers(cls, value: list[str] | None) -> list[str] | None:
        # Checked here so a typo ("score" for "/score") fails at load, not silently at compare.
        for pointer in value or ():
            check_pointer(pointer)
        return value


class ShadowSpec(_Strict):
    """A copy of the route's traffic to another upstream; its answers are compared, never
    returned. `timeout_ms` defaults to the upstream's own; `max_inflight` bounds the copies
    outstanding at once (beyond it a copy is dropped and counted, never queued)."""

    upstream: str
    name: str | None = Field(None, pattern=_NAME, max_length=128)
    sample: float = Field(1.0, ge=0, le=1)
    sample_by: Literal["unit", "request"] = "unit"
    methods: list[str] | None = None
    timeout_ms: int | None = Field(None, ge=1)
    max_inflight: int = Field(64, ge=1)
    compare: CompareSpec = Field(default_factory=CompareSpec)

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [m.upper() for m in value]


class DelaySpec(_Strict):
    """A latency fault: fixed `ms`, or a distribution, always capped by `max_ms`.

    uniform: low_ms..high_ms; normal: mean_ms, sd_ms; lognormal: median_ms, sigma (of the
    log); pareto: scale_ms (the minimum), alpha (the tail index)."""

    distribution: Literal["fixed", "uniform", "normal", "lognormal", "pareto"] = "fixed"
    ms: float | None = Field(None, ge=0)
    low_ms: float | None = Field(None, ge=0)
    high_ms: float | None = Field(None, ge=0)
    mean_ms: float | None = Field(None, ge=0)
    sd_ms: float | None = Field(None, ge=0)
    median_ms: float | None = Field(None, gt=0)
    sigma: float | None = Field(None, ge=0)
    scale_ms: float | None = Field(None, gt=0)
    alpha: float | None = Field(None, gt=0)
    max_ms: float = Field(30_000.0, ge=0)

    @model_validator(mode="after")
    def _parameters(self) -> DelaySpec:
        needed = {
            "fixed": ("ms",),
            "uniform": ("low_ms", "high_ms"),
            "normal": ("mean_ms", "sd_ms"),
            "lognormal": ("median_ms", "sigma"),
            "pareto": ("scale_ms", "alpha"),
        }[self.distribution]
        missing = [key for key in needed if getattr(self, key) is None]
        if missing:
            raise ValueError(f"distribution {self.distribution} needs {', '.join(missing)}")
        if self.distribution == "uniform" and (self.low_ms or 0) > (self.high_ms or 0):
            raise ValueError("low_ms must be <= high_ms")
        return self


class AbortSpec(_Strict):
    status: int = Field(503, ge=400, le=599)
    body: str | None = None  # default: the gateway's JSON error


class PointerNoise(_Strict):
    pointers: list[str] = Field(min_length=1)
    sd: float = Field(gt=0)


class PointerBias(_Strict):
    pointers: list[str] = Field(min_length=1)
    shift: float


class LabelFlip(_Strict):
    pointer: str
    labels: list[str | int] = Field(min_length=2)
    probability: float = Field(1.0, ge=0, le=1)

    @field_validator("pointer")
    @classmethod
    def _pointer(cls, value: str) -> str:
        return check_pointer(value)


class PointerReplace(_Strict):
    pointers: list[str] = Field(min_length=1)
    value: Literal["nan", "null"]


class ModelFaultSpec(_Strict):
    """Degraded predictions on JSON answers. `nan` breaks strict JSON on purpose."""

    noise: PointerNoise | None = None
    bias: PointerBias | None = None
    flip: LabelFlip | None = None
    replace: PointerReplace | None = None
    stale: Any = None  # a fixed JSON document returned instead of the model's answer

    @field_validator("noise", "bias", "replace")
    @classmethod
    def _pointers(cls, value: Any) -> Any:
        for pointer in getattr(value, "pointers", None) or []:
            check_pointer(pointer)
        return value


class ChaosRule(_Strict):
    """A fault on chosen traffic. Scope: `variant`, `upstream`, `headers`; share:
    `probability` chosen `by` request (random, `seed` for repeatable runs) or unit (the same
    users every time). `max_active` caps faults in flight at once."""

    name: Name
    enabled: bool = True
    variant: str | None = None
    upstream: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    probability: float = Field(1.0, ge=0, le=1)
    by: Literal["request", "unit"] = "request"
    seed: int | None = None
    max_active: int | None = Field(None, ge=1)
    header_control: bool = False  # x-modelgate-chaos may ask for this rule's faults
    delay_ms: float | None = Field(None, ge=0)  # shorthand for delay: {ms: ...}
    delay: DelaySpec | None = None
    abort: AbortSpec | None = None
    reset: bool = False
    hang: bool = False
    truncate_bytes: int | None = Field(None, ge=0)
    slow_body_bytes_per_s: int | None = Field(None, ge=1)
    model: ModelFaultSpec | None = None

    @field_validator("headers")
    @classmethod
    def _header_names(cls, value: dict[str, str]) -> dict[str, str]:
        return _lowercase_header_names(value)

    @model_validator(mode="after")
    def _one_fault(self) -> ChaosRule:
        if self.delay_ms is not None and self.delay is not None:
            raise ValueError("give delay_ms or delay, not both")
        terminal = [k for k in ("abort", "reset", "hang") if getattr(self, k)]
        if len(terminal) > 1:
            raise ValueError(f"{' and '.join(terminal)} cannot be combined: each ends the request")
        faults = terminal + [
            k
            for k in ("delay_ms", "delay", "truncate_bytes", "slow_body_bytes_per_s", "model")
            if getattr(self, k) is not None
        ]
        if not faults:
            raise ValueError(
                "no fault: give one of delay_ms, delay, abort, reset, hang, truncate_bytes, "
                "slow_body_bytes_per_s, model"
            )
        return self


class ChaosSettings(_Strict):
    """Process-wide chaos switches."""

    response_header: bool = True  # x-modelgate-chaos: <rules> on faulted responses
    request_header: bool = False  # let x-modelgate-chaos on requests ask for faults
    header: str = "x-modelgate-chaos"


class RouteSpec(_Strict):
    name: Name
    match: MatchSpec = Field(default_factory=MatchSpec)
    unit: list[str] = Field(default_factory=list)
    unit_fallback: Literal["random", "client_ip", "reject"] = "random"
    upstream: str | None = None
    experiment: ExperimentSpec | None = None
    # More experiments on the same traffic (factorial designs, flags the model reads from
    # x-modelgate-variant); the first whose variant names an upstream picks the upstream.
    experiments: list[ExperimentSpec] = Field(default_factory=list)
    shadows: list[ShadowSpec] = Field(default_factory=list)
    chaos: list[ChaosRule] = Field(default_factory=list)

    @field_validator("unit")
    @classmethod
    def _unit_sources(cls, value: list[str]) -> list[str]:
        for source in value:
            found = _UNIT_SOURCE.match(source)
            if not found:
                raise ValueError(
                    f"unit source {source!r} must be header:NAME, cookie:NAME, query:NAME "
                    "or json:NAME"
                )
            if found.group(1) == "header" and not _HEADER_NAME.match(found.group(2)):
                raise ValueError(f"not a header name in unit source {source!r}")
        return value


class ForceSpec(_Strict):
    """QA override of the assignment by a request header; off unless enabled."""

    enabled: bool = False
    header: str = "x-modelgate-force"

    @field_validator("header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not _HEADER_NAME.match(value):
            raise ValueError(f"not a header name: {value!r}")
        return value.lower()


# Settings a running gateway cannot change: its sockets and its processes. A reload that
# changes one is refused whole, so a config is never half applied.
RESTART_ONLY_KEYS = ("listen", "admin", "admin_token", "admin_token_file", "admin_hosts", "workers")


class MetricSpec(_Strict):
    """A declared feedback metric (the key is its name): values outside [min, max] are
    refused, so one bad post cannot drag a mean; issue 13 adds its kind here."""

    min: float | None = Field(None, allow_inf_nan=False)
    max: float | None = Field(None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _ordered(self) -> MetricSpec:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min:g}) is above max ({self.max:g})")
        return self


_SECRET = re.compile(r"[!-~]{16,512}")


def _secret_text(value: str, what: str) -> str:
    if not _SECRET.fullmatch(value):
        raise ValueError(
            f"{what} must be 16 to 512 visible ASCII characters (no spaces), "
            f"got {len(value)} characters"
        )
    return value


def read_secret_file(path: str) -> str:
    """A secret kept in a file (one line; surrounding whitespace ignored); ValueError names
    what is wrong with it."""
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text") from exc
    return _secret_text(text, f"the secret in {path}")


class FeedbackSpec(_Strict):
    """Outcomes posted back to the gateway (POST `path` on the main listener), and what a
    post must show before it is believed (see SECURITY.md, "Feedback")."""

    enabled: bool = True
    path: str = "/_modelgate/feedback"
    max_batch: int = Field(1000, ge=1)
    max_body_bytes: int = Field(1024 * 1024, ge=1)
    # Requests remembered for `{"request_id": ...}` feedback: bounded in count and age.
    request_id_ttl_s: float = Field(3600.0, gt=0)
    max_request_ids: int = Field(200_000, ge=0)
    # Declared metrics: any other name is refused (400 unknown_metric). Without any, names
    # are accepted up to max_undeclared_metrics distinct ones per process.
    metrics: dict[Annotated[str, Field(pattern=_METRIC_NAME)], MetricSpec] = Field(
        default_factory=dict
    )
    max_undeclared_metrics: int = Field(32, ge=0, le=1024)
    # |value| above this is refused for every metric: sums of squares stay finite.
    max_abs_value: float = Field(1e12, gt=0, le=1e100, allow_inf_nan=False)
    # The key of the x-modelgate-feedback tokens (MODELGATE_FEEDBACK_SECRET overrides);
    # without one, a key is generated at start, shared by the workers.
    secret: str | None = None
    secret_file: str | None = None
    require_token: bool = False  # feedback by request id must carry the response's token
    # Feedback by unit needs this secret in unit_secret_header (MODELGATE_FEEDBACK_UNIT_SECRET
    # overrides); `authorization` takes `Bearer <secret>`, any other header the bare secret.
    unit_secret: str | None = None
    unit_secret_file: str | None = None
    unit_secret_header: str = Field("authorization", pattern=_HEADER_NAME.pattern)

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return _absolute_path(value)

    @field_validator("secret", "unit_secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        return None if value is None else _secret_text(value, "a secret")

    @field_validator("secret_file", "unit_secret_file")
    @classmethod
    def _secret_file(cls, value: str | None) -> str | None:
        if value is not None:
            read_secret_file(value)
        return value

    @field_validator("unit_secret_header")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()

    @model_validator(mode="after")
    def _one_source(self) -> FeedbackSpec:
        for key in ("secret", "unit_secret"):
            if getattr(self, key) is not None and getattr(self, f"{key}_file") is not None:
                raise ValueError(f"give {key} or {key}_file, not both")
        return self


class ExposureSpec(_Strict):
    """One compact record per assignment in log_dir (exposure-*.bin)."""

    enabled: bool = True


class RetentionSpec(_Strict):
    """Per log (exposure, feedback, difflog): the oldest closed files are deleted when the
    log's files in log_dir pass `max_bytes` in total, and when older than `max_age_h`.
    Applied by each writer when it opens a new file; unset: kept forever."""

    max_bytes: int | None = Field(None, ge=1 << 20)
    max_age_h: float | None = Field(None, gt=0)


class LogsSpec(_Strict):
    """Bounds on the log files and the diff log's queue."""

    retention: RetentionSpec = Field(default_factory=RetentionSpec)
    # The shadow pairs waiting to be compared and logged hold three bodies each: the queue
    # is capped by those bytes (pairs over it are dropped, counted as dropped_queue_bytes).
    diff_queue_max_bytes: int = Field(64 << 20, ge=1 << 16)


class GatewayConfig(_Strict):
    listen: str = "127.0.0.1:8080"
    admin: str = "127.0.0.1:8081"
    # Bearer token for the admin API; MODELGATE_ADMIN_TOKEN in the environment overrides it.
    admin_token: str | None = None
    # A file holding the token, generated (mode 0600) at start when it does not exist.
    admin_token_file: str | None = None
    # Host names the admin API is reached by besides its address (behind a proxy, a DNS
    # name): `name` (also matched with the admin's port) or `name:port`.
    admin_hosts: list[str] = Field(default_factory=list)
    workers: int = Field(1, ge=1, le=256)
    log_dir: str = "./modelgate-logs"
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    force: ForceSpec = Field(default_factory=ForceSpec)
    chaos: ChaosSettings = Field(default_factory=ChaosSettings)
    feedback: FeedbackSpec = Field(default_factory=FeedbackSpec)
    exposures: ExposureSpec = Field(default_factory=ExposureSpec)
    logs: LogsSpec = Field(default_factory=LogsSpec)
    upstreams: dict[Name, UpstreamSpec] = Field(min_length=1)
    routes: list[RouteSpec] = Field(min_length=1)

    @field_validator("listen", "admin")
    @classmethod
    def _hostport(cls, value: str) -> str:
        parse_hostport(value)
        return value

    @field_validator("admin_token")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[!-~]{16,512}", value):
            raise ValueError(
                "must be 16 to 512 visible ASCII characters (no spaces), "
                f"got {len(value)} characters"
            )
        return value

    @field_validator("admin_token_file")
    @classmethod
    def _token_file(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be a file path, got an empty string")
        return value

    @field_validator("admin_hosts")
    @classmethod
    def _admin_hosts(cls, value: list[str]) -> list[str]:
        for i, entry in enumerate(value):
            if not _ADMIN_HOST.fullmatch(entry):
                raise ValueError(
                    f"[{i}]: expected a host name or address, optionally with :PORT, as a Host "
                    f"header carries it (admin.example.internal, 10.0.0.5:8081, [::1]:8081), "
                    f"got {entry!r}"
                )
        return [entry.lower() for entry in value]

    @model_validator(mode="after")
    def _one_token_source(self) -> GatewayConfig:
        if self.admin_token is not None and self.admin_token_file is not None:
            raise ValueError("admin_token and admin_token_file: give one of them, not both")
        return self

    @property
    def listen_address(self) -> tuple[str, int]:
        return parse_hostport(self.listen)

    @property
    def admin_address(self) -> tuple[str, int]:
        return parse_hostport(self.admin)


def _key_path(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{path_key(part)}" if out else path_key(part)
    return out or "(root)"


def _pydantic_errors(exc: ValidationError) -> list[str]:
    errors = []
    for err in exc.errors():
        message = err["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        errors.append(f"{_key_path(err['loc'])}: {message}")
    return errors


def _cross_reference_errors(config: GatewayConfig) -> list[str]:
    """Checks that span keys: names that must exist, be unique, and weights that must sum."""
    errors: list[str] = []
    upstreams = config.upstreams
    route_names: set[str] = set()
    experiment_names: set[str] = set()
    for r_index, route in enumerate(config.routes):
        where = f"routes[{r_index}]"
        if route.name in route_names:
            errors.append(f"{where}.name: duplicate route name {route.name!r}")
        route_names.add(route.name)
        if route.upstream is None and route.experiment is None and not route.experiments:
            errors.append(f"{where}: needs an upstream or an experiment")
        if route.upstream is not None and route.upstream not in upstreams:
            errors.append(f"{where}.upstream: unknown upstream {route.upstream!r}")
        for key, experiment in route_experiments(route):
            errors.extend(
                _experiment_errors(config, route, experiment, f"{where}.{key}", experiment_names)
            )
            if experiment.layer is not None and route.upstream is None:
                errors.append(
                    f"{where}.{key}.layer: a route whose experiments use layers needs its own "
                    "upstream, for the units outside them"
                )
        shadow_names: set[str] = set()
        for s_index, shadow in enumerate(route.shadows):
            if shadow.upstream not in upstreams:
                errors.append(
                    f"{where}.shadows[{s_index}].upstream: unknown upstream {shadow.upstream!r}"
                )
            shadow_name = shadow.name or shadow.upstream
            if shadow_name in shadow_names:
                errors.append(
                    f"{where}.shadows[{s_index}]: duplicate shadow {shadow_name!r} "
                    "(give each a distinct `name`)"
                )
            shadow_names.add(shadow_name)
        rule_names: set[str] = set()
        variant_names = {v.name for _, e in route_experiments(route) for v in e.variants}
        for c_index, rule in enumerate(route.chaos):
            if rule.name in rule_names:
                errors.append(f"{where}.chaos[{c_index}].name: duplicate rule {rule.name!r}")
            rule_names.add(rule.name)
            if rule.variant is not None and rule.variant not in variant_names:
                errors.append(f"{where}.chaos[{c_index}].variant: unknown variant {rule.variant!r}")
            if rule.upstream is not None and rule.upstream not in upstreams:
                errors.append(
                    f"{where}.chaos[{c_index}].upstream: unknown upstream {rule.upstream!r}"
                )
    return errors


def route_experiments(route: RouteSpec) -> list[tuple[str, ExperimentSpec]]:
    """A route's experiments in order, each with its key path below the route."""
    found = [("experiment", route.experiment)] if route.experiment is not None else []
    found += [(f"experiments[{i}]", e) for i, e in enumerate(route.experiments)]
    return found


def _experiment_errors(
    config: GatewayConfig,
    route: RouteSpec,
    experiment: ExperimentSpec,
    where: str,
    experiment_names: set[str],
) -> list[str]:
    errors: list[str] = []
    if experiment.name in experiment_names:
        errors.append(f"{where}.name: duplicate experiment name {experiment.name!r}")
    experiment_names.add(experiment.name)
    seen: set[str] = set()
    for v_index, variant in enumerate(experiment.variants):
        if variant.name in seen:
            errors.append(f"{where}.variants[{v_index}].name: duplicate variant {variant.name!r}")
        seen.add(variant.name)
        if variant.upstream is None:
            if route.upstream is None:
                errors.append(
                    f"{where}.variants[{v_index}].upstream: required when the route has no "
                    "upstream of its own"
                )
        elif variant.upstream not in config.upstreams:
            errors.append(
                f"{where}.variants[{v_index}].upstream: unknown upstream {variant.upstream!r}"
            )
    if experiment.variants:
        errors.extend(
            _weight_sum_errors(f"{where}.variants", [v.weight for v in experiment.variants])
        )
    if experiment.default is not None and experiment.default not in seen:
        errors.append(f"{where}.default: unknown variant {experiment.default!r}")
    for unit, variant_name in experiment.overrides.items():
        if variant_name not in seen:
            errors.append(f"{where}.overrides.{unit}: unknown variant {variant_name!r}")
    for g_index, segment in enumerate(experiment.segments):
        for variant_name, weight in segment.weights.items():
            if variant_name not in seen:
                errors.append(
                    f"{where}.segments[{g_index}].weights.{variant_name}: unknown variant"
                )
            elif not math.isfinite(weight) or weight < 0:
                errors.append(
                    f"{where}.segments[{g_index}].weights.{variant_name}: must be a finite "
                    f"number >= 0, got {weight}"
                )
        errors.extend(
            _weight_sum_errors(f"{where}.segments[{g_index}].weights", segment.weights.values())
        )
    if (experiment.layer is None) != (experiment.layer_share is None):
        errors.append(f"{where}: layer and layer_share go together")
    errors.extend(_metric_reference_errors(config, experiment, where))
    canary = experiment.canary
    if canary is not None:
        for key in ("baseline", "candidate"):
            name = getattr(canary, key)
            if name not in seen:
                errors.append(f"{where}.canary.{key}: unknown variant {name!r}")
        for s_index, step in enumerate(canary.steps):
            if not 0 < step <= 100:
                errors.append(f"{where}.canary.steps[{s_index}]: must be in (0, 100], got {step}")
        names = [v.name for v in experiment.variants]
        # Ramps keep the candidate's units only when it is last and the baseline just before it
        # (then a step moves one boundary, and only units between baseline and candidate).
        if canary.candidate in seen and names[-1] != canary.candidate:
            errors.append(
                f"{where}.canary.candidate: must be the last variant, so that units already on "
                f"it stay on it as it grows (variants: {names})"
            )
        elif canary.baseline in seen and len(names) > 1 and names[-2] != canary.baseline:
            errors.append(
                f"{where}.canary.baseline: must be the variant just before the candidate "
                f"(variants: {names})"
            )
        if canary.source == "local" and not config.exposures.enabled:
            errors.append(
                f"{where}.canary.source: a local canary judges the exposure records (per unit, "
                "with each answer's status and latency): set exposures.enabled: true"
            )
    return errors


def _weight_sum_errors(where: str, weights: Iterable[float]) -> list[str]:
    """The bucket boundaries divide by the sum of the weights, summed left to right in double
    precision (DESIGN.md): it must be finite and positive, or the Plan cannot be compiled."""
    total = 0.0
    for weight in weights:
        total += weight
    if math.isnan(total) or total <= 0:
        return [f"{where}: weights are all zero; at least one must be > 0"]
    if math.isinf(total):
        return [f"{where}: weights sum to more than a double holds; scale them down"]
    return []


def _metric_reference_errors(
    config: GatewayConfig, experiment: ExperimentSpec, where: str
) -> list[str]:
    """With metrics declared, canary checks and analysis settings must name declared ones:
    feedback with any other name is refused, so such a check could never pass."""
    declared = config.feedback.metrics
    errors = _analysis_metric_errors(experiment, set(declared), where)
    if not declared:
        return errors
    names = ", ".join(sorted(declared))
    analysis = experiment.analysis
    named = [(f"{where}.analysis.mde.{m}", m) for m in analysis.mde]
    named += [(f"{where}.analysis.metrics.{m}", m) for m in analysis.metrics]
    if experiment.canary is not None:
        named += [
            (f"{where}.canary.checks[{i}].metric", check.metric)
            for i, check in enumerate(experiment.canary.checks or ())
            if not check.is_system
        ]
    return errors + [
        f"{key}: unknown feedback metric {metric!r} (feedback.metrics declares {names})"
        for key, metric in named
        if metric not in declared
    ]


def _analysis_metric_errors(
    experiment: ExperimentSpec, declared: set[str], where: str
) -> list[str]:
    """A denominator or covariate must be a metric declared in analysis.metrics or
    feedback.metrics (a typo would otherwise read as a metric nobody posts, all zeros)."""
    known = declared | set(experiment.analysis.metrics)
    errors: list[str] = []
    for name, spec in experiment.analysis.metrics.items():
        key = f"{where}.analysis.metrics.{name}"
        for field, other in (("denominator", spec.denominator), ("covariate", spec.covariate)):
            if other is None or (field == "denominator" and other == "exposures"):
                continue
            if other == name:
                errors.append(f"{key}.{field}: {name!r} cannot be its own {field}")
            elif other not in known:
                hint = "`exposures` or " if field == "denominator" else ""
                listed = ", ".join(sorted(known)) or "none"
                errors.append(
                    f"{key}.{field}: {other!r} is not a declared metric (give {hint}a metric "
                    f"of analysis.metrics or feedback.metrics: {listed})"
                )
    return errors


def _layer_errors(config: GatewayConfig) -> list[str]:
    """Experiments sharing a layer split its bucket space: the shares must fit in it."""
    shares: dict[str, float] = {}
    for route in config.routes:
        for _, experiment in route_experiments(route):
            if experiment.layer is not None and experiment.layer_share is not None:
                shares[experiment.layer] = (
                    shares.get(experiment.layer, 0.0) + experiment.layer_share
                )
    return [
        f"layers.{name}: experiment shares add up to {total:g}, more than 1"
        for name, total in shares.items()
        if total > 1 + 1e-9
    ]


def parse_config(text: str, source: str = "<config>") -> GatewayConfig:
    """Parses YAML text (bounded: see config_document.py); raises ConfigError with every
    problem found."""
    try:
        raw: Any = load_yaml(text, source)
    except DocumentError as exc:
        raise ConfigError(exc.errors) from exc
    return validate_config(raw)


def validate_config(raw: Any) -> GatewayConfig:
    """Validates an already-parsed document (the admin API's JSON body takes this path)."""
    if not isinstance(raw, dict):
        raise ConfigError([f"(root): expected a mapping of config keys, got {type(raw).__name__}"])
    try:
        check_document(raw)
    except DocumentError as exc:
        raise ConfigError(exc.errors) from exc
    try:
        config = GatewayConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_pydantic_errors(exc)) from exc
    errors = _cross_reference_errors(config) + _layer_errors(config)
    if errors:
        raise ConfigError(errors)
    return config


def load_config(path: str | Path) -> GatewayConfig:
    """Reads and validates a config file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"(file) {path}: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"(file) {path}: not UTF-8 text ({exc.reason})"]) from exc
    return parse_config(text, source=str(path))
