"""N:M projection: turn unstructured masks into N:M along the engine's reduction axis."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .checkpoint import PruningInfo, SparseCheckpoint
from .errors import InternalError, UserError
from .layers import LayerInfo, checkpoint_layers, parse_patterns, select_layers
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


def project_nm(
    ckpt: SparseCheckpoint,
    pattern: NMPattern | str,
    *,
    scores: dict[str, torch.Tensor] | None = None,
    layers: Iterable[str] | str | None = None,
    prune_tied: bool = False,
    trust_model_code: bool = False,
) -> ProjectionResult:
    """Keep the N largest of every M along each layer's reduction axis, never reviving a pruned weight.

    Which tensors are layers, and their axes, come from :func:`dnsconvert.layers.checkpoint_layers`
    (the model when it may be built, else the checkpoint's record). Tensors whose kind is only
    guessed from their shape are refused unless ``layers`` selects them.

    Args:
        ckpt: the checkpoint; not modified.
        pattern: the N:M pattern.
        scores: optional saliency per parameter name (defaults to the checkpoint's
            ``state["saliency"]`` where present, else |w|).
        layers: ``GLOB[@AXIS]`` patterns: project exactly these tensors (an unmasked one gets
            its mask from its nonzeros), with the axis given, else the module's, else torch's
            layout (axis 1). Default: every masked tensor of a prunable kind.
        prune_tied: project a tensor the model shares under several names (tied weights) once,
            for all of them; refused otherwise.
        trust_model_code: allow building a model factory outside dnsconvert to learn the kinds.

    Returns:
        A new checkpoint whose masks follow ``pattern`` on every projected layer that can hold
        it, with the layer infos recorded, and the per-layer cost. Layers left as they were are
        listed with the reason.

    Raises:
        UserError: masked tensors of guessed kind without ``layers``, a tied tensor without
            ``prune_tied``, or a bad selection.
    """
    pattern = NMPattern.parse(pattern)
    infos = checkpoint_layers(ckpt, trust_model_code=trust_model_code)
    targets = _targets(ckpt, infos, layers, prune_tied)
    saliency = scores if scores is not None else dict(ckpt.state.get("saliency") or {})
    weights = dict(ckpt.weights)
    masks = dict(ckpt.masks)
    recorded = {name: infos[name] for name in ckpt.masks}
    results: list[LayerProjection] = []
    projected: list[str] = []
    for name, (info, default_selected) in targets.items():
        weight = ckpt.weights[name]
        if not weight.dtype.is_floating_point:
            raise UserError(f"{name!r} has dtype {weight.dtype}: only float weights can be pruned", hint="narrow the --layers pattern")
        mask = _mask_of(ckpt, name, info)
        before = 1.0 - float(mask.float().mean())
        reason = None
        if default_selected and not info.prunable:
            reason = f"{info.kind} is not a layer kind to project (select it with --layers to project it)"
            if bool(mask.all()):  # a dense tensor's all-ones mask (a shape guess on import) says nothing: drop it
                masks.pop(name, None)
                recorded.pop(name, None)
                reason += "; it is dense, so its mask is dropped"
        reason = reason or cannot_hold(tuple(weight.shape), pattern, info)
        if reason is not None:
            results.append(LayerProjection(name, before, before, 0.0, 0, skipped_reason=reason))
            continue
        score = saliency.get(name)
        score = weight.abs() if score is None or tuple(score.shape) != tuple(weight.shape) else score.abs()
        new_mask = nm_mask(score, pattern, allowed=mask, axis=info)
        dropped = mask & ~new_mask
        magnitude = weight.detach().abs().float()
        kept_before = float((magnitude * mask).sum())
        removed = float((magnitude * dropped).sum())
        new_weight = apply_mask(weight, new_mask)
        for alias in info.tied:  # one tensor in the model: every name holds it, the mask lives under this one
            if alias != name and alias in weights:
                weights[alias] = new_weight
                masks.pop(alias, None)
                recorded.pop(alias, None)
        masks[name] = new_mask
        weights[name] = new_weight
        recorded[name] = info
        projected.append(name)
        results.append(
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
    covered = {n for name, (info, _) in targets.items() for n in (name, *info.tied)}
    for name in ckpt.masks:
        if name not in covered:
            sparsity = 1.0 - float((ckpt.masks[name] != 0).float().mean())
            why = "not selected by --layers" if layers else f"tied tensor ({', '.join(infos[name].tied)}) left as it is; --prune-tied projects it"
            if not layers:  # an unpruned tied tensor (checked in _targets): its all-ones mask says nothing
                masks.pop(name, None)
                recorded.pop(name, None)
                why += "; it is dense, so its mask is dropped"
            results.append(LayerProjection(name, sparsity, sparsity, 0.0, 0, skipped_reason=why))
    old = ckpt.pruning or PruningInfo(method="unknown")
    step: dict[str, Any] = {"stage": "project", "nm": str(pattern)}
    if layers:
        step["layers"] = [str(p) for p in parse_patterns(layers)]
    pruning = PruningInfo(
        method=old.method,
        criterion=old.criterion,
        nm=str(pattern),
        hyperparameters=old.hyperparameters,
        history=(*old.history, step),
    )
    # Surgery state holds pre-projection raw weights; a projected checkpoint is not resumable.
    result_ckpt = SparseCheckpoint(weights, masks, model=ckpt.model, pruning=pruning, state={}, source=None, layers=recorded)
    # post-condition, as onnx_ir passes check theirs: every projected layer holds the pattern
    report = validate(result_ckpt, require_nm=pattern, allow_dead_layers=True, layers={**infos, **recorded})
    broken = [v for v in report.violations if v.layer in projected or v.rule not in ("nm", "tied", "has-masks")]
    if broken:
        raise InternalError(f"projection output fails its own N:M check: {broken[:3]}")
    return ProjectionResult(result_ckpt, pattern, results)


def _targets(
    ckpt: SparseCheckpoint, infos: dict[str, LayerInfo], layers: Iterable[str] | str | None, prune_tied: bool
) -> dict[str, tuple[LayerInfo, bool]]:
    """name -> (its LayerInfo, chosen by default rather than by the user)."""
    if layers:
        shapes = {n: tuple(w.shape) for n, w in ckpt.weights.items()}
        return {n: (i, False) for n, i in select_layers(infos, layers=layers, prune_tied=prune_tied, shapes=shapes).items()}
    guessed = [n for n in ckpt.masks if not infos[n].known]
    if guessed:
        raise UserError(
            f"{len(guessed)} masked tensor(s) have a kind only guessed from their shape, with no model to ask "
            f"({', '.join(guessed[:4])}{', …' if len(guessed) > 4 else ''}): a 2-D tensor may be a Linear [out, in], "
            "a transformers Conv1D [in, out] or an embedding table",
            path=ckpt.source,
            hint="give the model (--model NAME or pkg.module:factory, with --trust-model-code for your own), "
            "or select the layers to project with --layers 'GLOB[@AXIS]'",
        )
    targets: dict[str, tuple[LayerInfo, bool]] = {}
    for name in ckpt.masks:
        info = infos[name]
        if info.tied and not prune_tied and all(bool((ckpt.masks[n] != 0).all()) for n in info.tied if n in ckpt.masks):
            continue  # an unpruned (all-ones) mask on a tied tensor, e.g. from a dense import: left alone
        if info.tied:
            if not prune_tied:
                raise UserError(
                    f"{name!r} is one tensor shared by {', '.join(info.tied)} (tied weights): projecting it changes every one of them",
                    path=ckpt.source,
                    hint="opt in with --prune-tied (prune_tied=True) to project it once for all of them, or select other layers with --layers",
                )
            name = next(t for t in info.tied if t in ckpt.weights)  # the first name it has in this file
        targets.setdefault(name, (info, True))
    return targets


def _mask_of(ckpt: SparseCheckpoint, name: str, info: LayerInfo) -> torch.Tensor:
    """The tensor's mask: under its name and any tied name (ANDed), else its nonzeros."""
    found = [ckpt.masks[n] != 0 for n in (name, *info.tied) if n in ckpt.masks]
    if not found:
        return ckpt.weights[name] != 0
    mask = found[0]
    for other in found[1:]:
        mask = mask & other
    return mask
