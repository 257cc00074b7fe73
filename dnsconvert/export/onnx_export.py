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
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..checkpoint import SparseCheckpoint
from ..errors import ExportError
from ..limits import check_input
from ..models import build_masked_model

DEFAULT_OPSET = 18


@dataclass
class OnnxExport:
    model: onnx.ModelProto
    names: dict[str, str]  # checkpoint parameter -> ONNX initializer
    example_input: torch.Tensor
    torch_model: torch.nn.Module


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


def torch_to_onnx(model: torch.nn.Module, example: torch.Tensor, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True) -> onnx.ModelProto:
    """The bare export call (also what the overhead benchmark times)."""
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None
    with _quiet():
        try:
            program = torch.onnx.export(
                model, (example,), dynamo=True, input_names=["input"], output_names=["output"],
                dynamic_shapes=dynamic_shapes, opset_version=opset, optimize=True, verbose=False,
            )  # fmt: skip
        except Exception as exc:  # the exporter raises many types; all mean "cannot export"
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"torch.onnx.export failed: {first[:300]}", hint="the model uses an op or construct the ONNX exporter does not support") from None
    return program.model_proto


def _name_initializers(proto: onnx.ModelProto, params: dict[str, torch.Tensor]) -> dict[str, str]:
    """Map checkpoint parameters to initializers, renaming anonymous ones found by value."""
    graph = proto.graph
    by_name = {init.name: init for init in graph.initializer}
    mapping: dict[str, str] = {}
    anonymous = [init for init in graph.initializer if init.name not in params]
    renames: dict[str, str] = {}
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
    for old, new in renames.items():
        by_name[old].name = new
        for node in graph.node:
            for i, value in enumerate(node.input):
                if value == old:
                    node.input[i] = new
        mapping[new.removesuffix(".T")] = new
    return mapping


def export_checkpoint(ckpt: SparseCheckpoint, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = True, trust_code: bool = False) -> OnnxExport:
    """Rebuild the masked model from the checkpoint and export it (dense initializers)."""
    shape = tuple(ckpt.model.input_shape) if ckpt.model is not None else ()
    if ckpt.model is not None and not shape:
        raise ExportError("checkpoint's model spec has no input shape", path=ckpt.source, hint="pass --input-shape")
    if shape:  # h11 (issue 11): bound the example input before building anything
        check_input((2, *shape[1:]) if dynamic_batch else shape, "the example input", path=ckpt.source)
    model = build_masked_model(ckpt, trust_code=trust_code)
    # batch 2 for the example: torch.export specialises a size-1 dimension to a constant
    example = torch.randn((2, *shape[1:]) if dynamic_batch else shape, generator=torch.Generator().manual_seed(0))
    proto = torch_to_onnx(model, example, opset=opset, dynamic_batch=dynamic_batch)
    params = {name: value for name, value in model.state_dict().items() if name in ckpt.masks}
    names = _name_initializers(proto, params)
    return OnnxExport(proto, names, example, model)
