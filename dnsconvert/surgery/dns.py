"""Dynamic Network Surgery (Guo, Yao & Chen, NIPS 2016), faithful to its reference code.

Per layer, with s the saliency (|W| by default) and μ, σ its mean and standard deviation
over the layer's unmasked entries: t = max(μ + c·σ, 0); cut where T=1 and s ≤ a = 0.9·t;
splice where T=0 and s > b = 1.1·t; in between the mask stays (hysteresis). A layer's mask
is updated with probability (1 + γ·iter)^(−power) at each iteration, and never after
``iter_stop``. μ, σ are computed once at the first update (the reference's choice) unless
``reestimate`` is set. Beyond the paper: per-layer c can be *calibrated* from a target
sparsity, and masks can be constrained to N:M along the engine's reduction axis.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..layers import parse_patterns
from ..pattern import NMPattern, cannot_hold, nm_mask
from .criteria import make_criterion
from .sparsifier import MaskedSparsifier, prunable_parameters

CUT_FACTOR = 0.9
SPLICE_FACTOR = 1.1


@dataclass
class DNSConfig:
    """Hyper-parameters of Dynamic Network Surgery (defaults from the reference code).

    Attributes:
        c: crate, the threshold in standard deviations above the mean (paper: ~3-4 for
            LeNets); overridden per layer by ``layer_c`` or by calibration.
        gamma, power: mask-update probability (1 + gamma·iter)^(−power).
        iter_stop: no mask updates from this iteration on.
        criterion: ``magnitude``, ``taylor`` or ``movement``.
        reestimate: recompute μ, σ at every mask update (default: only for taylor and
            movement, whose scale drifts as the loss falls; magnitude follows the reference).
        target_sparsity: if set, calibrate every layer's c so that this fraction is cut.
        layer_sparsity: per-layer targets (parameter name -> fraction), overriding the above.
        nm: constrain masks to this N:M pattern along each layer's reduction axis.
        prune_bias: also mask Linear/Conv biases (the reference does; default off).
        layers: ``GLOB[@AXIS]`` patterns selecting the parameters to prune (default: every
            layer of a prunable kind, see :mod:`dnsconvert.layers`).
        prune_tied: prune a tensor that several modules share (tied weights) once for all of
            them; by default it is left out, and refused when selected.
        seed: seeds the update draws, so that every rank and every resume draws the same.
    """

    c: float = 3.0
    gamma: float = 1e-4
    power: float = 1.0
    iter_stop: int = 10_000
    criterion: str = "magnitude"
    reestimate: bool | None = None
    target_sparsity: float | None = None
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    layer_c: dict[str, float] = field(default_factory=dict)
    nm: str | None = None
    prune_bias: bool = False
    seed: int = 0
    layers: list[str] | None = None
    prune_tied: bool = False

    def __post_init__(self) -> None:
        if self.gamma < 0 or self.power < 0:
            raise UserError(f"gamma and power must be non-negative, got {self.gamma}, {self.power}")
        for value in [self.target_sparsity, *self.layer_sparsity.values()]:
            if value is not None and not 0.0 <= value < 1.0:
                raise UserError(f"target sparsity must lie in [0, 1), got {value}")
        if self.nm is not None:
            NMPattern.parse(self.nm)
        if self.layers is not None:
            self.layers = [str(p) for p in parse_patterns(self.layers)]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def update_probability(iteration: int, gamma: float, power: float) -> float:
    """σ(iter) = (1 + γ·iter)^(−power)."""
    return (1.0 + gamma * iteration) ** (-power)


def calibrate_c(score: torch.Tensor, target: float, mean: float, std: float) -> float:
    """The c whose cut threshold a = 0.9·t falls at the ``target`` quantile of the layer's scores."""
    if target <= 0:
        return float("inf")
    flat = score.flatten().float()
    k = max(1, min(flat.numel(), round(target * flat.numel())))
    cut_at = float(flat.kthvalue(k).values)
    # invert a = t − 0.1·|t|
    t = cut_at / CUT_FACTOR if cut_at >= 0 else cut_at / SPLICE_FACTOR
    return (t - mean) / std if std > 0 else 0.0


class DynamicNetworkSurgery(MaskedSparsifier):
    """Prune-and-splice masks updated during training. See the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        config: DNSConfig | None = None,
        *,
        names: list[str] | None = None,
        initial_masks: dict[str, torch.Tensor] | None = None,
        layers: list[str] | str | None = None,
        prune_tied: bool | None = None,
    ):
        """``layers`` and ``prune_tied`` override the config's (and are recorded in it)."""
        config = config or DNSConfig()
        if layers is not None or prune_tied is not None:
            config = replace(
                config,
                layers=config.layers if layers is None else [str(p) for p in parse_patterns(layers)],
                prune_tied=config.prune_tied if prune_tied is None else bool(prune_tied),
            )
        self.config = config
        selection = dict(layers=config.layers, prune_bias=config.prune_bias, prune_tied=config.prune_tied)
        if names is None:
            names = list(prunable_parameters(model, **selection))
        if not initial_masks:
            # Start dense: the reference begins with all-ones masks on a (pre)trained model.
            initial_masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(model, names=names, **selection).items()}
        super().__init__(model, names, initial_masks=initial_masks, regrow=True, **selection)
        self.criterion = make_criterion(self.config.criterion)
        self.reestimate = self.config.reestimate if self.config.reestimate is not None else self.config.criterion != "magnitude"
        self.pattern = NMPattern.parse(self.config.nm) if self.config.nm else None
        self.stats: dict[str, dict[str, float]] = {}  # name -> {"mean", "std", "c"}
        self.cuts = 0
        self.splices = 0
        # N:M runs along each layer's own reduction axis (axis 0 for a transformers Conv1D)
        self._nm_axis: dict[str, int] = {}
        if self.pattern is not None:
            for name, info in self.layer_info.items():
                if cannot_hold(tuple(self._masks[name].shape), self.pattern, info) is None:
                    self._nm_axis[name] = info.axis
                    weight = self.dense_weight(name)
                    self.set_mask(name, self._masks[name] & nm_mask(weight.abs(), self.pattern, allowed=self._masks[name], axis=info.axis), weight)

    # -- thresholds ---------------------------------------------------------------------------
    def _layer_c(self, name: str) -> float:
        return self.config.layer_c.get(name, self.config.c)

    def _target(self, name: str) -> float | None:
        return self.config.layer_sparsity.get(name, self.config.target_sparsity)

    def _estimate(self, name: str, score: torch.Tensor) -> dict[str, float]:
        mask = self._masks[name]
        values = score[mask] if bool(mask.any()) else score.flatten()
        mean = float(values.float().mean())
        std = float(values.float().std()) if values.numel() > 1 else 0.0
        target = self._target(name)
        c = calibrate_c(score, target, mean, std) if target is not None else self._layer_c(name)
        return {"mean": mean, "std": std, "c": c}

    def thresholds(self, name: str) -> tuple[float, float]:
        """(a, b): cut at s ≤ a, splice at s > b."""
        stat = self.stats[name]
        t = stat["mean"] + stat["c"] * stat["std"]
        if self.criterion.nonnegative:
            t = max(t, 0.0)
        return t - (1 - CUT_FACTOR) * abs(t), t + (SPLICE_FACTOR - 1) * abs(t)

    # -- the update ----------------------------------------------------------------------------
    def update_masks(self) -> set[str]:
        weights: dict[str, torch.Tensor] = {}
        if self.criterion.needs_grad:
            for name in self.params:
                weights[name] = self.dense_weight(name)
                self.criterion.observe(name, weights[name], self.params[name].grad)
        if self.iteration >= self.config.iter_stop:
            return set()
        probability = update_probability(self.iteration, self.config.gamma, self.config.power)
        # A fresh generator per iteration, seeded from (seed, iteration): identical on every
        # rank and after a resume, with no generator state to carry.
        draws = torch.rand(len(self.params), generator=torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.iteration))
        changed = set()
        for name, draw in zip(self.params, draws.tolist(), strict=True):
            if draw >= probability:
                continue
            weight = weights[name] if name in weights else self.dense_weight(name)
            score = self.criterion.score(name, weight)
            if name not in self.stats or self.reestimate:
                self.stats[name] = self._estimate(name, score)
            cut_at, splice_at = self.thresholds(name)
            mask = self._masks[name]
            # keep where s > a if kept, s > b if cut: one threshold tensor, a where T=1 and b where
            # T=0, so the hysteresis band keeps each weight's state (float ops: bool ones are slow)
            threshold = (self._keep[name] * cut_at).add_(self._cut[name], alpha=splice_at)  # exactly a or b
            new_mask = score > threshold
            if name in self._nm_axis:
                new_mask &= nm_mask(score, self.pattern, allowed=new_mask, axis=self._nm_axis[name])
            cuts = int((mask > new_mask).sum())
            kept_before = self._kept[name]
            self.set_mask(name, new_mask, weight)
            self.cuts += cuts
            self.splices += cuts + self._kept[name] - kept_before
            changed.add(name)
        return changed

    # -- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "stats": {k: dict(v) for k, v in self.stats.items()},
            "criterion": self.criterion.state_dict(),
            "cuts": self.cuts,
            "splices": self.splices,
            "config": self.config.to_json(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.stats = {k: {kk: float(vv) for kk, vv in v.items()} for k, v in (state.get("stats") or {}).items()}
        self.criterion.load_state_dict(state.get("criterion") or {})
        self.cuts = int(state.get("cuts", 0))
        self.splices = int(state.get("splices", 0))
