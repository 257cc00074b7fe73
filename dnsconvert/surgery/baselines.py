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


def imp_schedule(target: float, rounds: int) -> list[float]:
    """Sparsity after each IMP round, pruning the same fraction of the *remaining* weights each round."""
    keep_per_round = (1.0 - target) ** (1.0 / rounds)
    return [1.0 - keep_per_round ** (r + 1) for r in range(rounds)]
