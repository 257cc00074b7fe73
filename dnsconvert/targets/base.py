"""The Target interface: one class per runtime, found through the ``dnsconvert.targets`` entry points.

A target builds, from a SparseCheckpoint, a *sparse* artifact and its *dense baseline* for
the same runtime (so that benchmarks compare like with like), writes them through the
artifact writer (one commit point, a typed manifest), and loads either as a Runner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from ..artifact import Artifact
from ..errors import TargetError


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""


@dataclass(frozen=True)
class BuildOptions:
    """Options every target understands, plus the target-specific ``-T key=value`` pairs."""

    atol: float = 1e-4
    rtol: float = 1e-4
    trust_model_code: bool = False
    extra: Mapping[str, str] = field(default_factory=dict)


class Runner(Protocol):
    """Runs one set of named inputs and returns the model's outputs in graph order;
    ``synchronize`` waits for asynchronous devices (no-op on CPU).

    GPU runners may also offer ``prepare(feeds) -> handle`` and ``run_device(handle)``: the
    bench then uploads the inputs once and times the model alone.
    """

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...

    def synchronize(self) -> None: ...

    def close(self) -> None: ...


class Target:
    """Base class of targets. Subclasses set ``name``, ``description``, ``option_help``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    exploits_sparsity: ClassVar[str] = "no"  # what a benchmark reader should expect
    option_help: ClassVar[dict[str, str]] = {}

    def availability(self) -> Availability:
        return Availability(True)

    def require_available(self) -> None:
        status = self.availability()
        if not status.available:
            raise TargetError(f"target {self.name!r} is not available here: {status.reason}")

    def check_options(self, options: Mapping[str, str]) -> None:
        unknown = sorted(set(options) - set(self.option_help))
        if unknown:
            known = ", ".join(self.option_help) or "none"
            raise TargetError(f"target {self.name!r} has no option {', '.join(unknown)}", hint=f"its -T options: {known}")

    def build(self, ckpt: Any, output: Path, options: BuildOptions) -> Artifact:
        """Build the artifact folder ``output`` (through :class:`~dnsconvert.artifact.ArtifactWriter`)."""
        raise NotImplementedError

    def load(self, artifact: Artifact, variant: str = "sparse", options: Mapping[str, str] | None = None, *, trust_model_code: bool = False) -> Runner:
        """A runner for one variant; files come from :meth:`Artifact.read` (hash-checked).
        ``trust_model_code`` is the current caller's, never a file's."""
        raise NotImplementedError


def option_bool(options: Mapping[str, str], key: str, default: bool) -> bool:
    if key not in options:
        return default
    value = str(options[key]).lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise TargetError(f"option {key}={options[key]!r} is not a boolean", hint="use 1/0, true/false")


def option_number(options: Mapping[str, str], key: str, default: float, kind: type = float) -> Any:
    if key not in options:
        return default
    try:
        return kind(options[key])
    except ValueError:
        raise TargetError(f"option {key}={options[key]!r} is not a {kind.__name__}") from None
