"""What splitting a compiled kernel over two threads costs: the Python worker vs numba's pool.

    python benchmarks/fork_join.py [--threads 2] [--repeats 300]
    DNSCONVERT_NO_TBB=1 python benchmarks/fork_join.py   # numba's workqueue pool instead of TBB

For shares of 0 to ~0.3 ms of work (a float loop, the same in every variant), p50 of: both shares
one after the other in this thread; ``csr_kernels.run_split`` (the first share here, the other on
a Python worker woken through a futex: the kernels' fallback); one ``prange`` kernel on numba's
pool (TBB where the wheel loads, see ``dnsconvert.timing.use_numba_threading_layer``). The gap
between "serial" and the split at 0 work is the fork/join cost a parallel layer has to earn back.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from numba import njit, prange

from dnsconvert.targets.csr_kernels import JIT, run_split
from dnsconvert.timing import pin_threads


@njit(**JIT)
def work(a, n):
    total = np.float32(0.0)
    for _ in range(n):
        for i in range(a.shape[0]):
            total += a[i] * np.float32(1.0001)
    return total


@njit(parallel=True, **JIT)
def work_parallel(a, n, parts):
    out = np.zeros(parts, dtype=np.float32)
    for p in prange(parts):
        out[p] = work(a, n)
    return out


def p50_us(call, repeats: int) -> float:
    for _ in range(10):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e6 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    settings = pin_threads(args.threads)
    a = np.ones(1000, dtype=np.float32)
    parts = args.threads
    print(f"numba threading layer: {settings.numba_threading_layer}, {parts} shares")
    print("| work per share (us, serial) | serial, all shares | run_split (Python worker) | prange (numba's pool) |")
    print("|---|---|---|---|")
    sizes = (0, 10, 100, 400, 2000, 8000)
    # numba's pool first, for every size, then the Python worker: once the worker thread exists,
    # the prange timings came out noisier (2x at 0.3 ms shares) than in a process without it
    one = {n: p50_us(lambda n=n: work(a, n), args.repeats) for n in sizes}
    serial = {n: p50_us(lambda n=n: [work(a, n) for _ in range(parts)], args.repeats) for n in sizes}
    pooled = {n: p50_us(lambda n=n: work_parallel(a, n, parts), args.repeats) for n in sizes}
    split = {n: p50_us(lambda n=n: run_split(work, [(a, n)] * parts), args.repeats) for n in sizes}
    for n in sizes:
        print(f"| {one[n]:.1f} | {serial[n]:.1f} | {split[n]:.1f} | {pooled[n]:.1f} |", flush=True)

if __name__ == "__main__":
    main()
