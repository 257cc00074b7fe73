"""Resolve a target, check its options, build: the one path from a checkpoint to an artifact,
used by the CLI, the Python API, the pipeline and the bench."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..artifact import Artifact
from ..artifact.writer import check_destination
from .base import BuildOptions, Target
from .registry import get_target


def resolve_target(name: str, options: Mapping[str, Any] | None = None) -> tuple[Target, dict[str, str]]:
    """The available target ``name`` and its ``-T`` options as strings, checked."""
    target = get_target(name)
    extra = {str(k): str(v) for k, v in (options or {}).items()}
    target.check_options(extra)
    return target, extra


def build_artifact(
    ckpt: Any,
    output: str | Path,
    *,
    target: str = "ort",
    options: Mapping[str, Any] | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    trust_model_code: bool = False,
) -> Artifact:
    """Build ``target``'s artifact folder ``output`` from ``ckpt``; returns the Artifact.

    The output is checked before any work starts: it may not be the checkpoint itself, nor a
    file or a folder that is not an artifact.
    """
    chosen, extra = resolve_target(target, options)
    output = Path(output)
    check_destination(output, [getattr(ckpt, "source", None)])
    return chosen.build(ckpt, output, BuildOptions(atol=atol, rtol=rtol, trust_model_code=trust_model_code, extra=extra))
