"""Admin API: `GET /experiments` and `GET /experiments/{name}`, an experiment's results merged
over every worker (see modelgate.results); also the JSON helpers the admin extensions share.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from aiohttp import web

from modelgate.control import ControlPlane
from modelgate.http11 import is_valid_request_id
from modelgate.outcomes import experiment_designs

__all__ = ["add_result_routes", "json_error", "json_response"]


def json_response(status: int, body: Any) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY),
        content_type="application/json",
    )


def json_error(request: web.Request, status: int, code: str, detail: str) -> web.Response:
    """The gateway's error format (DESIGN.md): error, detail, request_id."""
    given = request.headers.get("x-request-id", "")
    valid = given and is_valid_request_id(given.encode("latin-1", "replace"))
    rid = given if valid else uuid.uuid4().hex
    return json_response(status, {"error": code, "detail": detail, "request_id": rid})


def add_result_routes(app: web.Application, control: ControlPlane) -> None:
    """Registers the results endpoints on the admin app."""

    # Imported on the first call: the statistics need scipy, which takes ~0.6 s to import,
    # and the gateway should not wait for it at start-up.
    async def all_results(request: web.Request) -> web.Response:
        from modelgate.results import experiment_results

        designs = experiment_designs(control.config)
        snapshot = await control.outcomes()
        return json_response(
            200,
            {
                "version": control.version,
                "experiments": [
                    {"version": control.version, **experiment_results(d, snapshot)}
                    for d in designs.values()
                ],
            },
        )

    async def one_result(request: web.Request) -> web.Response:
        from modelgate.results import experiment_results

        name = request.match_info["name"]
        designs = experiment_designs(control.config)
        design = designs.get(name)
        if design is None:
            return json_error(
                request,
                404,
                "unknown_experiment",
                f"no experiment named {name!r} (running: {sorted(designs)})",
            )
        snapshot = await control.outcomes()
        return json_response(
            200, {"version": control.version, **experiment_results(design, snapshot)}
        )

    app.router.add_get("/experiments", all_results)
    app.router.add_get("/experiments/{name}", one_result)
