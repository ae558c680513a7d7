"""The quantities the pipeline benchmarks report: drain rates, percentiles, and the host's load."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Final

import numpy as np

MB: Final = 1e6


def rate(count: int, nbytes: int, seconds: float) -> dict[str, float]:
    return {"updates": count, "bytes": nbytes, "seconds": seconds, "updates_per_s": count / seconds,
            "mb_per_s": nbytes / MB / seconds}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else math.nan


def host_load() -> dict[str, float]:
    """CPU count and 1-minute load average: the services share this host, so figures depend on it."""
    return {"cpus": float(os.cpu_count() or 0), "loadavg_1m": os.getloadavg()[0]}
