"""Real architectures (BERT, GPT-2, ResNet, MobileNetV2, ViT from transformers configs, random
weights, offline): the registry finds the right layers and axes; DNS through the API; validate;
2:4 projection proven along each module's true reduction axis, on the weights and on an ONNX
graph exported from them; embeddings and tied weights untouched unless opted in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
import transformers  # noqa: F401  a test dependency (the [test] extra): a missing one fails, never skips

import real_models  # tests/ is on sys.path
from dnsconvert.checkpoint import SparseCheckpoint
from dnsconvert.layers import describe_model
from dnsconvert.loading import from_state_dict, load_checkpoint
from dnsconvert.modelspec import ModelSpec
from dnsconvert.pattern import TWO_FOUR, complies, nm_mask
from dnsconvert.project import project_nm
from dnsconvert.surgery import DNSConfig, DynamicNetworkSurgery, prunable_parameters
from dnsconvert.validate import validate
from dnsconvert.errors import UserError

FACTORY = {
    "bert": "real_models:bert_mlm",
    "gpt2": "real_models:gpt2_lm",
    "resnet": "real_models:resnet",
    "mobilenet": "real_models:mobilenet",
    "vit": "real_models:vit",
}
TIED = {
    "bert": {"bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"},
    "gpt2": {"transformer.wte.weight", "lm_head.weight"},
}


def expected_layers(model: nn.Module) -> dict[str, int]:
    """The oracle, written apart from the registry: weight name -> true reduction axis of every
    Linear / Conv / transformers Conv1D, leaving out tensors shared by several modules."""
    from transformers.pytorch_utils import Conv1D

    count: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        count[id(param)] = count.get(id(param), 0) + 1
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)) and count[id(module.weight)] == 1:
            # Linear [out, in] and Conv [out, in/groups, *k] reduce along 1; Conv1D [in, out] along 0
            found[f"{name}.weight"] = 0 if isinstance(module, Conv1D) else 1
    return found


def export_graph_check(name: str, model: nn.Module, projected: dict[str, torch.Tensor]) -> dict[str, bool]:
    """Export with torch.onnx (dynamo) and check every graph weight that holds a projected layer
    along its consumer's reduction axis (Conv W axis 1, Gemm B per transB, MatMul B [K, N] axis 0)."""
    from dnsconvert.export.graph_nm import check_graph_nm
    from dnsconvert.export.sparse_init import initializer_arrays

    wrapped = real_models.Logits(name, model).eval()
    program = torch.onnx.export(wrapped, (real_models.example_inputs(name, 1),), dynamo=True, verbose=False)
    proto = program.model_proto
    arrays = initializer_arrays(proto)
    compliant: dict[str, bool] = {}
    for result in check_graph_nm(proto, TWO_FOUR, arrays=arrays):
        array = torch.from_numpy(np.array(arrays[result.initializer]))
        for layer, weight in projected.items():
            # The exporter keeps a weight under its name (a Conv's scaled by the BatchNorm folded
            # into it: same zeros), or stores a Linear weight transposed (MatMul B = W^T) under a new one.
            if result.initializer == f"model.{layer}" or (
                (array.shape == weight.shape and torch.equal(array, weight))
                or (array.dim() == 2 and array.T.shape == weight.shape and torch.equal(array.T, weight))
            ):
                compliant[layer] = bool(result.compliant)
    return compliant


@pytest.mark.parametrize("name", list(FACTORY))
def test_real_model_layers_dns_validate_project_and_graph(name, tmp_path):
    torch.manual_seed(0)
    model = real_models.FACTORIES[name]()
    expected = expected_layers(model)

    # 1. the registry: the right layers, the right axes, no embedding/norm/tied tensor
    chosen = prunable_parameters(model)
    infos = describe_model(model)
    assert set(chosen) == set(expected)
    assert {n: infos[n].axis for n in chosen} == expected
    assert not any(infos[n].kind in ("embedding", "norm") for n in chosen)
    for tied in TIED.get(name, ()):
        assert set(infos[tied].tied) == TIED[name] and tied not in chosen

    untouched = {n: p.detach().clone() for n, p in model.named_parameters() if n not in chosen and p.dim() >= 2}

    # 2. DNS through the API, a few steps of the model's own loss
    dns = DynamicNetworkSurgery(model, DNSConfig(target_sparsity=0.5, gamma=0.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(3):
        loss = real_models.loss(name, model, real_models.example_inputs(name, 2, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dns.step()
    masks = dns.masks()
    assert set(masks) == set(expected)
    assert 0.3 < dns.sparsity() < 0.7
    for tensor_name, before in untouched.items():
        now = dict(model.named_parameters())[tensor_name]
        assert bool((now != 0).all()), f"{tensor_name} lost weights"  # trained, never masked
        assert now.shape == before.shape

    # 3. checkpoint + validate: kinds and axes recorded, read back without building the model
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    spec = ModelSpec(FACTORY[name], {})
    SparseCheckpoint(weights, masks, model=spec, layers=dns.layer_info).save(tmp_path / "dns.safetensors")
    ckpt = load_checkpoint(tmp_path / "dns.safetensors")
    report = validate(ckpt)
    assert report.passed, report.violations
    assert {layer.name: layer.axis for layer in report.layers} == expected
    assert {layer.source for layer in report.layers} == {"module"}
    trusted = validate(ckpt, trust_model_code=True)  # the same facts, from the model itself
    assert [(layer.name, layer.kind, layer.axis) for layer in trusted.layers] == [(layer.name, layer.kind, layer.axis) for layer in report.layers]

    # 4. project 2:4 along each module's true axis; layers that cannot hold it say why
    result = project_nm(ckpt, "2:4")
    out = result.checkpoint
    assert validate(out, require_nm="2:4").passed
    projected = {layer.name for layer in result.layers if layer.skipped_reason is None}
    skipped = {layer.name: layer.skipped_reason for layer in result.layers if layer.skipped_reason}
    assert projected | set(skipped) == set(expected) and projected
    other_axis_checked = 0
    for layer in projected:
        nonzero = out.weights[layer] != 0
        axis = expected[layer]
        assert complies(nonzero, TWO_FOUR, axis), layer
        if nonzero.dim() == 2 and nonzero.shape[1 - axis] % 4 == 0:  # not vacuous: the other axis does not hold
            assert not complies(nonzero, TWO_FOUR, 1 - axis), layer
            other_axis_checked += 1
    assert other_axis_checked or name in ("resnet", "mobilenet")
    for layer, reason in skipped.items():
        assert "not a multiple of 4" in reason
    for tensor_name, before in untouched.items():
        assert torch.equal(out.weights[tensor_name], weights[tensor_name]), f"{tensor_name} changed"

    # 5. the exported graph: every projected layer is 2:4 along its consumer's reduction axis
    if name != "mobilenet":  # its 52 convs are checked on the weights above; keep the run short
        model.load_state_dict(out.masked_weights())
        graph = export_graph_check(name, model, {n: out.weights[n] for n in projected})
        assert set(graph) == projected and all(graph.values()), graph


def test_mobilenet_depthwise_convs_are_prunable_but_cannot_hold_2_4():
    torch.manual_seed(0)
    model = real_models.mobilenet()
    infos = describe_model(model)
    depthwise = {n: i for n, i in infos.items() if i.kind == "conv" and i.groups > 1}
    assert depthwise and all(info.axis == 1 and info.prunable for info in depthwise.values())
    for name_, info in depthwise.items():
        weight = dict(model.named_parameters())[name_]
        assert weight.shape[1] == 1 and info.groups == weight.shape[0]  # in/groups = 1 channel
    ckpt = SparseCheckpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, {n: torch.ones_like(dict(model.named_parameters())[n], dtype=torch.bool) for n in prunable_parameters(model)}, layers={n: infos[n] for n in prunable_parameters(model)})
    result = project_nm(ckpt, "2:4")
    reasons = {layer.name: layer.skipped_reason for layer in result.layers}
    assert all("grouped conv" in reasons[n] for n in depthwise)


def test_gpt2_dns_leaves_tied_lm_head_alone_unless_opted_in():
    torch.manual_seed(0)
    model = real_models.gpt2_lm()
    dns = DynamicNetworkSurgery(model, DNSConfig(target_sparsity=0.5, gamma=0.0))
    assert {info.kind for info in dns.layer_info.values()} == {"hf-conv1d"}
    assert all(info.axis == 0 for info in dns.layer_info.values())
    assert "transformer.wte.weight" not in dns.params and "lm_head.weight" not in dns.params
    with pytest.raises(UserError, match="lm_head.weight.*tied"):
        DynamicNetworkSurgery(model, names=["lm_head.weight"])
    # opted in: pruned once, for both owners
    torch.manual_seed(0)
    model = real_models.gpt2_lm()
    dns = DynamicNetworkSurgery(model, DNSConfig(target_sparsity=0.5, gamma=0.0, nm="2:4"), prune_tied=True)
    assert "transformer.wte.weight" in dns.params and "lm_head.weight" not in dns.params
    x = real_models.example_inputs("gpt2")
    real_models.loss("gpt2", model, x).backward()
    dns.step()
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte and 0.3 < float((wte == 0).float().mean()) < 0.7
    assert complies(dns.masks()["transformer.wte.weight"], TWO_FOUR, 1)  # the head's Linear: [vocab, hidden], axis 1
    assert all(complies(dns.masks()[n], TWO_FOUR, 0) for n, i in dns.layer_info.items() if i.kind == "hf-conv1d")


def test_dense_bert_state_dict_embeddings_are_never_projected(tmp_path, run_cli):
    torch.manual_seed(0)
    encoder = real_models.bert_encoder()
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    ckpt = from_state_dict(state)
    assert "embeddings.word_embeddings.weight" in ckpt.masks  # the shape guess would take it for a Linear
    with pytest.raises(UserError, match="guessed from their shape"):
        project_nm(ckpt, "2:4")
    result = project_nm(ckpt, "2:4", layers=["encoder.*.dense.weight"])
    changed = {n for n in state if not torch.equal(result.checkpoint.weights[n], state[n])}
    assert changed and all(n.startswith("encoder.") and n.endswith("dense.weight") for n in changed)
    # with the model known, embeddings are skipped by kind, not by luck
    torch.save(state, tmp_path / "bert.pt")
    out = tmp_path / "p.safetensors"
    refused = run_cli("project", tmp_path / "bert.pt", "--nm", "2:4", "-o", out)
    assert refused.exit_code == 2 and "guessed from their shape" in refused.stderr
    cli = run_cli(
        "project", tmp_path / "bert.pt", "--model", "real_models:bert_encoder", "--input-shape", "1,8",
        "--trust-model-code", "-o", out, "--json",
    )  # fmt: skip
    assert cli.exit_code == 0, cli.output
    layers = {layer["name"]: layer for layer in json.loads(cli.stdout)["layers"]}
    assert "not a layer kind to project" in layers["embeddings.word_embeddings.weight"]["skipped_reason"]
    projected = load_checkpoint(out)
    for name in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight"):
        assert torch.equal(projected.weights[name], state[name])
    assert projected.layers["encoder.layer.0.attention.self.query.weight"].source == "module"


def test_gpt2_conv1d_is_projected_along_axis_0_and_validate_checks_that_axis(tmp_path, run_cli):
    torch.manual_seed(0)
    model = real_models.gpt2_lm()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "gpt2.pt")
    out = tmp_path / "p.safetensors"
    cli = run_cli(
        "project", tmp_path / "gpt2.pt", "--model", "real_models:gpt2_lm", "--input-shape", "1,8", "--trust-model-code", "-o", out, "--json"
    )
    assert cli.exit_code == 0, cli.output
    layers = {layer["name"]: layer for layer in json.loads(cli.stdout)["layers"]}
    assert "tied" in layers["transformer.wte.weight"]["skipped_reason"]  # dense, shared with lm_head: left alone
    projected = load_checkpoint(out)
    c_fc = "transformer.h.0.mlp.c_fc.weight"
    assert complies(projected.weights[c_fc] != 0, TWO_FOUR, 0) and not complies(projected.weights[c_fc] != 0, TWO_FOUR, 1)
    assert torch.equal(projected.weights["transformer.wte.weight"], state["transformer.wte.weight"])
    assert torch.equal(projected.weights["lm_head.weight"], state["lm_head.weight"])
    # validate reads the recorded axis (no trust needed) and checks along it
    result = run_cli("validate", out, "--require-nm", "2:4", "--json")
    assert result.exit_code == 0, result.output
    report = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    assert (report[c_fc]["kind"], report[c_fc]["axis"], report[c_fc]["source"]) == ("hf-conv1d", 0, "module")
    # the old silent failure: 2:4 along axis 1 of a Conv1D weight must fail validate
    wrong_mask = nm_mask(state[c_fc].abs(), TWO_FOUR, axis=1)
    wrong = projected.with_(weights={**projected.weights, c_fc: state[c_fc] * wrong_mask}, masks={**projected.masks, c_fc: wrong_mask})
    report = validate(wrong, require_nm="2:4")
    assert [(v.rule, v.layer) for v in report.violations] == [("nm", c_fc)]
