"""Admin API: chaos runtime switches. `GET /chaos` lists every rule with its live state and
counters merged over the workers; `POST /chaos/{route}/{rule}/enable|disable` switches a rule
in every worker at once, without a reload (the switch outlives reloads that keep the rule).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from aiohttp import web

from modelgate.admin.results import json_error, json_response
from modelgate.control import ControlPlane

__all__ = ["add_chaos_routes", "merge_chaos"]


def merge_chaos(processes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each process's chaos snapshot as one list: counts and active faults summed; a rule is
    `enabled` when it is in every process (`enabled_in` says in how many)."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for process in processes:
        for rule in process["chaos"]:
            key = (rule["route"], rule["rule"])
            entry = merged.get(key)
            if entry is None:
                entry = merged[key] = {**rule, "counts": Counter(), "active": 0, "enabled_in": 0}
            entry["counts"].update(rule["counts"])
            entry["active"] += rule["active"]
            entry["enabled_in"] += 1 if rule["enabled"] else 0
    out = []
    for entry in merged.values():
        entry["enabled"] = entry["enabled_in"] == len(processes)
        entry["counts"] = dict(entry["counts"])
        out.append(entry)
    return out


def add_chaos_routes(app: web.Application, control: ControlPlane) -> None:
    """Registers the chaos endpoints on the admin app."""

    async def list_rules(request: web.Request) -> web.Response:
        processes = await control.target.telemetry()
        return json_response(
            200,
            {
                "version": control.version,
                "workers": len(processes),
                "rules": merge_chaos(processes),
            },
        )

    async def switch(request: web.Request) -> web.Response:
        route, rule, action = (request.match_info[k] for k in ("route", "rule", "action"))
        if action not in ("enable", "disable"):
            return json_error(
                request,
                404,
                "not_found",
                f"POST {request.path}: expected .../enable or .../disable",
            )
        rules = {(r.name, c.name) for r in control.plan.routes for c in r.chaos}
        if (route, rule) not in rules:
            known = sorted(f"{r}/{c}" for r, c in rules)
            return json_error(
                request,
                404,
                "unknown_chaos_rule",
                f"no chaos rule {rule!r} on route {route!r} (rules: {known})",
            )
        try:
            await control.target.set_chaos(route, rule, action == "enable")
        except LookupError as exc:  # a worker still on another config version
            return json_error(request, 409, "chaos_switch_failed", str(exc))
        except (ConnectionError, TimeoutError) as exc:
            return json_error(request, 503, "chaos_switch_failed", str(exc))
        return json_response(
            200,
            {
                "route": route,
                "rule": rule,
                "enabled": action == "enable",
                "version": control.version,
            },
        )

    app.router.add_get("/chaos", list_rules)
    app.router.add_post("/chaos/{route}/{rule}/{action}", switch)
