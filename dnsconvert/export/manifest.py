"""The JSON manifest written next to every artifact (versioned, with sha256 of inputs and outputs)."""

from __future__ import annotations

import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from .._atomic import sha256_file

MANIFEST_VERSION = 1


def tool_versions(*extra: str) -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("dnsconvert", "torch", "onnx", "onnxruntime", *extra):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def file_record(path: Path) -> dict[str, Any]:
    return {"path": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def bytes_record(path: Path, data: bytes) -> dict[str, Any]:
    """The record of a file just written from ``data`` (hashed in memory, not read back)."""
    import hashlib

    return {"path": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def manifest_path_for(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + ".manifest.json")


def base_manifest(target: str, ckpt: Any) -> dict[str, Any]:
    source = getattr(ckpt, "source", None)
    return {
        "kind": "dnsconvert-artifact",
        "manifest_version": MANIFEST_VERSION,
        "target": target,
        "input": {
            "checkpoint": str(source) if source else None,
            "sha256": sha256_file(source) if source and Path(source).is_file() else None,
        },
        "model": ckpt.model.to_json() if ckpt.model else None,
        "tools": tool_versions(),
    }
