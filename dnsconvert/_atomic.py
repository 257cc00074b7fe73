"""Atomic file output: a failed command never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError


_OUTPUT_ERRORS = {
    errno.ENOSPC: ("disk full", "free some space and run the command again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space and run the command again"),
    errno.EROFS: ("read-only file system", "write the output somewhere writable"),
    errno.EACCES: ("permission denied", "write the output somewhere you may write"),
    errno.EPERM: ("operation not permitted", "write the output somewhere you may write"),
    errno.EISDIR: ("is a directory", "give a file path, not a folder"),
    errno.ENOTDIR: ("a parent of the path is not a folder", "check the output path"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter output path"),
}


@contextlib.contextmanager
def output_error(path: str | Path) -> Iterator[None]:
    """Turn the OSErrors of writing an output (disk full, read-only, a folder in the way...)
    into one-line user errors naming the output."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRORS:
            raise
        reason, hint = _OUTPUT_ERRORS[exc.errno]
        raise UserError(f"cannot write the output: {reason}; nothing was written", path=path, hint=hint) from None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp (and some writers) make 0600 files; give the result the usual umask permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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
