"""The one place this plugin imports dnsconvert's own modules.

Everything the plugin needs from the core goes through these names, so that switching to a
published plugin surface (a ``dnsconvert.plugin`` module) is a change to this file alone.
Heavy parts (the ONNX builder, ONNX Runtime, precision steps) are imported when first called.
"""

from __future__ import annotations

from typing import Any

from dnsconvert._atomic import atomic_path, write_bytes_atomic, write_json_atomic
from dnsconvert.errors import GateFailed, TargetError
from dnsconvert.export.graph_nm import check_graph_nm
from dnsconvert.pattern import TWO_FOUR
from dnsconvert.targets.base import Artifact, Availability, BuildOptions, Target, option_bool, option_number

__all__ = [
    "TWO_FOUR", "Artifact", "Availability", "BuildOptions", "GateFailed", "Target", "TargetError", "atomic_path",
    "build_onnx_artifact", "check_graph_nm", "load_calibration", "manifest_helpers", "option_bool", "option_number",
    "parity_inputs", "precision_tolerances", "reference_runner", "write_bytes_atomic", "write_json_atomic",
]  # fmt: skip


def build_onnx_artifact(*args: Any, **kwargs: Any):
    from dnsconvert.export import build_onnx_artifact as build

    return build(*args, **kwargs)


def manifest_helpers():
    """(base_manifest, file_record, manifest_path_for)."""
    from dnsconvert.export.manifest import base_manifest, file_record, manifest_path_for

    return base_manifest, file_record, manifest_path_for


def parity_inputs(*args: Any, **kwargs: Any):
    from dnsconvert.export.parity import parity_inputs as inputs

    return inputs(*args, **kwargs)


def reference_runner(model) -> Any:
    """ONNX Runtime (CPU) on an ONNX model (bytes, or a file path) of any precision (bf16 emulated in fp32)."""
    import onnx

    from dnsconvert.export.precision import ort_runner

    return ort_runner(model if isinstance(model, bytes) else onnx.load(str(model)))


def load_calibration(*args: Any, **kwargs: Any):
    from dnsconvert.export.precision import load_calibration as load

    return load(*args, **kwargs)


def precision_tolerances() -> tuple[dict[str, tuple[float, float]], float]:
    from dnsconvert.export.precision import INT8_RANGE_TOLERANCE, TOLERANCES

    return dict(TOLERANCES), INT8_RANGE_TOLERANCE
