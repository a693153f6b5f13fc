"""The proxy load bench: wrk on loopback against the upstream directly, nginx, the naive
aiohttp proxy and modelgate, round-robin in one run; medians, ratios and an RSS leak check.

    python benchmarks/proxy_bench.py [--targets direct,nginx,naive,modelgate] [-d 5] [--rounds 3]

`modelgate-canaries` and `modelgate-nocanaries` are the same gateway config, `--canaries N`
experiments on their own routes (the wrk script spreads the requests over them), with and
without a `source: local` canary on each: the cost of judging canaries on the request path.
"""

from __future__ import annotations

import argparse
import http.client
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ALL_TARGETS = (
    "direct",
    "nginx",
    "naive",
    "modelgate",
    "nginx-mirror",
    "modelgate-shadow",
    "modelgate-nocanaries",
    "modelgate-canaries",
)
CANARY_TARGETS = ("modelgate-nocanaries", "modelgate-canaries")
UPSTREAM_BODY = b'{"score":0.5}'
PATH = "/predict"
POST_BYTES = 1024
USERS = 100_000  # distinct x-user-id values cycled by the wrk scripts
CLK_TCK = os.sysconf("SC_CLK_TCK")


class StartError(Exception):
    """A target could not be started or does not answer correctly; it is skipped."""


# --- configuration files -----------------------------------------------------------------


def post_body() -> bytes:
    """A JSON feature vector of exactly POST_BYTES bytes."""
    head = b'{"features":[' + b",".join(b"%.4f" % (i / 7) for i in range(100)) + b'],"pad":"'
    return head + b"x" * (POST_BYTES - len(head) - 2) + b'"}'


# wrk's --latency prints p50/75/90/99 only; the script's done() prints the tail as well, in us.
TAIL_LINE = "modelgate-bench-tail"


def canary_path(index: int) -> str:
    """The path of the route of canary experiment `index` (see modelgate_canaries_config)."""
    return f"/c{index}{PATH}"


def wrk_script(method: str, body: bytes | None, paths: int = 0) -> str:
    # A fresh header table per request: wrk.format adds Host and Content-Length to it.
    # The x-user-id varies so an A/B router really assigns units on every request; with
    # `paths`, the requests go round the routes /c0/predict .. /c{paths-1}/predict (user k
    # always on route k mod paths).
    lines = ["local counter = 0"]
    if body is not None:
        lines.append(f"local body = [==[{body.decode()}]==]")
    if paths:
        lines.append(
            "local paths = {" + ", ".join(f'"{canary_path(i)}"' for i in range(paths)) + "}"
        )
    lines += [
        "request = function()",
        f"  counter = (counter + 1) % {USERS}",
        '  local headers = {["x-user-id"] = "user-" .. counter}',
    ]
    if body is not None:
        lines.append('  headers["Content-Type"] = "application/json"')
    path = f"paths[counter % {paths} + 1]" if paths else f'"{PATH}"'
    lines.append(f'  return wrk.format("{method}", {path}, headers, {"body" if body else "nil"})')
    lines.append("end")
    lines += [
        "done = function(summary, latency, requests)",
        f'  io.write(string.format("{TAIL_LINE} p99.9 %d max %d\\n",',
        "    latency:percentile(99.9), latency.max))",
        "end",
    ]
    return "\n".join(lines) + "\n"


def nginx_conf(prefix: Path, server_block: str, extra_http: str = "") -> str:
    # Every path inside the prefix: nothing touches /var/log/nginx or /var/lib/nginx.
    temp_paths = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp_paths}
    # nginx closes a keep-alive connection after 1000 requests by default; wrk would pay
    # for reconnects that no real client pool pays.
    keepalive_requests 1000000;
{extra_http}
    server {{
{server_block}
    }}
}}
"""


def upstream_nginx_conf(prefix: Path, port: int) -> str:
    block = f"""        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{UPSTREAM_BODY.decode()}';
        }}"""
    return nginx_conf(prefix, block)


def _keepalive_upstream(upstream_port: int) -> str:
    return f"""    upstream model {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}"""


def proxy_nginx_conf(prefix: Path, port: int, upstream_port: int) -> str:
    upstream = _keepalive_upstream(upstream_port)
    block = f"""        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}"""
    return nginx_conf(prefix, block, upstream)


def mirror_nginx_conf(prefix: Path, port: int, upstream_port: int) -> str:
    """nginx with its `mirror` module: every request also goes to the (same) upstream."""
    upstream = _keepalive_upstream(upstream_port)
    block = f"""        listen 127.0.0.1:{port};
        location / {{
            mirror /mirror;
            mirror_request_body on;
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
        location = /mirror {{
            internal;
            proxy_pass http://model$request_uri;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}"""
    return nginx_conf(prefix, block, upstream)


def modelgate_shadow_config(port: int, admin_port: int, upstream_port: int, log_dir: Path) -> str:
    """The A/B config plus one shadow at sample 1.0, compared and written to the diff log."""
    return (
        modelgate_config(port, admin_port, upstream_port, log_dir).replace(
            "  model-b: {url: ",
            f"  model-c: {{url: http://127.0.0.1:{upstream_port}}}\n  model-b: {{url: ",
        )
        + """    shadows:
      - {upstream: model-c, sample: 1.0, max_inflight: 256}
"""
    )


def modelgate_canaries_config(
    port: int, admin_port: int, upstream_port: int, log_dir: Path, canaries: int, judge: bool
) -> str:
    """The A/B config with `canaries` experiments before it, each on its own route
    (/c{i}/, two variants on the same upstream at 90/10) and, with `judge`, a `source: local`
    canary with the default checks: one look a second once min_samples are in, and no
    deadline (max_wait_s a day), so it judges for the whole bench. Without `judge` the
    config is the same but for the canary blocks; exposures are on in both."""
    url = f"http://127.0.0.1:{upstream_port}"
    routes = []
    for index in range(canaries):
        routes.append(
            f"""  - name: canary-{index}
    match: {{path_prefix: /c{index}/}}
    unit: [header:x-user-id]
    experiment:
      name: canary-{index}
      variants:
        - {{name: a, upstream: model-a, weight: 90}}
        - {{name: b, upstream: model-b, weight: 10}}
"""
        )
        if judge:
            # The default checks (error rate, p99), and one that identical arms never pass
            # (p50 no higher at all: its interval straddles 0), so no canary is promoted;
            # failure_limit so high that a failed look starts a new window instead of a
            # rollback: every canary judges for the whole bench.
            routes.append(
                """      canary:
        baseline: a
        candidate: b
        source: local
        steps: [10, 20, 50, 100]
        interval_s: 1
        min_samples: 20
        max_wait_s: 86400
        failure_limit: 1000000
        checks:
          - {metric: error_rate, max_increase: 0.01}
          - {metric: latency_p99_ms, max_ratio: 1.5}
          - {metric: latency_p50_ms, max_ratio: 1.0}
"""
            )
    head, _, tail = modelgate_config(port, admin_port, upstream_port, log_dir).partition(
        "routes:\n"
    )
    assert url in head and tail
    return head + "routes:\n" + "".join(routes) + tail


def modelgate_config(port: int, admin_port: int, upstream_port: int, log_dir: Path) -> str:
    url = f"http://127.0.0.1:{upstream_port}"
    return f"""listen: 127.0.0.1:{port}
admin: 127.0.0.1:{admin_port}
log_dir: {log_dir}
upstreams:
  model-a: {{url: {url}}}
  model-b: {{url: {url}}}
routes:
  - name: predict
    match: {{path_prefix: /}}
    unit: [header:x-user-id]
    experiment:
      name: bench
      variants:
        - {{name: a, upstream: model-a, weight: 50}}
        - {{name: b, upstream: model-b, weight: 50}}
"""


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Target:
    name: str
    port: int
    pid: int | None  # root of the proxy's process tree; None for the direct target
    note: str = ""
    admin_port: int | None = None  # modelgate's admin API


class Processes:
    """Child processes in their own process groups, all stopped by `stop_all`."""

    def __init__(self, workdir: Path, pin: bool) -> None:
        self.workdir = workdir
        self.pin = pin
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: Sequence[str], cpus: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        command = ["taskset", "-c", cpus, *argv] if self.pin else list(argv)
        with (self.workdir / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: killpg reaches its workers too
                env=env,
                cwd=self.workdir,
            )
        self.running.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 8) -> str:
        path = self.workdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def wait_listening(
        self, name: str, proc: subprocess.Popen[bytes], port: int, timeout: float
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = proc.poll()
            if code is not None:
                tail = self.log_tail(name)
                last = tail.splitlines()[-1] if tail else "no output"
                raise StartError(f"{name} exited with code {code}: {last}\n{tail}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        tail = self.log_tail(name) or "no output"
        raise StartError(f"{name} not listening on port {port} after {timeout:.0f} s\n{tail}")

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers: workers that outlived the leader
        except (ProcessLookupError, PermissionError):
            pass

    def stop_named(self, name: str) -> None:
        for entry in [e for e in self.running if e[0] == name]:
            self.stop(entry[1])
            self.running.remove(entry)

    def stop_all(self) -> None:
        for _, proc in reversed(self.running):
            self.stop(proc)
        self.running.clear()


def tree_pids(root: int) -> list[int]:
    """`root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def rss_kib(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        total += int(match.group(1)) if match else 0
    return total


def thread_cpu_seconds(pids: Sequence[int]) -> dict[str, float]:
    """CPU time of the processes' main threads ("main", the event loop's) and of their
    other threads ("threads": the record writers, the canaries' judging), from /proc."""
    found: dict[str, float] = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                comm = "main" if tid == str(pid) else "threads"
                fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rpartition(")")[2]
            except OSError:
                continue
            ticks = fields.split()
            found[comm] = found.get(comm, 0.0) + (int(ticks[11]) + int(ticks[12])) / CLK_TCK
    return found


def cpu_list(spec: str) -> list[int]:
    """taskset's list syntax: "1", "0-1", "1,3"."""
    cpus: list[int] = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def cores_busy_seconds(spec: str) -> float:
    """Non-idle CPU time of the listed cores since boot, from /proc/stat."""
    wanted = {f"cpu{n}" for n in cpu_list(spec)}
    busy = 0
    for line in Path("/proc/stat").read_text().splitlines():
        fields = line.split()
        if fields and fields[0] in wanted:
            ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
            busy += sum(ticks) - ticks[3] - ticks[4]
    return busy / CLK_TCK


def preflight(port: int, body: bytes, path: str = PATH) -> dict[str, str]:
    """One GET and one POST must answer 200 with the upstream's body; returns the headers."""
    headers: dict[str, str] = {}
    for method, payload in (("GET", None), ("POST", body)):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            request_headers = {"x-user-id": "preflight", "content-type": "application/json"}
            conn.request(method, path, body=payload, headers=request_headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise StartError(f"{method} {path} failed: {exc!r}") from exc
        finally:
            conn.close()
        if response.status != 200 or data != UPSTREAM_BODY:
            raise StartError(f"{method} {path} answered {response.status} {data[:200]!r}")
        headers = {k.lower(): v for k, v in response.getheaders()}
    return headers


# --- wrk ---------------------------------------------------------------------------------

_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _duration_us(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not match:
        raise ValueError(f"unparsable wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_us: float
    p99_us: float
    # From the script's done() (None when wrk ran without the bench's script).
    p999_us: float | None = None
    max_us: float | None = None
    non_2xx: int = 0
    socket_errors: int = 0
    proxy_cpu_s: float | None = None
    # CPU time of everything on the proxy's cores (pinned runs only): far above
    # proxy_cpu_s means another process ran there and the figure is disturbed.
    cores_busy_s: float | None = None
    # GET /canaries taken during the run (canary targets only): see probe_canaries.
    canaries: dict[str, Any] | None = None
    # modelgate targets: the proxy's CPU seconds in the run per thread name.
    threads_cpu_s: dict[str, float] | None = None

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.proxy_cpu_s is None or not self.requests:
            return None
        return self.proxy_cpu_s * 1e6 / self.requests


def parse_wrk(output: str) -> WrkResult:
    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, output, re.MULTILINE)
        if not match:
            raise ValueError(f"wrk output lacks {pattern!r}:\n{output}")
        return match

    done = find(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)")
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    tail = re.search(rf"^{TAIL_LINE} p99\.9 (\d+) max (\d+)$", output, re.MULTILINE)
    return WrkResult(
        requests=int(done.group(1)),
        duration_s=_duration_us(done.group(2) + done.group(3)) / 1e6,
        rps=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_us=_duration_us(find(r"^\s+50%\s+(\S+)").group(1)),
        p99_us=_duration_us(find(r"^\s+99%\s+(\S+)").group(1)),
        p999_us=float(tail.group(1)) if tail else None,
        max_us=float(tail.group(2)) if tail else None,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
    )


def probe_canaries(admin_port: int, run_began: float) -> dict[str, Any]:
    """GET /canaries on the admin port: how many canaries there are, how many are running,
    and how many judged (a last evaluation with check results) since `run_began` (unix s),
    with the decisions and the check outcomes of those evaluations."""
    conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
    try:
        conn.request("GET", "/canaries")
        response = conn.getresponse()
        data = response.read()
    except (OSError, http.client.HTTPException) as exc:
        return {"error": repr(exc)}
    finally:
        conn.close()
    if response.status != 200:
        return {"error": f"GET /canaries answered {response.status} {data[:200]!r}"}
    found = json.loads(data)["canaries"]
    states: dict[str, int] = {}
    decisions: dict[str, int] = {}
    outcomes: dict[str, int] = {}
    judged = 0
    for canary in found:
        states[canary["state"]] = states.get(canary["state"], 0) + 1
        last = canary.get("last_evaluation") or {}
        when = last.get("time")
        if not last.get("checks") or when is None:
            continue
        if datetime.fromisoformat(when).timestamp() < run_began:
            continue
        judged += 1
        decisions[last["decision"]] = decisions.get(last["decision"], 0) + 1
        for check in last["checks"]:
            key = f"{check['metric']} {check['outcome']}"
            outcomes[key] = outcomes.get(key, 0) + 1
    return {
        "canaries": len(found),
        "states": states,
        "judged_during_run": judged,
        "decisions": decisions,
        "checks": outcomes,
    }


def probe_text(probe: dict[str, Any] | None) -> str:
    if probe is None:
        return ""
    if "error" in probe:
        return f"probe failed: {probe['error']}"
    return (
        f"{probe['judged_during_run']}/{probe['canaries']} judged during the run,"
        f" states {probe['states']}, decisions {probe['decisions']}, checks {probe['checks']}"
    )


@dataclass(frozen=True)
class Workload:
    method: str  # GET or POST
    connections: int

    @property
    def label(self) -> str:
        return "GET" if self.method == "GET" else f"POST {POST_BYTES // 1024} KB"


@dataclass
class Runner:
    """Runs wrk pinned to the load cores and accounts the proxy's CPU time."""

    scripts: dict[str, Path]
    threads: int
    load_cpus: str
    proxy_cpus: str
    pin: bool

    def run(self, target: Target, workload: Workload, seconds: int) -> WrkResult:
        # wrk takes whole seconds only.
        threads = min(self.threads, workload.connections)
        command = [
            "wrk",
            f"-t{threads}",
            f"-c{workload.connections}",
            f"-d{seconds}s",
            "--latency",
            "--timeout",
            "5s",
            "-s",
            str(self.scripts[workload.method]),
            f"http://127.0.0.1:{target.port}{PATH}",
        ]
        if self.pin:
            command = ["taskset", "-c", self.load_cpus, *command]
        pids = tree_pids(target.pid) if target.pid is not None else []
        probe: dict[str, Any] | None = None
        timer: threading.Timer | None = None
        if target.name == "modelgate-canaries" and target.admin_port is not None:
            # Late in the run, so each canary has had time to look at this run's records.
            began, admin_port = time.time(), target.admin_port

            def take() -> None:
                nonlocal probe
                probe = probe_canaries(admin_port, began)

            timer = threading.Timer(max(0.5, seconds * 0.8), take)
        cpu_before, cores_before = cpu_seconds(pids), cores_busy_seconds(self.proxy_cpus)
        threads_before = thread_cpu_seconds(pids) if target.name.startswith("modelgate") else {}
        if timer is not None:
            timer.start()
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
        cpu_after, cores_after = cpu_seconds(pids), cores_busy_seconds(self.proxy_cpus)
        if timer is not None:
            timer.join()
        if done.returncode != 0:
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
        result = parse_wrk(done.stdout)
        if target.pid is not None:
            result.proxy_cpu_s = cpu_after - cpu_before
            if self.pin:
                result.cores_busy_s = cores_after - cores_before
        result.canaries = probe
        if threads_before:
            after = thread_cpu_seconds(pids)
            result.threads_cpu_s = {
                name: round(seconds - threads_before.get(name, 0.0), 2)
                for name, seconds in sorted(after.items())
                if seconds - threads_before.get(name, 0.0) > 0
            }
        return result


# --- the bench ---------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    procs: Processes
    body: bytes = field(default_factory=post_body)
    skipped: dict[str, str] = field(default_factory=dict)

    def start_nginx(self, name: str, conf: str, port: int, cpus: str) -> int:
        prefix = self.workdir / name
        prefix.mkdir()
        (prefix / "nginx.conf").write_text(conf)
        argv = ["nginx", "-p", str(prefix), "-c", str(prefix / "nginx.conf")]
        argv += ["-e", str(prefix / "error.log")]
        proc = self.procs.start(name, argv, cpus)
        self.procs.wait_listening(name, proc, port, self.args.start_timeout)
        return proc.pid

    def start_upstream(self) -> int:
        port = free_port()
        self.start_nginx(
            "upstream",
            upstream_nginx_conf(self.workdir / "upstream", port),
            port,
            self.args.upstream_cpus,
        )
        preflight(port, self.body)
        return port

    def start_target(self, name: str, upstream_port: int) -> Target:
        cpus = self.args.proxy_cpus
        port = free_port()
        if name == "direct":
            return Target(name, upstream_port, None, "wrk -> upstream nginx")
        if name == "nginx":
            conf = proxy_nginx_conf(self.workdir / name, port, upstream_port)
            pid = self.start_nginx(name, conf, port, cpus)
            return Target(name, port, pid, "nginx reverse proxy, keepalive 64")
        if name == "naive":
            argv = [sys.executable, str(REPO / "benchmarks" / "naive_proxy.py")]
            argv += [
                "--listen",
                f"127.0.0.1:{port}",
                "--upstream",
                f"http://127.0.0.1:{upstream_port}",
            ]
            proc = self.procs.start(name, argv, cpus)
            self.procs.wait_listening(name, proc, port, self.args.start_timeout)
            return Target(name, port, proc.pid, "aiohttp server + ClientSession")
        if name == "nginx-mirror":
            conf = mirror_nginx_conf(self.workdir / name, port, upstream_port)
            pid = self.start_nginx(name, conf, port, cpus)
            return Target(name, port, pid, "nginx reverse proxy + mirror module")
        if name in CANARY_TARGETS:
            config = self.workdir / f"{name}.yaml"
            log_dir = self.workdir / f"{name}-logs"
            admin_port = free_port()
            n, judge = self.args.canaries, name == "modelgate-canaries"
            text = modelgate_canaries_config(port, admin_port, upstream_port, log_dir, n, judge)
            config.write_text(text)
            argv = [*modelgate_command(self.args.modelgate_cmd), "serve", "--config", str(config)]
            argv += ["--workers", "1"]
            proc = self.procs.start(name, argv, cpus, env=modelgate_env())
            self.procs.wait_listening(name, proc, port, self.args.start_timeout)
            what = "each with a source: local canary" if judge else "no canary"
            note = (
                f"1 worker, {n} experiments 90/10 on routes /c0/../c{n - 1}/ ({what}),"
                " exposures on; SIGSTOPped while other targets run"
            )
            return Target(name, port, proc.pid, note, admin_port)
        if name in ("modelgate", "modelgate-shadow"):
            config = self.workdir / f"{name}.yaml"
            log_dir = self.workdir / f"{name}-logs"
            make = modelgate_config if name == "modelgate" else modelgate_shadow_config
            config.write_text(make(port, free_port(), upstream_port, log_dir))
            argv = [*modelgate_command(self.args.modelgate_cmd), "serve", "--config", str(config)]
            argv += ["--workers", "1"]
            proc = self.procs.start(name, argv, cpus, env=modelgate_env())
            self.procs.wait_listening(name, proc, port, self.args.start_timeout)
            note = "1 worker, A/B 50/50 on x-user-id"
            if name == "modelgate-shadow":
                note += ", one shadow at sample 1.0 (compared, diff log)"
            return Target(name, port, proc.pid, note)
        raise StartError(f"unknown target {name!r}")

    def start_targets(self, names: Sequence[str], upstream_port: int) -> list[Target]:
        targets = []
        for name in names:
            try:
                target = self.start_target(name, upstream_port)
                headers = preflight(target.port, self.body)
                if name in CANARY_TARGETS:
                    headers = preflight(target.port, self.body, canary_path(0))
            except (StartError, OSError) as exc:
                self.skipped[name] = str(exc)
                self.procs.stop_named(name)  # started but broken: not left to steal CPU
                print(f"# skipping {name}: {exc}".replace("\n", "\n#   "), file=sys.stderr)
                continue
            if name.startswith("modelgate"):
                seen = {k: v for k, v in headers.items() if k.startswith("x-modelgate-")}
                target.note += f"; preflight headers {seen}"
                if "x-modelgate-variant" not in headers:
                    print(
                        "# warning: modelgate answered without x-modelgate-variant", file=sys.stderr
                    )
            targets.append(target)
        return targets


def modelgate_command(override: str | None) -> list[str]:
    if override:
        return shlex.split(override)
    script = shutil.which("modelgate")
    return [script] if script else [sys.executable, "-m", "modelgate"]


def modelgate_env() -> dict[str, str]:
    env = dict(os.environ)
    if importlib.util.find_spec("modelgate") is None:
        # Not installed: run it from this checkout's src/ layout.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p
        )
    return env


def hold(target: Target, stopped: bool) -> None:
    """SIGSTOP (or SIGCONT) a canary target's process group: the canaries judge in the
    background, on the proxies' core, and must not disturb the other targets' runs."""
    if target.name in CANARY_TARGETS and target.pid is not None:
        try:
            os.killpg(target.pid, signal.SIGSTOP if stopped else signal.SIGCONT)
        except ProcessLookupError:
            pass


@dataclass
class Run:
    round: int
    target: str
    workload: str
    connections: int
    result: WrkResult


def run_rounds(
    bench: Bench, runner: Runner, targets: list[Target], workloads: list[Workload]
) -> list[Run]:
    runs: list[Run] = []
    for index in range(bench.args.rounds):
        # Rotate the order each round so no target always runs first (or after the same one).
        shift = index % len(targets)
        for target in targets[shift:] + targets[:shift]:
            hold(target, False)
            for workload in workloads:
                result = runner.run(target, workload, bench.args.duration)
                runs.append(Run(index, target.name, workload.label, workload.connections, result))
                print(
                    f"# round {index + 1} {target.name:<9} {workload.label:<9}"
                    f" c{workload.connections:<3}"
                    f" {result.rps:>10.0f} req/s  p50 {result.p50_us / 1e3:.3f} ms"
                    f"  p99 {result.p99_us / 1e3:.3f} ms  p99.9 {_ms(result.p999_us)} ms"
                    f"  max {_ms(result.max_us)} ms",
                    file=sys.stderr,
                )
                if result.canaries is not None:
                    print(f"#   canaries: {probe_text(result.canaries)}", file=sys.stderr)
                if result.threads_cpu_s:
                    print(f"#   CPU s per thread: {result.threads_cpu_s}", file=sys.stderr)
            hold(target, True)
    return runs


@dataclass
class Summary:
    target: str
    workload: str
    connections: int
    rps: float
    p50_us: float
    p99_us: float
    p999_us: float | None
    max_us: float | None
    cpu_us_per_request: float | None
    rps_min: float
    rps_max: float
    cpu_utilization: float | None
    cores_utilization: float | None
    non_2xx: int
    socket_errors: int
    added_p50_us: float | None = None
    # Canaries judging during each run (GET /canaries late in the run): fewest over runs.
    canaries_judged_min: int | None = None
    canaries: int | None = None
    # Median CPU seconds per run of each thread of the proxy (modelgate targets).
    threads_cpu_s: dict[str, float] | None = None


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: list[Run]) -> list[Summary]:
    groups: dict[tuple[str, str, int], list[WrkResult]] = {}
    for run in runs:
        groups.setdefault((run.target, run.workload, run.connections), []).append(run.result)
    summaries = []
    for (target, workload, connections), results in groups.items():
        cpu = [r.cpu_us_per_request for r in results if r.cpu_us_per_request is not None]
        util = [r.proxy_cpu_s / r.duration_s for r in results if r.proxy_cpu_s is not None]
        cores = [r.cores_busy_s / r.duration_s for r in results if r.cores_busy_s is not None]
        summaries.append(
            Summary(
                target=target,
                workload=workload,
                connections=connections,
                rps=statistics.median(r.rps for r in results),
                p50_us=statistics.median(r.p50_us for r in results),
                p99_us=statistics.median(r.p99_us for r in results),
                p999_us=_median([r.p999_us for r in results]),
                max_us=_median([r.max_us for r in results]),
                cpu_us_per_request=statistics.median(cpu) if cpu else None,
                rps_min=min(r.rps for r in results),
                rps_max=max(r.rps for r in results),
                cpu_utilization=statistics.median(util) if util else None,
                cores_utilization=statistics.median(cores) if cores else None,
                non_2xx=sum(r.non_2xx for r in results),
                socket_errors=sum(r.socket_errors for r in results),
            )
        )
        per_thread = [r.threads_cpu_s for r in results if r.threads_cpu_s is not None]
        if per_thread:
            names = sorted({name for found in per_thread for name in found})
            summaries[-1].threads_cpu_s = {
                name: round(statistics.median(found.get(name, 0.0) for found in per_thread), 2)
                for name in names
            }
        probes = [r.canaries for r in results if r.canaries is not None]
        if probes:
            counted = [p for p in probes if "error" not in p]
            summaries[-1].canaries_judged_min = (
                min(p["judged_during_run"] for p in counted) if len(counted) == len(probes) else 0
            )
            summaries[-1].canaries = max((p["canaries"] for p in counted), default=0)
    direct = {(s.workload, s.connections): s.p50_us for s in summaries if s.target == "direct"}
    for s in summaries:
        base = direct.get((s.workload, s.connections))
        s.added_p50_us = s.p50_us - base if base is not None else None
    return summaries


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def _ms(value_us: float | None) -> str:
    return "n/a" if value_us is None else f"{value_us / 1e3:.3f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def results_table(summaries: list[Summary], order: Sequence[str]) -> str:
    rows = [
        "| target | workload | conns | req/s | req/s min-max | p50 ms | p99 ms | p99.9 ms "
        "| max ms | p50 added vs direct, ms | proxy CPU us/req | proxy busy | proxy cores busy "
        "| non-2xx / socket errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ranked = sorted(summaries, key=lambda s: (s.workload, s.connections, order.index(s.target)))
    for s in ranked:
        added = None if s.added_p50_us is None else s.added_p50_us / 1e3
        rows.append(
            f"| {s.target} | {s.workload} | {s.connections} | {s.rps:,.0f}"
            f" | {s.rps_min:,.0f}-{s.rps_max:,.0f} | {s.p50_us / 1e3:.3f} | {s.p99_us / 1e3:.3f}"
            f" | {_ms(s.p999_us)} | {_ms(s.max_us)} | {_fmt(added, '+.3f')}"
            f" | {_fmt(s.cpu_us_per_request, '.0f')}"
            f" | {_percent(s.cpu_utilization)} | {_percent(s.cores_utilization)}"
            f" | {s.non_2xx} / {s.socket_errors} |"
        )
    return "\n".join(rows)


RATIOS = (
    ("modelgate", "nginx"),
    ("modelgate", "naive"),
    ("naive", "nginx"),
    ("nginx", "direct"),
    ("modelgate-shadow", "nginx-mirror"),
    ("modelgate-canaries", "modelgate-nocanaries"),
    ("modelgate-nocanaries", "nginx"),
)
# CPU per request is the steadier figure on a shared machine: a neighbour that steals the
# proxy's core lowers its req/s but not the CPU it spends per request.
CPU_RATIOS = (
    ("modelgate", "nginx"),
    ("modelgate", "naive"),
    ("modelgate-shadow", "nginx-mirror"),
    ("modelgate-canaries", "modelgate-nocanaries"),
)
# Latency quantiles, top over bottom (the canaries' cost is in the tail if anywhere).
LATENCY_RATIOS = (("modelgate-canaries", "modelgate-nocanaries"),)
LATENCIES = (("p50", "p50_us"), ("p99", "p99_us"), ("p99.9", "p999_us"), ("max", "max_us"))


def ratios(summaries: list[Summary]) -> list[dict[str, Any]]:
    by_key = {(s.target, s.workload, s.connections): s for s in summaries}
    keys = sorted({(s.workload, s.connections) for s in summaries})
    out = []
    for workload, connections in keys:
        row: dict[str, Any] = {"workload": workload, "connections": connections}
        for top, bottom in RATIOS:
            a, b = (
                by_key.get((top, workload, connections)),
                by_key.get((bottom, workload, connections)),
            )
            row[f"{top}/{bottom} req/s"] = a.rps / b.rps if a and b and b.rps else None
        for top, bottom in CPU_RATIOS:
            a, b = (
                by_key.get((top, workload, connections)),
                by_key.get((bottom, workload, connections)),
            )
            cpu_a = a.cpu_us_per_request if a else None
            cpu_b = b.cpu_us_per_request if b else None
            row[f"{top}/{bottom} CPU/req"] = cpu_a / cpu_b if cpu_a and cpu_b else None
        for top, bottom in LATENCY_RATIOS:
            a, b = (
                by_key.get((top, workload, connections)),
                by_key.get((bottom, workload, connections)),
            )
            for label, key in LATENCIES:
                lat_a = getattr(a, key) if a else None
                lat_b = getattr(b, key) if b else None
                row[f"{top}/{bottom} {label}"] = lat_a / lat_b if lat_a and lat_b else None
        out.append(row)
    return out


def ratios_table(rows: list[dict[str, Any]]) -> str:
    names = [f"{t}/{b} req/s" for t, b in RATIOS] + [f"{t}/{b} CPU/req" for t, b in CPU_RATIOS]
    names += [f"{t}/{b} {label}" for t, b in LATENCY_RATIOS for label, _ in LATENCIES]
    # Only the ratios this run measured.
    names = [n for n in names if any(row.get(n) is not None for row in rows)]
    if not names:
        return "no ratio: the run lacks both targets of every pair"
    lines = [
        "| workload | conns | " + " | ".join(names) + " |",
        "|---|---:|" + "---:|" * len(names),
    ]
    for row in rows:
        cells = " | ".join(_fmt(row[n], ".2f") for n in names)
        lines.append(f"| {row['workload']} | {row['connections']} | {cells} |")
    return "\n".join(lines)


# --- leak check --------------------------------------------------------------------------


def leak_check(bench: Bench, runner: Runner, target: Target) -> dict[str, Any]:
    """Drives `--leak-requests` POSTs (c64) in segments, reading the tree's RSS after each."""
    assert target.pid is not None
    args = bench.args
    workload = Workload("POST", 64)
    started = time.monotonic()
    samples: list[dict[str, float]] = [
        {"requests": 0, "rss_mib": rss_kib(tree_pids(target.pid)) / 1024}
    ]
    total = 0
    segment_s = 2  # the first segment also measures the rate that sizes the others
    while total < args.leak_requests and time.monotonic() - started < args.leak_max_seconds:
        result = runner.run(target, workload, segment_s)
        total += result.requests
        rss = rss_kib(tree_pids(target.pid)) / 1024
        samples.append({"requests": total, "rss_mib": rss, "elapsed_s": time.monotonic() - started})
        print(f"# leak {target.name}: {total:>9,} requests  RSS {rss:.1f} MiB", file=sys.stderr)
        rate = max(result.rps, 1.0)
        segment_s = max(1, min(60, round(args.leak_requests / args.leak_segments / rate)))
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    span = last["requests"] - first["requests"]
    growth = last["rss_mib"] - first["rss_mib"]
    return {
        "target": target.name,
        "requests": total,
        "reached_target": total >= args.leak_requests,
        "samples": samples,
        "rss_growth_mib_after_first_segment": growth,
        "rss_growth_kib_per_100k_requests": growth * 1024 * 1e5 / span if span else None,
    }


def leak_table(report: dict[str, Any]) -> str:
    lines = [
        f"RSS of {report['target']} (process tree, VmRSS):",
        "",
        "| requests since warm-up | RSS MiB |",
        "|---:|---:|",
    ]
    lines += [f"| {int(s['requests']):,} | {s['rss_mib']:.1f} |" for s in report["samples"]]
    per = report["rss_growth_kib_per_100k_requests"]
    lines.append("")
    lines.append(
        f"growth after the first segment: {report['rss_growth_mib_after_first_segment']:+.1f} MiB"
        f" ({_fmt(per, '+.1f')} KiB per 100k requests)"
        + (
            ""
            if report["reached_target"]
            else f"; stopped by --leak-max-seconds at {report['requests']:,}"
        )
    )
    return "\n".join(lines)


# --- environment -------------------------------------------------------------------------


def _command_output(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    return (done.stdout + done.stderr).strip()


def _loadavg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    lscpu = _command_output(["lscpu"])
    model = re.search(r"^Model name:\s+(.+)$", lscpu, re.MULTILINE)
    probe = "import modelgate, modelgate.core as c; print(modelgate.__version__, c.IMPLEMENTATION)"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=modelgate_env()
    )
    version, _, core = done.stdout.strip().partition(" ")
    return {
        "cpu": model.group(1).strip() if model else "unknown",
        "nproc": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": _command_output(["nginx", "-v"]).removeprefix("nginx version: nginx/"),
        "wrk": _command_output(["wrk", "-v"]).splitlines()[0].split(" Copyright")[0][4:],
        "aiohttp": _package_version("aiohttp"),
        "uvloop": _package_version("uvloop"),
        "httptools": _package_version("httptools"),
        "modelgate": version if done.returncode == 0 else "unavailable",
        "modelgate core": core if done.returncode == 0 else "unavailable",
    }


# --- command line ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)}",
    )
    parser.add_argument("-d", "--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds (medians)")
    parser.add_argument("--connections", default="8,64", help="comma-separated wrk -c values")
    parser.add_argument("--methods", default="GET,POST", help="GET and/or POST (1 KB body)")
    parser.add_argument("-t", "--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per target")
    parser.add_argument("--proxy-cpus", default="1", help="taskset cpu list for the proxies")
    parser.add_argument("--load-cpus", default="0", help="taskset cpu list for wrk")
    parser.add_argument("--upstream-cpus", default="0", help="taskset cpu list for the upstream")
    parser.add_argument("--no-pin", action="store_true", help="do not use taskset")
    parser.add_argument(
        "--start-timeout", type=float, default=15.0, help="seconds to wait for a target to listen"
    )
    parser.add_argument(
        "--modelgate-cmd",
        default=None,
        help="command that starts modelgate (default: modelgate, else python -m modelgate)",
    )
    parser.add_argument(
        "--canaries",
        type=int,
        default=20,
        help="experiments (with a canary each in modelgate-canaries) in the canary targets",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--leak-check",
        action="store_true",
        help="after the rounds, drive --leak-requests through modelgate and naive, sampling RSS",
    )
    parser.add_argument("--leak-requests", type=int, default=1_000_000)
    parser.add_argument("--leak-segments", type=int, default=10, help="RSS samples per leak check")
    parser.add_argument(
        "--leak-max-seconds",
        type=float,
        default=300.0,
        help="time cap per target for the leak check",
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown or not targets:
        parser.error(f"--targets: unknown {unknown}; choose from {','.join(ALL_TARGETS)}")
    args.targets = list(dict.fromkeys(targets))
    try:
        args.connections = [int(c) for c in args.connections.split(",")]
    except ValueError:
        parser.error(f"--connections must be integers, got {args.connections!r}")
    methods = [m.strip().upper() for m in args.methods.split(",")]
    if not methods or set(methods) - {"GET", "POST"}:
        parser.error(f"--methods must be GET and/or POST, got {args.methods!r}")
    args.methods = methods
    if args.canaries < 1:
        parser.error("--canaries must be >= 1")
    if args.duration <= 0 or args.rounds < 0 or args.threads < 1 or min(args.connections) < 1:
        parser.error("-d must be > 0, --rounds >= 0, -t >= 1 and every --connections >= 1")
    return args


@contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="modelgate-bench-"))
    path.chmod(0o755)  # nginx workers run as nobody when we are root
    try:
        yield path
    finally:
        if keep:
            print(f"# kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if missing:
        print(f"error: {', '.join(missing)} not found on PATH", file=sys.stderr)
        return 2
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if not pin:
        print("# warning: not pinning (no taskset, --no-pin, or a single CPU)", file=sys.stderr)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks below stop every child.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    env = environment()
    with workdir(args.keep_workdir) as tmp:
        procs = Processes(tmp, pin)
        try:
            return bench_main(args, env, tmp, procs)
        finally:
            procs.stop_all()


def bench_main(args: argparse.Namespace, env: dict[str, str], tmp: Path, procs: Processes) -> int:
    bench = Bench(args, tmp, procs)
    load_start = _loadavg()
    scripts = {"GET": tmp / "get.lua", "POST": tmp / "post.lua"}
    # With a canary target in the run, every target gets the same traffic over its routes.
    paths = args.canaries if set(args.targets) & set(CANARY_TARGETS) else 0
    scripts["GET"].write_text(wrk_script("GET", None, paths))
    scripts["POST"].write_text(wrk_script("POST", bench.body, paths))
    runner = Runner(scripts, args.threads, args.load_cpus, args.proxy_cpus, pin=procs.pin)
    try:
        upstream_port = bench.start_upstream()
    except (StartError, OSError) as exc:
        print(f"error: the upstream nginx did not start: {exc}", file=sys.stderr)
        return 1
    targets = bench.start_targets(args.targets, upstream_port)
    if not targets:
        print("error: no target started", file=sys.stderr)
        return 1
    workloads = [Workload(m, c) for m in args.methods for c in args.connections]
    for target in targets:
        if args.warmup > 0:
            runner.run(target, Workload("POST", max(args.connections)), args.warmup)
        hold(target, True)
    try:
        runs = run_rounds(bench, runner, targets, workloads)
    finally:
        for target in targets:
            hold(target, False)
    summaries = summarize(runs)
    ratio_rows = ratios(summaries)
    leaks = []
    if args.leak_check:
        for target in targets:
            if target.name in ("modelgate", "naive"):
                leaks.append(leak_check(bench, runner, target))

    load_end = _loadavg()
    print("## Proxy bench\n")
    pinning = (
        f"proxy on CPU {args.proxy_cpus}, wrk on CPU {args.load_cpus}, "
        f"upstream nginx on CPU {args.upstream_cpus} (taskset)"
        if procs.pin
        else "no CPU pinning"
    )
    print(f"- machine: {env['cpu']}, nproc {env['nproc']}, Linux {env['kernel']}; {pinning}")
    versions = ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("cpu", "nproc", "kernel"))
    print(f"- versions: {versions}")
    print(
        f"- method: wrk -t{args.threads} --latency, {args.duration} s per run,"
        f" {args.rounds} rounds round-robin over targets, medians;"
        " upstream: nginx `return 200` of a 13-byte JSON body;"
        f" POST body {POST_BYTES} bytes; x-user-id cycles over {USERS:,} users"
        + (f", requests spread over the routes /c0/ .. /c{paths - 1}/" if paths else "")
        + "; p99.9 and max from wrk's done() hook"
    )
    command = " ".join(shlex.quote(a) for a in sys.argv[1:])
    print(f"- command: python benchmarks/proxy_bench.py {command}")
    print(
        f"- load average (1 min) at start {load_start}, at end {load_end}; 'proxy busy' is the"
        " proxy's own CPU time per wall second, 'proxy cores busy' that of everything on its"
        " cores: a large gap means another process disturbed the run"
    )
    for target in targets:
        print(f"- {target.name}: {target.note}")
    for s in summaries:
        if s.threads_cpu_s:
            print(
                f"- {s.target} {s.workload} c{s.connections}: CPU seconds per run by thread"
                f" (medians; {args.duration} s runs): {s.threads_cpu_s}"
            )
        if s.canaries is not None:
            print(
                f"- {s.target} {s.workload} c{s.connections}: GET /canaries late in each run:"
                f" at least {s.canaries_judged_min} of {s.canaries} canaries had judged"
                " (a last evaluation with check results) during the run"
            )
    for name, reason in bench.skipped.items():
        print(f"- {name}: SKIPPED ({reason.splitlines()[0] if reason else 'no reason'})")
    if summaries:
        print()
        print(results_table(summaries, args.targets))
        print()
        print(ratios_table(ratio_rows))
    for report in leaks:
        print()
        print(leak_table(report))
    if args.json:
        payload = {
            "environment": env,
            "load_average_1min": {"start": load_start, "end": load_end},
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "targets": [asdict(t) for t in targets],
            "skipped": bench.skipped,
            "runs": [{**asdict(r), "result": asdict(r.result)} for r in runs],
            "summary": [asdict(s) for s in summaries],
            "ratios": ratio_rows,
            "leak_check": leaks,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
