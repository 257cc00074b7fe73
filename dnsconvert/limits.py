"""Resource limits on what a file can make dnsconvert allocate, checked before allocating.

A size read from a file is either *backed* by the file's own bytes (a tensor whose data is
in the file: checked against the bytes present) or *claimed* (model kwargs, input shapes,
the dims of a sparse tensor, an IDX header, a CSR layer's shape): claimed sizes are checked
against the limits below. With the defaults, no input file under 10 MB makes a command use
more than about 1 GB of memory above its baseline (tests/test_hostile.py measures it).

Every limit has a default and an environment variable that raises it, e.g.
``DNSCONVERT_MAX_DENSE_BYTES=4GiB dnsconvert densify big.onnx -o big.dense.onnx``; the
library API can also use :func:`override`. A limit that is exceeded raises
:class:`LimitExceeded` (a UserError: exit 2) naming the file, the limit and how to raise it.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class Limit:
    name: str
    env: str
    default: int
    unit: str  # "bytes", "parameters", "elements", "levels", "layers"
    what: str


LIMITS: dict[str, Limit] = {
    limit.name: limit
    for limit in (
        Limit(
            "dense_bytes",
            "DNSCONVERT_MAX_DENSE_BYTES",
            128 << 20,
            "bytes",
            "memory one file may make dnsconvert allocate beyond its own bytes: densified sparse "
            "tensors, CSR layers made dense, inflated gzip/IDX data",
        ),
        Limit(
            "shared_view_bytes",
            "DNSCONVERT_MAX_SHARED_VIEW_BYTES",
            16 << 20,
            "bytes",
            "bytes of tensors in a .pt file beyond twice the data they share (tied weights are free)",
        ),
        Limit(
            "parameters",
            "DNSCONVERT_MAX_PARAMETERS",
            1 << 26,
            "parameters",
            "parameters of a model built from a spec before a checkpoint's bytes back them",
        ),
        Limit("input_elements", "DNSCONVERT_MAX_INPUT_ELEMENTS", 1 << 26, "elements", "elements of one set of sample inputs, all inputs and the batch included"),
        Limit("layers", "DNSCONVERT_MAX_LAYERS", 1024, "layers", "layers a built-in model's kwargs may ask for"),
        Limit("depth", "DNSCONVERT_MAX_DEPTH", 64, "levels", "nesting depth of JSON metadata in a file"),
    )
}

_overrides: dict[str, int] = {}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?)?\s*$", re.IGNORECASE)
_SCALE = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class LimitExceeded(UserError):
    """A size read from a file is over a limit; the message says which and how to raise it."""


def _parse(text: str, limit: Limit) -> int:
    match = _SIZE_RE.match(text)
    if not match:
        raise UserError(f"{limit.env}={text!r} is not a number", hint="write an integer, optionally with K, M, G or T (binary), e.g. 2G")
    suffix = (match.group(2) or "").upper()[:1]
    return int(match.group(1)) * _SCALE[suffix]


def get(name: str) -> int:
    """The current value of limit ``name`` (override, else environment, else default)."""
    limit = LIMITS[name]
    if name in _overrides:
        return _overrides[name]
    text = os.environ.get(limit.env)
    return _parse(text, limit) if text else limit.default


@contextlib.contextmanager
def override(**values: int) -> Iterator[None]:
    """Raise (or lower) limits for the duration of a block: ``with override(dense_bytes=2**32): ...``."""
    unknown = set(values) - set(LIMITS)
    if unknown:
        raise KeyError(f"unknown limit(s) {', '.join(sorted(unknown))}; known: {', '.join(LIMITS)}")
    saved = dict(_overrides)
    _overrides.update(values)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def _human(value: int, unit: str) -> str:
    if unit != "bytes":
        return f"{value:,} {unit}"
    for suffix, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {suffix}"
    return f"{value} bytes"


def check(name: str, value: int, what: str, *, path: str | Path | None = None) -> None:
    """Raise LimitExceeded when ``value`` (what ``what`` needs) is over limit ``name``."""
    allowed = get(name)
    if value > allowed:
        limit = LIMITS[name]
        raise LimitExceeded(
            f"{what} needs {_human(value, limit.unit)}, over the limit of {_human(allowed, limit.unit)}",
            path=path,
            hint=f"if you trust this file, raise the limit: {limit.env}={_suggest(value, limit.unit)}",
        )


def _suggest(value: int, unit: str) -> str:
    if unit == "bytes":
        return f"{max(1, math.ceil(value / (1 << 20)))}M"
    return str(value)


def numel(shape: Iterable[int]) -> int:
    """Product of ``shape`` in Python integers (no overflow, unlike numpy's int64)."""
    return math.prod(int(d) for d in shape)


def check_shape(shape: Iterable[object], what: str, *, path: str | Path | None = None, allow_zero: bool = True) -> tuple[int, ...]:
    """Return ``shape`` as ints, or raise a UserError when a dim is not a non-negative integer."""
    dims = tuple(shape)
    for d in dims:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0 or (d == 0 and not allow_zero):
            kind = "non-negative" if allow_zero else "positive"
            raise UserError(f"{what} has shape {list(dims)[:8]}; every size must be a {kind} integer", path=path)
    return dims


def help_text() -> str:
    """One paragraph for ``dnsconvert --help``: each limit, its default and its variable."""
    parts = [f"{limit.env} (default {_human(limit.default, limit.unit)}): {limit.what}" for limit in LIMITS.values()]
    return "Limits on what a file may make dnsconvert allocate; raise them with these environment variables. " + "; ".join(parts) + "."
