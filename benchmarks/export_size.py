"""Sparse-initializer ONNX size vs dense, parity, and export+validation time vs bare export.

    python benchmarks/export_size.py [--threads 2]

Size/parity: LeNet-300-100 and LeNet-5 pruned by magnitude to 50/90/95/99%. Time: the whole
``ort`` build (export, sparsify, checker, parity in ONNX Runtime, graph N:M check, writing
files and manifest) against a bare ``torch.onnx.export(dynamo=True)`` of the same model, on
LeNet-5 and on an MLP of ≥10M parameters; median of 5 after one warm-up export.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import masked_checkpoint  # noqa: E402

from dnsconvert.export.onnx_export import torch_to_onnx  # noqa: E402
from dnsconvert.models import build_masked_model  # noqa: E402
from dnsconvert.targets import build_artifact  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: dict = {"sizes": [], "timing": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in ("lenet300100", "lenet5"):
            for sparsity in (0.5, 0.9, 0.95, 0.99):
                manifest = build_artifact(masked_checkpoint(name, sparsity), tmp / f"{name}{sparsity}", target="ort", atol=1e-5, rtol=1e-5).manifest
                sizes, parity = manifest.sizes, manifest.parity
                row = {"model": name, "sparsity": sparsity, "sparse_bytes": sizes.sparse_bytes, "dense_bytes": sizes.dense_bytes, "ratio": sizes.ratio, "max_abs": parity.max_abs, "max_rel": parity.max_rel}
                out["sizes"].append(row)
                print(f"{name:12s} {sparsity:5.0%}  sparse/dense {row['ratio']:.4f}  max|Δ| {row['max_abs']:.2e}", flush=True)
        for name, kwargs in (("lenet5", {}), ("mlp", {"hidden": [4096, 2048]})):
            ckpt = masked_checkpoint(name, 0.95, **kwargs)
            params = sum(v.numel() for v in ckpt.weights.values())
            model = build_masked_model(ckpt)
            example = torch.randn(2, *ckpt.model.input_shape[1:])
            torch_to_onnx(model, example)  # warm-up: the exporter's first call imports and caches a lot
            bare, full = [], []
            for i in range(5):
                t0 = time.perf_counter()
                torch_to_onnx(model, example)
                bare.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                build_artifact(ckpt, tmp / f"t{name}{i}", target="ort")
                full.append(time.perf_counter() - t0)
            b, f = statistics.median(bare), statistics.median(full)
            out["timing"].append({"model": name, "params": params, "bare_export_s": b, "export_and_validate_s": f, "ratio": f / b})
            print(f"{name:12s} {params / 1e6:6.2f}M params  bare export {b:.2f}s  export+validate {f:.2f}s  ratio {f / b:.2f}", flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
