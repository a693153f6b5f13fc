"""`modelgate canary` over two gateway processes, reading the fleet's numbers from a real
Prometheus server (Debian package `prometheus`) that scrapes both: it reaches the decision
the in-gateway controller reaches on the same scenarios (tests/test_canary.py)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from modelgate.mock.server import start_mock
from modelgate.release.remote import EXIT_CODES

from .canary_traffic import BASELINE, SCENARIOS, Scenario, Traffic, canary_config
from .support import async_test, free_port, get_json, served_config, wait_listening

TOKEN = "prometheus-test-token-0123456789"
SCRAPE_S = 1.0


@dataclass
class Prometheus:
    url: str
    admin_ports: list[list[int]]  # per scenario, the two gateways' admin ports it scrapes


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url + "/-/ready", timeout=1) as response:
                if response.status == 200:
                    return
        time.sleep(0.1)
    raise AssertionError(f"prometheus at {url} not ready after 30 s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """One Prometheus server for the module, scraping every gateway the tests will start."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail(
            "the prometheus binary is not installed: `apt-get install -y prometheus` "
            "(Debian package; .ci/run installs it). This test is never skipped."
        )
    tmp = tmp_path_factory.mktemp("prometheus")
    admin_ports = [[free_port(), free_port()] for _ in SCENARIOS]
    config = {
        "global": {"scrape_interval": f"{SCRAPE_S:g}s", "evaluation_interval": "5s"},
        "scrape_configs": [
            {
                "job_name": "modelgate",
                "scrape_timeout": "900ms",
                "authorization": {"type": "Bearer", "credentials": TOKEN},
                "static_configs": [
                    {"targets": [f"127.0.0.1:{p}" for ports in admin_ports for p in ports]}
                ],
            }
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc, log)
        yield Prometheus(url, admin_ports)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def gateways(configs: list[dict[str, Any]], tmp_path: Path) -> Iterator[list[Path]]:
    """`modelgate serve` for each config (each its own file), killed at the end."""
    procs, paths = [], []
    try:
        for index, config in enumerate(configs):
            path = tmp_path / f"gateway-{index}.yaml"
            path.write_text(yaml.safe_dump(config), encoding="utf-8")
            paths.append(path)
            command = [sys.executable, "-m", "modelgate", "serve", "--config", str(path)]
            procs.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            )
        for proc, config in zip(procs, configs, strict=True):
            wait_listening(int(config["admin"].rsplit(":", 1)[1]), proc)
        yield paths
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if proc.stderr is not None:
                proc.stderr.close()


@pytest.mark.parametrize("index", range(len(SCENARIOS)), ids=[s.name for s in SCENARIOS])
def test_the_prometheus_canary_over_two_gateways_decides_like_the_local_one(
    index: int, prometheus: Prometheus, tmp_path: Path
) -> None:
    scenario: Scenario = SCENARIOS[index]

    @async_test
    async def run() -> None:
        runners = [await start_mock(s) for s in (BASELINE, scenario.candidate)]
        try:
            upstreams = {"model-a": runners[0][1], "model-b": runners[1][1]}
            spec = {**scenario.canary, "interval_s": 2.0, "max_wait_s": 20.0}
            config = canary_config(source="prometheus", prometheus_url=prometheus.url, **spec)
            config["admin_token"] = TOKEN
            configs = [
                served_config(config, upstreams, free_port(), admin)
                for admin in prometheus.admin_ports[index]
            ]
            admins = [f"http://127.0.0.1:{p}" for p in prometheus.admin_ports[index]]
            with gateways(configs, tmp_path) as paths:
                urls = ["http://" + c["listen"] for c in configs]
                traffic = Traffic(urls, conversion=scenario.conversion)
                async with traffic.running():
                    command = [sys.executable, "-m", "modelgate", "canary", "--config"]
                    command += [str(paths[0]), "--experiment", "ranker"]
                    command += [arg for a in admins for arg in ("--gateway", a)]
                    proc = await asyncio.create_subprocess_exec(
                        *command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                    )
                    out, err = await asyncio.wait_for(proc.communicate(), 50)
                transitions = [orjson.loads(line) for line in out.splitlines()]
                assert proc.returncode == EXIT_CODES[scenario.expected], (out, err)
                assert transitions[-1]["to"] == scenario.expected, transitions
                await check_fleet(admins, scenario, transitions)
        finally:
            for runner, _ in runners:
                await runner.cleanup()

    run()


async def check_fleet(admins: list[str], scenario: Scenario, transitions: list[Any]) -> None:
    """Both gateways run the final weights; the evidence came from both of them."""
    final = transitions[-1]
    weight = 100 if scenario.expected == "promoted" else 0
    evidence = final["evidence"]
    assert evidence["samples"]["candidate"] >= 40 and evidence["srm"]["mismatch"] is False
    outcomes = {c["metric"]: c["outcome"] for c in evidence["checks"]}
    if scenario.expected == "promoted":
        assert [t["event"] for t in transitions] == ["start", "step", "promoted"]
        assert set(outcomes.values()) == {"pass"}
    else:
        assert outcomes["converted" if scenario.conversion else "error_rate"] == "fail"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    routed = 0
    async with aiohttp.ClientSession(headers=headers) as session:
        for admin in admins:
            _, status = await get_json(session, admin + "/status")
            variants = status["routes"][0]["experiment"]["variants"]
            assert [v["weight"] for v in variants] == [100 - weight, weight]
            routed += status["routes"][0]["requests"]["total"]
            _, canaries = await get_json(session, admin + "/canaries")
            assert canaries["canaries"][0]["state"] == "external"
            assert canaries["canaries"][0]["weight"] == weight
    assert routed > sum(evidence["srm"]["counts"].values())  # both gateways' traffic counted
