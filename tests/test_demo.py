"""The demo end to end, shortened: real models, the gateway process, the bench driver."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from modelgate.analyze.command import results_from_logs
from modelgate.demo.run import DemoRun, gateway_config, run_demo_async
from modelgate.difflog import read_difflog
from modelgate.exposure import read_exposures

from .support import async_test

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_configs_demo_yaml_is_what_the_demo_serves() -> None:
    run = DemoRun(Path("/nonexistent"))
    run.log_dir = Path("./modelgate-logs")
    run.model_urls = {f"model-v{i}": f"http://127.0.0.1:900{i}" for i in (1, 2, 3)}
    shipped = yaml.safe_load((CONFIGS / "demo.yaml").read_text(encoding="utf-8"))
    assert shipped == gateway_config(run, 8080, 8081)


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    @async_test
    async def run() -> DemoRun:
        return await run_demo_async(
            duration_s=3.0,
            rate=100.0,
            quiet=True,
            workdir=tmp_path,
            report_path=tmp_path / "report.html",
        )

    demo = run()
    bench = demo.report["bench"]
    assert bench["sent"] == bench["responses"] >= 250
    assert bench["error_count"] == 0
    variants = {k: v["responses"] for k, v in bench["variants"].items()}
    assert set(variants) == {"digits=control", "digits=candidate"}
    # Every answered request was teed to the shadow and logged, and exposed once.
    records, _ = read_difflog(demo.log_dir)
    assert len(records) == bench["responses"]
    _, rows = read_exposures(demo.log_dir)
    rows = [r for r in rows if r["experiment"] == "digits"]
    assert len(rows) == bench["responses"]
    counts = {v: sum(1 for r in rows if r["variant"] == v) for v in ("control", "candidate")}
    assert counts == {
        "control": variants["digits=control"],
        "candidate": variants["digits=candidate"],
    }
    # One outcome per request, all accepted; users came back (fewer users than requests).
    feedback = demo.report["feedback"]
    assert feedback["accepted"] == feedback["posted"] == bench["sent"]
    assert np.all(records["primary_status"] == 200)
    # The A/B result it prints is the gateway's; recomputed from its own files, it is equal.
    status, live = demo.report["experiment"]
    assert status == 200
    (offline,) = results_from_logs(str(demo.log_dir), "digits", None, timelines=False)[0]
    (live_cmp,) = [c for c in live["comparisons"] if c["metric"] == "correct"]
    (file_cmp,) = [c for c in offline["comparisons"] if c["metric"] == "correct"]
    for key in ("diff", "ci_low", "ci_high", "p_value"):
        assert file_cmp[key] == pytest.approx(live_cmp[key], rel=1e-9), key
    # Accuracy per request over users (delta method); SRM on distinct users.
    assert live_cmp["method"] == "ratio" and live_cmp["interval"] == "t"
    assert live["unit_of_analysis"] == "unit" and live["source"] == "logs"
    units = [v["units"] for v in live["variants"]]
    assert live["srm"]["counts"] == units and live["srm"]["unit"] == "distinct enrolled units"
    assert sum(units) < bench["sent"] * 0.6
    assert [v["metrics"]["correct"]["values"] for v in live["variants"]] == [
        counts["control"],
        counts["candidate"],
    ]
    assert Path(demo.report["html"]).exists()
    # The canary on /rollout got its own traffic and a controller that reports on it.
    assert demo.report["rollout"]["responses"] > 0
    status, canaries = demo.report["canaries"]
    assert status == 200
    (canary,) = canaries["canaries"]
    assert canary["experiment"] == "rollout" and canary["history"]


def test_bad_demo_flags_are_refused_with_the_flag_named() -> None:
    import subprocess
    import sys

    for flag in ("--duration", "--rate"):
        result = subprocess.run(
            [sys.executable, "-m", "modelgate", "demo", flag, "0"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2
        assert "--duration and --rate must be > 0" in result.stderr
