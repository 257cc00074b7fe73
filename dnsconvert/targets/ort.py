"""The ``ort`` target: sparse-at-rest ONNX run by ONNX Runtime (CPU), with its dense twin.

ONNX Runtime densifies sparse initializers when it loads a model, so on this runtime the
sparse artifact saves disk and download size, not time: benchmarks show ~1x, honestly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..artifact import Artifact, write_artifact
from ..errors import TargetError
from ..export import OnnxBuild, build_onnx
from .base import Availability, BuildOptions, Target, option_bool, option_number

COMMON_OPTIONS = {
    "opset": "ONNX opset (default 18)",
    "dynamic_batch": "export the declared dynamic dims (batch, sequence) as dynamic (default 1)",
    "min_saving": "sparsify a tensor only if this much smaller (default 0)",
    # precision options (issue 14; dnsconvert/export/precision.py)
    "precision": "fp32 (default), fp16, bf16 (weights and compute in that type) or int8 (explicit Q/DQ)",
    "io": "fp16/bf16 inputs and outputs: fp32 (default, Cast at the edges) or native",
    "calibration": "int8 calibration set: MNIST folder, synthetic, random, FILE.npy or FILE.npz",
    "calibration_samples": "int8 calibration samples (default 512)",
}
SPARSE_FILE, DENSE_FILE = "model.onnx", "model.dense.onnx"


def ort_session(model: bytes | str, threads: int = 0, *, where: Any = None):
    """An ONNX Runtime CPU session; a model ORT refuses is a user error naming ``where``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types for a bad model
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise TargetError(f"ONNX Runtime cannot load the model: {first}", path=where, hint="re-export it with dnsconvert export") from None


class OrtRunner:
    def __init__(self, model: bytes | str, threads: int = 0, *, where: Any = None):
        self.session = ort_session(model, threads, where=where)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.where = where

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self.session.run(None, {name: feeds[name] for name in self.input_names})
        except KeyError as exc:  # h11 (issue 11): inputs described by a file (a manifest) that do not fit the model
            raise TargetError(f"the model needs an input {exc.args[0]!r} that its description lacks", path=self.where, hint="re-export the artifact") from None
        except Exception as exc:
            if type(exc).__name__ != "InvalidArgument":  # ORT's error for feeds of the wrong shape or dtype
                raise
            first = str(exc).strip().splitlines()[0][:200]
            raise TargetError(f"ONNX Runtime refused the inputs the artifact describes ({first})", path=self.where, hint="the manifest's inputs do not match the model; re-export the artifact") from None

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        self.session = None


def build_onnx_for(target: Target, ckpt, options: BuildOptions, make_runner) -> OnnxBuild:
    """The shared ONNX export of ONNX-based targets, with their common ``-T`` options."""
    extra = options.extra
    return build_onnx(
        ckpt,
        make_runner=make_runner,
        atol=options.atol,
        rtol=options.rtol,
        opset=option_number(extra, "opset", 18, int),
        dynamic_batch=option_bool(extra, "dynamic_batch", True),
        min_saving=option_number(extra, "min_saving", 0.0),
        trust_code=options.trust_model_code,
        **precision_options(extra, ckpt),
    )


def precision_options(extra, ckpt) -> dict:
    """The precision keyword arguments of build_onnx from -T options (issue 14)."""
    from ..export.precision import load_calibration

    precision = extra.get("precision", "fp32")
    calibration = None
    if precision == "int8" and "calibration" in extra and ckpt.model is not None:  # no model spec: build_onnx says so
        calibration = load_calibration(extra["calibration"], ckpt.model.input_shape, samples=option_number(extra, "calibration_samples", 512, int))
    return {"precision": precision, "io": extra.get("io", "fp32"), "calibration": calibration}


def write_onnx_artifact(target: Target, ckpt, built: OnnxBuild, output: Path) -> Artifact:
    """Sparse ONNX + dense twin + manifest, committed at once."""
    return write_artifact(
        output,
        ckpt=ckpt,
        files={"sparse": (SPARSE_FILE, built.sparse_bytes), "dense": (DENSE_FILE, built.dense_bytes)},
        target=target.name,
        format="onnx",
        outputs=built.output_names,
        parity=built.parity,
        layers=built.layers,
        graph_2_4=built.graph_2_4,
        sizes=built.sizes,
        details={"index_form": "linearized int64 [NNZ]", "timings": built.timings, **({"precision": built.precision} if built.precision else {})},
    )


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
        built = build_onnx_for(self, ckpt, options, lambda model: OrtRunner(model, threads).run)
        return write_onnx_artifact(self, ckpt, built, output)

    def load(self, artifact: Artifact, variant: str = "sparse", options: Mapping[str, str] | None = None, *, trust_model_code: bool = False) -> OrtRunner:
        if variant not in ("sparse", "dense"):
            raise TargetError(f"unknown variant {variant!r}", hint="sparse or dense")
        from ..export.onnx_check import parse_onnx

        data = artifact.read(variant)
        parse_onnx(data, path=artifact.files[variant], error=TargetError)  # h11 (issue 11): the one checked ONNX read
        return OrtRunner(data, option_number(options or {}, "threads", 0, int), where=artifact.files[variant])
