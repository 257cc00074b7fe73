"""Read an ONNX file safely: the one way dnsconvert reads ONNX that it did not just make.

:func:`read_onnx` refuses, as one UserError naming the file: a missing, empty, oversized or
unparsable (truncated) file; external data (a path read from a file must not lead elsewhere);
a tensor whose stated dims need more bytes than it holds; sparse tensors whose indices are
out of range, unsorted, duplicated or not as many as their values; sparse tensors whose dense
size (summed over the file) is over the ``dense_bytes`` limit; and anything ``onnx.checker``
rejects. It runs before anything is made dense, so ``densify`` and every runtime that loads
the file (ONNX Runtime reads the same checked bytes) see only a checked model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .. import limits
from ..errors import UserError
from ..sparse_checks import check_coo

PROTOBUF_LIMIT = 2**31 - 1  # a serialized ModelProto cannot be larger (protobuf's 2 GiB)


@dataclass(frozen=True)
class CheckedOnnx:
    """A parsed, checked model and the exact bytes it was parsed from (hand those to a runtime)."""

    model: onnx.ModelProto
    data: bytes
    path: Path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def read_onnx(path: str | Path, *, what: str = "ONNX model", error: type[UserError] = UserError) -> CheckedOnnx:
    """Read, parse and check the ONNX file at ``path``; every fault is one ``error``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if path.is_dir():
            raise error(f"is a directory, expected an {what} file", path=path)
        if size > PROTOBUF_LIMIT:
            raise error(f"is {size:,} bytes; an ONNX file without external data is at most 2 GiB", path=path)
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"no such {what} file", path=path, hint="check the path") from None
    except OSError as exc:
        raise error(f"cannot read ({exc.strerror or exc})", path=path) from None
    return parse_onnx(data, path=path, what=what, error=error)


def parse_onnx(data: bytes, *, path: str | Path, what: str = "ONNX model", error: type[UserError] = UserError) -> CheckedOnnx:
    """Parse and check ``data`` (read from ``path``, named in messages)."""
    path = Path(path)
    if not data:
        raise error("file is empty", path=path, hint="the write that made it probably failed; re-create it")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError and friends: not ONNX, or truncated
        raise error(f"cannot read as an {what} ({_first_line(exc)})", path=path, hint="the file is truncated, corrupt or not ONNX") from None
    check_tensors(model, path=path, error=error)
    try:
        onnx.checker.check_model(model)  # not full_check: strict shape inference rejects sparse initializers
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise error(f"fails onnx.checker: {_first_line(exc)}", path=path, hint="the file is truncated, corrupt or not a valid ONNX model") from None
    return CheckedOnnx(model, data, path)


def _graphs(graph: onnx.GraphProto, depth: int = 0) -> Iterator[onnx.GraphProto]:
    if depth > limits.get("depth"):
        raise UserError(f"nests subgraphs more than {limits.get('depth')} levels deep")
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g, depth + 1)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graphs(sub, depth + 1)


def _sparse_tensors(graph: onnx.GraphProto) -> Iterator[onnx.SparseTensorProto]:
    yield from graph.sparse_initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                yield attr.sparse_tensor
            elif attr.type == onnx.AttributeProto.SPARSE_TENSORS:
                yield from attr.sparse_tensors


def _dense_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.TENSORS:
                yield from attr.tensors


_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
_PACKED_4BIT = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4, getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}


def _itemsize(data_type: int, what: str, path: Path | None, error: type[UserError]) -> int | None:
    """Bytes per element of an ONNX data type (None for strings); an unknown type is an error."""
    if data_type == onnx.TensorProto.STRING:
        return None
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        raise error(f"{what} has unknown data type {data_type}", path=path, hint="the file is corrupt or from a newer ONNX") from None


def _held_elements(tensor: onnx.TensorProto, itemsize: int | None) -> int | None:
    """How many elements ``tensor``'s data really holds (None when the dtype has no fixed size)."""
    if itemsize is None:
        return None
    if tensor.HasField("raw_data"):
        if tensor.data_type in _PACKED_4BIT:
            return 2 * len(tensor.raw_data)
        return len(tensor.raw_data) // itemsize
    for field in _TYPED_FIELDS:
        count = len(getattr(tensor, field))
        if count:
            if tensor.data_type in (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128):
                return count // 2
            return count
    return 0


def _check_backed(tensor: onnx.TensorProto, what: str, path: Path | None, error: type[UserError]) -> tuple[tuple[int, ...], int | None]:
    """Refuse external data and dims that need more elements than the tensor holds; returns (dims, itemsize)."""
    label = f"{what} {tensor.name!r}"
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data:
        raise error(f"{label} keeps its data in an external file, which dnsconvert does not read", path=path, hint="save the model with all data inside the .onnx file")
    dims = limits.check_shape(tuple(tensor.dims), label, path=path)
    itemsize = _itemsize(tensor.data_type, label, path, error)
    held = _held_elements(tensor, itemsize)
    if held is not None and held < limits.numel(dims):
        raise error(f"{label} has shape {list(dims)} but holds only {held:,} elements", path=path, hint="the file is truncated or corrupt")
    return dims, itemsize


def check_tensors(model: onnx.ModelProto, *, path: str | Path | None, error: type[UserError] = UserError) -> None:
    """Check every tensor's dims against the data it holds, and every sparse tensor's indices,
    before anything is converted; the sparse tensors' dense sizes are held to ``dense_bytes``."""
    path = Path(path) if path is not None else None
    dense_total = 0
    try:
        graphs = list(_graphs(model.graph))
    except UserError as exc:
        raise error(exc.message, path=path) from None
    for graph in graphs:
        for tensor in _dense_tensors(graph):
            _check_backed(tensor, "tensor", path, error)
        for sparse in _sparse_tensors(graph):
            name = sparse.values.name or "<unnamed>"
            shape = limits.check_shape(tuple(sparse.dims), f"sparse tensor {name!r}", path=path)
            values_dims, itemsize = _check_backed(sparse.values, "sparse values", path, error)
            indices_dims, _ = _check_backed(sparse.indices, "sparse indices", path, error)
            if len(values_dims) != 1 or itemsize is None:
                raise error(f"sparse tensor {name!r} has values of shape {list(values_dims)}; expected numbers of shape [NNZ]", path=path)
            dense_total += limits.numel(shape) * itemsize
            limits.check("dense_bytes", dense_total, f"the sparse tensors made dense (up to {name!r} of shape {list(shape)})", path=path)
            nnz = values_dims[0]
            try:
                indices = numpy_helper.to_array(sparse.indices) if indices_dims or nnz else np.zeros(0, np.int64)
            except Exception as exc:
                raise error(f"sparse tensor {name!r}: cannot read its indices ({_first_line(exc)})", path=path) from None
            check_coo(indices, nnz, shape, name=name, path=path, error=error)
