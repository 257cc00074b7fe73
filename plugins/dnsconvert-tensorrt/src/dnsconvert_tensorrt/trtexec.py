"""Drive ``trtexec`` where the TensorRT Python API is absent but the tool is on PATH.

Which generation it is comes from its own ``--help`` (feature detection, not its version
string): 10.x lists ``--fp16``/``--bf16``/``--int8`` and ``--stronglyTyped``; 11.x removed the
precision flags, ``--best`` and ``--calib`` ("Migrating trtexec Usage from TensorRT 10.x to
11.x": strong typing is always on, ``--stronglyTyped`` is no longer needed). ``--sparsity``,
``--noTF32``, ``--memPoolSize``, the shape flags, ``--profilingVerbosity`` and
``--exportLayerInfo`` are in both.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from .api import BuildPlan, TrtFeatures
from .core import TargetError
from .logparse import SparsityLog, parse_builder_log
from .settings import BuildSettings

FLAG_OF = {"FP16": "--fp16", "BF16": "--bf16", "INT8": "--int8"}


def find_trtexec() -> str | None:
    return shutil.which("trtexec")


def trtexec_features(help_text: str) -> TrtFeatures:
    """What a trtexec offers, from its ``--help`` output."""
    version = re.search(r"TensorRT[^\d]*v?(\d+)", help_text)
    weak = all(re.search(rf"(^|\s){re.escape(flag)}\b", help_text, re.MULTILINE) for flag in ("--fp16", "--int8"))
    strongly = re.search(r"--stronglyTyped\b", help_text) is not None
    return TrtFeatures(version.group(1) if version else "unknown", weak, weak and strongly)


def probe_trtexec(executable: str) -> TrtFeatures:
    try:
        completed = subprocess.run([executable, "--help"], capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TargetError(f"cannot run {executable} --help ({exc})") from None
    return trtexec_features(completed.stdout + completed.stderr)


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_command(
    executable: str,
    onnx_path: Path,
    engine_path: Path,
    layer_info_path: Path,
    settings: BuildSettings,
    input_name: str,
    input_shape: tuple[int, ...],
    *,
    sparse: bool,
    plan: BuildPlan,
) -> list[str]:
    """The trtexec invocation for one engine; dense and sparse differ only in --sparsity."""
    low, opt, high = settings.shapes(input_shape)
    command = [
        executable,
        f"--onnx={onnx_path}",
        f"--saveEngine={engine_path}",
        f"--sparsity={'enable' if sparse else 'disable'}",
        f"--memPoolSize=workspace:{settings.workspace_mib}M",
        f"--minShapes={input_name}:{_dims(low)}",
        f"--optShapes={input_name}:{_dims(opt)}",
        f"--maxShapes={input_name}:{_dims(high)}",
        "--profilingVerbosity=detailed",
        f"--exportLayerInfo={layer_info_path}",
        "--skipInference",
        "--verbose",  # trtexec prints the (Sparsity) lines only with it (NVIDIA/apex #1780)
    ]
    command += [FLAG_OF[flag] for flag in plan.set_flags]
    if plan.strongly_typed_network:
        command.append("--stronglyTyped")
    if "TF32" in plan.clear_flags:
        command.append("--noTF32")
    if settings.timing_cache is not None:
        command.append(f"--timingCacheFile={settings.timing_cache}")
    return command


def run_trtexec(command: list[str], log_path: Path) -> SparsityLog:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise TargetError(f"cannot run trtexec ({exc})") from None
    log_path.write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        tail = (completed.stdout + completed.stderr).strip().splitlines()[-1:] or ["no output"]
        raise TargetError(f"trtexec failed with exit code {completed.returncode}: {tail[0][:300]}", hint=f"full log: {log_path}")
    return parse_builder_log((completed.stdout + completed.stderr).splitlines())
