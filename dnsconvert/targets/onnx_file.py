"""The ``onnx`` target: the portable sparse-at-rest ONNX file, checked with ONNX's own
reference evaluator (``onnx.reference``), independent of any runtime. Slow: for proof, not speed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx

from .base import Artifact, BuildOptions, Target
from .ort import COMMON_OPTIONS, build_onnx_target


class ReferenceRunner:
    def __init__(self, model: bytes | str):
        from onnx.reference import ReferenceEvaluator

        from ..export.sparse_init import densify

        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)
        # The reference evaluator reads graph.initializer only; densify is exact.
        self.evaluator = ReferenceEvaluator(densify(proto))
        self.input_name = proto.graph.input[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        return self.evaluator.run(None, {self.input_name: x})[0]

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        pass


class OnnxTarget(Target):
    name: ClassVar[str] = "onnx"
    description: ClassVar[str] = "portable ONNX with sparse initializers, verified by onnx.reference"
    exploits_sparsity: ClassVar[str] = "no: a file format; the reference evaluator is dense and slow"
    option_help: ClassVar[dict[str, str]] = dict(COMMON_OPTIONS)

    def build(self, ckpt, output: Path, options: BuildOptions) -> Artifact:
        return build_onnx_target(self, ckpt, output, options, lambda model: ReferenceRunner(model).run)

    def load(self, artifact: Artifact, variant: str = "sparse", options: Mapping[str, str] | None = None) -> ReferenceRunner:
        from ..errors import TargetError
        from ..export.onnx_check import read_onnx

        return ReferenceRunner(read_onnx(artifact.files[variant], error=TargetError).data)  # issue 11: one checked ONNX read
