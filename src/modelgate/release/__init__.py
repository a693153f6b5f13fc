"""Releases judged on live metrics: the canary controller (steps, windows, promotion and
rollback), its evidence read from the records per unit, its checks as confidence sequences,
and the fleet canary over Prometheus totals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelgate._faces import lazy_face

if TYPE_CHECKING:
    from modelgate.release.canary import (
        HISTORY,
        STATES,
        Canary,
        CanaryError,
        CanaryStateError,
        MetricsSource,
        WeightTarget,
        poll_interval,
    )
    from modelgate.release.judge import (
        DEFAULT_CHECKS,
        Arm,
        CheckResult,
        ExperimentView,
        Snapshot,
        Sums,
        Totals,
        against,
        checks_of,
        experiment_view,
        judge,
        srm_guard,
        window,
        worst,
    )
    from modelgate.release.manager import (
        CanaryManager,
        ControlTarget,
    )
    from modelgate.release.records import (
        REFRESH_S,
        Evidence,
        EvidenceSource,
        RecordEvidence,
        warm_up,
    )
    from modelgate.release.remote import (
        EXIT_CODES,
        GatewaysTarget,
        configure_parser,
        run_from_args,
        run_remote,
    )
    from modelgate.release.sources import (
        CanaryCollector,
        PrometheusSource,
        local_totals,
    )
    from modelgate.release.verdicts import (
        SRM_CONCENTRATION,
        feedback_metrics,
        judge_evidence,
        latency_quantiles,
        unit_srm_guard,
    )

__all__ = [
    "Arm",
    "Canary",
    "CanaryCollector",
    "CanaryError",
    "CanaryManager",
    "CanaryStateError",
    "CheckResult",
    "ControlTarget",
    "DEFAULT_CHECKS",
    "EXIT_CODES",
    "Evidence",
    "EvidenceSource",
    "ExperimentView",
    "GatewaysTarget",
    "HISTORY",
    "MetricsSource",
    "PrometheusSource",
    "REFRESH_S",
    "RecordEvidence",
    "SRM_CONCENTRATION",
    "STATES",
    "Snapshot",
    "Sums",
    "Totals",
    "WeightTarget",
    "against",
    "checks_of",
    "configure_parser",
    "experiment_view",
    "feedback_metrics",
    "judge",
    "judge_evidence",
    "latency_quantiles",
    "local_totals",
    "poll_interval",
    "run_from_args",
    "run_remote",
    "srm_guard",
    "unit_srm_guard",
    "warm_up",
    "window",
    "worst",
]

__getattr__ = lazy_face(
    __name__,
    {
        "Arm": "judge",
        "Canary": "canary",
        "CanaryCollector": "sources",
        "CanaryError": "canary",
        "CanaryManager": "manager",
        "CanaryStateError": "canary",
        "CheckResult": "judge",
        "ControlTarget": "manager",
        "DEFAULT_CHECKS": "judge",
        "EXIT_CODES": "remote",
        "Evidence": "records",
        "EvidenceSource": "records",
        "ExperimentView": "judge",
        "GatewaysTarget": "remote",
        "HISTORY": "canary",
        "MetricsSource": "canary",
        "PrometheusSource": "sources",
        "REFRESH_S": "records",
        "RecordEvidence": "records",
        "SRM_CONCENTRATION": "verdicts",
        "STATES": "canary",
        "Snapshot": "judge",
        "Sums": "judge",
        "Totals": "judge",
        "WeightTarget": "canary",
        "against": "judge",
        "checks_of": "judge",
        "configure_parser": "remote",
        "experiment_view": "judge",
        "feedback_metrics": "verdicts",
        "judge": "judge",
        "judge_evidence": "verdicts",
        "latency_quantiles": "verdicts",
        "local_totals": "sources",
        "poll_interval": "canary",
        "run_from_args": "remote",
        "run_remote": "remote",
        "srm_guard": "judge",
        "unit_srm_guard": "verdicts",
        "warm_up": "records",
        "window": "judge",
        "worst": "judge",
    },
)
