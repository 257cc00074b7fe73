"""2:4 semi-structured target: eligibility rules on CPU; the kernels themselves on a GPU."""

import pytest
import torch

from dnsconvert.pattern import TWO_FOUR, nm_mask
from dnsconvert.project import project_nm
from dnsconvert.targets import BuildOptions, get_target, list_targets
from dnsconvert.targets.torch_semistructured import eligible_linear, plan_model
from helpers import masked_checkpoint


def two_four(out_features, in_features):
    w = torch.randn(out_features, in_features)
    return w * nm_mask(w.abs(), TWO_FOUR)


def test_eligibility_rules():
    ok, reason = eligible_linear(two_four(64, 128), backend="cusparselt", dtype=torch.float16)
    assert ok, reason
    ok, reason = eligible_linear(torch.randn(64, 128), backend="cusparselt", dtype=torch.float16)
    assert not ok and "not 2:4" in reason
    ok, reason = eligible_linear(two_four(48, 96), backend="cutlass", dtype=torch.float16)
    assert not ok and "(32, 64)" in reason
    ok, reason = eligible_linear(two_four(10, 100), backend="cusparselt", dtype=torch.float16)
    assert not ok and "multiple" in reason


def test_plan_on_projected_model():
    from dnsconvert.models import build_masked_model

    ckpt = project_nm(masked_checkpoint("transformer_mlp", 0.5), "2:4").checkpoint
    plan = plan_model(build_masked_model(ckpt), backend="cusparselt", dtype=torch.float16)
    assert plan and all(d["sparse"] for d in plan.values())


def test_listed_with_reason_when_unavailable(monkeypatch, run_cli, tmp_path):
    """Every branch of availability() on any machine: the CUDA queries are patched (a GPU cannot be
    conjured on a CPU box, nor removed from a GPU one); the logic around them is real."""
    target = {e.name: e for e in list_targets()}["torch-2to4-cuda"].target
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    status = target.availability()
    assert not status.available and "CUDA" in status.reason
    result = run_cli("export", "fixtures/tiny_mlp_2to4.safetensors", "--target", "torch-2to4-cuda", "-o", tmp_path / "m.safetensors")
    assert result.exit_code == 2 and "not available here" in result.stderr and not list(tmp_path.iterdir())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    status = target.availability()
    assert not status.available and "7.5" in status.reason and "8.0" in status.reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")
    status = target.availability()
    assert status.available and "H100" in status.reason and "sm90" in status.reason


@pytest.mark.gpu
def test_gpu_parity_and_speed_path(tmp_path):
    ckpt = project_nm(masked_checkpoint("transformer_mlp", 0.5, dim=1024, hidden=4096, depth=1), "2:4").checkpoint
    artifact = get_target("torch-2to4-cuda").build(ckpt, tmp_path / "m.safetensors", BuildOptions())
    assert artifact.manifest["parity"]["passed"]
    assert all(d["sparse"] for d in artifact.manifest["plan"].values())
    runner = get_target("torch-2to4-cuda").load(artifact, "sparse")
    from torch.sparse import SparseSemiStructuredTensor

    assert any(isinstance(p, SparseSemiStructuredTensor) for p in runner.model.parameters())
