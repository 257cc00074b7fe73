"""``load_checkpoint``: any supported checkpoint file -> SparseCheckpoint, without unpickling code.

Supported: dnsconvert's own safetensors files; plain safetensors state dicts; PyTorch
``.pt``/``.pth`` state dicts read with ``torch.load(weights_only=True)``, including the
``<name>_orig`` + ``<name>_mask`` pairs that ``torch.nn.utils.prune`` leaves behind. A dense
state dict gets masks derived from its exact zeros (for every weight of 2 or more dims). With no
model, what those tensors are is only guessed from their shapes, and recorded as such
(``source="shape"``): commands that change weights refuse them unless a model or ``--layers``
says what they are.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import limits
from .checkpoint import METADATA_KEY, PruningInfo, SparseCheckpoint, read_dnsconvert_safetensors
from ._atomic import sha256_file
from .errors import CheckpointError, UserError
from .layers import guess_from_shape

_ZIP_MAGIC = b"PK\x03\x04"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


def load_checkpoint(path: str | Path) -> SparseCheckpoint:
    """Load ``path``; every failure is a CheckpointError naming the file and the fix."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError("no such file", path=path, hint="check the path")
    if path.is_dir():
        if (path / "config.json").is_file():  # a transformers model directory (save_pretrained)
            return _load_hf_directory(path)
        raise CheckpointError("is a directory, expected a checkpoint file", path=path, hint="pass the .safetensors or .pt file inside it")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError("file is empty", path=path, hint="the write that made it probably failed; re-create it")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if _looks_like_safetensors(head, size):
        ckpt = _load_safetensors(path)
    elif head.startswith(_ZIP_MAGIC) or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        ckpt = _load_torch(path, zip_format=head.startswith(_ZIP_MAGIC))
    elif path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        raise CheckpointError(
            "is not a PyTorch checkpoint (neither a zip archive nor a pickle)", path=path, hint="the file may be corrupt or truncated"
        )
    else:
        ckpt = _load_safetensors(path)
    ckpt.source_sha256 = sha256_file(path)  # recorded by what is built from it (manifests, reports)
    return ckpt


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """safetensors: u64 little-endian header length, then a JSON object."""
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len <= size - 8 and head[8:9] == b"{"


def safetensors_metadata(source: Path | bytes, *, path: str | Path | None = None) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, or of its bytes in memory (an artifact's
    file after its hash check): the header length must fit in the bytes present, the header is
    depth-limited JSON, and the metadata maps strings to strings. Any fault is a
    CheckpointError naming ``path`` (default: the file read)."""
    where = path if path is not None or isinstance(source, bytes) else source
    if isinstance(source, bytes):
        raw = source[8 : 8 + _header_length(source[:8], len(source), where)]
    else:
        with open(source, "rb") as fh:
            raw = fh.read(_header_length(fh.read(8), source.stat().st_size, where))
    header = read_json_text(raw, what="safetensors header", path=where, error=CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError("safetensors header is not a JSON object", path=where)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise CheckpointError("safetensors __metadata__ is not an object of strings", path=where)
    return metadata


def _header_length(head: bytes, size: int, where: str | Path | None) -> int:
    header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
    if not 0 < header_len <= size - 8:
        raise CheckpointError(f"safetensors header length {header_len:,} does not fit in its {size:,} bytes", path=where, hint="the file is truncated or corrupt")
    return header_len


def _load_safetensors(path: Path) -> SparseCheckpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError(
            f"cannot read as safetensors ({_first_line(exc)})",
            path=path,
            hint="the file is truncated, corrupt or of an unsupported kind; dnsconvert reads .safetensors, .pt and .pth",
        ) from None
    metadata = safetensors_metadata(path)  # safe_open has checked the header; its metadata is read the one way
    check_dtypes(tensors, path)
    if METADATA_KEY in metadata:
        read_json_text(metadata[METADATA_KEY], what="metadata", path=path, error=CheckpointError)
        try:
            return read_dnsconvert_safetensors(path, metadata[METADATA_KEY], tensors)
        except RecursionError:  # belt and braces: the depth was checked above
            raise CheckpointError("metadata nests too deeply", path=path) from None
    return from_state_dict(tensors, source=path)


# dtypes dnsconvert computes with; others (float8, complex, quantized, uint16..64) are refused
# when loading, before any stage meets an op that is not implemented for them.
SUPPORTED_DTYPES = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)  # fmt: skip


def check_dtypes(tensors: Mapping[str, Any], path: Path | None) -> None:
    """Raise CheckpointError for a tensor of a dtype dnsconvert does not compute with."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.dtype not in SUPPORTED_DTYPES:
            raise CheckpointError(
                f"tensor {name!r} has dtype {str(value.dtype).removeprefix('torch.')}, which dnsconvert does not read",
                path=path,
                hint="convert it to float32, float16 or bfloat16 before saving",
            )


def read_json_text(text: str | bytes, *, what: str, path: str | Path | None, error: type[UserError] = UserError) -> Any:
    """Parse JSON read from a file; malformed or nested deeper than the ``depth`` limit is one ``error``."""
    try:
        data = json.loads(text)
    except RecursionError:
        raise error(f"{what} nests too deeply", path=path, hint=f"the limit is {limits.get('depth')} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} is not valid JSON ({getattr(exc, 'msg', exc)})", path=path) from None
    stack = [(data, 1)]
    limit = limits.get("depth")
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            raise error(
                f"{what} nests more than {limit} levels deep",
                path=path,
                hint=f"if you trust this file, raise the limit: {limits.LIMITS['depth'].env}={depth}",
            )
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return data


def _load_torch(path: Path, *, zip_format: bool) -> SparseCheckpoint:
    from .torch_file import scan_torch_file

    scan_torch_file(path, zip_format=zip_format)  # every size backed by the file's bytes, before torch allocates
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "global" in line]
        detail = f" ({lines[0][:160]})" if lines else ""
        raise CheckpointError(
            f"refused to unpickle: the file holds objects other than tensors, which could run code{detail}",
            path=path,
            hint="save only the state dict: torch.save(model.state_dict(), path)",
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, AttributeError, TypeError, IndexError) as exc:
        raise CheckpointError(
            f"cannot read as a PyTorch checkpoint ({_first_line(exc)[:160]})",
            path=path,
            hint="the file is truncated or corrupt; re-save it with torch.save(model.state_dict(), path)",
        ) from None
    state_dict = _unwrap(obj, path)
    check_dtypes(state_dict, path)
    return from_state_dict(state_dict, source=path)


def _unwrap(obj: Any, path: Path) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
        bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if not bad and obj:
            return obj
        if not obj:
            raise CheckpointError("state dict is empty", path=path)
        raise CheckpointError(
            f"entry {bad[0]!r} is not a tensor; expected a state dict of name -> tensor",
            path=path,
            hint="save model.state_dict(), not the model or a training-state dict",
        )
    raise CheckpointError(
        f"holds a {type(obj).__name__}, expected a state dict of name -> tensor",
        path=path,
        hint="save model.state_dict()",
    )


def from_state_dict(state_dict: Mapping[str, torch.Tensor], *, source: Path | None = None) -> SparseCheckpoint:
    """Turn a state dict into a checkpoint: prune's ``_orig``/``_mask`` pairs become masks,
    other weights of 2+ dims get masks from their exact zeros."""
    if not state_dict:
        raise CheckpointError("state dict is empty", path=source)
    weights: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    imported_from_prune = False
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"entry {key!r} is not a tensor", path=source)
        if key.endswith("_orig"):
            base = key[: -len("_orig")]
            if base + "_mask" not in state_dict:
                raise CheckpointError(
                    f"{key!r} has no matching {base + '_mask'!r}",
                    path=source,
                    hint="torch.nn.utils.prune saves both; save the state dict before prune.remove()",
                )
            weights[base] = value
        elif key.endswith("_mask"):
            base = key[: -len("_mask")]
            if base + "_orig" not in state_dict:
                raise CheckpointError(f"mask {key!r} has no matching {base + '_orig'!r}", path=source)
            masks[base] = value
            imported_from_prune = True
        else:
            weights[key] = value
    ckpt = SparseCheckpoint(weights, masks, source=source)  # checks mask shapes and dtypes
    # torch.nn.utils.prune keeps the unmasked values in _orig; deploy weights are weight*mask.
    ckpt.weights = ckpt.masked_weights()
    if not imported_from_prune:
        for name, value in weights.items():
            if value.dim() >= 2 and value.dtype.is_floating_point:
                ckpt.masks[name] = value != 0
    method = "torch.nn.utils.prune" if imported_from_prune else "imported-zeros"
    ckpt.pruning = PruningInfo(method=method)
    # no model: a 2-D tensor may be a Linear [out, in], a Conv1D [in, out] or an embedding table
    ckpt.layers = {name: guess_from_shape(ckpt.weights[name].shape) for name in ckpt.masks}
    return ckpt


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _load_hf_directory(path: str | Path) -> SparseCheckpoint:
    """A model directory as a dense SparseCheckpoint (masks from exact zeros) with its hf: spec."""
    from .hf import FACTORY, directory_sha256, has_vocab, hf_spec, model_directory, pretrained
    from .modelspec import ModelSpec
    from .models import check_model_size

    directory = model_directory(path)
    # without a vocabulary the inputs are unknown: the spec still names the model (its layer
    # kinds), and commands that run it ask for --input
    spec = hf_spec(directory) if has_vocab(directory) else ModelSpec(FACTORY, {"path": str(directory)})
    check_model_size(spec, source=directory)  # sized on the meta device before any weight is allocated
    model = pretrained(str(directory))
    # clone: tied parameters (GPT-2's wte / lm_head) share storage, which safetensors cannot save
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = from_state_dict(weights, source=directory)
    ckpt.model = spec
    ckpt.source_sha256 = directory_sha256(directory)
    return ckpt
