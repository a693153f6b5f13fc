"""The admin guard's edges found in review: a refusal's log line cannot be forged through the
URL, and an admin API on port 80 answers the Host that clients send there (no port)."""

from __future__ import annotations

import logging

import pytest
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from modelgate.admin.guard import AdminGuard, _is_ip_with_port, known_hosts


def test_a_refusal_log_line_cannot_be_forged_through_the_url(
    caplog: pytest.LogCaptureFixture,
) -> None:
    forged = "2026-12-07 22:00:00,000 INFO modelgate.admin.app[1] v2 reloaded OK"
    path = "/x%0a" + forged.replace(" ", "%20")
    request = make_mocked_request(
        "GET", path, headers=CIMultiDict({"Host": "evil.example\n" + forged})
    )
    guard = AdminGuard(frozenset({"127.0.0.1:8081"}), 8081, any_address=False)
    with caplog.at_level(logging.WARNING, logger="modelgate.admin"):
        guard.note(request, "unknown_host", f"Host {request.headers['Host']} is not known")
    (record,) = caplog.records
    line = record.getMessage()
    assert "\n" not in line and "\r" not in line
    assert "%0a" in line or "\\n" in line  # still there for the operator to read, escaped


@pytest.mark.parametrize(
    ("bound", "known", "unknown"),
    [
        (("127.0.0.1", 80), ["localhost", "127.0.0.1", "[::1]", "localhost:80"], ["evil.example"]),
        (("127.0.0.1", 8081), ["localhost:8081"], ["localhost", "127.0.0.1"]),
    ],
)
def test_port_80_is_known_without_its_port(
    bound: tuple[str, int], known: list[str], unknown: list[str]
) -> None:
    hosts = known_hosts(bound, bound[0], ["admin.internal:8443"])
    for host in known:
        assert host in hosts, host
    for host in unknown:
        assert host not in hosts, host
    assert "admin.internal" not in hosts  # named with another port: the bare name is not it


def test_any_address_on_port_80_takes_bare_ip_literals() -> None:
    assert _is_ip_with_port("192.0.2.7", 80) and _is_ip_with_port("[2001:db8::7]", 80)
    assert _is_ip_with_port("192.0.2.7:80", 80)
    assert not _is_ip_with_port("192.0.2.7", 8081) and not _is_ip_with_port("evil.example", 80)
