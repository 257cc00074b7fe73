"""The Target interface: one class per runtime, found through the ``dnsconvert.targets`` entry points.

A target builds, from a SparseCheckpoint, a *sparse* artifact and its *dense baseline* for
the same runtime (so that benchmarks compare like with like), records both in a manifest,
and loads either as a Runner.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

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


@dataclass
class Artifact:
    """What a build produced: files by variant (``sparse``, ``dense``) and the manifest."""

    target: str
    files: dict[str, Path]
    manifest_path: Path
    manifest: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.files["sparse"]

    @classmethod
    def from_manifest(cls, manifest_path: str | Path) -> Artifact:
        """Read an artifact back from its manifest (files are resolved beside it)."""
        import json

        from ..errors import UserError

        path = Path(manifest_path)
        if path.suffix != ".json" and path.with_name(path.name + ".manifest.json").exists():
            path = path.with_name(path.name + ".manifest.json")
        try:
            manifest = json.loads(path.read_text())
            files = {variant: path.parent / record["path"] for variant, record in manifest["files"].items()}
            target = manifest["target"]
        except FileNotFoundError:
            raise UserError("no such artifact manifest", path=path, hint="pass the .manifest.json written by dnsconvert export") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"not a dnsconvert artifact manifest ({type(exc).__name__}: {exc})", path=path) from None
        missing = [str(f) for f in files.values() if not f.exists()]
        if missing:
            raise UserError(f"artifact file(s) missing: {', '.join(missing)}", path=path, hint="re-run dnsconvert export")
        return cls(target, files, path, manifest)


class Runner(Protocol):
    """Runs one input batch; ``synchronize`` waits for asynchronous devices (no-op on CPU).

    GPU runners may also offer ``prepare(x) -> handle`` and ``run_device(handle)``: the bench then
    uploads the input once and times the model alone.
    """

    def run(self, x: np.ndarray) -> np.ndarray: ...

    def synchronize(self) -> None: ...

    def close(self) -> None: ...


class Target:
    """Base class of targets. Subclasses set ``name``, ``description``, ``option_help``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    suffix: ClassVar[str] = ".onnx"
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
        raise NotImplementedError

    def load(self, artifact: Artifact, variant: str = "sparse", options: Mapping[str, str] | None = None) -> Runner:
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
