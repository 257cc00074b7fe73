"""SparseCheckpoint: weights + boolean masks keyed by parameter name + metadata, and its file format.

File format (version 1): one ``.safetensors`` file (read by :func:`dnsconvert.loading.load_checkpoint`). Tensors live under three prefixes:
``weight/<name>`` (the model's state dict with zeros where masked), ``mask/<name>``
(bool, one per pruned parameter) and ``state/<i>`` (tensors of the resumable surgery
state). The safetensors header's ``__metadata__`` holds one key, ``dnsconvert``: a JSON
document with the format version, the model spec, the pruning info, the JSON part of the
surgery state and ``layers``: per pruned parameter its kind, N:M reduction axis and how that
is known (``{"kind": "hf-conv1d", "axis": 0, "source": "module", "prunable": true}``, see
:mod:`dnsconvert.layers`; absent in older files, which read as unknown). safetensors never
unpickles, so loading cannot run code.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ._atomic import atomic_path
from .errors import CheckpointError, ModelSpecError
from .layers import LayerInfo
from .modelspec import ModelSpec
from .pattern import apply_mask

FORMAT_VERSION = 1
METADATA_KEY = "dnsconvert"
_PREFIXES = ("weight/", "mask/", "state/")


@dataclass(frozen=True)
class PruningInfo:
    """How the masks were made: method (dns, magnitude, imp, nm-projection, imported), criterion, N:M."""

    method: str
    criterion: str | None = None
    nm: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    history: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["history"] = list(self.history)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PruningInfo:
        return cls(
            method=str(data.get("method", "unknown")),
            criterion=data.get("criterion"),
            nm=data.get("nm"),
            hyperparameters=dict(data.get("hyperparameters") or {}),
            history=tuple(data.get("history") or ()),
        )


@dataclass
class SparseCheckpoint:
    """A model's weights, a boolean mask per pruned parameter, and how to rebuild and resume it.

    Attributes:
        weights: the full state dict (parameters and buffers), zeros where masked.
        masks: parameter name -> mask of the parameter's shape (bool once normalised).
        model: how to rebuild the model, or None for an imported bare state dict.
        pruning: how the masks were made.
        state: resumable surgery state (nested dicts/lists of JSON values and tensors).
        source: the file this checkpoint was read from, for messages.
        source_sha256: that file's sha256, taken when it was read (manifests record it).
        layers: what each pruned parameter is (kind, reduction axis, source of that
            knowledge), as recorded when it was pruned; empty when unknown. Prefer
            :func:`dnsconvert.layers.checkpoint_layers`, which asks the model first.
    """

    weights: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    model: ModelSpec | None = None
    pruning: PruningInfo | None = None
    state: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    source_sha256: str | None = None
    layers: dict[str, LayerInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check_structure()

    # -- invariants -------------------------------------------------------------------
    def check_structure(self) -> None:
        """Raise CheckpointError unless every mask names a weight, has its shape and a numeric dtype."""
        where = self.source
        for name, value in self.weights.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"weight {name!r} is a {type(value).__name__}, expected a tensor", path=where)
        for name, mask in self.masks.items():
            if name not in self.weights:
                raise CheckpointError(
                    f"mask {name!r} names no weight in the checkpoint",
                    path=where,
                    hint=f"known weights: {_preview(self.weights)}",
                )
            if not isinstance(mask, torch.Tensor):
                raise CheckpointError(f"mask {name!r} is a {type(mask).__name__}, expected a tensor", path=where)
            weight = self.weights[name]
            if tuple(mask.shape) != tuple(weight.shape):
                raise CheckpointError(
                    f"mask {name!r} has shape {tuple(mask.shape)} but its weight has {tuple(weight.shape)}",
                    path=where,
                    hint="a mask must have exactly its weight's shape",
                )
            if mask.dtype not in _MASK_DTYPES:
                raise CheckpointError(
                    f"mask {name!r} has dtype {mask.dtype}, expected bool (or 0/1 integers or floats)", path=where
                )
            if not weight.dtype.is_floating_point:
                raise CheckpointError(f"pruned weight {name!r} has dtype {weight.dtype}, expected a float dtype", path=where)
        for name, info in self.layers.items():
            if name not in self.weights:
                raise CheckpointError(f"layer info {name!r} names no weight in the checkpoint", path=where)
            if not isinstance(info, LayerInfo):
                raise CheckpointError(f"layer info {name!r} is a {type(info).__name__}, expected a LayerInfo", path=where)
            if info.axis is not None and not -self.weights[name].dim() <= info.axis < self.weights[name].dim():
                raise CheckpointError(
                    f"layer info {name!r} gives reduction axis {info.axis}, but the weight is {self.weights[name].dim()}-D", path=where
                )

    # -- views ------------------------------------------------------------------------
    def bool_masks(self) -> dict[str, torch.Tensor]:
        return {name: mask != 0 for name, mask in self.masks.items()}

    def masked_weights(self) -> dict[str, torch.Tensor]:
        """The state dict with every masked weight multiplied by its mask."""
        out = dict(self.weights)
        for name, mask in self.bool_masks().items():
            out[name] = apply_mask(self.weights[name], mask)
        return out

    @property
    def name(self) -> str:
        return str(self.source) if self.source else "<checkpoint>"

    def with_(self, **changes: Any) -> SparseCheckpoint:
        return replace(self, **changes)

    # -- file format -------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the checkpoint atomically as one safetensors file; returns the path."""
        from safetensors.torch import save_file

        state_json, state_tensors = flatten_state(self.state)
        tensors: dict[str, torch.Tensor] = {}
        for name, value in self.masked_weights().items():
            tensors[f"weight/{name}"] = value.detach().cpu().contiguous().clone()
        for name, mask in self.bool_masks().items():
            tensors[f"mask/{name}"] = mask.cpu().contiguous().clone()
        for key, value in state_tensors.items():
            tensors[f"state/{key}"] = value.detach().cpu().contiguous().clone()
        metadata = {
            "format_version": FORMAT_VERSION,
            "model": self.model.to_json() if self.model else None,
            "pruning": self.pruning.to_json() if self.pruning else None,
            "state": state_json,
            "layers": {name: info.to_json() for name, info in self.layers.items()},
        }
        target = Path(path)
        with atomic_path(target) as tmp:
            save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(metadata)})
        return target


def read_dnsconvert_safetensors(path: Path, metadata_json: str, tensors: dict[str, torch.Tensor]) -> SparseCheckpoint:
    """Build a SparseCheckpoint from a dnsconvert safetensors file's parts."""
    try:
        meta = json.loads(metadata_json)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"metadata is not valid JSON ({exc.msg})", path=path) from None
    if not isinstance(meta, dict):
        raise CheckpointError("metadata is not a JSON object", path=path)
    version = meta.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError("metadata has no integer format_version", path=path)
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"format version {version} is newer than this dnsconvert reads ({FORMAT_VERSION})",
            path=path,
            hint="upgrade dnsconvert",
        )
    weights: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    state_tensors: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        prefix, _, name = key.partition("/")
        if prefix == "weight" and name:
            weights[name] = value
        elif prefix == "mask" and name:
            masks[name] = value
        elif prefix == "state" and name:
            state_tensors[name] = value
        else:
            raise CheckpointError(
                f"unknown tensor key {key!r}", path=path, hint=f"keys must start with one of {', '.join(_PREFIXES)}"
            )
    try:
        model = ModelSpec.from_json(meta["model"]) if meta.get("model") else None
        pruning = PruningInfo.from_json(meta["pruning"]) if meta.get("pruning") else None
        state = unflatten_state(meta.get("state") or {}, state_tensors)
        layers_json = meta.get("layers") or {}
        if not isinstance(layers_json, dict):
            raise ValueError("layers must be an object of name -> layer info")
        layers = {str(name): LayerInfo.from_json(info) for name, info in layers_json.items()}
    except ModelSpecError as exc:
        raise CheckpointError(f"model spec in the metadata is malformed: {exc.message}", path=path) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"metadata is malformed: {exc}", path=path) from None
    return SparseCheckpoint(weights, masks, model=model, pruning=pruning, state=state, source=path, layers=layers)


# -- surgery state <-> JSON + tensors -------------------------------------------------------
def flatten_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure into JSON (tensors replaced by references) and a flat tensor dict."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            key = str(len(tensors))
            tensors[key] = value
            return {"__tensor__": key}
        if isinstance(value, Mapping):
            return {"__dict__": [[walk(k), walk(v)] for k, v in value.items()]}
        if isinstance(value, (list, tuple)):
            return {"__list__": [walk(v) for v in value], "tuple": isinstance(value, tuple)}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise TypeError(f"cannot store {type(value).__name__} in checkpoint state")

    return walk(obj), tensors


def unflatten_state(data: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(data, dict) and not data:
        return {}
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        if "__dict__" in data:
            return {unflatten_state(k, tensors): unflatten_state(v, tensors) for k, v in data["__dict__"]}
        if "__list__" in data:
            items = [unflatten_state(v, tensors) for v in data["__list__"]]
            return tuple(items) if data.get("tuple") else items
        raise ValueError(f"unexpected object in state: keys {sorted(data)}")
    return data


_MASK_DTYPES = (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.float16, torch.bfloat16, torch.float32, torch.float64,
)  # fmt: skip


def _preview(names: Mapping[str, Any], limit: int = 6) -> str:
    keys = list(names)
    text = ", ".join(keys[:limit])
    return text + (f", … ({len(keys)} in all)" if len(keys) > limit else "")
