"""The ``torch-2to4-cuda`` target: 2:4 semi-structured sparse Linear layers through PyTorch
(cuSPARSELt or CUTLASS kernels) on NVIDIA GPUs with sparse tensor cores (sm80+), fp16/bf16.

Eligible layers: Linear weights whose mask is 2:4 along the input features and whose shape
meets the backend's minimums (from ``torch.sparse.semi_structured``'s constraints, e.g.
cuSPARSELt fp16: rows and columns multiples of 16; CUTLASS fp16: rows of 32, columns of 64).
Artifact: a safetensors file with the masked weights (in the chosen dtype), the model spec
and the list of converted layers; loading rebuilds the model on the GPU and converts those
layers with ``to_sparse_semi_structured``. The dense baseline is the same model, same dtype.

Which backend runs where (torch 2.13, checked in its sources): ``to_sparse_semi_structured``
picks the subclass from ``SparseSemiStructuredTensor._FORCE_CUTLASS`` alone, with no fallback.
The CUTLASS kernels (``aten/src/ATen/native/sparse/cuda/SparseSemiStructuredOps.cu``)
``TORCH_CHECK(dprops->major == 8, "... Supported only on GPUs with compute capability 8.x")``,
so CUTLASS is Ampere/Ada only: on Hopper (sm90) the conversion succeeds and the first forward
raises. cuSPARSELt needs a torch built with it (``torch.backends.cusparselt.is_available()``)
and sm80+. :func:`backend_support` states both rules as a pure function of the capability.

Runners replay each input shape from a CUDA graph (``-T cuda_graphs=1``, the default, for the
dense and the sparse variant alike): measured on an H200 with torch 2.11, cuSPARSELt's matmul
spends ~0.55 ms of host time per call setting up its plan, against ~0.03 ms of kernel time, so
eager 2:4 Linear layers lose to dense at every size; replayed, the kernels are what is timed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as schema

from ..artifact import Artifact, write_artifact
from ..errors import TargetError
from ..modelspec import ModelSpec
from ..pattern import TWO_FOUR, cannot_hold, violating_groups
from .base import Availability, BuildOptions, Target, option_bool

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
BACKENDS = ("cusparselt", "cutlass")
DEVICE = "cuda"  # where models are built and run (a module constant so CPU tests can run the flow)


def backend_support(backend: str, capability: tuple[int, int], *, cusparselt_available: bool) -> tuple[bool, str]:
    """Can ``backend`` run 2:4 kernels on a GPU of this compute capability? (answer, reason)."""
    major, minor = capability
    where = f"compute capability {major}.{minor}"
    if major < 8:
        return False, f"{where} has no sparse tensor cores (needs 8.0+)"
    if backend == "cutlass":
        if major != 8:  # PyTorch's CUTLASS 2:4 kernels check dprops->major == 8
            return False, f"PyTorch's CUTLASS 2:4 kernels run only on compute capability 8.x, this GPU is {major}.{minor}"
        return True, f"cutlass on {where}"
    if backend == "cusparselt":
        if not cusparselt_available:
            return False, "this torch was built without cuSPARSELt (torch.backends.cusparselt.is_available() is False)"
        return True, f"cusparselt on {where}"
    raise ValueError(f"unknown backend {backend!r}")


def _gpu_backends() -> dict[str, tuple[bool, str]]:
    capability = tuple(torch.cuda.get_device_capability())
    cusparselt = bool(torch.backends.cusparselt.is_available())
    return {name: backend_support(name, capability, cusparselt_available=cusparselt) for name in BACKENDS}




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


@schema(frozen=True, config=ConfigDict(extra="forbid"))
class LayerDecision:
    sparse: bool
    reason: str
    shape: tuple[int, ...]


@schema(frozen=True, config=ConfigDict(extra="forbid"))
class SemiStructuredDetails:
    """What the manifest of a torch-2to4-cuda artifact records (``Manifest.details``)."""

    dtype: str
    backend: str
    device: str
    plan: dict[str, LayerDecision]
    cuda_graphs: bool = True


def capture_graph(fn):
    """``fn`` captured in a CUDA graph; returns (replay, the outputs' static buffers).

    Why: PyTorch's cuSPARSELt path sets up its matmul plan on the host at every call
    (measured on an H200, torch 2.11: ~0.55 ms of host time per 2:4 Linear against ~0.03 ms
    of kernel time, the same for every shape; benchmarks/gpu_2to4_overhead.py). A graph
    replays the kernels without that set-up, so the GEMM's own speed is what is timed.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.inference_mode():
        for _ in range(3):  # warm-up outside the capture (lazy workspace allocations)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        outputs = fn()
    return graph.replay, outputs


class CudaRunner:
    """Runs the model on the GPU; with ``graphs``, each input shape is captured once in a CUDA
    graph and replayed (dense and sparse variants alike, so they compare like with like)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, spec: ModelSpec, *, graphs: bool = False):
        from ..model_io import FlatIO

        self.flat = FlatIO(model, spec.inputs).eval()
        self.inputs = spec.inputs
        self.dtype = dtype
        self.graphs = graphs and DEVICE == "cuda"
        self._captured: dict = {}  # input shapes/dtypes -> (static inputs, replay, static outputs)

    def prepare(self, feeds: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        """The inputs on the GPU: floating ones in the model's dtype, integer ones as they are."""
        out = []
        for spec in self.inputs:
            tensor = torch.from_numpy(np.ascontiguousarray(feeds[spec.name])).to(DEVICE)
            out.append(tensor.to(self.dtype) if tensor.is_floating_point() else tensor)
        return tuple(out)

    def run_device(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if not self.graphs:
            with torch.inference_mode():
                return self.flat(*tensors)
        key = tuple((tuple(t.shape), t.dtype) for t in tensors)
        if key not in self._captured:
            static = tuple(t.clone() for t in tensors)
            replay, outputs = capture_graph(lambda: self.flat(*static))
            self._captured[key] = (static, replay, outputs)
        static, replay, outputs = self._captured[key]
        for buffer, tensor in zip(static, tensors):
            if buffer.data_ptr() != tensor.data_ptr():
                buffer.copy_(tensor)
        replay()
        return outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in self.run_device(self.prepare(feeds))]

    def synchronize(self) -> None:
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    def close(self) -> None:
        self.flat = None
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else DEVICE


def _load(data: bytes, variant: str, *, trust_code: bool = False) -> tuple[nn.Module, torch.dtype, ModelSpec]:
    from safetensors.torch import load

    from ..loading import safetensors_metadata
    from ..models import build_model, load_weights_

    meta = json.loads(safetensors_metadata(data, path=MODEL_FILE)[META_KEY])
    state = load(data)
    dtype = DTYPES[meta["dtype"]]
    spec = ModelSpec.from_json(meta["model"])
    model = build_model(spec, trust_code=trust_code)
    load_weights_(model, state, where=MODEL_FILE)
    model = model.to(DEVICE, dtype).eval()
    if variant == "sparse":
        sparsify_model_(model, meta["plan"], backend=meta["backend"])
    return model, dtype, spec


class TorchSemiStructuredTarget(Target):
    name: ClassVar[str] = "torch-2to4-cuda"
    description: ClassVar[str] = "PyTorch 2:4 semi-structured sparse Linear layers (cuSPARSELt/CUTLASS), CUDA sm80+"
    exploits_sparsity: ClassVar[str] = "yes: 2:4 sparse tensor cores for eligible Linear layers"
    option_help: ClassVar[dict[str, str]] = {
        "dtype": "fp16 (default) or bf16",
        "backend": "auto (default: cusparselt where it runs, else cutlass), cusparselt, or cutlass (compute capability 8.x only)",
        "cuda_graphs": "1 (default): replay each input shape from a CUDA graph (removes cuSPARSELt's per-call host set-up); 0: eager",
    }

    def availability(self) -> Availability:
        if not torch.cuda.is_available():
            return Availability(False, "no CUDA GPU (2:4 sparse kernels need an NVIDIA GPU with compute capability 8.0+)")
        try:
            from torch.sparse import to_sparse_semi_structured  # noqa: F401
        except ImportError:
            return Availability(False, "this torch has no torch.sparse.to_sparse_semi_structured")
        backends = _gpu_backends()
        usable = [name for name, (ok, _) in backends.items() if ok]
        summary = "; ".join(f"{name}: {'yes' if ok else 'no'} ({why})" for name, (ok, why) in backends.items())
        return Availability(bool(usable), f"{torch.cuda.get_device_name()}: {summary}")

    def _settings(self, options: Mapping[str, str]) -> tuple[str, torch.dtype, str]:
        self.check_options(options)
        dtype_name = options.get("dtype", "fp16")
        backend = options.get("backend", "auto")
        if dtype_name not in DTYPES:
            raise TargetError(f"dtype={dtype_name!r} is not fp16 or bf16")
        if backend not in ("auto", *BACKENDS):
            raise TargetError(f"backend={backend!r} is not auto, cusparselt or cutlass")
        backends = _gpu_backends()
        if backend == "auto":
            backend = next((name for name in BACKENDS if backends[name][0]), BACKENDS[0])
        ok, reason = backends[backend]
        if not ok:
            raise TargetError(f"backend {backend} cannot run on {torch.cuda.get_device_name()}: {reason}", hint="choose -T backend=auto")
        return dtype_name, DTYPES[dtype_name], backend

    def build(self, ckpt, output: Path, options: BuildOptions) -> Artifact:
        from safetensors.torch import save

        from ..export.parity import compare
        from ..model_io import output_names_of, parity_feeds
        from ..models import build_masked_model
        from ..validate import ensure_usable

        self.require_available()
        dtype_name, dtype, backend = self._settings(options.extra)
        graphs = option_bool(options.extra, "cuda_graphs", True)
        ensure_usable(ckpt)
        model = build_masked_model(ckpt, trust_code=options.trust_model_code)
        plan = plan_model(model, backend=backend, dtype=dtype)
        if not any(d["sparse"] for d in plan.values()):
            reasons = "; ".join(f"{n}: {d['reason']}" for n, d in plan.items())
            raise TargetError(f"no Linear layer is eligible for 2:4 kernels ({reasons})", hint="project the checkpoint first: dnsconvert project --nm 2:4")
        state = {k: v.detach().to(dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in model.state_dict().items()}
        meta = {"model": ckpt.model.to_json(), "dtype": dtype_name, "backend": backend, "plan": plan}
        data = save(state, metadata={META_KEY: json.dumps(meta)})
        # fp16/bf16 results differ from fp32 by rounding; compare like with like, same dtype
        atol, rtol = max(options.atol, 1e-2), max(options.rtol, 1e-2)
        try:
            dense, _, spec = _load(data, "dense", trust_code=options.trust_model_code)
            sparse, _, _ = _load(data, "sparse", trust_code=options.trust_model_code)
            runners = [CudaRunner(m, dtype, spec, graphs=graphs) for m in (dense, sparse)]
            parity = compare(runners[0].run, runners[1].run, parity_feeds(spec.inputs, (1, 64)), atol=atol, rtol=rtol)
        except RuntimeError as exc:  # the kernels refuse this GPU/shape/build: a target limit, not a bug
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TargetError(f"PyTorch's {backend} 2:4 kernels failed on {_device_name()}: {first[:300]}; nothing was written", hint="try -T backend=auto") from None
        return write_artifact(
            output,
            ckpt=ckpt,
            files={"sparse": (MODEL_FILE, data)},
            aliases={"dense": "sparse"},  # one file: the dense variant skips the conversion
            target=self.name,
            format="safetensors+2:4",
            outputs=output_names_of(model, ckpt.model),
            parity=parity,
            details={"dtype": dtype_name, "backend": backend, "device": _device_name(), "plan": plan, "cuda_graphs": graphs},
        )

    def load(self, artifact: Artifact, variant: str = "sparse", options: Mapping[str, str] | None = None, *, trust_model_code: bool = False) -> CudaRunner:
        self.require_available()
        details = artifact.manifest.details_as(SemiStructuredDetails)
        model, dtype, spec = _load(artifact.read(variant), variant, trust_code=trust_model_code)
        return CudaRunner(model, dtype, spec, graphs=details.cuda_graphs)


def gemm_speedup(out_features: int, in_features: int, batch: int, *, dtype: torch.dtype = torch.float16, backend: str = "cusparselt", iterations: int = 100) -> dict:
    """Time one Linear layer dense vs 2:4 sparse on the GPU (CUDA-synchronised); used by benchmarks.

    Raises TargetError (not RuntimeError) when the backend's kernels refuse this GPU or shape.
    """
    from ..timing import measure
    from ..pattern import nm_mask

    weight = torch.randn(out_features, in_features, device=DEVICE, dtype=dtype)
    weight = weight * nm_mask(weight.float().abs(), TWO_FOUR).to(weight.device, dtype)
    x = torch.randn(batch, in_features, device=DEVICE, dtype=dtype)
    dense = nn.Linear(in_features, out_features, bias=False).to(DEVICE, dtype)
    dense.weight = nn.Parameter(weight.clone(), requires_grad=False)
    sparse = nn.Linear(in_features, out_features, bias=False).to(DEVICE, dtype)
    sparse.weight = nn.Parameter(weight.clone(), requires_grad=False)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    try:
        sparsify_model_(nn.Sequential(sparse), {"0": {"sparse": True}}, backend=backend)
        with torch.inference_mode():
            max_diff = float((dense(x).float() - sparse(x).float()).abs().max())
            d = measure(lambda: dense(x), batch=batch, warmup=20, iterations=iterations, synchronize=sync)
            s = measure(lambda: sparse(x), batch=batch, warmup=20, iterations=iterations, synchronize=sync)
        graphed = {}
        if DEVICE == "cuda":  # the same calls replayed from CUDA graphs: the kernels without host set-up
            for name, layer in (("dense", dense), ("sparse", sparse)):
                replay, _ = capture_graph(lambda layer=layer: layer(x))
                graphed[name] = measure(replay, batch=batch, warmup=20, iterations=iterations, synchronize=sync)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TargetError(f"{backend} 2:4 GEMM {out_features}x{in_features} failed: {first[:300]}") from None
    return {
        "shape": [out_features, in_features], "batch": batch, "dtype": str(dtype).removeprefix("torch."), "backend": backend,
        "dense_p50_ms": d.p50_ms, "dense_p90_ms": d.p90_ms, "sparse_p50_ms": s.p50_ms, "sparse_p90_ms": s.p90_ms,
        "speedup": d.p50_ms / s.p50_ms, "max_abs_diff": max_diff, "iterations": iterations,
        **({"dense_graph_p50_ms": graphed["dense"].p50_ms, "sparse_graph_p50_ms": graphed["sparse"].p50_ms,
            "speedup_graphs": graphed["dense"].p50_ms / graphed["sparse"].p50_ms} if graphed else {}),
    }  # fmt: skip
