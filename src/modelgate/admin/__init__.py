"""The admin API (aiohttp): status, config, reload, weights, metrics, experiments' results,
canaries and chaos switches, behind its token and its Host and Origin guard.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelgate._faces import lazy_face

if TYPE_CHECKING:
    from modelgate.admin.app import (
        ADMIN_TOKEN_ENV,
        bind_admin,
        build_admin_app,
        check_admin_exposure,
        resolve_admin_token,
        start_admin,
    )
    from modelgate.admin.chaos import (
        add_chaos_routes,
        merge_chaos,
    )
    from modelgate.admin.guard import (
        BODY_TYPES,
        REASONS,
        AdminGuard,
        known_hosts,
    )
    from modelgate.admin.release import (
        CANARIES,
        add_release_api,
        canary_collector,
    )
    from modelgate.admin.results import (
        add_result_routes,
        json_error,
        json_response,
    )
    from modelgate.admin.token import (
        TOKEN_ENV,
        TOKEN_FILE_ENV,
        TokenFileError,
        client_token,
        load_or_create_token,
        read_token_file,
    )

__all__ = [
    "ADMIN_TOKEN_ENV",
    "AdminGuard",
    "BODY_TYPES",
    "CANARIES",
    "REASONS",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "TokenFileError",
    "add_chaos_routes",
    "add_release_api",
    "add_result_routes",
    "bind_admin",
    "build_admin_app",
    "canary_collector",
    "check_admin_exposure",
    "client_token",
    "json_error",
    "json_response",
    "known_hosts",
    "load_or_create_token",
    "merge_chaos",
    "read_token_file",
    "resolve_admin_token",
    "start_admin",
]

__getattr__ = lazy_face(
    __name__,
    {
        "ADMIN_TOKEN_ENV": "app",
        "AdminGuard": "guard",
        "BODY_TYPES": "guard",
        "CANARIES": "release",
        "REASONS": "guard",
        "TOKEN_ENV": "token",
        "TOKEN_FILE_ENV": "token",
        "TokenFileError": "token",
        "add_chaos_routes": "chaos",
        "add_release_api": "release",
        "add_result_routes": "results",
        "bind_admin": "app",
        "build_admin_app": "app",
        "canary_collector": "release",
        "check_admin_exposure": "app",
        "client_token": "token",
        "json_error": "results",
        "json_response": "results",
        "known_hosts": "guard",
        "load_or_create_token": "token",
        "merge_chaos": "chaos",
        "read_token_file": "token",
        "resolve_admin_token": "app",
        "start_admin": "app",
    },
)
