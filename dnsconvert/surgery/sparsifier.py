"""Masks on a live model, usable from any training loop.

A sparsifier keeps, for each prunable parameter p, a mask T and a *shadow* S holding the
dense weights W where T is 0 (the cut weights). The model's own parameter always holds W⊙T,
so the forward pass is the plain, unmodified model (no per-forward multiply, DDP and
``state_dict`` see ordinary keys), and the loss gradient that autograd computes for p is
exactly ∂L/∂(W⊙T). Calling :meth:`step` after ``optimizer.step()`` applies the optimizer's
update to *all* of W — the straight-through update Dynamic Network Surgery needs so that a
cut weight keeps moving and can be spliced back:

    S ← S + p⊙(1−T)        (where T = 0, p holds 0 + this step's update Δ, so S becomes W + Δ)
    p ← p⊙T
    W = p⊙T + S⊙(1−T)      (rebuilt only when masks are updated, or for a resume state)

On CPU float32 layers the two lines are one compiled pass (``_kernels.fold_``, reading T from
the 1-byte mask) that also leaves S = W at the kept entries (where the formula above never reads
S), so that a mask update can read W straight from S; for a layer whose mask is updated at this
step the same pass flags the update's candidates (``fold_flag_``). Elsewhere they are two fused
in-place torch passes. The masks are kept as float tensors because boolean
``masked_fill_``/``where`` cost ~15x a multiply on CPU
(measured: 0.47 ms vs 0.03 ms for LeNet-300-100's first layer). p⊙T leaves −0.0 for
negative cut weights in the live model, which changes no result; checkpoints store +0.0.

This works for any optimizer whose update does not depend on the parameter's value (SGD,
momentum, Adam). Coupled weight decay (``weight_decay`` in SGD/Adam) sees p, so it decays
only the kept weights; DNS's reference code decays all of W — prefer AdamW/no decay, or
accept the difference (documented in the README).

Usage::

    sparsifier = DynamicNetworkSurgery(model, DNSConfig(c=3.0))
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        sparsifier.step()          # after optimizer.step(), before the next zero_grad()
    masks = sparsifier.masks()     # {parameter name: bool tensor}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..layers import LayerInfo, describe_model, model_parameters, select_layers


def prunable_parameters(
    model: nn.Module,
    *,
    prune_bias: bool = False,
    layers: Iterable[str] | str | None = None,
    prune_tied: bool = False,
    names: Iterable[str] | None = None,
) -> dict[str, nn.Parameter]:
    """The parameters to prune, by state-dict name: by default the weights of every layer whose
    module type is a prunable kind (:mod:`dnsconvert.layers`: Linear, Conv, transformers'
    Conv1D, plugin kinds), and their biases with ``prune_bias``; tied tensors only with
    ``prune_tied`` (once, under their first name). ``layers`` (``GLOB[@AXIS]`` patterns) or
    ``names`` select other parameters instead."""
    return {name: params for name, (params, _) in _resolve(model, names, layers, prune_bias, prune_tied).items()}


def prunable_layers(
    model: nn.Module,
    *,
    prune_bias: bool = False,
    layers: Iterable[str] | str | None = None,
    prune_tied: bool = False,
    names: Iterable[str] | None = None,
) -> dict[str, LayerInfo]:
    """What :func:`prunable_parameters` selects, as the LayerInfo (kind, N:M axis, source) of each."""
    return {name: info for name, (_, info) in _resolve(model, names, layers, prune_bias, prune_tied).items()}


def _resolve(model, names, layers, prune_bias, prune_tied) -> dict[str, tuple[nn.Parameter, LayerInfo]]:
    infos = describe_model(model)
    params = model_parameters(model)
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    selected = select_layers(infos, names=names, layers=layers, prune_bias=prune_bias, prune_tied=prune_tied, shapes=shapes)
    return {name: (params[name], info) for name, info in selected.items()}


class MaskedSparsifier:
    """Base class: masks + dense shadows on a model's parameters; subclasses decide the masks.

    Args:
        model: the model (or its DDP wrapper); parameters are found by name.
        names: which parameters to mask, by exact name (default: every prunable layer's
            weight, as :func:`prunable_parameters` decides).
        initial_masks: masks to start from (default: the parameters' exact zeros are masked).
        regrow: keep updating masked weights (DNS) or pin them at zero (fixed-mask fine-tuning).
        prune_bias: also mask the biases of prunable layers (in the default selection).
        layers: ``GLOB[@AXIS]`` patterns selecting the parameters (with ``names``: only their axes).
        prune_tied: mask a tensor several modules share once for all of them (else it is refused
            when named and left out by default).

    Attributes:
        layer_info: the LayerInfo (kind, N:M axis, where that is known from) of each masked name.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Iterable[str] | None = None,
        *,
        initial_masks: dict[str, torch.Tensor] | None = None,
        regrow: bool = True,
        prune_bias: bool = False,
        layers: Iterable[str] | str | None = None,
        prune_tied: bool = False,
    ):
        self.model = model
        resolved = _resolve(model, names, layers, prune_bias, prune_tied)
        self.params: dict[str, nn.Parameter] = {n: param for n, (param, _) in resolved.items()}
        self.layer_info: dict[str, LayerInfo] = {n: info for n, (_, info) in resolved.items()}
        self.regrow = regrow
        self.iteration = 0
        self._masks: dict[str, torch.Tensor] = {}  # owned: compiled updates change them in place
        self._keep: dict[str, torch.Tensor] = {}  # T as the parameter's dtype
        self._cut: dict[str, torch.Tensor] = {}  # 1 − T as the parameter's dtype
        self._kept: dict[str, int] = {}  # number of kept weights per layer
        self._shadow: dict[str, torch.Tensor] = {}
        self._flat: dict[str, _FlatViews | None] = {}  # numpy views for the compiled passes (None: torch)
        self._fold_nan: dict[str, bool] = {}  # compiled fold with flags: whether W holds a NaN
        with torch.no_grad():
            for name, param in self.params.items():
                given = _initial_mask(initial_masks, name, self.layer_info[name])
                mask = (given != 0) if given is not None else (param != 0)
                if tuple(mask.shape) != tuple(param.shape):
                    raise UserError(f"initial mask for {name!r} has shape {tuple(mask.shape)}, the layer has {tuple(param.shape)}")
                self.set_mask(name, mask.to(param.device), param.detach().clone())

    @torch.no_grad()
    def set_mask(self, name: str, mask: torch.Tensor, weight: torch.Tensor) -> None:
        """Install ``mask`` for ``name`` given the layer's dense weights (which become the shadow)."""
        param = self.params[name]
        self._masks[name] = mask.to(torch.bool, memory_format=torch.contiguous_format, copy=True)
        self._keep[name] = self._masks[name].to(param.dtype)
        self._cut[name] = 1.0 - self._keep[name]
        self._kept[name] = int(self._masks[name].sum())
        self._shadow[name] = weight
        self._flat.pop(name, None)
        param.copy_(weight).mul_(self._keep[name])

    @torch.no_grad()
    def dense_weight(self, name: str) -> torch.Tensor:
        """W: the parameter where kept, the shadow where cut."""
        return torch.addcmul(self._shadow[name] * self._cut[name], self.params[name], self._keep[name])

    # -- the training-loop hook ---------------------------------------------------------------
    def step(self) -> None:
        """Fold the optimizer's update into the shadows, re-mask the model, update masks."""
        # Kept lean: on LeNet-300-100 the compiled passes of a step take ~30 µs, and the Python
        # around them cost another ~15 µs in a training loop before this was trimmed. The
        # compiled passes write through numpy views, outside autograd, so no grad-mode switch
        # (torch.no_grad() costs ~1.7 µs) is entered unless a layer falls back to torch.
        bounds = self._fold_bounds()
        kernels = _KERNELS if _KERNELS is not None else _kernels()
        regrow = self.regrow
        for name, param in self.params.items():
            flat = self._flat.get(name)
            if flat is None or flat.data_ptr != param.data_ptr():
                flat = self.flat_views(name)
                if flat is None:
                    self._fold_torch(name, param)
                    continue
            if not regrow:
                kernels.mask_(flat.param, flat.mask)  # reads the 1-byte mask, not the float one
            elif bounds and name in bounds:
                self._fold_nan[name] = kernels.fold_flag_(flat.param, flat.shadow, flat.mask, bounds[name], flat.flags)
            else:
                kernels.fold_(flat.param, flat.shadow, flat.mask)
        if self.update_masks_enters_no_grad:
            self.update_masks()
        else:  # a subclass written for the step that always ran under torch.no_grad()
            with torch.no_grad():
                self.update_masks()
        self.iteration += 1

    @torch.no_grad()
    def _fold_torch(self, name: str, param: torch.Tensor) -> None:
        """The fold in torch ops (a layer that is not contiguous float32 on CPU)."""
        if self.regrow:
            self._shadow[name].addcmul_(param, self._cut[name])  # where cut: W + (0 + Δ)
        param.mul_(self._keep[name])

    def _fold_bounds(self) -> dict[str, np.float32]:
        """Layers whose fold should also count the entries with |W| >= a bound (for an update)."""
        return {}

    def flat_views(self, name: str) -> _FlatViews | None:
        """Flat numpy views of a layer's tensors for the compiled passes, or None where they do
        not apply (not contiguous float32 on CPU); rebuilt when the parameter's storage moves."""
        param = self.params[name]
        flat = self._flat.get(name, _MISSING)
        if flat is not _MISSING and (flat is None or flat.data_ptr == param.data_ptr()):
            return flat
        tensors = (param, self._shadow[name], self._keep[name], self._cut[name])
        compiled = all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
        flat = self._flat[name] = _FlatViews(param, self._shadow[name], self._keep[name], self._cut[name], self._masks[name]) if compiled else None
        return flat

    # True where update_masks enters torch.no_grad() itself, around the torch ops that need it
    # (DNS: its compiled update needs none); otherwise step() runs it under torch.no_grad().
    update_masks_enters_no_grad: bool = False

    def update_masks(self) -> None:
        """Subclasses change masks here, after the fold (p = W⊙T, and W = p⊙T + S⊙(1−T))."""

    # -- results --------------------------------------------------------------------------------
    def masks(self) -> dict[str, torch.Tensor]:
        return {name: mask.detach().cpu().clone() for name, mask in self._masks.items()}

    def shadows(self) -> dict[str, torch.Tensor]:
        """The dense weights W of every layer (what a resume needs)."""
        if not self.regrow:
            return {name: param.detach().cpu().clone() for name, param in self.params.items()}
        return {name: self.dense_weight(name).cpu() for name in self.params}

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self._masks.values())
        return 1.0 - sum(self._kept.values()) / total if total else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        return {name: 1.0 - float(m.float().mean()) for name, m in self._masks.items()}

    # -- resume -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "shadow": self.shadows(), "masks": self.masks()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        for name, param in self.params.items():
            self.set_mask(name, state["masks"][name].to(param.device).bool().clone(), state["shadow"][name].to(param.device).clone())


def _initial_mask(masks: dict[str, torch.Tensor] | None, name: str, info: LayerInfo) -> torch.Tensor | None:
    """The given mask of ``name``, or of another name of the same tied tensor (all of them ANDed)."""
    if not masks:
        return None
    found = [masks[n] != 0 for n in (name, *info.tied) if n in masks]
    if not found:
        return None
    mask = found[0]
    for other in found[1:]:
        mask = mask & other
    return mask


class FixedMaskSparsifier(MaskedSparsifier):
    """Masked fine-tuning: masks never change and pruned weights stay exactly zero."""

    update_masks_enters_no_grad = True  # it has no update

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor], **kwargs: Any):
        super().__init__(model, list(masks), initial_masks=masks, regrow=False, **kwargs)


class _FlatViews:
    """Flat numpy views sharing memory with a layer's parameter, shadow, float masks and mask,
    and the layer's candidate flags."""

    def __init__(self, param: torch.Tensor, shadow: torch.Tensor, keep: torch.Tensor, cut: torch.Tensor, mask: torch.Tensor):
        self.data_ptr = param.data_ptr()
        self.param = param.detach().view(-1).numpy()
        self.shadow = shadow.view(-1).numpy()
        self.keep = keep.view(-1).numpy()
        self.cut = cut.view(-1).numpy()
        self.mask = mask.view(-1).numpy()
        # |W| >= the update's bound, set by ``fold_flag_``; zero-padded to whole groups of 8
        self.flags = np.zeros(-(-self.param.shape[0] // 8) * 8, dtype=np.uint8)


_MISSING: Any = object()


_KERNELS: Any = None


def kernels_loaded() -> bool:
    """Whether this process has loaded the compiled passes yet: the first steps of a sparse
    phase load them from numba's on-disk cache (~0.4 s), or compile them (~10 s) on the first
    run after an install or an edit of ``_kernels.py``."""
    return _KERNELS is not None


def _kernels() -> Any:
    """The compiled passes, imported on first use (numba compiles or loads them from its cache)."""
    global _KERNELS
    if _KERNELS is None:
        from . import _kernels as kernels

        _KERNELS = kernels
    return _KERNELS
