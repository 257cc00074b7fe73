"""Builders shared by tests: masked checkpoints of built-in models."""

from __future__ import annotations

from pathlib import Path

import torch

from dnsconvert.checkpoint import PruningInfo, SparseCheckpoint
from dnsconvert.pattern import apply_mask
from dnsconvert.models import build_model, builtin_spec
from dnsconvert.surgery import magnitude_masks, prunable_parameters

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
BROKEN = FIXTURES / "broken"

SMALL_KWARGS = {
    "lenet300100": {},
    "lenet5": {},
    "mlp": {"hidden": [128, 64]},
    "convnet": {"channels": [8, 16, 32]},
    "transformer_mlp": {"dim": 64, "hidden": 256, "depth": 2},
}


def masked_checkpoint(name: str, sparsity: float = 0.9, seed: int = 0, **kwargs) -> SparseCheckpoint:
    torch.manual_seed(seed)
    spec = builtin_spec(name, **(kwargs or SMALL_KWARGS.get(name, {})))
    model = build_model(spec)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = prunable_parameters(model)
    masks = magnitude_masks({n: p.detach() for n, p in params.items()}, sparsity)
    return SparseCheckpoint(weights, masks, model=spec, pruning=PruningInfo("magnitude", "magnitude")).with_(weights={**weights, **{n: apply_mask(weights[n], masks[n]) for n in masks}})


def save_torch_pruned_lenet5(path: Path, amount: float) -> Path:
    """LeNet-5 pruned with torch.nn.utils.prune (weight_orig + weight_mask) and saved as a state dict."""
    from torch.nn.utils import prune

    from dnsconvert.models import lenet5

    torch.manual_seed(0)
    model = lenet5()
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            prune.l1_unstructured(module, "weight", amount=amount)
    torch.save(model.state_dict(), path)
    return path
