"""`modelgate bench`: a load generator that knows the gateway's headers (variant, chaos,
feedback), sends traffic shaped like the real world and reports per variant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelgate._faces import lazy_face

if TYPE_CHECKING:
    from modelgate.bench.client import (
        CHAOS_HEADER,
        ERROR_KINDS,
        VARIANT_HEADER,
        Pool,
        Sink,
    )
    from modelgate.bench.config import (
        DEFAULT_CONCURRENCY,
        DEFAULT_DURATION_S,
        FEEDBACK_PATH,
        BenchConfig,
        FeedbackKind,
        FeedbackSpec,
        split_url,
    )
    from modelgate.bench.report import (
        NO_VARIANT,
        BenchReport,
        FeedbackCounts,
        GroupReport,
        Recorder,
        VariantStats,
        format_report,
    )
    from modelgate.bench.run import (
        configure_parser,
        run_bench,
        run_from_args,
    )
    from modelgate.bench.traffic import (
        Driver,
        FeedbackPoster,
        RequestFactory,
        Share,
    )

__all__ = [
    "BenchConfig",
    "BenchReport",
    "CHAOS_HEADER",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_DURATION_S",
    "Driver",
    "ERROR_KINDS",
    "FEEDBACK_PATH",
    "FeedbackCounts",
    "FeedbackKind",
    "FeedbackPoster",
    "FeedbackSpec",
    "GroupReport",
    "NO_VARIANT",
    "Pool",
    "Recorder",
    "RequestFactory",
    "Share",
    "Sink",
    "VARIANT_HEADER",
    "VariantStats",
    "configure_parser",
    "format_report",
    "run_bench",
    "run_from_args",
    "split_url",
]

__getattr__ = lazy_face(
    __name__,
    {
        "BenchConfig": "config",
        "BenchReport": "report",
        "CHAOS_HEADER": "client",
        "DEFAULT_CONCURRENCY": "config",
        "DEFAULT_DURATION_S": "config",
        "Driver": "traffic",
        "ERROR_KINDS": "client",
        "FEEDBACK_PATH": "config",
        "FeedbackCounts": "report",
        "FeedbackKind": "config",
        "FeedbackPoster": "traffic",
        "FeedbackSpec": "config",
        "GroupReport": "report",
        "NO_VARIANT": "report",
        "Pool": "client",
        "Recorder": "report",
        "RequestFactory": "traffic",
        "Share": "traffic",
        "Sink": "client",
        "VARIANT_HEADER": "client",
        "VariantStats": "report",
        "configure_parser": "run",
        "format_report": "report",
        "run_bench": "run",
        "run_from_args": "run",
        "split_url": "config",
    },
)
