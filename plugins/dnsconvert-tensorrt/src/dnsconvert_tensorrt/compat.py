"""An engine only runs on the TensorRT version and GPU it was built for: record and check both."""

from __future__ import annotations

from typing import Any

from .core import TargetError


def current_setup() -> dict[str, Any]:
    """TensorRT version and GPU of this machine (None where absent)."""
    setup: dict[str, Any] = {"tensorrt": None, "gpu": None, "compute_capability": None}
    try:
        import tensorrt as trt

        setup["tensorrt"] = trt.__version__
    except ImportError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            setup["gpu"] = torch.cuda.get_device_name()
            setup["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    except ImportError:
        pass
    return setup


def check_engine_compat(recorded: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Raise TargetError, naming both sides, if this setup cannot load the recorded engine."""
    if not current.get("tensorrt"):
        raise TargetError("TensorRT is not installed here, so the engine cannot be loaded", path=where)
    if recorded.get("tensorrt") != current["tensorrt"]:
        raise TargetError(
            f"engine was built with TensorRT {recorded.get('tensorrt')}, this machine has {current['tensorrt']}",
            path=where,
            hint="rebuild it here with dnsconvert export --target trt",
        )
    if recorded.get("compute_capability") != current.get("compute_capability") or recorded.get("gpu") != current.get("gpu"):
        raise TargetError(
            f"engine was built for {recorded.get('gpu')} (sm {recorded.get('compute_capability')}), this machine has {current.get('gpu')} (sm {current.get('compute_capability')})",
            path=where,
            hint="engines are GPU-specific; rebuild it on this GPU",
        )
