"""Counters kept apart by config version, the fold of old versions, sums over workers, and the
version stamp on log lines."""

from __future__ import annotations

import logging

from modelgate.telemetry import counts as telemetry
from modelgate.telemetry.counts import (
    OLDER_VERSIONS,
    Counters,
    CountSlice,
    VersionedTally,
    VersionLogFilter,
    merge_exports,
)


def test_counts_belong_to_the_version_serving_when_counted() -> None:
    counters = Counters(version=1)
    counters.count_response("predict", "control", 200)
    counters.count_upstream_error("timeout")
    counters.replays += 1
    counters.begin_version(2)
    counters.count_response("predict", "control", 200)
    counters.count_response("predict", "candidate", 503)
    counters.replays += 2
    export = counters.export()
    assert set(export) == {"1", "2"}
    assert export["1"].responses == {("predict", "control", 200): 1}
    assert export["1"].upstream_errors == {"timeout": 1}
    assert export["1"].scalars["replays"] == 1
    assert export["2"].responses == {
        ("predict", "control", 200): 1,
        ("predict", "candidate", 503): 1,
    }
    assert export["2"].upstream_errors == {}
    assert export["2"].scalars["replays"] == 2
    # The cumulative counters the request path bumps are never reset.
    assert counters.responses[("predict", "control", 200)] == 2
    assert counters.replays == 3


def test_old_versions_fold_into_one_slice_and_totals_are_kept() -> None:
    counters = Counters(version=1)
    versions = telemetry.MAX_VERSIONS + 5
    for version in range(1, versions + 1):
        counters.count_response("r", "", 200)
        counters.begin_version(version + 1)
    export = counters.export()
    assert OLDER_VERSIONS in export
    assert len(export) == telemetry.MAX_VERSIONS + 2  # kept versions, "older", the current
    assert sum(s.responses[("r", "", 200)] for s in export.values()) == versions


def test_exports_sum_over_workers_and_survive_json() -> None:
    a, b = Counters(version=3), Counters(version=3)
    a.count_response("r", "x", 200)
    b.count_response("r", "x", 200)
    b.bad_requests += 1
    wire = [{k: CountSlice.from_json(v.to_json()) for k, v in c.export().items()} for c in (a, b)]
    total = merge_exports(wire)
    assert total["3"].responses == {("r", "x", 200): 2}
    assert total["3"].scalars["bad_requests"] == 1


def test_tally_and_log_filter() -> None:
    tally = VersionedTally(version=1)
    tally.count("invalid")
    tally.begin_version(2)
    tally.count("ok")
    tally.count("invalid")
    assert tally.export() == {"1": {"invalid": 1}, "2": {"ok": 1, "invalid": 1}}
    assert tally.totals() == {"invalid": 2, "ok": 1}
    VersionLogFilter.set_version(7)
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert VersionLogFilter().filter(record)
    assert getattr(record, "config_version", None) == 7
