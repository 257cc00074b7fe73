"""The ``torch-2to4-cuda`` target: 2:4 semi-structured sparse Linear layers through PyTorch
(cuSPARSELt or CUTLASS kernels) on NVIDIA GPUs with sparse tensor cores (sm80+), fp16/bf16.

Eligible layers: Linear weights whose mask is 2:4 along the input features and whose shape
meets the backend's minimums (from ``torch.sparse.semi_structured``'s constraints, e.g.
cuSPARSELt fp16: rows and columns multiples of 16; CUTLASS fp16: rows of 32, columns of 64).
Artifact: a safetensors file with the masked weights (in the chosen dtype), the model spec
and the list of converted layers; loading rebuilds the model on the GPU and converts those
layers with ``to_sparse_semi_structured``. The dense baseline is the same model, same dtype.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..artifact import Artifact, write_artifact
from ..errors import TargetError
from ..modelspec import ModelSpec
from ..pattern import TWO_FOUR, cannot_hold, violating_groups
from .base import Availability, BuildOptions, Target

META_KEY = "dnsconvert.torch_2to4"
MODEL_FILE = "model.safetensors"
# (rows multiple, columns multiple) of the sparse weight, per backend and dtype, as enforced by
# torch.sparse.semi_structured (torch 2.x): a weight [out, in] needs out % rows == 0, in % cols == 0.
SHAPE_RULES = {
    ("cusparselt", torch.float16): (16, 16),
    ("cusparselt", torch.bfloat16): (16, 16),
    ("cutlass", torch.float16): (32, 64),
    ("cutlass", torch.bfloat16): (32, 64),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def eligible_linear(weight: torch.Tensor, *, backend: str, dtype: torch.dtype) -> tuple[bool, str]:
    """Can this Linear weight run on the semi-structured kernel? (answer, reason)."""
    if weight.dim() != 2:
        return False, "not a 2-D weight"
    reason = cannot_hold(tuple(weight.shape), TWO_FOUR)
    if reason:
        return False, reason
    bad = violating_groups(weight != 0, TWO_FOUR)
    if bad:
        return False, f"mask is not 2:4 along input features ({bad} groups keep more than 2)"
    rows, cols = SHAPE_RULES[(backend, dtype)]
    out_features, in_features = weight.shape
    if out_features % rows or in_features % cols:
        return False, f"shape {tuple(weight.shape)} is not a multiple of ({rows}, {cols}) required by {backend} {str(dtype).removeprefix('torch.')}"
    return True, f"2:4 along input features, {backend}"


def plan_model(model: nn.Module, *, backend: str, dtype: torch.dtype) -> dict[str, dict]:
    plan = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            ok, reason = eligible_linear(module.weight.detach(), backend=backend, dtype=dtype)
            plan[name] = {"sparse": ok, "reason": reason, "shape": list(module.weight.shape)}
    return plan


def sparsify_model_(model: nn.Module, plan: Mapping[str, dict], *, backend: str) -> nn.Module:
    """Swap each planned Linear weight for its semi-structured form, in place (CUDA only)."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    for name, decision in plan.items():
        if decision["sparse"]:
            module = model.get_submodule(name)
            module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.detach()), requires_grad=False)
    return model


class CudaRunner:
    def __init__(self, model: nn.Module, dtype: torch.dtype, spec: ModelSpec):
        from ..model_io import FlatIO

        self.flat = FlatIO(model, spec.inputs).eval()
        self.inputs = spec.inputs
        self.dtype = dtype

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        """The inputs on the GPU: floating ones in the model's dtype, integer ones as they are."""
        out = []
        for spec in self.inputs:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[spec.name])).to("cuda")
            out.append(tensor.to(self.dtype) if tensor.is_floating_point() else tensor)
        return tuple(out)

    def run_device(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            return self.flat(*tensors)

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in self.run_device(self.prepare(feeds))]

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def close(self) -> None:
        self.model = None
        torch.cuda.empty_cache()


def _load(data: bytes, variant: str, *, trust_code: bool = False) -> tuple[nn.Module, torch.dtype, ModelSpec]:
    from safetensors.torch import load

    from ..models import build_model, load_weights_
    from .torch_sparse_cpu import _metadata

    meta = json.loads(_metadata(data)[META_KEY])
    state = load(data)
    dtype = DTYPES[meta["dtype"]]
    spec = ModelSpec.from_json(meta["model"])
    model = build_model(spec, trust_code=trust_code)
    load_weights_(model, state, where=MODEL_FILE)
    model = model.to("cuda", dtype).eval()
    if variant == "sparse":
        sparsify_model_(model, meta["plan"], backend=meta["backend"])
    return model, dtype, spec


class TorchSemiStructuredTarget(Target):
    name: ClassVar[str] = "torch-2to4-cuda"
    description: ClassVar[str] = "PyTorch 2:4 semi-structured sparse Linear layers (cuSPARSELt/CUTLASS), CUDA sm80+"
    exploits_sparsity: ClassVar[str] = "yes: 2:4 sparse tensor cores for eligible Linear layers"
    option_help: ClassVar[dict[str, str]] = {"dtype": "fp16 (default) or bf16", "backend": "cusparselt (default) or cutlass"}

    def availability(self) -> Availability:
        if not torch.cuda.is_available():
            return Availability(False, "no CUDA GPU (2:4 sparse kernels need an NVIDIA GPU with compute capability 8.0+)")
        major, minor = torch.cuda.get_device_capability()
        if major < 8:
            return Availability(False, f"GPU compute capability {major}.{minor} has no sparse tensor cores (needs 8.0+)")
        try:
            from torch.sparse import to_sparse_semi_structured  # noqa: F401
        except ImportError:
            return Availability(False, "this torch has no torch.sparse.to_sparse_semi_structured")
        return Availability(True, f"{torch.cuda.get_device_name()} (sm{major}{minor})")

    def _settings(self, options: Mapping[str, str]) -> tuple[str, torch.dtype, str]:
        self.check_options(options)
        dtype_name = options.get("dtype", "fp16")
        backend = options.get("backend", "cusparselt")
        if dtype_name not in DTYPES:
            raise TargetError(f"dtype={dtype_name!r} is not fp16 or bf16")
        if backend not in ("cusparselt", "cutlass"):
            raise TargetError(f"backend={backend!r} is not cusparselt or cutlass")
        return dtype_name, DTYPES[dtype_name], backend

    def build(self, ckpt, output: Path, options: BuildOptions) -> Artifact:
        from safetensors.torch import save

        from ..export.parity import compare
        from ..model_io import output_names_of, parity_feeds
        from ..models import build_masked_model
        from ..validate import ensure_usable

        self.require_available()
        dtype_name, dtype, backend = self._settings(options.extra)
        ensure_usable(ckpt)
        model = build_masked_model(ckpt, trust_code=options.trust_model_code)
        plan = plan_model(model, backend=backend, dtype=dtype)
        if not any(d["sparse"] for d in plan.values()):
            reasons = "; ".join(f"{n}: {d['reason']}" for n, d in plan.items())
            raise TargetError(f"no Linear layer is eligible for 2:4 kernels ({reasons})", hint="project the checkpoint first: dnsconvert project --nm 2:4")
        state = {k: v.detach().to(dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in model.state_dict().items()}
        meta = {"model": ckpt.model.to_json(), "dtype": dtype_name, "backend": backend, "plan": plan}
        data = save(state, metadata={META_KEY: json.dumps(meta)})
        dense, _, spec = _load(data, "dense", trust_code=options.trust_model_code)
        sparse, _, _ = _load(data, "sparse", trust_code=options.trust_model_code)
        # fp16/bf16 results differ from fp32 by rounding; compare like with like, same dtype
        atol, rtol = max(options.atol, 1e-2), max(options.rtol, 1e-2)
        parity = compare(CudaRunner(dense, dtype, spec).run, CudaRunner(sparse, dtype, spec).run, parity_feeds(spec.inputs, (1, 64)), atol=atol, rtol=rtol)
        return write_artifact(
            output,
            ckpt=ckpt,
            files={"sparse": (MODEL_FILE, data)},
            aliases={"dense": "sparse"},  # one file: the dense variant skips the conversion
            target=self.name,
            format="safetensors+2:4",
            outputs=output_names_of(model, ckpt.model),
            parity=parity,
            details={"dtype": dtype_name, "backend": backend, "device": torch.cuda.get_device_name(), "plan": plan},
        )

    def load(self, artifact: Artifact, variant: str = "sparse", options: Mapping[str, str] | None = None, *, trust_model_code: bool = False) -> CudaRunner:
        self.require_available()
        model, dtype, spec = _load(artifact.read(variant), variant, trust_code=trust_model_code)
        return CudaRunner(model, dtype, spec)


def gemm_speedup(out_features: int, in_features: int, batch: int, *, dtype: torch.dtype = torch.float16, backend: str = "cusparselt", iterations: int = 100) -> dict:
    """Time one Linear layer dense vs 2:4 sparse on the GPU (CUDA events); used by benchmarks."""
    from ..bench.timing import measure
    from ..pattern import nm_mask

    weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype)
    weight = weight * nm_mask(weight.float().abs(), TWO_FOUR).to(weight.device, dtype)
    x = torch.randn(batch, in_features, device="cuda", dtype=dtype)
    dense = nn.Linear(in_features, out_features, bias=False).to("cuda", dtype)
    dense.weight = nn.Parameter(weight.clone(), requires_grad=False)
    sparse = nn.Linear(in_features, out_features, bias=False).to("cuda", dtype)
    sparse.weight = nn.Parameter(weight.clone(), requires_grad=False)
    sparsify_model_(nn.Sequential(sparse), {"0": {"sparse": True}}, backend=backend)
    with torch.inference_mode():
        d = measure(lambda: dense(x), batch=batch, warmup=20, iterations=iterations, synchronize=torch.cuda.synchronize)
        s = measure(lambda: sparse(x), batch=batch, warmup=20, iterations=iterations, synchronize=torch.cuda.synchronize)
    return {"shape": [out_features, in_features], "batch": batch, "dtype": str(dtype), "backend": backend, "dense_ms": d.p50_ms, "sparse_ms": s.p50_ms, "speedup": d.p50_ms / s.p50_ms}
