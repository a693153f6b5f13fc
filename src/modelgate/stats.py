"""Statistics to judge an A/B experiment: tests, intervals, SRM, power and multiple testing.

Imports nothing else of modelgate (numpy and scipy only); arm a is the baseline, b the candidate.
"""

from ._stats_power import (
    PowerAlternative,
    power,
    proportion_power,
    proportion_sample_size,
    sample_size,
)
from ._stats_summary import SummaryStats
from ._stats_tests import (
    MannWhitneyAlternative,
    MannWhitneyResult,
    ProportionResult,
    SRMResult,
    WelchResult,
    benjamini_hochberg,
    holm,
    mann_whitney,
    proportion_test,
    srm_test,
    welch_test,
)
from ._stats_units import UnitStats

__all__ = [
    "MannWhitneyAlternative",
    "MannWhitneyResult",
    "PowerAlternative",
    "ProportionResult",
    "SRMResult",
    "SummaryStats",
    "UnitStats",
    "WelchResult",
    "benjamini_hochberg",
    "holm",
    "mann_whitney",
    "power",
    "proportion_power",
    "proportion_sample_size",
    "proportion_test",
    "sample_size",
    "srm_test",
    "welch_test",
]
