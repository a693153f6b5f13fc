"""What `modelgate bench` measured: the per-process Recorder on the request path, and the
BenchReport built from one or more of them (per variant and overall), as text or JSON."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from modelgate.telemetry.histogram import RELATIVE_ERROR, LatencyHistogram

__all__ = [
    "NO_VARIANT",
    "BenchReport",
    "FeedbackCounts",
    "GroupReport",
    "Recorder",
    "VariantStats",
    "format_report",
]

NO_VARIANT = "-"  # the group of responses without an x-modelgate-variant header
QUANTILES = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99_9", 0.999))
# Beyond these the figures measure the driver as much as the target (see `warnings`).
LAG_WARN_S = 0.010
BUSY_WARN = 0.9


class VariantStats:
    """Everything recorded for one value of the variant header, in one process."""

    __slots__ = ("histogram", "statuses", "faults", "faulted")

    def __init__(self) -> None:
        self.histogram = LatencyHistogram()
        self.statuses: dict[int, int] = {}
        self.faults: dict[str, int] = {}
        self.faulted = 0

    def merge(self, other: VariantStats) -> None:
        self.histogram.merge(other.histogram)
        _add(self.statuses, other.statuses)
        _add(self.faults, other.faults)
        self.faulted += other.faulted


@dataclass
class FeedbackCounts:
    """Best-effort feedback posts: what happened to each."""

    posted: int = 0
    accepted: int = 0  # 2xx
    rejected: dict[int, int] = field(default_factory=dict)  # other statuses
    failed: dict[str, int] = field(default_factory=dict)  # connection errors by kind
    dropped: int = 0  # not sent: too many posts already queued
    skipped: int = 0  # no unit id, or a variant no --feedback mean names

    def merge(self, other: FeedbackCounts) -> None:
        self.posted += other.posted
        self.accepted += other.accepted
        _add(self.rejected, other.rejected)
        _add(self.failed, other.failed)
        self.dropped += other.dropped
        self.skipped += other.skipped

    def as_dict(self) -> dict[str, Any]:
        return {
            "posted": self.posted,
            "accepted": self.accepted,
            "rejected": {str(k): v for k, v in sorted(self.rejected.items())},
            "failed": dict(sorted(self.failed.items())),
            "dropped": self.dropped,
            "skipped": self.skipped,
        }


class Recorder:
    """One driver process's counters; `record` is the per-response cost. It pickles, so
    the processes of `--processes N` send theirs to the parent to be merged."""

    def __init__(self) -> None:
        self.variants: dict[bytes | None, VariantStats] = {}
        self.errors: dict[str, int] = {}
        self.lag = LatencyHistogram()  # open loop: how late each request left
        self.sent = 0
        self.responses = 0
        self.first_send = math.inf  # time.perf_counter() values
        self.last_done = -math.inf
        self.cpu_s = 0.0
        self.feedback = FeedbackCounts()

    def record(
        self, latency_s: float, status: int, variant: bytes | None, chaos: bytes | None
    ) -> None:
        stats = self.variants.get(variant)
        if stats is None:
            stats = self.variants[variant] = VariantStats()
        stats.histogram.record(latency_s)
        statuses = stats.statuses
        statuses[status] = statuses.get(status, 0) + 1
        self.responses += 1
        if chaos is not None:
            stats.faulted += 1
            faults = stats.faults
            for rule in chaos.decode("latin-1").split(","):
                name = rule.strip()
                faults[name] = faults.get(name, 0) + 1

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    def merge(self, other: Recorder) -> None:
        for key, stats in other.variants.items():
            mine = self.variants.get(key)
            if mine is None:
                mine = self.variants[key] = VariantStats()
            mine.merge(stats)
        _add(self.errors, other.errors)
        self.lag.merge(other.lag)
        self.sent += other.sent
        self.responses += other.responses
        self.first_send = min(self.first_send, other.first_send)
        self.last_done = max(self.last_done, other.last_done)
        self.cpu_s += other.cpu_s
        self.feedback.merge(other.feedback)


def _add(into: dict[Any, int], other: dict[Any, int]) -> None:
    for key, value in other.items():
        into[key] = into.get(key, 0) + value


@dataclass
class GroupReport:
    """One variant (or all responses): latency in seconds from the scheduled send time."""

    name: str
    responses: int
    throughput_rps: float
    latency_s: dict[str, float]  # p50, p90, p99, p99_9, max, mean, min
    status_classes: dict[str, int]  # 1xx..5xx, always with 2xx..5xx
    statuses: dict[int, int]
    faulted: int  # responses carrying x-modelgate-chaos
    faults: dict[str, int]  # per chaos rule named in that header
    histogram: LatencyHistogram = field(repr=False)

    @classmethod
    def build(cls, name: str, stats: VariantStats, elapsed_s: float) -> GroupReport:
        hist = stats.histogram
        count = hist.count
        values = hist.quantiles([q for _, q in QUANTILES])
        latency = {name: value for (name, _), value in zip(QUANTILES, values, strict=True)}
        latency["max"] = hist.max if count else math.nan
        latency["mean"] = hist.mean
        latency["min"] = hist.min if count else math.nan
        classes = {f"{c}xx": 0 for c in (2, 3, 4, 5)}
        for status, n in stats.statuses.items():
            key = f"{status // 100}xx"
            classes[key] = classes.get(key, 0) + n
        return cls(
            name=name,
            responses=count,
            throughput_rps=count / elapsed_s if elapsed_s > 0 else 0.0,
            latency_s=latency,
            status_classes=dict(sorted(classes.items())),
            statuses=dict(sorted(stats.statuses.items())),
            faulted=stats.faulted,
            faults=dict(sorted(stats.faults.items())),
            histogram=hist,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "responses": self.responses,
            "throughput_rps": self.throughput_rps,
            "latency_ms": {k: _ms(v) for k, v in self.latency_s.items()},
            "status_classes": self.status_classes,
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "faulted": self.faulted,
            "faults": self.faults,
        }


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else seconds * 1e3


@dataclass
class BenchReport:
    """The outcome of one bench. Errors are requests without a response (no latency)."""

    url: str
    mode: str  # "open" (fixed arrival rate) or "closed" (fixed concurrency)
    rate: float | None
    concurrency: int | None
    duration_s: float | None
    requests: int | None  # the request budget, when given instead of a duration
    processes: int
    started_at: str  # ISO 8601, UTC
    elapsed_s: float  # first scheduled send to last response
    sent: int
    responses: int
    errors: dict[str, int]
    overall: GroupReport
    variants: dict[str, GroupReport]
    schedule_lag_s: dict[str, float] | None  # open loop: max, p99, mean of send lateness
    driver_cpu_s: float
    feedback: FeedbackCounts | None
    warnings: list[str]
    stopped_early: bool = False  # interrupted (Ctrl-C, or run_bench's `stop`)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def driver_busy(self) -> float:
        """The driver's CPU time per process per wall second: near 1, it was the limit."""
        wall = self.elapsed_s * self.processes
        return self.driver_cpu_s / wall if wall > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "mode": self.mode,
            "rate": self.rate,
            "concurrency": self.concurrency,
            "duration_s": self.duration_s,
            "requests": self.requests,
            "processes": self.processes,
            "started_at": self.started_at,
            "elapsed_s": self.elapsed_s,
            "sent": self.sent,
            "responses": self.responses,
            "errors": dict(sorted(self.errors.items())),
            "error_count": self.error_count,
            "overall": self.overall.as_dict(),
            "variants": {name: g.as_dict() for name, g in self.variants.items()},
            "schedule_lag_ms": (
                None
                if self.schedule_lag_s is None
                else {k: _ms(v) for k, v in self.schedule_lag_s.items()}
            ),
            "driver_cpu_s": self.driver_cpu_s,
            "driver_busy": self.driver_busy,
            "histogram_relative_error": RELATIVE_ERROR,
            "feedback": None if self.feedback is None else self.feedback.as_dict(),
            "warnings": self.warnings,
            "stopped_early": self.stopped_early,
        }


def build_report(
    recorder: Recorder,
    *,
    url: str,
    mode: str,
    rate: float | None,
    concurrency: int | None,
    duration_s: float | None,
    requests: int | None,
    processes: int,
    started_at: str,
    feedback: bool,
    stopped_early: bool = False,
) -> BenchReport:
    """The report of a (merged) recorder."""
    elapsed = max(recorder.last_done - recorder.first_send, 0.0)
    if not math.isfinite(elapsed):
        elapsed = 0.0
    named = sorted(
        (
            (NO_VARIANT if k is None else k.decode("latin-1"), s)
            for k, s in recorder.variants.items()
        ),
        key=lambda item: item[0],
    )
    total = VariantStats()
    for _, stats in named:
        total.merge(stats)
    variants = {name: GroupReport.build(name, stats, elapsed) for name, stats in named}
    lag: dict[str, float] | None = None
    if mode == "open" and recorder.lag.count:
        lag = {"max": recorder.lag.max, "p99": recorder.lag.quantile(0.99)}
        lag["mean"] = recorder.lag.mean
    report = BenchReport(
        url=url,
        mode=mode,
        rate=rate,
        concurrency=concurrency,
        duration_s=duration_s,
        requests=requests,
        processes=processes,
        started_at=started_at,
        elapsed_s=elapsed,
        sent=recorder.sent,
        responses=recorder.responses,
        errors=dict(recorder.errors),
        overall=GroupReport.build("all", total, elapsed),
        variants=variants,
        schedule_lag_s=lag,
        driver_cpu_s=recorder.cpu_s,
        feedback=recorder.feedback if feedback else None,
        warnings=[],
        stopped_early=stopped_early,
    )
    report.warnings = _warnings(report)
    return report


def _warnings(report: BenchReport) -> list[str]:
    out = []
    lag = report.schedule_lag_s
    if lag is not None and lag["max"] > LAG_WARN_S:
        out.append(
            f"the driver fell behind its schedule by up to {lag['max'] * 1e3:.1f} ms"
            f" (p99 {lag['p99'] * 1e3:.1f} ms): latencies include that lateness; if it is"
            " large, the driver was measured as much as the target (try --processes)"
        )
    if report.driver_busy > BUSY_WARN:
        out.append(
            f"the driver used {report.driver_busy:.0%} of a core per process: it may be the"
            " bottleneck (try --processes)"
        )
    clamped = report.overall.histogram.clamped
    if clamped:
        out.append(f"{clamped} latencies above 137 s were counted in the top bucket")
    if report.sent and not report.responses:
        out.append("no response at all: is the target up?")
    return out


# --- text ------------------------------------------------------------------------------


def _fmt_ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1e3:.2f}"


def _kinds(counts: dict[Any, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])))


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]


def _group_rows(groups: Iterable[GroupReport]) -> list[list[str]]:
    rows = [
        ["variant", "responses", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"]
        + ["2xx", "3xx", "4xx", "5xx", "faulted"]
    ]
    for g in groups:
        lat = g.latency_s
        rows.append(
            [g.name, f"{g.responses:,}", f"{g.throughput_rps:,.1f}"]
            + [_fmt_ms(lat[k]) for k in ("p50", "p90", "p99", "p99_9", "max")]
            + [f"{g.status_classes.get(c, 0):,}" for c in ("2xx", "3xx", "4xx", "5xx")]
            + [f"{g.faulted:,}"]
        )
    return rows


def format_report(report: BenchReport) -> str:
    """The report as a few lines and a table, for a terminal."""
    if report.mode == "open":
        load = f"open loop at {report.rate:,.6g} req/s"
    else:
        load = f"closed loop, concurrency {report.concurrency}"
    span = (
        f"for {report.duration_s:g} s"
        if report.duration_s is not None
        else f"{report.requests:,} requests"
    )
    if report.stopped_early:
        span += " (stopped early)"
    plural = "es" if report.processes > 1 else ""
    lines = [
        f"modelgate bench {report.url}: {load}, {span}, {report.processes} process{plural}",
        f"sent {report.sent:,}  responses {report.responses:,}  errors {report.error_count:,}"
        + (f" ({_kinds(report.errors)})" if report.errors else "")
        + f"  elapsed {report.elapsed_s:.2f} s  throughput {report.overall.throughput_rps:,.1f}"
        " req/s",
    ]
    driver = f"driver CPU {report.driver_busy:.0%} of a core per process"
    if report.schedule_lag_s is not None:
        lag = report.schedule_lag_s
        driver = (
            f"schedule lag max {lag['max'] * 1e3:.2f} ms, p99 {lag['p99'] * 1e3:.2f} ms; " + driver
        )
    lines.append(driver)
    lines.append("latency from the scheduled send time; histogram error <= 1%")
    lines.append("")
    groups = list(report.variants.values())
    if len(groups) != 1 or groups[0].name != NO_VARIANT:
        groups.append(report.overall)
    lines += _table(_group_rows(groups if groups else [report.overall]))
    for g in report.variants.values():
        if g.faults:
            lines.append(f"faults in {g.name}: {_kinds(g.faults)}")
    fb = report.feedback
    if fb is not None:
        lines.append(
            f"feedback: posted {fb.posted:,}, accepted {fb.accepted:,}, rejected"
            f" {sum(fb.rejected.values()):,}"
            + (f" ({_kinds(fb.rejected)})" if fb.rejected else "")
            + f", failed {sum(fb.failed.values()):,}"
            + (f" ({_kinds(fb.failed)})" if fb.failed else "")
            + f", dropped {fb.dropped:,}, skipped {fb.skipped:,}"
        )
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines)
