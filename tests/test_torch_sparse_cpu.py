import numpy as np
import pytest
import torch

from dnsconvert.models import BUILTIN_MODELS
from dnsconvert.model_io import sample_feeds
from dnsconvert.targets import BuildOptions, get_target, load_artifact
from dnsconvert.targets.torch_sparse_cpu import CsrDetails, PlannedLinear, load_sparse_model
from helpers import masked_checkpoint


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_matches_dense_model_within_1e5(tmp_path, name):
    ckpt = masked_checkpoint(name, 0.95)
    artifact = get_target("torch-sparse-cpu").build(ckpt, tmp_path / "m", BuildOptions(atol=1e-5, rtol=1e-5, extra={"plan": "sparsity", "min_sparsity": "0.5"}))
    assert artifact.manifest.parity.passed and artifact.manifest.parity.max_abs <= 1e-5
    kernels = {layer: d.kernels["small"] for layer, d in artifact.manifest.details_as(CsrDetails).plan.items()}
    assert kernels and set(kernels.values()) == {"compiled"}
    sparse = get_target("torch-sparse-cpu").load(load_artifact(tmp_path / "m"), "sparse")
    dense = get_target("torch-sparse-cpu").load(load_artifact(tmp_path / "m"), "dense")
    assert any(isinstance(m, PlannedLinear) for m in sparse.model.modules())
    assert not any(isinstance(m, PlannedLinear) for m in dense.model.modules())
    feeds = sample_feeds(ckpt.model.inputs, batch=5, seed=1)
    np.testing.assert_allclose(sparse.run(feeds)[0], dense.run(feeds)[0], atol=1e-5, rtol=1e-5)


def test_auto_plan_records_timings(tmp_path):
    ckpt = masked_checkpoint("lenet300100", 0.99)
    artifact = get_target("torch-sparse-cpu").build(ckpt, tmp_path / "m", BuildOptions(extra={"batches": "1,64"}))
    for decision in artifact.manifest.details_as(CsrDetails).plan.values():
        assert set(decision.kernels) == {"small", "large"}
        assert set(decision.kernels.values()) <= {"dense", "torch", "compiled"}
        assert set(decision.timings_ms) == {"1", "64"}
        for regime, batch in (("small", "1"), ("large", "64")):
            timing = decision.timings_ms[batch]
            assert decision.kernels[regime] == min(timing, key=timing.get)


def test_hostile_csr_indices_are_rejected(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from dnsconvert.errors import TargetError

    ckpt = masked_checkpoint("lenet300100", 0.95)
    artifact = get_target("torch-sparse-cpu").build(ckpt, tmp_path / "m", BuildOptions(extra={"plan": "sparsity"}))
    from safetensors import safe_open

    with safe_open(str(artifact.path), "pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(artifact.path))
    col = tensors["csr/1/col_indices"].clone()
    col[0] = 10_000_000  # points far outside the matrix
    tensors["csr/1/col_indices"] = col
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    # a user error naming the file (exit 2), not torch's RuntimeError (exit 3)
    bad = tmp_path / "bad.safetensors"
    with pytest.raises(TargetError, match="column index lies outside") as caught:
        load_sparse_model(bad.read_bytes(), where=bad)
    assert caught.value.exit_code == 2 and str(bad) in str(caught.value) and "\n" not in str(caught.value)
    assert json.loads(meta["dnsconvert.torch_sparse_cpu"])["csr_layers"]


@pytest.mark.parametrize("kernel", ["dense", "torch", "compiled"])
def test_planned_linear_kernels_on_3d_input(kernel):
    weight = torch.randn(8, 16) * (torch.rand(8, 16) > 0.8)
    layer = PlannedLinear(weight, torch.randn(8), {"small": kernel, "large": kernel})
    for batch in (2, 12):  # both regimes
        x = torch.randn(batch, 3, 16)
        torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_chain_models_run_compiled_and_others_through_torch(tmp_path):
    target = get_target("torch-sparse-cpu")
    for name, expected in (("lenet300100", "compiled chain"), ("mlp", "compiled chain"), ("lenet5", "pytorch modules"), ("transformer_mlp", "pytorch modules")):
        ckpt = masked_checkpoint(name, 0.95)
        artifact = target.build(ckpt, tmp_path / name, BuildOptions(atol=1e-5, rtol=1e-5, extra={"plan": "sparsity"}))
        assert artifact.manifest.details_as(CsrDetails).runner == expected, name
        runner = target.load(load_artifact(tmp_path / name), "sparse")
        assert runner.mode == expected


def test_chain_with_a_dense_layer_in_the_middle(tmp_path):
    ckpt = masked_checkpoint("mlp", 0.95)
    torch.manual_seed(5)
    ckpt.weights["3.weight"] = torch.randn_like(ckpt.weights["3.weight"])  # a dense middle layer
    ckpt.masks["3.weight"] = torch.ones_like(ckpt.masks["3.weight"])
    artifact = get_target("torch-sparse-cpu").build(ckpt, tmp_path / "m", BuildOptions(atol=1e-5, rtol=1e-5, extra={"plan": "sparsity", "min_sparsity": "0.5"}))
    details = artifact.manifest.details_as(CsrDetails)
    kernels = {layer: d.kernels["large"] for layer, d in details.plan.items()}
    assert kernels == {"1": "compiled", "3": "dense", "5": "compiled"}
    assert details.runner == "compiled chain" and artifact.manifest.parity.passed


def test_chain_runner_mixes_kernels_per_regime():
    from dnsconvert.targets.torch_sparse_cpu import TorchSparseRunner

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    for layer in (dense[1], dense[3]):
        layer.weight.data *= torch.rand_like(layer.weight) > 0.7
    planned = torch.nn.Sequential(
        torch.nn.Flatten(),
        PlannedLinear(dense[1].weight, dense[1].bias, {"small": "compiled", "large": "torch"}),
        torch.nn.ReLU(),
        PlannedLinear(dense[3].weight, dense[3].bias, {"small": "compiled", "large": "dense"}),
        torch.nn.GELU(),
        dense[5],
    )
    from dnsconvert.modelspec import ModelSpec

    runner = TorchSparseRunner(planned, ModelSpec("test:planned", {}, (1, 2, 16)))
    assert runner.mode == "compiled chain"
    for batch in (1, 16):
        x = np.random.default_rng(batch).standard_normal((batch, 2, 16)).astype(np.float32)
        with torch.no_grad():
            expected = dense(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(runner.run({"input": x})[0], expected, atol=1e-5, rtol=1e-5)
