"""The canary controller: ramps one experiment's candidate step by step, judges each step's
window against the baseline, and promotes, rolls back, pauses or gives up (inconclusive),
keeping every transition with its evidence. `tick()` is called periodically.

Two kinds of numbers: per-unit evidence from the records (`source: local`,
modelgate.release.records; judged by modelgate.release.verdicts over units since the canary
began, with confidence sequences, off the event loop) or per-variant totals (a Prometheus
server over a fleet, `MetricsSource`; judged per window by modelgate.release.judge)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from modelgate.analysis.engine import AnalysisError
from modelgate.config import CanarySpec
from modelgate.release.judge import (
    Arm,
    CheckResult,
    ExperimentView,
    Snapshot,
    judge,
    srm_guard,
    window,
)
from modelgate.release.records import Evidence, EvidenceSource
from modelgate.release.verdicts import (
    feedback_metrics,
    judge_evidence,
    latency_quantiles,
    unit_srm_guard,
)

__all__ = [
    "HISTORY",
    "STATES",
    "Canary",
    "CanaryError",
    "CanaryStateError",
    "MetricsSource",
    "WeightTarget",
    "poll_interval",
]

log = logging.getLogger("modelgate.canary")

STATES = ("running", "paused", "promoted", "rolled_back", "inconclusive")
HISTORY = 50  # transitions kept per canary


class CanaryError(Exception):
    """Numbers could not be read or weights could not be applied; the controller retries."""


class CanaryStateError(Exception):
    """An action that does not fit the canary's state (resume a running canary, ...)."""


class MetricsSource(Protocol):
    async def snapshot(self, view: ExperimentView) -> Snapshot:
        """Cumulative totals per variant of the experiment; raises CanaryError."""


class WeightTarget(Protocol):
    async def set_weights(self, experiment: str, weights: dict[str, float], source: str) -> None:
        """Applies the weights everywhere (one atomic Plan swap per gateway); raises
        CanaryError when it could not."""


def poll_interval(spec: CanarySpec) -> float:
    """How often a controller looks: often enough to end a step close to its interval."""
    return min(1.0, max(0.05, spec.interval_s / 5.0))


def _judge(
    view: ExperimentView,
    spec: CanarySpec,
    source: EvidenceSource,
    metrics: list[str],
    began: float,
    step_began: float,
    srm_p: float,
) -> tuple[Evidence, dict[str, Any] | None, list[CheckResult]]:
    """Reading and judging, in a worker thread: the loop that serves requests never waits
    for either."""
    evidence = source.evidence(view, metrics, began, step_began, latency_quantiles(spec))
    return evidence, unit_srm_guard(view, spec, evidence, srm_p), judge_evidence(spec, evidence)


# The judging thread's nice value: on a core the proxy shares with it, the kernel gives the
# event loop most of the time and the judging the rest (Linux nices threads one by one;
# elsewhere the thread keeps the process's priority). 10, not 19: against a saturated loop
# CFS gives a nice-10 thread about a tenth of the core (weights 110 and 1024), where nice 19
# (weight 15) starved the judging of a busy gateway until its canaries ended inconclusive.
JUDGE_NICE = 10
_judges: concurrent.futures.ThreadPoolExecutor | None = None
_judges_lock = threading.Lock()


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), JUDGE_NICE)
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed
        log.debug("canary judging thread keeps its priority: %s", exc)


def judge_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that reads and judges the canaries' evidence, at the lowest priority:
    judging never takes the CPU from the requests it judges, and waits when they need it."""
    global _judges
    with _judges_lock:
        if _judges is None:
            _judges = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="modelgate-canary-judge", initializer=_lower_priority
            )
        return _judges


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


class Canary:
    """One experiment's canary. Weights are `{baseline: 100 - w, candidate: w}`; other
    variants keep theirs. All actions hold one lock, so a tick never interleaves with one."""

    look_every_s = 2.0  # per-unit looks: at most this often (each reads the records)

    def __init__(
        self,
        view: ExperimentView,
        spec: CanarySpec,
        target: WeightTarget,
        source: MetricsSource | None = None,
        *,
        evidence: EvidenceSource | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if (source is None) == (evidence is None):
            raise ValueError("a canary reads either totals (source) or per-unit evidence")
        self.experiment = view.name
        self.route = view.route
        self.spec = spec
        self.target = target
        self.source = source
        self.evidence = evidence
        self.clock = clock
        self.wall = wall
        self.state = "running"
        self.step = 0  # index into spec.steps
        self.weight: float | None = None  # the candidate's weight this controller expects
        self.pending: dict[str, float] | None = None  # weights still to apply (a retry)
        self.applied_at = 0.0  # wall time the weights in force were applied
        self.window_start: Snapshot | None = None
        self.window_started = 0.0  # monotonic: when window_start was taken
        self.window_asked = clock()  # monotonic: since when a window is wanted
        # Per-unit evidence: the records since `began` (wall) are judged; the step's own
        # since `step_began` (wall) count for min_samples and the sample-ratio guard.
        self.began: float | None = None
        self.step_began: float | None = None
        self.srm_p = 1.0  # the sequential SRM test's running p-value within the step
        self.judged_at = -math.inf  # monotonic: the last look at the evidence
        self.failures: dict[str, int] = {}
        self.last_evaluation: dict[str, Any] | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.since = wall()
        self.started = False
        self.lock = asyncio.Lock()
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    # --- weights ---------------------------------------------------------------------

    def _weights(self, candidate: float) -> dict[str, float]:
        return {self.spec.baseline: 100.0 - candidate, self.spec.candidate: candidate}

    async def _apply(self, candidate: float, why: str) -> None:
        """Sets the candidate's weight (the baseline takes the rest); on failure the weights
        stay pending and every tick retries them."""
        self.weight = candidate
        self.pending = self._weights(candidate)
        self._reset_window()
        await self._retry(why)

    def _reset_window(self) -> None:
        self.window_start = None
        self.window_asked = self.clock()
        self.step_began = None

    async def _retry(self, why: str = "retry") -> None:
        assert self.pending is not None
        source = f"canary {self.experiment}: {why}"
        try:
            await self.target.set_weights(self.experiment, self.pending, source)
        except CanaryError as exc:
            log.error(
                "canary %s: could not apply %s (%s); retrying", self.experiment, self.pending, exc
            )
            self._note("apply_failed", error=str(exc))
            return
        self.pending = None
        self.applied_at = self.wall()

    def _in_force(self, view: ExperimentView) -> bool:
        if self.weight is None:
            return False
        expected = self._weights(self.weight)
        return all(abs(view.weights.get(v, -1.0) - w) < 1e-9 for v, w in expected.items())

    # --- transitions -------------------------------------------------------------------

    def _record(self, event: str, to: str, reason: str, evidence: dict[str, Any] | None) -> None:
        now = self.wall()
        entry = {
            "time": _when(now),
            "event": event,
            "from": self.state if event != "start" else None,
            "to": to,
            "step": self.step + 1,
            "weight": self.weight,
            "reason": reason,
            "evidence": evidence,
        }
        self.history.append(entry)
        if to != self.state:
            self.since = now
        self.state = to
        level = logging.WARNING if to in ("rolled_back", "paused", "inconclusive") else logging.INFO
        log.log(
            level,
            "canary %s: %s -> %s (%s): %s; evidence %s",
            self.experiment,
            entry["from"],
            to,
            event,
            reason,
            evidence,
        )
        for listener in self.listeners:
            listener(entry)

    async def _promote(self, reason: str, evidence: dict[str, Any] | None) -> None:
        await self._apply(100.0, "promote")
        self._record("promoted", "promoted", reason, evidence)

    async def _rollback(self, reason: str, evidence: dict[str, Any] | None) -> None:
        await self._apply(0.0, "roll back")
        self._record("rolled_back", "rolled_back", reason, evidence)

    # --- the periodic work -------------------------------------------------------------

    async def tick(self, view: ExperimentView) -> None:
        async with self.lock:
            if not self.started:
                await self._start(view)
            elif self.pending is not None:
                await self._retry()
            elif self.state == "running":
                await self._run(view)

    async def _start(self, view: ExperimentView) -> None:
        self.started = True
        base, cand = view.weights[self.spec.baseline], view.weights[self.spec.candidate]
        steps = self.spec.steps
        if cand >= 100.0 and base == 0.0:
            self.weight = cand
            self._record("start", "promoted", "the candidate already has weight 100", None)
            return
        found = [
            k for k, w in enumerate(steps) if abs(w - cand) < 1e-9 and abs(base + cand - 100) < 1e-9
        ]
        if found:
            self.step, self.weight = found[0], cand
            self.applied_at = self.wall()
            self._record("start", "running", f"weights in force are step {self.step + 1}", None)
            return
        self.step = 0
        await self._apply(steps[0], f"step 1 (weight {steps[0]:g})")
        self._record(
            "start", "running", f"step 1 of {len(steps)}: candidate weight {steps[0]:g}", None
        )

    async def _run(self, view: ExperimentView) -> None:
        if not self._in_force(view):
            found = {v: view.weights.get(v) for v in (self.spec.baseline, self.spec.candidate)}
            self._record(
                "paused",
                "paused",
                "the weights were changed outside the controller",
                {"expected": self._weights(self.weight or 0.0), "found": found},
            )
            return
        if view.killed:
            # Killed: nobody is in the experiment; the step starts afresh after unkill.
            self._reset_window()
            self._note("held", reason="the experiment is killed")
            return
        if self.evidence is not None:
            await self._look(view)
            return
        if self.window_start is None:
            await self._open_window(view)
            return
        elapsed = self.clock() - self.window_started
        if elapsed < self.spec.interval_s:
            return
        assert self.source is not None
        try:
            now = await self.source.snapshot(view)
        except CanaryError as exc:
            await self._no_numbers(elapsed, error=str(exc))
            return
        arms = window(now, self.window_start)
        if arms is None:
            self._note("restarted", reason="a total went down (a gateway restarted): new window")
            self._reset_window()
            await self._open_window(view)
            return
        await self._evaluate(view, arms, elapsed)

    async def _look(self, view: ExperimentView) -> None:
        """The per-unit path: the step's window opens when its weights are in force; after
        interval_s, every look (at most every `look_every_s`) judges all the evidence since
        the canary began, in a thread."""
        assert self.evidence is not None
        now = self.clock()
        if self.step_began is None:
            self.step_began = max(self.applied_at, self.wall())
            if self.began is None:
                self.began = self.step_began
            self.window_started = now
            self.srm_p = 1.0
            return
        elapsed = now - self.window_started
        if elapsed < self.spec.interval_s or now - self.judged_at < self.look_every_s:
            return
        self.judged_at = now
        metrics = feedback_metrics(self.spec)
        evidence = self.evidence
        began, step_began = self.began or self.step_began, self.step_began
        try:
            seen = await asyncio.get_running_loop().run_in_executor(
                judge_executor(),
                _judge,
                view,
                self.spec,
                evidence,
                metrics,
                began,
                step_began,
                self.srm_p,
            )
        except (CanaryError, AnalysisError, OSError) as exc:
            await self._no_numbers(elapsed, error=str(exc))
            return
        evidence_read, srm, results = seen
        spec = self.spec
        samples = {
            "baseline": evidence_read.system.step_requests.get(spec.baseline, 0),
            "candidate": evidence_read.system.step_requests.get(spec.candidate, 0),
        }
        if min(samples.values()) < spec.min_samples:
            why = f"fewer than min_samples {spec.min_samples} measured requests on an arm"
            await self._no_numbers(elapsed, samples=samples, reason=why)
            return
        if srm is not None:
            self.srm_p = srm["p_value"]
        note = self._note(
            "judged",
            window_s=round(elapsed, 3),
            samples=samples,
            units={
                v: evidence_read.system.errors[v].count
                for v in (spec.baseline, spec.candidate)
                if v in evidence_read.system.errors
            },
            srm=srm,
            since=_when(began),
        )
        await self._decide(view, note, srm, results, elapsed)

    async def _open_window(self, view: ExperimentView) -> None:
        """Takes the window's starting totals once the source has seen the weights in force
        (Prometheus: a scrape after they were applied)."""
        waited = self.clock() - self.window_asked
        assert self.source is not None
        try:
            start = await self.source.snapshot(view)
        except CanaryError as exc:
            await self._no_numbers(waited, error=str(exc))
            return
        if start.as_of < self.applied_at:
            await self._no_numbers(waited, reason="the source has not seen the new weights yet")
            return
        self.window_start = start
        self.window_started = self.clock()

    def _note(self, decision: str, **evidence: Any) -> dict[str, Any]:
        """The last evaluation, as GET /canaries shows it."""
        self.last_evaluation = {
            "time": _when(self.wall()),
            "step": self.step + 1,
            "weight": self.weight,
            "decision": decision,
            **evidence,
        }
        return self.last_evaluation

    async def _no_numbers(self, elapsed: float, **evidence: Any) -> None:
        """Too little to judge: wait, up to max_wait_s."""
        note = self._note("waiting", window_s=round(elapsed, 3), **evidence)
        if elapsed >= self.spec.wait_limit_s:
            limit = self.spec.wait_limit_s
            await self._inconclusive(
                f"no decision after {elapsed:.1f} s (max_wait_s {limit:g})", note
            )

    async def _inconclusive(self, reason: str, evidence: dict[str, Any]) -> None:
        action = self.spec.on_inconclusive
        if action == "rollback":
            await self._rollback(f"inconclusive, on_inconclusive: rollback: {reason}", evidence)
        elif action == "promote":
            await self._promote(f"inconclusive, on_inconclusive: promote: {reason}", evidence)
        else:
            self._record("inconclusive", "inconclusive", reason, evidence)

    async def _evaluate(self, view: ExperimentView, arms: dict[str, Arm], elapsed: float) -> None:
        spec = self.spec
        base, cand = arms.get(spec.baseline, Arm()), arms.get(spec.candidate, Arm())
        samples = {"baseline": int(base.requests), "candidate": int(cand.requests)}
        if min(base.requests, cand.requests) < spec.min_samples:
            why = f"fewer than min_samples {spec.min_samples} on an arm"
            await self._no_numbers(elapsed, samples=samples, reason=why)
            return
        srm = srm_guard(view, spec, arms)
        note = self._note("judged", window_s=round(elapsed, 3), samples=samples, srm=srm)
        await self._decide(view, note, srm, judge(spec, base, cand), elapsed)

    async def _decide(
        self,
        view: ExperimentView,
        note: dict[str, Any],
        srm: dict[str, Any] | None,
        results: list[CheckResult],
        elapsed: float,
    ) -> None:
        spec = self.spec
        if srm is not None and srm["mismatch"]:
            note["decision"] = "paused"
            observed, expected, p = srm["counts"], srm["expected"], srm["p_value"]
            why = f"sample ratio mismatch: observed {observed}, expected {expected} (p = {p:.3g})"
            self._record("paused", "paused", why, note)
            return
        for result in results:
            if result.outcome == "fail":
                self.failures[result.metric] = self.failures.get(result.metric, 0) + 1
            elif result.outcome == "pass":
                self.failures.pop(result.metric, None)
        note.update(checks=[r.to_json() for r in results], failures=dict(self.failures))
        failed = [r for r in results if r.outcome == "fail"]
        over = [r for r in failed if self.failures[r.metric] >= spec.failure_limit]
        if over:
            note["decision"] = "rollback"
            worst = over[0]
            times = self.failures[worst.metric]
            numbers = f"baseline {worst.baseline:.4g}, candidate {worst.candidate:.4g}"
            why = f"{worst.metric} failed {times} time(s) in a row: {worst.detail} ({numbers})"
            await self._rollback(why, note)
        elif failed:
            note["decision"] = "new_window"
            names = ", ".join(r.metric for r in failed)
            why = f"{names} failed, below failure_limit {spec.failure_limit}: a new window"
            self._record("check_failed", "running", why, note)
            self._reset_window()
            if self.evidence is None:
                await self._open_window(view)
        elif any(r.outcome == "wait" for r in results):
            note["decision"] = "waiting"
            if elapsed >= spec.wait_limit_s:
                limit = spec.wait_limit_s
                why = f"checks undecided after {elapsed:.1f} s (max_wait_s {limit:g})"
                await self._inconclusive(why, note)
        else:
            note["decision"] = "advance"
            await self._advance(note)

    async def _advance(self, evidence: dict[str, Any]) -> None:
        steps = self.spec.steps
        if self.step + 1 >= len(steps) or steps[self.step + 1] >= 100.0:
            await self._promote(
                f"every check passed at step {self.step + 1} of {len(steps)}", evidence
            )
            return
        before = self.weight
        self.step += 1
        weight = steps[self.step]
        await self._apply(weight, f"step {self.step + 1} (weight {weight:g})")
        self._record(
            "step",
            "running",
            f"checks passed at weight {before:g}: step {self.step + 1}, weight {weight:g}",
            evidence,
        )

    # --- operator actions ----------------------------------------------------------------

    async def promote(self, who: str) -> None:
        async with self.lock:
            self.started = True
            await self._promote(f"promoted by {who}", None)

    async def rollback(self, who: str) -> None:
        async with self.lock:
            self.started = True
            await self._rollback(f"rolled back by {who}", None)

    async def pause(self, who: str) -> None:
        async with self.lock:
            if self.state not in ("running", "inconclusive"):
                raise CanaryStateError(
                    f"canary {self.experiment} is {self.state}; only a running or "
                    "inconclusive canary can be paused"
                )
            self._record("paused", "paused", f"paused by {who}", None)

    async def resume(self, view: ExperimentView, who: str) -> None:
        """A paused or inconclusive canary goes on at its step, with its weights re-applied
        when something else changed them, in a new window."""
        async with self.lock:
            if self.state not in ("paused", "inconclusive"):
                raise CanaryStateError(
                    f"canary {self.experiment} is {self.state}; only a paused or "
                    "inconclusive canary can be resumed"
                )
            self.failures.clear()
            self._reset_window()
            if not self._in_force(view):
                weight = self.spec.steps[self.step]
                await self._apply(weight, f"resume at step {self.step + 1} (weight {weight:g})")
            self._record("resumed", "running", f"resumed by {who}", None)

    # --- what the admin API shows --------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "route": self.route,
            "baseline": self.spec.baseline,
            "candidate": self.spec.candidate,
            "source": self.spec.source,
            "state": self.state,
            "since": _when(self.since),
            "step": self.step + 1,
            "steps": self.spec.steps,
            "weight": self.weight,
            "pending_weights": self.pending,
            "window_s": round(self.clock() - self.window_started, 3)
            if (self.window_start is not None or self.step_began is not None)
            and self.state == "running"
            else None,
            "judged_on": "units" if self.evidence is not None else "requests",
            "consecutive_failures": dict(self.failures),
            "last_evaluation": self.last_evaluation,
            "history": list(self.history),
        }
