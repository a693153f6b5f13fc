"""`modelgate ...`: the command line. Each subcommand parses its flags and hands off."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from modelgate import __version__
from modelgate.config import ConfigError, GatewayConfig, load_config, route_experiments
from modelgate.telemetry.counts import VersionLogFilter

__all__ = ["main"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _cmd_serve(ns: argparse.Namespace) -> int:
    from modelgate.runtime.serve import serve
    from modelgate.runtime.workers import serve_workers
    from modelgate.server import StartupError

    path = Path(ns.config)
    try:
        config = load_config(path)
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return 1
    workers = ns.workers if ns.workers is not None else config.workers
    try:
        if workers > 1:
            return serve_workers(
                config, path, workers, watch=ns.watch, token_file=ns.admin_token_file
            )
        return serve(config, path, watch=ns.watch, token_file=ns.admin_token_file)
    except StartupError as exc:
        print(f"modelgate: {exc}", file=sys.stderr)
        return 1


def _load_or_print(path: str, prefix: str = "") -> GatewayConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for error in exc.errors:
            print(f"{prefix}{error}")
        return None


def _cmd_check(ns: argparse.Namespace) -> int:
    config = _load_or_print(ns.file)
    if config is None:
        return 1
    experiments = sum(len(route_experiments(r)) for r in config.routes)
    print(
        f"{ns.file}: ok ({len(config.routes)} routes, {experiments} experiments, "
        f"{len(config.upstreams)} upstreams)"
    )
    if ns.against is None:
        return 0
    from modelgate.safety import safety_report

    old = _load_or_print(ns.against, prefix=f"{ns.against}: ")
    if old is None:
        return 1
    report = safety_report(old, config)
    print(f"against {ns.against}:")
    for line in report.lines() or ["no experiment changes"]:
        print(f"  {line}")
    return 0


def _cmd_mock(ns: argparse.Namespace) -> int:
    from modelgate.mock.server import run_from_args

    return run_from_args(ns)


def _cmd_demo(ns: argparse.Namespace) -> int:
    from modelgate.demo.run import run_demo

    return run_demo(duration_s=ns.duration, rate=ns.rate, keep_running=ns.keep_running)


def build_parser() -> argparse.ArgumentParser:
    from modelgate.mock.server import configure_parser as configure_mock

    parser = argparse.ArgumentParser(
        prog="modelgate",
        description="A traffic router for testing ML models in production.",
    )
    parser.add_argument("--version", action="version", version=f"modelgate {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="the YAML config file")
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="processes sharing the port with SO_REUSEPORT (default: the config's workers, 1)",
    )
    serve.add_argument(
        "--watch",
        action="store_true",
        help="reload when the config file changes (as SIGHUP does)",
    )
    serve.add_argument(
        "--admin-token-file",
        metavar="PATH",
        default=None,
        help="require the admin API's bearer token from PATH, generated there (mode 0600) if "
        "the file does not exist (as admin_token_file in the config)",
    )
    serve.set_defaults(func=_cmd_serve)

    check = commands.add_parser("check", help="validate a config file")
    check.add_argument("file")
    check.add_argument(
        "--against",
        metavar="OLD",
        default=None,
        help="also report which share of units each experiment moves, replacing OLD by FILE",
    )
    check.set_defaults(func=_cmd_check)

    mock = commands.add_parser("mock-model", help="a fake model server for tests and demos")
    configure_mock(mock)
    mock.set_defaults(func=_cmd_mock)

    demo = commands.add_parser(
        "demo", help="real models, the gateway, traffic, feedback: everything end to end"
    )
    demo.add_argument("--duration", type=float, default=20.0, help="seconds of traffic")
    demo.add_argument("--rate", type=float, default=150.0, help="requests per second")
    demo.add_argument(
        "--keep-running", action="store_true", help="leave the stack up to poke at (Ctrl-C ends)"
    )
    demo.set_defaults(func=_cmd_demo)

    from modelgate.difflog_cli import configure_parser as configure_difflog

    difflog = commands.add_parser("difflog", help="read shadow diff logs: summarize, show, export")
    configure_difflog(difflog)

    from modelgate.analyze.command import configure_parser as configure_analyze

    analyze = commands.add_parser("analyze", help="experiment results: a table, an HTML report")
    configure_analyze(analyze)

    from modelgate.bench.run import configure_parser as configure_bench
    from modelgate.bench.run import run_from_args as run_bench_from_args

    bench = commands.add_parser("bench", help="drive a target at a fixed rate or concurrency")
    configure_bench(bench)
    bench.set_defaults(func=run_bench_from_args)

    from modelgate.release.remote import configure_parser as configure_canary

    configure_canary(commands.add_parser("canary", help="run a canary from outside the gateways"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    logging.basicConfig(
        level=ns.log_level,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d] v%(config_version)s %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(VersionLogFilter())
    try:
        code: int = ns.func(ns)
    except BrokenPipeError:
        # `modelgate analyze --sql ... | head`: the reader left; no traceback for that. Point
        # stdout at /dev/null so the interpreter's own flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by it
    return code


if __name__ == "__main__":
    sys.exit(main())
