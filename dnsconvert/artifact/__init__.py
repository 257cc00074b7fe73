"""Artifacts: a folder of files described by a typed manifest, written at one commit point
and verified on load.

:class:`ArtifactWriter` stages and commits (see :mod:`.writer`); :func:`load_artifact` reads
one back and checks every file's size and sha256 against the manifest, refusing any path
that would leave the folder. Runtimes read files through :meth:`Artifact.read`, which hands
over the very bytes it verified.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .manifest import (
    MANIFEST_NAME,
    FileRecord,
    GraphNMRecord,
    LayerRecord,
    Manifest,
    OutputParity,
    ParityReport,
    SizeRecord,
    SourceRecord,
    read_manifest,
)
from .writer import ArtifactWriter, recover, write_artifact

__all__ = [
    "MANIFEST_NAME",
    "Artifact",
    "ArtifactWriter",
    "FileRecord",
    "GraphNMRecord",
    "LayerRecord",
    "Manifest",
    "OutputParity",
    "ParityReport",
    "SizeRecord",
    "SourceRecord",
    "load_artifact",
    "write_artifact",
]


@dataclass(frozen=True)
class Artifact:
    """A committed artifact: its folder and its manifest."""

    root: Path
    manifest: Manifest

    @property
    def target(self) -> str:
        return self.manifest.target

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    @property
    def files(self) -> dict[str, Path]:
        """Role -> path (paths checked to stay inside the folder; contents checked by :meth:`read`)."""
        return {role: self._path(role) for role in self.manifest.files}

    @property
    def path(self) -> Path:
        """The sparse model file."""
        return self._path("sparse")

    def _path(self, role: str) -> Path:
        record = self.manifest.files.get(role)
        if record is None:
            raise UserError(f"artifact has no {role!r} file", path=self.manifest_path, hint=f"it has {', '.join(self.manifest.files) or 'none'}")
        path = self.root / record.path
        # FileRecord's pattern already forbids separators and ".."; a symlink could still point out
        real_root = os.path.realpath(self.root)
        if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
            raise UserError(f"file {record.path!r} leads outside the artifact folder", path=self.manifest_path, hint="re-run dnsconvert export")
        return path

    def check_present(self, role: str) -> Path:
        """The file's path, after checking it exists with the size the manifest gives."""
        record = self.manifest.files.get(role)
        path = self._path(role)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise UserError(f"artifact file {record.path} is missing", path=self.manifest_path, hint="re-run dnsconvert export") from None
        except OSError as exc:
            raise UserError(f"cannot read artifact file {record.path} ({exc.strerror})", path=self.manifest_path) from None
        if not path.is_file():
            raise UserError(f"artifact file {record.path} is not a regular file", path=self.manifest_path, hint="re-run dnsconvert export")
        if size != record.bytes:
            raise UserError(
                f"{record.path} is {size:,} bytes, the manifest says {record.bytes:,}",
                path=self.manifest_path,
                hint="the artifact was changed or only partly copied; re-run dnsconvert export",
            )
        return path

    def read(self, role: str) -> bytes:
        """The file's bytes, after checking their size and sha256 against the manifest."""
        record = self.manifest.files.get(role)
        path = self.check_present(role)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read artifact file {record.path} ({exc.strerror})", path=self.manifest_path) from None
        if hashlib.sha256(data).hexdigest() != record.sha256:
            raise UserError(
                f"{record.path} does not match its sha256 in the manifest (tampered with, swapped or stale)",
                path=self.manifest_path,
                hint="re-run dnsconvert export",
            )
        return data

    def verify(self) -> None:
        """Check every file (sizes and hashes) without keeping the bytes."""
        for role in self.manifest.files:
            self.read(role)


def load_artifact(path: str | Path, *, verify: bool = False) -> Artifact:
    """Read the artifact folder at ``path`` (or its manifest.json): the manifest is validated
    and every file must be present with its recorded size; hashes are checked when a file is
    read (:meth:`Artifact.read`), or for all files at once with ``verify``."""
    path = Path(path)
    root = path.parent if path.name == MANIFEST_NAME and path.is_file() else path
    if not root.exists():
        recover(root)  # a killed writer may have left the old artifact aside
    if not root.is_dir():
        hint = "pass the folder written by dnsconvert export"
        raise UserError("is not an artifact folder" if root.exists() else "no such artifact", path=root, hint=hint)
    artifact = Artifact(root, read_manifest(root / MANIFEST_NAME))
    for role in artifact.manifest.files:
        artifact.check_present(role)
    if verify:
        artifact.verify()
    return artifact
