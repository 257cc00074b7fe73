import pytest
import torch
from torch import nn

from dnsconvert.pattern import NMPattern, complies
from dnsconvert.surgery import (
    DNSConfig,
    DynamicNetworkSurgery,
    FixedMaskSparsifier,
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
