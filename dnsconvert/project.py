"""N:M projection: turn unstructured masks into N:M along the engine's reduction axis."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .checkpoint import PruningInfo, SparseCheckpoint
from .errors import InternalError
from .pattern import NMPattern, apply_mask, cannot_hold, nm_mask
from .validate import validate


@dataclass(frozen=True)
class LayerProjection:
    """What projecting one layer cost."""

    name: str
    sparsity_before: float
    sparsity_after: float
    removed_magnitude_fraction: float
    removed_weights: int
    kept_magnitude_before: float = 0.0
    removed_magnitude: float = 0.0
    skipped_reason: str | None = None


@dataclass
class ProjectionResult:
    checkpoint: SparseCheckpoint
    pattern: NMPattern
    layers: list[LayerProjection]

    @property
    def removed_magnitude_fraction(self) -> float:
        """Over all projected layers: |w| removed / |w| kept before projecting."""
        before = sum(layer.kept_magnitude_before for layer in self.layers)
        return sum(layer.removed_magnitude for layer in self.layers) / before if before else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "projection-report",
            "pattern": str(self.pattern),
            "removed_magnitude_fraction": self.removed_magnitude_fraction,
            "layers": [asdict(layer) for layer in self.layers],
        }


def project_nm(ckpt: SparseCheckpoint, pattern: NMPattern | str, *, scores: dict[str, torch.Tensor] | None = None) -> ProjectionResult:
    """Keep the N largest of every M along the reduction axis, never reviving a pruned weight.

    Args:
        ckpt: the checkpoint; not modified.
        pattern: the N:M pattern.
        scores: optional saliency per parameter name (defaults to the checkpoint's
            ``state["saliency"]`` where present, else |w|).

    Returns:
        A new checkpoint whose masks follow ``pattern`` on every layer that can hold it,
        and the per-layer cost. Layers that cannot hold it are listed with the reason.
    """
    pattern = NMPattern.parse(pattern)
    saliency = scores if scores is not None else dict(ckpt.state.get("saliency") or {})
    weights = dict(ckpt.weights)
    masks = dict(ckpt.masks)
    layers: list[LayerProjection] = []
    for name, raw_mask in ckpt.masks.items():
        weight = ckpt.weights[name]
        mask = raw_mask != 0
        before = 1.0 - float(mask.float().mean())
        reason = cannot_hold(tuple(weight.shape), pattern)
        if reason is not None:
            layers.append(LayerProjection(name, before, before, 0.0, 0, skipped_reason=reason))
            continue
        score = saliency.get(name)
        score = weight.abs() if score is None or tuple(score.shape) != tuple(weight.shape) else score.abs()
        new_mask = nm_mask(score, pattern, allowed=mask)
        dropped = mask & ~new_mask
        magnitude = weight.detach().abs().float()
        kept_before = float((magnitude * mask).sum())
        removed = float((magnitude * dropped).sum())
        masks[name] = new_mask
        weights[name] = apply_mask(weight, new_mask)
        layers.append(
            LayerProjection(
                name,
                before,
                1.0 - float(new_mask.float().mean()),
                removed / kept_before if kept_before else 0.0,
                int(dropped.sum()),
                kept_before,
                removed,
            )
        )
    old = ckpt.pruning or PruningInfo(method="unknown")
    pruning = PruningInfo(
        method=old.method,
        criterion=old.criterion,
        nm=str(pattern),
        hyperparameters=old.hyperparameters,
        history=(*old.history, {"stage": "project", "nm": str(pattern)}),
    )
    # Surgery state holds pre-projection raw weights; a projected checkpoint is not resumable.
    result_ckpt = SparseCheckpoint(weights, masks, model=ckpt.model, pruning=pruning, state={}, source=None)
    report = validate(result_ckpt, require_nm=pattern)
    if not report.passed:  # post-condition, as onnx_ir passes check theirs
        raise InternalError(f"projection output fails its own N:M check: {report.violations[:3]}")
    return ProjectionResult(result_ckpt, pattern, layers)
