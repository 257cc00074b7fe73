"""Build settings shared by the Python-API builder and the trtexec path (one source of truth)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .api import TYPING_CHOICES
from .core import TargetError, option_bool, option_number

PRECISIONS = ("fp16", "bf16", "tf32", "int8", "fp32")
LOG_LEVELS = ("info", "verbose")
OPTION_HELP = {
    "precision": "fp16 (default), bf16, tf32, int8 (explicit Q/DQ from -T calibration=...) or fp32",
    "typing": "auto (default: builder flags where TensorRT has them, 10.x; typed ONNX on 11.x), weak, or strong",
    "io": "fp16/bf16 typed ONNX: engine inputs/outputs fp32 (default) or native",
    "calibration": "int8 calibration set: MNIST folder, synthetic, random, FILE.npy or FILE.npz",
    "calibration_samples": "int8 calibration samples (default 512)",
    "workspace_mib": "builder workspace memory pool in MiB (default 4096)",
    "min_batch": "optimization profile: smallest batch (default 1)",
    "opt_batch": "optimization profile: batch to tune for (default 16)",
    "max_batch": "optimization profile: largest batch (default 64)",
    "timing_cache": "timing cache file, read and updated (default: a fresh one inside the artifact)",
    "use_trtexec": "1: drive trtexec even if the Python API is importable (default 0)",
    "log": "builder log kept in <engine>.build.log: info (default; has the (Sparsity) lines) or verbose",
    "opset": "ONNX opset for the intermediate export (default 18)",
}


@dataclass(frozen=True)
class BuildSettings:
    precision: str = "fp16"
    typing: str = "auto"
    io: str = "fp32"
    calibration: str | None = None
    calibration_samples: int = 512
    workspace_mib: int = 4096
    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 64
    timing_cache: Path | None = None
    use_trtexec: bool = False
    log: str = "info"
    opset: int = 18

    @classmethod
    def from_options(cls, options: Mapping[str, str], default_cache: Path | None = None) -> BuildSettings:
        precision = options.get("precision", "fp16")
        if precision not in PRECISIONS:
            raise TargetError(f"precision={precision!r} is not fp16, bf16, tf32, int8 or fp32")
        typing = options.get("typing", "auto")
        if typing not in TYPING_CHOICES:
            raise TargetError(f"typing={typing!r} is not one of {', '.join(TYPING_CHOICES)}")
        if options.get("io", "fp32") not in ("fp32", "native"):
            raise TargetError(f"io={options['io']!r} is not fp32 or native")
        if options.get("log", "info") not in LOG_LEVELS:
            raise TargetError(f"log={options['log']!r} is not info or verbose")
        if precision == "int8" and "calibration" not in options:
            raise TargetError("precision=int8 builds from an explicit Q/DQ ONNX and needs a calibration set", hint="add -T calibration=DIR|synthetic|random|FILE.npz")
        settings = cls(
            precision=precision,
            typing=typing,
            io=options.get("io", "fp32"),
            calibration=options.get("calibration"),
            calibration_samples=option_number(options, "calibration_samples", 512, int),
            workspace_mib=option_number(options, "workspace_mib", 4096, int),
            min_batch=option_number(options, "min_batch", 1, int),
            opt_batch=option_number(options, "opt_batch", 16, int),
            max_batch=option_number(options, "max_batch", 64, int),
            timing_cache=Path(options["timing_cache"]) if "timing_cache" in options else default_cache,
            use_trtexec=option_bool(options, "use_trtexec", False),
            log=options.get("log", "info"),
            opset=option_number(options, "opset", 18, int),
        )
        if not 1 <= settings.min_batch <= settings.opt_batch <= settings.max_batch:
            raise TargetError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {settings.min_batch}, {settings.opt_batch}, {settings.max_batch}")
        return settings

    def shapes(self, input_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        rest = tuple(input_shape[1:])
        return (self.min_batch, *rest), (self.opt_batch, *rest), (self.max_batch, *rest)
