"""Serving metrics from per-request records."""

from .histogram import LogHistogram
from .serving import BREAKDOWNS, MetricsAccumulator, compute_metrics

__all__ = ["BREAKDOWNS", "LogHistogram", "MetricsAccumulator", "compute_metrics"]
