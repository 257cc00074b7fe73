"""Checks of sparse index structures read from files (ONNX COO, CSR), before they are used.

A file's indices are never trusted: they must be integers, as many as the values, inside the
dense shape, sorted and unique; the dense shape's size is held to the ``dense_bytes`` limit
before anything dense is allocated. Every failure is one UserError naming the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from . import limits
from .errors import UserError


def _strictly_increasing(array: np.ndarray) -> bool:
    return bool(np.all(array[1:] > array[:-1])) if array.size > 1 else True


def check_coo(
    indices: np.ndarray,
    nnz: int,
    shape: tuple[int, ...],
    *,
    name: str,
    path: str | Path | None,
    error: type[UserError] = UserError,
) -> np.ndarray:
    """Check ONNX sparse-tensor indices ([NNZ] linearised or [NNZ, rank] coordinates).

    Returns:
        the linearised int64 indices (sorted, unique, inside ``prod(shape)``).
    """
    where = f"sparse tensor {name!r}"
    if indices.dtype.kind not in "iu":
        raise error(f"{where} has {indices.dtype} indices; ONNX requires INT64", path=path)
    size = limits.numel(shape)
    if indices.ndim == 2:
        if indices.shape != (nnz, len(shape)):
            raise error(f"{where}: indices of shape {list(indices.shape)} do not match {nnz} values of rank {len(shape)}", path=path)
        if nnz and (indices.min() < 0 or np.any(indices >= np.asarray(shape, dtype=np.int64))):
            raise error(f"{where} has an index outside its shape {list(shape)}", path=path, hint="the file is corrupt")
        linear = np.ravel_multi_index(tuple(indices.astype(np.int64).T), shape) if nnz else np.zeros(0, np.int64)
    elif indices.ndim == 1:
        if indices.shape[0] != nnz:
            raise error(f"{where} has {indices.shape[0]} indices for {nnz} values", path=path, hint="the file is corrupt")
        linear = indices.astype(np.int64, copy=False)
        if nnz and (int(linear.min()) < 0 or int(linear.max()) >= size):
            raise error(f"{where} has an index outside [0, {size}) (shape {list(shape)})", path=path, hint="the file is corrupt")
    else:
        raise error(f"{where} has indices of rank {indices.ndim}; expected [NNZ] or [NNZ, rank]", path=path)
    if not _strictly_increasing(linear):
        raise error(f"{where} has indices that are not sorted and unique", path=path, hint="the file is corrupt")
    return linear


def check_csr(crow: np.ndarray, col: np.ndarray, values: np.ndarray, shape: tuple[int, int], *, name: str, path: str | Path | None, error: type[UserError] = UserError) -> None:
    """Check a CSR matrix's arrays against its shape (what torch's check_invariants checks, as a UserError)."""
    rows, cols = shape
    where = f"CSR layer {name!r}"
    for label, array in (("crow_indices", crow), ("col_indices", col)):
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise error(f"{where}: {label} must be a 1-D integer array, got {array.dtype} of shape {list(array.shape)}", path=path)
    if values.ndim != 1 or values.dtype.kind != "f":
        raise error(f"{where}: values must be a 1-D float array, got {values.dtype} of shape {list(values.shape)}", path=path)
    if crow.shape[0] != rows + 1:
        raise error(f"{where}: crow_indices has {crow.shape[0]} entries for {rows} rows (needs {rows + 1})", path=path, hint="the artifact is corrupt; rebuild it")
    nnz = col.shape[0]
    if values.shape[0] != nnz:
        raise error(f"{where}: {values.shape[0]} values for {nnz} column indices", path=path, hint="the artifact is corrupt; rebuild it")
    crow64 = crow.astype(np.int64, copy=False)
    if int(crow64[0]) != 0 or int(crow64[-1]) != nnz or np.any(np.diff(crow64) < 0):
        raise error(f"{where}: crow_indices must start at 0, never decrease and end at {nnz}", path=path, hint="the artifact is corrupt; rebuild it")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise error(f"{where}: a column index lies outside [0, {cols})", path=path, hint="the artifact is corrupt; rebuild it")
    # sorted and unique within each row: adjacent entries increase unless a new row starts there
    if nnz > 1:
        col64 = col.astype(np.int64, copy=False)
        row_starts = np.zeros(nnz, dtype=bool)
        starts = crow64[1:-1]
        row_starts[starts[starts < nnz]] = True
        if np.any((col64[1:] <= col64[:-1]) & ~row_starts[1:]):
            raise error(f"{where}: column indices within a row are not sorted and unique", path=path, hint="the artifact is corrupt; rebuild it")


def check_csr_artifact(meta: Any, tensors: Mapping[str, Any], path: str | Path) -> None:
    """Check a torch-sparse-cpu artifact's metadata and CSR tensors before any layer is made dense.

    Raises:
        TargetError: wrong types, missing tensors, broken CSR invariants, or dense layers
            whose total size is over the ``dense_bytes`` limit.
    """
    from .errors import TargetError

    if not isinstance(meta, Mapping) or not isinstance(meta.get("model"), Mapping) or not isinstance(meta.get("csr_layers"), list):
        raise TargetError("artifact metadata needs a 'model' object and a 'csr_layers' list", path=path, hint="rebuild the artifact with dnsconvert export")
    shapes: dict[str, tuple[int, int]] = {}
    for layer in meta["csr_layers"]:
        if not isinstance(layer, Mapping) or not isinstance(layer.get("name"), str) or not isinstance(layer.get("kernels"), Mapping):
            raise TargetError(f"artifact metadata has a malformed CSR layer record ({str(layer)[:80]})", path=path, hint="rebuild the artifact")
        name, shape = layer["name"], layer.get("shape")
        if not isinstance(shape, list) or len(shape) != 2:
            raise TargetError(f"CSR layer {name!r} has shape {str(shape)[:40]}; expected [rows, cols]", path=path)
        shapes[name] = limits.check_shape(shape, f"CSR layer {name!r}", path=path, allow_zero=False)
    # the dense size first: every layer is made dense when the artifact loads
    limits.check("dense_bytes", sum(rows * cols * 4 for rows, cols in shapes.values()), "the artifact's CSR layers made dense", path=path)
    for name, (rows, cols) in shapes.items():
        parts = {}
        for part in ("crow_indices", "col_indices", "values"):
            tensor = tensors.get(f"csr/{name}/{part}")
            if tensor is None:
                raise TargetError(f"CSR layer {name!r} has no {part} tensor", path=path, hint="the artifact is incomplete; rebuild it")
            try:
                parts[part] = tensor.numpy() if hasattr(tensor, "numpy") else np.asarray(tensor)
            except (TypeError, RuntimeError):
                raise TargetError(f"CSR layer {name!r}: {part} has dtype {getattr(tensor, 'dtype', '?')}, which no CSR kernel takes", path=path) from None
        check_csr(parts["crow_indices"], parts["col_indices"], parts["values"], (rows, cols), name=name, path=path, error=TargetError)
    # the model the loader builds before loading the layers: its size, on the meta device
    from .modelspec import ModelSpec
    from .models import check_model_size

    try:
        spec = ModelSpec.from_json(meta["model"])
        check_model_size(spec, source=path)
    except UserError as exc:
        if exc.path is None:
            exc.path = str(path)
        raise
