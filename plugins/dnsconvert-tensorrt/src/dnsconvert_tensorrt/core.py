"""The one place this plugin imports dnsconvert.

Everything comes from the published plugin surface, ``dnsconvert.plugin``, except the
precision steps (``dnsconvert.export.precision``: typed ONNX, INT8 calibration sets, the
ONNX Runtime runner that runs every precision), which that surface does not export yet.
"""

from __future__ import annotations

from typing import Any

from dnsconvert.plugin import (
    TWO_FOUR, Artifact, ArtifactWriter, Availability, BuildOptions, GateFailed, OrtRunner, ParityReport, Target, TargetError, build_onnx,
    check_graph_nm, compare, option_bool, option_number, parity_feeds,
)  # fmt: skip

__all__ = [
    "TWO_FOUR", "Artifact", "ArtifactWriter", "Availability", "BuildOptions", "GateFailed", "OrtRunner", "ParityReport", "Target", "TargetError",
    "build_onnx", "check_graph_nm", "compare", "load_calibration", "option_bool", "option_number", "parity_feeds",
    "precision_tolerances", "reference_runner",
]  # fmt: skip


def reference_runner(model: bytes) -> Any:
    """ONNX Runtime (CPU) on ONNX bytes of any precision (bf16 emulated in fp32): feeds -> outputs."""
    from dnsconvert.export.precision import ort_runner

    return ort_runner(model)


def load_calibration(*args: Any, **kwargs: Any):
    from dnsconvert.export.precision import load_calibration as load

    return load(*args, **kwargs)


def precision_tolerances() -> tuple[dict[str, tuple[float, float]], float]:
    from dnsconvert.export.precision import INT8_RANGE_TOLERANCE, TOLERANCES

    return dict(TOLERANCES), INT8_RANGE_TOLERANCE
