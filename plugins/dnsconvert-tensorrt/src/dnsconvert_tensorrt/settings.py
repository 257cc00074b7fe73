"""Build settings shared by the Python-API builder and the trtexec path (one source of truth)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dnsconvert.plugin import TargetError, option_bool, option_number

OPTION_HELP = {
    "precision": "fp16 (default), bf16, tf32, int8 (needs Q/DQ nodes in the ONNX) or fp32",
    "workspace_mib": "builder workspace memory pool in MiB (default 4096)",
    "min_batch": "optimization profile: smallest batch (default 1)",
    "opt_batch": "optimization profile: batch to tune for (default 16)",
    "max_batch": "optimization profile: largest batch (default 64)",
    "timing_cache": "timing cache file, read and updated (default: a fresh one inside the artifact)",
    "use_trtexec": "1: drive trtexec even if the Python API is importable (default 0)",
    "opset": "ONNX opset for the intermediate export (default 18)",
}


@dataclass(frozen=True)
class BuildSettings:
    precision: str = "fp16"
    workspace_mib: int = 4096
    min_batch: int = 1
    opt_batch: int = 16
    max_batch: int = 64
    timing_cache: Path | None = None
    use_trtexec: bool = False
    opset: int = 18

    @classmethod
    def from_options(cls, options: Mapping[str, str], default_cache: Path) -> BuildSettings:
        precision = options.get("precision", "fp16")
        if precision not in ("fp16", "bf16", "tf32", "int8", "fp32"):
            raise TargetError(f"precision={precision!r} is not fp16, bf16, tf32, int8 or fp32")
        settings = cls(
            precision=precision,
            workspace_mib=option_number(options, "workspace_mib", 4096, int),
            min_batch=option_number(options, "min_batch", 1, int),
            opt_batch=option_number(options, "opt_batch", 16, int),
            max_batch=option_number(options, "max_batch", 64, int),
            timing_cache=Path(options["timing_cache"]) if "timing_cache" in options else default_cache,
            use_trtexec=option_bool(options, "use_trtexec", False),
            opset=option_number(options, "opset", 18, int),
        )
        if not 1 <= settings.min_batch <= settings.opt_batch <= settings.max_batch:
            raise TargetError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {settings.min_batch}, {settings.opt_batch}, {settings.max_batch}")
        return settings

    def shapes(self, input_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        rest = tuple(input_shape[1:])
        return (self.min_batch, *rest), (self.opt_batch, *rest), (self.max_batch, *rest)
