"""torch -> ONNX for a sparse checkpoint, with initializers named after the checkpoint's parameters.

Exporter: ``torch.onnx.export(dynamo=True)``. In torch 2.13 the TorchScript exporter is
deprecated ("will be removed"), while the dynamo exporter is the default, keeps parameter
FQNs as initializer names and gives a dynamic batch dimension through ``dynamic_shapes``.
Its graph optimizer may fold a weight's Transpose (Linear on 3-D input becomes MatMul with
an anonymous ``val_N`` = Wᵀ); such initializers are found by value and renamed
``<param>`` (same layout) or ``<param>.T`` (transposed), so per-layer reports line up.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..checkpoint import SparseCheckpoint
from ..errors import ExportError
from ..model_io import FlatIO, example_sizes, output_names_of, sample_feeds, to_tensors
from ..models import build_masked_model
from ..modelspec import Dim, InputSpec

DEFAULT_OPSET = 18


@dataclass
class OnnxExport:
    model: onnx.ModelProto
    names: dict[str, str]  # checkpoint parameter -> ONNX initializer
    input_names: list[str]
    output_names: list[str]
    torch_model: FlatIO  # the masked model, taking and returning flat tensors in graph order


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints progress lines and warnings; keep the CLI's output clean."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def dynamic_shapes_for(inputs: Sequence[InputSpec]) -> tuple[tuple[dict[int, Any], ...]]:
    """torch.export dims for every dynamic dim; dims sharing a label share one symbol."""
    symbols: dict[str, Any] = {}
    per_input = []
    for spec in inputs:
        axes = {}
        for axis, dim in enumerate(spec.shape):
            if not dim.dynamic:
                continue
            label = dim.label or f"{spec.name}_dim{axis}"
            if label not in symbols:
                symbols[label] = torch.export.Dim(_symbol(label), min=dim.min, max=dim.max)
            axes[axis] = symbols[label]
        per_input.append(axes)
    return (tuple(per_input),)  # FlatIO.forward(*args): one positional argument, the args tuple


def _symbol(label: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in label)


def torch_to_onnx(
    model: torch.nn.Module,
    example: Sequence[torch.Tensor] | torch.Tensor,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    inputs: Sequence[InputSpec] | None = None,
    output_names: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """The bare export call (also what the overhead benchmark times).

    ``model`` takes the example tensors positionally. ``inputs`` names them and gives their
    dynamic dims (without it: one input ``input`` with a dynamic batch, as before).
    """
    if isinstance(example, torch.Tensor):
        example = (example,)
    if inputs is None:
        from ..modelspec import legacy_input

        inputs = [legacy_input(tuple(example[0].shape))]
        model = FlatIO(model, inputs)
    flat = model if isinstance(model, FlatIO) else FlatIO(model, inputs)
    dynamic = dynamic_shapes_for(inputs) if dynamic_batch and any(d.dynamic for i in inputs for d in i.shape) else None
    with _quiet():
        try:
            program = torch.onnx.export(
                flat, tuple(example), dynamo=True, input_names=[i.name for i in inputs],
                output_names=list(output_names) if output_names else None,
                dynamic_shapes=dynamic, opset_version=opset, optimize=True, verbose=False,
            )  # fmt: skip
        except Exception as exc:  # the exporter raises many types; all mean "cannot export"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"torch.onnx.export failed: {first[:300]}", hint="the model uses an op or construct the ONNX exporter does not support, or an input's declared dims do not fit it") from None
    return program.model_proto


_WRAPPER_PREFIX = "model."  # FlatIO holds the user's model as .model


def _name_initializers(proto: onnx.ModelProto, params: dict[str, torch.Tensor]) -> dict[str, str]:
    """Map checkpoint parameters to initializers, renaming anonymous ones found by value."""
    graph = proto.graph
    renames: dict[str, str] = {}
    for init in graph.initializer:  # drop the wrapper's prefix: initializers carry checkpoint names
        if init.name.startswith(_WRAPPER_PREFIX) and init.name[len(_WRAPPER_PREFIX) :] not in {i.name for i in graph.initializer}:
            renames[init.name] = init.name[len(_WRAPPER_PREFIX) :]
    by_name = {renames.get(init.name, init.name): init for init in graph.initializer}
    mapping: dict[str, str] = {}
    anonymous = [init for name, init in by_name.items() if name not in params]
    for name, tensor in params.items():
        if name in by_name:
            mapping[name] = name
            continue
        array = tensor.detach().cpu().numpy()
        for init in anonymous:
            if init.name in renames or tuple(init.dims) not in (array.shape, array.T.shape if array.ndim == 2 else array.shape):
                continue
            value = numpy_helper.to_array(init)
            if value.shape == array.shape and np.array_equal(value, array):
                renames[init.name] = name
                break
            if array.ndim == 2 and value.shape == array.T.shape and np.array_equal(value, array.T):
                renames[init.name] = f"{name}.T"
                break
    olds = {init.name: init for init in graph.initializer}
    for old, new in renames.items():
        olds[old].name = new
    if renames:
        for node in _all_nodes(graph):
            for i, value in enumerate(node.input):
                if value in renames:
                    node.input[i] = renames[value]
        for value_info in graph.value_info:
            if value_info.name in renames:
                value_info.name = renames[value_info.name]
    for new in renames.values():
        if new.removesuffix(".T") in params:
            mapping[new.removesuffix(".T")] = new
    return mapping


def _all_nodes(graph: onnx.GraphProto):
    """Every node, including those of subgraphs (If/Loop bodies) that may read an initializer."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _all_nodes(sub)


def export_checkpoint(ckpt: SparseCheckpoint, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, trust_code: bool = False) -> OnnxExport:
    """Rebuild the masked model from the checkpoint and export it (dense initializers)."""
    model = build_masked_model(ckpt, trust_code=trust_code)  # refuses a checkpoint without a model spec
    if not ckpt.model.inputs:
        raise ExportError("checkpoint's model spec has no inputs", path=ckpt.source, hint="pass --input NAME:SHAPE[:DTYPE] or --input-shape")
    inputs = ckpt.model.inputs
    sizes = {i.name: example_sizes(i, dynamic=dynamic_batch) for i in inputs}
    flat = FlatIO(model, inputs).eval()
    example = to_tensors(sample_feeds(inputs, sizes=sizes, seed=0, where=ckpt.source), inputs)
    names_out = output_names_of(model, ckpt.model, sizes=sizes)
    if not dynamic_batch:
        inputs = [InputSpec(i.name, tuple(Dim.static(s) for s in sizes[i.name]), i.dtype, i.low, i.high, i.keyword) for i in inputs]
    proto = torch_to_onnx(flat, example, opset=opset, dynamic_batch=dynamic_batch, inputs=inputs, output_names=names_out)
    params = {name: value for name, value in model.state_dict().items() if name in ckpt.masks}
    names = _name_initializers(proto, params)
    graph_outputs = [o.name for o in proto.graph.output]
    return OnnxExport(proto, names, [i.name for i in inputs], graph_outputs, flat)
