"""Combine eligibility, the engine inspector and the builder log into one per-layer record.

Evidence order: the inspector's structured fields (``HasSparseWeights``, the tactic name,
``Metadata``) first; the verbose log's (Sparsity) lines second, for layers the inspector says
nothing about. Engine layers that hold weights but map to no checkpoint layer (a Myelin
``{ForeignNode[...]}`` region without Metadata, renamed nodes) are listed, as are checkpoint
layers found in no engine layer: a report never claims more than it could map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

from .eligibility import LayerEligibility
from .logparse import EngineInfo, EngineLayer, SparsityLog

_NO_WEIGHTS = ("Reformat", "NoOp", "Shuffle", "Constant", "Cast")


def node_to_param(model: onnx.ModelProto, initializer_to_param: dict[str, str]) -> dict[str, str]:
    """ONNX node name -> checkpoint parameter, through the node's weight initializer.

    Follows a DequantizeLinear (Q/DQ graphs feed weights through one) back to its initializer.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    mapping = {}
    for node in model.graph.node:
        for name in node.input:
            source = name
            producer = producers.get(name)
            if producer is not None and producer.op_type == "DequantizeLinear":
                source = producer.input[0]
            param = initializer_to_param.get(source) or initializer_to_param.get(source.removesuffix("_quantized"))
            if param and node.op_type in ("Conv", "Gemm", "MatMul"):
                mapping[node.name] = param
    return mapping


@dataclass
class SparsityReport:
    layers: list[dict[str, Any]]
    unmapped_engine_layers: list[dict[str, str]] = field(default_factory=list)
    params_not_located: list[str] = field(default_factory=list)
    evidence: str = ""

    def sparse_params(self) -> list[str]:
        return [r["param"] for r in self.layers if r["sparse_picked"]]

    def to_json(self) -> dict[str, Any]:
        return {"layers": self.layers, "unmapped_engine_layers": self.unmapped_engine_layers, "params_not_located": self.params_not_located, "evidence": self.evidence}


def _params(layer_name: str, info: EngineInfo, nodes: dict[str, str]) -> list[str]:
    layer = info.layer(layer_name) or EngineLayer(layer_name)
    return [nodes[n] for n in layer.onnx_nodes if n in nodes]


def sparsity_record(eligibility: list[LayerEligibility], log: SparsityLog, info: EngineInfo, nodes: dict[str, str], initializer_to_param: dict[str, str]) -> SparsityReport:
    """Per checkpoint layer: 2:4 on the graph, eligible (ours and TensorRT's), sparse tactic picked, and on what evidence."""
    structured: dict[str, dict[str, Any]] = {}
    unmapped = []
    for layer in info.layers:
        params = [nodes[n] for n in layer.onnx_nodes if n in nodes]
        weighted = layer.has_sparse_weights is not None or layer.sparse_tactic or layer.foreign
        if not params:
            if weighted and not layer.layer_type.startswith(_NO_WEIGHTS):
                why = "Myelin {ForeignNode[first...last]} names only the ends of the fused region and has no Metadata" if layer.foreign else "no ONNX node of its name/Metadata holds a checkpoint weight"
                unmapped.append({"engine_layer": layer.name, "layer_type": layer.layer_type, "reason": why})
            continue
        for param in params:
            entry = structured.setdefault(param, {"engine_layers": [], "has_sparse_weights": None, "tactic": None, "sparse_tactic": False})
            entry["engine_layers"].append(layer.name)
            if layer.has_sparse_weights is not None:
                entry["has_sparse_weights"] = bool(entry["has_sparse_weights"]) or layer.has_sparse_weights
            if layer.tactic:
                entry["tactic"] = layer.tactic
                entry["sparse_tactic"] = entry["sparse_tactic"] or layer.sparse_tactic
    log_eligible = {p for name in log.eligible for p in _params(name, info, nodes)}
    log_picked = {p for name in log.picked for p in _params(name, info, nodes)}
    records, not_located = [], []
    for entry in eligibility:
        param = initializer_to_param.get(entry.initializer, entry.initializer)
        found = structured.get(param)
        if found is None and param not in log_eligible | log_picked:
            not_located.append(param)
        has_sparse = found["has_sparse_weights"] if found else None
        tactic_known = bool(found and found["tactic"])
        records.append(
            {
                "param": param,
                "initializer": entry.initializer,
                "op": entry.op,
                "two_four": entry.two_four,
                "eligible_by_rules": entry.eligible,
                "reasons": entry.reasons,
                "warnings": entry.warnings,
                "engine_layers": found["engine_layers"] if found else [],
                "trt_eligible": has_sparse if has_sparse is not None else param in log_eligible,
                "sparse_picked": found["sparse_tactic"] if tactic_known else param in log_picked,
                "sparse_tactic": found["tactic"] if found and found["sparse_tactic"] else None,
                "evidence": ("inspector" if tactic_known or has_sparse is not None else "") or ("builder log" if log.seen else "none"),
            }
        )
    evidence = "engine inspector (DETAILED)" if structured else ("builder log only" if log.seen else "none: no layer information and no (Sparsity) log lines")
    return SparsityReport(records, unmapped, not_located, evidence)
