"""N:M checks on the exported graph: the weight layout the engine will actually see.

Reduction axis of a weight initializer by consumer: Conv W [out, in, *k] -> axis 1;
Gemm B -> axis 1 when transB=1 ([N, K]) else 0 ([K, N]); MatMul B [K, N] -> axis 0. A
weight reached through a 2-D Transpose has its axis swapped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch

from ..pattern import NMPattern, cannot_hold, violating_groups
from .sparse_init import initializer_arrays


@dataclass(frozen=True)
class GraphWeight:
    initializer: str
    op: str
    node: str
    reduction_axis: int


@dataclass(frozen=True)
class GraphNMResult:
    initializer: str
    op: str
    reduction_axis: int
    compliant: bool | None
    violating_groups: int
    skipped_reason: str | None


def weight_consumers(model: onnx.ModelProto) -> list[GraphWeight]:
    """Each initializer used as a Conv/Gemm/MatMul weight, with its reduction axis."""
    names = {i.name for i in model.graph.initializer} | {s.values.name for s in model.graph.sparse_initializer}
    transposed = {}
    for node in model.graph.node:
        if node.op_type == "Transpose" and node.input[0] in names:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
            if perm == [1, 0]:
                transposed[node.output[0]] = node.input[0]
    found = []
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1:
            slot, axis = node.input[1], 1
        elif node.op_type == "Gemm" and len(node.input) > 1:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            slot, axis = node.input[1], 1 if trans_b else 0
        elif node.op_type == "MatMul" and len(node.input) > 1:
            slot, axis = node.input[1], 0
        else:
            continue
        if slot in names:
            found.append(GraphWeight(slot, node.op_type, node.name, axis))
        elif slot in transposed:
            found.append(GraphWeight(transposed[slot], node.op_type, node.name, 1 - axis))
    return found


def check_graph_nm(model: onnx.ModelProto, pattern: NMPattern, *, arrays: dict[str, np.ndarray] | None = None) -> list[GraphNMResult]:
    """N:M compliance of every Conv/Gemm/MatMul weight along its reduction axis (``arrays``: the
    initializers as arrays, when the caller already has them)."""
    arrays = arrays if arrays is not None else initializer_arrays(model)
    results = []
    for weight in weight_consumers(model):
        array = arrays[weight.initializer]
        # move the reduction axis to position 1, where pattern.py expects it
        if weight.reduction_axis == 0 and array.ndim == 2:
            array = array.T
        tensor = torch.from_numpy(np.ascontiguousarray(array)) if array.flags.writeable else torch.from_numpy(np.array(array))
        reason = cannot_hold(tuple(tensor.shape), pattern)
        if reason is not None:
            results.append(GraphNMResult(weight.initializer, weight.op, weight.reduction_axis, None, 0, reason))
            continue
        bad = violating_groups(tensor != 0, pattern)
        results.append(GraphNMResult(weight.initializer, weight.op, weight.reduction_axis, bad == 0, bad, None))
    return results
