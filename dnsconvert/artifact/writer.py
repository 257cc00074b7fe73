"""Writing an artifact folder with one commit point.

Files are staged in a hidden folder beside the destination (``.NAME.staging-PID-TOKEN``);
the manifest is written last; then one rename makes the staged folder the artifact. When an
older artifact is in the way, Linux's ``renameat2(RENAME_EXCHANGE)`` swaps the two folders
atomically and the old one is removed afterwards. Where the exchange is unavailable, the old
folder is first renamed aside (``.NAME.old-PID-TOKEN``) and restored if the second rename
fails; a kill between the two leaves it there, and the next writer or loader of NAME puts it
back. So a kill at any instant leaves the complete old artifact or the complete new one.
Stale staging and aside folders of dead processes are recognised by their PID and removed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._atomic import output_error
from ..errors import GateFailed, UserError
from .manifest import MANIFEST_NAME, FileRecord, GraphNMRecord, LayerRecord, Manifest, ParityReport, SizeRecord, source_record, tool_versions

_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>staging|old)-(?P<pid>\d+)-[0-9a-f]+$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(destination: Path) -> None:
    """Undo what a killed writer of ``destination`` left: restore an old artifact renamed aside
    when nothing took its place, and remove stale staging and aside folders."""
    parent = destination.parent
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        match = _TEMP.match(entry.name)
        if not match or match["name"] != destination.name or _pid_alive(int(match["pid"])):
            continue
        if match["kind"] == "old" and not destination.exists():
            os.rename(entry, destination)
        else:
            shutil.rmtree(entry, ignore_errors=True)


def is_artifact_dir(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST_NAME).is_file()


def check_destination(destination: Path, inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse a destination that is an input, or a file/folder that is not an artifact."""
    for item in inputs:
        if item is None:
            continue
        item = Path(item)
        if item.exists() and destination.exists() and os.path.samefile(item, destination):
            raise UserError("the output is the command's input; refusing to overwrite it", path=destination, hint="choose another output path")
        if item.exists() and destination.exists() and destination.is_dir() and Path(os.path.realpath(item)).is_relative_to(os.path.realpath(destination)):
            raise UserError(f"the output folder holds the input {item}; refusing to replace it", path=destination, hint="choose another output path")
    if destination.is_symlink():
        raise UserError("is a symbolic link; an artifact is written as a real folder", path=destination, hint="choose another output path")
    if destination.exists() and not destination.is_dir():
        raise UserError(
            "exists and is a file; an artifact is a folder (its model files and manifest.json)",
            path=destination,
            hint="choose a new folder name, e.g. runs/model-ort",
        )
    if destination.is_dir() and any(destination.iterdir()) and not is_artifact_dir(destination):
        raise UserError("is a folder that is not a dnsconvert artifact; refusing to replace it", path=destination, hint="choose a new folder name")


class ArtifactWriter:
    """Stage an artifact's files, then commit them all at once (see the module docstring).

    Use as a context manager: files are staged with :meth:`write_bytes` (or written by a tool
    into :meth:`staged_path` and registered with :meth:`add_file`), then :meth:`commit`
    writes the manifest and moves the folder into place. Leaving the block without a
    commit removes the staging folder; the destination is untouched.
    """

    def __init__(self, destination: str | Path, *, inputs: Sequence[str | Path | None] = ()):
        self.destination = Path(destination)
        self.inputs = list(inputs)
        self.staging: Path | None = None
        self._files: dict[str, FileRecord] = {}

    def __enter__(self) -> ArtifactWriter:
        with output_error(self.destination):
            self.destination.parent.mkdir(parents=True, exist_ok=True)
        recover(self.destination)
        check_destination(self.destination, self.inputs)
        token = secrets.token_hex(4)
        self.staging = self.destination.parent / f".{self.destination.name}.staging-{os.getpid()}-{token}"
        with output_error(self.destination):
            os.mkdir(self.staging)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.staging is not None and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        self.staging = None

    # -- staging ---------------------------------------------------------------------------
    def staged_path(self, name: str) -> Path:
        """Where a tool may write the file ``name`` (then call :meth:`add_file`)."""
        if self.staging is None:
            raise RuntimeError("ArtifactWriter used outside its with-block")
        if not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$", name) or name == MANIFEST_NAME:
            raise ValueError(f"artifact file name {name!r} is not a plain name")
        return self.staging / name

    def write_bytes(self, role: str, name: str, data: bytes) -> FileRecord:
        path = self.staged_path(name)
        with output_error(self.destination):
            path.write_bytes(data)
        record = FileRecord(name, hashlib.sha256(data).hexdigest(), len(data))
        self._files[role] = record
        return record

    def add_file(self, role: str, name: str) -> FileRecord:
        """Register a file already written into the staging folder (hashed from disk)."""
        from .._atomic import sha256_file

        path = self.staged_path(name)
        record = FileRecord(name, sha256_file(path), path.stat().st_size)
        self._files[role] = record
        return record

    def alias(self, role: str, of: str) -> None:
        """A second role for an already staged file (e.g. one file holds dense and sparse)."""
        self._files[role] = self._files[of]

    # -- commit ----------------------------------------------------------------------------
    def commit(
        self,
        *,
        target: str,
        format: str,
        ckpt: Any,
        outputs: Sequence[str] = (),
        parity: ParityReport | None = None,
        layers: Sequence[LayerRecord] = (),
        graph_2_4: Sequence[GraphNMRecord] = (),
        sizes: SizeRecord | None = None,
        details: Mapping[str, Any] | None = None,
        extra_tools: Sequence[str] = (),
    ):
        """Write the manifest and move the artifact into place; returns the :class:`Artifact`.

        Raises:
            GateFailed: ``parity`` did not pass; nothing is written.
        """
        from . import Artifact

        if parity is not None and not parity.passed:
            detail = parity.problem or f"max |Δ| {parity.max_abs:.3g} exceeds atol {parity.atol:g} + rtol {parity.rtol:g}·|ref|"
            raise GateFailed(f"parity failed: {detail}; nothing was written")
        manifest = Manifest(
            target=target,
            format=format,
            files=dict(self._files),
            model=ckpt.model.to_json() if getattr(ckpt, "model", None) else None,
            source=source_record(ckpt),
            outputs=tuple(outputs),
            parity=parity,
            layers=tuple(layers),
            graph_2_4=tuple(graph_2_4),
            sizes=sizes,
            details=dict(details or {}),
            tools=tool_versions(*extra_tools),
        )
        with output_error(self.destination):
            (self.staging / MANIFEST_NAME).write_bytes(manifest.dumps())
            _commit(self.staging, self.destination)
        self.staging = None
        return Artifact(self.destination, manifest)


def write_artifact(
    destination: str | Path,
    *,
    ckpt: Any,
    files: Mapping[str, tuple[str, bytes]],
    aliases: Mapping[str, str] | None = None,
    **commit: Any,
):
    """Stage ``files`` (role -> (file name, bytes)), give ``aliases`` (role -> role) and commit:
    the whole wrap-up of a target whose files are all in memory."""
    with ArtifactWriter(destination, inputs=[getattr(ckpt, "source", None)]) as writer:
        for role, (name, data) in files.items():
            writer.write_bytes(role, name, data)
        for role, of in (aliases or {}).items():
            writer.alias(role, of)
        return writer.commit(ckpt=ckpt, **commit)


def _commit(staging: Path, destination: Path) -> None:
    """The one commit point: ``staging`` becomes ``destination`` (see the module docstring)."""
    if destination.is_dir() and not any(destination.iterdir()):
        os.rmdir(destination)
    if not destination.exists():
        os.rename(staging, destination)
        return
    if _exchange(staging, destination):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old artifact
        return
    aside = destination.parent / f".{destination.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(destination, aside)
    try:
        os.rename(staging, destination)
    except BaseException:
        os.rename(aside, destination)
        raise
    shutil.rmtree(aside, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the system cannot."""
    if os.environ.get("DNSCONVERT_NO_RENAME_EXCHANGE") == "1":  # exercises the fallback in tests
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))
