"""Baseline mask rules for honest comparison: one-shot magnitude and IMP rounds (no regrowth)."""

from __future__ import annotations

import torch


def magnitude_masks(
    weights: dict[str, torch.Tensor],
    sparsity: float | dict[str, float],
    *,
    previous: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Per layer, keep the largest |w| so that ``sparsity`` of the layer is cut.

    With ``previous`` masks, already-cut weights stay cut (IMP never regrows).
    """
    masks = {}
    for name, weight in weights.items():
        target = sparsity[name] if isinstance(sparsity, dict) else sparsity
        score = weight.detach().abs().float().flatten()
        if previous is not None:
            score = score.masked_fill(~previous[name].flatten().bool(), float("-inf"))
        n_cut = min(score.numel(), round(target * score.numel()))
        keep = torch.ones_like(score, dtype=torch.bool)
        if n_cut > 0:
            keep[score.topk(n_cut, largest=False).indices] = False
        masks[name] = keep.reshape(weight.shape)
    return masks


def sparsity_at(target: float, progress: float) -> float:
    """IMP's sparsity a fraction ``progress`` of the way to ``target``: the same share of the
    *remaining* weights is pruned each round, so the kept fraction shrinks geometrically."""
    return 1.0 - (1.0 - target) ** progress


def imp_schedule(target: float, rounds: int) -> list[float]:
    """Sparsity after each of ``rounds`` IMP rounds."""
    return [sparsity_at(target, (r + 1) / rounds) for r in range(rounds)]
