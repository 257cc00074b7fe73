"""Latency measurement: single runs, interleaved comparisons with confidence intervals, thread settings.

Why interleave: on a shared CPU the background load changes from second to second, so a dense
run timed at 10:00 and a sparse run timed at 10:01 differ by the load as much as by the model.
:func:`measure_interleaved` times every variant in the same rounds (the order rotates each
round), so load changes hit all variants alike; a ratio of medians is then bootstrapped over
rounds (paired: a resample keeps each round's variants together) into a confidence interval.
A ratio whose interval spans 1.0 is reported as "within noise".

The interval is never narrower than +-2% (``RESOLUTION``): timing two ONNX Runtime sessions of
one model against each other 12 times (30 rounds each) gave estimates from 0.993 to 1.009 with
bootstrap intervals of +-0.5% that often excluded 1.0. Two copies of the same model differ by
up to 1% (memory placement), which is real but says nothing about the model; a ratio is only
claimed beyond that floor.

Both targets and bench sit above this module (it imports neither).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


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


def latency_stats(samples: Sequence[float], *, batch: int, warmup: int) -> LatencyStats:
    """Statistics of per-call durations given in seconds."""
    ordered = sorted(samples)
    mean = sum(ordered) / len(ordered)
    return LatencyStats(
        batch=batch,
        warmup=warmup,
        iterations=len(ordered),
        mean_ms=1e3 * mean,
        p50_ms=1e3 * percentile(ordered, 50),
        p90_ms=1e3 * percentile(ordered, 90),
        p99_ms=1e3 * percentile(ordered, 99),
        min_ms=1e3 * ordered[0],
        max_ms=1e3 * ordered[-1],
        throughput=batch / mean if mean > 0 else float("inf"),
    )


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
    return latency_stats(samples, batch=batch, warmup=warmup)


RESOLUTION = 0.02  # the smallest relative difference a ratio claims (see the module docstring)


@dataclass(frozen=True)
class Ratio:
    """``baseline`` p50 / ``candidate`` p50 (above 1: the candidate is faster), with its interval."""

    baseline: str
    candidate: str
    value: float
    low: float
    high: float
    confidence: float
    rounds: int

    @property
    def verdict(self) -> str:
        if self.low > 1.0:
            return "faster"
        if self.high < 1.0:
            return "slower"
        return "within noise"

    def text(self) -> str:
        return f"{self.value:.2f}x [{self.low:.2f}, {self.high:.2f}]"

    def to_json(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


@dataclass
class Interleaved:
    """Per-call durations (seconds) of several variants timed in the same rounds."""

    batch: int
    warmup: int
    samples: dict[str, list[list[float]]] = field(default_factory=dict)  # variant -> rounds -> calls

    @property
    def rounds(self) -> int:
        return len(next(iter(self.samples.values()), []))

    def stats(self, name: str) -> LatencyStats:
        return latency_stats([s for block in self.samples[name] for s in block], batch=self.batch, warmup=self.warmup)

    def quietest(self, fraction: float, *, minimum: int = 3) -> "Interleaved":
        """The same variants in only the rounds where the machine was quietest: the ``fraction``
        of rounds (at least ``minimum``, in their order) with the lowest geometric mean of the
        variants' round medians. Rounds stay whole, so the variants stay paired.

        Why: this 2-core VM has spells of seconds (up to ~80 s, a quarter of the time or more)
        in which everything runs 25-70% slower, and not by the same factor: BERT's dense ONNX
        Runtime session with spinning workers went from 0.90 to 1.55 ms at batch 64, its
        planned runner from 1.09 to 1.35, so a check that fell in a spell chose the plan, which
        then ran at 0.83x of dense on a quiet machine. Rounds are the unit because each holds
        every variant, timed within moments of each other."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        rounds = self.rounds
        keep = min(rounds, max(minimum, math.ceil(fraction * rounds)))
        if keep >= rounds:
            return self
        medians = np.array([[float(np.median(block)) if len(block) else np.nan for block in self.samples[name]] for name in self.samples])
        if not (np.isfinite(medians).all() and (medians > 0).all()):
            return self  # nothing to rank by (a clock that did not move): every round counts
        scores = np.log(medians).mean(axis=0)
        chosen = sorted(np.argsort(scores, kind="stable")[:keep].tolist())
        return Interleaved(batch=self.batch, warmup=self.warmup, samples={name: [blocks[i] for i in chosen] for name, blocks in self.samples.items()})

    def ratio(self, baseline: str | Sequence[str], candidate: str, *, confidence: float = 0.95, resolution: float = RESOLUTION, resamples: int = 1000, seed: int = 0) -> Ratio:
        """p50(baseline) / p50(candidate) with a paired bootstrap interval over rounds, never
        narrower than ``resolution`` either side of the estimate.

        Several baselines mean "the fastest of them": each bootstrap resample picks its own
        fastest, so the interval carries the uncertainty of that choice too (taking the
        minimum of equally fast baselines favours the baseline by the noise)."""
        names = [baseline] if isinstance(baseline, str) else list(baseline)
        bases, cand = [self.samples[n] for n in names], self.samples[candidate]
        value = min(_pooled_median(b) for b in bases) / _pooled_median(cand)
        low, high = value / (1.0 + resolution), value * (1.0 + resolution)
        rounds = len(cand)
        if rounds >= 2:
            rng = np.random.default_rng(seed)
            picks = rng.integers(0, rounds, size=(resamples, rounds))
            ratios = np.array([min(_pooled_median([b[i] for i in pick]) for b in bases) / _pooled_median([cand[i] for i in pick]) for pick in picks])
            tail = 100.0 * (1.0 - confidence) / 2.0
            boot_low, boot_high = np.percentile(ratios, [tail, 100.0 - tail])
            low, high = min(low, float(boot_low)), max(high, float(boot_high))
        label = names[0] if len(names) == 1 else "fastest of " + ", ".join(names)
        return Ratio(label, candidate, value, float(low), float(high), confidence, rounds)


def _pooled_median(blocks: Sequence[Sequence[float]]) -> float:
    return float(np.median(np.concatenate([np.asarray(b, dtype=np.float64) for b in blocks])))


def measure_interleaved(
    calls: Mapping[str, Callable[[], object]],
    *,
    batch: int,
    rounds: int = 20,
    iterations: int | None = 20,
    time_budget_s: float | None = None,
    warmup: int = 10,
    warmup_per_round: int = 1,
    settle_s: float = 0.0,
    gap_s: float = 0.0,
    synchronize: Mapping[str, Callable[[], None]] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    done: Callable[[str], None] | None = None,
) -> Interleaved:
    """Time every call in ``calls`` in ``rounds`` rounds; in each round each variant runs
    ``warmup_per_round`` untimed calls (caches, thread pools), and more while less than
    ``settle_s`` has passed since its block began, then ``iterations`` timed calls
    (or its share of ``time_budget_s``: budget / rounds / variants, at least 3 calls). The
    order of variants rotates from round to round so that none always follows the same one.
    Why ``settle_s``: a variant's idle worker threads go on spinning for a while after its block
    (an ONNX Runtime session with spinning on, its default: ~30-40 ms), taking the cores the
    next variant's threads need — ResNet-18's sparse runner, split over both threads, ran its
    first two calls after a dense ORT call at 20 ms instead of 12.
    ``gap_s``: a pause between rounds (through ``sleep``), so that the rounds are spread over
    more time than the variants need (see :meth:`Interleaved.quietest`).
    ``done(name)``, if given, is told of each variant's warm-up and each of its blocks as they
    end: ``len(calls) * (rounds + 1)`` calls in all (a progress bar's steps)."""
    if iterations is None and time_budget_s is None:
        raise ValueError("give iterations or a time budget")
    if rounds < 1 or not calls:
        raise ValueError("need at least one round and one call")
    names = list(calls)
    sync = synchronize or {}
    report = done or _noop_name
    for name in names:
        for _ in range(warmup):
            calls[name]()
        sync.get(name, _noop)()
        report(name)
    result = Interleaved(batch=batch, warmup=warmup, samples={name: [] for name in names})
    block_budget = time_budget_s / (rounds * len(names)) if time_budget_s is not None else None
    for r in range(rounds):
        if r and gap_s > 0:
            sleep(gap_s)
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            run, done = calls[name], sync.get(name, _noop)
            settled = clock() + settle_s
            untimed = 0
            while untimed < warmup_per_round or clock() < settled:
                run()
                untimed += 1
            done()
            block: list[float] = []
            started = clock()
            while True:
                t0 = clock()
                run()
                done()
                block.append(clock() - t0)
                if iterations is not None and len(block) >= iterations:
                    break
                if iterations is None and clock() - started >= block_budget and len(block) >= 3:
                    break
            result.samples[name].append(block)
            report(name)
    return result


def _noop() -> None:
    pass


def _noop_name(name: str) -> None:
    pass


@dataclass(frozen=True)
class ThreadSettings:
    """What every runtime in this process was told about threads, and what is loaded."""

    threads: int  # requested intra-op threads (0: each runtime's default)
    torch_threads: int | None
    numba_threading_layer: str | None
    numba_threads: int | None
    cpu_affinity: list[int]
    openmp_runtimes: list[str]  # OpenMP libraries mapped into this process (one is healthy)
    environment: dict[str, str]

    def to_json(self) -> dict:
        return asdict(self)


THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER")


def openmp_runtimes() -> list[str]:
    """OpenMP runtime libraries loaded in this process (Linux: from /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as handle:
            paths = {line.split()[-1] for line in handle if "/" in line}
    except OSError:
        return []
    names = {os.path.basename(p) for p in paths}
    return sorted(n for n in names if n.startswith(("libgomp", "libiomp", "libomp")))


def use_numba_threading_layer() -> str:
    """Choose numba's threading layer for its parallel kernels: oneTBB's when the ``tbb`` wheel is
    installed and loads, else numba's own ``workqueue``; never OpenMP.

    Why not OpenMP: numba's default picks it through the *system* libgomp, while torch ships its
    own copy: two OpenMP runtimes in one process, whose spinning workers fought for the cores and
    made dense PyTorch runs 25-30x slower in about half the runs. Why TBB first: a fork/join of
    two threads costs ~5 us on this 2-core machine, against ~60 us for a Python worker woken
    through a futex and ~90 us for the workqueue pool (an empty split, p50; measured 2026-11-29),
    which made a parallel kernel slower than the serial one on any layer under ~0.3 ms. The pip
    wheel puts ``libtbb.so.12`` in the environment's ``lib`` folder, outside the loader's search
    path, so it is loaded here by its full path (numba then finds it by its soname).

    Must run before numba launches its threads (on the first parallel call or
    ``numba.set_num_threads``); returns the layer in effect, which is the one launched earlier
    if someone did.
    """
    import numba
    from numba.np.ufunc import parallel

    if parallel._is_initialized:
        return numba.threading_layer()
    layer = "tbb" if _load_tbb() else "workqueue"
    numba.config.THREADING_LAYER = layer
    return layer


@functools.cache  # the libraries load once; the answer holds for the process
def _load_tbb() -> bool:
    """Whether oneTBB's runtime (the interface numba checks at launch) and numba's TBB pool load."""
    if os.environ.get("DNSCONVERT_NO_TBB"):  # the fallback, on request (tests, or a TBB that misbehaves)
        return False
    import ctypes
    from importlib import metadata

    try:
        files = metadata.distribution("tbb").files or []
        found = [f.locate() for f in files if f.name == "libtbb.so.12"]
        if found:
            ctypes.CDLL(str(found[0]), mode=ctypes.RTLD_GLOBAL)
        from numba.np.ufunc.parallel import _check_tbb_version_compatible

        _check_tbb_version_compatible()  # numba's own test of the runtime (ImportError if unusable)
        from numba.np.ufunc import tbbpool  # noqa: F401 - loads against the runtime above
    except (metadata.PackageNotFoundError, OSError, ImportError):
        return False
    return True


@functools.cache  # asked by every parallel kernel call (0.45 us uncached); the layer is fixed once chosen
def fast_fork_join() -> bool:
    """Whether numba's parallel kernels run on a pool that forks and joins in microseconds (TBB)."""
    return use_numba_threading_layer() == "tbb"


def pin_threads(threads: int, *, pin_cpus: bool = False) -> ThreadSettings:
    """Give every runtime already imported ``threads`` intra-op threads (ONNX Runtime takes its
    count per session) and, with ``pin_cpus``, bind the process to the first ``threads`` CPUs."""
    import sys

    if pin_cpus and threads and hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[:threads])
    torch_threads = None
    if "torch" in sys.modules:
        import torch

        if threads:
            torch.set_num_threads(threads)
        torch_threads = torch.get_num_threads()
    layer = numba_threads = None
    if "numba" in sys.modules:
        layer = use_numba_threading_layer()
        import numba

        if threads:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        numba_threads = numba.get_num_threads()
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return ThreadSettings(
        threads=threads,
        torch_threads=torch_threads,
        numba_threading_layer=layer,
        numba_threads=numba_threads,
        cpu_affinity=affinity,
        openmp_runtimes=openmp_runtimes(),
        environment={k: os.environ[k] for k in THREAD_ENV if k in os.environ},
    )
