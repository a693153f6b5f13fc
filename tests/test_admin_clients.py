"""Our own admin clients keep working behind the admin's guard (issue 12, finding 4): `serve
--admin-token-file` generates the token (in the parent with --workers) and requires it on
loopback; `analyze --admin --token-file` and `modelgate canary`'s GatewaysTarget send the
right Host, content type and token."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import aiohttp
import pytest

from modelgate.admin.token import TOKEN_ENV, TOKEN_FILE_ENV, TokenFileError, client_token
from modelgate.cli import main
from modelgate.mock.server import MockSettings
from modelgate.release.remote import GatewaysTarget

from .support import (
    JSON_TYPE,
    ServeProcesses,
    ab_config,
    admin_stack,
    async_test,
    free_port,
    served_config,
    wait_listening,
    wait_until,
    write_config,
)

MOCKS = {"model-a": MockSettings(name="model-a"), "model-b": MockSettings(name="model-b")}


def test_serve_generates_the_token_file_and_requires_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    token_file = tmp_path / "admin-token"
    port, admin_port = free_port(), free_port()
    config = served_config(ab_config(), {"model-a": 9, "model-b": 9}, port, admin_port)
    admin = f"http://127.0.0.1:{admin_port}"

    @async_test
    async def run(processes: ServeProcesses) -> None:
        proc = processes.start(config, "--workers", "2", "--admin-token-file", str(token_file))
        await asyncio.to_thread(wait_listening, port, proc)
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                async with session.get(admin + "/readyz", headers=auth) as response:
                    return response.status == 200

            await wait_until(ready, "the gateway ready")
            async with session.get(admin + "/config") as response:
                assert response.status == 401  # loopback, but a token was asked for
            async with session.post(
                admin + "/experiments/ranker/kill", headers={**auth, **JSON_TYPE}
            ) as response:
                assert response.status == 200 and (await response.json())["killed"] is True
        argv = ["analyze", "--admin", admin, "--experiment", "ranker"]
        assert await asyncio.to_thread(main, [*argv, "--token-file", str(token_file)]) == 0
        assert "ranker" in capsys.readouterr().out
        assert await asyncio.to_thread(main, argv) == 1
        assert "401 missing bearer token" in capsys.readouterr().err

    with ServeProcesses(tmp_path) as processes:
        run(processes)
        # A second start reads the same file: the clients' copy stays valid.
        processes.close()
        before = token_file.read_text()
        with_file = {**config, "admin_token_file": str(token_file)}
        proc = processes.start(with_file)
        wait_listening(port, proc)
        assert token_file.read_text() == before
        token_file.chmod(0o644)
        proc = processes.start(with_file)
        assert proc.wait(timeout=30) == 1
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        assert "mode 0644 lets other users read or write it; run chmod 600" in stderr


@async_test
async def test_the_canary_controller_reaches_a_guarded_gateway(tmp_path: Path) -> None:
    token = "canary-token-0123456789abcdef"
    async with admin_stack(ab_config((90, 10)), MOCKS, token=token) as admin:
        async with aiohttp.ClientSession() as session:
            target = GatewaysTarget([admin.admin_url], token, session)
            view, weights = await target.view("ranker")
            assert view.weights == weights[admin.admin_url] == {"control": 90, "candidate": 10}
            await target.set_weights("ranker", {"control": 50, "candidate": 50}, "test")
        assert admin.control.version == 2


def test_client_token_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    flag_file, env_file, config_file = (tmp_path / n for n in ("flag", "env", "config"))
    for path in (flag_file, env_file, config_file):
        path.write_text(f"token-from-{path.name}-0123456789\n")
    assert client_token(None, None) is None
    assert client_token(None, None, str(config_file)) == "token-from-config-0123456789"
    monkeypatch.setenv(TOKEN_FILE_ENV, str(env_file))
    assert client_token(None, None, str(config_file)) == "token-from-env-0123456789"
    assert client_token(None, str(flag_file), str(config_file)) == "token-from-flag-0123456789"
    monkeypatch.setenv(TOKEN_ENV, "token-from-environment-0123")
    assert client_token(None, str(flag_file)) == "token-from-environment-0123"
    assert client_token("token-from-option-0123456", str(flag_file)) == "token-from-option-0123456"
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(TokenFileError, match=f"admin token file {tmp_path / 'nope'}: no such"):
        client_token(None, str(tmp_path / "nope"))


def test_canary_names_an_unusable_token_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    config = ab_config()
    config["routes"][0]["experiment"]["canary"] = {
        "baseline": "control",
        "candidate": "candidate",
        "steps": [10, 100],
        "source": "prometheus",
        "prometheus_url": "http://127.0.0.1:9",
    }
    path = write_config(tmp_path, {**config, "admin": "127.0.0.1:0", "listen": "127.0.0.1:0"})
    argv = ["canary", "--config", str(path), "--experiment", "ranker", "--gateway", "http://x"]
    assert main([*argv, "--token-file", str(tmp_path / "missing")]) == 1
    assert f"admin token file {tmp_path / 'missing'}: no such file" in capsys.readouterr().err
