"""One exception hierarchy: user errors (exit 2), failed gates (exit 1), and bugs."""

from __future__ import annotations

from pathlib import Path


class DnsconvertError(Exception):
    """Base class of every error dnsconvert raises on purpose."""

    exit_code = 3


class UserError(DnsconvertError):
    """Bad input from the user: printed as one line, exit code 2, no traceback.

    Args:
        message: what is wrong, saying what was expected and what was found.
        path: the file the problem is in, if any; it leads the message.
        hint: what the user can do about it.
    """

    exit_code = 2

    def __init__(self, message: str, *, path: str | Path | None = None, hint: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class CheckpointError(UserError):
    """A checkpoint cannot be read or is structurally unusable."""


class ModelSpecError(UserError):
    """A model cannot be rebuilt from its specification."""


class PatternError(UserError):
    """An N:M pattern is malformed or impossible for a tensor."""


class DataError(UserError):
    """Training or calibration data is missing or malformed."""


class ExportError(UserError):
    """A model cannot be exported, or the export fails its own checks."""


class TargetError(UserError):
    """A target (runtime) is unknown, unavailable or was given bad options."""


class PipelineError(UserError):
    """A pipeline file is malformed."""


class OutputError(UserError):
    """An output cannot be written (read-only, permission, disk full, a folder, an input's path)."""


class GateFailed(DnsconvertError):
    """A rule or gate the user asked for does not hold: exit code 1."""

    exit_code = 1


class InternalError(DnsconvertError):
    """A post-condition of dnsconvert's own code failed: a bug, reported with its traceback."""
