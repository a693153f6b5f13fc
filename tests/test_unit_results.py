"""Results over units (issue 13) through a real gateway with repeat visitors: `modelgate
analyze --logs` equals a hand-written pandas/scipy analysis of the same raw records, and its
standard errors are wider than the former per-event ones, which treated a unit's requests as
independent; an A/A battery through the engine keeps the false-positive rate at alpha."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps  # type: ignore[import-untyped]

from modelgate.analysis.engine import AnalysisEngine
from modelgate.analysis.synth import Synthetic, write_synthetic
from modelgate.analysis.unit_results import ratio_pairs, unit_results
from modelgate.analyze.command import event_results_from_logs, results_from_logs
from modelgate.cli import main
from modelgate.exposure import read_exposures
from modelgate.feedbacklog import read_feedback
from modelgate.mock.server import MockSettings

from .support import ab_config, async_test, gateway_stack

MOCKS = {"model-a": MockSettings(name="model-a"), "model-b": MockSettings(name="model-b")}
FEEDBACK = "/_modelgate/feedback"
ANALYSIS = {
    "metrics": {
        "revenue": {"kind": "ratio", "denominator": "exposures"},  # per request, by request id
        "spend": {"kind": "mean", "covariate": "pre_spend"},  # per unit, CUPED
        "pre_spend": {},  # the covariate: posted per unit, not itself tested
    },
    "mde": {"spend": 1.0},
}


def visits(rng: random.Random, units: int) -> list[tuple[str, int]]:
    """Heavy-tailed requests per unit: most send 1-3, a few dozens (Zipf, capped at 40)."""
    out = []
    for i in range(units):
        n = 1
        while rng.random() < 0.55 and n < 40:
            n = n * 2 if rng.random() < 0.3 else n + 1
        out.append((f"visitor-{i}", n))
    return out


async def run_traffic(url: str, units: int, seed: int) -> None:
    """Each unit has its own level (a per-unit effect, as real users do): revenue per request
    around it, one value per request by request id; a click (0/1) on some requests by
    request id; spend and the pre-exposure spend per unit, by unit."""
    rng = random.Random(seed)
    plan = visits(rng, units)
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(connector=connector) as session:
        items: list[dict[str, Any]] = []
        for unit, n in plan:
            level = rng.lognormvariate(0.0, 0.8)
            for _ in range(n):
                async with session.post(
                    url + "/predict", json={}, headers={"x-user-id": unit}
                ) as response:
                    assert response.status == 200
                    rid = response.headers["x-request-id"]
                revenue = max(0.0, rng.gauss(level, 0.3))
                items.append({"request_id": rid, "metric": "revenue", "value": revenue})
                if rng.random() < 0.5:
                    clicked = rng.random() < min(0.9, 0.2 * level)
                    items.append({"request_id": rid, "metric": "clicked", "value": clicked})
            pre = level * 3 + rng.gauss(0.0, 1.0)
            unit_item = {"experiment": "ranker", "unit": unit}
            items.append({**unit_item, "metric": "pre_spend", "value": pre})
            items.append({**unit_item, "metric": "spend", "value": pre + rng.gauss(0.0, 1.0)})
        for start in range(0, len(items), 500):
            async with session.post(url + FEEDBACK, json=items[start : start + 500]) as response:
                assert response.status == 202, await response.text()


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    log_dir = tmp_path_factory.mktemp("unit-logs")
    config = ab_config(log_dir=str(log_dir))
    config["routes"][0]["experiment"]["analysis"] = ANALYSIS

    @async_test
    async def run() -> None:
        async with gateway_stack(config, MOCKS) as stack:
            await run_traffic(stack.url, 300, seed=13)

    run()
    return log_dir


def per_unit_reference(log_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The raw records, by hand: each enrolled unit's variant (its first exposure's), its
    exposures, and per metric its sum and any-1 flag (0 for a unit without values)."""
    _, ex_rows = read_exposures(log_dir)
    ex = pd.DataFrame(ex_rows)
    ex = ex[(ex["experiment"] == "ranker") & ex["enrolled"]].sort_values("ts_ns", kind="stable")
    units = ex.groupby("unit_hash").agg(variant=("variant", "first"), exposures=("ts_ns", "size"))
    fb = pd.DataFrame(read_feedback(log_dir))
    unit_of_request = ex.drop_duplicates("request_id").set_index("request_id")["unit_hash"]
    by_rid = fb["by_request_id"]
    fb.loc[by_rid, "unit_hash"] = fb.loc[by_rid, "request_id"].map(unit_of_request)
    sums = fb.pivot_table(index="unit_hash", columns="metric", values="value", aggfunc="sum")
    for metric in sums.columns:
        units[metric] = sums[metric].reindex(units.index).fillna(0.0)
    return units, fb


def welch(a: np.ndarray, b: np.ndarray, var_a: float, var_b: float) -> dict[str, float]:
    """diff, se, 95% CI and p with the Welch-Satterthwaite df, for estimates of variance
    var_a, var_b (of the estimate) from len(a), len(b) units."""
    se = math.sqrt(var_a + var_b)
    df = (var_a + var_b) ** 2 / (var_a**2 / (len(a) - 1) + var_b**2 / (len(b) - 1))
    return {"se": se, "half": float(sps.t.isf(0.025, df)) * se, "df": df}


def test_analyze_logs_equals_a_pandas_reference_per_unit(
    logs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    units, fb = per_unit_reference(logs)
    counts = units["exposures"].value_counts()
    assert units["exposures"].max() >= 10 and counts.get(1, 0) > 50  # repeat visitors
    assert main(["analyze", "--logs", str(logs), "--experiment", "ranker"]) == 0
    printed = capsys.readouterr().out
    assert "unit of analysis: the unit" in printed and "fixed-horizon t intervals" in printed
    assert "SRM over units: chi2" in printed
    (result,), _, excluded = results_from_logs(str(logs), "ranker", None, timelines=False)
    assert result["unit_of_analysis"] == "unit" and excluded == {"excluded": 0, "ambiguous": 0}
    json.dumps(result, allow_nan=False)  # plain JSON: no NaN
    a = units[units["variant"] == "control"]
    b = units[units["variant"] == "candidate"]
    assert [v["units"] for v in result["variants"]] == [len(a), len(b)]
    assert [v["exposures"] for v in result["variants"]] == [
        int(a["exposures"].sum()),
        int(b["exposures"].sum()),
    ]
    chi2 = sps.chisquare([len(a), len(b)])
    assert result["srm"]["p_value"] == pytest.approx(chi2.pvalue, rel=1e-9)
    assert result["srm"]["unit"] == "distinct enrolled units"
    found = {c["metric"]: c for c in result["comparisons"]}
    assert set(found) == {"revenue", "spend", "clicked"}  # pre_spend is the covariate only
    assert {m: i["method"] for m, i in result["metrics"].items()} == {
        "clicked": "proportion",  # 0/1 values, no kind declared
        "revenue": "ratio",
        "spend": "cuped",
    }

    # spend: CUPED over units with theta pooled over both arms.
    both = pd.concat([a, b])
    theta = np.cov(both["spend"], both["pre_spend"])[0, 1] / both["pre_spend"].var()
    adj_a = a["spend"] - theta * (a["pre_spend"] - both["pre_spend"].mean())
    adj_b = b["spend"] - theta * (b["pre_spend"] - both["pre_spend"].mean())
    w = welch(adj_a, adj_b, adj_a.var() / len(a), adj_b.var() / len(b))
    c = found["spend"]
    assert c["diff"] == pytest.approx(adj_b.mean() - adj_a.mean(), rel=1e-9)
    assert c["se"] == pytest.approx(w["se"], rel=1e-9) and c["theta"] == pytest.approx(theta)
    assert c["ci_high"] - c["ci_low"] == pytest.approx(2 * w["half"], rel=1e-9)
    assert c["variance_reduction"] > 0.5  # pre_spend explains most of spend

    # revenue per request: sum over sum across units, delta-method variance over units.
    def ratio(arm: pd.DataFrame) -> tuple[float, float]:
        x, y = arm["revenue"], arm["exposures"]
        r = x.sum() / y.sum()
        var = (x.var() - 2 * r * np.cov(x, y)[0, 1] + r * r * y.var()) / y.mean() ** 2
        return r, var / len(arm)

    (ra, va), (rb, vb) = ratio(a), ratio(b)
    w = welch(a, b, va, vb)
    c = found["revenue"]
    assert (c["estimate_a"], c["estimate_b"]) == (pytest.approx(ra), pytest.approx(rb))
    assert c["se"] == pytest.approx(w["se"], rel=1e-9)
    p = 2 * sps.t.sf(abs(rb - ra) / w["se"], w["df"])
    assert c["p_value"] == pytest.approx(p, rel=1e-9)

    # clicked: the share of units that clicked at least once.
    pa, pb = (a["clicked"] > 0).mean(), (b["clicked"] > 0).mean()
    w = welch(a, b, pa * (1 - pa) / len(a), pb * (1 - pb) / len(b))
    c = found["clicked"]
    assert c["diff"] == pytest.approx(pb - pa, rel=1e-9)
    assert c["ci_high"] - c["ci_low"] == pytest.approx(2 * w["half"], rel=1e-9)
    arm = result["variants"][1]["metrics"]["clicked"]
    assert arm["ones"] == int((b["clicked"] > 0).sum())
    assert arm["values"] == int(((fb["metric"] == "clicked") & fb["unit_hash"].isin(b.index)).sum())
    p_holm = sorted(x["p_value_holm"] for x in found.values())
    assert p_holm[0] == pytest.approx(min(1.0, 3 * min(x["p_value"] for x in found.values())))
    for metric in found:  # each row of the table names its method and interval
        assert any(
            line.split()[:4] == [metric, "candidate", result["metrics"][metric]["method"], "t"]
            for line in printed.splitlines()
        )


def test_per_unit_standard_errors_are_wider_than_per_event_ones(logs: Path) -> None:
    """The former analysis counts each request's revenue as an independent sample: on
    traffic where units come back and differ, its SE is too small, and its SRM counts
    requests. Per unit, revenue per request has a delta-method SE over units."""
    (units,), _, _ = results_from_logs(str(logs), "ranker", None, timelines=False)
    (events,), _, _ = event_results_from_logs(str(logs), "ranker", None)
    per_unit = next(c for c in units["comparisons"] if c["metric"] == "revenue")
    per_event = next(c for c in events["comparisons"] if c["metric"] == "revenue")
    assert per_event["test"] == "welch"
    assert per_unit["estimate_a"] == pytest.approx(
        events["variants"][0]["metrics"]["revenue"]["mean"]
    )
    se_event = (per_event["ci_high"] - per_event["ci_low"]) / (2 * 1.96)
    assert per_unit["se"] > 1.5 * se_event, (per_unit["se"], se_event)
    assert sum(v["n"] for v in events["variants"]) > 2 * sum(v["units"] for v in units["variants"])


def test_sequential_results_use_confidence_sequences(logs: Path, tmp_path: Path) -> None:
    """`analysis: {sequential: true}`: every interval a confidence sequence (wider than the t
    interval), and the SRM check the sequential one, both saying so."""
    engine = AnalysisEngine.from_logs(logs)
    design = dict(engine.designs["ranker"])
    assert design["analysis"]["metrics"]["revenue"]["kind"] == "ratio"  # from the sidecar
    fixed = unit_results(design, engine.query("ranker", ratio_pairs(design)))
    design["analysis"] = {**design["analysis"], "sequential": True, "sequential_tuning": 500}
    seq = unit_results(design, engine.query("ranker", ratio_pairs(design)))
    engine.close()
    assert seq["srm"]["method"] == "srm-dirichlet-multinomial" and seq["sequential"]
    for f, s in zip(fixed["comparisons"], seq["comparisons"], strict=True):
        assert (f["interval"], s["interval"]) == ("t", "confidence-sequence")
        assert s["ci_high"] - s["ci_low"] > f["ci_high"] - f["ci_low"]
        assert s["diff"] == pytest.approx(f["diff"])


def test_a_a_battery_through_the_engine_keeps_alpha(tmp_path: Path) -> None:
    """100 A/A experiments of synthetic records with repeat visitors (heavy-tailed requests
    and values per unit), as 100 writers into one log dir: the per-unit tests' false
    positives and the unit-count SRM alarms stay within binomial bounds of their levels."""
    runs, metrics = 100, 3
    shared = tmp_path / "logs"
    shared.mkdir()
    for seed in range(runs):
        out = tmp_path / f"aa{seed}"
        spec = Synthetic(units=300, exposures=1500, feedback=1500, seed=seed, workers=1)
        write_synthetic(out, replace(spec, experiment=f"aa{seed}", other_experiment=False))
        for path in out.iterdir():  # each run its own writer (pid) in the one directory
            path.rename(shared / path.name.replace("-p1000-", f"-p{2000 + seed}-"))
    engine = AnalysisEngine.from_logs(shared, threads=1)
    alarms = srm_alarms = 0
    for seed in range(runs):
        name = f"aa{seed}"
        result = unit_results(engine.designs[name], engine.query(name), engine.binary_metrics(name))
        assert [c["method"] for c in result["comparisons"]] == ["proportion", "mean", "mean"]
        alarms += sum(c["p_value"] < 0.05 for c in result["comparisons"])
        srm_alarms += result["srm"]["mismatch"]
    engine.close()
    tests = runs * metrics
    assert sps.binom.ppf(0.001, tests, 0.05) <= alarms <= sps.binom.isf(0.001, tests, 0.05), alarms
    assert srm_alarms <= sps.binom.isf(0.001, runs, 0.001), srm_alarms


@pytest.fixture(scope="module")
def guarded_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A candidate that fails 20% of its answers and is slower, to repeat visitors."""
    log_dir = tmp_path_factory.mktemp("guard-logs")
    mocks = {
        "model-a": MockSettings(name="model-a", latency_ms=2.0),
        "model-b": MockSettings(
            name="model-b",
            latency_ms=6.0,
            latency_dist="lognormal",
            latency_std_ms=3.0,
            error_rate=0.2,
            seed=3,
        ),
    }

    @async_test
    async def run() -> None:
        async with gateway_stack(ab_config(log_dir=str(log_dir)), mocks) as stack:
            rng = random.Random(5)
            async with aiohttp.ClientSession() as session:
                for unit, n in visits(rng, 160):
                    for _ in range(n):
                        async with session.post(
                            stack.url + "/predict", json={}, headers={"x-user-id": unit}
                        ) as response:
                            await response.read()

    run()
    return log_dir


def test_the_gateways_own_metrics_equal_a_reference_on_the_raw_records(
    guarded_logs: Path,
) -> None:
    """Error rate and mean latency per unit (delta method) and the latency quantiles (the
    inverted empirical CDF of every answer) from `analyze --logs` equal a hand computation
    on the records; the candidate's 20% errors and slower answers show, with intervals."""
    (result,), _, _ = results_from_logs(str(guarded_logs), "ranker", None, timelines=False)
    guard = result["guardrails"]
    _, rows = read_exposures(guarded_logs)
    ex = pd.DataFrame(rows)
    ex = ex[ex["enrolled"] & ex["status"].notna()]
    ex["error"] = (ex["status"] >= 500).astype(float)
    ex["ms"] = ex["latency_us"].astype(float) / 1000.0
    floors: dict[str, float] = {}
    variances: dict[str, float] = {}
    for variant, arm in ex.groupby("variant"):
        per_unit = arm.groupby("unit_hash").agg(
            n=("ms", "size"), errors=("error", "sum"), ms=("ms", "sum")
        )
        found = guard["variants"][variant]
        assert found["units"] == len(per_unit) and found["requests"] == len(arm)
        assert found["errors"] == int(arm["error"].sum())
        assert found["error_rate"] == pytest.approx(arm["error"].mean(), rel=1e-12)
        assert found["latency_ms"]["mean"] == pytest.approx(arm["ms"].mean(), rel=1e-12)
        ordered = np.sort(arm["ms"].to_numpy())
        for q in (0.5, 0.9, 0.99):
            k = max(1, math.ceil(len(ordered) * q - 1e-9))
            assert found["latency_ms"][f"p{q * 100:g}"] == pytest.approx(ordered[k - 1])
        # The per-variant row the text and HTML report read: seconds, no longer "-".
        row = next(v for v in result["variants"] if v["name"] == variant)
        assert row["latency_s"]["p99"] == pytest.approx(found["latency_ms"]["p99"] / 1000)
        # The delta-method standard error of the error rate, by hand.
        r = per_unit["errors"].sum() / per_unit["n"].sum()
        cov = np.cov(per_unit["errors"], per_unit["n"])
        var = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / per_unit["n"].mean() ** 2
        se_by_hand = math.sqrt(var / len(per_unit))
        # Each arm's variance is at least the binomial one at (errors + 1) / (requests + 2).
        smoothed = (per_unit["errors"].sum() + 1) / (per_unit["n"].sum() + 2)
        floors[variant] = smoothed * (1 - smoothed) / per_unit["n"].sum()
        variances[variant] = max(se_by_hand**2, floors[variant])
    rate = next(c for c in guard["comparisons"] if c["metric"] == "error_rate")
    # The control never fails: its delta-method variance is 0, its floor stands in.
    assert variances["control"] == floors["control"]
    assert rate["se"] == pytest.approx(math.sqrt(sum(variances.values())), rel=1e-9)
    assert rate["ci_low"] > 0.1 and rate["p_value"] < 1e-6
    comparisons = {c["metric"]: c for c in guard["comparisons"]}
    assert comparisons["latency_p50_ms"]["ci_low"] > 1.0  # the candidate is slower
    assert comparisons["latency_p50_ms"]["method"] == "quantile"
    assert comparisons["latency_ms"]["method"] == "ratio"
