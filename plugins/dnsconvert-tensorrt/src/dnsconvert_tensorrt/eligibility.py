"""Which layers of an ONNX graph can use TensorRT's 2:4 sparse tensor-core tactics.

Facts used (TensorRT 8.0+ docs and NVIDIA's sparsity blog posts): sparse tensor cores take
2:4 structure along the reduction dimension (Conv: input channels per kernel position;
Gemm/MatMul: K) for FP16, BF16, TF32 and INT8 math; plain FP32 (no TF32) uses no tensor
cores at all. TensorRT only *considers* sparse tactics for such layers and *picks* one when
it is faster, so small layers rarely switch. The channel/size thresholds below are advisory
(tensor-core tile alignment), reported as warnings, never as errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from .core import TWO_FOUR, check_graph_nm

PRECISIONS = ("fp16", "bf16", "tf32", "int8", "fp32")
ALIGNMENT = {"int8": 32, "fp16": 16, "bf16": 16, "tf32": 8}  # advisory channel multiples
SMALL_LAYER_MACS = 1 << 20  # below ~1M multiply-adds per sample, a sparse tactic rarely wins


@dataclass
class LayerEligibility:
    initializer: str
    op: str
    node: str
    two_four: bool
    eligible: bool
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _node_of(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    owners = {}
    for node in model.graph.node:
        for name in node.input[1:2]:
            owners.setdefault(name, node)
    return owners


def layer_eligibility(model: onnx.ModelProto, precision: str) -> list[LayerEligibility]:
    """Per weight (Conv/Gemm/MatMul), whether TensorRT may consider a sparse tactic, and warnings."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    results = []
    owners = _node_of(model)
    arrays = {init.name: tuple(init.dims) for init in model.graph.initializer}
    arrays.update({s.values.name: tuple(s.dims) for s in model.graph.sparse_initializer})
    for graph_result in check_graph_nm(model, TWO_FOUR):
        shape = arrays.get(graph_result.initializer, ())
        node = owners.get(graph_result.initializer)
        entry = LayerEligibility(graph_result.initializer, graph_result.op, node.name if node else "", bool(graph_result.compliant), False)
        if graph_result.skipped_reason:
            entry.reasons.append(f"cannot hold 2:4: {graph_result.skipped_reason}")
        elif not graph_result.compliant:
            entry.reasons.append(f"not 2:4 along the reduction axis ({graph_result.violating_groups} groups)")
        if precision == "fp32":
            entry.reasons.append("FP32 build (no TF32/FP16/INT8): no tensor cores, so no sparse tactics")
        entry.eligible = not entry.reasons
        if entry.eligible and shape:
            reduction = shape[1] if graph_result.reduction_axis == 1 else shape[0]
            outputs = shape[0] if graph_result.reduction_axis == 1 else shape[1]
            align = ALIGNMENT[precision]
            if reduction % align or outputs % align:
                entry.warnings.append(f"channels {outputs}x{reduction} are not multiples of {align} for {precision}: TensorRT may pad or stay dense")
            macs = outputs * reduction * (shape[2] * shape[3] if len(shape) == 4 else 1)
            if macs < SMALL_LAYER_MACS:
                entry.warnings.append(f"small layer ({macs:,} MACs per position): a dense tactic will likely win")
        results.append(entry)
    return results
