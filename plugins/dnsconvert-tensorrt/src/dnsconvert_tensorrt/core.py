"""The one place this plugin imports dnsconvert: only names of the published plugin surface,
``dnsconvert.plugin`` (a test parses this package's imports to keep it so)."""

from __future__ import annotations

from dnsconvert.plugin import (
    INT8_RANGE_TOLERANCE, PRECISION_TOLERANCES, TWO_FOUR, Artifact, ArtifactWriter, Availability, BuildOptions, GateFailed, OrtRunner,
    ParityReport, Target, TargetError, build_onnx, check_graph_nm, compare, load_calibration, option_bool, option_number, ort_runner,
    parity_feeds,
)  # fmt: skip

__all__ = [
    "INT8_RANGE_TOLERANCE", "PRECISION_TOLERANCES", "TWO_FOUR", "Artifact", "ArtifactWriter", "Availability", "BuildOptions", "GateFailed",
    "OrtRunner", "ParityReport", "Target", "TargetError", "build_onnx", "check_graph_nm", "compare", "load_calibration", "option_bool",
    "option_number", "ort_runner", "parity_feeds",
]  # fmt: skip
