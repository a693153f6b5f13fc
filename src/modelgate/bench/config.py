"""What one `modelgate bench` run does: BenchConfig and its validation, whose errors name
the command-line flag an operator typed."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_DURATION_S",
    "FEEDBACK_PATH",
    "BenchConfig",
    "FeedbackKind",
    "FeedbackSpec",
    "split_url",
]

FeedbackKind = Literal["normal", "binary"]
FEEDBACK_PATH = "/_modelgate/feedback"
DEFAULT_CONCURRENCY = 10
DEFAULT_DURATION_S = 10.0
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an RFC 9110 token


@dataclass(frozen=True)
class FeedbackSpec:
    """`--feedback METRIC:VARIANT=MEAN,...`: the simulated outcome's mean per variant name."""

    metric: str
    means: tuple[tuple[str, float], ...]

    @classmethod
    def parse(cls, text: str) -> FeedbackSpec:
        metric, colon, rest = text.partition(":")
        means: list[tuple[str, float]] = []
        for item in rest.split(",") if colon else []:
            variant, eq, mean = item.strip().partition("=")
            try:
                value = float(mean)
            except ValueError:
                value = math.nan
            if not eq or not variant or not math.isfinite(value):
                break
            means.append((variant.strip(), value))
        else:
            if metric.strip() and means:
                return cls(metric.strip(), tuple(means))
        raise ValueError(f"expected METRIC:VARIANT=MEAN[,VARIANT=MEAN...], got {text!r}")


@dataclass(frozen=True)
class BenchConfig:
    """One bench. Neither rate nor concurrency: concurrency 10; neither duration_s nor
    requests: 10 s. Validation errors name the command-line flag."""

    url: str
    rate: float | None = None  # open loop, requests per second
    concurrency: int | None = None  # closed loop, requests in flight
    duration_s: float | None = None
    requests: int | None = None
    method: str = "POST"
    body: str | None = None  # a template: {unit}, {rand} and {seq} are filled per request
    body_file: str | None = None  # JSON lines, one body per line, used in turn
    unit_header: str | None = None
    units: int = 10_000  # unit ids user-0 .. user-(units-1), drawn uniformly
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 10.0
    processes: int = 1
    max_connections: int = 1024  # open loop: connections opened at most, per process
    feedback: tuple[FeedbackSpec, ...] = ()
    feedback_url: str | None = None  # default: the target's /_modelgate/feedback
    feedback_kind: FeedbackKind = "normal"
    feedback_sd: float = 1.0
    seed: int | None = None
    progress: bool = False  # a status line on stderr (the CLI sets it when that is a TTY)

    def __post_init__(self) -> None:
        split_url(self.url, "URL")
        if self.feedback_url is not None:
            split_url(self.feedback_url, "--feedback-url")
        rules: list[tuple[bool, str, str, object]] = [
            (
                self.rate is None or self.concurrency is None,
                "--rate",
                "not be given with --concurrency",
                self.rate,
            ),
            (self.rate is None or _positive(self.rate), "--rate", "be > 0", self.rate),
            (
                self.concurrency is None or self.concurrency >= 1,
                "--concurrency",
                "be >= 1",
                self.concurrency,
            ),
            (
                self.duration_s is None or self.requests is None,
                "--duration",
                "not be given with --requests",
                self.duration_s,
            ),
            (
                self.duration_s is None or _positive(self.duration_s),
                "--duration",
                "be > 0",
                self.duration_s,
            ),
            (self.requests is None or self.requests >= 1, "--requests", "be >= 1", self.requests),
            (bool(HEADER_NAME.match(self.method)), "--method", "be an HTTP method", self.method),
            (
                self.body is None or self.body_file is None,
                "--body",
                "not be given with --body-file",
                self.body,
            ),
            (
                self.unit_header is None or bool(HEADER_NAME.match(self.unit_header)),
                "--unit-header",
                "be a header name",
                self.unit_header,
            ),
            (self.units >= 1, "--units", "be >= 1", self.units),
            (_positive(self.timeout_s), "--timeout", "be > 0", self.timeout_s),
            (self.processes >= 1, "--processes", "be >= 1", self.processes),
            (self.max_connections >= 1, "--max-connections", "be >= 1", self.max_connections),
            (
                self.feedback_kind in ("normal", "binary"),
                "--feedback-kind",
                "be normal or binary",
                self.feedback_kind,
            ),
            (
                _positive(self.feedback_sd) or self.feedback_sd == 0,
                "--feedback-sd",
                "be >= 0",
                self.feedback_sd,
            ),
        ]
        for ok, flag, requirement, value in rules:
            if not ok:
                raise ValueError(f"{flag} must {requirement}, got {value!r}")
        for name, value in self.headers:
            if not HEADER_NAME.match(name) or any(c in value for c in "\r\n\0"):
                raise ValueError(f"--header must be 'name: value', got {name!r}: {value!r}")
        if self.feedback_kind == "binary":
            for spec in self.feedback:
                for variant, mean in spec.means:
                    if not 0.0 <= mean <= 1.0:
                        raise ValueError(
                            f"--feedback {spec.metric}:{variant}={mean}: a binary outcome's "
                            "mean must be in [0, 1]"
                        )
        share = self.concurrency or DEFAULT_CONCURRENCY
        if self.rate is None and self.processes > share:
            raise ValueError(f"--processes must be <= --concurrency ({share})")

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None else "closed"


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def split_url(url: str, flag: str) -> tuple[str, int, str, str]:
    """(host, port, Host header value, request target) of an http:// URL."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{flag} must be an http://host[:port][/path] URL, got {url!r}")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"{flag} has an invalid port: {url!r}") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, port, parts.netloc.rpartition("@")[2], target
