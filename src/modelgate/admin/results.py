"""Admin API: `GET /experiments` and `GET /experiments/{name}`, an experiment's results: over
units from the exposure and feedback records in log_dir (the analysis engine, run in a
thread; issue 13), or, when exposures are not recorded, per event from the live snapshot
merged over every worker (modelgate.analysis.results); also the JSON helpers the admin extensions
share.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from modelgate.config import GatewayConfig
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


# The record writers flush once a second: results from the files lag the traffic by that.
FLUSH_LAG_S = 1.0


def _from_logs(log_dir: str, designs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-unit results of each design from the records in log_dir (blocking: a thread).
    The process's live engine for log_dir reads only what is new since its last refresh."""
    from modelgate.analysis.engine import ExperimentUnits
    from modelgate.analysis.live import live_engine
    from modelgate.analysis.system import system_units
    from modelgate.analysis.unit_results import ratio_pairs, unit_results
    from modelgate.stats import UnitStats

    note = f"records reach log_dir within {FLUSH_LAG_S:g} s (the writers flush once a second)"
    with live_engine(log_dir, threads=1).snapshot() as (engine, refresh):
        # The refresh began after this call: it saw what was flushed a lag before it began.
        as_of = datetime.fromtimestamp(refresh.started - FLUSH_LAG_S, UTC)
        stamp = as_of.isoformat(timespec="seconds")
        out = []
        for design in designs:
            name = design["name"]
            system = None
            if name in engine.experiments():
                units = engine.query(name, ratio_pairs(design))
                binary = engine.binary_metrics(name)
                engine.release()  # the query's working memory, before the latencies are read
                system = system_units(engine, name, units.variants)
            else:  # nobody exposed yet
                variants = list(design["variants"])
                units = ExperimentUnits(name, variants, {v: UnitStats() for v in variants})
                binary = {}
            found = unit_results(design, units, binary, system)
            out.append({**found, "source": "logs", "as_of": stamp, "as_of_note": note})
        return out


def _logged(config: GatewayConfig) -> bool:
    """Whether the results can come from the records: exposures on and log_dir there."""
    return config.exposures.enabled and Path(config.log_dir).is_dir()


def add_result_routes(app: web.Application, control: ControlPlane) -> None:
    """Registers the results endpoints on the admin app."""

    async def results_of(designs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        config = control.config
        if _logged(config):
            return await asyncio.to_thread(_from_logs, config.log_dir, designs)
        # Imported on the first call: the statistics need scipy (~0.6 s to import).
        from modelgate.analysis.results import experiment_results

        snapshot = await control.outcomes()
        return [{**experiment_results(d, snapshot), "source": "live"} for d in designs]

    async def all_results(request: web.Request) -> web.Response:
        version = control.version
        found = await results_of(list(experiment_designs(control.config).values()))
        return json_response(
            200,
            {"version": version, "experiments": [{"version": version, **r} for r in found]},
        )

    async def one_result(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        version = control.version
        designs = experiment_designs(control.config)
        design = designs.get(name)
        if design is None:
            return json_error(
                request,
                404,
                "unknown_experiment",
                f"no experiment named {name!r} (running: {sorted(designs)})",
            )
        (found,) = await results_of([design])
        return json_response(200, {"version": version, **found})

    app.router.add_get("/experiments", all_results)
    app.router.add_get("/experiments/{name}", one_result)
