"""Drive ``trtexec`` where the TensorRT Python API is absent but the tool is on PATH."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from dnsconvert.plugin import TargetError

from .logparse import SparsityLog, parse_builder_log
from .settings import BuildSettings

PRECISION_FLAGS = {"fp16": ["--fp16"], "bf16": ["--bf16"], "int8": ["--int8", "--fp16"], "tf32": [], "fp32": ["--noTF32"]}


def find_trtexec() -> str | None:
    return shutil.which("trtexec")


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
        "--verbose",
    ]
    command += PRECISION_FLAGS[settings.precision]
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
