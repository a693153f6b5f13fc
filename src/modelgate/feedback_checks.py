"""What a feedback item may say: which metric names and which values are accepted.

Feedback decides results and canaries, and the public port takes it, so names and values
are bounded (issue 12, finding 5): a declared name or, without declarations, one of a few
distinct names; a finite value within the metric's range and a global magnitude bound, so
no sum of values or squares can reach inf or NaN, and no names table can fill up.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelgate.config import FeedbackSpec

__all__ = ["FeedbackError", "MetricGate"]

_METRIC = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")


class FeedbackError(Exception):
    """A refused feedback post: the status, the JSON error code and a detail naming why."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail


class MetricGate:
    """The metric names this process has accepted, and the checks of names and values."""

    def __init__(self) -> None:
        self.undeclared: set[str] = set()  # names accepted while none are declared

    def metric(self, spec: FeedbackSpec, item: dict[str, Any], pending: set[str]) -> str:
        """The item's metric name, if accepted; `pending` gathers this batch's new
        undeclared names (committed by `commit` once the whole batch is accepted)."""
        metric = item.get("metric")
        if not isinstance(metric, str) or not _METRIC.match(metric):
            raise FeedbackError(
                400, "bad_feedback", f"metric must be a name like 'clicked', got {metric!r}"
            )
        declared = spec.metrics
        if declared:
            if metric not in declared:
                raise FeedbackError(
                    400,
                    "unknown_metric",
                    f"metric {metric!r} is not declared in feedback.metrics "
                    f"(declared: {', '.join(sorted(declared))})",
                )
            return metric
        if metric in self.undeclared or metric in pending:
            return metric
        if len(self.undeclared) + len(pending) >= spec.max_undeclared_metrics:
            raise FeedbackError(
                400,
                "unknown_metric",
                f"metric {metric!r} would be distinct name number "
                f"{len(self.undeclared) + len(pending) + 1}; without feedback.metrics at most "
                f"{spec.max_undeclared_metrics} are accepted (declare them in feedback.metrics)",
            )
        pending.add(metric)
        return metric

    def commit(self, pending: set[str]) -> None:
        self.undeclared |= pending

    @staticmethod
    def value(spec: FeedbackSpec, metric: str, item: dict[str, Any]) -> float:
        """The item's value: a finite number (true and false are 1 and 0), within the
        metric's declared [min, max] and within +-max_abs_value."""
        raw = item.get("value")
        if isinstance(raw, bool):
            raw = 1.0 if raw else 0.0
        if not isinstance(raw, (int, float)):
            raise FeedbackError(400, "bad_feedback", f"value must be a number, got {raw!r}")
        try:
            value = float(raw)
        except OverflowError:  # an integer beyond any float
            value = math.inf
        if not math.isfinite(value):
            raise FeedbackError(400, "bad_feedback", f"value must be finite, got {raw!r}")
        bound = spec.max_abs_value
        if abs(value) > bound:
            raise FeedbackError(
                400,
                "value_out_of_range",
                f"{metric}: |{value:g}| is above feedback.max_abs_value ({bound:g})",
            )
        declared = spec.metrics.get(metric)
        if declared is not None:
            low, high = declared.min, declared.max
            if (low is not None and value < low) or (high is not None and value > high):
                raise FeedbackError(
                    400,
                    "value_out_of_range",
                    f"{metric}: {value:g} is outside [{_bound(low, '-inf')}, "
                    f"{_bound(high, 'inf')}] (feedback.metrics.{metric})",
                )
        return value


def _bound(value: float | None, none: str) -> str:
    return none if value is None else f"{value:g}"
