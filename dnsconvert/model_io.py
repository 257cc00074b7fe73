"""A model's inputs and outputs as flat, named tensors: the one calling convention of export,
parity, runners and benchmarks.

Real models take several inputs (token ids and an attention mask, positionally or by
keyword) and return any pytree of tensors (a tuple, a dict, a ``transformers``
``ModelOutput``). :class:`FlatIO` wraps such a model so that it takes the inputs of its
:class:`~dnsconvert.modelspec.ModelSpec` in order and returns a flat tuple of tensors, whose
names (:func:`output_names`) come from the pytree's key paths; :func:`sample_feeds` makes
inputs of the declared dtypes, shapes and value ranges, bounded in size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import ModelSpecError
from .modelspec import InputSpec, ModelSpec

Feeds = dict[str, np.ndarray]

TORCH_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}  # fmt: skip
# Elements of one sample input, over all inputs: sample data is made in memory, so a spec read
# from a file must not ask for gigabytes (raise with DNSCONVERT_MAX_INPUT_ELEMENTS).
DEFAULT_MAX_INPUT_ELEMENTS = 1 << 26


def max_input_elements() -> int:
    from . import limits  # h11: every limit lives in limits.py (same variable, same default)

    return limits.get("input_elements")


def call_model(model: nn.Module, inputs: Sequence[InputSpec], tensors: Sequence[torch.Tensor]) -> Any:
    """``model`` called with ``tensors`` as its spec says: positional ones in order, then keywords."""
    positional = [t for t, spec in zip(tensors, inputs) if not spec.keyword]
    keyword = {spec.name: t for t, spec in zip(tensors, inputs) if spec.keyword}
    return model(*positional, **keyword)


class FlatIO(nn.Module):
    """``model`` called with the spec's inputs (positional, then keyword), returning a flat tuple."""

    def __init__(self, model: nn.Module, inputs: Sequence[InputSpec]):
        super().__init__()
        self.model = model
        self.inputs = tuple(inputs)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves = pytree.tree_leaves(call_model(self.model, self.inputs, args))
        return tuple(leaf for leaf in leaves if isinstance(leaf, torch.Tensor))


def output_names(output: Any) -> list[str]:
    """Names of a model output's tensor leaves, from their key paths: ``logits``,
    ``last_hidden_state``; ``output_0``, ``output_1`` for a tuple; ``output`` for one tensor."""
    if isinstance(output, torch.Tensor):
        return ["output"]
    paths, _ = pytree.tree_flatten_with_path(output)
    names = []
    for path, leaf in paths:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = []
        for key in path:
            for attr in ("key", "idx", "name"):
                if hasattr(key, attr):
                    parts.append(str(getattr(key, attr)))
                    break
        name = ".".join(parts) or "output"
        if name[0].isdigit():
            name = f"output_{name}"
        names.append(name)
    seen: dict[str, int] = {}
    unique = []
    for name in names:  # two leaves can print alike (e.g. a key "0" and index 0)
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return unique


@torch.no_grad()
def output_names_of(model: nn.Module, spec: ModelSpec, *, sizes: Mapping[str, Sequence[int]] | None = None) -> list[str]:
    """The names of ``model``'s outputs, from one forward pass on small sample inputs."""
    feeds = sample_feeds(spec.inputs, which="min", sizes=sizes, seed=0)
    was_training = model.training
    model.eval()
    try:
        return output_names(call_model(model, spec.inputs, to_tensors(feeds, spec.inputs)))
    finally:
        model.train(was_training)


def example_sizes(spec: InputSpec, *, dynamic: bool) -> tuple[int, ...]:
    """Sizes to trace an export with: opt, but at least 2 on dynamic dims (torch.export
    specialises a dimension of size 1 to a constant)."""
    return tuple(min(max(d.opt, 2), d.max) if dynamic and d.dynamic else d.opt for d in spec.shape)


def check_input_bounds(shapes: Mapping[str, Sequence[int]], *, where: Any = None) -> None:
    """Refuse sample inputs larger than the limit before allocating them."""
    total = sum(int(np.prod(shape, dtype=np.float64)) for shape in shapes.values())
    limit = max_input_elements()
    if total > limit:
        detail = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
        raise ModelSpecError(
            f"sample inputs would hold {total:,} elements ({detail}), over the limit of {limit:,}",
            path=where,
            hint="give smaller input shapes (--input / --input-shape), or raise DNSCONVERT_MAX_INPUT_ELEMENTS",
        )


def sample_feeds(
    inputs: Sequence[InputSpec],
    *,
    batch: int | None = None,
    which: str = "opt",
    sizes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 1234,
    where: Any = None,
) -> Feeds:
    """One set of inputs: each input at ``which`` sizes (``batch`` replacing the batch dim, or
    explicit ``sizes``), with values from its declared range; deterministic for a seed."""
    shapes = {i.name: tuple(sizes[i.name]) if sizes and i.name in sizes else i.sizes(which, batch=batch) for i in inputs}
    check_input_bounds(shapes, where=where)
    generator = torch.Generator().manual_seed(seed)
    feeds: Feeds = {}
    for spec in inputs:
        shape = shapes[spec.name]
        dtype = TORCH_DTYPES[spec.dtype]
        if spec.dtype == "bfloat16":
            raise ModelSpecError(f"input {spec.name!r}: bfloat16 inputs have no numpy type", hint="declare the input float32 and cast inside the model")
        if spec.dtype == "bool":
            value = torch.randint(0, 2, shape, generator=generator).bool()
        elif not spec.is_float:
            low, high = (0, 2) if spec.low is None else (int(spec.low), int(spec.high))
            value = torch.randint(low, max(high, low + 1), shape, generator=generator, dtype=torch.int64).to(dtype)
        elif spec.low is None:
            value = torch.randn(shape, generator=generator).to(dtype)
        else:
            value = (torch.rand(shape, generator=generator) * (spec.high - spec.low) + spec.low).to(dtype)
        feeds[spec.name] = value.numpy()
    return feeds


def parity_feeds(inputs: Sequence[InputSpec], batches: Sequence[int] = (1, 4), *, seed: int = 1234, where: Any = None) -> list[Feeds]:
    """Feeds that exercise the declared shapes: each batch size (clipped to the batch dim's
    range) at opt sizes, plus one at the min of every other dynamic dim."""
    batch_dims = [i.shape[i.batch_axis] for i in inputs if i.batch_axis is not None]
    out = []
    for n, batch in enumerate(batches):
        if batch_dims:
            batch = max(max(d.min for d in batch_dims), min(batch, min(d.max for d in batch_dims)))
            out.append(sample_feeds(inputs, batch=batch, seed=seed + n, where=where))
        elif n == 0:
            out.append(sample_feeds(inputs, seed=seed, where=where))
    others = any(d.dynamic for i in inputs for k, d in enumerate(i.shape) if k != i.batch_axis)
    if others:
        out.append(sample_feeds(inputs, which="min", seed=seed + len(batches), where=where))
    return out


def to_tensors(feeds: Mapping[str, np.ndarray], inputs: Sequence[InputSpec]) -> tuple[torch.Tensor, ...]:
    missing = [i.name for i in inputs if i.name not in feeds]
    if missing:
        raise ModelSpecError(f"missing input(s) {', '.join(missing)}", hint=f"the model takes {', '.join(i.name for i in inputs)}")
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[i.name])) for i in inputs)


class TorchRunner:
    """The PyTorch model as a Runner: named numpy inputs in, the flat outputs out (the parity reference)."""

    def __init__(self, model: nn.Module, spec: ModelSpec):
        self.flat = model if isinstance(model, FlatIO) else FlatIO(model, spec.inputs)
        self.flat.eval()
        self.inputs = spec.inputs

    @torch.inference_mode()
    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        outputs = self.flat(*to_tensors(feeds, self.inputs))
        return [o.detach().float().numpy() if o.dtype == torch.bfloat16 else o.detach().numpy() for o in outputs]

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        pass
