"""The admin API: bearer-token protection, its separation from the proxy's listener, its
endpoints' shapes and errors, and the start-up rule for non-loopback addresses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from modelgate.admin.app import ADMIN_TOKEN_ENV, check_admin_exposure, resolve_admin_token
from modelgate.config import validate_config
from modelgate.control import REDACTED
from modelgate.mock.server import MockSettings
from modelgate.server import StartupError

from .support import JSON_TYPE, ab_config, admin_stack, async_test

MOCKS = {"model-a": MockSettings(name="model-a"), "model-b": MockSettings(name="model-b")}
TOKEN = "test-token-0123456789abcdef"

CALLS: list[tuple[str, str, Any]] = [
    ("GET", "/status", None),
    ("GET", "/config", None),
    ("GET", "/metrics", None),
    ("GET", "/healthz", None),
    ("GET", "/readyz", None),
    ("POST", "/reload", None),
    ("PUT", "/experiments/ranker/weights", {"weights": [1, 1]}),
    ("GET", "/no-such-endpoint", None),
]


@async_test
async def test_every_call_needs_the_token_when_one_is_configured() -> None:
    async with admin_stack(ab_config(), MOCKS, token=TOKEN) as admin:
        async with aiohttp.ClientSession() as session:
            for header in (None, "Bearer wrong-token-0123456789", TOKEN, f"Basic {TOKEN}"):
                headers = {"Authorization": header} if header is not None else {}
                for method, path, body in CALLS:
                    async with session.request(
                        method, admin.admin_url + path, json=body, headers=headers
                    ) as response:
                        assert response.status == 401, (method, path, header)
                        error = await response.json()
                        assert error["error"] == "unauthorized"
                        assert set(error) == {"error", "detail", "request_id"}
                        assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert admin.control.version == 1  # the refused PUT and POST changed nothing
            authorized = {"Authorization": f"Bearer {TOKEN}"}
            async with session.get(admin.admin_url + "/status", headers=authorized) as response:
                assert response.status == 200
                assert (await response.json())["version"] == 1
            async with session.put(
                admin.admin_url + "/experiments/ranker/weights",
                json={"weights": [1, 3]},
                headers=authorized,
            ) as response:
                assert response.status == 200
                assert (await response.json())["version"] == 2


@async_test
async def test_the_admin_api_is_not_on_the_main_listener() -> None:
    only_predict = ab_config()
    del only_predict["routes"][1]
    async with admin_stack(only_predict, MOCKS) as admin:
        async with aiohttp.ClientSession() as session:
            for method, path, body in CALLS:
                async with session.request(method, admin.stack.url + path, json=body) as response:
                    assert response.status == 404, path
                    assert (await response.json())["error"] == "no_route"
        assert admin.control.version == 1
    async with admin_stack(ab_config(), MOCKS) as admin:
        async with aiohttp.ClientSession() as session:
            for method, path, body in CALLS:
                async with session.request(method, admin.stack.url + path, json=body) as response:
                    # The catch-all route proxies it to the model, like any other path.
                    assert response.headers["x-modelgate-route"] == "default", path
                    assert response.headers["x-mock-model"] == "model-a"
        assert admin.control.version == 1


@async_test
async def test_status_config_health_and_errors() -> None:
    config = ab_config((90, 10), admin_token=TOKEN)
    async with admin_stack(config, MOCKS) as admin:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(headers=auth) as session:
            async with session.get(admin.admin_url + "/status") as response:
                status = await response.json()
            assert status["version"] == 1 and len(status["digest"]) == 16
            assert status["uptime_s"] >= 0 and status["ready"] is True
            assert status["last_reload_error"] is None
            assert [w["version"] for w in status["workers"]] == [1]
            predict = status["routes"][0]
            assert predict["name"] == "predict"
            assert [v["share"] for v in predict["experiment"]["variants"]] == [0.9, 0.1]

            async with session.get(admin.admin_url + "/config") as response:
                running = await response.json()
                assert response.headers["x-modelgate-config-version"] == "1"
            assert running["admin_token"] == REDACTED
            assert TOKEN not in str(running)
            # A fetched config posted back keeps the real token: nothing changed.
            async with session.post(admin.admin_url + "/reload", json=running) as response:
                assert response.status == 200
                assert (await response.json())["result"] == "unchanged"

            async with session.get(admin.admin_url + "/healthz") as response:
                assert response.status == 200
            async with session.get(admin.admin_url + "/readyz") as response:
                assert response.status == 200
            admin.control.draining = True
            async with session.get(admin.admin_url + "/readyz") as response:
                assert response.status == 503
                assert (await response.json())["error"] == "not_ready"
            admin.control.draining = False

            async with session.get(admin.admin_url + "/nope") as response:
                assert response.status == 404
                assert (await response.json())["error"] == "not_found"
            async with session.delete(admin.admin_url + "/status") as response:
                assert response.status == 405
                assert (await response.json())["error"] == "method_not_allowed"
            async with session.post(admin.admin_url + "/reload", headers=JSON_TYPE) as response:
                assert response.status == 409  # started without a config file
                assert (await response.json())["error"] == "no_config_file"


@async_test
async def test_metrics_are_valid_prometheus_text() -> None:
    async with admin_stack(ab_config(), MOCKS) as admin:
        async with aiohttp.ClientSession() as session:
            for unit in ("a", "b", "c"):
                async with session.post(
                    admin.stack.url + "/predict", json={}, headers={"x-user-id": unit}
                ) as response:
                    assert response.status == 200
            async with session.get(admin.stack.url + "/missing-route-but-default") as response:
                assert response.status == 200
            async with session.get(admin.admin_url + "/metrics") as response:
                assert response.headers["Content-Type"].startswith("text/plain")
                text = await response.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "modelgate_requests",
        "modelgate_upstream_errors",
        "modelgate_config_reloads",
        "modelgate_config_info",
        "modelgate_config_version",
        "modelgate_workers",
    ):
        assert name in families, name
    requests = families["modelgate_requests"]
    assert requests.type == "counter"
    total = sum(s.value for s in requests.samples if s.name == "modelgate_requests_total")
    assert total == 4
    for family in families.values():
        for sample in family.samples:
            assert sample.labels["config_version"] == "1", sample


def test_admin_off_loopback_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    exposed = validate_config(ab_config(admin="0.0.0.0:8081"))
    with pytest.raises(StartupError, match="0.0.0.0:8081 is not a loopback address"):
        check_admin_exposure(exposed, resolve_admin_token(exposed))
    for loopback in ("127.0.0.1:0", "[::1]:0", "localhost:0"):
        check_admin_exposure(validate_config(ab_config(admin=loopback)), None)
    with_token = validate_config(ab_config(admin="0.0.0.0:8081", admin_token=TOKEN))
    check_admin_exposure(with_token, resolve_admin_token(with_token))
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "from-the-environment-0123")
    assert resolve_admin_token(with_token) == "from-the-environment-0123"
    check_admin_exposure(exposed, resolve_admin_token(exposed))


def test_a_short_token_is_a_config_error() -> None:
    with pytest.raises(Exception, match="admin_token: must be 16 to 512 visible ASCII"):
        validate_config(ab_config(admin_token="short"))


def _two_experiments(**extra: Any) -> dict[str, Any]:
    """The A/B route with a second experiment on the same traffic (flags the model reads)."""
    config = ab_config(**extra)
    route = config["routes"][0]
    route["experiments"] = [
        route.pop("experiment"),
        {
            "name": "flags",
            "variants": [
                {"name": "on", "upstream": "model-a", "weight": 1},
                {"name": "off", "upstream": "model-a", "weight": 3},
            ],
        },
    ]
    return config


@async_test
async def test_status_lists_every_experiment_of_a_route() -> None:
    """It used to show the route's first experiment only."""
    async with admin_stack(_two_experiments(admin_token=TOKEN), MOCKS) as admin:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession(headers=auth) as session:
            async with session.get(admin.admin_url + "/status") as response:
                status = await response.json()
    predict = status["routes"][0]
    assert [e["name"] for e in predict["experiments"]] == ["ranker", "flags"]
    assert [v["share"] for v in predict["experiments"][1]["variants"]] == [0.25, 0.75]
    assert predict["experiment"]["name"] == "ranker"  # the first, as before
    assert status["routes"][1]["experiments"] == [] and status["routes"][1]["experiment"] is None


def test_check_counts_every_experiment_of_every_route(tmp_path: Path) -> None:
    """`modelgate check` used to count routes with an experiment, not experiments."""
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(_two_experiments()))
    result = subprocess.run(
        [sys.executable, "-m", "modelgate", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(2 routes, 2 experiments, 2 upstreams)" in result.stdout
