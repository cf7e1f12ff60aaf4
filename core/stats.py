"""Distribution-free intervals: what the load generator reports for latency percentiles and what the speed gate
reads for a variant's speed-up, without assuming any distribution of the timings."""

from __future__ import annotations

import math
from typing import Sequence


def percentile_ci(sorted_values: Sequence[float], q: float, z: float = 1.96) -> tuple[float, float]:
    """CI of the q-quantile from order statistics (normal approximation of the binomial; 95% with z = 1.96)."""
    n = len(sorted_values)
    if n == 0:
        return (math.nan, math.nan)
    spread = z * math.sqrt(n * q * (1 - q))
    low, high = max(0, math.floor(n * q - spread) - 1), min(n - 1, math.ceil(n * q + spread))
    return float(sorted_values[low]), float(sorted_values[high])
