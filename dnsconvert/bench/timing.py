"""Moved to :mod:`dnsconvert.timing` (targets use it too); kept so old imports keep working."""

from ..timing import LatencyStats, Ratio, latency_stats, measure, measure_interleaved, percentile

__all__ = ["LatencyStats", "Ratio", "latency_stats", "measure", "measure_interleaved", "percentile"]
