"""Whole-model CPU latency: the torch-sparse-cpu target (sparse) vs ONNX Runtime dense.

    python benchmarks/cpu_sparse.py [--threads 2] [--iterations 300]

Models pruned by magnitude to 95% and 99% (per layer): LeNet-300-100, an MLP 784-1024-1024-10
and an MLP 784-4096-4096-10. Both runtimes get the same thread count and the same inputs;
p50 of ``--iterations`` after warm-up. Also reports torch-sparse-cpu's own dense baseline.
"""

from __future__ import annotations

import argparse
import os
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import masked_checkpoint  # noqa: E402

from dnsconvert.bench import bench  # noqa: E402

MODELS_ALL = {
    "lenet300100": ("lenet300100", {}),
    "mlp-1024": ("mlp", {"hidden": [1024, 1024]}),
    "mlp-4096": ("mlp", {"hidden": [4096, 4096]}),
}
MODELS = {k: v for k, v in MODELS_ALL.items() if not os.environ.get("ONLY") or k in os.environ["ONLY"].split(",")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (name, kwargs) in MODELS.items():
            for sparsity in (0.95, 0.99):
                ckpt = masked_checkpoint(name, sparsity, **kwargs)
                report = bench(ckpt, targets=("ort", "torch-sparse-cpu"), batches=(1, 64), warmup=50, iterations=args.iterations, threads=args.threads, workdir=tmp)
                p50 = {(r.target, r.variant, r.stats.batch): r.stats.p50_ms for r in report.rows}
                for batch in (1, 64):
                    ort_dense = p50[("ort", "dense", batch)]
                    sparse = p50[("torch-sparse-cpu", "sparse", batch)]
                    row = {
                        "model": label, "sparsity": sparsity, "batch": batch, "ort_dense_ms": ort_dense,
                        "torch_dense_ms": p50[("torch-sparse-cpu", "dense", batch)], "sparse_ms": sparse, "speedup_vs_ort_dense": ort_dense / sparse,
                    }  # fmt: skip
                    rows.append(row)
                    print(f"{label:12s} {sparsity:4.0%} batch {batch:3d}: ORT dense {ort_dense:8.4f} ms  torch dense {row['torch_dense_ms']:8.4f} ms  sparse {sparse:8.4f} ms  -> {row['speedup_vs_ort_dense']:5.2f}x vs ORT dense", flush=True)
    print(json.dumps({"threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
