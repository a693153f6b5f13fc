"""Outcomes per experiment and variant: feedback posted back to the gateway, joined to the
variant, and the system metrics the gateway measures itself (latency, errors).

Streaming sufficient statistics only (count, mean and M2 by Welford, count of ones): exact
under concurrency because one event loop owns them, and across workers because they merge.
They are keyed by names, not Plan objects, so they survive a reload that keeps the experiment.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from modelgate.core import xxh64
from modelgate.exposure import FLAG_MEASURED, ExposureLog
from modelgate.feedback_checks import FeedbackError, MetricGate
from modelgate.feedback_tokens import Credential
from modelgate.feedbacklog import FLAG_BY_REQUEST_ID, FLAG_ENROLLED, FeedbackLog
from modelgate.logretention import retention_of
from modelgate.telemetry.counts import LATENCY_BUCKETS_S

if TYPE_CHECKING:
    from modelgate.config import FeedbackSpec, GatewayConfig
    from modelgate.plan import Plan

__all__ = [
    "LATENCY_BUCKETS_S",
    "FeedbackError",
    "Moments",
    "OutcomeStore",
    "assignment_bytes",
    "experiment_designs",
    "latency_quantile",
    "merge_snapshots",
]


class Moments:
    """Count, mean, M2 (Welford) and the count of ones, for one stream of values."""

    __slots__ = ("count", "mean", "m2", "ones")

    def __init__(self, count: int = 0, mean: float = 0.0, m2: float = 0.0, ones: int = 0) -> None:
        self.count = count
        self.mean = mean
        self.m2 = m2
        self.ones = ones

    def add(self, value: float) -> None:
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)
        if value == 1.0:
            self.ones += 1

    def merge(self, other: Moments) -> None:
        """Chan et al.'s parallel update: merging workers' moments is exact up to rounding."""
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean += delta * other.count / total
        self.m2 += other.m2 + delta * delta * self.count * other.count / total
        self.count = total
        self.ones += other.ones

    @property
    def variance(self) -> float:
        return self.m2 / (self.count - 1) if self.count > 1 else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2, "ones": self.ones}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Moments:
        return cls(int(data["count"]), float(data["mean"]), float(data["m2"]), int(data["ones"]))


@dataclass
class VariantSystem:
    """What the gateway measures itself for one experiment variant."""

    requests: int = 0
    errors: int = 0  # 5xx answered to the client, and connection-level failures
    latency: Moments | None = None
    buckets: list[int] | None = None

    def add(self, latency_s: float, error: bool) -> None:
        latency = self.latency
        buckets = self.buckets
        if latency is None or buckets is None:
            latency = self.latency = Moments()
            buckets = self.buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.requests += 1
        if error:
            self.errors += 1
        latency.add(latency_s)
        buckets[bisect.bisect_left(LATENCY_BUCKETS_S, latency_s)] += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "latency": self.latency.as_dict() if self.latency else Moments().as_dict(),
            "buckets": list(self.buckets or [0] * (len(LATENCY_BUCKETS_S) + 1)),
        }


def latency_quantile(buckets: list[int], q: float) -> float:
    """A quantile from histogram buckets, linear inside the bucket (as Prometheus'
    histogram_quantile does); seconds; NaN without data."""
    total = sum(buckets)
    if total == 0:
        return math.nan
    rank = q * total
    running = 0
    for index, count in enumerate(buckets):
        if running + count >= rank and count > 0:
            low = LATENCY_BUCKETS_S[index - 1] if index > 0 else 0.0
            if index >= len(LATENCY_BUCKETS_S):
                return LATENCY_BUCKETS_S[-1]
            high = LATENCY_BUCKETS_S[index]
            return low + (high - low) * (rank - running) / count
        running += count
    return LATENCY_BUCKETS_S[-1]


Assignments = tuple[tuple[str, str, bool], ...]  # (experiment, variant, enrolled)
# A remembered request: when, its assignments (None once a second request claimed the same
# id for another unit or variant: the join is ambiguous), the XXH64 of its unit, and the
# metrics already credited to it by request id (None until its first feedback, so a request
# nobody posts for costs no set).
Remembered = tuple[float, Assignments | None, int, frozenset[str] | None]


@dataclass(frozen=True, slots=True)
class _Item:
    """One validated feedback item, before it is counted."""

    assignments: Assignments
    metric: str
    value: float
    unit_hash: int  # xxh64 of the unit for feedback by unit, else 0
    request_id: bytes  # for feedback by request id, else b""


_KEYS = frozenset({"metric", "value", "experiment", "unit", "request_id", "token"})
_REFUSALS = {
    401: "unauthorized",
    403: "unauthorized",
    404: "unknown_request_id",
    409: "ambiguous_request_id",
}
# Refusals counted by their code where the status is shared (409).
_REFUSAL_CODES = {"duplicate_feedback": "duplicate"}


def assignment_bytes(assignments: Assignments) -> bytes:
    """The assignments as the x-modelgate-variant header says them (what a token covers)."""
    return ",".join(f"{e}={v}" for e, v, _ in assignments).encode("utf-8")


def experiment_designs(config: GatewayConfig) -> dict[str, dict[str, Any]]:
    """What an analysis needs of each experiment's config, JSON-able: variants in config
    order, weights, the control (`default`, else the first variant) and analysis settings.
    Written into the exposure sidecars so files can be analyzed without the config."""
    designs: dict[str, dict[str, Any]] = {}
    for route in config.routes:
        for spec in (route.experiment, *route.experiments):
            if spec is None:
                continue
            designs[spec.name] = {
                "name": spec.name,
                "route": route.name,
                "variants": [v.name for v in spec.variants],
                "weights": [v.weight for v in spec.variants],
                "control": spec.default if spec.default is not None else spec.variants[0].name,
                "segments": len(spec.segments),
                "analysis": spec.analysis.model_dump(mode="json"),
            }
    return designs


class OutcomeStore:
    """Per process: recent request ids (bounded, time-limited), outcomes, system metrics."""

    def __init__(self) -> None:
        self.exposures: ExposureLog | None = None  # opened on the first exposure
        self.feedback_log: FeedbackLog | None = None  # opened on the first feedback
        self._described: GatewayConfig | None = None  # the config the logs' meta describes
        self.recent: OrderedDict[bytes, Remembered] = OrderedDict()
        self.metrics = MetricGate()
        self._inserts = 0
        self.outcomes: dict[tuple[str, str, str], Moments] = {}
        self.system: dict[tuple[str, str], VariantSystem] = {}
        self.counts: Counter[str] = Counter()

    # --- the request path ----------------------------------------------------------------

    def remember(
        self,
        request_id: bytes,
        assignments: Assignments,
        now: float,
        spec: FeedbackSpec,
        unit_hash: int = 0,
    ) -> None:
        """Keeps a request's assignments for feedback by its id. A live id claimed again
        for another unit or other assignments (a client-chosen x-request-id) is marked
        ambiguous rather than overwritten: its feedback is refused, never misattributed."""
        recent = self.recent
        found = recent.get(request_id)
        if found is not None:
            if found[0] >= now - spec.request_id_ttl_s:
                if found[1] != assignments or found[2] != unit_hash:
                    if found[1] is not None:
                        self.counts["request_id_collisions"] += 1
                    recent[request_id] = (found[0], None, 0, found[3])
                return
            del recent[request_id]  # expired: the new request takes the id, at the young end
        recent[request_id] = (now, assignments, unit_hash, None)
        if len(recent) > spec.max_request_ids:
            recent.popitem(last=False)
        self._inserts += 1
        if self._inserts & 1023 == 0:
            # Expired ids leave from the oldest end, checked every 1024 inserts: a per-insert
            # check cost more than the insert itself.
            horizon = now - spec.request_id_ttl_s
            while recent and next(iter(recent.values()))[0] < horizon:
                recent.popitem(last=False)

    def expose_all(
        self,
        plan: Plan,
        request_id: bytes,
        exposed: list[tuple[int, str, str, int]],
        status: int,
        latency_us: int,
        measured: bool,
    ) -> None:
        """One record per (unit hash, experiment, variant, flags) of a request that has
        ended; the unit hash is XXH64 of the unit, 0 without one (hashed once per request).
        `measured`: the status and latency are the answer's (not a client that left)."""
        log = self.exposures
        if log is None:
            log = self.exposures = ExposureLog(plan.config.log_dir)
            log.start()
            self._described = None  # a feedback log may have been described without this one
        if plan.config is not self._described:
            self._describe(plan.config)
        extra = FLAG_MEASURED if measured else 0
        ts_ns = time.time_ns() - latency_us * 1000  # when the request came
        for unit_hash, experiment, variant, flags in exposed:
            log.add(
                request_id, unit_hash, experiment, variant, flags | extra, status, latency_us, ts_ns
            )

    def _describe(self, config: GatewayConfig) -> None:
        """The experiments' design goes into the sidecars (a new dict: the writer threads
        read the reference they find, never a half-updated one)."""
        self._described = config
        meta = {"experiments": experiment_designs(config)}
        retention = retention_of(config.logs.retention)
        for log in (self.exposures, self.feedback_log):
            if log is not None:
                log.meta = meta
                log.retention = retention

    def close(self, deadline: float | None = None) -> None:
        """Stops the record logs; each writes what it holds until `deadline` (monotonic
        time; default 2 s from now) and says what it could not."""
        deadline = time.monotonic() + 2.0 if deadline is None else deadline
        for log in (self.exposures, self.feedback_log):
            if log is not None:
                log.close(deadline - time.monotonic())
        self.exposures = self.feedback_log = None

    def observe_all(
        self, assignments: list[tuple[str, str, bool]], latency_s: float, error: bool
    ) -> None:
        """One response's latency and error for each experiment it was enrolled in."""
        for experiment, variant, enrolled in assignments:
            if enrolled:
                self.observe(experiment, variant, latency_s, error)

    def observe(self, experiment: str, variant: str, latency_s: float, error: bool) -> None:
        key = (experiment, variant)
        system = self.system.get(key)
        if system is None:
            system = self.system[key] = VariantSystem()
        system.add(latency_s, error)

    # --- feedback ----------------------------------------------------------------------

    def handle_feedback(
        self, body: bytes, plan: Plan, now: float, credential: Credential = Credential.NONE
    ) -> dict[str, Any]:
        """Validates a feedback document (one object or a list) and records it all, or
        nothing: raises FeedbackError (400 bad input, 401/403 a missing or wrong secret or
        token, 404 unknown or expired request id, 409 an ambiguous request id, 413 too many
        items, 409 a second value for a (request id, metric), 422 a unit outside the
        experiment)."""
        spec = plan.config.feedback
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            self.counts["bad"] += 1
            raise FeedbackError(400, "bad_feedback", f"body is not JSON: {exc}") from exc
        items = document if isinstance(document, list) else [document]
        if len(items) > spec.max_batch:
            self.counts["bad"] += 1
            raise FeedbackError(
                413, "batch_too_large", f"{len(items)} items; the limit is {spec.max_batch}"
            )
        if not items:
            self.counts["bad"] += 1
            raise FeedbackError(400, "bad_feedback", "an empty batch")
        resolved: list[_Item] = []
        pending: set[str] = set()
        credits: dict[bytes, set[str]] = {}  # this batch's (request id, metric) pairs
        for index, item in enumerate(items):
            where = f"[{index}]" if isinstance(document, list) else ""
            try:
                found = self._resolve(item, plan, now, credential, pending)
                if found.request_id:
                    self._claim(found, item, credits)
                resolved.append(found)
            except FeedbackError as exc:
                result = _REFUSAL_CODES.get(exc.code) or _REFUSALS.get(exc.status, "bad")
                self.counts[result] += 1
                raise FeedbackError(exc.status, exc.code, f"{where}{exc.detail}") from None
        self.metrics.commit(pending)
        self._credit(credits)
        counted = 0
        log = self._feedback_log(plan) if plan.exposures else None
        for found in resolved:
            flags = FLAG_BY_REQUEST_ID if found.request_id else 0
            for experiment, variant, enrolled in found.assignments:
                if log is not None:
                    log.add(
                        found.unit_hash,
                        found.value,
                        found.request_id,
                        experiment,
                        variant,
                        found.metric,
                        flags | (FLAG_ENROLLED if enrolled else 0),
                    )
                if not enrolled:
                    continue
                key = (experiment, variant, found.metric)
                moments = self.outcomes.get(key)
                if moments is None:
                    moments = self.outcomes[key] = Moments()
                moments.add(found.value)
                counted += 1
        self.counts["accepted"] += len(resolved)
        self.counts["counted"] += counted
        return {"accepted": len(resolved), "counted": counted}

    def _claim(self, found: _Item, item: dict[str, Any], credits: dict[bytes, set[str]]) -> None:
        """One value per (request id, metric): a token proves its holder got the response,
        so without this one holder could post a value any number of times and decide a
        result alone (issue 12 review, finding 1). Repeats in this batch or earlier ones
        are refused; nothing is recorded until the whole batch passed."""
        metric = found.metric
        batch = credits.get(found.request_id)
        done = self.recent[found.request_id][3]  # _joined found it live
        if (batch is not None and metric in batch) or (done is not None and metric in done):
            raise FeedbackError(
                409,
                "duplicate_feedback",
                f"request {item['request_id']!r} already has a value for metric {metric!r}; "
                "feedback by request id is one value per request and metric",
            )
        if batch is None:
            credits[found.request_id] = {metric}
        else:
            batch.add(metric)

    def _credit(self, credits: dict[bytes, set[str]]) -> None:
        """Marks a recorded batch's metrics as credited, in place: the entry keeps its age
        and its place in the eviction order."""
        recent = self.recent
        for request_id, metrics in credits.items():
            when, assignments, unit_hash, done = recent[request_id]
            merged = frozenset(metrics) if done is None else done | metrics
            recent[request_id] = (when, assignments, unit_hash, merged)

    def _feedback_log(self, plan: Plan) -> FeedbackLog:
        log = self.feedback_log
        if log is None:
            log = self.feedback_log = FeedbackLog(plan.config.log_dir)
            log.start()
            self._described = None
        if plan.config is not self._described:
            self._describe(plan.config)
        return log

    def _resolve(
        self, item: Any, plan: Plan, now: float, credential: Credential, pending: set[str]
    ) -> _Item:
        if not isinstance(item, dict):
            raise FeedbackError(400, "bad_feedback", "each item must be a JSON object")
        spec = plan.config.feedback
        extra = sorted(set(item) - _KEYS)
        if extra:
            raise FeedbackError(400, "bad_feedback", f"unknown keys {extra}")
        metric = self.metrics.metric(spec, item, pending)
        value = self.metrics.value(spec, metric, item)
        if "request_id" in item:
            rid = item["request_id"]
            if not isinstance(rid, str) or not rid:
                raise FeedbackError(400, "bad_feedback", "request_id must be a string")
            request_id = rid.encode("ascii", "replace")
            return _Item(
                self._joined(request_id, item, plan, now, credential), metric, value, 0, request_id
            )
        if "token" in item:
            raise FeedbackError(400, "bad_feedback", "token goes with request_id")
        if plan.feedback_keys.unit_secret is not None and credential is not Credential.VALID:
            # Only feedback by unit asks for the secret: an unrelated Authorization header
            # on feedback by request id is no reason to refuse it.
            if credential is Credential.WRONG:
                raise FeedbackError(
                    403,
                    "bad_unit_secret",
                    f"the {spec.unit_secret_header} header is not the secret",
                )
            raise FeedbackError(
                401,
                "unit_secret_required",
                f"feedback by unit needs the secret in the {spec.unit_secret_header} header",
            )
        experiment_name = item.get("experiment")
        unit = item.get("unit")
        if not isinstance(experiment_name, str) or not isinstance(unit, (str, int)):
            raise FeedbackError(
                400, "bad_feedback", "give request_id, or experiment (string) and unit"
            )
        experiment = plan.experiments.get(experiment_name)
        if experiment is None:
            raise FeedbackError(400, "unknown_experiment", f"no experiment {experiment_name!r}")
        # The variant is recomputed from the unit and the running Plan: no storage needed.
        # Segments depend on the original request, so feedback by unit cannot see them.
        assignment = experiment.targeting.assign(str(unit), lambda kind, name: None)
        if assignment is None:
            raise FeedbackError(
                422,
                "unit_not_in_experiment",
                f"unit {unit!r} is not in {experiment_name!r}: its layer puts it elsewhere",
            )
        variant = experiment.variants[assignment.index].name
        return _Item(
            ((experiment_name, variant, assignment.enrolled),),
            metric,
            value,
            xxh64(str(unit).encode("utf-8")),
            b"",
        )

    def _joined(
        self, request_id: bytes, item: dict[str, Any], plan: Plan, now: float, cred: Credential
    ) -> Assignments:
        """The assignments of a remembered request, once its token (when given, or
        required) proves the poster got that very response."""
        ttl = plan.config.feedback.request_id_ttl_s
        rid = item["request_id"]  # as posted, for the messages
        found = self.recent.get(request_id)
        if found is None or found[0] < now - ttl:
            raise FeedbackError(
                404,
                "unknown_request_id",
                f"request {rid!r} is unknown or older than {ttl:g} s (or had no experiment)",
            )
        assignments = found[1]
        if assignments is None:
            raise FeedbackError(
                409,
                "ambiguous_request_id",
                f"request id {rid!r} was sent by more than one unit or variant; "
                "its feedback cannot be joined",
            )
        keys = plan.feedback_keys
        token = item.get("token")
        if token is None:
            if keys.require_token and cred is not Credential.VALID:
                raise FeedbackError(
                    403,
                    "token_required",
                    "feedback by request id needs the response's x-modelgate-feedback token "
                    '(as "token")',
                )
            return assignments
        if not isinstance(token, str) or not keys.token_matches(
            token, request_id, found[2], assignment_bytes(assignments)
        ):
            raise FeedbackError(
                403, "bad_token", f"the token is not the one issued for request {rid!r}"
            )
        return assignments

    # --- reading ---------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state, for the admin API and for merging workers."""
        return {
            "outcomes": [
                {"experiment": e, "variant": v, "metric": m, **moments.as_dict()}
                for (e, v, m), moments in sorted(self.outcomes.items())
            ],
            "system": [
                {"experiment": e, "variant": v, **system.as_dict()}
                for (e, v), system in sorted(self.system.items())
            ],
            "counts": dict(self.counts),
        }


def merge_snapshots(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """OutcomeStore snapshots of several workers as one (moments merged, counts summed)."""
    outcomes: dict[tuple[str, str, str], Moments] = {}
    system: dict[tuple[str, str], dict[str, Any]] = {}
    counts: Counter[str] = Counter()
    for snap in snapshots:
        for row in snap["outcomes"]:
            okey = (row["experiment"], row["variant"], row["metric"])
            outcomes.setdefault(okey, Moments()).merge(Moments.from_dict(row))
        for row in snap["system"]:
            key = (row["experiment"], row["variant"])
            merged = system.get(key)
            if merged is None:
                system[key] = {
                    "requests": row["requests"],
                    "errors": row["errors"],
                    "latency": Moments.from_dict(row["latency"]),
                    "buckets": list(row["buckets"]),
                }
            else:
                merged["requests"] += row["requests"]
                merged["errors"] += row["errors"]
                merged["latency"].merge(Moments.from_dict(row["latency"]))
                merged["buckets"] = [
                    a + b for a, b in zip(merged["buckets"], row["buckets"], strict=True)
                ]
        counts.update(snap["counts"])
    return {
        "outcomes": [
            {"experiment": e, "variant": v, "metric": m, **moments.as_dict()}
            for (e, v, m), moments in sorted(outcomes.items())
        ],
        "system": [
            {"experiment": e, "variant": v, **dict(data, latency=data["latency"].as_dict())}
            for (e, v), data in sorted(system.items())
        ],
        "counts": dict(counts),
    }
