"""N:M sparsity patterns and the axis along which a sparse engine groups weights.

Facts (as in Polygraphy's ``tools/sparse.py`` and NVIDIA's ASP): a sparse tensor-core
kernel groups M consecutive weights along the *reduction* dimension. For a Linear weight
``[out, in]`` that is the input-feature axis (1); for a Conv weight ``[out, in/groups, *kernel]``
it is the input-channel axis (1), one group run per output channel and kernel position; for
a ``transformers`` Conv1D weight ``[in, out]`` it is axis 0. Which axis a parameter has is
decided in :mod:`dnsconvert.layers`; every function here takes it (an int, or a layer-info
object). Everything is vectorised: a weight is viewed as ``[groups, M]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from .errors import PatternError

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class NMPattern:
    """At most ``n`` nonzero weights in every group of ``m`` along the reduction axis."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (0 < self.n < self.m):
            raise PatternError(f"N:M pattern needs 0 < N < M, got {self.n}:{self.m}", hint="e.g. 2:4")

    @classmethod
    def parse(cls, text: str | NMPattern) -> NMPattern:
        """Parse ``"2:4"`` once, at the edge of the program."""
        if isinstance(text, NMPattern):
            return text
        match = _NM_RE.match(str(text))
        if not match:
            raise PatternError(f"cannot read N:M pattern {text!r}", hint="write it as N:M, e.g. 2:4")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def density(self) -> float:
        return self.n / self.m


TWO_FOUR = NMPattern(2, 4)


def reduction_axis(axis: Any, ndim: int | None = None) -> int | None:
    """The integer axis of ``axis`` (an int, None, or an object with ``.axis`` such as a
    :class:`dnsconvert.layers.LayerInfo`), normalised against ``ndim`` when given."""
    value = getattr(axis, "axis", axis)
    if value is None:
        return None
    value = int(value)
    if ndim is not None:
        if not -ndim <= value < ndim:
            raise PatternError(f"reduction axis {value} is out of range for a {ndim}-D tensor")
        value %= ndim
    return value


def cannot_hold(shape: tuple[int, ...] | torch.Size, pattern: NMPattern, axis: Any = 1) -> str | None:
    """Why a weight of this shape cannot carry ``pattern`` along ``axis``, or None.

    ``axis`` is the reduction axis (1 for torch's Linear/Conv layout, 0 for a ``transformers``
    Conv1D), or a layer-info object; None means the tensor has no reduction axis.
    """
    groups = int(getattr(axis, "groups", 1) or 1)
    if len(shape) < 2:
        return f"{len(shape)}-D tensor has no reduction axis"
    index = reduction_axis(axis, len(shape))
    if index is None:
        kind = getattr(axis, "kind", None)
        return f"{kind} has no reduction axis" if kind else "no reduction axis is known"
    length = shape[index]
    if length % pattern.m:
        where = f"grouped conv (groups={groups}): " if groups > 1 else ""
        return f"{where}reduction dimension {length} (axis {index}) is not a multiple of {pattern.m}"
    return None


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight`` with +0.0 where ``mask`` is 0 (a multiply would leave −0.0 for negative weights,
    and exact, byte-stable artifacts need one zero)."""
    return torch.where(mask != 0, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def to_groups(tensor: torch.Tensor, m: int, axis: Any = 1) -> torch.Tensor:
    """View a weight as ``[groups, m]``, each row ``m`` consecutive entries along ``axis``
    (for every position of the other axes)."""
    index = reduction_axis(axis, tensor.dim())
    moved = tensor.movedim(index, -1)  # e.g. Linear [out, in] stays, Conv [out, *kernel, in]
    return moved.reshape(-1, m)


def from_groups(groups: torch.Tensor, shape: tuple[int, ...] | torch.Size, axis: Any = 1) -> torch.Tensor:
    """Inverse of :func:`to_groups`."""
    index = reduction_axis(axis, len(shape))
    moved_shape = (*shape[:index], *shape[index + 1 :], shape[index])
    return groups.reshape(moved_shape).movedim(-1, index).contiguous()


def complies(mask: torch.Tensor, pattern: NMPattern, axis: Any = 1) -> bool:
    """True when every group of M along ``axis`` keeps at most N entries."""
    return violating_groups(mask, pattern, axis) == 0


def violating_groups(mask: torch.Tensor, pattern: NMPattern, axis: Any = 1) -> int:
    """How many groups of M along ``axis`` keep more than N entries."""
    groups = to_groups(mask != 0, pattern.m, axis)
    return int((groups.sum(dim=1) > pattern.n).sum())


def nm_mask(scores: torch.Tensor, pattern: NMPattern, allowed: torch.Tensor | None = None, axis: Any = 1) -> torch.Tensor:
    """Keep the ``n`` highest-scoring entries of every group of ``m`` along ``axis``.

    Args:
        scores: saliency per weight, same shape as the weight.
        pattern: the N:M pattern.
        allowed: optional boolean mask; entries outside it are never kept (a pruned
            weight is never revived), so a group may keep fewer than N.
        axis: the reduction axis (an int or a layer-info object; default 1, torch's
            Linear/Conv layout).
    """
    groups = to_groups(scores.detach().float(), pattern.m, axis).clone()
    if allowed is not None:
        allowed_groups = to_groups(allowed != 0, pattern.m, axis)
        groups[~allowed_groups] = float("-inf")
    top = groups.topk(pattern.n, dim=1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True)
    if allowed is not None:
        keep &= allowed_groups
    return from_groups(keep, scores.shape, axis)
