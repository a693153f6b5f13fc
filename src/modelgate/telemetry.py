"""What the gateway counts on the request path: plain integer counters, cheap to bump.

The Prometheus exposition (issue #7) reads these; the request path never formats metrics.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["Counters"]


class Counters:
    """Per-process counters. Response counts are keyed by (route, variant, status)."""

    __slots__ = (
        "responses",
        "upstream_errors",
        "unit_fallbacks",
        "replays",
        "bad_requests",
        "client_aborts",
        "client_timeouts",
        "rejected_connections",
    )

    def __init__(self) -> None:
        self.responses: Counter[tuple[str, str, int]] = Counter()
        self.upstream_errors: Counter[str] = Counter()
        self.unit_fallbacks = 0
        self.replays = 0
        self.bad_requests = 0
        self.client_aborts = 0
        self.client_timeouts = 0
        self.rejected_connections = 0

    def count_response(self, route: str, variant: str, status: int) -> None:
        self.responses[(route, variant, status)] += 1

    def count_upstream_error(self, kind: str) -> None:
        self.upstream_errors[kind] += 1

    def snapshot(self) -> dict[str, object]:
        return {
            "responses": [
                {"route": r, "variant": v, "status": s, "count": n}
                for (r, v, s), n in sorted(self.responses.items())
            ],
            "upstream_errors": dict(self.upstream_errors),
            "unit_fallbacks": self.unit_fallbacks,
            "replays": self.replays,
            "bad_requests": self.bad_requests,
            "client_aborts": self.client_aborts,
            "client_timeouts": self.client_timeouts,
            "rejected_connections": self.rejected_connections,
        }
