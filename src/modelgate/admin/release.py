"""Admin API: release controls. The canaries (GET /canaries, POST
/canaries/{experiment}/promote|rollback|pause|resume), the blue/green switch and the kill
switch (POST /experiments/{name}/switch|kill|unkill), all applied through the control plane.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from modelgate.admin.results import json_error, json_response
from modelgate.control import ControlPlane, ReloadError
from modelgate.release.canary import CanaryStateError
from modelgate.release.judge import experiment_view
from modelgate.release.manager import CanaryManager
from modelgate.release.sources import CanaryCollector

__all__ = ["CANARIES", "add_release_api", "canary_collector"]

CANARIES: web.AppKey[CanaryManager] = web.AppKey("canaries", CanaryManager)
Edit = Callable[[dict[str, Any]], list[str]]
_REFUSALS = {
    "unknown_experiment": (404, "unknown_experiment"),
    "invalid": (409, "not_blue_green"),
}


def _swap(spec: dict[str, Any]) -> list[str]:
    """Blue/green: the two variants trade weights (one of them is 0)."""
    variants = spec["variants"]
    weights = [v["weight"] for v in variants]
    if len(variants) != 2 or sorted(w == 0 for w in weights) != [False, True]:
        found = {v["name"]: v["weight"] for v in variants}
        return [
            f"(experiment {spec['name']}): a switch needs exactly two variants, one of them at "
            f"weight 0 (blue/green); the weights are {found}"
        ]
    variants[0]["weight"], variants[1]["weight"] = weights[1], weights[0]
    return []


def _killed(killed: bool) -> Edit:
    def edit(spec: dict[str, Any]) -> list[str]:
        spec["killed"] = killed
        return []

    return edit


def add_release_api(app: web.Application, control: ControlPlane) -> None:
    """Registers the endpoints, and runs the canaries for as long as the admin app runs."""
    manager = CanaryManager(control)
    app[CANARIES] = manager

    async def list_canaries(request: web.Request) -> web.Response:
        return json_response(200, {"version": control.version, "canaries": manager.to_json()})

    async def act(request: web.Request) -> web.Response:
        name, action = request.match_info["experiment"], request.match_info["action"]
        known = {c["experiment"]: c for c in manager.to_json()}
        canary = manager.get(name)
        if canary is None:
            if name in known:
                detail = (
                    f"the canary of {name!r} has source: {known[name]['source']}, so "
                    "`modelgate canary` runs it outside the gateway; act on it there"
                )
                return json_error(request, 409, "external_canary", detail)
            detail = f"no canary for experiment {name!r} (canaries: {sorted(known)})"
            return json_error(request, 404, "unknown_canary", detail)
        who = f"POST {request.path}"
        try:
            if action == "promote":
                await canary.promote(who)
            elif action == "rollback":
                await canary.rollback(who)
            elif action == "pause":
                await canary.pause(who)
            else:
                view = experiment_view(control.config, name)
                assert view is not None  # the manager has just found it there
                await canary.resume(view, who)
        except CanaryStateError as exc:
            return json_error(request, 409, "canary_state", str(exc))
        if canary.pending is not None:
            error = (canary.last_evaluation or {}).get("error", "unknown")
            detail = (
                f"{action}: the weights {canary.pending} are not applied yet ({error}); the "
                "controller retries on every tick"
            )
            return json_error(request, 500, "apply_failed", detail)
        return json_response(200, canary.to_json())

    async def edit(request: web.Request) -> web.Response:
        """switch, kill, unkill: the running config edited and applied like a reload (the
        file is not rewritten)."""
        name, action = request.match_info["name"], request.match_info["action"]
        change = _swap if action == "switch" else _killed(action == "kill")
        try:
            result = await control.edit_experiment(name, change, f"POST {request.path}")
        except ReloadError as exc:
            # What these edits can meet: an unknown experiment, a switch of what is not
            # blue/green (the only edit that finds problems), workers that refused.
            status, code = _REFUSALS.get(exc.kind, (500, exc.kind))
            return json_error(request, status, code, "; ".join(exc.errors))
        after = experiment_view(control.config, name)
        assert after is not None
        return json_response(
            200,
            {
                **result.to_json(),
                "experiment": name,
                "weights": after.weights,
                "killed": after.killed,
                "default": after.default,
            },
        )

    async def start(_: web.Application) -> None:
        manager.start()

    async def stop(_: web.Application) -> None:
        await manager.stop()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_get("/canaries", list_canaries)
    app.router.add_post("/canaries/{experiment}/{action:promote|rollback|pause|resume}", act)
    app.router.add_post("/experiments/{name}/{action:switch|kill|unkill}", edit)


async def canary_collector(app: web.Application) -> CanaryCollector:
    """The canaries' metrics, for GET /metrics."""
    return await app[CANARIES].collector()
