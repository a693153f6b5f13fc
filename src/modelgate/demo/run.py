"""`modelgate demo`: every capability end to end on real models, in about a minute.

Trains three digit classifiers (scikit-learn's bundled data, no download), serves each with
`modelgate mock-model --model`, starts `modelgate serve` with an A/B experiment, a shadow
with a compare block, a chaos rule on the candidate arm, and a canary on a second route;
drives traffic with the bench driver from users who come back, posts each request's outcome
(was its prediction right?) as feedback, then prints what a person wants to read and stops
everything, also on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
import yaml

from modelgate.bench.config import BenchConfig
from modelgate.bench.report import BenchReport
from modelgate.bench.run import run_bench
from modelgate.core import VariantTable
from modelgate.demo.models import DemoModels, train_models
from modelgate.demo.report import print_report

__all__ = ["DemoRun", "run_demo", "run_demo_async"]

AB_WEIGHTS = (50.0, 50.0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class DemoRun:
    """Everything the demo started and saw; `report` is what it printed, as data."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.log_dir = workdir / "logs"
        self.processes: list[asyncio.subprocess.Process] = []
        self.gateway_url = ""
        self.admin_url = ""
        self.model_urls: dict[str, str] = {}
        self.report: dict[str, Any] = {}

    async def _spawn(self, *args: str, stdout: int | None = None) -> asyncio.subprocess.Process:
        """`modelgate ARGS` in its own session (a Ctrl-C reaches only the demo), tracked for
        `stop()`."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "modelgate",
            "--log-level",
            "WARNING",
            *args,
            stdout=stdout,
            start_new_session=True,
        )
        self.processes.append(proc)
        return proc

    async def start_model(self, name: str, model_path: Path) -> None:
        proc = await self._spawn(
            "mock-model",
            "--model",
            str(model_path),
            "--name",
            name,
            "--port",
            "0",
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
        if "listening on" not in line:
            raise RuntimeError(f"mock-model {name} did not start: {line!r}")
        self.model_urls[name] = line.rsplit(" ", 1)[1].strip()

    async def start_gateway(self, config: dict[str, Any]) -> None:
        path = self.workdir / "gateway.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        proc = await self._spawn("serve", "--config", str(path))
        async with aiohttp.ClientSession() as session:
            for _ in range(300):
                if proc.returncode is not None:
                    raise RuntimeError(f"modelgate serve exited with {proc.returncode}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(self.admin_url + "/readyz") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise RuntimeError("the gateway did not become ready in 30 s")

    async def stop(self) -> None:
        for proc in reversed(self.processes):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


def gateway_config(run: DemoRun, gateway_port: int, admin_port: int) -> dict[str, Any]:
    urls = run.model_urls
    return {
        "listen": f"127.0.0.1:{gateway_port}",
        "admin": f"127.0.0.1:{admin_port}",
        "log_dir": str(run.log_dir),
        # The one outcome the demo posts: any other name is refused.
        "feedback": {"metrics": {"correct": {"min": 0, "max": 1}}},
        "upstreams": {name: {"url": url, "timeout_ms": 5000} for name, url in urls.items()},
        "routes": [
            {
                "name": "predict",
                "match": {"path_prefix": "/predict", "methods": ["POST"]},
                "unit": ["json:user"],
                "experiment": {
                    "name": "digits",
                    "variants": [
                        {"name": "control", "upstream": "model-v1", "weight": AB_WEIGHTS[0]},
                        {"name": "candidate", "upstream": "model-v2", "weight": AB_WEIGHTS[1]},
                    ],
                    # Users come back: accuracy is a share of each user's requests.
                    "analysis": {
                        "metrics": {"correct": {"kind": "ratio", "denominator": "exposures"}}
                    },
                },
                "shadows": [
                    {
                        "upstream": "model-v3",
                        "sample": 1.0,
                        "compare": {"fields": ["/label"], "ignore": ["/model"]},
                    },
                ],
                "chaos": [
                    {
                        "name": "slow-candidate",
                        "variant": "candidate",
                        "probability": 0.25,
                        "seed": 7,
                        "delay": {
                            "distribution": "lognormal",
                            "median_ms": 40,
                            "sigma": 0.3,
                            "max_ms": 500,
                        },
                    }
                ],
            },
            {
                "name": "rollout",
                "match": {"path_prefix": "/rollout", "methods": ["POST"]},
                "unit": ["json:user"],
                "experiment": {
                    "name": "rollout",
                    "variants": [
                        {"name": "stable", "upstream": "model-v1", "weight": 99},
                        {"name": "next", "upstream": "model-v2", "weight": 1},
                    ],
                    # Ramp v2 in; each step is judged on error rate and p99 latency against
                    # the baseline before the next one, and rolled back on evidence.
                    "canary": {
                        "baseline": "stable",
                        "candidate": "next",
                        "steps": [10, 50, 100],
                        "interval_s": 2,
                        "min_samples": 20,
                    },
                },
            },
        ],
    }


async def post_outcomes(
    run: DemoRun, models: DemoModels, lines: list[tuple[str, int]], sent: int
) -> dict[str, Any]:
    """Feedback from the true labels: for each request sent (the bench sends line `seq %
    len(lines)` as request `seq`), 1 if the model of its user's variant got that row right.
    Posted by (experiment, unit): the gateway recomputes the variant from the unit, so
    nothing is stored per request; a user's values add up, and `correct` is declared a
    ratio over exposures (the share of a user's requests answered right)."""
    table = VariantTable(list(AB_WEIGHTS))
    by_variant = {0: "model-v1", 1: "model-v2"}
    predictions = {
        name: models.estimators[name].predict(models.features) for name in by_variant.values()
    }
    items = []
    for seq in range(sent):
        user, row = lines[seq % len(lines)]
        variant = table.assign("digits", user)
        correct = int(predictions[by_variant[variant]][row] == models.labels[row])
        items.append({"experiment": "digits", "unit": user, "metric": "correct", "value": correct})
    accepted = 0
    async with aiohttp.ClientSession() as session:
        for start in range(0, len(items), 500):
            async with session.post(
                run.gateway_url + "/_modelgate/feedback", json=items[start : start + 500]
            ) as response:
                body = await response.json()
                if response.status != 202:
                    raise RuntimeError(f"feedback refused: {response.status} {body}")
                accepted += int(body["accepted"])
    return {"posted": len(items), "accepted": accepted}


def write_html(run: DemoRun, path: Path) -> str | None:
    """The analysis report with plots, from the run's own exposure and feedback files."""
    from modelgate.analyze.command import AnalyzeError, format_results, results_from_logs

    try:
        from modelgate.analyze.report import ReportError, write_report
    except ImportError:
        return None
    try:
        results, timelines, _ = results_from_logs(str(run.log_dir), "digits", None)
        text = "\n\n".join(format_results(r) for r in results)
        write_report(str(path), results, text, timelines, f"modelgate demo, logs {run.log_dir}")
    except (AnalyzeError, ReportError, OSError) as exc:
        return f"(not written: {exc})"
    return str(path)


async def _admin_json(run: DemoRun, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(run.admin_url + path) as response:
            try:
                return response.status, await response.json()
            except (aiohttp.ContentTypeError, ValueError):
                return response.status, await response.text()


async def run_demo_async(
    duration_s: float = 20.0,
    rate: float = 150.0,
    *,
    keep_running: bool = False,
    quiet: bool = False,
    workdir: Path | None = None,
    report_path: Path | None = None,
) -> DemoRun:
    say = (lambda *a: None) if quiet else print
    owned = None
    if workdir is None:
        owned = tempfile.TemporaryDirectory(prefix="modelgate-demo-")
        workdir = Path(owned.name)
    run = DemoRun(workdir)
    run.log_dir.mkdir(parents=True, exist_ok=True)
    try:
        say("training three digit classifiers on scikit-learn's bundled data ...")
        models = await asyncio.to_thread(train_models)
        for name, acc in models.accuracy.items():
            say(f"  {name}: {models.description[name]:<42} held-out accuracy {acc:.1%}")
        paths = models.save(workdir)
        await asyncio.gather(*(run.start_model(name, path) for name, path in paths.items()))
        gateway_port, admin_port = _free_port(), _free_port()
        run.gateway_url = f"http://127.0.0.1:{gateway_port}"
        run.admin_url = f"http://127.0.0.1:{admin_port}"
        await run.start_gateway(gateway_config(run, gateway_port, admin_port))
        say(f"gateway {run.gateway_url}  admin {run.admin_url}  logs {run.log_dir}")
        traffic = workdir / "traffic.jsonl"
        lines = models.write_traffic(traffic)
        users = len({user for user, _ in lines})
        say(
            f"driving {rate:g} req/s for {duration_s:g} s of held-out rows from {users} "
            "users, who come back (most send 1-3 requests, a few dozens), through the bench "
            "driver ..."
        )
        ab_traffic = run_bench(
            BenchConfig(
                url=run.gateway_url + "/predict",
                rate=rate,
                duration_s=duration_s,
                method="POST",
                body_file=str(traffic),
                timeout_s=10.0,
            )
        )
        canary_traffic = run_bench(
            BenchConfig(
                url=run.gateway_url + "/rollout",
                rate=max(rate / 3, 20.0),
                duration_s=duration_s,
                method="POST",
                body_file=str(traffic),
                timeout_s=10.0,
            )
        )
        report: BenchReport
        report, rollout = await asyncio.gather(ab_traffic, canary_traffic)
        run.report["bench"] = report.as_dict()
        run.report["rollout"] = rollout.as_dict()
        run.report["feedback"] = await post_outcomes(run, models, lines, report.sent)
        await asyncio.sleep(1.2)  # the diff log and exposure writers flush every second
        run.report["experiment"] = await _admin_json(run, "/experiments/digits")
        run.report["canaries"] = await _admin_json(run, "/canaries")
        run.report["status"] = await _admin_json(run, "/status")
        run.report["accuracy"] = models.accuracy
        if report_path is not None:
            run.report["html"] = await asyncio.to_thread(write_html, run, report_path)
        if not quiet:
            print_report(run)
        if keep_running:
            print(
                f"\nleft running: gateway {run.gateway_url}, admin {run.admin_url} "
                f"(/status, /metrics, /experiments/digits), models {run.model_urls}."
            )
            print("Ctrl-C stops everything.")
            await asyncio.Event().wait()
        return run
    finally:
        await run.stop()
        if owned is not None and not keep_running:
            owned.cleanup()


def run_demo(
    duration_s: float = 20.0,
    rate: float = 150.0,
    keep_running: bool = False,
    report: str = "modelgate-demo-report.html",
) -> int:
    """Runs the demo; Ctrl-C stops it cleanly (the finally blocks stop every process)."""
    if duration_s <= 0 or rate <= 0:
        print("modelgate demo: --duration and --rate must be > 0", file=sys.stderr)
        return 2
    try:
        import sklearn  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        print("modelgate demo needs scikit-learn: pip install 'modelgate[demo]'", file=sys.stderr)
        return 2
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        uvloop.run(
            run_demo_async(
                duration_s, rate, keep_running=keep_running, report_path=Path(report).resolve()
            )
        )
    except KeyboardInterrupt:
        print("\ninterrupted; everything stopped")
        return 130
    except RuntimeError as exc:
        print(f"modelgate demo: {exc}", file=sys.stderr)
        return 1
    return 0
