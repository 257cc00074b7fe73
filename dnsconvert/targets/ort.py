"""The ``ort`` target: sparse-at-rest ONNX run by ONNX Runtime (CPU), with its dense twin.

ONNX Runtime densifies sparse initializers when it loads a model, so on this runtime the
sparse artifact saves disk and download size, not time: benchmarks show ~1x, honestly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np

from .base import Artifact, Availability, BuildOptions, Target, option_bool, option_number

COMMON_OPTIONS = {
    "opset": "ONNX opset (default 18)",
    "dynamic_batch": "export a dynamic batch dimension (default 1)",
    "min_saving": "sparsify a tensor only if this much smaller (default 0)",
}


def ort_session(model: bytes | str, threads: int = 0, *, source: Path | None = None):
    """An ONNX Runtime CPU session; ``source``: the file ``model`` was read from, whose load
    errors are then the user's (TargetError, exit 2) rather than a bug."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own types (Fail, InvalidGraph, NotImplemented...)
        if source is None:
            raise
        from ..errors import TargetError

        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise TargetError(f"ONNX Runtime cannot load it ({first})", path=source, hint="the file is corrupt or uses ops this onnxruntime lacks; re-export it") from None


class OrtRunner:
    def __init__(self, model: bytes | str, threads: int = 0, *, source: Path | None = None):
        self.session = ort_session(model, threads, source=source)
        self.input_name = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        self.session = None


def build_onnx_target(target: Target, ckpt, output: Path, options: BuildOptions, make_runner) -> Artifact:
    from ..export import build_onnx_artifact

    extra = options.extra
    target.check_options(extra)
    manifest, files = build_onnx_artifact(
        ckpt,
        output,
        target=target.name,
        make_runner=make_runner,
        atol=options.atol,
        rtol=options.rtol,
        opset=option_number(extra, "opset", 18, int),
        dynamic_batch=option_bool(extra, "dynamic_batch", True),
        min_saving=option_number(extra, "min_saving", 0.0),
        trust_code=options.trust_model_code,
    )
    return Artifact(target.name, {"sparse": files["sparse"], "dense": files["dense"]}, files["manifest"], manifest)


class OrtTarget(Target):
    name: ClassVar[str] = "ort"
    description: ClassVar[str] = "ONNX with sparse initializers, run by ONNX Runtime (CPU)"
    exploits_sparsity: ClassVar[str] = "no: ONNX Runtime densifies sparse initializers at load"
    option_help: ClassVar[dict[str, str]] = {**COMMON_OPTIONS, "threads": "intra-op threads for parity/bench (default: ORT's)"}

    def availability(self) -> Availability:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"onnxruntime is not importable ({exc})")
        return Availability(True, "onnxruntime CPU")

    def build(self, ckpt, output: Path, options: BuildOptions) -> Artifact:
        threads = option_number(options.extra, "threads", 0, int)
        return build_onnx_target(self, ckpt, output, options, lambda model: OrtRunner(model, threads).run)

    def load(self, artifact: Artifact, variant: str = "sparse", options: Mapping[str, str] | None = None) -> OrtRunner:
        from ..errors import TargetError
        from ..export.onnx_check import read_onnx

        checked = read_onnx(artifact.files[variant], error=TargetError)  # issue 11: one checked ONNX read
        return OrtRunner(checked.data, option_number(options or {}, "threads", 0, int), source=checked.path)
