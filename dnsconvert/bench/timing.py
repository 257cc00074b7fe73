"""Latency measurement: warm-up, fixed iterations or a time budget, percentiles, throughput."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LatencyStats:
    batch: int
    warmup: int
    iterations: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    throughput: float  # samples per second at the mean latency

    def to_json(self) -> dict:
        return asdict(self)


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of an ascending list."""
    if not sorted_values:
        raise ValueError("no samples")
    position = (len(sorted_values) - 1) * q / 100.0
    low, high = math.floor(position), math.ceil(position)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def measure(
    run: Callable[[], object],
    *,
    batch: int,
    warmup: int = 10,
    iterations: int | None = 100,
    time_budget_s: float | None = None,
    synchronize: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> LatencyStats:
    """Time ``run``: ``warmup`` untimed calls, then ``iterations`` timed calls, or as many as
    fit in ``time_budget_s`` (at least 5). ``synchronize`` is called before each clock read,
    so asynchronous devices (CUDA) are timed to completion."""
    if iterations is None and time_budget_s is None:
        raise ValueError("give iterations or a time budget")
    for _ in range(warmup):
        run()
    synchronize()
    samples: list[float] = []
    started = clock()
    while True:
        t0 = clock()
        run()
        synchronize()
        samples.append(clock() - t0)
        if iterations is not None and len(samples) >= iterations:
            break
        if iterations is None and clock() - started >= time_budget_s and len(samples) >= 5:
            break
    ordered = sorted(samples)
    mean = sum(samples) / len(samples)
    return LatencyStats(
        batch=batch,
        warmup=warmup,
        iterations=len(samples),
        mean_ms=1e3 * mean,
        p50_ms=1e3 * percentile(ordered, 50),
        p90_ms=1e3 * percentile(ordered, 90),
        p99_ms=1e3 * percentile(ordered, 99),
        min_ms=1e3 * ordered[0],
        max_ms=1e3 * ordered[-1],
        throughput=batch / mean if mean > 0 else float("inf"),
    )
