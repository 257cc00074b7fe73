"""Dynamic Network Surgery (Guo, Yao & Chen, NIPS 2016), faithful to its reference code.

Per layer, with s the saliency (|W| by default) and μ, σ its mean and standard deviation
over the layer's unmasked entries: t = max(μ + c·σ, 0); cut where T=1 and s ≤ a = 0.9·t;
splice where T=0 and s > b = 1.1·t; in between the mask stays (hysteresis). A layer's mask
is updated with probability (1 + γ·iter)^(−power) at each iteration, and never after
``iter_stop``. μ, σ are computed once at the first update (the reference's choice) unless
``reestimate`` is set. Beyond the paper: per-layer c can be *calibrated* from a target
sparsity, and masks can be constrained to N:M along the engine's reduction axis. A layer that
starts sparse (an imported pruned checkpoint, whose cut weights have lost their values) and
has a target re-calibrates at every update, so that the target is reached from any start.

On CPU float32 layers the magnitude update runs through compiled passes (``_kernels``) that
visit only the kept weights and those near the threshold, flagged by the step's fold; with
per-layer targets re-estimated at every update (the MNIST table's settings) the whole update is
one compiled call, statistics included. They give the same masks bit for bit as the torch
update (``tests/test_surgery.py`` keeps a frozen reference). The update draws of many
iterations are made at once (``_draws``), equal to torch's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..layers import parse_patterns
from ..pattern import NMPattern, cannot_hold, nm_mask
from .criteria import make_criterion
from .sparsifier import MaskedSparsifier, _kernels, prunable_parameters

CUT_FACTOR = 0.9
SPLICE_FACTOR = 1.1
# The compiled update looks closely only at weights with |W| >= a bound: BOUND_MARGIN·a of the
# previous update (after a torch update, and for layers with a fixed c), a wider margin costs
# more candidates, a narrower one more fallbacks to the torch update; for a calibrated layer,
# a margin below its last quantile that adapts to how many candidates it finds (_next_bound).
BOUND_MARGIN = 0.9
_START_MARGIN = 0.02
_MIN_MARGIN = 1e-3
_LOWERINGS = 4  # times an update flags again, lower, before it runs the torch update
_NAN32 = np.float32(np.nan)
_NO_BOUNDS: dict[str, np.float32] = {}  # returned by _fold_bounds when no fold flags (read only)
# what DNS's lean step goes around: a subclass that overrides one of them gets the general step
_LEAN_STEP_SKIPS = ("update_masks", "_fold_bounds", "_update_compiled")


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


def calibration_rank(numel: int, target: float) -> int:
    """k such that cutting the k smallest of ``numel`` scores cuts the ``target`` fraction."""
    return max(1, min(numel, round(target * numel)))


def keep_rank(numel: int, target: float) -> int:
    """m such that the calibration quantile is the m-th largest score: the k-th smallest of
    ``calibration_rank``, counted from the top."""
    return numel - calibration_rank(numel, target) + 1


def kth_smallest(values: torch.Tensor, k: int) -> float:
    """The k-th smallest (1-based) of a flat tensor. On CPU through numpy's introselect: the same
    value as ``torch.kthvalue`` at ~1/50 of its cost (0.12 ms vs 5.8 ms for 235k floats)."""
    if values.device.type == "cpu" and not bool(torch.isnan(values).any()):
        return float(np.partition(values.detach().numpy(), k - 1)[k - 1])
    return float(values.kthvalue(k).values)


def c_for_cut(cut_at: float, mean: float, std: float) -> float:
    """The c whose cut threshold a = 0.9·t falls at ``cut_at`` (inverts a = t − 0.1·|t|)."""
    t = cut_at / CUT_FACTOR if cut_at >= 0 else cut_at / SPLICE_FACTOR
    return (t - mean) / std if std > 0 else 0.0


def calibrate_c(score: torch.Tensor, target: float, mean: float, std: float) -> float:
    """The c whose cut threshold a = 0.9·t falls at the ``target`` quantile of the layer's scores."""
    if target <= 0:
        return float("inf")
    flat = score.flatten().float()
    return c_for_cut(kth_smallest(flat, calibration_rank(flat.numel(), target)), mean, std)


_DRAW_BLOCK = 512  # iterations whose update draws are made at once
# _kernels.mt19937_uniform draws at most this many values per seed: output k reads state[k + 397]
# of the 624-word state, so k + 397 < 624 needs no second twist. More layers draw through torch.
_MT_MAX_DRAWS = 624 - 397
_TORCH_GRAIN = 32768  # ATen reduces fewer elements than this on one thread (at::internal::GRAIN_SIZE)
_LANES: list[int | None] = []


def exact_stats_lanes() -> int | None:
    """The vector width (floats) with which ``_kernels.torch_mean_f32``/``torch_std_f32``
    reproduce this torch's ``mean()``/``std()`` of a float32 vector bit for bit, or None (then
    the update takes its statistics from torch). Checked once per process on random vectors."""
    if not _LANES:
        kernels = _kernels()
        rng = np.random.default_rng(0)
        samples = [np.abs(rng.standard_normal(n)).astype(np.float32) * np.float32(rng.uniform(1e-3, 1.0)) for n in (*range(16, 80), 127, 1000, 4097, 9999, 20000, _TORCH_GRAIN - 1)]
        found = None
        for lanes in (8, 16, 4):
            if all(
                kernels.torch_mean_f32(x, x.shape[0], lanes) == np.float32(torch.from_numpy(x).mean().item())
                and kernels.torch_std_f32(x, x.shape[0], kernels.torch_mean_f32(x, x.shape[0], lanes)) == np.float32(torch.from_numpy(x).std().item())
                for x in samples
            ):
                found = lanes
                break
        _LANES.append(found)
    return _LANES[0]


class _KeptIndex:
    """A layer's kept entries in index order (the order of ``score[mask]``), with spare room."""

    def __init__(self, mask: np.ndarray):
        found = np.flatnonzero(mask)
        self.count = int(found.shape[0])
        self.index = np.empty(max(1024, 2 * self.count), dtype=np.int64)
        self.index[: self.count] = found

    def reserve(self, capacity: int) -> None:
        if capacity > self.index.shape[0]:
            grown = np.empty(2 * capacity, dtype=np.int64)
            grown[: self.count] = self.index[: self.count]
            self.index = grown


class _ScanBuffers:
    """Per-layer outputs of ``_kernels.collect``: the cut candidates, and the scores (the kept
    ones, then the candidates')."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.candidates = np.empty(capacity, dtype=np.int64)
        # a torch tensor, so that mean/std run through the same torch kernels as score[mask]
        self.scores_tensor = torch.empty(capacity, dtype=torch.float32)
        self.scores = self.scores_tensor.numpy()


class DynamicNetworkSurgery(MaskedSparsifier):
    """Prune-and-splice masks updated during training. See the module docstring."""

    update_masks_enters_no_grad = True  # the compiled update needs no grad-mode switch (~1.7 µs)

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
        self._kept_index: dict[str, _KeptIndex] = {}  # set_mask (called from the base __init__) resets it
        self._one_call: list[tuple[nn.Parameter, Any]] | None = None  # see _one_call_layers
        self._one_call_key: tuple[bool, bool] | None = None  # (regrow, reestimate) it was made for
        selection = dict(layers=config.layers, prune_bias=config.prune_bias, prune_tied=config.prune_tied)
        if names is None:
            names = list(prunable_parameters(model, **selection))
        if not initial_masks:
            # Start dense: the reference begins with all-ones masks on a (pre)trained model.
            initial_masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(model, names=names, **selection).items()}
        super().__init__(model, names, initial_masks=initial_masks, regrow=True, **selection)
        # A layer that starts sparse (an imported pruned checkpoint) has lost its cut weights'
        # values: they restart at 0, so a calibration estimated once would put the threshold
        # among those zeros (t ≈ 0, every weight that moves is spliced back, and the target is
        # never reached). Such layers re-calibrate at every update, as with ``reestimate``.
        self._recalibrate = {n for n in self.params if self._kept[n] < self._masks[n].numel() and self._target(n) is not None}
        self.criterion = make_criterion(self.config.criterion)
        self.reestimate = self.config.reestimate if self.config.reestimate is not None else self.config.criterion != "magnitude"
        self.pattern = NMPattern.parse(self.config.nm) if self.config.nm else None
        # the compiled passes implement the magnitude rule without N:M
        self._compiled_rule = self.pattern is None and self.criterion.name == "magnitude"
        self.stats: dict[str, dict[str, float]] = {}  # name -> {"mean", "std", "c"}
        self._bound: dict[str, np.float32] = {}  # compiled update: candidates are |W| >= this
        self._scan_buffers: dict[str, _ScanBuffers] = {}
        self._quantile: dict[str, np.float32] = {}  # compiled update: the last calibration quantile
        self._bound_margin: dict[str, float] = {}  # calibrated compiled update: bound = quantile · (1 − margin)
        self._generator = torch.Generator()
        self._block_draws = True  # False once a block differed from torch's draws
        self._draw_block: list[list[float]] = []
        self._draw_block_start = 0  # the seed of its first row, so that a change of seed draws afresh
        self._drawn: list[str] = []
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
    def _fold_bounds(self) -> dict[str, np.float32]:
        """Draw the layers to update at this iteration; the compiled ones count candidates in the fold."""
        if self.iteration >= self.config.iter_stop:
            self._drawn = []
            return _NO_BOUNDS
        probability = update_probability(self.iteration, self.config.gamma, self.config.power)
        # A fresh stream per iteration, seeded from (seed, iteration): identical on every
        # rank and after a resume, with no generator state to carry.
        drawn = self._drawn = [name for name, draw in zip(self.params, self._draws(), strict=True) if draw < probability]
        if not drawn or not self._compiled_rule:
            return _NO_BOUNDS
        bound = self._bound
        return {name: bound[name] for name in drawn if name in bound}

    def _draws(self) -> list[float]:
        """This iteration's uniform draws, one per layer: ``torch.rand(layers)`` from a generator
        seeded with (seed, iteration), taken from a block of iterations drawn at once by
        ``_kernels.mt19937_uniform`` (one row of each block checked against torch; torch alone
        from then on if it ever differs)."""
        seed = self.config.seed * 1_000_003 + self.iteration
        row = seed - self._draw_block_start
        if 0 <= row < len(self._draw_block):
            return self._draw_block[row]
        layers = len(self.params)
        if self._block_draws and layers <= _MT_MAX_DRAWS and 0 <= seed and seed + _DRAW_BLOCK < 2**63:
            block = np.empty((_DRAW_BLOCK, layers), dtype=np.float32)
            _kernels().mt19937_uniform(np.arange(seed, seed + _DRAW_BLOCK, dtype=np.int64), block)
            first = torch.rand(layers, generator=self._generator.manual_seed(seed)).numpy()
            if np.array_equal(block[0], first):
                self._draw_block, self._draw_block_start = block.tolist(), seed
                return self._draw_block[0]
            self._block_draws = False
        return torch.rand(layers, generator=self._generator.manual_seed(seed)).tolist()

    def step(self) -> None:
        """The sparsifier's step (fold, then the drawn layers' updates); for the MNIST table's
        configuration in one lean loop (see ``_one_call_layers``), else the general one."""
        layers = self._one_call_layers()
        if layers is None:
            return super().step()
        # Why a loop of its own: on LeNet-300-100 (a ~1.35 ms training step) the general step
        # spent 15-30 us more per step in Python between the compiled passes (the bounds dict,
        # the generic per-layer branches, four layers of checks before each update; Python run
        # right after a training step runs from cold caches). This loop makes only the checks
        # that can change between steps. Each layer is folded and then, if drawn, updated; the
        # general step folds every layer first: the same results, as layers are independent.
        # Anything unusual takes the general per-layer update.
        for param, flat in layers:
            if flat.data_ptr != param.data_ptr():  # the parameter's storage moved
                self._one_call = None
                return super().step()
        iteration = self.iteration
        config = self.config
        kernels, lanes = _kernels(), exact_stats_lanes()  # lanes: not None, or the lean loop was not chosen
        drawn: list[float] | tuple[()] = ()
        probability = 0.0
        if iteration < config.iter_stop:
            probability = (1.0 + config.gamma * iteration) ** (-config.power)  # update_probability
            drawn = self._draws()
        self._drawn = []
        bounds = self._bound
        for index, (name, (_, flat)) in enumerate(zip(self.params, layers, strict=True)):
            if not drawn or drawn[index] >= probability:
                kernels.fold_(flat.param, flat.shadow, flat.mask)
                continue
            self._drawn.append(name)
            bound = bounds.get(name)
            if bound is None:  # a layer's first update: no bound yet, the torch update sets it
                kernels.fold_(flat.param, flat.shadow, flat.mask)
                self._update_general(name)
                continue
            nan = self._fold_nan[name] = kernels.fold_flag_(flat.param, flat.shadow, flat.mask, bound, flat.flags)
            kept = self._kept_index.get(name)
            buffers = self._scan_buffers.get(name)
            if nan or kept is None or buffers is None or not 16 <= kept.count < _TORCH_GRAIN or buffers.capacity < kept.count + 8:
                self._update_general(name)
                continue
            target = self._target(name)
            if target is None or target <= 0:  # the config changed since the loop was chosen
                self._update_general(name)
            elif not self._update_calibrated(name, flat, kept, bound, keep_rank(flat.shadow.shape[0], target), lanes):
                self._update_in_torch(name)
        self.iteration += 1

    def _one_call_layers(self) -> list[tuple[nn.Parameter, Any]] | None:
        """(parameter, flat views) of every layer when the whole step can take the lean loop:
        the magnitude rule without N:M, per-layer targets re-estimated at every update (the one-
        call compiled update), every layer contiguous float32 on CPU, torch's mean/std reproduced,
        and none of the methods it goes around (``_LEAN_STEP_SKIPS``) overridden by a subclass.
        None otherwise. Made once, again after ``set_mask`` (which may swap a layer's tensors)
        and when ``regrow`` or ``reestimate`` change; a target changed to None or 0 is seen at
        the layer's next update."""
        if self._one_call is not None and self._one_call_key == (self.regrow, self.reestimate):
            return self._one_call or None
        cls = type(self)
        self._one_call_key = (self.regrow, self.reestimate)
        eligible = (
            self.regrow
            and self._compiled_rule
            and not self.criterion.needs_grad
            and all(getattr(cls, method) is getattr(DynamicNetworkSurgery, method) for method in _LEAN_STEP_SKIPS)
            and all((self.reestimate or name in self._recalibrate) and (self._target(name) or 0) > 0 for name in self.params)
        )
        views = [self.flat_views(name) for name in self.params] if eligible and exact_stats_lanes() is not None else [None]
        self._one_call = [] if None in views else list(zip(self.params.values(), views, strict=True))
        return self._one_call or None

    def _update_general(self, name: str) -> None:
        """One drawn layer's update the general way (after its fold)."""
        if not (self._compiled_rule and self._update_compiled(name)):
            self._update_in_torch(name)

    def _update_in_torch(self, name: str, weight: torch.Tensor | None = None) -> None:
        """The torch update, and the bound of the next compiled one."""
        with torch.no_grad():  # the compiled update works on numpy views; torch's needs it
            self._update_torch(name, weight if weight is not None else self.dense_weight(name))
        self._bound[name] = np.float32(BOUND_MARGIN * self.thresholds(name)[0])

    def update_masks(self) -> None:
        weights: dict[str, torch.Tensor] = {}
        if self.criterion.needs_grad:
            with torch.no_grad():
                for name in self.params:
                    weights[name] = self.dense_weight(name)
                    self.criterion.observe(name, weights[name], self.params[name].grad)
        for name in self._drawn:
            if not (self._compiled_rule and self._update_compiled(name)):
                self._update_in_torch(name, weights.get(name))

    def _update_torch(self, name: str, weight: torch.Tensor) -> None:
        """The update in torch ops: any criterion, N:M, any device."""
        score = self.criterion.score(name, weight)
        if name not in self.stats or self.reestimate or name in self._recalibrate:
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

    def _update_compiled(self, name: str) -> bool:
        """The magnitude update on a CPU float32 layer, in place; False where it does not apply.

        After the compiled fold the shadow holds W, so |W| is read straight from it. The fold
        flagged the candidates, the cut entries with |W| at or above a bound; one more pass lists
        them, and the kept entries come from a list kept in index order between updates. Exact
        when the bound is at most the new b (every cut weight below it stays cut) and, for a
        calibrated layer, when at least as many weights as those to keep reach the bound (the
        calibration quantile is then among the kept and the candidates); otherwise the torch
        update runs. The bound only decides how much is looked at, never the result.
        """
        bound = self._bound.get(name)
        flat = self.flat_views(name)
        if bound is None or flat is None:
            return False
        if self._fold_nan[name]:
            return False
        kernels = _kernels()
        kept = self._kept_index.get(name)
        if kept is None:
            kept = self._kept_index[name] = _KeptIndex(flat.mask)
        if kept.count == 0:
            return False
        buffers = self._scan_buffers.get(name)
        if buffers is None or buffers.capacity < kept.count + 8:
            buffers = self._scan_buffers[name] = _ScanBuffers(2 * kept.count + 1024)
        target = self._target(name)
        lanes = exact_stats_lanes() if kept.count < _TORCH_GRAIN else None
        if (self.reestimate or name in self._recalibrate) and target is not None and target > 0 and lanes is not None and kept.count >= 16:
            return self._update_calibrated(name, flat, kept, bound, keep_rank(flat.shadow.shape[0], target), lanes)
        while (found := kernels.collect(flat.shadow, flat.flags, buffers.candidates, kept.index, kept.count, buffers.scores, bound))[0] < 0:
            buffers = self._scan_buffers[name] = _ScanBuffers(2 * buffers.capacity)
        n_candidates, kept_above = found
        if self.reestimate or name in self._recalibrate:
            values = buffers.scores_tensor[: kept.count]  # = score[mask], in the same order
            mean = float(values.mean())
            std = float(values.std()) if kept.count > 1 else 0.0
            if target is None:
                c = self._layer_c(name)
            elif target <= 0:
                c = float("inf")
            else:
                to_keep = keep_rank(flat.shadow.shape[0], target)
                if kept_above + n_candidates < to_keep:
                    return False
                # over the kept scores and the cut candidates: see _kernels.calibrated_update
                cut_value = kernels.kth_largest_near(buffers.scores, kept.count + n_candidates, to_keep, self._quantile.get(name, _NAN32))
                self._quantile[name] = cut_value
                c = c_for_cut(float(cut_value), mean, std)
            self.stats[name] = {"mean": mean, "std": std, "c": c}
        cut_at, splice_at = self.thresholds(name)
        cut_at, splice_at = np.float32(cut_at), np.float32(splice_at)  # the torch update compares in float32
        if not bound <= splice_at:
            return False
        kept.reserve(kept.count + n_candidates)
        cuts, splices, kept.count = kernels.apply_thresholds(
            flat.param, flat.shadow, flat.keep, flat.cut, flat.mask, buffers.candidates, n_candidates,
            kept.index, buffers.scores, kept.count, cut_at, splice_at,
        )  # fmt: skip
        self._count_changes(name, cuts, splices)
        self._bound[name] = np.float32(BOUND_MARGIN * self.thresholds(name)[0])
        return True

    def _update_calibrated(self, name: str, flat: Any, kept: _KeptIndex, bound: np.float32, to_keep: int, lanes: int) -> bool:
        """The whole calibrated update in one compiled call: the same arithmetic as the path
        above, torch's mean and std included (a layer of LeNet-300-100 spent more time between
        the compiled passes, in ~10 torch and numpy calls, than in them).

        The candidates it needs are the weights at or above the new quantile, so the next bound
        sits a margin below this quantile, a margin that follows how many candidates the last
        update found (aiming at 5–25% more than the weights to keep): a margin fixed at 10%
        listed ~5× too many in LeNet-300-100's first layer, and listing them was most of the
        update. Too few found (the quantile fell past the margin): flag again lower and retry.
        """
        kernels = _kernels()
        lowered = 0
        while True:
            buffers = self._scan_buffers[name]
            outcome, cuts, splices, count, mean, std, c, quantile, n_reaching = kernels.calibrated_update(
                flat.param, flat.shadow, flat.keep, flat.cut, flat.mask, bound, flat.flags, buffers.candidates,
                kept.index, kept.count, buffers.scores, to_keep, self._quantile.get(name, _NAN32), lanes,
                CUT_FACTOR, SPLICE_FACTOR, 1 - CUT_FACTOR, SPLICE_FACTOR - 1, self.criterion.nonnegative,
            )  # fmt: skip
            if outcome == kernels.NEED_ROOM:
                if n_reaching < 0:
                    self._scan_buffers[name] = _ScanBuffers(2 * buffers.capacity)
                else:
                    kept.reserve(kept.count + n_reaching)
            elif outcome == kernels.TOO_FEW and lowered < _LOWERINGS and bound > 0:
                lowered += 1
                margin = min(_START_MARGIN * 4**lowered, 0.5)
                self._bound_margin[name] = max(self._bound_margin.get(name, _START_MARGIN), margin)
                bound = np.float32(bound * (1 - margin))
                kernels.flag_(flat.shadow, flat.mask, bound, flat.flags)
            else:
                break
        if quantile == quantile:
            self._quantile[name] = np.float32(quantile)  # one compiled signature for both paths
        if outcome != kernels.APPLIED:
            return False
        self.stats[name] = {"mean": mean, "std": std, "c": c}
        kept.count = count
        self._count_changes(name, cuts, splices)
        self._bound[name] = self._next_bound(name, quantile, n_reaching, to_keep)
        return True

    def _next_bound(self, name: str, quantile: float, n_reaching: int, to_keep: int) -> np.float32:
        """The next update's bound: a margin below this quantile, narrowed while over 25% more
        weights than those to keep reached the bound, widened under 5%."""
        margin = self._bound_margin.get(name, _START_MARGIN)
        if n_reaching > 1.25 * to_keep:
            margin = max(0.7 * margin, _MIN_MARGIN)
        elif n_reaching < 1.05 * to_keep:
            margin = min(1.5 * margin, 0.5)
        self._bound_margin[name] = margin
        return np.float32(quantile * (1 - margin))

    def _count_changes(self, name: str, cuts: int, splices: int) -> None:
        self._kept[name] += splices - cuts
        self.cuts += cuts
        self.splices += splices

    def set_mask(self, name: str, mask: torch.Tensor, weight: torch.Tensor) -> None:
        super().set_mask(name, mask, weight)
        self._kept_index.pop(name, None)  # rebuilt from the mask at the next compiled update
        self._one_call = None  # the layer's tensors may have changed

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
