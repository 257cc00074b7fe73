"""Export: torch -> ONNX with sparse initializers, densify, parity, graph N:M.

This package turns a checkpoint into checked ONNX bytes (:func:`build_onnx`); it never writes
an artifact and never imports a target: targets (:mod:`dnsconvert.targets`) call it and
write what it returns through the artifact writer.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from .._atomic import atomic_path
from .graph_nm import check_graph_nm
from .onnx_build import OnnxBuild, build_onnx
from .onnx_export import export_checkpoint, torch_to_onnx
from .sparse_init import densify, initializer_arrays, sparsify_initializers

__all__ = [
    "OnnxBuild",
    "build_onnx",
    "check_graph_nm",
    "densify",
    "densify_file",
    "export_checkpoint",
    "initializer_arrays",
    "sparsify_initializers",
    "torch_to_onnx",
]


def densify_file(source: Path, output: Path) -> Path:
    """Sparse ONNX -> dense ONNX (deterministic: the same input gives byte-identical output).

    The input is read with :func:`~dnsconvert.export.onnx_check.read_onnx` (checker, sparse
    indices, sizes) before anything is made dense; an output that is the input is refused.
    """
    from .._atomic import check_outputs
    from .onnx_check import read_onnx

    check_outputs([output], [source])
    model = read_onnx(source).model
    dense = densify(model)
    with atomic_path(output) as tmp:
        tmp.write_bytes(dense.SerializeToString())
    return output
