"""What the gateway counts and how it is exposed: per-process counters and versioned
tallies merged over the workers (`counts`), latency histograms with bounded relative error
(`histogram`), and the Prometheus collector of the admin API (`prometheus`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelgate._faces import lazy_face

if TYPE_CHECKING:
    from modelgate.telemetry.counts import (
        LATENCY_BUCKETS_S,
        OLDER_VERSIONS,
        SCALAR_COUNTERS,
        TRACKED_FAMILIES,
        Counters,
        CountSlice,
        VersionedTally,
        VersionLogFilter,
        merge_exports,
    )
    from modelgate.telemetry.histogram import (
        RELATIVE_ERROR,
        LatencyHistogram,
    )
    from modelgate.telemetry.prometheus import (
        MetricsSnapshot,
        render_metrics,
    )

__all__ = [
    "CountSlice",
    "Counters",
    "LATENCY_BUCKETS_S",
    "LatencyHistogram",
    "MetricsSnapshot",
    "OLDER_VERSIONS",
    "RELATIVE_ERROR",
    "SCALAR_COUNTERS",
    "TRACKED_FAMILIES",
    "VersionLogFilter",
    "VersionedTally",
    "merge_exports",
    "render_metrics",
]

__getattr__ = lazy_face(
    __name__,
    {
        "CountSlice": "counts",
        "Counters": "counts",
        "LATENCY_BUCKETS_S": "counts",
        "LatencyHistogram": "histogram",
        "MetricsSnapshot": "prometheus",
        "OLDER_VERSIONS": "counts",
        "RELATIVE_ERROR": "histogram",
        "SCALAR_COUNTERS": "counts",
        "TRACKED_FAMILIES": "counts",
        "VersionLogFilter": "counts",
        "VersionedTally": "counts",
        "merge_exports": "counts",
        "render_metrics": "prometheus",
    },
)
