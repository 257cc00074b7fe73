"""Combine eligibility, the builder's sparsity log and the engine's layers into one per-layer record."""

from __future__ import annotations

from typing import Any

import onnx

from .eligibility import LayerEligibility
from .logparse import EngineLayer, SparsityLog


def node_to_param(model: onnx.ModelProto, initializer_to_param: dict[str, str]) -> dict[str, str]:
    """ONNX node name -> checkpoint parameter, through the node's weight initializer."""
    mapping = {}
    for node in model.graph.node:
        for name in node.input:
            if name in initializer_to_param:
                mapping[node.name] = initializer_to_param[name]
    return mapping


def sparsity_record(
    eligibility: list[LayerEligibility],
    log: SparsityLog,
    layers: list[EngineLayer],
    nodes: dict[str, str],
    initializer_to_param: dict[str, str],
) -> list[dict[str, Any]]:
    """Per checkpoint layer: 2:4 on the graph, eligible (ours and TensorRT's), sparse tactic picked."""
    trt_eligible = {p for name in log.eligible for p in _params(name, nodes)}
    trt_picked = {p for name in log.picked for p in _params(name, nodes)}
    tactic_sparse = {p: layer.tactic for layer in layers if layer.sparse for p in _params(layer.name, nodes)}
    records = []
    for entry in eligibility:
        param = initializer_to_param.get(entry.initializer, entry.initializer)
        records.append(
            {
                "param": param,
                "initializer": entry.initializer,
                "op": entry.op,
                "two_four": entry.two_four,
                "eligible_by_rules": entry.eligible,
                "reasons": entry.reasons,
                "warnings": entry.warnings,
                "trt_eligible": param in trt_eligible,
                "sparse_picked": param in trt_picked or param in tactic_sparse,
                "sparse_tactic": tactic_sparse.get(param),
            }
        )
    return records


def _params(trt_layer: str, nodes: dict[str, str]) -> list[str]:
    return [nodes[part.strip()] for part in trt_layer.split(" + ") if part.strip() in nodes]
