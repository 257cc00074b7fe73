"""The model x target x dense/sparse latency table at the built-in models' DNS sparsity.

    python benchmarks/bench_table.py --checkpoints runs/mnist [--threads 2]

Reads the DNS checkpoints written by benchmarks/mnist_table.py (lenet300100-dns,
lenet5-dns) and benchmarks each on every CPU target: ort and torch-sparse-cpu (sparse vs its
own dense baseline), printing p50, p99 and the speedup as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dnsconvert.bench import bench
from dnsconvert.loading import load_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, default=Path("runs/mnist"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()
    table = []
    for name in ("lenet300100", "lenet5"):
        path = args.checkpoints / f"{name}-dns.safetensors"
        if not path.exists():
            print(f"skip {name}: {path} not found (run benchmarks/mnist_table.py first)")
            continue
        ckpt = load_checkpoint(path)
        report = bench(ckpt, targets=("ort", "torch-sparse-cpu"), batches=(1, 64), warmup=50, iterations=args.iterations, threads=args.threads)
        stats = {(r.target, r.variant, r.stats.batch): r.stats for r in report.rows}
        for s in report.speedups():
            d, sp = stats[(s["target"], "dense", s["batch"])], stats[(s["target"], "sparse", s["batch"])]
            table.append({"model": name, "target": s["target"], "batch": s["batch"], "dense_p50": d.p50_ms, "dense_p99": d.p99_ms, "sparse_p50": sp.p50_ms, "sparse_p99": sp.p99_ms, "speedup": s["speedup"]})
    print("| model | target | batch | dense p50 / p99 (ms) | sparse p50 / p99 (ms) | speedup |\n|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['model']} | {row['target']} | {row['batch']} | {row['dense_p50']:.4f} / {row['dense_p99']:.4f} | {row['sparse_p50']:.4f} / {row['sparse_p99']:.4f} | {row['speedup']:.2f}x |")
    print(json.dumps({"threads": args.threads, "rows": table}, indent=2))


if __name__ == "__main__":
    main()
