"""The reload safety report: shares of units moved, checked against a brute-force count over
the 10,000 buckets computed from the DESIGN.md formula (not from modelgate's tables)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelgate.config import GatewayConfig, validate_config
from modelgate.safety import safety_report

from .support import ab_config


def owner_names(variants: Sequence[tuple[str, float]]) -> list[str]:
    """The variant name owning each bucket, by C_i = floor(10000 * S_i / W + 0.5)."""
    total = sum(w for _, w in variants)
    names, running, start = [""] * 10000, 0.0, 0
    for name, weight in variants:
        running += weight
        end = math.floor(10000 * running / total + 0.5)
        names[start:end] = [name] * (end - start)
        start = end
    return names


def config_with(variants: Sequence[tuple[str, float]], salt: str | None = None) -> GatewayConfig:
    raw = ab_config()
    exp = raw["routes"][0]["experiment"]
    exp["variants"] = [{"name": n, "upstream": "model-a", "weight": w} for n, w in variants]
    if salt is not None:
        exp["salt"] = salt
    return validate_config(raw)


CASES = [
    ([("control", 90), ("candidate", 10)], [("control", 80), ("candidate", 20)]),
    ([("control", 50), ("candidate", 50)], [("candidate", 50), ("control", 50)]),  # reordered
    ([("a", 1), ("b", 1), ("c", 1)], [("a", 1), ("c", 2), ("b", 0)]),
    ([("a", 33.3), ("b", 33.3), ("c", 33.4)], [("a", 10), ("b", 70), ("d", 20)]),  # renamed
    ([("control", 99.99), ("candidate", 0.01)], [("control", 99.99), ("candidate", 0.01)]),
]


@pytest.mark.parametrize(("old", "new"), CASES)
def test_share_equals_a_brute_force_count(
    old: list[tuple[str, float]], new: list[tuple[str, float]]
) -> None:
    report = safety_report(config_with(old), config_with(new))
    (change,) = report.experiments
    before, after = owner_names(old), owner_names(new)
    moved = sum(1 for a, b in zip(before, after, strict=True) if a != b)
    assert change.buckets_changed == moved
    assert change.share_changed == moved / 10000
    assert change.exact
    assert change.status == ("reweighted" if old != new else "unchanged")
    transitions: dict[str, int] = {}
    for a, b in zip(before, after, strict=True):
        if a != b:
            transitions[f"{a}->{b}"] = transitions.get(f"{a}->{b}", 0) + 1
    assert change.transitions == transitions


def test_growing_the_last_variant_moves_only_units_into_it() -> None:
    report = safety_report(
        config_with([("control", 90), ("candidate", 10)]),
        config_with([("control", 75), ("candidate", 25)]),
    )
    (change,) = report.experiments
    assert change.transitions == {"control->candidate": 1500}
    assert "15.00% of units change variant" in change.describe()


def test_a_new_salt_re_randomizes_and_says_so() -> None:
    old = [("control", 90), ("candidate", 10)]
    new = [("control", 50), ("candidate", 50)]
    report = safety_report(config_with(old), config_with(new, salt="ranker-v2"))
    (change,) = report.experiments
    assert change.status == "re-randomized"
    assert not change.exact
    # Independent draws keep a unit's variant with probability sum_v p_old(v) * p_new(v).
    p_old = {n: owner_names(old).count(n) / 10000 for n, _ in old}
    p_new = {n: owner_names(new).count(n) / 10000 for n, _ in new}
    expected = 1 - sum(p_old[n] * p_new.get(n, 0.0) for n in p_old)
    assert change.share_changed == pytest.approx(expected, abs=1e-12)
    assert "re-randomized" in change.describe()
    assert "expected under independent assignment" in change.describe()


def test_added_removed_experiments_and_restart_keys_are_listed() -> None:
    old = ab_config()
    new = copy.deepcopy(old)
    new["routes"][0]["experiment"]["name"] = "ranker-2"
    new["listen"] = "127.0.0.1:9999"
    new["routes"][1]["experiment"] = {
        "name": "fresh",
        "variants": [{"name": "x", "upstream": "model-b", "weight": 1}],
    }
    report = safety_report(validate_config(old), validate_config(new))
    statuses = {c.experiment: c.status for c in report.experiments}
    assert statuses == {"ranker-2": "added", "fresh": "added", "ranker": "removed"}
    assert report.restart_required == ["listen"]
    assert "listen: changed; it takes effect only after a restart" in report.lines()


def test_an_upstream_swap_under_a_variant_is_reported() -> None:
    old = ab_config()
    new = copy.deepcopy(old)
    new["routes"][0]["experiment"]["variants"][1]["upstream"] = "model-a"
    (change,) = safety_report(validate_config(old), validate_config(new)).experiments
    assert change.share_changed == 0.0
    assert change.upstream_changes == {"candidate": ["model-b", "model-a"]}
    assert "moves from upstream 'model-b' to 'model-a'" in change.describe()


def write(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_check_against_prints_the_report(tmp_path: Path) -> None:
    old = write(tmp_path / "old.yaml", ab_config((90, 10)))
    new = write(tmp_path / "new.yaml", ab_config((80, 20)))
    bad = write(tmp_path / "bad.yaml", {"routes": []})
    run = [sys.executable, "-m", "modelgate", "check"]
    out = subprocess.run(
        [*run, str(new), "--against", str(old)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    moved = sum(
        1
        for a, b in zip(
            owner_names([("c", 90), ("d", 10)]), owner_names([("c", 80), ("d", 20)]), strict=True
        )
        if a != b
    )
    assert f"ranker: {moved / 100:.2f}% of units change variant" in out.stdout
    assert "control->candidate 1000" in out.stdout
    refused = subprocess.run(
        [*run, str(new), "--against", str(bad)], capture_output=True, text=True, timeout=30
    )
    assert refused.returncode == 1
    assert f"{bad}: upstreams: Field required" in refused.stdout
