"""The ONNX builder shared by every ONNX-based target: a checkpoint -> a checked sparse ONNX and
its dense twin, in memory. Writing them is the target's job (through the artifact writer).

Steps, each a function: check the checkpoint -> export the masked model -> reduce its
precision (fp16/bf16/int8, when asked) -> move pruned weights to ``graph.sparse_initializer``
-> run ``onnx.checker`` -> prove every masked weight is zero in the graph -> compare the
runtime with PyTorch on every output -> check 2:4 along the reduction axes the graph's ops use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx

from ..artifact.manifest import GraphNMRecord, LayerRecord, ParityReport, SizeRecord
from ..checkpoint import SparseCheckpoint
from ..errors import ExportError
from ..model_io import TorchRunner, parity_feeds
from ..modelspec import ModelSpec
from ..pattern import TWO_FOUR
from ..validate import check_finite
from .graph_nm import GraphNMResult, check_graph_nm
from .onnx_export import DEFAULT_OPSET, OnnxExport, export_checkpoint
from .parity import RunFn, compare
from .sparse_init import SparsifiedTensor, initializer_arrays, sparsify_initializers

if TYPE_CHECKING:
    from .precision import PrecisionStep

OnnxRunnerFactory = Callable[[bytes], RunFn]


@dataclass
class OnnxBuild:
    """A checked export: the sparse-initializer model, its dense twin, and what was checked."""

    sparse_bytes: bytes
    dense_bytes: bytes
    exported: OnnxExport
    spec: ModelSpec
    layers: list[LayerRecord]
    graph_2_4: list[GraphNMRecord]
    parity: ParityReport | None
    timings: dict[str, float] = field(default_factory=dict)
    precision: dict | None = None  # fp16/bf16/int8 exports: type, io, sizes beside fp32, int8 calibration report

    @property
    def sizes(self) -> SizeRecord:
        return SizeRecord(len(self.sparse_bytes), len(self.dense_bytes), len(self.sparse_bytes) / len(self.dense_bytes))

    @property
    def output_names(self) -> list[str]:
        return self.exported.output_names

    @property
    def reference(self) -> TorchRunner:
        """The masked PyTorch model as a runner, for targets that compare their own runtime."""
        return TorchRunner(self.exported.torch_model, self.spec)


def check_exportable(ckpt: SparseCheckpoint) -> None:
    """Structure and finiteness; fitting the model is checked when the model is rebuilt."""
    ckpt.check_structure()
    check_finite(ckpt)


def check_onnx(model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model)  # full_check's strict shape inference rejects sparse initializers
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported model fails onnx.checker: {str(exc).splitlines()[0]}") from None


def check_masked_zeros(names: Mapping[str, str], arrays: Mapping[str, np.ndarray], masks: Mapping) -> None:
    """Every masked weight is zero in the graph. (Values may differ from the checkpoint's where
    the exporter folded e.g. BatchNorm into a Conv; parity checks those.)"""
    for param, init_name in names.items():
        transposed = init_name.removesuffix("_quantized").endswith(".T")  # int8: ONNX Runtime renames W to W_quantized
        got = arrays[init_name].T if transposed else arrays[init_name]
        mask = (masks[param] != 0).numpy()
        if got.shape != mask.shape or np.any(got[~mask] != 0):
            raise ExportError(f"initializer {init_name!r} is nonzero where {param!r} is masked")


def layer_records(records: Iterable[SparsifiedTensor], names: Mapping[str, str]) -> list[LayerRecord]:
    layer_of = {v: k for k, v in names.items()}
    return [
        LayerRecord(
            param=layer_of.get(r.name, r.name),
            initializer=r.name,
            shape=tuple(int(d) for d in r.shape),
            sparsity=1 - r.nnz / max(1, int(np.prod(r.shape))),
            nnz=r.nnz,
            stored_sparse=r.sparsified,
            dense_bytes=r.dense_bytes,
            sparse_bytes=r.sparse_bytes,
        )
        for r in records
    ]


def graph_records(results: Iterable[GraphNMResult]) -> list[GraphNMRecord]:
    return [GraphNMRecord(g.initializer, g.op, g.reduction_axis, g.compliant, g.violating_groups, g.skipped_reason) for g in results]


def reduce_precision(exported: OnnxExport, precision: str, *, io: str, calibration) -> PrecisionStep | None:
    """The exported fp32 model cast to fp16/bf16 or quantized to int8 (:mod:`.precision`);
    None for fp32, where the export is used as it is."""
    if precision == "fp32":
        return None
    from .precision import precision_step

    return precision_step(exported.model, dict(exported.names), precision, io=io, calibration=calibration)


def measure_parity(
    ckpt: SparseCheckpoint,
    exported: OnnxExport,
    sparse_proto: onnx.ModelProto,
    sparse_bytes: bytes,
    make_runner: OnnxRunnerFactory,
    step: PrecisionStep | None,
    *,
    batches: tuple[int, ...],
    atol: float,
    rtol: float,
) -> ParityReport:
    """The sparse model against PyTorch on every output, at ``batches``. fp32: ``make_runner``'s
    runtime against the masked model at ``atol``/``rtol``; a reduced precision: ONNX Runtime
    (bf16 emulated in fp32) against PyTorch in the same dtype, at that type's tolerances."""
    feeds = parity_feeds(ckpt.model.inputs, batches, where=ckpt.source)
    if step is None:
        reference = TorchRunner(exported.torch_model, ckpt.model)
        return compare(reference.run, make_runner(sparse_bytes), feeds, atol=atol, rtol=rtol, output_names=exported.output_names)
    from .precision import precision_parity

    return precision_parity(exported.torch_model, ckpt.model, sparse_proto, step.precision, feeds, exported.output_names)


def precision_details(exported: OnnxExport, step: PrecisionStep, sparse_bytes: bytes, dense_bytes: bytes, *, min_saving: float) -> dict:
    """What a reduced-precision export records: the step, what parity compared, and sizes beside fp32."""
    precision = step.precision
    fp32_sparse = sparsify_initializers(exported.model, exported.names.values(), min_saving=min_saving)[0].ByteSize()
    return {**step.to_json(), "parity_reference": "PyTorch fp32" if precision == "int8" else f"PyTorch {precision}",
            "parity_runtime": "onnxruntime CPU" + (" (bf16 emulated in fp32)" if precision == "bf16" else ""),
            "sizes": {"fp32": {"sparse_bytes": fp32_sparse, "dense_bytes": exported.model.ByteSize()},
                      precision: {"sparse_bytes": len(sparse_bytes), "dense_bytes": len(dense_bytes)}}}  # fmt: skip


def build_onnx(
    ckpt: SparseCheckpoint,
    *,
    make_runner: OnnxRunnerFactory | None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    min_saving: float = 0.0,
    trust_code: bool = False,
    parity_batches: tuple[int, ...] = (1, 4),
    precision: str = "fp32",
    io: str = "fp32",
    calibration=None,
) -> OnnxBuild:
    """Export ``ckpt`` and check it; ``make_runner`` (sparse ONNX bytes -> run function) is the
    runtime parity is measured on (None: no parity, e.g. when a target compares its own)."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    check_exportable(ckpt)
    exported = export_checkpoint(ckpt, opset=opset, dynamic_batch=dynamic_batch, trust_code=trust_code)
    timings["torch_onnx_export_s"] = time.perf_counter() - started
    step = reduce_precision(exported, precision, io=io, calibration=calibration)
    model, names = (exported.model, dict(exported.names)) if step is None else (step.model, step.names)
    sparse_proto, records = sparsify_initializers(model, names.values(), min_saving=min_saving)
    check_onnx(sparse_proto)
    arrays = initializer_arrays(sparse_proto)
    check_masked_zeros(names, arrays, ckpt.masks)
    sparse_bytes = sparse_proto.SerializeToString()
    dense_bytes = model.SerializeToString()
    parity = None
    if make_runner is not None:
        batches = parity_batches if dynamic_batch else (ckpt.model.input_shape[0],)
        parity = measure_parity(ckpt, exported, sparse_proto, sparse_bytes, make_runner, step, batches=batches, atol=atol, rtol=rtol)
    # the 2:4 pattern is checked on the fp32 graph (before any cast or quantization)
    graph_nm = check_graph_nm(exported.model, TWO_FOUR, arrays=arrays if step is None else initializer_arrays(exported.model))
    timings["total_s"] = time.perf_counter() - started
    details = None if step is None else precision_details(exported, step, sparse_bytes, dense_bytes, min_saving=min_saving)
    return OnnxBuild(sparse_bytes, dense_bytes, exported, ckpt.model, layer_records(records, names), graph_records(graph_nm), parity, timings, details)
