"""The load driver's own ceiling: `modelgate bench` from one core against nginx `return 200` on
loopback, beside wrk and a plain aiohttp ClientSession driver, round-robin in one run.

    python benchmarks/bench_driver.py [-d 5] [--rounds 3] [--rates 10000,20000,...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from proxy_bench import (
    Processes,
    StartError,
    environment,
    free_port,
    modelgate_command,
    modelgate_env,
    parse_wrk,
    upstream_nginx_conf,
    workdir,
)

PATH = "/predict"


@dataclass
class Run:
    round: int
    client: str  # wrk, modelgate, aiohttp
    mode: str  # closed / open
    load: float  # connections (closed) or offered req/s (open)
    rps: float
    cpu_us_per_request: float | None
    p50_ms: float | None
    p99_ms: float | None
    lag_p99_ms: float | None = None
    lag_max_ms: float | None = None
    busy: float | None = None  # client CPU per wall second
    errors: int = 0


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pinned(argv: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else argv


def run_wrk(round_: int, url: str, connections: int, seconds: int, cpus: str | None) -> Run:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    before = children_cpu_s()
    done = subprocess.run(pinned(argv, cpus), capture_output=True, text=True, timeout=seconds + 60)
    cpu = children_cpu_s() - before
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr or done.stdout}")
    result = parse_wrk(done.stdout)
    return Run(
        round_,
        "wrk",
        "closed",
        connections,
        result.rps,
        cpu * 1e6 / result.requests if result.requests else None,
        result.p50_us / 1e3,
        result.p99_us / 1e3,
        busy=cpu / result.duration_s,
        errors=result.socket_errors,
    )


def run_modelgate(
    round_: int, url: str, flags: list[str], seconds: float, cpus: str | None, cmd: list[str]
) -> Run:
    argv = [*cmd, "bench", url, "--method", "GET", "--json", "--duration", str(seconds), *flags]
    done = subprocess.run(
        pinned(argv, cpus),
        capture_output=True,
        text=True,
        timeout=seconds + 90,
        env=modelgate_env(),
    )
    if done.returncode != 0:
        raise RuntimeError(f"modelgate bench failed: {done.stderr or done.stdout}")
    report = json.loads(done.stdout)
    lat = report["overall"]["latency_ms"]
    lag = report["schedule_lag_ms"] or {}
    responses = report["responses"]
    open_loop = report["mode"] == "open"
    label = "modelgate" + (f" x{report['processes']}" if report["processes"] > 1 else "")
    return Run(
        round_,
        label,
        report["mode"],
        report["rate"] if open_loop else report["concurrency"],
        report["overall"]["throughput_rps"],
        report["driver_cpu_s"] * 1e6 / responses if responses else None,
        lat["p50"],
        lat["p99"],
        lag.get("p99"),
        lag.get("max"),
        report["driver_busy"],
        report["error_count"],
    )


def run_aiohttp(round_: int, url: str, connections: int, seconds: float, cpus: str | None) -> Run:
    argv = [sys.executable, __file__, "--aiohttp-client", url, "-c", str(connections)]
    argv += ["-d", str(seconds)]
    done = subprocess.run(pinned(argv, cpus), capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"the aiohttp client failed: {done.stderr or done.stdout}")
    got = json.loads(done.stdout)
    return Run(round_, "aiohttp", "closed", connections, **got)


async def aiohttp_client(url: str, connections: int, seconds: float) -> dict[str, Any]:
    """What the driver would cost on aiohttp's client: closed loop, keep-alive, uvloop."""
    import aiohttp

    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        end = time.perf_counter() + seconds

        async def user() -> None:
            while (start := time.perf_counter()) < end:
                async with session.get(url) as response:
                    await response.read()
                    response.headers.get("x-modelgate-variant")
                latencies.append(time.perf_counter() - start)

        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(user() for _ in range(connections)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    ordered = sorted(latencies)
    return {
        "rps": len(ordered) / wall,
        "cpu_us_per_request": cpu * 1e6 / len(ordered),
        "p50_ms": ordered[len(ordered) // 2] * 1e3,
        "p99_ms": ordered[int(len(ordered) * 0.99)] * 1e3,
        "busy": cpu / wall,
    }


# --- summary -----------------------------------------------------------------------------


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else f"{value:{spec}}"


def sustained(run: Run, max_lag_p99_ms: float) -> bool:
    """The driver kept its schedule: it sent what it was asked, on time, without errors."""
    lag = run.lag_p99_ms if run.lag_p99_ms is not None else 0.0
    return run.rps >= 0.98 * run.load and lag <= max_lag_p99_ms and run.errors == 0


def closed_table(runs: list[Run]) -> str:
    lines = [
        "| client | conns | req/s (median) | req/s min-max | client CPU us/req | one-core ceiling"
        " req/s (1e6 / CPU us) | client busy | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, float], list[Run]] = {}
    for run in runs:
        if run.mode == "closed":
            groups.setdefault((run.client, run.load), []).append(run)
    for (client, load), group in groups.items():
        cpu = _median([r.cpu_us_per_request for r in group])
        lines.append(
            f"| {client} | {load:.0f} | {_fmt(_median([r.rps for r in group]), ',.0f')}"
            f" | {min(r.rps for r in group):,.0f}-{max(r.rps for r in group):,.0f}"
            f" | {_fmt(cpu, '.1f')} | {_fmt(1e6 / cpu if cpu else None, ',.0f')}"
            f" | {_fmt(_median([r.busy for r in group]), '.0%')}"
            f" | {_fmt(_median([r.p50_ms for r in group]), '.3f')}"
            f" | {_fmt(_median([r.p99_ms for r in group]), '.3f')} |"
        )
    return "\n".join(lines)


def open_table(runs: list[Run], max_lag_p99_ms: float) -> tuple[str, float | None]:
    lines = [
        "| offered req/s | achieved (median) | sustained rounds | lag p99 ms | lag max ms"
        " | p50 ms | p99 ms | driver busy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[float, list[Run]] = {}
    for run in runs:
        if run.mode == "open":
            groups.setdefault(run.load, []).append(run)
    ceiling = None
    for rate, group in sorted(groups.items()):
        ok = sum(sustained(r, max_lag_p99_ms) for r in group)
        if 2 * ok > len(group):
            ceiling = rate
        lines.append(
            f"| {rate:,.0f} | {_fmt(_median([r.rps for r in group]), ',.0f')}"
            f" | {ok}/{len(group)} | {_fmt(_median([r.lag_p99_ms for r in group]), '.2f')}"
            f" | {_fmt(_median([r.lag_max_ms for r in group]), '.1f')}"
            f" | {_fmt(_median([r.p50_ms for r in group]), '.3f')}"
            f" | {_fmt(_median([r.p99_ms for r in group]), '.3f')}"
            f" | {_fmt(_median([r.busy for r in group]), '.0%')} |"
        )
    return "\n".join(lines), ceiling


# --- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("-d", "--duration", type=int, default=5, help="seconds per closed run")
    parser.add_argument("--open-duration", type=float, default=3.0, help="seconds per open run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-c", "--connections", type=int, default=64)
    parser.add_argument(
        "--rates",
        default="5000,10000,20000,30000,40000,50000,60000,80000",
        help="open-loop rates to try, ascending",
    )
    parser.add_argument(
        "--max-lag-p99-ms", type=float, default=10.0, help="a rate is sustained below this lag"
    )
    parser.add_argument("--upstream-cpus", default="0", help="taskset cpu list for nginx")
    parser.add_argument("--load-cpus", default="1", help="taskset cpu list for the clients")
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument("--no-processes", action="store_true", help="skip the --processes 2 row")
    parser.add_argument("--modelgate-cmd", default=None, help="command that starts modelgate")
    parser.add_argument("--json", type=Path, default=None, help="also write the runs here")
    parser.add_argument("--aiohttp-client", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        parser.error(f"--rates must be numbers, got {args.rates!r}")
    if args.duration < 1 or args.rounds < 1 or args.connections < 1:
        parser.error("-d, --rounds and -c must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.aiohttp_client:
        import uvloop

        got = uvloop.run(aiohttp_client(args.aiohttp_client, args.connections, args.duration))
        print(json.dumps(got))
        return 0
    missing = [tool for tool in ("wrk", "nginx", "taskset") if shutil.which(tool) is None]
    if missing:
        print(f"error: {', '.join(missing)} not found on PATH", file=sys.stderr)
        return 2
    env = environment()
    with workdir(False) as tmp:
        procs = Processes(tmp, pin=not args.no_pin)
        try:
            return bench(args, env, tmp, procs)
        except StartError as exc:
            print(f"error: the upstream nginx did not start: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()


def bench(args: argparse.Namespace, env: dict[str, str], tmp: Path, procs: Processes) -> int:
    port = free_port()
    prefix = tmp / "upstream"
    prefix.mkdir()
    (prefix / "nginx.conf").write_text(upstream_nginx_conf(prefix, port))
    argv = ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
    nginx = procs.start("upstream", [*argv, "-e", str(prefix / "error.log")], args.upstream_cpus)
    procs.wait_listening("upstream", nginx, port, 15)
    url = f"http://127.0.0.1:{port}{PATH}"
    cpus = None if args.no_pin else args.load_cpus
    cmd = modelgate_command(args.modelgate_cmd)
    load_start = open("/proc/loadavg").read().split()[0]
    runs: list[Run] = []
    c, d = args.connections, args.duration
    clients = ["wrk", "modelgate", "aiohttp"] + ([] if args.no_processes else ["modelgate x2"])

    def closed_run(client: str, index: int) -> Run:
        if client == "wrk":
            return run_wrk(index, url, c, d, cpus)
        if client == "aiohttp":
            return run_aiohttp(index, url, c, d, cpus)
        if client == "modelgate":
            return run_modelgate(index, url, ["--concurrency", str(c)], d, cpus, cmd)
        # Unpinned: the two driver processes share both cores with nginx.
        flags = ["--concurrency", str(c), "--processes", "2"]
        return run_modelgate(index, url, flags, d, None, cmd)

    for index in range(args.rounds):
        shift = index % len(clients)  # rotate so no client always runs first
        for client in clients[shift:] + clients[:shift]:
            runs.append(closed_run(client, index))
            _log(runs[-1])
        for rate in args.rates:
            flags = ["--rate", f"{rate:g}"]
            runs.append(run_modelgate(index, url, flags, args.open_duration, cpus, cmd))
            _log(runs[-1])
            if runs[-1].rps < 0.9 * rate:
                break  # far past the ceiling: higher rates only take time
    load_end = open("/proc/loadavg").read().split()[0]
    table, ceiling = open_table(runs, args.max_lag_p99_ms)
    pin = (
        "no pinning"
        if args.no_pin
        else (f"nginx on CPU {args.upstream_cpus}, each client on CPU {args.load_cpus} (taskset)")
    )
    versions = ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("cpu", "nproc", "kernel"))
    print("## Load driver\n")
    print(f"- machine: {env['cpu']}, nproc {env['nproc']}, Linux {env['kernel']}; {pin}")
    print(f"- versions: {versions}")
    print(f"- command: python benchmarks/bench_driver.py {shlex.join(sys.argv[1:])}")
    print(
        f"- method: GET {PATH} to nginx `return 200` (13-byte JSON), keep-alive; closed loop"
        f" {d} s per run with {c} connections; open loop {args.open_duration:g} s per rate;"
        f" {args.rounds} rounds round-robin, medians; client CPU from the driver's own report"
        " (modelgate), getrusage of the child (wrk) or process_time (aiohttp)"
    )
    print(f"- load average (1 min) at start {load_start}, at end {load_end}")
    print()
    print(closed_table(runs))
    print()
    print(table)
    print()
    print(
        f"open-loop ceiling (achieved >= 98% of offered, lag p99 <= {args.max_lag_p99_ms:g} ms,"
        f" no errors, in most rounds): {_fmt(ceiling, ',.0f')} req/s"
    )
    if args.json:
        payload = {"environment": env, "runs": [asdict(r) for r in runs], "ceiling": ceiling}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _log(run: Run) -> None:
    print(
        f"# round {run.round + 1} {run.client:<12} {run.mode:<6} {run.load:>8.0f}"
        f" {run.rps:>10,.0f} req/s  cpu {_fmt(run.cpu_us_per_request, '.1f')} us/req"
        f"  lag p99 {_fmt(run.lag_p99_ms, '.2f')} ms  p99 {_fmt(run.p99_ms, '.3f')} ms",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
