"""2:4 semi-structured sparse vs dense on a GPU: per-layer GEMM and an end-to-end FFN block.

    python benchmarks/gpu_2to4.py [--dtypes fp16 bf16] [--backend auto|cusparselt|cutlass] [--json out.json]

Per layer: Linear weights of 4096x4096, 11008x4096 and 4096x11008 at batch 1, 64 and 1024
(CUDA-synchronised p50/p90 of --iterations runs, dense and 2:4 with the same weights and dtype).
End to end: a 2-block transformer FFN (1024 -> 4096 -> 1024), 2:4-projected, built by the
torch-2to4-cuda target and benchmarked against its own dense variant (the same model in the same
dtype on the same GPU; no ONNX Runtime CPU baselines): ``speedup`` is that ratio, and the ratio
against the fastest dense row bench() timed is recorded beside it.
Each backend is first checked against the GPU with ``backend_support`` (CUTLASS: compute
capability 8.x only; cuSPARSELt: a torch built with it); a refused backend is reported with
its reason instead of crashing. Exit 0 when at least one measurement was made, 1 when none
could be (no GPU, or every backend refused), with the reason on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))
BATCHES = (1, 64, 1024)


def backends_to_run(requested: str) -> tuple[list[str], dict[str, str]]:
    """(backends that can run here, {backend: reason} for those refused)."""
    from dnsconvert.targets.torch_semistructured import BACKENDS, backend_support

    capability = tuple(torch.cuda.get_device_capability())
    cusparselt = bool(torch.backends.cusparselt.is_available())
    verdicts = {name: backend_support(name, capability, cusparselt_available=cusparselt) for name in BACKENDS}
    wanted = list(BACKENDS) if requested == "all" else [requested] if requested != "auto" else [next((b for b in BACKENDS if verdicts[b][0]), BACKENDS[0])]
    return [b for b in wanted if verdicts[b][0]], {b: verdicts[b][1] for b in wanted if not verdicts[b][0]}


def run(dtypes: list[str], backend: str, iterations: int, shapes=SHAPES, batches=BATCHES, e2e: bool = True) -> dict:
    from dnsconvert.errors import TargetError
    from dnsconvert.targets.torch_semistructured import DTYPES, TorchSemiStructuredTarget, gemm_speedup

    status = TorchSemiStructuredTarget().availability()
    result: dict = {"device": None, "torch": torch.__version__, "cuda": torch.version.cuda, "gemm": [], "end_to_end": [], "refused": {}}
    if not torch.cuda.is_available():
        result["refused"]["all"] = status.reason
        return result
    result["device"] = torch.cuda.get_device_name()
    result["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    result["cusparselt"] = torch.backends.cusparselt.version() if torch.backends.cusparselt.is_available() else None
    runnable, refused = backends_to_run(backend)
    result["refused"].update(refused)
    for name in runnable:
        for dtype_name in dtypes:
            for shape in shapes:
                for batch in batches:
                    try:
                        row = gemm_speedup(*shape, batch, dtype=DTYPES[dtype_name], backend=name, iterations=iterations)
                    except TargetError as exc:
                        result["refused"][f"{name}/{dtype_name}/{shape}/{batch}"] = str(exc)
                        continue
                    result["gemm"].append(row)
                    graphs = f"  | CUDA graphs: dense {row['dense_graph_p50_ms']:.4f} ms  2:4 {row['sparse_graph_p50_ms']:.4f} ms  speedup {row['speedup_graphs']:.2f}x" if "speedup_graphs" in row else ""
                    print(f"{name} {dtype_name} {shape} batch {batch:5d}: dense {row['dense_p50_ms']:.4f} ms  2:4 {row['sparse_p50_ms']:.4f} ms  speedup {row['speedup']:.2f}x{graphs}", flush=True)
            if e2e:
                for graphs in (False, True):
                    result["end_to_end"].append(end_to_end(name, dtype_name, iterations, cuda_graphs=graphs))
    return result


def end_to_end(backend: str, dtype_name: str, iterations: int, *, cuda_graphs: bool = True) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import masked_checkpoint

    from dnsconvert.bench import bench
    from dnsconvert.errors import TargetError
    from dnsconvert.project import project_nm
    from dnsconvert.targets import BuildOptions
    from dnsconvert.targets.torch_semistructured import TorchSemiStructuredTarget

    ckpt = project_nm(masked_checkpoint("transformer_mlp", 0.5, dim=1024, hidden=4096, depth=2), "2:4").checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        try:
            extra = {"dtype": dtype_name, "backend": backend, "cuda_graphs": "1" if cuda_graphs else "0"}
            artifact = TorchSemiStructuredTarget().build(ckpt, Path(tmp) / "ffn", BuildOptions(extra=extra))
        except TargetError as exc:
            return {"backend": backend, "dtype": dtype_name, "cuda_graphs": cuda_graphs, "refused": str(exc)}
        # The target against its own dense variant (same model, dtype and GPU), as the README's GPU rows
        # say. bench()'s default ONNX Runtime baselines would time this FFN on the CPU up to batch 1024
        # and make its headline "speedup" the ratio against the fastest dense runtime of all.
        report = bench(artifact, batches=BATCHES, warmup=20, iterations=iterations, baselines=())
    row = {
        "backend": backend, "dtype": dtype_name, "cuda_graphs": cuda_graphs, "model": "transformer_mlp dim 1024 hidden 4096 depth 2",
        "dense_baselines": "the target's own dense variant only (bench baselines=())",
        "speedups": [ffn_speedup(s) for s in report.speedups()], "bench": report.speedups(), "parity": artifact.manifest.parity.to_json(),
    }  # fmt: skip
    for s in row["speedups"]:
        print(f"FFN {backend} {dtype_name} graphs={int(cuda_graphs)} batch {s['batch']:5d}: dense {s['dense_p50_ms']:.4f} ms  2:4 {s['sparse_p50_ms']:.4f} ms  "
              f"speedup vs own dense {s['speedup']:.2f}x  (vs fastest dense, {s['fastest_dense']}: {s['speedup_vs_fastest_dense']:.2f}x)", flush=True)  # fmt: skip
    return row


def ffn_speedup(s: dict) -> dict:
    """One batch of the FFN: the ratio against the target's own dense variant (``speedup``) and, kept
    apart, the one against the fastest dense row bench() timed (the same row when no baseline ran)."""
    own = s["speedup_vs_own_dense"]
    if own is None:
        raise RuntimeError(f"bench() timed no dense variant of the target at batch {s['batch']}")
    return {
        "batch": s["batch"], "dense_p50_ms": s["dense_p50_ms"], "sparse_p50_ms": s["sparse_p50_ms"],
        "speedup": own["value"], "speedup_interval": [own["low"], own["high"]], "verdict": own["verdict"],
        "speedup_vs_fastest_dense": s["speedup"], "fastest_dense": s["speedup_vs_fastest_dense"]["baseline"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    parser.add_argument("--backend", default="auto", choices=["auto", "all", "cusparselt", "cutlass"])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = run(args.dtypes, args.backend, args.iterations)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    if not result["gemm"]:
        sys.exit(f"no GPU measurement: {json.dumps(result['refused'])}")


if __name__ == "__main__":
    main()
