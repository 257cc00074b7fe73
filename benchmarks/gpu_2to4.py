"""2:4 semi-structured sparse vs dense on a GPU: per-layer GEMM and an end-to-end MLP block.

    python benchmarks/gpu_2to4.py [--dtype fp16] [--backend cusparselt]

Needs an NVIDIA GPU with sparse tensor cores (sm80+) and torch with cuSPARSELt; exits with a
message otherwise. Per layer: 4096x4096-class Linear weights at batch 1, 64 and 1024 (CUDA
synchronised p50 of 100 runs). End to end: a 2-block transformer FFN (1024 -> 4096 -> 1024),
2:4-projected, through the torch-2to4-cuda target (dense baseline: same model, same dtype).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"])
    parser.add_argument("--backend", default="cusparselt", choices=["cusparselt", "cutlass"])
    args = parser.parse_args()
    from dnsconvert.targets.torch_semistructured import DTYPES, TorchSemiStructuredTarget, gemm_speedup

    status = TorchSemiStructuredTarget().availability()
    if not status.available:
        sys.exit(f"no GPU run: {status.reason}")
    dtype = DTYPES[args.dtype]
    rows = []
    for shape in ((4096, 4096), (11008, 4096), (4096, 11008)):
        for batch in (1, 64, 1024):
            row = gemm_speedup(*shape, batch, dtype=dtype, backend=args.backend)
            rows.append(row)
            print(f"{shape} batch {batch:5d}: dense {row['dense_ms']:.4f} ms  2:4 {row['sparse_ms']:.4f} ms  speedup {row['speedup']:.2f}x", flush=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import masked_checkpoint

    from dnsconvert.bench import bench
    from dnsconvert.project import project_nm
    from dnsconvert.targets import BuildOptions

    ckpt = project_nm(masked_checkpoint("transformer_mlp", 0.5, dim=1024, hidden=4096, depth=2), "2:4").checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        artifact = TorchSemiStructuredTarget().build(ckpt, Path(tmp) / "m.safetensors", BuildOptions(extra={"dtype": args.dtype, "backend": args.backend}))
        report = bench(artifact.manifest_path, batches=(1, 64, 1024), warmup=20, iterations=100)
    print(json.dumps({"device": torch.cuda.get_device_name(), "dtype": args.dtype, "backend": args.backend, "gemm": rows, "end_to_end": report.speedups(), "parity": artifact.manifest["parity"]}, indent=2))


if __name__ == "__main__":
    main()
