"""The surface a target plugin builds on (the only dnsconvert names a plugin should import).

A target is one :class:`Target` subclass registered under the ``dnsconvert.targets`` entry
point group. Its ``build`` turns a checkpoint into an artifact folder, usually by

1. exporting and checking ONNX with :func:`build_onnx` (or rebuilding the PyTorch model
   with :func:`build_masked_model`),
2. measuring parity against :class:`TorchRunner` (or :class:`OrtRunner`) on
   :func:`parity_feeds` with :func:`compare`,
3. staging its files with :class:`ArtifactWriter` and calling ``commit`` (which refuses a
   failed parity, writes the typed :class:`Manifest` and commits once).

A target that builds in reduced precision (fp16, bf16, int8) compares against
:func:`ort_runner`, ONNX Runtime on CPU running a model of any of those precisions (bf16
emulated in fp32), within :data:`PRECISION_TOLERANCES` (``precision -> (atol, rtol)``; int8:
max |Δ| within :data:`INT8_RANGE_TOLERANCE` of each output's range); INT8 calibration inputs
come from :func:`load_calibration` as a :class:`CalibrationSet`.

Its ``load`` reads files with :meth:`Artifact.read` (size- and hash-checked) and returns a
runner: ``run(feeds) -> list of outputs``, ``synchronize()``, ``close()``. Options come as
``-T key=value`` strings: declare them in ``option_help`` and read them with
:func:`option_bool` / :func:`option_number`. Raise :class:`TargetError` for what the user can
fix (exit 2) and :class:`GateFailed` for a failed check (exit 1).
"""

from __future__ import annotations

from .artifact import Artifact, ArtifactWriter, FileRecord, GraphNMRecord, LayerRecord, Manifest, ParityReport, SizeRecord, load_artifact, write_artifact
from .errors import GateFailed, TargetError, UserError
from .export.graph_nm import check_graph_nm
from .export.onnx_build import OnnxBuild, build_onnx
from .export.parity import compare
from .export.precision import INT8_RANGE_TOLERANCE, CalibrationSet, load_calibration, ort_runner
from .export.precision import TOLERANCES as PRECISION_TOLERANCES
from .model_io import FlatIO, TorchRunner, output_names_of, parity_feeds, sample_feeds
from .models import build_masked_model, build_model
from .modelspec import Dim, InputSpec, ModelSpec
from .pattern import TWO_FOUR, NMPattern
from .targets.base import Availability, BuildOptions, Runner, Target, option_bool, option_number
from .targets.ort import OrtRunner, ort_session

__all__ = [
    "Artifact",
    "ArtifactWriter",
    "Availability",
    "BuildOptions",
    "CalibrationSet",
    "Dim",
    "FileRecord",
    "FlatIO",
    "GateFailed",
    "GraphNMRecord",
    "INT8_RANGE_TOLERANCE",
    "InputSpec",
    "LayerRecord",
    "Manifest",
    "ModelSpec",
    "NMPattern",
    "OnnxBuild",
    "OrtRunner",
    "PRECISION_TOLERANCES",
    "ParityReport",
    "Runner",
    "SizeRecord",
    "TWO_FOUR",
    "Target",
    "TargetError",
    "TorchRunner",
    "UserError",
    "build_masked_model",
    "build_model",
    "build_onnx",
    "check_graph_nm",
    "compare",
    "load_artifact",
    "load_calibration",
    "option_bool",
    "option_number",
    "ort_runner",
    "ort_session",
    "output_names_of",
    "parity_feeds",
    "sample_feeds",
    "write_artifact",
]
