"""The control plane parses configs off the event loop (a single-process gateway serves its
traffic on that loop, and a large YAML document takes seconds), and /status does not parse
the config file again unless it changed."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from modelgate import control as control_module
from modelgate.mock.server import MockSettings

from .support import JSON_TYPE, ab_config, admin_stack, async_test

MOCKS = {name: MockSettings(name=name) for name in ("model-a", "model-b")}
YAML_TYPE = {"Content-Type": "application/yaml"}


@async_test
async def test_reloads_parse_off_the_loop_and_status_reads_the_file_once_per_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed_on: list[str] = []

    def spy(name: str) -> Any:
        original = getattr(control_module, name)

        def wrapped(*args: Any) -> Any:
            parsed_on.append(f"{name}@{threading.current_thread().name}")
            return original(*args)

        monkeypatch.setattr(control_module, name, wrapped)

    for name in ("load_config", "parse_document", "validate_config"):
        spy(name)
    path = tmp_path / "gateway.yaml"
    async with admin_stack(ab_config(), MOCKS, config_path=path) as admin:
        path.write_text(yaml.safe_dump(admin.complete(ab_config())))
        loop_thread = threading.current_thread().name
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.get(admin.admin_url + "/status") as response:
                    assert (await response.json())["config_file"]["differs_from_running"] is False
            reads = [p for p in parsed_on if p.startswith("load_config")]
            assert len(reads) == 1, parsed_on  # three polls, one parse: the file did not change

            async with session.post(admin.admin_url + "/reload", headers=JSON_TYPE) as response:
                assert response.status == 200, await response.text()
            body = yaml.safe_dump(admin.complete(ab_config()) | {"log_dir": str(tmp_path)})
            async with session.post(
                admin.admin_url + "/reload", data=body, headers=YAML_TYPE
            ) as response:
                assert response.status == 200, await response.text()
            path.write_text(body)
            async with session.get(admin.admin_url + "/status") as response:
                assert (await response.json())["config_file"]["differs_from_running"] is False
    names = {p.split("@")[0] for p in parsed_on}
    assert names == {"load_config", "parse_document", "validate_config"}, parsed_on
    assert all(not p.endswith("@" + loop_thread) for p in parsed_on), parsed_on
    assert len([p for p in parsed_on if p.startswith("load_config")]) == 3, parsed_on
