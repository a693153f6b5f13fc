"""Statistics to judge an A/B experiment: tests, intervals, SRM, power and multiple testing.

Per-unit tests (issue 13) take `UnitStats` of each arm over units (the unit of randomization):
`unit_mean_test`, `unit_proportion_test`, `unit_ratio_test`, `cuped_test`, and `quantile_test`
for clustered per-request latencies; `sequential=True` gives confidence sequences, valid at
every look; `sequential_srm_test` checks unit counts at every look.

Imports nothing else of modelgate (numpy and scipy only); arm a is the baseline, b the candidate.
"""

from ._effect import (
    EffectResult,
    cuped_test,
    ratio_estimate,
    unit_mean_test,
    unit_proportion_test,
    unit_ratio_test,
)
from ._power import (
    PowerAlternative,
    power,
    proportion_power,
    proportion_sample_size,
    sample_size,
)
from ._quantile import (
    QuantileEstimate,
    quantile_difference,
    quantile_estimate,
    quantile_estimates,
    quantile_test,
)
from ._sequential import (
    DEFAULT_TUNING,
    SequentialSRMResult,
    cs_halfwidth,
    cs_p_value,
    sequential_srm_test,
)
from ._significance import (
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
    wilson_interval,
)
from ._summary import SummaryStats
from ._units import UnitStats

__all__ = [
    "DEFAULT_TUNING",
    "EffectResult",
    "QuantileEstimate",
    "SequentialSRMResult",
    "cs_halfwidth",
    "cs_p_value",
    "cuped_test",
    "quantile_difference",
    "quantile_estimate",
    "quantile_estimates",
    "quantile_test",
    "ratio_estimate",
    "sequential_srm_test",
    "unit_mean_test",
    "unit_proportion_test",
    "unit_ratio_test",
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
    "wilson_interval",
]
