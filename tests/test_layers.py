"""The layer-kind registry: kinds and axes from module types, selection, tied weights, plugins,
the N:M machinery along any axis, and what checkpoints record (in-test nn.Module models)."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import textwrap

import pytest
import torch
from torch import nn

from dnsconvert import layers as layers_mod
from dnsconvert.checkpoint import SparseCheckpoint
from dnsconvert.errors import CheckpointError, UserError
from dnsconvert.layers import (
    LayerInfo,
    LayerKind,
    LayerPattern,
    checkpoint_layers,
    describe_model,
    guess_from_shape,
    layer_kind_errors,
    layer_kinds,
    register_layer_kind,
    select_layers,
    unregister_layer_kind,
)
from dnsconvert.loading import from_state_dict, load_checkpoint
from dnsconvert.pattern import NMPattern, cannot_hold, complies, from_groups, nm_mask, to_groups, violating_groups
from dnsconvert.project import project_nm
from dnsconvert.surgery import DNSConfig, DynamicNetworkSurgery, MaskedSparsifier, prunable_layers, prunable_parameters
from dnsconvert.validate import validate

TWO_FOUR = NMPattern(2, 4)


class InOutLinear(nn.Module):
    """A layer no registry knows: weight stored [in, out] and used as x @ W (like HF's Conv1D)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x):
        return x @ self.weight


class Zoo(nn.Module):
    """Every kind in one model: conv1d/2d/3d, a grouped and a depthwise conv, norms, a tied
    embedding + head, a bare parameter and a layer of unknown type."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.conv1 = nn.Conv1d(8, 8, 3)
        self.conv2 = nn.Conv2d(8, 16, 3, groups=2)
        self.depthwise = nn.Conv2d(16, 16, 3, groups=16)
        self.conv3 = nn.Conv3d(4, 8, 1)
        self.norm = nn.LayerNorm(8)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(8, 12)
        self.custom = InOutLinear(12, 8)
        self.scale = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, ids):
        x = self.norm(self.embed(ids)).mean(1)
        return self.head(self.custom(self.fc(x)) * self.scale)


def test_kinds_and_axes_come_from_module_types():
    infos = describe_model(Zoo())
    assert infos["fc.weight"] == LayerInfo("linear", 1, "module", True, module="torch.nn.modules.linear.Linear")
    assert infos["fc.bias"].kind == "bias" and infos["fc.bias"].axis is None
    assert (infos["conv1.weight"].kind, infos["conv1.weight"].axis) == ("conv", 1)
    assert (infos["conv3.weight"].kind, infos["conv3.weight"].axis) == ("conv", 1)
    assert infos["conv2.weight"].groups == 2 and infos["depthwise.weight"].groups == 16
    assert infos["embed.weight"].tied == ("embed.weight", "head.weight")
    assert infos["head.weight"] is infos["embed.weight"]  # one tensor, one info, every name
    assert infos["embed.weight"].kind == "linear" and infos["embed.weight"].axis == 1  # the head's Linear decides
    assert infos["norm.weight"].kind == "norm" and not infos["norm.weight"].prunable
    assert infos["bn.weight"].kind == "norm" and infos["bn.running_mean"].kind == "buffer"
    assert infos["custom.weight"].kind == "other" and infos["custom.weight"].axis is None
    assert infos["scale"].kind == "other" and not infos["scale"].prunable


def test_default_selection_leaves_out_embeddings_norms_unknown_and_tied():
    model = Zoo()
    chosen = prunable_parameters(model)
    assert set(chosen) == {"conv1.weight", "conv2.weight", "depthwise.weight", "conv3.weight", "fc.weight"}
    assert chosen["fc.weight"] is model.fc.weight
    with_bias = prunable_parameters(model, prune_bias=True)
    assert set(with_bias) - set(chosen) == {"conv1.bias", "conv2.bias", "depthwise.bias", "conv3.bias", "fc.bias"}
    assert {n: i.axis for n, i in prunable_layers(model).items()} == dict.fromkeys(chosen, 1)
    tied = prunable_parameters(model, prune_tied=True)
    assert set(tied) - set(chosen) == {"embed.weight"}  # once, under its first name


def test_tied_tensor_named_is_refused_with_all_its_names():
    with pytest.raises(UserError, match=r"'head.weight' is one tensor shared by embed.weight, head.weight"):
        prunable_parameters(Zoo(), names=["head.weight"])
    with pytest.raises(UserError, match="tied"):
        prunable_parameters(Zoo(), layers=["*.weight"])
    assert set(prunable_parameters(Zoo(), names=["head.weight"], prune_tied=True)) == {"embed.weight"}


def test_user_selection_names_any_parameter_and_gives_unknown_axes():
    model = Zoo()
    infos = describe_model(model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    chosen = select_layers(infos, layers=["custom.weight@0", "norm.weight"], shapes=shapes)
    assert chosen["custom.weight"] == LayerInfo("other", 0, "user", True, module=infos["custom.weight"].module)
    assert chosen["norm.weight"].kind == "norm" and chosen["norm.weight"].axis is None  # named, so pruned; no N:M axis
    with pytest.raises(UserError, match="matches no parameter"):
        select_layers(infos, layers=["nothing.*"])
    with pytest.raises(UserError, match="reduces along axis 1"):  # the module's type decides, not the user
        select_layers(infos, layers=["fc.weight@0"], shapes=shapes)
    with pytest.raises(UserError, match="axis 2 does not exist"):
        select_layers(infos, layers=["custom.weight@2"], shapes=shapes)
    with pytest.raises(UserError, match="no parameter named"):
        select_layers(infos, names=["fc.weights"])
    assert LayerPattern.parse("a.*.b@-1") == LayerPattern("a.*.b", -1)
    assert LayerPattern("encoder.*.dense.weight").matches("encoder.layer.0.output.dense.weight")  # * crosses dots


def test_registered_kind_makes_a_module_type_prunable_and_takes_precedence():
    register_layer_kind(LayerKind("in-out-linear", (InOutLinear,), {"weight": 0}))
    try:
        info = describe_model(Zoo())["custom.weight"]
        assert (info.kind, info.axis, info.source, info.prunable) == ("in-out-linear", 0, "module", True)
        assert "custom.weight" in prunable_parameters(Zoo())
        register_layer_kind(LayerKind("linear-as-other", (nn.Linear,), {}, prunable=False))
        assert describe_model(Zoo())["fc.weight"].kind == "linear-as-other"
    finally:
        unregister_layer_kind("in-out-linear")
        unregister_layer_kind("linear-as-other")
    assert describe_model(Zoo())["custom.weight"].kind == "other"


def test_entry_point_plugins_extend_the_registry_and_a_broken_one_never_breaks_it(tmp_path, monkeypatch):
    qualname = f"{InOutLinear.__module__}.{InOutLinear.__qualname__}"
    (tmp_path / "fake_layer_plugin.py").write_text(textwrap.dedent(f'''
        from dnsconvert.layers import LayerKind

        def kinds():
            return [LayerKind("in-out-linear", ("{qualname}",), {{"weight": 0}})]
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    group = layers_mod.ENTRY_POINT_GROUP
    plugins = [
        importlib.metadata.EntryPoint("fake", "fake_layer_plugin:kinds", group),
        importlib.metadata.EntryPoint("broken", "no_such_module_xyz:kinds", group),
    ]
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: plugins if kw.get("group") == group else real(**kw))
    monkeypatch.setattr(layers_mod, "_plugin_cache", None)
    assert "in-out-linear" in [k.name for k in layer_kinds()]
    assert describe_model(Zoo())["custom.weight"].axis == 0
    errors = layer_kind_errors()
    assert len(errors) == 1 and errors[0].startswith("broken") and "ModuleNotFoundError" in errors[0]
    monkeypatch.setattr(layers_mod, "_plugin_cache", None)


def test_nm_machinery_runs_along_any_axis():
    w = torch.randn(8, 12, 3)
    for axis in (0, 1, 2, -1):
        m = 4
        if w.shape[axis] % m:
            assert "not a multiple" in cannot_hold(tuple(w.shape), TWO_FOUR, axis)
            continue
        groups = to_groups(w, m, axis)
        assert torch.equal(from_groups(groups, w.shape, axis), w)
        mask = nm_mask(w.abs(), TWO_FOUR, axis=axis)
        assert complies(mask, TWO_FOUR, axis) and mask.sum() == w.numel() // 2
        # each group of 4 consecutive entries along `axis` keeps exactly 2
        assert bool((mask.movedim(axis, -1).reshape(-1, 4).sum(-1) == 2).all())
    mask0 = nm_mask(torch.randn(8, 12).abs(), TWO_FOUR, axis=0)
    assert complies(mask0, TWO_FOUR, 0) and not complies(mask0, TWO_FOUR, 1)
    assert violating_groups(mask0, TWO_FOUR, 1) > 0
    info = LayerInfo("hf-conv1d", 0, "module", True)
    assert complies(mask0, TWO_FOUR, info)  # a layer-info object carries its axis
    assert "no reduction axis" in cannot_hold((8, 12), TWO_FOUR, LayerInfo("embedding", None, "module"))
    assert "grouped conv (groups=16)" in cannot_hold((16, 1, 3, 3), TWO_FOUR, describe_model(Zoo())["depthwise.weight"])


def test_dns_prunes_along_each_layers_axis_and_leaves_tied_alone():
    torch.manual_seed(0)
    register_layer_kind(LayerKind("in-out-linear", (InOutLinear,), {"weight": 0}))
    try:
        model = Zoo()
        embed_before = model.embed.weight.detach().clone()
        dns = DynamicNetworkSurgery(model, DNSConfig(target_sparsity=0.5, nm="2:4", gamma=0.0))
        ids = torch.randint(0, 16, (4, 5))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(3):
            loss = model(ids).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            dns.step()
        assert "embed.weight" not in dns.masks() and "head.weight" not in dns.masks()
        assert dns.layer_info["custom.weight"].axis == 0
        assert complies(dns.masks()["custom.weight"], TWO_FOUR, 0)
        assert complies(dns.masks()["fc.weight"], TWO_FOUR, 1)
        # the tied table trained (it is a parameter) but was never masked
        assert not torch.equal(model.embed.weight, embed_before) and bool((model.embed.weight != 0).all())
    finally:
        unregister_layer_kind("in-out-linear")


def test_dns_with_prune_tied_masks_the_shared_tensor_once():
    model = Zoo()
    dns = DynamicNetworkSurgery(model, DNSConfig(target_sparsity=0.5), prune_tied=True)
    assert "embed.weight" in dns.params and "head.weight" not in dns.params
    assert dns.config.prune_tied  # recorded for resume
    model(torch.randint(0, 16, (2, 3))).sum().backward()
    dns.step()
    assert model.head.weight is model.embed.weight
    with pytest.raises(UserError, match="tied"):
        MaskedSparsifier(Zoo(), ["head.weight"])


def test_checkpoint_records_layer_info_and_old_files_read_as_unknown(tmp_path):
    model = Zoo()
    dns = DynamicNetworkSurgery(model, DNSConfig(target_sparsity=0.5))
    ckpt = SparseCheckpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, dns.masks(), layers=dns.layer_info)
    ckpt.save(tmp_path / "z.safetensors")
    loaded = load_checkpoint(tmp_path / "z.safetensors")
    assert loaded.layers == dns.layer_info
    assert checkpoint_layers(loaded)["fc.weight"].source == "module"
    # an older file without "layers" reads as unknown: kinds fall back to a labelled shape guess
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "z.safetensors"), framework="pt") as handle:
        meta = json.loads(handle.metadata()["dnsconvert"])
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    del meta["layers"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"dnsconvert": json.dumps(meta)})
    old = load_checkpoint(tmp_path / "old.safetensors")
    assert old.layers == {} and checkpoint_layers(old)["fc.weight"] == guess_from_shape((12, 8))
    meta["layers"] = {"fc.weight": {"kind": "linear", "axis": "one", "source": "module"}}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"dnsconvert": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="axis"):
        load_checkpoint(tmp_path / "bad.safetensors")
    meta["layers"] = {"fc.weight": {"kind": "linear", "axis": 5, "source": "module"}}
    save_file(tensors, str(tmp_path / "bad2.safetensors"), metadata={"dnsconvert": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="reduction axis 5"):
        load_checkpoint(tmp_path / "bad2.safetensors")


def test_bare_state_dict_kinds_are_guessed_labelled_and_refused_for_projection():
    torch.manual_seed(0)
    model = Zoo()
    ckpt = from_state_dict(model.state_dict())
    assert {ckpt.layers[n].source for n in ckpt.masks} == {"shape"}
    assert "embed.weight" in ckpt.masks  # a 2-D table looks like a Linear to a shape guess...
    report = validate(ckpt)
    assert set(report.guessed_layers) == set(ckpt.masks)
    with pytest.raises(UserError, match="guessed from their shape"):  # ...so nothing is projected on a guess
        project_nm(ckpt, "2:4")
    result = project_nm(ckpt, "2:4", layers=["fc.weight", "custom.weight@0"])
    masks = result.checkpoint.masks
    assert complies(masks["custom.weight"], TWO_FOUR, 0) and complies(masks["fc.weight"], TWO_FOUR, 1)
    assert torch.equal(result.checkpoint.weights["embed.weight"], model.embed.weight.detach())
    assert result.checkpoint.layers["custom.weight"].source == "user"
    assert {layer.skipped_reason for layer in result.layers if layer.name == "embed.weight"} == {"not selected by --layers"}


def test_projection_with_the_model_skips_embeddings_and_refuses_pruned_tied_tensors():
    model = Zoo()
    infos = describe_model(model)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks = {"fc.weight": torch.ones(12, 8, dtype=torch.bool), "embed.weight": torch.ones(16, 8, dtype=torch.bool)}
    ckpt = SparseCheckpoint(weights, masks, layers={n: infos[n] for n in masks})
    result = project_nm(ckpt, "2:4")  # an unpruned tied tensor is left alone, and said so
    skipped = {layer.name: layer.skipped_reason for layer in result.layers if layer.skipped_reason}
    assert "tied" in skipped["embed.weight"]
    assert torch.equal(result.checkpoint.weights["embed.weight"], weights["embed.weight"])
    masks["embed.weight"] = torch.rand(16, 8) > 0.5
    pruned = SparseCheckpoint({**weights, "embed.weight": weights["embed.weight"] * masks["embed.weight"]}, masks, layers={n: infos[n] for n in masks})
    with pytest.raises(UserError, match="tied weights"):
        project_nm(pruned, "2:4")
    # the copy under the other name still holds the dense table: a tool pruned one name alone
    assert "tied" in {v.rule for v in validate(pruned).violations}
    result = project_nm(pruned, "2:4", prune_tied=True)
    out = result.checkpoint
    assert complies(out.masks["embed.weight"], TWO_FOUR, 1) and "head.weight" not in out.masks
    assert torch.equal(out.weights["head.weight"], out.weights["embed.weight"])  # once, for all owners
    assert validate(out, require_nm="2:4").passed


def test_dead_layer_fails_validate_unless_allowed(run_cli, tmp_path):
    w = torch.randn(4, 8)
    ckpt = SparseCheckpoint({"fc.weight": w * 0, "fc2.weight": w}, {"fc.weight": torch.zeros(4, 8, dtype=torch.bool), "fc2.weight": torch.ones(4, 8, dtype=torch.bool)})
    report = validate(ckpt)
    assert [(v.rule, v.layer) for v in report.violations] == [("dead-layer", "fc.weight")]
    assert validate(ckpt, allow_dead_layers=True).passed
    ckpt.save(tmp_path / "dead.safetensors")
    result = run_cli("validate", tmp_path / "dead.safetensors")
    assert result.exit_code == 1 and "dead-layer" in result.stdout
    assert run_cli("validate", tmp_path / "dead.safetensors", "--allow-dead-layers").exit_code == 0


def test_validate_checks_nm_along_the_recorded_axis():
    torch.manual_seed(0)
    w = torch.randn(8, 12)
    along_0 = nm_mask(w.abs(), TWO_FOUR, axis=0)
    as_in_out = LayerInfo("hf-conv1d", 0, "module", True)
    ok = SparseCheckpoint({"c.weight": w * along_0}, {"c.weight": along_0}, layers={"c.weight": as_in_out})
    assert validate(ok, require_nm="2:4").passed
    along_1 = nm_mask(w.abs(), TWO_FOUR, axis=1)
    wrong = SparseCheckpoint({"c.weight": w * along_1}, {"c.weight": along_1}, layers={"c.weight": as_in_out})
    report = validate(wrong, require_nm="2:4")
    assert {v.rule for v in report.violations} == {"nm"} and not report.layers[0].eligible_2_4


def test_cli_project_layers_and_inspect_show_kind_axis_source(run_cli, tmp_path):
    torch.manual_seed(0)
    torch.save(Zoo().state_dict(), tmp_path / "zoo.pt")
    out = tmp_path / "p.safetensors"
    result = run_cli("project", tmp_path / "zoo.pt", "--layers", "fc.weight", "--layers", "custom.weight@0", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    result = run_cli("validate", out, "--require-nm", "2:4", "--json", "--allow-dead-layers")
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    assert (layers["custom.weight"]["axis"], layers["custom.weight"]["source"], layers["custom.weight"]["nm_compliant"]) == (0, "user", True)
    assert layers["embed.weight"]["source"] == "shape"
    result = run_cli("inspect", out)
    assert result.exit_code == 0 and "known from" in result.stdout and "shape (guess)" in result.stdout
    bad = run_cli("project", tmp_path / "zoo.pt", "--layers", "nope.*", "-o", tmp_path / "x.safetensors")
    assert bad.exit_code == 2 and "matches no parameter" in bad.stderr


def test_cli_prune_layers_option(run_cli, tmp_path):
    out = tmp_path / "p.safetensors"
    result = run_cli(
        "prune", "--model", "mlp", "--model-kwargs", '{"hidden": [16, 16]}', "--data", "synthetic", "--epochs", "0.01", "--batch-size", "32",
        "--layers", "1.weight", "--layers", "5.*", "--no-progress", "--json", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out)
    assert set(ckpt.masks) == {"1.weight", "5.weight", "5.bias"}
    assert ckpt.layers["5.bias"].kind == "bias"
    assert ckpt.layers["1.weight"] == LayerInfo("linear", 1, "module", True, module="torch.nn.modules.linear.Linear")
    assert json.loads(result.stdout)["kind"] == "prune-result"


@pytest.mark.parametrize("module", [nn.Conv1d(4, 8, 3), nn.Conv2d(4, 8, 3), nn.Conv3d(4, 8, 1), nn.Conv2d(8, 8, 3, groups=2)])
def test_conv_nm_groups_run_over_input_channels_per_kernel_position(module):
    info = describe_model(module)["weight"]
    w = module.weight.detach()
    mask = nm_mask(w.abs(), TWO_FOUR, axis=info)
    assert complies(mask, TWO_FOUR, 1)
    # every output channel and kernel position keeps exactly half of its input channels
    assert bool((mask.sum(dim=1) == w.shape[1] // 2).all())
    x = torch.randn(2, module.in_channels, *([5] * (w.dim() - 2)))
    assert module(x).shape[1] == module.out_channels  # the module is what we described


def test_guess_from_shape_is_labelled():
    assert guess_from_shape((4, 8)) == LayerInfo("linear", 1, "shape")
    assert guess_from_shape((4, 8, 3, 3)).kind == "conv" and not guess_from_shape((4, 8)).prunable
    assert guess_from_shape((4,)).axis is None and not guess_from_shape((4, 8)).known


def test_registry_recognises_transformers_conv1d_without_importing_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # any `import transformers` now raises
    assert "hf-conv1d" in [k.name for k in layer_kinds()]
    assert describe_model(Zoo())["fc.weight"].kind == "linear"
