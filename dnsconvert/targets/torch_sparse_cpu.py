"""The ``torch-sparse-cpu`` target: unstructured-sparse Linear layers on CSR kernels (PyTorch CPU).

DNS leaves Linear layers 95-99% sparse; a CSR matrix times a dense batch (MKL's sparse
BLAS in PyTorch's CPU build) then does a small fraction of the dense work. Each Linear is
planned at build time: ``plan=auto`` times dense vs CSR for that layer's shape and sparsity
at the requested batch sizes and keeps the faster; ``plan=sparsity`` uses CSR above
``min_sparsity``. Convolutions stay dense: PyTorch has no sparse convolution kernel on CPU,
and im2col + CSR would copy the activation K·K times for layers that are small in LeNets.

Artifact: one safetensors file — dense tensors under ``dense/<name>``, CSR layers as
``csr/<name>/{crow_indices,col_indices,values}`` — with the model spec and the plan in its
metadata. The dense baseline is the same model with every layer dense, on the same runtime.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_path, write_json_atomic
from ..checkpoint import ModelSpec
from ..errors import TargetError
from ..models import build_masked_model, build_model, load_weights_
from .base import Artifact, BuildOptions, Target, option_number

META_KEY = "dnsconvert.torch_sparse_cpu"
# CSR support is marked beta in PyTorch; the kernels used here (CSR x dense mm) are stable.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


class CsrLinear(nn.Module):
    """y = x Wᵀ + b with W stored as CSR: computed as (W · xᵀ)ᵀ, xᵀ made contiguous for MKL."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.to_sparse_csr(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @classmethod
    def from_csr(cls, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor | None) -> CsrLinear:
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = shape
        layer.weight = nn.Parameter(torch.sparse_csr_tensor(crow, col, values, size=shape), requires_grad=False)
        layer.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight, flat.t().contiguous()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        return self.weight.to_dense()


def _time(fn, reps: int = 30) -> float:
    for _ in range(3):
        fn()
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - started) / reps


@torch.inference_mode()
def plan_layer(weight: torch.Tensor, bias: torch.Tensor | None, batches: list[int], mode: str, min_sparsity: float) -> dict:
    """Decide dense vs CSR for one Linear layer; returns the decision with its evidence."""
    sparsity = 1.0 - float((weight != 0).float().mean())
    if mode == "sparsity":
        use = sparsity >= min_sparsity
        return {"kernel": "csr" if use else "dense", "sparsity": sparsity, "reason": f"sparsity {sparsity:.3f} {'>=' if use else '<'} {min_sparsity}"}
    csr = CsrLinear(weight, bias)
    timings = {}
    for batch in batches:
        x = torch.randn(batch, weight.shape[1])
        timings[batch] = {"dense_ms": 1e3 * _time(lambda: nn.functional.linear(x, weight, bias)), "csr_ms": 1e3 * _time(lambda: csr(x))}
    dense_total = sum(t["dense_ms"] for t in timings.values())
    csr_total = sum(t["csr_ms"] for t in timings.values())
    use = csr_total < dense_total
    return {"kernel": "csr" if use else "dense", "sparsity": sparsity, "reason": f"timed: csr {csr_total:.3f} ms vs dense {dense_total:.3f} ms over batches {batches}", "timings_ms": timings}


def _linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class TorchSparseRunner:
    def __init__(self, model: nn.Module, threads: int = 0):
        self.model = model.eval()
        if threads:
            torch.set_num_threads(threads)

    @torch.inference_mode()
    def run(self, x: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(x)).numpy()

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        pass


def load_sparse_model(path: Path, *, dense: bool = False, trust_code: bool = False) -> nn.Module:
    """Rebuild the planned model from a torch-sparse-cpu artifact (``dense`` densifies CSR layers)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})[META_KEY])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise TargetError(f"not a torch-sparse-cpu artifact ({type(exc).__name__}: {exc})", path=path) from None
    model = build_model(ModelSpec.from_json(meta["model"]), trust_code=trust_code)
    dense_state = {key.removeprefix("dense/"): value for key, value in tensors.items() if key.startswith("dense/")}
    for layer in meta["csr_layers"]:
        crow, col, values = (tensors[f"csr/{layer['name']}/{part}"] for part in ("crow_indices", "col_indices", "values"))
        weight = torch.sparse_csr_tensor(crow, col, values, size=tuple(layer["shape"]), check_invariants=True).to_dense()  # never trust a file's indices
        dense_state[f"{layer['name']}.weight"] = weight
    load_weights_(model, dense_state, where=str(path))
    if not dense:
        for layer in meta["csr_layers"]:
            module = model.get_submodule(layer["name"])
            _replace(model, layer["name"], CsrLinear(module.weight.detach(), module.bias.detach() if module.bias is not None else None))
    return model.eval()


class TorchSparseCpuTarget(Target):
    name: ClassVar[str] = "torch-sparse-cpu"
    description: ClassVar[str] = "PyTorch CPU, unstructured-sparse Linear layers on CSR kernels, planned per layer"
    suffix: ClassVar[str] = ".safetensors"
    exploits_sparsity: ClassVar[str] = "yes: CSR matmul for Linear layers where it is faster (convs dense)"
    option_help: ClassVar[dict[str, str]] = {
        "plan": "auto (time dense vs CSR per layer, default) or sparsity",
        "min_sparsity": "with plan=sparsity: use CSR at or above this sparsity (default 0.7)",
        "batches": "batch sizes the auto plan times, comma-separated (default 1,64)",
        "threads": "torch threads for planning, parity and bench (default: torch's)",
    }

    def build(self, ckpt, output: Path, options: BuildOptions) -> Artifact:
        from ..export.manifest import base_manifest, file_record, manifest_path_for
        from ..export.parity import compare, parity_inputs, torch_runner
        from ..validate import ensure_usable

        extra = options.extra
        self.check_options(extra)
        mode = extra.get("plan", "auto")
        if mode not in ("auto", "sparsity"):
            raise TargetError(f"plan={mode!r} is not auto or sparsity")
        threads = option_number(extra, "threads", 0, int)
        if threads:
            torch.set_num_threads(threads)
        try:
            batches = [int(b) for b in extra.get("batches", "1,64").split(",")]
        except ValueError:
            raise TargetError(f"batches={extra['batches']!r} is not a comma-separated list of integers") from None
        ensure_usable(ckpt)
        reference = build_masked_model(ckpt, trust_code=options.trust_model_code)
        sparse_model = build_masked_model(ckpt, trust_code=options.trust_model_code)
        tensors: dict[str, torch.Tensor] = {}
        plan, csr_layers = {}, []
        linears = _linear_layers(sparse_model)
        for name, module in linears.items():
            decision = plan_layer(module.weight.detach(), module.bias, batches, mode, option_number(extra, "min_sparsity", 0.7))
            plan[name] = decision
            if decision["kernel"] == "csr":
                layer = CsrLinear(module.weight.detach(), module.bias.detach() if module.bias is not None else None)
                _replace(sparse_model, name, layer)
                csr = layer.weight.detach()
                tensors[f"csr/{name}/crow_indices"] = csr.crow_indices().contiguous()
                tensors[f"csr/{name}/col_indices"] = csr.col_indices().contiguous()
                tensors[f"csr/{name}/values"] = csr.values().contiguous()
                csr_layers.append({"name": name, "shape": list(module.weight.shape)})
        csr_names = {f"{layer['name']}.weight" for layer in csr_layers}
        for key, value in reference.state_dict().items():
            if key not in csr_names:
                tensors[f"dense/{key}"] = value.detach().contiguous().clone()
        inputs = parity_inputs(ckpt.model.input_shape, (1, 4))
        parity = compare(torch_runner(reference), TorchSparseRunner(sparse_model).run, inputs, atol=options.atol, rtol=options.rtol)
        from ..errors import GateFailed

        if not parity.passed:
            raise GateFailed(f"parity failed: max |Δ| {parity.max_abs:.3g} exceeds atol {options.atol:g}; nothing was written")
        from safetensors.torch import save_file

        meta = {"model": ckpt.model.to_json(), "csr_layers": csr_layers, "plan": plan}
        with atomic_path(output) as tmp:
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
        manifest = base_manifest(self.name, ckpt)
        manifest.update({"format": "safetensors+csr", "plan": plan, "parity": parity.to_json(), "files": {"sparse": file_record(output), "dense": file_record(output)}})
        manifest_path = manifest_path_for(output)
        write_json_atomic(manifest_path, manifest)
        return Artifact(self.name, {"sparse": output, "dense": output}, manifest_path, manifest)

    def load(self, artifact: Artifact, variant: str = "sparse", options: Mapping[str, str] | None = None) -> TorchSparseRunner:
        threads = option_number(options or {}, "threads", 0, int)
        model = load_sparse_model(artifact.files[variant], dense=variant == "dense", trust_code=False)
        return TorchSparseRunner(model, threads)
