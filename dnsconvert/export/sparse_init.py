"""Dense <-> sparse ONNX initializers (``GraphProto.sparse_initializer``, COO).

Index form: one INT64 index per nonzero into the *flattened* tensor ([NNZ], the ONNX spec's
linearised form), not [NNZ, rank] coordinates: for a rank-r tensor that is 8 bytes of index
per nonzero instead of 8·r. With fp32 values a sparse tensor costs 12 bytes per nonzero
against 4 per element dense, so it is smaller only above 2/3 sparsity, and never below
0.15× of dense at 95%. A tensor is sparsified only when that makes it smaller
(``min_saving``). INT64 is what the spec requires; ONNX Runtime also reads INT32, but the
checker and other consumers need not, so we keep INT64.

``densify`` is exact and deterministic: initializers return to their original positions,
so densify(sparsify(m)) serialises to the same bytes as m.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

ORDER_KEY = "dnsconvert.initializer_order"


@dataclass(frozen=True)
class SparsifiedTensor:
    name: str
    shape: tuple[int, ...]
    nnz: int
    dense_bytes: int
    sparse_bytes: int
    sparsified: bool
    reason: str


def sparsify_initializers(
    model: onnx.ModelProto,
    names: Iterable[str] | None = None,
    *,
    min_saving: float = 0.0,
) -> tuple[onnx.ModelProto, list[SparsifiedTensor]]:
    """Move initializers with enough zeros to ``graph.sparse_initializer``; returns a copy.

    Args:
        model: a model with dense initializers.
        names: candidate initializer names (default: every float initializer of rank ≥ 2).
        min_saving: sparsify only if the sparse form is at least this fraction smaller.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    wanted = set(names) if names is not None else None
    order = [init.name for init in graph.initializer]
    keep: list[onnx.TensorProto] = []
    records: list[SparsifiedTensor] = []
    for init in graph.initializer:
        if wanted is not None and init.name not in wanted:
            keep.append(init)
            continue
        array = numpy_helper.to_array(init)
        if wanted is None and (array.ndim < 2 or array.dtype.kind != "f"):
            keep.append(init)
            continue
        flat = array.reshape(-1)
        index = np.flatnonzero(flat).astype(np.int64)
        dense_bytes = flat.nbytes
        sparse_bytes = index.nbytes + index.size * flat.itemsize
        if sparse_bytes > (1.0 - min_saving) * dense_bytes:
            keep.append(init)
            records.append(SparsifiedTensor(init.name, array.shape, index.size, dense_bytes, sparse_bytes, False, "sparse form would not be smaller"))
            continue
        values = numpy_helper.from_array(flat[index], name=init.name)
        indices = numpy_helper.from_array(index, name=f"{init.name}.indices")
        graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, list(array.shape)))
        records.append(SparsifiedTensor(init.name, array.shape, index.size, dense_bytes, sparse_bytes, True, "sparsified"))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if graph.sparse_initializer:
        entry = out.metadata_props.add()
        entry.key, entry.value = ORDER_KEY, json.dumps(order)
    return out, records


def sparse_to_dense(sparse: onnx.SparseTensorProto) -> onnx.TensorProto:
    values = numpy_helper.to_array(sparse.values)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    shape = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(int(np.prod(shape)), dtype=values.dtype)
    if indices.ndim == 2:  # [NNZ, rank] coordinates
        indices = np.ravel_multi_index(tuple(indices.T), shape)
    dense[indices] = values
    return numpy_helper.from_array(dense.reshape(shape), name=sparse.values.name)


def densify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move every sparse initializer back to ``graph.initializer`` (for parsers that read only those).

    The sparse tensors are checked first (indices in range, sorted, unique, as many as the
    values; dense size within the ``dense_bytes`` limit): a UserError, never a wrong model.
    """
    from .onnx_check import check_tensors

    check_tensors(model, path=None)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    dense = {init.name: init for init in graph.initializer}
    for sparse in graph.sparse_initializer:
        tensor = sparse_to_dense(sparse)
        dense[tensor.name] = tensor
    props = [p for p in out.metadata_props if p.key == ORDER_KEY]
    order = json.loads(props[0].value) if props else []
    ordered = [dense.pop(name) for name in order if name in dense] + list(dense.values())
    del graph.sparse_initializer[:]
    del graph.initializer[:]
    graph.initializer.extend(ordered)
    kept_props = [p for p in out.metadata_props if p.key != ORDER_KEY]
    del out.metadata_props[:]
    out.metadata_props.extend(kept_props)
    return out


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Every initializer, dense or sparse, as a dense array by name."""
    arrays = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for sparse in model.graph.sparse_initializer:
        arrays[sparse.values.name] = numpy_helper.to_array(sparse_to_dense(sparse))
    return arrays
