"""The control plane: the running config and its version, reloads (validate -> compile ->
swap, all or nothing), the reload history and last error. It drives a `PlanTarget` (this
process's Gateway, or the workers) and never sits on the request path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson

from modelgate.config import (
    RESTART_ONLY_KEYS,
    ConfigError,
    GatewayConfig,
    load_config,
    route_experiments,
    validate_config,
)
from modelgate.config_document import DocumentError, load_yaml
from modelgate.core import BUCKETS
from modelgate.outcomes import merge_snapshots
from modelgate.plan import CompiledExperiment, Plan, compile_plan, config_digest
from modelgate.safety import SafetyReport, safety_report
from modelgate.telemetry.counts import CountSlice, VersionedTally, VersionLogFilter, merge_exports

__all__ = [
    "REDACTED",
    "ControlPlane",
    "PlanTarget",
    "ReloadError",
    "ReloadResult",
    "parse_document",
]

log = logging.getLogger("modelgate.control")

REDACTED = "<redacted>"
HISTORY = 20


class PlanTarget(Protocol):
    """Where a new Plan goes: this process's Gateway, or every worker process."""

    async def apply(self, config: GatewayConfig, plan: Plan) -> None:
        """Swaps the Plan in everywhere, or raises ReloadError and leaves the old one."""

    async def workers(self) -> list[dict[str, Any]]:
        """Each serving process: pid, version, digest, connections, alive."""

    async def counters(self) -> list[dict[str, CountSlice]]:
        """Each serving process's counts by config version."""

    async def outcomes(self) -> list[dict[str, Any]]:
        """Each serving process's OutcomeStore.snapshot()."""

    async def telemetry(self) -> list[dict[str, Any]]:
        """Each serving process's live state: requests in flight, chaos rules and counts."""

    async def set_chaos(self, route: str, rule: str, enabled: bool) -> None:
        """Switches a chaos rule in every serving process; LookupError when one lacks it."""

    def ready(self) -> bool:
        """Serving a Plan and accepting connections."""


class ReloadError(Exception):
    """A reload that was refused; the running Plan keeps serving. `kind` says why."""

    def __init__(self, kind: str, errors: Sequence[str]) -> None:
        self.kind = kind
        self.errors = list(errors)
        super().__init__(f"{kind}: " + "; ".join(self.errors))


@dataclass(frozen=True)
class ReloadResult:
    result: str  # "applied" or "unchanged"
    version: int
    digest: str
    previous_version: int
    source: str
    safety: SafetyReport | None

    def to_json(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "version": self.version,
            "digest": self.digest,
            "previous_version": self.previous_version,
            "source": self.source,
            "safety": self.safety.to_json() if self.safety is not None else None,
        }


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def parse_document(body: bytes, content_type: str) -> Any:
    """A config sent in a request body: JSON when it says so, else YAML (JSON is YAML too)."""
    try:
        if "json" in content_type:
            return orjson.loads(body)
        return load_yaml(body.decode("utf-8"), "body")
    except orjson.JSONDecodeError as exc:
        where = f"(json) line {exc.lineno}, column {exc.colno}"
        raise ReloadError("unparseable", [f"{where}: {exc.msg}"]) from exc
    except UnicodeDecodeError as exc:
        raise ReloadError("unparseable", [f"(body): not UTF-8 text ({exc.reason})"]) from exc
    except DocumentError as exc:
        raise ReloadError("unparseable", exc.errors) from exc


class ControlPlane:
    """The source of truth for the running config; every reload goes through `apply`."""

    def __init__(self, plan: Plan, target: PlanTarget, config_path: Path | None = None) -> None:
        self.plan = plan  # the running Plan; its config is the source of truth
        self.target = target
        self.config_path = config_path
        self.started_at = time.time()
        self.draining = False
        self.admin_address: tuple[str, int] | None = None  # set once the admin API listens
        self.reloads = VersionedTally(plan.version)
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.last_success: dict[str, Any] | None = None
        self.last_success_time: float | None = None
        self.last_error: dict[str, Any] | None = None
        self.last_attempt_ok = True
        self._lock = asyncio.Lock()  # one reload at a time: versions never interleave
        self._background: set[asyncio.Task[None]] = set()
        # (the file's stat, its digest or None, its errors): file_state's cache.
        self._file_digest: tuple[tuple[int, ...], str | None, list[str] | None] | None = None
        VersionLogFilter.set_version(plan.version)

    @property
    def config(self) -> GatewayConfig:
        return self.plan.config

    @property
    def version(self) -> int:
        return self.plan.version

    # --- reload entry points -----------------------------------------------------------

    async def reload_from_file(self, source: str = "file") -> ReloadResult:
        """Re-reads the config file (SIGHUP, --watch, POST /reload without a body)."""
        if self.config_path is None:
            raise self._refuse(
                source,
                ReloadError(
                    "no_config_file",
                    ["(file): not started from a config file; send the config in the body"],
                ),
            )
        try:
            # Off the event loop: a large YAML file takes seconds of pure-Python parsing, and
            # in a single-process gateway this loop also serves the traffic.
            config = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            kind = "unparseable" if exc.errors[0].startswith(("(yaml)", "(file)")) else "invalid"
            raise self._refuse(source, ReloadError(kind, exc.errors)) from exc
        return await self.apply(config, source)

    async def reload_from_document(self, raw: Any, source: str) -> ReloadResult:
        """A config given as parsed JSON/YAML (POST /reload with a body)."""
        if isinstance(raw, dict) and raw.get("admin_token") == REDACTED:
            # A config fetched from GET /config comes back with the token hidden: keep ours.
            raw = {**raw, "admin_token": self.config.admin_token}
        raw = _restore_feedback_secrets(raw, self.config)
        try:
            config = await asyncio.to_thread(validate_config, raw)
        except ConfigError as exc:
            raise self._refuse(source, ReloadError("invalid", exc.errors)) from exc
        return await self.apply(config, source)

    async def reload_from_body(self, body: bytes, content_type: str, source: str) -> ReloadResult:
        """POST /reload with a JSON or YAML config in the body."""
        try:
            raw = await asyncio.to_thread(parse_document, body, content_type)
        except ReloadError as exc:
            raise self._refuse(source, exc) from exc
        return await self.reload_from_document(raw, source)

    async def set_weights_from_body(self, experiment: str, body: bytes) -> ReloadResult:
        """PUT /experiments/{name}/weights with `{"weights": {...}}` or `{"weights": [...]}`."""
        try:
            document = parse_document(body, "application/json")
        except ReloadError as exc:
            raise self._refuse(f"PUT /experiments/{experiment}/weights", exc) from exc
        if not isinstance(document, dict) or "weights" not in document:
            raise self._refuse(
                f"PUT /experiments/{experiment}/weights",
                ReloadError(
                    "invalid",
                    ['(body): expected {"weights": {"variant": weight}} or {"weights": [...]}'],
                ),
            )
        return await self.set_weights(experiment, document["weights"])

    async def set_weights(
        self, experiment: str, weights: Any, source: str | None = None
    ) -> ReloadResult:
        """PUT /experiments/{name}/weights (or a canary step): the running config with new
        weights, applied like any reload. The file is not rewritten."""
        return await self.edit_experiment(
            experiment,
            lambda spec: _apply_weights(spec["variants"], weights),
            source or f"PUT /experiments/{experiment}/weights",
        )

    async def edit_experiment(
        self, experiment: str, edit: Callable[[dict[str, Any]], list[str]], source: str
    ) -> ReloadResult:
        """The running config with one experiment's spec (as JSON) changed in place by `edit`,
        which returns every problem it found; applied like any reload, the file untouched."""
        raw = self.config.model_dump(mode="json")
        specs = [
            spec
            for route in raw["routes"]
            for spec in [route.get("experiment"), *route.get("experiments", [])]
            if spec is not None and spec["name"] == experiment
        ]
        if not specs:
            names = sorted(e.name for r in self.config.routes for _, e in route_experiments(r))
            raise self._refuse(
                source,
                ReloadError(
                    "unknown_experiment",
                    [f"(path): no experiment named {experiment!r} (running: {names})"],
                ),
            )
        errors = edit(specs[0])
        if errors:
            raise self._refuse(source, ReloadError("invalid", errors))
        return await self.reload_from_document(raw, source)

    def reload_in_background(self, source: str) -> None:
        """SIGHUP and --watch: reload without a caller to answer; the outcome is logged."""

        async def run() -> None:
            try:
                await self.reload_from_file(source)
            except ReloadError:
                pass  # already logged and recorded by _refuse

        task = asyncio.get_running_loop().create_task(run())
        # The loop keeps only a weak reference to tasks: hold this one until it is done.
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- the one way a config is applied ---------------------------------------------

    async def apply(self, config: GatewayConfig, source: str) -> ReloadResult:
        """Checks restart-only keys, compiles, and swaps the new Plan in everywhere."""
        async with self._lock:
            running = self.config
            changed = [k for k in RESTART_ONLY_KEYS if getattr(config, k) != getattr(running, k)]
            if changed:
                raise self._refuse(
                    source,
                    ReloadError(
                        "restart_required", [_restart_message(k, running, config) for k in changed]
                    ),
                )
            previous = self.plan.version
            digest = config_digest(config)
            if digest == self.plan.digest:
                self.reloads.count("unchanged")
                self.last_attempt_ok = True
                log.info("reload from %s: no change, still version %d", source, previous)
                return ReloadResult("unchanged", previous, digest, previous, source, None)
            try:
                plan = compile_plan(config, version=previous + 1)
            except Exception as exc:  # a validated config should compile; say so if not
                raise self._refuse(source, ReloadError("invalid", [f"(compile) {exc!r}"])) from exc
            report = safety_report(running, config)
            try:
                await self.target.apply(config, plan)
            except ReloadError as exc:
                raise self._refuse(source, exc) from exc
            self.reloads.count("ok")
            self.plan = plan
            self.reloads.begin_version(plan.version)
            VersionLogFilter.set_version(plan.version)
            now = time.time()
            self.last_attempt_ok = True
            self.last_success_time = now
            self.last_success = {"version": plan.version, "time": _when(now), "source": source}
            self.history.append({**self.last_success, "digest": plan.digest, "result": "ok"})
            lines = report.lines()
            log.info(
                "reloaded from %s: version %d -> %d (%s)%s",
                source,
                previous,
                plan.version,
                plan.digest,
                "".join(f"\n  {line}" for line in lines),
            )
            return ReloadResult("applied", plan.version, plan.digest, previous, source, report)

    def _refuse(self, source: str, error: ReloadError) -> ReloadError:
        """Records a refused reload (status, metric, log) and hands the error back to raise."""
        self.reloads.count(error.kind)
        self.last_attempt_ok = False
        now = time.time()
        self.last_error = {
            "time": _when(now),
            "source": source,
            "kind": error.kind,
            "errors": error.errors,
            "serving_version": self.plan.version,
        }
        self.history.append({**self.last_error, "result": error.kind})
        log.error(
            "reload from %s refused (%s), still serving version %d:%s",
            source,
            error.kind,
            self.plan.version,
            "".join(f"\n  {e}" for e in error.errors),
        )
        return error

    # --- what the admin API shows ---------------------------------------------------

    def running_config(self) -> dict[str, Any]:
        """The running config as JSON, secrets redacted."""
        raw = self.config.model_dump(mode="json")
        if raw.get("admin_token") is not None:
            raw["admin_token"] = REDACTED
        for key in _FEEDBACK_SECRETS:
            if raw["feedback"].get(key) is not None:
                raw["feedback"][key] = REDACTED
        return raw

    def file_state(self) -> dict[str, Any]:
        """Whether the config file still says what is running (PUT weights makes it differ).
        The file is parsed again only when its stat changed: /status may be polled often."""
        if self.config_path is None:
            return {"path": None, "differs_from_running": None, "error": None}
        try:
            st = os.stat(self.config_path)
            key: tuple[int, ...] = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            key = ()
        cached = self._file_digest
        if cached is None or cached[0] != key or not key:
            try:
                cached = (key, config_digest(load_config(self.config_path)), None)
            except ConfigError as exc:
                cached = (key, None, exc.errors)
            self._file_digest = cached
        _, digest, errors = cached
        if digest is None:
            return {
                "path": str(self.config_path),
                "differs_from_running": None,
                "error": errors,
            }
        return {
            "path": str(self.config_path),
            "digest": digest,
            "differs_from_running": digest != self.plan.digest,
            "error": None,
        }

    async def counts(self) -> dict[str, CountSlice]:
        return merge_exports(await self.target.counters())

    async def outcomes(self) -> dict[str, Any]:
        """Feedback outcomes and per-variant system metrics, merged over the workers."""
        return merge_snapshots(await self.target.outcomes())

    async def status(self) -> dict[str, Any]:
        plan = self.plan
        workers, counts = await asyncio.gather(self.target.workers(), self.counts())
        # Each serving process says which config version it serves; `current` when that is
        # the control plane's (with --workers, one behind has missed a commit: see
        # runtime/workers.py).
        workers = [{"current": w.get("version") == plan.version, **w} for w in workers]
        totals = self.reloads.totals()
        return {
            "version": plan.version,
            "digest": plan.digest,
            "pid": os.getpid(),
            "started_at": _when(self.started_at),
            "uptime_s": round(time.time() - self.started_at, 3),
            "ready": self.ready(),
            "draining": self.draining,
            "config_file": await asyncio.to_thread(self.file_state),
            "routes": _route_summary(plan, counts),
            "workers": workers,
            "workers_current": all(w["current"] for w in workers if w.get("alive", True)),
            "last_reload": self.last_success,
            "last_reload_error": self.last_error,
            "reloads": {
                "ok": totals["ok"],
                "unchanged": totals["unchanged"],
                "failed": sum(n for k, n in totals.items() if k not in ("ok", "unchanged")),
            },
            "history": list(self.history),
        }

    def ready(self) -> bool:
        return not self.draining and self.target.ready()


_FEEDBACK_SECRETS = ("secret", "unit_secret")


def _restore_feedback_secrets(raw: Any, running: GatewayConfig) -> Any:
    """The feedback secrets GET /config hid, put back from the running config."""
    feedback = raw.get("feedback") if isinstance(raw, dict) else None
    if not isinstance(feedback, dict):
        return raw
    hidden = {
        k: getattr(running.feedback, k) for k in _FEEDBACK_SECRETS if feedback.get(k) == REDACTED
    }
    return {**raw, "feedback": {**feedback, **hidden}} if hidden else raw


def _restart_message(key: str, running: GatewayConfig, new: GatewayConfig) -> str:
    if key == "admin_token":
        return "admin_token: changing it needs a restart; nothing was applied"
    return (
        f"{key}: changing it needs a restart (running {getattr(running, key)!r}, "
        f"new {getattr(new, key)!r}); nothing was applied"
    )


def _apply_weights(variants: list[dict[str, Any]], weights: Any) -> list[str]:
    """Writes `weights` (a mapping by variant name, or a list in variant order) into the
    variants; returns every problem found, each with its key path."""
    names = [v["name"] for v in variants]
    if isinstance(weights, list):
        if len(weights) != len(names):
            return [
                f"weights: expected {len(names)} weights, one per variant {names}, "
                f"got {len(weights)}"
            ]
        weights = dict(zip(names, weights, strict=True))
    if not isinstance(weights, dict) or not weights:
        return ["weights: expected a mapping {variant: weight} or a list in variant order"]
    errors = []
    for name, weight in weights.items():
        if name not in names:
            errors.append(f"weights.{name}: unknown variant {name!r} (variants: {names})")
        elif isinstance(weight, bool) or not isinstance(weight, int | float):
            errors.append(f"weights.{name}: expected a number, got {weight!r}")
        else:
            variants[names.index(name)]["weight"] = weight
    return errors


def _route_summary(plan: Plan, counts: dict[str, CountSlice]) -> list[dict[str, Any]]:
    by_route: dict[str, dict[str, Any]] = {}
    for counted in counts.values():
        for (route_name, variant, status), n in counted.responses.items():
            entry = by_route.setdefault(route_name, {"total": 0, "by_variant": {}, "by_class": {}})
            entry["total"] += n
            if variant:
                entry["by_variant"][variant] = entry["by_variant"].get(variant, 0) + n
            status_class = f"{status // 100}xx"
            entry["by_class"][status_class] = entry["by_class"].get(status_class, 0) + n
    out = []
    for route in plan.routes:
        summary: dict[str, Any] = {
            "name": route.name,
            "path_prefix": route.spec.match.path_prefix,
            "path_separated_prefix": route.spec.match.path_separated_prefix,
            "upstream": route.upstream,
            "experiment": None,
            "shadows": [s.upstream for s in route.spec.shadows],
            "chaos": [c.name for c in route.spec.chaos],
            "requests": by_route.get(route.name, {"total": 0, "by_variant": {}, "by_class": {}}),
        }
        # Every experiment of the route (`experiments`); `experiment` stays the first's.
        summary["experiments"] = [_experiment_summary(e) for e in route.experiments]
        if summary["experiments"]:
            summary["experiment"] = summary["experiments"][0]
        out.append(summary)
    return out


def _experiment_summary(exp: CompiledExperiment) -> dict[str, Any]:
    bounds = (0, *exp.table.boundaries)
    return {
        "name": exp.name,
        "salt": exp.salt,
        "variants": [
            {
                "name": v.name,
                "upstream": v.upstream,
                "weight": w,
                "share": (bounds[i + 1] - bounds[i]) / BUCKETS,
            }
            for i, (v, w) in enumerate(zip(exp.variants, exp.table.weights, strict=True))
        ],
    }
