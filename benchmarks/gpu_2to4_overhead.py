"""Where the time of PyTorch's 2:4 (cuSPARSELt) Linear goes, on a CUDA GPU.

    python benchmarks/gpu_2to4_overhead.py [--out FILE.json]

On the H200 the device check measured a 2:4 sparse Linear at ~0.5 ms for every shape and
batch (dense: 0.03-0.14 ms): a constant, so not the GEMM. This script separates the parts,
for one 4096x4096 fp16 weight at batch 1/64/1024, all timed as the median of 50 calls:

- ``dense``: F.linear on the dense weight;
- ``linear``: F.linear on the ``to_sparse_semi_structured`` weight (what the target runs);
- ``cslt``: ``torch._cslt_sparse_mm`` called directly on the compressed weight (default algorithm);
- ``cslt_search``: the same with the algorithm ``torch._cslt_sparse_mm_search`` picks;
- ``linear_graph`` / ``dense_graph``: the same calls replayed from a CUDA graph, which removes
  the host-side work (plan set-up, dispatch): what is left is device time.

Wall time per call (host + device, synchronised) and CUDA-event time are both recorded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def timed(fn, sync, iterations: int = 50, warmup: int = 10) -> dict:
    import torch

    for _ in range(warmup):
        fn()
    sync()
    walls, events = [], []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        sync()
        walls.append((time.perf_counter() - t0) * 1e3)
        events.append(start.elapsed_time(end))
    return {"wall_p50_ms": statistics.median(walls), "event_p50_ms": statistics.median(events)}


def graphed(fn):
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main() -> None:
    import torch
    import torch.nn.functional as F
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    SparseSemiStructuredTensor._FORCE_CUTLASS = False
    torch.manual_seed(0)
    weight = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    mask = torch.tensor([1, 1, 0, 0], device="cuda", dtype=torch.bool).tile(4096, 1024)
    weight = weight * mask
    sparse = to_sparse_semi_structured(weight)
    sync = torch.cuda.synchronize
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cusparselt": torch.backends.cusparselt.version(), "rows": []}
    for batch in (1, 64, 1024):
        x = torch.randn(batch, 4096, device="cuda", dtype=torch.float16)
        xt = x.t().contiguous()
        row: dict = {"batch": batch}
        calls = {
            "dense": lambda: F.linear(x, weight),
            "linear": lambda: F.linear(x, sparse),
            "cslt": lambda: torch._cslt_sparse_mm(sparse.packed, xt),
        }
        try:
            found = torch._cslt_sparse_mm_search(sparse.packed, xt)
            alg_id = found[0] if isinstance(found, tuple) else int(found)
            row["search_result"] = str(found)
            calls["cslt_search"] = lambda: torch._cslt_sparse_mm(sparse.packed, xt, alg_id=alg_id)
        except Exception as exc:  # the search API changed across versions; record, go on
            row["search_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        for name, fn in calls.items():
            try:
                row[name] = timed(fn, sync)
            except Exception as exc:
                row[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        for name in ("dense", "linear", "cslt"):
            try:
                row[f"{name}_graph"] = timed(graphed(calls[name]), sync)
            except Exception as exc:
                row[f"{name}_graph"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        try:
            row["max_abs_diff"] = float((F.linear(x, sparse) - F.linear(x, weight)).abs().max())
        except Exception as exc:
            row["max_abs_diff"] = f"{type(exc).__name__}"
        if batch == 64:  # which calls the 2:4 Linear makes, host and device, from the profiler
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    calls["linear"]()
                sync()
            results["profile_linear_batch64"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
            print(results["profile_linear_batch64"])
        results["rows"].append(row)
        print(json.dumps(row))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
