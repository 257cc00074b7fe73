"""The model x target latency table at the built-in models' DNS sparsity, against the fastest dense runtime.

    python benchmarks/bench_table.py --checkpoints runs/dns [--threads 2]

Reads the DNS checkpoints (lenet300100-dns, lenet5-dns: see benchmarks/cpu_sparse.py or
benchmarks/mnist_table.py for how to train them) and benchmarks each on every CPU target (ort,
torch-sparse-cpu) in one interleaved run with ONNX Runtime's dense fp32 and int8 baselines;
prints the sparse p50 / p99, the speedup against the fastest fp32 dense runtime with its
interval, the speedup against the target's own dense variant and against int8 dense.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dnsconvert.bench import bench
from dnsconvert.loading import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, default=Path("runs/dns"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    table = []
    for name in ("lenet300100", "lenet5"):
        path = args.checkpoints / f"{name}-dns.safetensors"
        if not path.exists():
            print(f"skip {name}: {path} not found (train it first: see benchmarks/cpu_sparse.py)")
            continue
        report = bench(load_checkpoint(path), targets=("ort", "torch-sparse-cpu"), batches=(1, 64), warmup=50, iterations=args.iterations, rounds=args.rounds, threads=args.threads)
        stats = {(r.target, r.variant, r.stats.batch): r.stats for r in report.rows}
        for s in report.comparisons:
            sparse = stats[(s.target, "sparse", s.batch)]
            table.append({
                "model": name, "target": s.target, "batch": s.batch, "sparse_p50": sparse.p50_ms, "sparse_p99": sparse.p99_ms,
                "fastest_dense": s.fastest_dense, "fastest_dense_p50": s.fastest_dense_p50_ms, "vs_fastest_dense": s.vs_fastest_dense.to_json(),
                "vs_own_dense": s.vs_own_dense.to_json() if s.vs_own_dense else None, "vs_int8_dense": s.vs_int8_dense.to_json() if s.vs_int8_dense else None,
            })  # fmt: skip
            print(f"| {name} | {s.target} | {s.batch} | {sparse.p50_ms:.4f} / {sparse.p99_ms:.4f} | {s.fastest_dense} {s.fastest_dense_p50_ms:.4f} | "
                  f"{s.vs_fastest_dense.text()} ({s.vs_fastest_dense.verdict}) | {s.vs_own_dense.text() if s.vs_own_dense else '-'} | {s.vs_int8_dense.text() if s.vs_int8_dense else '-'} |", flush=True)  # fmt: skip
    print("| model | target | batch | sparse p50 / p99 (ms) | fastest dense (ms) | vs fastest dense [95%] | vs own dense | vs int8 dense |\n|---|---|---|---|---|---|---|---|")
    for row in table:
        own = "-" if row["vs_own_dense"] is None else f"{row['vs_own_dense']['value']:.2f}x"
        int8 = "-" if row["vs_int8_dense"] is None else f"{row['vs_int8_dense']['value']:.2f}x"
        head = row["vs_fastest_dense"]
        print(
            f"| {row['model']} | {row['target']} | {row['batch']} | {row['sparse_p50']:.4f} / {row['sparse_p99']:.4f} | {row['fastest_dense']} {row['fastest_dense_p50']:.4f} | "
            f"{head['value']:.2f}x [{head['low']:.2f}, {head['high']:.2f}] | {own} | {int8} |"
        )
    print(json.dumps({"threads": args.threads, "rows": table}, indent=2))


if __name__ == "__main__":
    main()
