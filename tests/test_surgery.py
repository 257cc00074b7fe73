from dataclasses import replace

import pytest
import torch
from torch import nn

from dnsconvert.pattern import NMPattern, cannot_hold, complies, nm_mask
from dnsconvert.surgery import (
    DNSConfig,
    DynamicNetworkSurgery,
    FixedMaskSparsifier,
    MaskedSparsifier,
    imp_schedule,
    magnitude_masks,
    update_probability,
)


def linear(values):
    layer = nn.Linear(len(values), 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([values]))
    return nn.Sequential(layer)


def sgd_step(model, grad, lr=1.0):
    """One SGD step with a hand-made gradient on the single Linear weight."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model[0].weight.grad = torch.tensor([grad], dtype=torch.float32)
    opt.step()


ALWAYS = dict(gamma=0.0, power=1.0)  # update probability 1 at every iteration


def test_cut_weight_keeps_learning_and_is_spliced_back():
    model = linear([1.0, 1.0, 1.0, 1.0, 0.01])
    dns = DynamicNetworkSurgery(model, DNSConfig(c=0.0, **ALWAYS))
    sgd_step(model, [0, 0, 0, 0, 0])
    dns.step()
    assert dns.masks()["0.weight"].tolist() == [[True, True, True, True, False]]
    assert model[0].weight[0, 4].item() == 0.0  # the model sees the cut weight as zero
    # the loss gradient keeps flowing to the cut weight: after one step it has grown
    sgd_step(model, [0, 0, 0, 0, -5.0])
    dns.step()
    assert dns.shadows()["0.weight"][0, 4].item() == pytest.approx(5.01)
    assert dns.masks()["0.weight"][0, 4].item() is True  # spliced back
    assert model[0].weight[0, 4].item() == pytest.approx(5.01)
    assert dns.splices == 1 and dns.cuts == 1


def test_plain_mask_multiply_could_not_splice():
    # Contrast: autograd through weight*mask gives a cut weight zero gradient.
    w = torch.tensor([1.0, 0.5], requires_grad=True)
    mask = torch.tensor([1.0, 0.0])
    (w * mask).sum().backward()
    assert w.grad.tolist() == [1.0, 0.0]


def test_hysteresis_band():
    # stats from [1, 1, 1, 1]: mean 1, std 0; c=0 -> t=1, a=0.9, b=1.1
    model = linear([1.0, 1.0, 1.0, 1.0])
    dns = DynamicNetworkSurgery(model, DNSConfig(c=0.0, **ALWAYS))
    sgd_step(model, [0, 0, 0, 0])
    dns.step()
    a, b = dns.thresholds("0.weight")
    assert (a, b) == pytest.approx((0.9, 1.1))
    # move weights: one kept into the band (stays kept), one kept below a (cut)
    sgd_step(model, [0.05, 0.5, 0, 0])  # -> 0.95 (band), 0.5 (cut)
    dns.step()
    assert dns.masks()["0.weight"].tolist() == [[True, False, True, True]]
    # the cut one grows into the band: stays cut; above b: spliced
    sgd_step(model, [0, -0.5, 0, 0])  # 0.5 -> 1.0, inside (0.9, 1.1]
    dns.step()
    assert dns.masks()["0.weight"].tolist() == [[True, False, True, True]]
    sgd_step(model, [0, -0.2, 0, 0])  # 1.0 -> 1.2 > b
    dns.step()
    assert dns.masks()["0.weight"].tolist() == [[True, True, True, True]]


def test_thresholds_from_unmasked_entries_and_clamped_at_zero():
    model = linear([3.0, 1.0, 0.0, 0.0])
    dns = DynamicNetworkSurgery(model, DNSConfig(c=-10.0, **ALWAYS), initial_masks={"0.weight": torch.tensor([[1, 1, 0, 0]])})
    sgd_step(model, [0, 0, 0, 0])
    dns.step()
    assert dns.stats["0.weight"]["mean"] == pytest.approx(2.0)  # over the two unmasked entries
    assert dns.thresholds("0.weight") == (0.0, 0.0)  # max(mu + c*sigma, 0)


def test_update_probability_schedule_and_iter_stop():
    assert update_probability(0, 1e-3, 1.0) == 1.0
    assert update_probability(1000, 1e-3, 1.0) == pytest.approx(0.5)
    assert update_probability(3000, 1e-3, 2.0) == pytest.approx(1 / 16)
    # gamma large: updates become rare; count them through the stats being recomputed
    model = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(50)])
    dns = DynamicNetworkSurgery(model, DNSConfig(c=0.0, gamma=1.0, power=1.0, reestimate=True, iter_stop=1000))
    updates = 0
    for _ in range(40):
        before = {k: dict(v) for k, v in dns.stats.items()}
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 0.01
        torch.optim.SGD(model.parameters(), lr=1.0).step()
        dns.step()
        updates += sum(1 for k in dns.stats if before.get(k) != dns.stats[k])
    expected = 50 * sum(update_probability(i, 1.0, 1.0) for i in range(40))
    assert 0.6 * expected < updates < 1.4 * expected


def test_no_mask_updates_after_iter_stop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16, bias=False))
    dns = DynamicNetworkSurgery(model, DNSConfig(c=0.5, iter_stop=3, **ALWAYS))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    history = []
    for _ in range(10):
        model[0].weight.grad = torch.randn(16, 16)
        opt.step()
        dns.step()
        history.append(dns.masks()["0.weight"])
    assert not torch.equal(history[0], history[2]) or not torch.equal(history[1], history[2])
    for later in history[3:]:
        assert torch.equal(later, history[2])


def test_taylor_criterion_ranks_by_weight_times_grad():
    model = linear([1.0, 1.0, 0.1, 0.1])
    dns = DynamicNetworkSurgery(model, DNSConfig(c=0.0, criterion="taylor", **ALWAYS))
    # |w*g|: big weights with tiny gradients score low, small weights with big gradients high
    model[0].weight.grad = torch.tensor([[1e-4, 1e-4, 10.0, 10.0]])
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    dns.step()
    assert dns.masks()["0.weight"].tolist() == [[False, False, True, True]]


def test_movement_criterion_keeps_weights_moving_away_from_zero():
    model = linear([1.0, 1.0, -1.0, -1.0])
    dns = DynamicNetworkSurgery(model, DNSConfig(c=0.0, criterion="movement", **ALWAYS))
    # SGD moves w by -g: weights 0 and 2 move away from zero (score -w*g > 0), 1 and 3 toward it
    model[0].weight.grad = torch.tensor([[-1.0, 1.0, 1.0, -1.0]])
    torch.optim.SGD(model.parameters(), lr=0.0).step()
    dns.step()
    assert dns.masks()["0.weight"].tolist() == [[True, False, True, False]]


def test_taylor_needs_gradient():
    from dnsconvert.errors import UserError

    model = linear([1.0, 1.0])
    dns = DynamicNetworkSurgery(model, DNSConfig(criterion="taylor"))
    with pytest.raises(UserError, match="after optimizer.step"):
        dns.step()


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "movement"])
def test_nm_constrained_surgery_always_nm(criterion):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    # conv on a linear output is nonsense as a model, but the masks are what is tested
    dns = DynamicNetworkSurgery(model, DNSConfig(c=-1.0, criterion=criterion, nm="2:4", reestimate=True, **ALWAYS))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(20):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        dns.step()
        for name, mask in dns.masks().items():
            assert complies(mask, NMPattern(2, 4)), name


def test_calibration_meets_target_sparsity_at_first_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(100, 100), nn.Linear(100, 10))
    dns = DynamicNetworkSurgery(model, DNSConfig(target_sparsity=0.8, layer_sparsity={"1.weight": 0.5}, **ALWAYS))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    dns.step()
    sparsity = dns.layer_sparsity()
    assert sparsity["0.weight"] == pytest.approx(0.8, abs=0.005)
    assert sparsity["1.weight"] == pytest.approx(0.5, abs=0.005)


def test_fixed_mask_keeps_pruned_weights_zero():
    model = linear([1.0, 2.0, 3.0, 4.0])
    fixed = FixedMaskSparsifier(model, {"0.weight": torch.tensor([[0, 1, 0, 1]], dtype=torch.bool)})
    sgd_step(model, [-1, -1, -1, -1])
    fixed.step()
    assert model[0].weight.tolist() == [[0.0, 3.0, 0.0, 5.0]]


def test_baseline_masks_and_imp_schedule():
    w = {"a": torch.arange(1, 11, dtype=torch.float32).reshape(2, 5)}
    masks = magnitude_masks(w, 0.3)
    assert masks["a"].sum() == 7 and not masks["a"].flatten()[:3].any()
    later = magnitude_masks({"a": w["a"].flip(1)}, 0.5, previous=masks)
    assert not bool((later["a"] & ~masks["a"]).any())  # IMP never regrows
    schedule = imp_schedule(0.9, 3)
    assert schedule[-1] == pytest.approx(0.9) and schedule == sorted(schedule)


def test_sparsifier_works_inside_ddp_free_loop_with_adam():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    dns = DynamicNetworkSurgery(model, DNSConfig(c=0.5, **ALWAYS))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        dns.step()
    for name, mask in dns.masks().items():
        weight = dict(model.named_parameters())[name]
        assert not bool(weight[~mask].any())


# -- the optimised update against a frozen reference ---------------------------------------------
# ReferenceDNS is the DNS step as it was before the compiled update (dnsconvert 6a3cf0d): dense
# weights rebuilt as S*(1-T) + p*T, |W| over the whole layer, mean/std over the kept entries,
# kthvalue calibration, one threshold tensor, a fresh mask per update. The optimised code must
# give bitwise-identical masks (and equal weights) at every step.
class ReferenceDNS:
    def __init__(self, model, config):
        from dnsconvert.surgery import make_criterion, prunable_parameters

        self.config = config
        self.params = prunable_parameters(model, prune_bias=config.prune_bias)
        self.criterion = make_criterion(config.criterion)
        self.reestimate = config.reestimate if config.reestimate is not None else config.criterion != "magnitude"
        self.pattern = NMPattern.parse(config.nm) if config.nm else None
        self.iteration, self.stats, self.cuts, self.splices = 0, {}, 0, 0
        self.mask, self.keep, self.cut, self.shadow = {}, {}, {}, {}
        with torch.no_grad():
            for name, param in self.params.items():
                self._set(name, torch.ones_like(param, dtype=torch.bool), param.detach().clone())
                if self.pattern is not None and cannot_hold(tuple(param.shape), self.pattern) is None:
                    weight = self.dense(name)
                    self._set(name, self.mask[name] & nm_mask(weight.abs(), self.pattern, allowed=self.mask[name]), weight)

    @torch.no_grad()
    def _set(self, name, mask, weight):
        self.mask[name] = mask.bool()
        self.keep[name] = self.mask[name].to(weight.dtype)
        self.cut[name] = 1.0 - self.keep[name]
        self.shadow[name] = weight
        self.params[name].copy_(weight).mul_(self.keep[name])

    def dense(self, name):
        return torch.addcmul(self.shadow[name] * self.cut[name], self.params[name], self.keep[name])

    def thresholds(self, name):
        stat = self.stats[name]
        t = stat["mean"] + stat["c"] * stat["std"]
        if self.criterion.nonnegative:
            t = max(t, 0.0)
        return t - (1 - 0.9) * abs(t), t + (1.1 - 1) * abs(t)

    def estimate(self, name, score):
        mask = self.mask[name]
        values = score[mask] if bool(mask.any()) else score.flatten()
        mean = float(values.float().mean())
        std = float(values.float().std()) if values.numel() > 1 else 0.0
        target = self.config.layer_sparsity.get(name, self.config.target_sparsity)
        if target is None:
            return {"mean": mean, "std": std, "c": self.config.layer_c.get(name, self.config.c)}
        if target <= 0:
            return {"mean": mean, "std": std, "c": float("inf")}
        flat = score.flatten().float()
        k = max(1, min(flat.numel(), round(target * flat.numel())))
        cut_at = float(flat.kthvalue(k).values)
        t = cut_at / 0.9 if cut_at >= 0 else cut_at / 1.1
        return {"mean": mean, "std": std, "c": (t - mean) / std if std > 0 else 0.0}

    @torch.no_grad()
    def step(self):
        for name, param in self.params.items():
            self.shadow[name].addcmul_(param, self.cut[name])
        weights, changed = {}, set()
        if self.criterion.needs_grad:
            for name in self.params:
                weights[name] = self.dense(name)
                self.criterion.observe(name, weights[name], self.params[name].grad)
        if self.iteration < self.config.iter_stop:
            probability = (1.0 + self.config.gamma * self.iteration) ** (-self.config.power)
            draws = torch.rand(len(self.params), generator=torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.iteration))
            for name, draw in zip(self.params, draws.tolist()):
                if draw >= probability:
                    continue
                weight = weights[name] if name in weights else self.dense(name)
                score = self.criterion.score(name, weight)
                if name not in self.stats or self.reestimate:
                    self.stats[name] = self.estimate(name, score)
                cut_at, splice_at = self.thresholds(name)
                mask = self.mask[name]
                threshold = (self.keep[name] * cut_at).add_(self.cut[name], alpha=splice_at)
                new_mask = score > threshold
                if self.pattern is not None and cannot_hold(tuple(new_mask.shape), self.pattern) is None:
                    new_mask &= nm_mask(score, self.pattern, allowed=new_mask)
                cuts = int((mask > new_mask).sum())
                kept_before = int(mask.sum())
                self._set(name, new_mask, weight)
                self.cuts += cuts
                self.splices += cuts + int(new_mask.sum()) - kept_before
                changed.add(name)
        for name, param in self.params.items():
            if name not in changed:
                param.mul_(self.keep[name])
        self.iteration += 1


def _twin_runs(make_model, config, steps, lr=0.05, momentum=0.9, weight_decay=1e-4, input_shape=(1, 28, 28)):
    """Train two identical models on the same batches, one under DNS and one under ReferenceDNS;
    yield after every step so that the caller can compare them."""
    torch.manual_seed(0)
    model = make_model()
    twin = make_model()
    twin.load_state_dict(model.state_dict())
    teacher = nn.Linear(int(torch.tensor(input_shape).prod()), 10)
    dns, ref = DynamicNetworkSurgery(model, config), ReferenceDNS(twin, config)
    optimizers = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay) for m in (model, twin)]
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, *input_shape, generator=generator)
        y = teacher(x.flatten(1)).argmax(1)
        for m, opt, sparsifier in ((model, optimizers[0], dns), (twin, optimizers[1], ref)):
            loss = nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sparsifier.step()
        yield dns, ref, model, twin


def _assert_twins_equal(dns, ref, model, twin, step):
    masks = dns.masks()
    for name in ref.params:
        assert torch.equal(masks[name], ref.mask[name]), f"mask of {name} differs at step {step}"
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs at step {step}"
    assert (dns.cuts, dns.splices) == (ref.cuts, ref.splices)


def _lenet300100():
    from dnsconvert.models import lenet300100

    return lenet300100()


def _mlp():
    """LeNet-300-100's shape at a quarter of the width (the reference's kthvalue is slow)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 75), nn.ReLU(), nn.Linear(75, 25), nn.ReLU(), nn.Linear(25, 10))


class _AsDouble(nn.Module):
    def forward(self, x):
        return x.double()


def _mlp_float64():
    """Float64 weights: no compiled pass applies, every fold and update runs in torch."""
    return nn.Sequential(_AsDouble(), *_mlp()).double()


def _small_lenet5():
    return nn.Sequential(nn.Conv2d(1, 6, 5), nn.MaxPool2d(2), nn.Conv2d(6, 12, 5), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(192, 120), nn.ReLU(), nn.Linear(120, 10))


TABLE = {"1.weight": 0.975, "3.weight": 0.97, "5.weight": 0.92}


@pytest.mark.parametrize(
    "make_model, config, lr",
    [
        # the MNIST table's configuration: per-layer targets, re-estimated at every update
        (_lenet300100, DNSConfig(layer_sparsity=TABLE, reestimate=True, gamma=2e-2, iter_stop=40, seed=5), 0.05),
        # a learning rate high enough that thresholds jump between updates (bound fallbacks)
        (_mlp, DNSConfig(layer_sparsity=TABLE, reestimate=True, gamma=1e-2, iter_stop=60, seed=1), 1.0),
        # the reference's default: c, statistics estimated once
        (_mlp, DNSConfig(c=1.5, gamma=1e-2, iter_stop=60), 0.05),
        (_mlp, DNSConfig(c=0.5, layer_c={"3.weight": 1.5}, reestimate=True, gamma=0.0, iter_stop=60), 0.05),
        (_mlp, DNSConfig(target_sparsity=0.9, criterion="taylor", gamma=1e-2, iter_stop=40), 0.05),
        (_mlp, DNSConfig(target_sparsity=0.7, nm="2:4", reestimate=True, gamma=1e-2, iter_stop=40), 0.05),
        (_mlp, DNSConfig(target_sparsity=0.95, prune_bias=True, reestimate=True, gamma=0.0, iter_stop=60), 0.05),
        (_small_lenet5, DNSConfig(target_sparsity=0.9, layer_sparsity={"0.weight": 0.5}, reestimate=True, gamma=1e-2, iter_stop=50), 0.05),
        (_mlp_float64, DNSConfig(layer_sparsity={"2.weight": 0.975, "4.weight": 0.97, "6.weight": 0.92}, reestimate=True, gamma=1e-2, iter_stop=40), 0.05),
    ],
    ids=["table", "high-lr", "c-once", "layer-c", "taylor", "nm", "bias", "conv", "float64-torch"],
)
def test_update_masks_match_reference_bitwise(make_model, config, lr):
    steps = config.iter_stop + 30
    for step, (dns, ref, model, twin) in enumerate(_twin_runs(make_model, config, steps, lr=lr)):
        _assert_twins_equal(dns, ref, model, twin, step)
    assert 0.3 < dns.sparsity() < 1.0
    for name, shadow in dns.shadows().items():
        assert torch.equal(shadow, ref.dense(name)), name


@pytest.mark.parametrize("start", [0.5, 0.85, 0.95])
def test_dns_from_an_imported_sparse_start_reaches_the_target(start):
    """An imported pruned checkpoint: cut weights are exact zeros, their dense values lost.
    A calibration estimated once used to land among those zeros (85% -> 55.6% in issue 10)."""
    from dnsconvert.surgery import prunable_parameters

    torch.manual_seed(0)
    model = _mlp()
    params = prunable_parameters(model)
    masks = magnitude_masks({n: p.detach() for n, p in params.items()}, start)
    with torch.no_grad():
        for name, param in params.items():
            param.mul_(masks[name])
    dns = DynamicNetworkSurgery(model, DNSConfig(target_sparsity=0.85, gamma=1e-2, iter_stop=200), initial_masks=masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    teacher = nn.Linear(784, 10)
    generator = torch.Generator().manual_seed(1)
    for _ in range(220):
        x = torch.randn(32, 1, 28, 28, generator=generator)
        loss = nn.functional.cross_entropy(model(x), teacher(x.flatten(1)).argmax(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        dns.step()
    for name, sparsity in dns.layer_sparsity().items():
        assert 0.84 <= sparsity <= 0.93, (name, sparsity)


@pytest.mark.parametrize("bound", ["zero", "quantile", "above"])
def test_compiled_update_exact_whatever_the_candidate_bound(monkeypatch, bound):
    """The bound only decides how many weights the compiled update looks at, and when it must
    flag again or fall back to the torch update. Bounds of a calibrated layer: 0 (every weight
    a candidate), the last quantile itself (often too few candidates: flagged again, lower),
    1.3× it with no second flagging (above the quantile and above b: the torch update), and,
    for the layers' first bound, 0.9·a. The mlp's second layer keeps fewer than 64 weights,
    which takes kth_largest's short path. Masks stay bitwise those of the reference."""
    import numpy as np

    import dnsconvert.surgery.dns as dns_module

    factor = {"zero": 0.0, "quantile": 1.0, "above": 1.3}[bound]
    monkeypatch.setattr(DynamicNetworkSurgery, "_next_bound", lambda self, name, quantile, n, to_keep: np.float32(factor * quantile))
    if bound == "above":
        monkeypatch.setattr(dns_module, "_LOWERINGS", 0)
    outcomes, flagged_again = [], []
    original = DynamicNetworkSurgery._update_calibrated  # the one-call update, from either step
    monkeypatch.setattr(DynamicNetworkSurgery, "_update_calibrated", lambda self, *args: outcomes.append(original(self, *args)) or outcomes[-1])
    real_flag = dns_module._kernels().flag_
    monkeypatch.setattr(dns_module._kernels(), "flag_", lambda *args: flagged_again.append(1) or real_flag(*args))
    config = DNSConfig(layer_sparsity=TABLE, reestimate=True, gamma=1e-2, iter_stop=50, seed=2)
    for step, (dns, ref, model, twin) in enumerate(_twin_runs(_mlp, config, 60)):
        _assert_twins_equal(dns, ref, model, twin, step)
    if bound != "above":
        assert outcomes.count(True) > len(dns.params)  # the compiled update ran
    if bound == "quantile":
        assert flagged_again  # and flagged again where the quantile had fallen
    if bound == "above":
        assert outcomes.count(False) > len(dns.params)  # fell back beyond the first updates


# -- the compiled pieces that reproduce torch ----------------------------------------------------
def test_block_draws_are_torchs_draws_and_a_mismatch_falls_back_to_torch(monkeypatch):
    """The update draws come from blocks made by ``_kernels.mt19937_uniform``; they must be
    exactly ``torch.rand`` after ``manual_seed(seed·1000003 + iteration)``, across blocks, after
    the iteration jumps (a resume), and for seeds past 32 bits; a block that differs from torch
    switches the sparsifier to torch's draws for good."""
    import numpy as np

    import dnsconvert.surgery.dns as dns_module

    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)])
    for seed, iterations in ((0, range(0, 1100)), (7, range(5000, 5040)), (2**40 + 3, range(3))):
        dns = DynamicNetworkSurgery(model, DNSConfig(target_sparsity=0.5, seed=seed))
        for iteration in iterations:
            dns.iteration = iteration
            expected = torch.rand(5, generator=torch.Generator().manual_seed(seed * 1_000_003 + iteration)).tolist()
            assert dns._draws() == expected, (seed, iteration)
        assert dns._block_draws
    dns.config = replace(dns.config, seed=9)  # a new seed inside the block drawn: drawn afresh
    assert dns._draws() == torch.rand(5, generator=torch.Generator().manual_seed(9 * 1_000_003 + dns.iteration)).tolist()
    dns.iteration = 0  # a block drawn wrongly (simulated) is caught by its torch check
    real = dns_module._kernels().mt19937_uniform

    def wrong(seeds, out):
        real(seeds, out)
        out += np.float32(2**-24)

    dns = DynamicNetworkSurgery(model, DNSConfig(target_sparsity=0.5, seed=3))
    monkeypatch.setattr(dns_module._kernels(), "mt19937_uniform", wrong)
    for iteration in (0, 1, 600):
        dns.iteration = iteration
        assert dns._draws() == torch.rand(5, generator=torch.Generator().manual_seed(3 * 1_000_003 + iteration)).tolist()
    assert not dns._block_draws


def test_compiled_mean_and_std_are_torchs_bit_for_bit():
    """``torch_mean_f32``/``torch_std_f32`` stand in for ``values.mean()``/``values.std()`` in
    the one-call update; the thresholds depend on their last bits."""
    import numpy as np

    from dnsconvert.surgery.dns import _TORCH_GRAIN, _kernels, exact_stats_lanes

    kernels = _kernels()
    lanes = exact_stats_lanes()
    if lanes is None:  # correct still (the update computes them through torch), only slower
        pytest.skip("the compiled mean/std do not reproduce this torch build's reductions; the update uses torch's")
    rng = np.random.default_rng(11)
    sizes = [*range(16, 300), *rng.integers(300, _TORCH_GRAIN, 150).tolist(), _TORCH_GRAIN - 1]
    for n in sizes:
        x = (np.abs(rng.standard_normal(n)) * rng.uniform(1e-5, 3.0)).astype(np.float32)
        mean = kernels.torch_mean_f32(x, n, lanes)
        assert mean == np.float32(torch.from_numpy(x).mean().item()), n
        assert kernels.torch_std_f32(x, n, mean) == np.float32(torch.from_numpy(x).std().item()), n


def test_the_table_configuration_runs_the_one_call_update(monkeypatch):
    """The MNIST table's configuration (per-layer targets, re-estimated) must take the one-call
    compiled update, and still match the frozen reference bit for bit."""
    import dnsconvert.surgery.dns as dns_module

    real = dns_module._kernels().calibrated_update
    results = []

    def _call(*args):
        out = real(*args)
        results.append(out[0] == dns_module._kernels().APPLIED)
        return out

    monkeypatch.setattr(dns_module._kernels(), "calibrated_update", _call)
    config = DNSConfig(layer_sparsity=TABLE, reestimate=True, gamma=2e-2, iter_stop=40, seed=5)
    for step, (dns, ref, model, twin) in enumerate(_twin_runs(_lenet300100, config, 50)):
        _assert_twins_equal(dns, ref, model, twin, step)
    assert results.count(True) > 20


def test_fold_flag_reports_a_nan_anywhere_and_flags_what_reaches_the_bound():
    """``fold_flag_`` finds NaNs with a vectorised running max (the update then runs in torch,
    whose comparisons treat NaN its own way): a NaN at the start, middle or tail of any length
    is reported, an infinity is not, and the flags are exactly the cut entries with |W| >= bound."""
    import numpy as np

    from dnsconvert.surgery.dns import _kernels

    kernels = _kernels()
    rng = np.random.default_rng(3)
    for n in (1, 7, 8, 9, 31, 64, 1000, 1003):
        for position in sorted({0, n // 2, n - 1}):
            for planted, expected in ((None, False), (np.nan, True), (np.inf, False), (-np.inf, False)):
                mask = rng.random(n) < 0.3
                shadow = rng.standard_normal(n).astype(np.float32)
                p = np.where(mask, rng.standard_normal(n), 0).astype(np.float32)
                if planted is not None:
                    p[position] = planted
                folded = np.where(mask, p, p + shadow)  # W = p + S·(1−T)
                flags = np.zeros(-(-n // 8) * 8, dtype=np.uint8)
                assert kernels.fold_flag_(p, shadow, mask, np.float32(0.8), flags) == expected, (n, position, planted)
                np.testing.assert_array_equal(shadow, folded)
                np.testing.assert_array_equal(flags[:n], (np.abs(folded) >= np.float32(0.8)) & ~mask)


def test_a_subclass_update_still_runs_under_no_grad():
    """The step skips torch.no_grad() where DNS's compiled update needs none; a subclass written
    for the step that always entered it still gets it (in-place ops on parameters would raise)."""

    class HalveKept(MaskedSparsifier):
        def update_masks(self):
            for param in self.params.values():
                param.mul_(0.5)

    model = nn.Sequential(nn.Linear(4, 3))
    sparsifier = HalveKept(model, initial_masks={"0.weight": torch.ones(3, 4, dtype=torch.bool)})
    before = model[0].weight.detach().clone()
    loss = model(torch.randn(2, 4)).sum()
    loss.backward()
    sparsifier.step()
    assert torch.equal(model[0].weight.detach(), before * 0.5)


def test_the_table_configuration_takes_the_lean_step_and_leaves_it_when_it_must():
    """DNS's lean step (fold and update per layer, for per-layer targets re-estimated at every
    update) must match the frozen reference bit for bit, also when a parameter's storage moves
    mid-run (it hands that step to the general loop and rebuilds); configurations it does not
    cover, and a subclass that overrides the update, take the general step."""
    config = DNSConfig(layer_sparsity=TABLE, reestimate=True, gamma=2e-2, iter_stop=40, seed=5)
    lean_steps = 0
    for step, (dns, ref, model, twin) in enumerate(_twin_runs(_lenet300100, config, 50)):
        _assert_twins_equal(dns, ref, model, twin, step)
        lean_steps += dns._one_call_layers() is not None
        if step == 20:  # new storage for every parameter of both models (load_state_dict(assign=True) does this)
            with torch.no_grad():
                for m in (model, twin):
                    for param in m.parameters():
                        param.data = param.data.clone()
    assert lean_steps == 50
    assert dns._one_call is not None and all(flat.data_ptr == param.data_ptr() for param, flat in dns._one_call)  # rebuilt

    def lean(model, config, cls=DynamicNetworkSurgery):
        return cls(model, config)._one_call_layers() is not None

    assert not lean(_mlp(), DNSConfig(c=1.5))  # statistics estimated once: the general update
    assert not lean(_mlp(), DNSConfig(target_sparsity=0.9, criterion="taylor"))
    assert not lean(_mlp(), DNSConfig(target_sparsity=0.7, nm="2:4", reestimate=True))
    assert not lean(_mlp_float64(), DNSConfig(target_sparsity=0.9, reestimate=True))
    assert lean(_mlp(), DNSConfig(target_sparsity=0.9, reestimate=True))

    class Logged(DynamicNetworkSurgery):
        def update_masks(self):
            super().update_masks()

    class LoggedUpdate(DynamicNetworkSurgery):
        def _update_compiled(self, name):
            return super()._update_compiled(name)

    assert not lean(_mlp(), DNSConfig(target_sparsity=0.9, reestimate=True), Logged)
    assert not lean(_mlp(), DNSConfig(target_sparsity=0.9, reestimate=True), LoggedUpdate)


@pytest.mark.parametrize("change", ["target-zero", "regrow-off", "reestimate-off", "target-none"])
def test_the_lean_step_follows_settings_changed_mid_run(change):
    """A run whose settings change under it (a layer's target set to 0 or removed, ``regrow`` or
    ``reestimate`` switched off) must go on exactly as the general step would: the same masks,
    weights and counts as a twin whose every step is the general one."""
    config = DNSConfig(layer_sparsity=dict(TABLE), reestimate=True, gamma=1e-2, iter_stop=60, seed=4)
    torch.manual_seed(0)
    models = [_mlp(), _mlp()]
    models[1].load_state_dict(models[0].state_dict())
    runs = [DynamicNetworkSurgery(m, DNSConfig(**config.to_json())) for m in models]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    generator = torch.Generator().manual_seed(1)
    teacher = nn.Linear(784, 10)
    for step in range(40):
        if step == 10:
            for dns in runs:
                if change == "target-zero":
                    dns.config.layer_sparsity["3.weight"] = 0.0
                elif change == "target-none":
                    del dns.config.layer_sparsity["3.weight"]
                elif change == "regrow-off":
                    dns.regrow = False
                else:
                    dns.reestimate = False
        x = torch.randn(32, 1, 28, 28, generator=generator)
        y = teacher(x.flatten(1)).argmax(1)
        runs[1]._one_call = []  # the twin: the general step every time
        for model, opt, dns in zip(models, optimizers, runs):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            dns.step()
        lean, general = runs
        assert step >= 10 or lean._one_call_layers() is not None, "the lean step runs before the change"
        for name in lean.params:
            assert torch.equal(lean.masks()[name], general.masks()[name]), (change, step, name)
        for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
            assert torch.equal(a, b), (change, step)
        assert (lean.cuts, lean.splices) == (general.cuts, general.splices)
        assert lean.stats == general.stats and _same(lean._bound, general._bound) and _same(lean._bound_margin, general._bound_margin), (change, step)


def _same(a: dict, b: dict) -> bool:
    """Dicts of numbers equal key for key, NaN equal to NaN (a bound is NaN where a layer's target went to 0)."""
    import numpy as np

    return a.keys() == b.keys() and all(np.array_equal(np.float64(a[k]), np.float64(b[k]), equal_nan=True) for k in a)


@pytest.mark.parametrize("loaded", [False, True])
def test_the_progress_bar_says_when_the_compiled_kernels_load(monkeypatch, loaded):
    """The first steps of a sparse phase load numba's compiled passes (compiled on the first run
    after an install, ~10 s): the bar says so then, instead of standing still without a word."""
    import rich.progress

    from dnsconvert.data import synthetic_digits
    from dnsconvert.models import builtin_spec
    from dnsconvert.surgery import DNSConfig, PruneConfig, prune, sparsifier
    from dnsconvert.surgery.train import LOADING_KERNELS

    sparsifier._kernels()  # loaded in any case, so that "not loaded" below is only what the trainer sees
    if not loaded:
        monkeypatch.setattr(sparsifier, "_KERNELS", None)
    seen = []
    update = rich.progress.Progress.update

    def recording(self, task_id, **fields):
        seen.append(fields.get("description"))
        return update(self, task_id, **fields)

    monkeypatch.setattr(rich.progress.Progress, "update", recording)
    config = PruneConfig(builtin_spec("lenet300100"), dns=DNSConfig(target_sparsity=0.9, gamma=1e-3), dense_epochs=0.02, epochs=0.02, checkpoint_every=0)
    prune(config, data=synthetic_digits(640, 64, seed=0), progress=True)
    assert (f"dns: {LOADING_KERNELS}" in seen) is not loaded
    assert "dns" in seen and not any(d and "dense" in d and "loading" in d for d in seen)  # dense steps need no kernels
