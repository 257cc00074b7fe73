"""Which TensorRT is this: feature detection (never version strings) and the build plan it implies.

TensorRT 10.x networks are weakly typed by default: precision comes from builder flags
(``BuilderFlag.FP16``/``BF16``/``INT8``) applied to an fp32 ONNX, or from the graph's own
types with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``. TensorRT 11.x removed the
precision flags, calibrators, ``ILayer.precision``, ``set_output_type`` and
``platform_has_fast_fp16``; every network is strongly typed and the ``STRONGLY_TYPED`` flag is
deprecated and ignored (NVIDIA, "Migrating from TensorRT 10.x to 11.x", Python API reference
and the 11.0 ``Builder`` page). So the plan is chosen by what the module exposes:

=========  ===================================  =========================================
precision  weak typing available (10.x)           strongly typed only (11.x)
=========  ===================================  =========================================
fp32       fp32 ONNX, clear ``TF32``              fp32 ONNX, clear ``TF32``
tf32       fp32 ONNX (TF32 is on by default)      same
fp16/bf16  fp32 ONNX + ``FP16``/``BF16`` flag     fp16/bf16 ONNX (weights and compute typed)
int8       Q/DQ ONNX, ``STRONGLY_TYPED`` network  Q/DQ ONNX
=========  ===================================  =========================================

INT8 always comes from explicit Q/DQ nodes: NVIDIA's explicit-quantization guide says to use
it with strong typing and not to set precision flags. ``typing=strong`` asks 10.x for the
typed-ONNX path too (what 11.x does); ``typing=weak`` on 11.x is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .core import TargetError

PRECISION_FLAGS = {"fp16": "FP16", "bf16": "BF16"}
WEAK_TYPING_FLAGS = ("FP16", "BF16", "INT8")  # removed in 11.x
TYPING_CHOICES = ("auto", "weak", "strong")


@dataclass(frozen=True)
class TrtFeatures:
    """What the importable ``tensorrt`` (or the ``trtexec`` on PATH) offers."""

    version: str
    weak_typing: bool  # the precision builder flags exist (10.x)
    strongly_typed_flag: bool  # strong typing must be asked for with NetworkDefinitionCreationFlag.STRONGLY_TYPED (10.x)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def detect(trt: Any) -> TrtFeatures:
    """Feature detection on a ``tensorrt`` module: the precision flags either exist or do not."""
    weak = all(hasattr(trt.BuilderFlag, name) for name in WEAK_TYPING_FLAGS)
    # On 11.x the flag still exists but is ignored; only where weak typing is the default does it matter.
    needs_flag = weak and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    return TrtFeatures(str(getattr(trt, "__version__", "unknown")), weak, needs_flag)


@dataclass(frozen=True)
class BuildPlan:
    """How one precision is built on one TensorRT generation (pure data, shared by API and trtexec)."""

    precision: str
    path: str  # "weak-typing-flags" or "strongly-typed"
    onnx_precision: str  # what the ONNX given to TensorRT holds: fp32, fp16, bf16 or int8 (Q/DQ)
    set_flags: tuple[str, ...]  # BuilderFlag names (SPARSE_WEIGHTS is added per engine)
    clear_flags: tuple[str, ...]
    strongly_typed_network: bool  # pass 1 << STRONGLY_TYPED to create_network (10.x only)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["set_flags"], data["clear_flags"] = list(self.set_flags), list(self.clear_flags)
        return data


def plan_build(precision: str, features: TrtFeatures, typing: str = "auto") -> BuildPlan:
    """The build plan for ``precision`` on the TensorRT described by ``features``."""
    if typing not in TYPING_CHOICES:
        raise TargetError(f"typing={typing!r} is not one of {', '.join(TYPING_CHOICES)}")
    if typing == "weak" and not features.weak_typing:
        raise TargetError(f"typing=weak needs the precision builder flags, which TensorRT {features.version} does not have (removed in 11.x)", hint="drop -T typing or use typing=strong")
    clear = ("TF32",) if precision == "fp32" else ()
    if precision in ("fp32", "tf32"):
        path = "weak-typing-flags" if features.weak_typing and typing != "strong" else "strongly-typed"
        return BuildPlan(precision, path, "fp32", (), clear, path == "strongly-typed" and features.strongly_typed_flag)
    strong = (not features.weak_typing) or typing == "strong" or (precision == "int8" and typing != "weak")
    if strong:
        return BuildPlan(precision, "strongly-typed", precision, (), clear, features.strongly_typed_flag)
    if precision == "int8":  # typing=weak on 10.x: Q/DQ ONNX with the INT8 (and FP16 fallback) flags, the TensorRT 8 recipe
        return BuildPlan(precision, "weak-typing-flags", "int8", ("INT8", "FP16"), clear, False)
    return BuildPlan(precision, "weak-typing-flags", "fp32", (PRECISION_FLAGS[precision],), clear, False)
