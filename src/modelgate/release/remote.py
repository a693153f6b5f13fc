"""`modelgate canary`: a canary controller outside the gateways, for a fleet behind a load
balancer. It reads the fleet's numbers from Prometheus and applies each step to every gateway
through its admin API (PUT /experiments/{name}/weights, with the bearer token from the
environment, the config or a token file when there is one).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from modelgate.admin.token import TOKEN_ENV, TOKEN_FILE_ENV, TokenFileError, client_token
from modelgate.config import CanarySpec, ConfigError, load_config, validate_config
from modelgate.release.canary import Canary, CanaryError, poll_interval
from modelgate.release.judge import ExperimentView, experiment_view
from modelgate.release.sources import PrometheusSource

__all__ = ["EXIT_CODES", "GatewaysTarget", "configure_parser", "run_from_args", "run_remote"]

log = logging.getLogger("modelgate.canary")

ADMIN_TIMEOUT_S = 10.0
# The process's exit code says how the canary ended (1: it could not run).
EXIT_CODES = {"promoted": 0, "rolled_back": 3, "inconclusive": 4, "paused": 5}


class GatewaysTarget:
    """Every gateway's admin API: weights go to each of them, the view comes from their
    running configs (GET /config), which must agree."""

    def __init__(self, admins: list[str], token: str | None, session: aiohttp.ClientSession):
        self.admins = [a.rstrip("/") for a in admins]
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=ADMIN_TIMEOUT_S)

    async def _call(self, method: str, url: str, body: Any = None) -> Any:
        try:
            async with self.session.request(
                method, url, json=body, headers=self.headers, timeout=self.timeout
            ) as response:
                answer = await response.json(content_type=None)
                if response.status != 200:
                    detail = answer.get("detail") if isinstance(answer, dict) else answer
                    raise CanaryError(f"{method} {url}: {response.status}: {detail}")
                return answer
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise CanaryError(f"{method} {url}: {exc!r}") from exc

    async def view(self, experiment: str) -> tuple[ExperimentView, dict[str, dict[str, float]]]:
        """The experiment as the first gateway runs it, and each gateway's weights."""
        raws = await asyncio.gather(*(self._call("GET", f"{a}/config") for a in self.admins))
        views: list[ExperimentView] = []
        for admin, raw in zip(self.admins, raws, strict=True):
            raw["admin_token"] = None  # redacted by the gateway; not needed here
            try:
                found = experiment_view(validate_config(raw), experiment)
            except ConfigError as exc:
                raise CanaryError(f"{admin}/config: {exc.errors[0]}") from exc
            if found is None:
                raise CanaryError(f"{admin}: runs no experiment named {experiment!r}")
            views.append(found)
        return views[0], {a: v.weights for a, v in zip(self.admins, views, strict=True)}

    async def set_weights(self, experiment: str, weights: dict[str, float], source: str) -> None:
        url = "{}/experiments/" + experiment + "/weights"
        results = await asyncio.gather(
            *(self._call("PUT", url.format(a), {"weights": weights}) for a in self.admins),
            return_exceptions=True,
        )
        failed = [str(r) for r in results if isinstance(r, BaseException)]
        if failed:
            raise CanaryError(f"{source}: " + "; ".join(failed))


async def run_remote(
    spec: CanarySpec,
    experiment: str,
    admins: list[str],
    prometheus: str,
    token: str | None,
) -> Canary:
    """Runs one canary until it is no longer running; prints each transition as a JSON line.
    Gives up (CanaryError) when the gateways cannot be read for max_wait_s in a row."""
    async with aiohttp.ClientSession() as session:
        target = GatewaysTarget(admins, token, session)
        view, _ = await target.view(experiment)
        source = PrometheusSource(prometheus, session, len(admins))
        canary = Canary(view, spec, target, source)
        canary.listeners.append(lambda entry: print(orjson.dumps(entry).decode(), flush=True))
        failing_since: float | None = None
        while not canary.started or canary.state == "running" or canary.pending is not None:
            try:
                view, weights = await target.view(experiment)
                failing_since = None
            except CanaryError as exc:
                now = canary.clock()
                failing_since = failing_since if failing_since is not None else now
                if now - failing_since > spec.wait_limit_s:
                    raise
                log.warning("canary %s: %s; retrying", experiment, exc)
            else:
                if len({tuple(sorted(w.items())) for w in weights.values()}) > 1 and (
                    canary.state == "running" and canary.pending is None
                ):
                    await canary.pause(f"modelgate canary: the gateways disagree: {weights}")
                await canary.tick(view)
            await asyncio.sleep(poll_interval(spec))
        return canary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the config with the experiment's canary")
    parser.add_argument("--experiment", required=True, help="the experiment to release")
    parser.add_argument(
        "--gateway",
        action="append",
        required=True,
        metavar="ADMIN_URL",
        help="a gateway's admin API, e.g. http://10.0.0.5:8081 (repeat for each gateway)",
    )
    parser.add_argument(
        "--prometheus",
        default=None,
        metavar="URL",
        help="the Prometheus server scraping the gateways (default: canary.prometheus_url)",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        default=None,
        help=f"read the admin bearer token from PATH (default: ${TOKEN_ENV}, the config's "
        f"admin_token, ${TOKEN_FILE_ENV}, the config's admin_token_file)",
    )
    parser.set_defaults(func=run_from_args)


def run_from_args(ns: argparse.Namespace) -> int:
    try:
        config = load_config(Path(ns.config))
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return 1
    view = experiment_view(config, ns.experiment)
    problem = None
    if view is None:
        problem = f"{ns.config}: no experiment named {ns.experiment!r}"
    elif view.canary is None:
        problem = f"{ns.config}: experiment {ns.experiment!r} has no canary"
    elif view.canary.source != "prometheus":
        problem = (
            f"{ns.config}: the canary of {ns.experiment!r} has source: local, so each gateway "
            "runs it itself; set source: prometheus to run it from here"
        )
    prometheus = ns.prometheus or (view.canary.prometheus_url if view and view.canary else None)
    if problem is None and prometheus is None:
        problem = "no Prometheus server: give --prometheus URL or canary.prometheus_url"
    if problem is not None or view is None or view.canary is None or prometheus is None:
        print(f"modelgate canary: {problem}", file=sys.stderr)
        return 1
    try:
        token = os.environ.get(TOKEN_ENV) or config.admin_token
        token = token or client_token(None, ns.token_file, config.admin_token_file)
    except TokenFileError as exc:
        print(f"modelgate canary: {exc}", file=sys.stderr)
        return 1
    try:
        canary = asyncio.run(run_remote(view.canary, ns.experiment, ns.gateway, prometheus, token))
    except CanaryError as exc:
        print(f"modelgate canary: {exc}", file=sys.stderr)
        return 1
    return EXIT_CODES.get(canary.state, 1)
