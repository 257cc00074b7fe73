"""Atomic file output: a failed command never leaves a half-written file behind.

This is the one place single files are written, so it is also where the operating system's
refusals become user errors (exit 2, one line): a read-only file system or folder, no
permission, a full disk ("disk full"; nothing is left behind), an output path that is a
folder. :func:`check_outputs` is the check every command makes before it starts work: no
output may be a folder, the same file as one of its inputs, or the same file as another output.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import OutputError

# errno -> (what happened, what to do)
_OUTPUT_ERRNOS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("disk full", "free space on that disk or write the output elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free space in your quota or write the output elsewhere"),
    errno.EFBIG: ("file too large for this file system (or the process's file size limit)", "write the output elsewhere"),
    errno.EROFS: ("read-only file system", "write the output to a writable folder"),
    errno.EACCES: ("permission denied", "write the output to a folder you can write to"),
    errno.EPERM: ("operation not permitted", "write the output to a folder you can write to"),
    errno.EISDIR: ("is a directory", "give a file name, e.g. DIR/model.onnx"),
    errno.ENOTDIR: ("a parent of the path is not a folder", "fix the output path"),
    errno.EEXIST: ("a parent of the path is a file, not a folder", "fix the output path"),
    errno.ENAMETOOLONG: ("file name too long", "use a shorter output path"),
    errno.ENOENT: ("its folder does not exist", "fix the output path"),
}
# errors that may come out of the writer itself (the temporary file already exists then)
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_OS_ERROR_IN_TEXT = re.compile(r"os error (\d+)")  # Rust writers (safetensors) report "... (os error 28)"


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    match = _OS_ERROR_IN_TEXT.search(str(exc))
    return int(match.group(1)) if match else None


def mapped_output_error(exc: BaseException, path: str | Path, *, only: Iterable[int] | None = None) -> OutputError | None:
    """The OutputError for an OS refusal to write ``path``, or None when ``exc`` is not one
    (an OSError, or a writer's error quoting ``os error N`` as Rust writers do)."""
    code = _errno_of(exc)
    if code is None or code not in _OUTPUT_ERRNOS or (only is not None and code not in set(only)):
        return None
    what, hint = _OUTPUT_ERRNOS[code]
    return OutputError(f"cannot write the output: {what}; nothing was written", path=path, hint=hint)


@contextlib.contextmanager
def output_error(path: str | Path) -> Iterator[None]:
    """Turn the OS refusals of writing an output (disk full, read-only, a folder in the way...)
    inside the block into one-line user errors naming ``path``."""
    try:
        yield
    except Exception as exc:
        mapped = mapped_output_error(exc, path)
        if mapped is None:
            raise
        raise mapped from None


def _missing_parents(folder: Path) -> list[Path]:
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds.

    Raises:
        OutputError: the file system refused (read-only, permission, disk full, a folder...);
            nothing is left behind, not even the folders this call created.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputError("cannot write the output: is a directory", path=target, hint=_OUTPUT_ERRNOS[errno.EISDIR][1])
    created = _missing_parents(target.parent)
    tmp_path: Path | None = None
    try:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
            os.close(fd)
        except OSError as exc:
            raise mapped_output_error(exc, target) or exc from None
        tmp_path = Path(tmp)
        try:
            yield tmp_path
        except Exception as exc:  # the writer failed: map a full disk, re-raise anything else
            mapped = mapped_output_error(exc, target, only=_WRITE_ERRNOS)
            if mapped is None:
                raise
            raise mapped from None
        try:
            # mkstemp (and some writers) make 0600 files; give the result the usual umask permissions
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
            os.replace(tmp_path, target)
        except OSError as exc:
            raise mapped_output_error(exc, target) or exc from None
    except BaseException:
        _remove(tmp_path)
        for folder in created:  # deepest first; only the empty folders this call made
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        _remove(tmp_path)


def _remove(path: Path | None) -> None:
    if path is not None and path.exists():
        with contextlib.suppress(OSError):
            path.unlink()


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when ``a`` and ``b`` name the same file (symlinks and hard links included)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_outputs(outputs: Iterable[str | Path | None], inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse, before any work, outputs that are folders, inputs of the command, or each other.

    Args:
        outputs: every file the command will write (None entries are ignored).
        inputs: every file the command reads.

    Raises:
        OutputError: naming the output and the input it would overwrite.
    """
    outs = [Path(o) for o in outputs if o is not None]
    ins = [Path(i) for i in inputs if i is not None]
    for index, out in enumerate(outs):
        if out.is_dir():
            raise OutputError("cannot write the output: is a directory", path=out, hint=_OUTPUT_ERRNOS[errno.EISDIR][1])
        for inp in ins:
            if same_file(out, inp):
                raise OutputError(
                    f"is also an input of this command ({inp}); writing it would destroy the input",
                    path=out,
                    hint="write the output to another path",
                )
        for other in outs[:index]:
            if same_file(out, other):
                raise OutputError(f"is given for two outputs (also {other})", path=out, hint="give each output its own path")
