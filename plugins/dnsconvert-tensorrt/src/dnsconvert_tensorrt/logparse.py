"""Read what TensorRT did: the engine inspector's layer information first, the builder log second.

Engine layer information (``IEngineInspector.get_engine_information(JSON)`` / ``trtexec
--exportLayerInfo``, profiling verbosity DETAILED) is JSON with a ``"Layers"`` list; with
LAYER_NAMES_ONLY the entries are bare names. Per layer, the structured fields used here are
(schemas as recorded in NVIDIA/TensorRT issues #4020 and #4056 and the trt-engine-explorer
examples for 10.x; NVIDIA's "Migrating IEngineInspector Usage from TensorRT 10.x to 11.x"):

- ``"HasSparseWeights"`` (0/1): TensorRT saw 2:4-structured weights on this layer. It does not
  mean a sparse kernel runs (NVIDIA/TensorRT #4694 shows 1 with dense tactics).
- ``"TacticName"``: a sparse kernel has ``sparse`` in its name (e.g.
  ``sm80_xmma_fprop_avdt_sparse_int8int8_...``).
- ``"Metadata"``: ``[ONNX Layer: A]\\x1e[ONNX Layer: B]...``, the ONNX nodes fused into the layer
  (10.x). Names of fused layers (``"A + B"``) are the fallback; a Myelin layer is named
  ``{ForeignNode[first...last]}`` (first and last node only), which cannot be mapped by name.
- Tensors: 10.x ``"Format/Datatype": "Row major linear FP32"``; 11.x split ``"Format"`` and
  ``"DataType"``. Engine I/O: 10.x ``"Bindings": [names]``; 11.x ``"I/O Tensors": [{"Name",
  "IOMode", "DataType", "Dimensions", ...}]``.

Builder log (INFO; both the API logger and trtexec print it, at least through 10.x):
    [I] [TRT] (Sparsity) Layers eligible for sparse math: Conv_3 + Relu_4, MatMul_7
    [I] [TRT] (Sparsity) TRT inference plan picked sparse implementation for layers: MatMul_7
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_ELIGIBLE = re.compile(r"\(Sparsity\)\s*Layers eligible for sparse math:\s*(.*)$")
_PICKED = re.compile(r"\(Sparsity\)\s*TRT inference plan picked sparse implementation for layers:\s*(.*)$")
_ONNX_LAYER = re.compile(r"\[ONNX Layer: (.*?)\](?=[\x1e\x1f]|\[|$)")
_FOREIGN = re.compile(r"^\{ForeignNode\[(.*)\]\}$")


@dataclass
class SparsityLog:
    eligible: list[str] = field(default_factory=list)
    picked: list[str] = field(default_factory=list)
    seen: bool = False  # the log had the sparsity lines at all


def _split_layers(text: str) -> list[str]:
    """Split the log's comma-separated layer list (names inside ``{ForeignNode[...]}`` may hold commas)."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return [p for p in parts if p]


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
class TensorInfo:
    name: str
    format: str
    dtype: str


def _tensor(entry: Any) -> TensorInfo:
    if not isinstance(entry, dict):
        return TensorInfo(str(entry), "", "")
    if "Format/Datatype" in entry:  # 10.x: one string, e.g. "Channel major FP16 format where channel % 8 == 0"
        combined = str(entry["Format/Datatype"])
        words = combined.split()
        dtype = words[words.index("format") - 1] if "format" in words else (words[-1] if words else "")
        return TensorInfo(str(entry.get("Name", "")), combined, dtype)
    dtype = entry.get("DataType", entry.get("Datatype", ""))  # 11.x: split fields
    return TensorInfo(str(entry.get("Name", "")), str(entry.get("Format", "")), str(dtype))


@dataclass(frozen=True)
class EngineLayer:
    name: str
    layer_type: str = ""
    tactic: str = ""
    has_sparse_weights: bool | None = None  # None: the field is absent (not DETAILED, or not a weighted layer)
    metadata_nodes: tuple[str, ...] = ()  # ONNX nodes from "Metadata"
    inputs: tuple[TensorInfo, ...] = ()
    outputs: tuple[TensorInfo, ...] = ()

    @property
    def sparse_tactic(self) -> bool:
        return "sparse" in self.tactic.lower()

    @property
    def foreign(self) -> bool:
        return bool(_FOREIGN.match(self.name))

    @property
    def onnx_nodes(self) -> list[str]:
        """ONNX node names in this layer: the structured Metadata, else the fused name split on ' + '."""
        if self.metadata_nodes:
            return list(self.metadata_nodes)
        if self.foreign:  # {ForeignNode[first...last]} names only the ends of the fused region
            return []
        return [part.strip() for part in self.name.split(" + ") if part.strip()]


@dataclass
class EngineInfo:
    layers: list[EngineLayer]
    io_tensors: list[dict[str, Any]]
    schema: str  # "10.x (Bindings)", "11.x (I/O Tensors)" or "unknown"

    def layer(self, name: str) -> EngineLayer | None:
        return next((layer for layer in self.layers if layer.name == name), None)


def _layer(entry: Any) -> EngineLayer:
    if isinstance(entry, str):  # LAYER_NAMES_ONLY
        return EngineLayer(entry)
    sparse = entry.get("HasSparseWeights")
    metadata = str(entry.get("Metadata", "") or "")
    return EngineLayer(
        name=str(entry.get("Name", "")),
        layer_type=str(entry.get("LayerType", "")),
        tactic=str(entry.get("TacticName", entry.get("Tactic", ""))),
        has_sparse_weights=None if sparse is None else bool(int(sparse)),
        metadata_nodes=tuple(m.strip() for m in _ONNX_LAYER.findall(metadata) if m.strip()),
        inputs=tuple(_tensor(t) for t in entry.get("Inputs", []) or []),
        outputs=tuple(_tensor(t) for t in entry.get("Outputs", []) or []),
    )


def parse_engine_info(text: str) -> EngineInfo:
    """Parse inspector / trtexec layer information of either schema (or a bare list of layers)."""
    data = json.loads(text)
    if isinstance(data, list):
        layers, io, schema = data, [], "unknown"
    elif isinstance(data, dict):
        layers = data.get("Layers", [])
        if "I/O Tensors" in data:
            schema = "11.x (I/O Tensors)"
            io = [
                {"name": str(t.get("Name", "")), "mode": str(t.get("IOMode", "")), "dtype": str(t.get("DataType", t.get("Datatype", ""))), "dims": t.get("Dimensions")}
                for t in data["I/O Tensors"] if isinstance(t, dict)
            ]  # fmt: skip
        elif "Bindings" in data:
            schema, io = "10.x (Bindings)", [{"name": str(name)} for name in data["Bindings"]]
        else:
            schema, io = "unknown", []
    else:
        raise ValueError(f"layer information is a JSON {type(data).__name__}, expected an object or a list")
    return EngineInfo([_layer(entry) for entry in layers], io, schema)


def parse_layer_info(text: str) -> list[EngineLayer]:
    """The engine's layers, whatever the schema."""
    return parse_engine_info(text).layers
