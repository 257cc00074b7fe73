"""Read what TensorRT did: the builder's verbose sparsity lines and the engine's layer information.

Verbose builder log (TensorRT 8.0+, INFO level), as printed by both the API logger and trtexec:
    [I] [TRT] (Sparsity) Layers eligible for sparse math: Conv_3 + Relu_4, MatMul_7
    [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: MatMul_7
Engine layer information (IEngineInspector / trtexec --exportLayerInfo, profiling verbosity
DETAILED) is JSON: {"Layers": [{"Name": ..., "LayerType": ..., "TacticName": ...}, ...]};
a sparse tactic has "sparse" in its tactic name. TensorRT names fused layers "A + B".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_ELIGIBLE = re.compile(r"\(Sparsity\)\s*Layers eligible for sparse math:\s*(.*)$")
_PICKED = re.compile(r"\(Sparsity\)\s*TRT inference plan picked sparse implementation for layers:\s*(.*)$")


@dataclass
class SparsityLog:
    eligible: list[str] = field(default_factory=list)
    picked: list[str] = field(default_factory=list)
    seen: bool = False  # the log had the sparsity lines at all (verbose INFO was on)


def _split_layers(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_builder_log(lines) -> SparsityLog:
    result = SparsityLog()
    for line in lines:
        match = _ELIGIBLE.search(line)
        if match:
            result.seen = True
            result.eligible += _split_layers(match.group(1))
            continue
        match = _PICKED.search(line)
        if match:
            result.seen = True
            result.picked += _split_layers(match.group(1))
    return result


@dataclass(frozen=True)
class EngineLayer:
    name: str
    layer_type: str
    tactic: str

    @property
    def sparse(self) -> bool:
        return "sparse" in self.tactic.lower()

    @property
    def onnx_nodes(self) -> list[str]:
        """ONNX node names fused into this TensorRT layer."""
        return [part.strip() for part in self.name.split(" + ")]


def parse_layer_info(text: str) -> list[EngineLayer]:
    """Parse IEngineInspector/trtexec layer-information JSON (DETAILED or LAYER_NAMES_ONLY)."""
    data = json.loads(text)
    layers = data.get("Layers", data if isinstance(data, list) else [])
    out = []
    for layer in layers:
        if isinstance(layer, str):  # LAYER_NAMES_ONLY gives bare names
            out.append(EngineLayer(layer, "", ""))
        else:
            out.append(EngineLayer(str(layer.get("Name", "")), str(layer.get("LayerType", "")), str(layer.get("TacticName", layer.get("Tactic", "")))))
    return out


def map_to_checkpoint(trt_layer_names: list[str], node_to_param: dict[str, str]) -> dict[str, list[str]]:
    """TensorRT layer name (possibly fused, 'A + B') -> the checkpoint parameters it covers."""
    mapping = {}
    for name in trt_layer_names:
        params = [node_to_param[part.strip()] for part in name.split(" + ") if part.strip() in node_to_param]
        mapping[name] = params
    return mapping
