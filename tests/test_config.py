"""Config validation: every error found at once, each with its key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from modelgate.config import ConfigError, load_config, parse_config, validate_config

from .support import ab_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def errors_of(raw: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return info.value.errors


def test_design_example_config_is_valid() -> None:
    config = load_config(CONFIGS / "example.yaml")
    assert config.routes[0].experiment is not None
    assert config.routes[0].experiment.variants[1].weight == 10


def test_unknown_upstream_names_the_key_path() -> None:
    raw = ab_config()
    raw["routes"][0]["experiment"]["variants"][1]["upstream"] = "model-x"
    assert errors_of(raw) == [
        "routes[0].experiment.variants[1].upstream: unknown upstream 'model-x'"
    ]


def test_every_error_is_reported_at_once() -> None:
    raw = ab_config()
    raw["routes"][0]["experiment"]["variants"][0]["weight"] = -1
    raw["routes"][0]["unit"] = ["nowhere:x"]
    raw["routes"][1]["upstreamz"] = "model-a"
    raw["limits"] = {"max_body_bytes": "lots"}
    errors = errors_of(raw)
    joined = "\n".join(errors)
    assert "routes[0].experiment.variants[0].weight:" in joined
    assert "routes[0].unit:" in joined
    assert "routes[1].upstreamz: unknown key" in joined
    assert "limits.max_body_bytes:" in joined
    assert len(errors) == 4


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda c: c["routes"].append(dict(c["routes"][1])), "routes[2].name: duplicate route"),
        (
            lambda c: c["routes"][0]["experiment"]["variants"].__setitem__(
                1, {"name": "control", "upstream": "model-b", "weight": 1}
            ),
            "routes[0].experiment.variants[1].name: duplicate variant 'control'",
        ),
        (
            lambda c: [
                v.__setitem__("weight", 0) for v in c["routes"][0]["experiment"]["variants"]
            ],
            "routes[0].experiment.variants: weights are all zero",
        ),
        (
            # Each weight is finite, their sum is not: the Plan's boundaries would divide by inf
            # (`check` once said ok and `serve` then died compiling it).
            lambda c: [
                v.__setitem__("weight", 1e308) for v in c["routes"][0]["experiment"]["variants"]
            ],
            "routes[0].experiment.variants: weights sum to more than a double holds",
        ),
        (lambda c: c["routes"][1].pop("upstream"), "routes[1]: needs an upstream or an experiment"),
        (lambda c: c.__setitem__("listen", "nowhere"), "listen: expected HOST:PORT"),
        (
            lambda c: c["upstreams"]["model-a"].__setitem__("url", "https://x"),
            "upstreams.model-a.url: only http:// upstreams",
        ),
        (
            lambda c: c["routes"][0]["match"].__setitem__("path_prefix", "predict"),
            "routes[0].match.path_prefix: must start with '/'",
        ),
        (
            lambda c: c["routes"][0].__setitem__("unit_fallback", "guess"),
            "routes[0].unit_fallback:",
        ),
    ],
)
def test_specific_errors(mutate: Any, expected: str) -> None:
    raw = ab_config()
    mutate(raw)
    assert any(error.startswith(expected) for error in errors_of(raw)), errors_of(raw)


def test_yaml_syntax_error_names_the_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("upstreams:\n  a: {url: http://x\nroutes: []\n")
    assert info.value.errors[0].startswith("(yaml) line ")


def test_not_a_mapping() -> None:
    assert errors_of([1, 2]) == ["(root): expected a mapping of config keys, got list"]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert "absent.yaml" in info.value.errors[0]


def test_check_command_exit_codes(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "upstreams: {a: {url: 'http://127.0.0.1:9'}}\nroutes:\n  - name: r\n    upstream: b\n",
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "modelgate", "check", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout.strip() == "routes[0].upstream: unknown upstream 'b'"
    good = subprocess.run(
        [sys.executable, "-m", "modelgate", "check", str(CONFIGS / "example.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert good.returncode == 0, good.stdout + good.stderr


# --- analysis.metrics (issue 13): metric kinds, denominators, covariates -----------------


def _with_analysis(analysis: dict[str, Any], declared: list[str] | None = None) -> dict[str, Any]:
    raw = ab_config()
    raw["routes"][0]["experiment"]["analysis"] = analysis
    if declared is not None:
        raw["feedback"] = {"metrics": {m: {} for m in declared}}
    return raw


A = "routes[0].experiment.analysis"


def test_analysis_metric_kinds_and_sequential_are_accepted() -> None:
    raw = _with_analysis(
        {
            "metrics": {
                "revenue": {"kind": "mean", "covariate": "pre_revenue"},
                "pre_revenue": {},
                "converted": {"kind": "proportion"},
                "clicks": {"kind": "ratio", "denominator": "exposures"},
                "ctr": {"kind": "ratio", "denominator": "views"},
                "views": {"kind": "mean"},
            },
            "sequential": True,
            "sequential_tuning": 2000,
        }
    )
    spec = validate_config(raw).routes[0].experiment
    assert spec is not None and spec.analysis.sequential
    assert spec.analysis.metrics["ctr"].denominator == "views"
    assert spec.analysis.metrics["pre_revenue"].kind is None  # decided from the values


@pytest.mark.parametrize(
    ("analysis", "declared", "expected"),
    [
        (
            {"metrics": {"x": {"kind": "median"}}},
            None,
            f"{A}.metrics.x.kind: Input should be 'mean', 'proportion' or 'ratio'",
        ),
        (
            {"metrics": {"x": {"kind": "ratio"}}},
            None,
            f"{A}.metrics.x: a ratio needs a denominator (`exposures` or another metric)",
        ),
        (
            {"metrics": {"x": {"kind": "mean", "denominator": "exposures"}}},
            None,
            f"{A}.metrics.x: denominator is for kind ratio only",
        ),
        (
            {"metrics": {"x": {"kind": "ratio", "denominator": "exposures", "covariate": "y"}}},
            None,
            f"{A}.metrics.x: a covariate (CUPED) adjusts a mean: not available for kind ratio",
        ),
        (
            {"metrics": {"x": {"kind": "proportion", "covariate": "y"}}},
            None,
            f"{A}.metrics.x: a covariate (CUPED) adjusts a mean: not available for kind proportion",
        ),
        (
            {"metrics": {"x": {"kind": "ratio", "denominator": "views"}}},
            None,
            f"{A}.metrics.x.denominator: 'views' is not a declared metric (give `exposures` or "
            "a metric of analysis.metrics or feedback.metrics: x)",
        ),
        (
            {"metrics": {"x": {"covariate": "pre"}}},
            ["x", "y"],
            f"{A}.metrics.x.covariate: 'pre' is not a declared metric (give a metric of "
            "analysis.metrics or feedback.metrics: x, y)",
        ),
        (
            {"metrics": {"x": {"covariate": "x"}}},
            None,
            f"{A}.metrics.x.covariate: 'x' cannot be its own covariate",
        ),
        (
            {"metrics": {"x": {"kind": "ratio", "denominator": "x"}}},
            None,
            f"{A}.metrics.x.denominator: 'x' cannot be its own denominator",
        ),
        (
            {"metrics": {"z": {"kind": "mean"}}},
            ["x"],
            f"{A}.metrics.z: unknown feedback metric 'z' (feedback.metrics declares x)",
        ),
        (
            {"metrics": {"x": {"kind": "mean", "weight": 2}}},
            None,
            f"{A}.metrics.x.weight: unknown key",
        ),
        ({"metrics": {"bad name": {}}}, None, f"{A}.metrics.bad name.[key]"),
        ({"sequential": "often"}, None, f"{A}.sequential: Input should be a valid boolean"),
        ({"sequential_tuning": 0}, None, f"{A}.sequential_tuning: Input should be greater than 0"),
    ],
)
def test_bad_analysis_metrics_are_refused_with_their_key_path(
    analysis: dict[str, Any], declared: list[str] | None, expected: str
) -> None:
    errors = errors_of(_with_analysis(analysis, declared))
    assert len(errors) == 1 and errors[0].startswith(expected), errors


def test_bad_analysis_is_refused_by_modelgate_check(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_with_analysis({"metrics": {"x": {"kind": "ratio"}}})))
    done = subprocess.run(
        [sys.executable, "-m", "modelgate", "check", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert f"{A}.metrics.x: a ratio needs a denominator" in done.stdout + done.stderr
