"""The ``torch-sparse-cpu`` target: PyTorch CPU models whose sparse Linear layers run on CSR kernels.

DNS leaves Linear layers 95-99% sparse; a CSR matrix times a dense batch then does a small
fraction of the dense work. Each Linear is planned at build time, separately for small
batches (latency) and large ones (throughput): ``plan=auto`` times the dense layer, torch's
CSR matmul (MKL, multi-threaded) and dnsconvert's compiled CSR kernel (:mod:`.csr_kernels`,
no dispatch overhead) at the requested batch sizes and keeps the fastest per regime;
``plan=sparsity`` uses the compiled kernel above ``min_sparsity``. When the whole model is a chain of Linear
layers and element-wise activations (LeNet-300-100, ``mlp``), the runner executes it without
PyTorch's per-module overhead: consecutive sparse layers become one compiled call.
Convolutions stay dense: PyTorch has no sparse convolution kernel on CPU, and im2col + CSR
would copy the activation K·K times for layers that are small in LeNets.

Artifact: one safetensors file (``model.safetensors`` in the artifact folder) — dense tensors under ``dense/<name>``, CSR layers as
``csr/<name>/{crow_indices,col_indices,values}`` — with the model spec and the plan in its
metadata. The dense baseline is the same model with every layer dense, on the same runtime.
"""

from __future__ import annotations

import json
import warnings
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
from ..model_io import TorchRunner, output_names_of
from ..models import build_masked_model, build_model, load_weights_
from ..modelspec import ModelSpec
from ..sparse_checks import check_csr_artifact
from .base import BuildOptions, Target, option_number

META_KEY = "dnsconvert.torch_sparse_cpu"
MODEL_FILE = "model.safetensors"
# CSR support is marked beta in PyTorch; the kernels used here (CSR x dense mm) are stable.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


@schema(frozen=True, config=ConfigDict(extra="forbid"))
class LayerPlan:
    """One Linear layer's kernel per batch regime, and why."""

    kernels: dict[str, str]
    sparsity: float
    reason: str
    timings_ms: dict[str, dict[str, float]] | None = None


@schema(frozen=True, config=ConfigDict(extra="forbid"))
class CsrDetails:
    """What the manifest of a torch-sparse-cpu artifact records (``Manifest.details``)."""

    plan: dict[str, LayerPlan]
    runner: str


SMALL_BATCH = 8  # plans are made per batch regime: <= this (latency) and above (throughput)
KERNELS = ("dense", "torch", "compiled")


def batch_regime(batch: int) -> str:
    return "small" if batch <= SMALL_BATCH else "large"


class PlannedLinear(nn.Module):
    """A Linear layer with one kernel per batch regime: ``dense`` (BLAS), ``torch`` (torch.sparse.mm
    on CSR, MKL, multi-threaded) or ``compiled`` (:mod:`.csr_kernels`, one thread, no dispatch)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernels: Mapping[str, str]):
        super().__init__()
        self.kernels = dict(kernels)
        self.out_features, self.in_features = weight.shape
        weight = weight.detach()
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.csr = nn.Parameter(weight.to_sparse_csr(), requires_grad=False)
        self.dense = nn.Parameter(weight.clone(), requires_grad=False) if "dense" in self.kernels.values() else None
        self._chain = None

    def csr_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        w = self.csr.detach()
        bias = self.bias.detach().numpy() if self.bias is not None else np.zeros(self.out_features, np.float32)
        return w.crow_indices().numpy(), w.col_indices().numpy(), w.values().numpy(), bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        kernel = self.kernels[batch_regime(flat.shape[0])]
        if kernel == "dense":
            y = nn.functional.linear(flat, self.dense, self.bias)
        elif kernel == "compiled":
            from .csr_kernels import CsrChain

            if self._chain is None:
                self._chain = CsrChain([(*self.csr_arrays(), "identity")])
            y = torch.from_numpy(self._chain(flat.t().contiguous().numpy())).t()
        else:
            y = torch.sparse.mm(self.csr, flat.t().contiguous()).t()
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*lead, self.out_features)


@torch.inference_mode()
def plan_layer(weight: torch.Tensor, bias: torch.Tensor | None, batches: list[int], mode: str, min_sparsity: float) -> dict:
    """Choose each batch regime's kernel for one Linear layer; returns the decision with its evidence."""
    from ..bench.timing import measure

    sparsity = 1.0 - float((weight != 0).float().mean())
    if mode == "sparsity":
        kernel = "compiled" if sparsity >= min_sparsity else "dense"
        return {"kernels": {"small": kernel, "large": kernel}, "sparsity": sparsity, "reason": f"sparsity {sparsity:.3f} {'>=' if kernel != 'dense' else '<'} {min_sparsity}"}
    candidates = {name: PlannedLinear(weight, bias, {"small": name, "large": name}) for name in KERNELS}
    timings: dict[str, dict[str, float]] = {}
    for batch in batches:
        x = torch.randn(batch, weight.shape[1])
        timings[str(batch)] = {name: measure(lambda layer=layer: layer(x), batch=batch, warmup=3, iterations=30).mean_ms for name, layer in candidates.items()}
    kernels = {}
    for regime in ("small", "large"):
        timed = [t for b, t in timings.items() if batch_regime(int(b)) == regime] or list(timings.values())
        kernels[regime] = min(KERNELS, key=lambda name: sum(t[name] for t in timed))
    return {"kernels": kernels, "sparsity": sparsity, "reason": f"fastest when timed at batches {batches}", "timings_ms": timings}


def _linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


_ELEMENTWISE = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.Identity: "identity", nn.Dropout: "identity"}


def _activation_name(module: nn.Module) -> str | None:
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else None
    for cls, name in _ELEMENTWISE.items():
        if type(module) is cls:
            return name
    return None


def compile_chain(model: nn.Module, regime: str):
    """A straight chain [Flatten] (Linear | PlannedLinear | activation)* as steps on [features, batch]
    numpy arrays for one batch regime, or None if the model is anything else (PyTorch runs it)."""
    from .csr_kernels import CsrChain

    if not isinstance(model, nn.Sequential):
        return None
    modules = list(model)
    if modules and isinstance(modules[0], nn.Flatten) and modules[0].start_dim == 1:
        modules = modules[1:]
    steps: list = []
    pending: list = []  # compiled sparse layers waiting to be fused: [indptr, indices, data, bias, activation]
    last_was_compiled = False

    def flush() -> None:
        if pending:
            steps.append(CsrChain([tuple(layer) for layer in pending]))
            pending.clear()

    for module in modules:
        act = _activation_name(module)
        kernel = module.kernels[regime] if isinstance(module, PlannedLinear) else "dense"
        if isinstance(module, PlannedLinear) and kernel == "compiled":
            pending.append([*module.csr_arrays(), "identity"])
            last_was_compiled = True
        elif isinstance(module, PlannedLinear) and kernel == "torch":
            flush()
            weight, bias = module.csr.detach(), module.csr_arrays()[3][:, None].copy()
            steps.append(lambda h, w=weight, b=bias: torch.sparse.mm(w, torch.from_numpy(h)).numpy() + b)
            last_was_compiled = False
        elif isinstance(module, (nn.Linear, PlannedLinear)):
            flush()
            weight = module.dense if isinstance(module, PlannedLinear) else module.weight
            bias = module.bias.detach() if module.bias is not None else torch.zeros(weight.shape[0])
            w, b = weight.detach().numpy().copy(), bias.numpy()[:, None].copy()
            steps.append(lambda h, w=w, b=b: w @ h + b)
            last_was_compiled = False
        elif act is not None:
            if pending and last_was_compiled and pending[-1][4] == "identity":
                pending[-1][4] = act  # fused into the kernel's epilogue
            else:
                flush()
                steps.append(_numpy_activation(act))
            last_was_compiled = False
        else:
            return None
    flush()
    return steps


def _numpy_activation(name: str):
    if name == "relu":
        return lambda h: np.maximum(h, 0.0, out=h)
    if name == "identity":
        return lambda h: h
    fn = {"gelu": nn.functional.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[name]
    return lambda h: fn(torch.from_numpy(h)).numpy()


class TorchSparseRunner:
    """Runs the planned model: as a compiled chain when it is one, else through PyTorch."""

    def __init__(self, model: nn.Module, spec: ModelSpec, threads: int = 0, *, fuse: bool = True):
        self.model = model.eval()
        self.torch_runner = TorchRunner(self.model, spec)
        self.input_name = spec.inputs[0].name
        if threads:
            torch.set_num_threads(threads)
            try:
                import numba

                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            except ImportError:
                pass
        planned = fuse and any(isinstance(m, PlannedLinear) for m in self.model.modules())
        self.chains = {regime: compile_chain(self.model, regime) for regime in ("small", "large")} if planned else {}
        single_float_input = len(spec.inputs) == 1 and spec.inputs[0].dtype == "float32"
        chained = self.chains and all(c is not None for c in self.chains.values())
        self.mode = "compiled chain" if chained and single_float_input else "pytorch modules"

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if self.mode == "compiled chain":
            x = feeds[self.input_name]
            h = np.ascontiguousarray(x.reshape(x.shape[0], -1).T, dtype=np.float32)
            for step in self.chains[batch_regime(x.shape[0])]:
                h = step(h)
            return [h.T]
        return self.torch_runner.run(feeds)

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        pass


def load_sparse_model(data: bytes, *, dense: bool = False, trust_code: bool = False, where: Path | None = None) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the planned model from a torch-sparse-cpu artifact's file (``dense`` densifies
    CSR layers); returns the model and its spec."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
        meta = json.loads(_metadata(data)[META_KEY])
        spec = ModelSpec.from_json(meta["model"])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
        raise TargetError(f"not a torch-sparse-cpu artifact ({type(exc).__name__}: {exc})", path=where) from None
    check_csr_artifact(meta, tensors, where)  # h11 (issue 11): types, CSR invariants, dense size, model size, before allocating
    model = build_model(spec, trust_code=trust_code)
    dense_state = {key.removeprefix("dense/"): value for key, value in tensors.items() if key.startswith("dense/")}
    for layer in meta["csr_layers"]:
        crow, col, values = (tensors[f"csr/{layer['name']}/{part}"] for part in ("crow_indices", "col_indices", "values"))
        try:  # never trust a file's indices
            weight = torch.sparse_csr_tensor(crow, col, values, size=tuple(layer["shape"]), check_invariants=True).to_dense()
        except RuntimeError as exc:
            raise TargetError(f"CSR layer {layer['name']!r} is malformed ({str(exc).splitlines()[0][:200]})", path=where, hint="re-export it with dnsconvert export") from None
        dense_state[f"{layer['name']}.weight"] = weight
    load_weights_(model, dense_state, where=str(where))
    if not dense:
        for layer in meta["csr_layers"]:
            module = model.get_submodule(layer["name"])
            _replace(model, layer["name"], PlannedLinear(module.weight.detach(), module.bias, layer["kernels"]))
    return model.eval(), spec


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file held in memory."""
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return header.get("__metadata__") or {}


class TorchSparseCpuTarget(Target):
    name: ClassVar[str] = "torch-sparse-cpu"
    description: ClassVar[str] = "PyTorch CPU, unstructured-sparse Linear layers on CSR kernels, planned per layer"
    exploits_sparsity: ClassVar[str] = "yes: CSR matmul for Linear layers where it is faster (convs dense)"
    option_help: ClassVar[dict[str, str]] = {
        "plan": "auto (time dense vs CSR per layer, default) or sparsity",
        "min_sparsity": "with plan=sparsity: use CSR at or above this sparsity (default 0.7)",
        "batches": f"batch sizes the auto plan times, comma-separated (default 1,64); <= {SMALL_BATCH} plans the small-batch regime",
        "threads": "torch threads for planning, parity and bench (default: torch's)",
    }

    def build(self, ckpt, output: Path, options: BuildOptions) -> Artifact:
        from ..export.parity import compare
        from ..model_io import parity_feeds
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
            if set(decision["kernels"].values()) != {"dense"}:
                layer = PlannedLinear(module.weight.detach(), module.bias, decision["kernels"])
                _replace(sparse_model, name, layer)
                csr = layer.csr.detach()
                tensors[f"csr/{name}/crow_indices"] = csr.crow_indices().contiguous()
                tensors[f"csr/{name}/col_indices"] = csr.col_indices().contiguous()
                tensors[f"csr/{name}/values"] = csr.values().contiguous()
                csr_layers.append({"name": name, "shape": list(module.weight.shape), "kernels": decision["kernels"]})
        csr_names = {f"{layer['name']}.weight" for layer in csr_layers}
        for key, value in reference.state_dict().items():
            if key not in csr_names:
                tensors[f"dense/{key}"] = value.detach().contiguous().clone()
        feeds = parity_feeds(ckpt.model.inputs, (1, 4), where=ckpt.source)
        reference_runner = TorchRunner(reference, ckpt.model)
        sparse_runner = TorchSparseRunner(sparse_model, ckpt.model)
        parity = compare(reference_runner.run, sparse_runner.run, feeds, atol=options.atol, rtol=options.rtol)
        from safetensors.torch import save

        meta = {"model": ckpt.model.to_json(), "csr_layers": csr_layers, "plan": plan}
        return write_artifact(
            output,
            ckpt=ckpt,
            files={"sparse": (MODEL_FILE, save(tensors, metadata={META_KEY: json.dumps(meta)}))},
            aliases={"dense": "sparse"},  # one file: the dense variant densifies its CSR layers
            target=self.name,
            format="safetensors+csr",
            outputs=output_names_of(reference, ckpt.model),
            parity=parity,
            details={"plan": plan, "runner": sparse_runner.mode},
        )

    def load(self, artifact: Artifact, variant: str = "sparse", options: Mapping[str, str] | None = None, *, trust_model_code: bool = False) -> TorchSparseRunner:
        threads = option_number(options or {}, "threads", 0, int)
        model, spec = load_sparse_model(artifact.read(variant), dense=variant == "dense", trust_code=trust_model_code, where=artifact.files[variant])
        # the dense baseline runs as PyTorch runs any model; the sparse one may be a compiled chain
        return TorchSparseRunner(model, spec, threads, fuse=variant == "sparse")
