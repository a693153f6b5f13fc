"""`modelgate analyze`: an experiment's results from the admin API or from the record files
alone, as a table or an HTML report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelgate._faces import lazy_face

if TYPE_CHECKING:
    from modelgate.analyze.command import (
        AnalyzeError,
        configure_parser,
        event_results_from_logs,
        format_results,
        format_unit_results,
        results_from_admin,
        results_from_logs,
    )
    from modelgate.analyze.logs import (
        LogData,
        load_logs,
        snapshot_of,
        timeline_of,
    )
    from modelgate.analyze.report import (
        ReportError,
        write_report,
    )

__all__ = [
    "AnalyzeError",
    "LogData",
    "ReportError",
    "configure_parser",
    "event_results_from_logs",
    "format_results",
    "format_unit_results",
    "load_logs",
    "results_from_admin",
    "results_from_logs",
    "snapshot_of",
    "timeline_of",
    "write_report",
]

__getattr__ = lazy_face(
    __name__,
    {
        "AnalyzeError": "command",
        "LogData": "logs",
        "ReportError": "report",
        "configure_parser": "command",
        "event_results_from_logs": "command",
        "format_results": "command",
        "format_unit_results": "command",
        "load_logs": "logs",
        "results_from_admin": "command",
        "results_from_logs": "command",
        "snapshot_of": "logs",
        "timeline_of": "logs",
        "write_report": "report",
    },
)
