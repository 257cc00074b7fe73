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
    # precision options (issue 14; dnsconvert/export/precision.py)
    "precision": "fp32 (default), fp16, bf16 (weights and compute in that type) or int8 (explicit Q/DQ)",
    "io": "fp16/bf16 inputs and outputs: fp32 (default, Cast at the edges) or native",
    "calibration": "int8 calibration set: MNIST folder, synthetic, random, FILE.npy or FILE.npz",
    "calibration_samples": "int8 calibration samples (default 512)",
}


def precision_options(extra, ckpt) -> dict:
    """The precision keyword arguments of build_onnx_artifact from -T options."""
    from ..export.precision import load_calibration

    precision = extra.get("precision", "fp32")
    calibration = None
    if precision == "int8" and "calibration" in extra and ckpt.model is not None:  # no model spec: the export says so
        calibration = load_calibration(extra["calibration"], ckpt.model.input_shape, samples=option_number(extra, "calibration_samples", 512, int))
    return {"precision": precision, "io": extra.get("io", "fp32"), "calibration": calibration}


def ort_session(model: bytes | str, threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


class OrtRunner:
    def __init__(self, model: bytes | str, threads: int = 0):
        self.session = ort_session(model, threads)
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
        **precision_options(extra, ckpt),
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
        return OrtRunner(str(artifact.files[variant]), option_number(options or {}, "threads", 0, int))
