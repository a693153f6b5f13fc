"""The canaries of one gateway's control plane (the single process, or the --workers parent):
a controller for every experiment whose `canary:` says `source: local`, kept in step with the
running config, ticked in the background, weights applied through the control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from modelgate.config import route_experiments
from modelgate.control import ReloadError
from modelgate.release.canary import Canary, CanaryError, poll_interval
from modelgate.release.judge import ExperimentView, experiment_view
from modelgate.release.records import RecordEvidence, warm_up
from modelgate.release.sources import CanaryCollector, local_totals

if TYPE_CHECKING:
    from modelgate.control import ControlPlane

__all__ = ["CanaryManager", "ControlTarget"]

log = logging.getLogger("modelgate.canary")

IDLE_POLL_S = 1.0  # with no canary running: how soon a reload that adds one is noticed


class ControlTarget:
    """Weights through this control plane: one atomic Plan swap in every worker."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    async def set_weights(self, experiment: str, weights: dict[str, float], source: str) -> None:
        try:
            await self.control.set_weights(experiment, weights, source)
        except ReloadError as exc:
            raise CanaryError(str(exc)) from exc


class CanaryManager:
    """Reloads are followed on every tick: a new `canary:` starts a controller; a changed one
    replaces it (re-armed from the weights in force, its history kept); a removed one, or one
    switched to `source: prometheus`, stops it and leaves the weights as they are."""

    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self.canaries: dict[str, Canary] = {}
        self.target = ControlTarget(control)
        self.records = RecordEvidence(control.config.log_dir)
        self._task: asyncio.Task[None] | None = None
        views = self.views().values()
        if any(v.canary is not None and v.canary.source == "local" for v in views):
            warm_up()  # at start-up, not in the first judgement's thread

    def views(self) -> dict[str, ExperimentView]:
        """Every experiment of the running config that has a canary."""
        config = self.control.config
        found = {}
        for route in config.routes:
            for _, spec in route_experiments(route):
                view = experiment_view(config, spec.name) if spec.canary is not None else None
                if view is not None:
                    found[spec.name] = view
        return found

    def sync(self) -> dict[str, ExperimentView]:
        views = self.views()
        for name in [n for n in self.canaries if n not in views]:
            log.warning(
                "canary %s: no longer in the config; stopped, weights left as they are", name
            )
            del self.canaries[name]
        for name, view in views.items():
            assert view.canary is not None
            current = self.canaries.get(name)
            if view.canary.source != "local":
                if current is not None:
                    log.warning("canary %s: now source %s; stopped here", name, view.canary.source)
                    del self.canaries[name]
                continue
            if current is not None and current.spec == view.canary:
                continue
            if self.records.log_dir != self.control.config.log_dir:
                self.records.close()
                self.records = RecordEvidence(self.control.config.log_dir)
            canary = Canary(view, view.canary, self.target, evidence=self.records)
            if current is not None:
                log.warning(
                    "canary %s: its config changed; restarted from the weights in force", name
                )
                canary.history.extend(current.history)
            self.canaries[name] = canary
        return views

    async def tick(self) -> None:
        views = self.sync()
        for name, canary in list(self.canaries.items()):
            try:
                await canary.tick(views[name])
            except Exception:  # a bug in one canary must not stop the others
                log.exception("canary %s: tick failed", name)

    async def run(self) -> None:
        while True:
            if not self.control.draining:
                try:
                    await self.tick()
                except Exception:  # the loop must outlive any bug: it is the only one
                    log.exception("canaries: tick failed")
            polls = [poll_interval(c.spec) for c in self.canaries.values()]
            await asyncio.sleep(min(polls, default=IDLE_POLL_S))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.records.close()

    # --- what the admin API and /metrics show ---------------------------------------------

    def get(self, name: str) -> Canary | None:
        return self.canaries.get(name)

    def to_json(self) -> list[dict[str, Any]]:
        out = []
        for name, view in sorted(self.sync().items()):
            canary = self.canaries.get(name)
            if canary is not None:
                out.append(canary.to_json())
                continue
            assert view.canary is not None
            out.append(
                {
                    "experiment": name,
                    "route": view.route,
                    "source": view.canary.source,
                    "state": "external",
                    "weight": view.weights[view.canary.candidate],
                    "detail": "source: prometheus: run by `modelgate canary` outside the gateway",
                }
            )
        return out

    async def collector(self) -> CanaryCollector:
        views = self.sync()
        rows = []
        if views:
            outcomes = await self.control.outcomes()
            counts = await self.control.counts()
            for name, view in sorted(views.items()):
                canary = self.canaries.get(name)
                state = canary.state if canary is not None else "external"
                rows.append((view, state, local_totals(view, outcomes, counts)))
        return CanaryCollector(self.control.version, rows)
