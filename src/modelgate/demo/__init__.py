"""`modelgate demo`: three real models behind a gateway, an A/B test, a shadow and chaos on
the embedded default config, and the report of what happened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelgate._faces import lazy_face

if TYPE_CHECKING:
    from modelgate.demo.models import (
        DemoModels,
        train_models,
    )
    from modelgate.demo.report import (
        ReportedRun,
        ab_summary,
        print_report,
        shadow_summary,
    )
    from modelgate.demo.run import (
        DemoRun,
        run_demo,
        run_demo_async,
    )

__all__ = [
    "DemoModels",
    "DemoRun",
    "ReportedRun",
    "ab_summary",
    "print_report",
    "run_demo",
    "run_demo_async",
    "shadow_summary",
    "train_models",
]

__getattr__ = lazy_face(
    __name__,
    {
        "DemoModels": "models",
        "DemoRun": "run",
        "ReportedRun": "report",
        "ab_summary": "report",
        "print_report": "report",
        "run_demo": "run",
        "run_demo_async": "run",
        "shadow_summary": "report",
        "train_models": "models",
    },
)
