"""Check a PyTorch ``.pt`` file's tensor sizes against the bytes in it, before torch.load runs.

``torch.load(weights_only=True)`` never runs code, but it trusts the sizes a file states: a
1.8 KB file can hold a stride-0 view of 40000×40000 (6.4 GB once anything touches it), a
storage larger than the file, views that overlap, or a zip entry that inflates to gigabytes.
:func:`scan_torch_file` reads the file's pickle with a stub unpickler that builds nothing
(its globals are stand-ins that record what a tensor would be), then checks every storage
against the bytes present and every tensor view against its storage:

- zip format (torch >= 1.6): every entry stored uncompressed (torch.save never compresses),
  no duplicate names, each storage record exactly as long as the pickle says;
- legacy format: each storage's bytes follow the pickles, as many as the pickle says;
- every view lies inside its storage, has no stride-0 (broadcast) dim and is no larger than
  its storage (so it cannot overlap itself); views sharing storage may total twice the
  file's data (tied weights) plus the ``shared_view_bytes`` limit.

Globals other than the tensor-rebuild functions and torch's own weights-only allowlist are
refused: such a pickle could run code.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import limits
from .errors import CheckpointError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@dataclass(frozen=True)
class _Dtype:
    name: str
    itemsize: int


@dataclass(frozen=True)
class _StorageType:
    name: str
    itemsize: int


@dataclass
class _Storage:
    key: str
    itemsize: int
    numel: int  # in elements of itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass
class _TensorView:
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple
    itemsize: int


class _Opaque:
    """Stands in for an allowed, harmless non-tensor object (torch.Size, torch.device, a set...)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


class _Refused(Exception):
    pass


def _tables() -> tuple[dict[str, _Dtype], dict[str, _StorageType], set[str]]:
    import torch

    dtypes = {}
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, torch.dtype):
            dtypes[name] = _Dtype(name, value.itemsize)
    storages = {name: _StorageType(name, dtype.itemsize) for dtype, name in torch.storage._dtype_to_storage_type_map().items()}
    storages["UntypedStorage"] = _StorageType("UntypedStorage", 1)
    try:  # torch's weights-only allowlist (private API; pinned torch)
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals())
    except (ImportError, AttributeError):  # pragma: no cover - a torch without it
        allowed = {"torch.Size", "torch.device", "collections.OrderedDict", "builtins.set"}
    return dtypes, storages, allowed


def _rebuild_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _TensorView(storage, offset, size, stride, storage.itemsize if isinstance(storage, _Storage) else 0)


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    itemsize = dtype.itemsize if isinstance(dtype, _Dtype) else 0
    return _TensorView(storage, offset, size, stride, itemsize)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


class _StubUnpickler(pickle.Unpickler):
    """Unpickles a torch file's pickle into stand-ins: nothing is allocated or imported."""

    def __init__(self, fh, tables, *, legacy: bool):
        super().__init__(fh)
        self.dtypes, self.storage_types, self.allowed = tables
        self.legacy = legacy
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        if full == "collections.OrderedDict":
            return OrderedDict
        if full == "torch._utils._rebuild_tensor_v2":
            return _rebuild_v2
        if full == "torch._utils._rebuild_tensor_v3":
            return _rebuild_v3
        if full in ("torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name in self.dtypes:
            return self.dtypes[name]
        if module in ("torch", "torch.storage") and name in self.storage_types:
            return self.storage_types[name]
        if full.startswith("torch._utils._rebuild") or full == "torch._tensor._rebuild_from_type_v2":
            raise _Refused(f"holds a tensor of a kind dnsconvert does not read ({full}); save plain dense tensors")
        if full in self.allowed:
            return _Opaque
        raise pickle.UnpicklingError(f"GLOBAL {full} is not allowed")

    def persistent_load(self, pid: Any):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage" or len(pid) < 5:
            raise _Refused(f"holds a persistent object of an unknown kind ({str(pid)[:60]})")
        storage_type, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise _Refused("holds a malformed storage record")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(key, storage_type.itemsize, numel)
        return self.storages[key]


def _views(obj: Any, found: list[_TensorView], depth: int = 0) -> None:
    if depth > limits.get("depth"):
        raise _Refused(f"nests objects more than {limits.get('depth')} levels deep")
    if isinstance(obj, _TensorView):
        found.append(obj)
    elif isinstance(obj, dict):
        for value in obj.values():
            _views(value, found, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _views(value, found, depth + 1)


def _check_view(view: _TensorView, path: Path) -> int:
    """Raise unless ``view`` lies inside its storage without broadcasting; returns its bytes."""
    size, stride, offset = view.size, view.stride, view.offset
    ok = (
        isinstance(view.storage, _Storage)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in (*size, *stride))
        and isinstance(offset, int)
        and offset >= 0
        and view.itemsize > 0
    )
    if not ok:
        raise CheckpointError("holds a tensor with a malformed shape, stride or offset", path=path, hint="the file is corrupt or was crafted; re-save it with torch.save")
    numel = limits.numel(size)
    if numel == 0:
        return 0
    storage = view.storage
    if any(st == 0 and d > 1 for d, st in zip(size, stride)):
        raise CheckpointError(
            f"holds a broadcast view (stride 0) of shape {list(size)} over a storage of {storage.nbytes:,} bytes",
            path=path,
            hint="save real tensors: torch.save({k: v.contiguous() for k, v in state_dict.items()}, path)",
        )
    storage_elements = storage.nbytes // view.itemsize
    extent = offset + sum((d - 1) * st for d, st in zip(size, stride)) + 1
    if extent > storage_elements:
        raise CheckpointError(
            f"holds a tensor of shape {list(size)} that reaches element {extent:,} of a storage of {storage_elements:,}",
            path=path,
            hint="the file is corrupt or was crafted",
        )
    if numel > storage_elements:
        raise CheckpointError(
            f"holds a tensor of shape {list(size)} whose elements overlap in a storage of {storage_elements:,}",
            path=path,
            hint="save real tensors: torch.save({k: v.contiguous() for k, v in state_dict.items()}, path)",
        )
    return numel * view.itemsize


def _check_views(result: Any, storages: dict[str, _Storage], path: Path) -> None:
    views: list[_TensorView] = []
    try:
        _views(result, views)
    except _Refused as exc:
        raise CheckpointError(str(exc), path=path) from None
    view_bytes = sum(_check_view(view, path) for view in views)
    storage_bytes = sum(s.nbytes for s in storages.values())
    # tied weights (two names, one storage) double the data at most; more sharing than that is
    # a small file posing as a large model, held to its own limit
    limits.check("shared_view_bytes", max(0, view_bytes - 2 * storage_bytes), f"tensors sharing storage ({view_bytes:,} bytes of views over {storage_bytes:,} bytes of data)", path=path)


def _unpickle(fh, tables, path: Path, *, legacy: bool) -> tuple[Any, _StubUnpickler]:
    unpickler = _StubUnpickler(fh, tables, legacy=legacy)
    try:
        return unpickler.load(), unpickler
    except _Refused as exc:
        raise CheckpointError(str(exc), path=path) from None
    except pickle.UnpicklingError as exc:
        if "is not allowed" in str(exc):
            raise CheckpointError(
                f"refused to unpickle: the file holds objects other than tensors, which could run code ({exc})",
                path=path,
                hint="save only the state dict: torch.save(model.state_dict(), path)",
            ) from None
        raise CheckpointError(f"cannot read as a PyTorch checkpoint (bad pickle: {str(exc)[:120]})", path=path, hint="the file is truncated or corrupt") from None
    except RecursionError:
        raise CheckpointError("cannot read as a PyTorch checkpoint: objects nested too deeply", path=path) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OverflowError, MemoryError) as exc:
        raise CheckpointError(f"cannot read as a PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:120]})", path=path, hint="the file is truncated or corrupt") from None


def scan_torch_file(path: Path, *, zip_format: bool) -> None:
    """Raise CheckpointError unless every size in the ``.pt`` file at ``path`` is backed by its bytes.

    Args:
        path: the file.
        zip_format: the file starts like a zip archive (torch >= 1.6), else a legacy pickle.
    """
    tables = _tables()
    size = path.stat().st_size
    if zip_format:
        _scan_zip(path, size, tables)
    else:
        _scan_legacy(path, size, tables)


def _scan_zip(path: Path, file_size: int, tables) -> None:
    try:
        archive = zipfile.ZipFile(path)
        infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"cannot read as a PyTorch checkpoint (bad zip archive: {exc})", path=path, hint="the file is truncated or corrupt") from None
    with archive:
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            raise CheckpointError("zip archive names an entry twice", path=path, hint="the file is corrupt or was crafted")
        for info in infos:
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(
                    f"zip entry {info.filename!r} is compressed; torch.save never compresses, so the size it claims cannot be checked",
                    path=path,
                    hint="re-save it with torch.save(state_dict, path)",
                )
            if info.file_size != info.compress_size or info.header_offset + info.file_size > file_size:
                raise CheckpointError(f"zip entry {info.filename!r} claims {info.file_size:,} bytes the file does not hold", path=path, hint="the file is truncated or corrupt")
        pickles = [name for name in names if name.endswith("data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError("is a zip archive but not a PyTorch checkpoint (no single */data.pkl)", path=path)
        prefix = pickles[0][: -len("data.pkl")]
        try:
            data = archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise CheckpointError(f"cannot read as a PyTorch checkpoint ({exc})", path=path, hint="the file is truncated or corrupt") from None
        result, unpickler = _unpickle(io.BytesIO(data), tables, path, legacy=False)
        records = {info.filename: info for info in infos}
        for storage in unpickler.storages.values():
            record = records.get(f"{prefix}data/{storage.key}")
            if record is None:
                raise CheckpointError(f"storage {storage.key!r} has no data record", path=path, hint="the file is truncated or corrupt")
            if record.file_size != storage.nbytes:
                raise CheckpointError(
                    f"storage {storage.key!r} claims {storage.nbytes:,} bytes, its record holds {record.file_size:,}",
                    path=path,
                    hint="the file is corrupt or was crafted",
                )
        _check_views(result, unpickler.storages, path)


def _scan_legacy(path: Path, file_size: int, tables) -> None:
    with open(path, "rb") as fh:
        magic, _ = _unpickle(fh, tables, path, legacy=True)
        if magic != LEGACY_MAGIC:
            raise CheckpointError("is a pickle but not a PyTorch checkpoint", path=path, hint="save it with torch.save(model.state_dict(), path)")
        _unpickle(fh, tables, path, legacy=True)  # protocol version
        _unpickle(fh, tables, path, legacy=True)  # sys info
        result, unpickler = _unpickle(fh, tables, path, legacy=True)
        keys, _ = _unpickle(fh, tables, path, legacy=True)
        if not isinstance(keys, list) or set(map(str, keys)) != set(unpickler.storages):
            raise CheckpointError("storage list does not match the tensors", path=path, hint="the file is corrupt")
        # torch then reads, per storage, an int64 element count and the raw bytes
        needed = sum(8 + s.nbytes for s in unpickler.storages.values())
        present = file_size - fh.tell()
        if needed > present:
            raise CheckpointError(f"its storages claim {needed:,} bytes, the file holds {present:,} after the header", path=path, hint="the file is truncated or corrupt")
        offset = fh.tell()
        for key in map(str, keys):
            fh.seek(offset)
            count = int.from_bytes(fh.read(8), "little", signed=True)
            storage = unpickler.storages[key]
            if count != storage.numel:
                raise CheckpointError(f"storage {key!r} holds {count} elements, its tensors say {storage.numel}", path=path, hint="the file is corrupt")
            offset += 8 + storage.nbytes
    _check_views(result, unpickler.storages, path)
