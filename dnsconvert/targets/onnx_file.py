"""The ``onnx`` target: the portable sparse-at-rest ONNX file, checked with ONNX's own
reference evaluator (``onnx.reference``), independent of any runtime. Slow: for proof, not speed."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx

from ..artifact import Artifact
from .base import BuildOptions, Target
from .ort import COMMON_OPTIONS, build_onnx_for, write_onnx_artifact


class ReferenceRunner:
    def __init__(self, model: bytes):
        from onnx.reference import ReferenceEvaluator

        from ..export.sparse_init import densify

        proto = onnx.load_from_string(model)
        # The reference evaluator reads graph.initializer only; densify is exact.
        self.evaluator = ReferenceEvaluator(densify(proto))
        self.input_names = [i.name for i in proto.graph.input]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.evaluator.run(None, {name: feeds[name] for name in self.input_names}))

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
        built = build_onnx_for(self, ckpt, options, lambda model: ReferenceRunner(model).run)
        return write_onnx_artifact(self, ckpt, built, output)

    def load(self, artifact: Artifact, variant: str = "sparse", options: Mapping[str, str] | None = None, *, trust_model_code: bool = False) -> ReferenceRunner:
        from ..errors import TargetError
        from ..export.onnx_check import parse_onnx

        data = artifact.read(variant)
        parse_onnx(data, path=artifact.files[variant], error=TargetError)  # h11 (issue 11): the one checked ONNX read
        return ReferenceRunner(data)
