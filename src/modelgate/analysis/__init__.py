"""The analysis engine: the exposure and feedback records grouped per unit, then per variant
(DuckDB, or Spark for a fleet), kept live per log directory for the admin API and the
canaries, and the results over units that `modelgate.stats` computes from those sums.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelgate._faces import lazy_face

if TYPE_CHECKING:
    from modelgate.analysis.engine import (
        AnalysisEngine,
        AnalysisError,
        ExperimentUnits,
        experiment_units,
    )
    from modelgate.analysis.live import (
        LiveEngine,
        Refresh,
        RidKeys,
        UnitCodes,
        close_live_engines,
        live_engine,
    )
    from modelgate.analysis.load import (
        EXPOSURE_COLUMNS,
        FEEDBACK_COLUMNS,
        RecordTables,
        load_tables,
        write_parquet,
    )
    from modelgate.analysis.results import (
        BINARY_TOLERANCE,
        experiment_results,
        is_binary,
        per_arm_needed,
        with_still_needed,
    )
    from modelgate.analysis.spark import (
        SparkAnalysisEngine,
        SparkUnavailable,
        local_session,
        roll_up_of,
    )
    from modelgate.analysis.sql import (
        DIALECTS,
        PARAMETER,
        REQUEST_UNITS,
        SINCE,
        experiment_query,
        for_dialect,
        quote,
    )
    from modelgate.analysis.synth import (
        Synthetic,
        write_synthetic,
    )
    from modelgate.analysis.system import (
        ERROR,
        GUARDRAIL_QUANTILES,
        MEASURED,
        ArmQuantiles,
        ColumnsEngine,
        SystemUnits,
        system_units,
    )
    from modelgate.analysis.unit_results import (
        QUANTILES,
        guardrails,
        metric_plan,
        ratio_pairs,
        unit_results,
    )

__all__ = [
    "AnalysisEngine",
    "AnalysisError",
    "ArmQuantiles",
    "BINARY_TOLERANCE",
    "ColumnsEngine",
    "DIALECTS",
    "ERROR",
    "EXPOSURE_COLUMNS",
    "ExperimentUnits",
    "FEEDBACK_COLUMNS",
    "GUARDRAIL_QUANTILES",
    "LiveEngine",
    "MEASURED",
    "PARAMETER",
    "QUANTILES",
    "REQUEST_UNITS",
    "RecordTables",
    "Refresh",
    "RidKeys",
    "SINCE",
    "SparkAnalysisEngine",
    "SparkUnavailable",
    "Synthetic",
    "SystemUnits",
    "UnitCodes",
    "close_live_engines",
    "experiment_query",
    "experiment_results",
    "experiment_units",
    "for_dialect",
    "guardrails",
    "is_binary",
    "live_engine",
    "load_tables",
    "local_session",
    "metric_plan",
    "per_arm_needed",
    "quote",
    "ratio_pairs",
    "roll_up_of",
    "system_units",
    "unit_results",
    "with_still_needed",
    "write_parquet",
    "write_synthetic",
]

__getattr__ = lazy_face(
    __name__,
    {
        "AnalysisEngine": "engine",
        "AnalysisError": "engine",
        "ArmQuantiles": "system",
        "BINARY_TOLERANCE": "results",
        "ColumnsEngine": "system",
        "DIALECTS": "sql",
        "ERROR": "system",
        "EXPOSURE_COLUMNS": "load",
        "ExperimentUnits": "engine",
        "FEEDBACK_COLUMNS": "load",
        "GUARDRAIL_QUANTILES": "system",
        "LiveEngine": "live",
        "MEASURED": "system",
        "PARAMETER": "sql",
        "QUANTILES": "unit_results",
        "REQUEST_UNITS": "sql",
        "RecordTables": "load",
        "Refresh": "live",
        "RidKeys": "live",
        "SINCE": "sql",
        "SparkAnalysisEngine": "spark",
        "SparkUnavailable": "spark",
        "Synthetic": "synth",
        "SystemUnits": "system",
        "UnitCodes": "live",
        "close_live_engines": "live",
        "experiment_query": "sql",
        "experiment_results": "results",
        "experiment_units": "engine",
        "for_dialect": "sql",
        "guardrails": "unit_results",
        "is_binary": "results",
        "live_engine": "live",
        "load_tables": "load",
        "local_session": "spark",
        "metric_plan": "unit_results",
        "per_arm_needed": "results",
        "quote": "sql",
        "ratio_pairs": "unit_results",
        "roll_up_of": "spark",
        "system_units": "system",
        "unit_results": "unit_results",
        "with_still_needed": "results",
        "write_parquet": "load",
        "write_synthetic": "synth",
    },
)
