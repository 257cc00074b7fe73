"""FP16 / BF16 / INT8 (Q/DQ) ONNX of DNS checkpoints on real MNIST: test accuracy and file sizes beside fp32.

    python benchmarks/precision_mnist.py --data ../shared/data/mnist runs/mnist/lenet300100-dns.safetensors runs/mnist/lenet5-dns.safetensors \
        [--calibration-samples 512] [--seeds 0 1 2] [--json runs/mnist/precision.json]

For each checkpoint: the masked model is exported to fp32 ONNX; fp16 and bf16 are cast from it;
INT8 is quantized (ONNX Runtime static QDQ, symmetric, per-channel) once per seed from a
different random draw of --calibration-samples *training* images. Every model runs in ONNX
Runtime's CPU provider (bf16 emulated in fp32 with bf16 rounding, as it has no bf16 kernels)
on the full 10,000-image *test* set. Sizes are of the sparse-initializer file and its dense twin.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from dnsconvert.data import load_mnist
from dnsconvert.export.onnx_export import export_checkpoint
from dnsconvert.export.precision import cast_model, load_calibration, ort_runner, quantize_int8
from dnsconvert.export.sparse_init import sparsify_initializers
from dnsconvert.loading import load_checkpoint


def accuracy(model, images: np.ndarray, labels: np.ndarray, batch: int = 1000) -> float:
    run = ort_runner(model, threads=2)
    name = model.graph.input[0].name
    correct = sum(int((run({name: images[i : i + batch]})[0].argmax(-1) == labels[i : i + batch]).sum()) for i in range(0, len(images), batch))
    return correct / len(images)


def sizes(model, names) -> dict:
    sparse, records = sparsify_initializers(model, names)
    return {"sparse_bytes": sparse.ByteSize(), "dense_bytes": model.ByteSize(), "tensors_stored_sparse": sum(r.sparsified for r in records), "weights": len(records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--calibration-samples", type=int, default=512)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    test = load_mnist(args.data).test
    x, y = test.batch(torch.arange(len(test)))
    images, labels = x.numpy().astype(np.float32), y.numpy()
    results = []
    for path in args.checkpoints:
        ckpt = load_checkpoint(path)
        exported = export_checkpoint(ckpt)
        names = list(exported.names.values())
        fp32 = exported.model
        row = {"checkpoint": str(path), "model": ckpt.model.factory, "fp32": {"accuracy": accuracy(fp32, images, labels), **sizes(fp32, names)}}
        for precision in ("fp16", "bf16"):
            cast = cast_model(fp32, precision)
            row[precision] = {"accuracy": accuracy(cast, images, labels), **sizes(cast, names)}
        runs = []
        for seed in args.seeds:
            calibration = load_calibration(str(args.data), ckpt.model.input_shape, samples=args.calibration_samples, seed=seed)
            quantized, report = quantize_int8(fp32, calibration)
            runs.append({"seed": seed, "accuracy": accuracy(quantized, images, labels), "calibration_set_drop_points": report.drop_points,
                         **sizes(quantized, list(report.quantized_weights.values()))})  # fmt: skip
        drops = [100 * (row["fp32"]["accuracy"] - r["accuracy"]) for r in runs]
        row["int8"] = {"runs": runs, "test_drop_points_mean": statistics.mean(drops), "test_drop_points_min": min(drops), "test_drop_points_max": max(drops),
                       "calibration": f"{args.calibration_samples} MNIST training images per seed"}  # fmt: skip
        results.append(row)
        print(f"{path.name}: fp32 {row['fp32']['accuracy']:.2%}  fp16 {row['fp16']['accuracy']:.2%}  bf16 {row['bf16']['accuracy']:.2%}  "
              f"int8 {', '.join(format(r['accuracy'], '.2%') for r in runs)} (drop {statistics.mean(drops):+.2f} pts, {min(drops):+.2f}..{max(drops):+.2f})", flush=True)  # fmt: skip
        for precision in ("fp32", "fp16", "bf16"):
            print(f"    {precision}: sparse {row[precision]['sparse_bytes']:,} B, dense {row[precision]['dense_bytes']:,} B")
        print(f"    int8: sparse {runs[0]['sparse_bytes']:,} B, dense {runs[0]['dense_bytes']:,} B")
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.write_text(text)
    if any(row["int8"]["test_drop_points_max"] > 0.3 for row in results):
        sys.exit("an INT8 model lost more than 0.3 points of test accuracy")


if __name__ == "__main__":
    main()
