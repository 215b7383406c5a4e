"""Serving metrics from per-request records."""

from .histogram import LogHistogram
from .serving import MetricsAccumulator, compute_metrics

__all__ = ["LogHistogram", "MetricsAccumulator", "compute_metrics"]
