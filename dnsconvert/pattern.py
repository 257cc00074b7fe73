"""N:M sparsity patterns and the axis along which a sparse engine groups weights.

Facts (as in Polygraphy's ``tools/sparse.py`` and NVIDIA's ASP): a sparse tensor-core
kernel groups M consecutive weights along the *reduction* dimension. For a Linear weight
``[out, in]`` that is the input-feature axis (1); for a Conv weight ``[out, in, *kernel]``
it is the input-channel axis (1), one group run per output channel and kernel position.
Everything here is vectorised: a weight is viewed as ``[groups, M]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


def layer_kind(shape: tuple[int, ...] | torch.Size) -> str:
    """``linear`` for 2-D weights, ``conv`` for 3- to 5-D, ``vector`` otherwise (biases, norms)."""
    if len(shape) == 2:
        return "linear"
    if 3 <= len(shape) <= 5:
        return "conv"
    return "vector"


def cannot_hold(shape: tuple[int, ...] | torch.Size, pattern: NMPattern) -> str | None:
    """Why a weight of this shape cannot carry ``pattern`` along its reduction axis, or None."""
    if layer_kind(shape) == "vector":
        return f"{len(shape)}-D tensor has no reduction axis"
    reduction = shape[1]
    if reduction % pattern.m:
        return f"reduction dimension {reduction} is not a multiple of {pattern.m}"
    return None


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight`` with +0.0 where ``mask`` is 0 (a multiply would leave −0.0 for negative weights,
    and exact, byte-stable artifacts need one zero)."""
    return torch.where(mask != 0, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def to_groups(tensor: torch.Tensor, m: int) -> torch.Tensor:
    """View a weight as ``[groups, m]`` with each row ``m`` consecutive reduction-axis entries."""
    moved = tensor.movedim(1, -1)  # [out, *kernel, in]: the reduction axis is now contiguous
    return moved.reshape(-1, m)


def from_groups(groups: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`to_groups`."""
    moved_shape = (shape[0], *shape[2:], shape[1])
    return groups.reshape(moved_shape).movedim(-1, 1).contiguous()


def complies(mask: torch.Tensor, pattern: NMPattern) -> bool:
    """True when every group of M along the reduction axis keeps at most N entries."""
    groups = to_groups(mask.bool(), pattern.m)
    return bool((groups.sum(dim=1) <= pattern.n).all())


def violating_groups(mask: torch.Tensor, pattern: NMPattern) -> int:
    groups = to_groups(mask.bool(), pattern.m)
    return int((groups.sum(dim=1) > pattern.n).sum())


def nm_mask(scores: torch.Tensor, pattern: NMPattern, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``n`` highest-scoring entries of every group of ``m``.

    Args:
        scores: saliency per weight, same shape as the weight.
        pattern: the N:M pattern.
        allowed: optional boolean mask; entries outside it are never kept (a pruned
            weight is never revived), so a group may keep fewer than N.
    """
    groups = to_groups(scores.detach().float(), pattern.m).clone()
    if allowed is not None:
        allowed_groups = to_groups(allowed.bool(), pattern.m)
        groups[~allowed_groups] = float("-inf")
    top = groups.topk(pattern.n, dim=1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True)
    if allowed is not None:
        keep &= allowed_groups
    return from_groups(keep, scores.shape)
