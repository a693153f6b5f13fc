"""The admin API against a web page on the operator's machine (issue 12, finding 4): each
request is written byte for byte as a browser sends it (a form post, a no-cors fetch, a CORS
preflight, a page on a rebound DNS name) and must change nothing and read nothing, while the
same request from the admin's own origin, curl or our clients still works."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from modelgate.admin.app import resolve_admin_token
from modelgate.admin.guard import AdminGuard, known_hosts
from modelgate.admin.token import TokenFileError, load_or_create_token, read_token_file
from modelgate.config import ConfigError, validate_config
from modelgate.mock.server import MockSettings
from modelgate.server import StartupError

from .support import AdminStack, ab_config, admin_stack, async_test

MOCKS = {"model-a": MockSettings(name="model-a"), "model-b": MockSettings(name="model-b")}
EVIL = "http://evil.example"
HOST = "Host: 127.0.0.1:{port}"  # send() fills in the admin's port


async def send(port: int, head: str, body: bytes = b"") -> tuple[int, dict[str, str], Any]:
    """One request on its own connection, exactly these bytes; (status, headers, JSON body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = head.strip().replace("{port}", str(port)).splitlines()
        lines += [f"Content-Length: {len(body)}", "Connection: close"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        async with asyncio.timeout(10):
            raw = await reader.read(-1)
    finally:
        writer.close()
    top, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    parsed = (
        orjson.loads(payload)
        if headers.get("content-type", "").startswith("application/json")
        else payload
    )
    return int(status_line.split()[1]), headers, parsed


def assert_refused(status: int, headers: dict[str, str], body: Any, want: int, code: str) -> None:
    assert status == want, body
    assert body["error"] == code and set(body) == {"error", "detail", "request_id"}, body
    assert not [h for h in headers if h.startswith("access-control-")], headers


def killed(admin: AdminStack) -> bool:
    return bool(admin.control.config.routes[0].experiment.killed)  # type: ignore[union-attr]


@async_test
async def test_a_cross_origin_kill_without_a_body_changes_nothing() -> None:
    async with admin_stack(ab_config(), MOCKS) as admin:
        port = admin.admin_port
        for extra in (
            f"Origin: {EVIL}\nSec-Fetch-Site: cross-site\nSec-Fetch-Mode: no-cors",
            f"Origin: {EVIL}",  # a browser without Fetch Metadata
            "Sec-Fetch-Site: same-site",  # a sibling subdomain's page
            "Origin: null",  # a sandboxed iframe, a data: URL
            f"Origin: http://127.0.0.1:{port}\nOrigin: {EVIL}",
        ):
            head = f"POST /experiments/ranker/kill HTTP/1.1\nHost: 127.0.0.1:{{port}}\n{extra}"
            status, headers, body = await send(port, head)
            assert_refused(status, headers, body, 403, "cross_origin")
        assert admin.control.version == 1 and not killed(admin)


@async_test
async def test_a_text_plain_reload_with_yaml_is_not_applied() -> None:
    async with admin_stack(ab_config((90, 10)), MOCKS) as admin:
        document = yaml.safe_dump(admin.complete(ab_config((10, 90)))).encode()
        for content_type in ("text/plain", "text/plain;charset=UTF-8", None):
            line = f"\nContent-Type: {content_type}" if content_type else ""
            head = f"POST /reload HTTP/1.1\nHost: 127.0.0.1:{{port}}{line}"
            status, headers, body = await send(admin.admin_port, head, document)
            assert_refused(status, headers, body, 415, "unsupported_media_type")
            assert (content_type or "no Content-Type") in body["detail"]
        assert admin.control.version == 1
        head = "POST /reload HTTP/1.1\nHost: 127.0.0.1:{port}\nContent-Type: application/yaml"
        status, _, body = await send(admin.admin_port, head, document)
        assert status == 200 and body["version"] == 2, body  # the same YAML, said as YAML


@async_test
async def test_form_and_multipart_posts_change_nothing() -> None:
    async with admin_stack(ab_config(), MOCKS) as admin:
        forms = [
            ("application/x-www-form-urlencoded", b"a=b"),
            (
                "multipart/form-data; boundary=x",
                b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nb\r\n--x--\r\n',
            ),
            ("text/plain", b'{"weights": [1, 0]}'),
        ]
        for path in (
            "/experiments/ranker/kill",
            "/experiments/ranker/weights",
            "/reload",
            "/canaries/ranker/promote",
        ):
            method = "PUT" if path.endswith("weights") else "POST"
            for content_type, payload in forms:
                head = f"{method} {path} HTTP/1.1\n{HOST}\nContent-Type: {content_type}"
                status, headers, body = await send(admin.admin_port, head, payload)
                assert_refused(status, headers, body, 415, "unsupported_media_type")
        assert admin.control.version == 1 and not killed(admin)


@async_test
async def test_config_cannot_be_read_through_a_rebound_name_or_from_another_origin() -> None:
    async with admin_stack(ab_config(), MOCKS) as admin:
        port = admin.admin_port
        for host in (
            f"evil.example:{port}",
            "evil.example",
            f"127.0.0.1:{port + 1}",
            f"localhost.evil.example:{port}",
        ):
            status, headers, body = await send(port, f"GET /config HTTP/1.1\nHost: {host}")
            assert_refused(status, headers, body, 421, "unknown_host")
            assert repr(host) in body["detail"] and "admin_hosts" in body["detail"]
        status, headers, body = await send(port, "GET /config HTTP/1.0")  # no Host at all
        assert_refused(status, headers, body, 421, "unknown_host")
        for extra in (
            f"Origin: {EVIL}",
            "Sec-Fetch-Site: cross-site",
            f"Origin: https://127.0.0.1:{port}.evil.example",
        ):
            status, headers, body = await send(
                port, f"GET /config HTTP/1.1\nHost: 127.0.0.1:{{port}}\n{extra}"
            )
            assert_refused(status, headers, body, 403, "cross_origin")


@async_test
async def test_cors_preflights_are_refused_and_no_cors_header_is_ever_sent() -> None:
    async with admin_stack(ab_config(), MOCKS) as admin:
        for extra in (
            f"Origin: {EVIL}\nAccess-Control-Request-Method: POST\n"
            "Access-Control-Request-Headers: content-type",
            "Access-Control-Request-Method: PUT",
        ):
            head = f"OPTIONS /reload HTTP/1.1\nHost: 127.0.0.1:{{port}}\n{extra}"
            status, headers, body = await send(admin.admin_port, head)
            assert status == 403, body
            assert body["error"] in ("cross_origin", "cors_preflight")
            assert not [h for h in headers if h.startswith("access-control-")], headers


@async_test
async def test_same_origin_requests_with_the_right_host_and_type_still_work() -> None:
    async with admin_stack(ab_config(admin_hosts=["admin.example.internal"]), MOCKS) as admin:
        port = admin.admin_port
        for host in (
            f"127.0.0.1:{port}",
            f"localhost:{port}",
            f"[::1]:{port}",
            f"LOCALHOST:{port}",
            "admin.example.internal",
            f"admin.example.internal:{port}",
        ):
            status, headers, body = await send(port, f"GET /config HTTP/1.1\nHost: {host}")
            assert status == 200 and body["routes"], (host, body)
            assert not [h for h in headers if h.startswith("access-control-")], headers
        own = (
            f"Host: localhost:{port}\nOrigin: http://localhost:{port}\nSec-Fetch-Site: same-origin"
        )
        head = f"POST /experiments/ranker/kill HTTP/1.1\n{own}\nContent-Type: application/json"
        status, _, body = await send(port, head)
        assert status == 200 and body["killed"] is True, body
        json_utf8 = "Content-Type: application/json; charset=utf-8"
        head = f"POST /experiments/ranker/unkill HTTP/1.1\n{own}\n{json_utf8}"
        status, _, body = await send(port, head, b"{}")
        assert status == 200 and body["killed"] is False, body
        status, _, body = await send(
            port, "GET /status HTTP/1.1\nHost: 127.0.0.1:{port}\nSec-Fetch-Site: none"
        )
        assert status == 200, body  # typed into the address bar
        assert admin.control.version == 3
        status, _, text = await send(port, "GET /metrics HTTP/1.1\nHost: 127.0.0.1:{port}")
        assert status == 200
        assert (
            b'modelgate_admin_refused_total{config_version="3",reason="unknown_host"} 0.0' in text
        )


@async_test
async def test_refusals_are_counted_in_metrics() -> None:
    async with admin_stack(ab_config(), MOCKS, token="test-token-0123456789abcdef") as admin:
        port = admin.admin_port
        await send(port, "GET /config HTTP/1.1\nHost: evil.example:{port}")
        await send(port, f"GET /config HTTP/1.1\nHost: 127.0.0.1:{{port}}\nOrigin: {EVIL}")
        await send(port, "OPTIONS /config HTTP/1.1\nHost: 127.0.0.1:{port}")
        await send(port, "GET /config HTTP/1.1\nHost: 127.0.0.1:{port}")
        auth = "Authorization: Bearer test-token-0123456789abcdef"
        await send(
            port,
            f"POST /reload HTTP/1.1\nHost: 127.0.0.1:{{port}}\n{auth}\nContent-Type: text/plain",
        )
        status, _, text = await send(
            port, f"GET /metrics HTTP/1.1\nHost: 127.0.0.1:{{port}}\n{auth}"
        )
    assert status == 200
    for reason in (
        "unknown_host",
        "cross_origin",
        "cors_preflight",
        "unauthorized",
        "unsupported_media_type",
    ):
        assert (
            f'modelgate_admin_refused_total{{config_version="1",reason="{reason}"}} 1.0'.encode()
            in text
        ), reason


def test_admin_hosts_and_token_file_keys_are_validated(tmp_path: Path) -> None:
    for bad in ("http://admin.example", "admin.example/x", "admin example", "", "[::1"):
        with pytest.raises(ConfigError, match=r"admin_hosts: \[0\]: expected a host name"):
            validate_config(ab_config(admin_hosts=[bad]))
    with pytest.raises(ConfigError, match="admin_token and admin_token_file: give one"):
        validate_config(ab_config(admin_token="x" * 16, admin_token_file=str(tmp_path / "t")))
    config = validate_config(ab_config(admin_hosts=["Admin.Example:8443", "[::1]:9"]))
    assert config.admin_hosts == ["admin.example:8443", "[::1]:9"]


def test_a_token_file_is_generated_private_and_then_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MODELGATE_ADMIN_TOKEN", raising=False)
    path = tmp_path / "admin-token"
    config = validate_config(ab_config(admin_token_file=str(path)))
    token = resolve_admin_token(config)
    assert token is not None and len(token) >= 43
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == token + "\n"
    assert resolve_admin_token(config) == token  # read back, not replaced
    assert resolve_admin_token(validate_config(ab_config()), str(path)) == token  # the flag
    other = tmp_path / "other"
    assert resolve_admin_token(config, str(other)) != token  # the flag wins over the key
    monkeypatch.setenv("MODELGATE_ADMIN_TOKEN", "from-the-environment-0123")
    with pytest.raises(Exception, match="both MODELGATE_ADMIN_TOKEN and an admin token file"):
        resolve_admin_token(config)


def test_unusable_token_files_are_named_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MODELGATE_ADMIN_TOKEN", raising=False)
    cases: list[tuple[Path, str]] = []
    shared = tmp_path / "shared"
    shared.write_text("a-perfectly-good-token-0123456789\n")
    shared.chmod(0o644)
    cases.append((shared, "mode 0644 lets other users read or write it; run chmod 600"))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    cases.append((empty, "empty; delete it"))
    short = tmp_path / "short"
    short.write_text("short\n")
    short.chmod(0o600)
    cases.append((short, "16 to 512 visible ASCII"))
    cases.append((tmp_path, "not a regular file"))
    cases.append((tmp_path / "missing-dir" / "token", "cannot be created"))
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked"
        locked.write_text("a-perfectly-good-token-0123456789\n")
        locked.chmod(0o000)
        cases.append((locked, "cannot be read"))
    for path, message in cases:
        with pytest.raises(Exception, match=f"admin token file {path}: .*{message}"):
            resolve_admin_token(validate_config(ab_config(admin_token_file=str(path))))


def test_a_planted_token_file_cannot_choose_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding 4: a local user who can put a symlink (to a 0600 file of their own) or
    a file of their own at the token file's path must not pick the admin token."""
    monkeypatch.delenv("MODELGATE_ADMIN_TOKEN", raising=False)
    planted = tmp_path / "planted"
    planted.write_text("attacker-known-token-123456\n")
    planted.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(planted)
    config = validate_config(ab_config(admin_token_file=str(link)))
    with pytest.raises(StartupError, match=f"admin token file {link}: is a symbolic link"):
        resolve_admin_token(config)  # the start stops; the planted token is never used
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")  # O_EXCL will not create through it either
    with pytest.raises(TokenFileError, match="is a symbolic link"):
        load_or_create_token(dangling)
    assert not (tmp_path / "nowhere").exists()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)  # refused, not waited on
    with pytest.raises(TokenFileError, match=f"admin token file {fifo}: not a regular file"):
        load_or_create_token(fifo)
    assert read_token_file(link, private=False) == "attacker-known-token-123456"  # a client
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another uid")
    os.chown(planted, 65534, 65534)  # another user's own 0600 file, at the path itself
    with pytest.raises(
        StartupError, match=f"admin token file {planted}: owned by uid 65534, not by"
    ):
        resolve_admin_token(validate_config(ab_config(admin_token_file=str(planted))))


@async_test
async def test_the_generated_token_is_required_on_loopback(tmp_path: Path) -> None:
    path = tmp_path / "admin-token"
    config = ab_config(admin_token_file=str(path))
    token = resolve_admin_token(validate_config(config))
    async with admin_stack(config, MOCKS, token=token) as admin:
        host = "GET /config HTTP/1.1\nHost: 127.0.0.1:{port}"
        for auth in (
            "",
            "\nAuthorization: Bearer wrong-token-0123456789",
            f"\nAuthorization: Bearer {token}x",
        ):
            status, headers, body = await send(admin.admin_port, host + auth)
            assert_refused(status, headers, body, 401, "unauthorized")
        status, _, body = await send(
            admin.admin_port, f"{host}\nAuthorization: Bearer {path.read_text().strip()}"
        )
        assert status == 200 and body["admin_token_file"] == str(path)


def host_refused(guard: AdminGuard, *hosts: str) -> bool:
    headers = CIMultiDict(("Host", h) for h in hosts)
    return guard._host_problem(make_mocked_request("GET", "/config", headers=headers)) is not None


def test_which_hosts_each_binding_is_known_by() -> None:
    loopback = AdminGuard(known_hosts(("127.0.0.1", 8081), "127.0.0.1", []), 8081, False)
    for host in ("127.0.0.1:8081", "localhost:8081", "[::1]:8081"):
        assert not host_refused(loopback, host), host
    for hosts in (
        ("10.0.0.5:8081",),
        ("localhost",),
        ("127.0.0.1:8081", "127.0.0.1:8081"),  # two Host headers
        ("evil.example:8081",),
    ):
        assert host_refused(loopback, *hosts), hosts
    names = known_hosts(("0.0.0.0", 8081), "0.0.0.0", ["gw-1.internal"])
    wildcard = AdminGuard(names, 8081, True)
    for host in ("10.0.0.5:8081", "[2001:db8::5]:8081", "localhost:8081", "gw-1.internal"):
        assert not host_refused(wildcard, host), host
    for host in ("10.0.0.5:9999", "10.0.0.5", "gw-2.internal:8081", "[2001:db8::5]"):
        assert host_refused(wildcard, host), host
    public = AdminGuard(known_hosts(("10.0.0.5", 8081), "10.0.0.5", []), 8081, False)
    assert not host_refused(public, "10.0.0.5:8081")
    for host in ("10.0.0.6:8081", "localhost:8081", "127.0.0.1:8081"):
        assert host_refused(public, host), host
