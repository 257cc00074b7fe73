"""Export: torch -> ONNX with sparse initializers, densify, parity, graph N:M, manifest.

:func:`build_onnx_artifact` is the shared ONNX path of every ONNX-based target: export the
masked model, move pruned weights to ``graph.sparse_initializer``, check the model, compare
the runtime's output with PyTorch's, re-validate N:M on the exported graph, and only then
write the sparse ONNX, its dense twin and the manifest (nothing is written on failure).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .._atomic import atomic_path, write_json_atomic
from ..checkpoint import SparseCheckpoint
from ..errors import ExportError, GateFailed
from ..pattern import TWO_FOUR
from ..validate import check_finite
from .graph_nm import check_graph_nm
from .manifest import base_manifest, bytes_record, manifest_path_for
from .onnx_export import export_checkpoint, torch_to_onnx
from .parity import compare, parity_inputs, torch_runner
from .sparse_init import densify, initializer_arrays, sparsify_initializers

__all__ = [
    "build_onnx_artifact",
    "check_graph_nm",
    "densify",
    "densify_file",
    "export",
    "export_checkpoint",
    "sparsify_initializers",
    "torch_to_onnx",
]

OnnxRunnerFactory = Callable[[bytes], Callable[[np.ndarray], np.ndarray]]


def dense_twin_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.dense{path.suffix}")


def build_onnx_artifact(
    ckpt: SparseCheckpoint,
    output: Path,
    *,
    target: str,
    make_runner: OnnxRunnerFactory,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    opset: int = 18,
    dynamic_batch: bool = True,
    min_saving: float = 0.0,
    trust_code: bool = False,
    parity_batches: tuple[int, ...] = (1, 4),
    precision: str = "fp32",
    io: str = "fp32",
    calibration: Any = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Export, check and write ``output`` (sparse), its dense twin and manifest; returns (manifest, files)."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    # Structure and finiteness here; fitting the model is checked when export_checkpoint loads it.
    ckpt.check_structure()
    check_finite(ckpt)
    exported = export_checkpoint(ckpt, opset=opset, dynamic_batch=dynamic_batch, trust_code=trust_code)
    timings["torch_onnx_export_s"] = time.perf_counter() - started
    dense_proto, names = exported.model, dict(exported.names)
    fp32_proto = dense_proto
    # --- precision hook (issue 14): standalone steps in export/precision.py; the step-wise builder takes it over ---
    step = None
    if precision != "fp32":
        from .precision import precision_step

        step = precision_step(dense_proto, names, precision, io=io, calibration=calibration)
        dense_proto, names = step.model, step.names
    # --- end of precision hook ---
    sparse_proto, records = sparsify_initializers(dense_proto, names.values(), min_saving=min_saving)
    try:
        onnx.checker.check_model(sparse_proto)  # full_check's strict shape inference rejects sparse initializers
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported model fails onnx.checker: {str(exc).splitlines()[0]}") from None
    sparse_bytes = sparse_proto.SerializeToString()
    dense_bytes = dense_proto.SerializeToString()
    # The artifact must keep every masked weight at zero. (Values may differ from the
    # checkpoint's where the exporter folded e.g. BatchNorm into a Conv; parity checks those.)
    arrays = initializer_arrays(sparse_proto)
    for param, init_name in names.items():
        got = arrays[init_name].T if init_name.removesuffix("_quantized").endswith(".T") else arrays[init_name]
        mask = (ckpt.masks[param] != 0).numpy()
        if got.shape != mask.shape or np.any(got[~mask] != 0):
            raise ExportError(f"initializer {init_name!r} is nonzero where {param!r} is masked")
    inputs = parity_inputs(ckpt.model.input_shape, parity_batches if dynamic_batch else (ckpt.model.input_shape[0],))
    if step is None:
        parity = compare(torch_runner(exported.torch_model), make_runner(sparse_bytes), inputs, atol=atol, rtol=rtol)
    else:  # the same dtype in PyTorch vs ONNX Runtime (bf16 emulated there); tolerances per type
        from .parity import ParityReport
        from .precision import precision_parity

        checked = precision_parity(exported.torch_model, sparse_proto, precision, inputs)
        parity = ParityReport(checked.max_abs, checked.max_rel_to_range, checked.atol, checked.rtol, tuple(len(i) for i in inputs), checked.passed)
    graph_nm = check_graph_nm(fp32_proto, TWO_FOUR, arrays=initializer_arrays(fp32_proto))  # the pattern, before any cast/quantization
    timings["total_s"] = time.perf_counter() - started
    layer_of = {v: k for k, v in names.items()}
    manifest = base_manifest(target, ckpt)
    manifest.update(
        {
            "format": "onnx",
            "opset": opset,
            "dynamic_batch": dynamic_batch,
            "sizes": {"sparse_bytes": len(sparse_bytes), "dense_bytes": len(dense_bytes), "ratio": len(sparse_bytes) / len(dense_bytes)},
            "sparse_initializers": {"index_dtype": "int64", "index_form": "linearized [NNZ]", "min_saving": min_saving},
            "layers": [
                {
                    "param": layer_of.get(r.name, r.name),
                    "initializer": r.name,
                    "shape": list(r.shape),
                    "sparsity": 1 - r.nnz / max(1, int(np.prod(r.shape))),
                    "nnz": r.nnz,
                    "stored_sparse": r.sparsified,
                    "dense_bytes": r.dense_bytes,
                    "sparse_bytes": r.sparse_bytes,
                }
                for r in records
            ],
            "graph_2_4": [
                {"initializer": g.initializer, "op": g.op, "reduction_axis": g.reduction_axis, "compliant": g.compliant, "violating_groups": g.violating_groups, "skipped": g.skipped_reason}
                for g in graph_nm
            ],
            "parity": parity.to_json(),
            "timings": timings,
        }
    )
    if step is not None:  # sizes beside fp32, the parity reference, the int8 calibration report
        fp32_sparse = sparsify_initializers(fp32_proto, exported.names.values(), min_saving=min_saving)[0].ByteSize()
        manifest["precision"] = {
            **step.to_json(), "parity_reference": checked.reference, "parity_runtime": "onnxruntime CPU" + (" (bf16 emulated in fp32)" if precision == "bf16" else ""),
            "sizes": {"fp32": {"sparse_bytes": fp32_sparse, "dense_bytes": fp32_proto.ByteSize()}, precision: {"sparse_bytes": len(sparse_bytes), "dense_bytes": len(dense_bytes)}},
        }  # fmt: skip
    if not parity.passed:
        raise GateFailed(f"parity failed: max |Δ| {parity.max_abs:.3g} exceeds atol {atol:g} + rtol {rtol:g}·|ref|; nothing was written")
    dense_path = dense_twin_path(output)
    manifest_path = manifest_path_for(output)
    with contextlib.ExitStack() as stack:
        sparse_tmp = stack.enter_context(atomic_path(output))
        dense_tmp = stack.enter_context(atomic_path(dense_path))
        sparse_tmp.write_bytes(sparse_bytes)
        dense_tmp.write_bytes(dense_bytes)
    manifest["files"] = {"sparse": bytes_record(output, sparse_bytes), "dense": bytes_record(dense_path, dense_bytes)}
    write_json_atomic(manifest_path, manifest)
    return manifest, {"sparse": output, "dense": dense_path, "manifest": manifest_path}


def densify_file(source: Path, output: Path) -> Path:
    """Sparse ONNX -> dense ONNX (deterministic: the same input gives byte-identical output)."""
    from ..errors import UserError

    try:
        model = onnx.load(str(source), load_external_data=False)
    except Exception as exc:
        raise UserError(f"cannot read as ONNX ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})", path=source) from None
    with atomic_path(output) as tmp:
        tmp.write_bytes(densify(model).SerializeToString())
    return output


def export(ckpt: SparseCheckpoint, output: str | Path, *, target: str = "ort", **options: Any):
    """Library entry point: build ``target``'s artifact from ``ckpt``; returns the Artifact."""
    from ..targets import BuildOptions, get_target

    chosen = get_target(target)
    extra = {k: str(v) for k, v in options.pop("extra", {}).items()}
    chosen.check_options(extra)
    return chosen.build(ckpt, Path(output), BuildOptions(extra=extra, **options))
