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
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA T4")
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    status = target.availability()
    assert not status.available and "7.5" in status.reason and "8.0" in status.reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100")
    status = target.availability()
    assert status.available and "H100" in status.reason and "9.0" in status.reason and "cutlass: no" in status.reason


@pytest.mark.gpu
def test_gpu_parity_and_speed_path(tmp_path):
    ckpt = project_nm(masked_checkpoint("transformer_mlp", 0.5, dim=1024, hidden=4096, depth=1), "2:4").checkpoint
    from dnsconvert.targets.torch_semistructured import SemiStructuredDetails

    artifact = get_target("torch-2to4-cuda").build(ckpt, tmp_path / "m", BuildOptions())
    assert artifact.manifest.parity.passed
    assert all(d.sparse for d in artifact.manifest.details_as(SemiStructuredDetails).plan.values())
    runner = get_target("torch-2to4-cuda").load(artifact, "sparse")
    from torch.sparse import SparseSemiStructuredTensor

    assert any(isinstance(p, SparseSemiStructuredTensor) for p in runner.flat.parameters())


# --- issue 16: backend rules as a pure function of the compute capability, cuSPARSELt check, error mapping ---


def test_backend_rule_is_a_function_of_compute_capability():
    from dnsconvert.targets.torch_semistructured import backend_support

    # PyTorch's CUTLASS 2:4 kernels TORCH_CHECK(dprops->major == 8, "... Supported only on GPUs with compute capability 8.x")
    for capability in ((8, 0), (8, 6), (8, 9)):
        assert backend_support("cutlass", capability, cusparselt_available=True)[0]
    for capability in ((9, 0), (10, 0), (12, 0)):
        ok, reason = backend_support("cutlass", capability, cusparselt_available=True)
        assert not ok and "8.x" in reason and f"{capability[0]}.{capability[1]}" in reason
    assert not backend_support("cutlass", (7, 5), cusparselt_available=True)[0]
    assert backend_support("cusparselt", (9, 0), cusparselt_available=True)[0]
    ok, reason = backend_support("cusparselt", (9, 0), cusparselt_available=False)
    assert not ok and "cuSPARSELt" in reason
    ok, reason = backend_support("cusparselt", (7, 5), cusparselt_available=True)
    assert not ok and "8.0" in reason


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend to be a CUDA machine of a given capability (nothing else of CUDA is touched)."""

    def make(capability=(9, 0), name="NVIDIA H100 80GB HBM3", cusparselt=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
        monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: cusparselt)

    return make


def test_availability_reports_missing_cusparselt(fake_gpu):
    fake_gpu((9, 0), cusparselt=False)
    status = {e.name: e for e in list_targets()}["torch-2to4-cuda"].target.availability()
    assert not status.available
    assert "cuSPARSELt" in status.reason and "8.x" in status.reason  # both backends say why


def test_availability_on_ampere_without_cusparselt_offers_cutlass(fake_gpu):
    fake_gpu((8, 0), name="NVIDIA A100", cusparselt=False)
    status = {e.name: e for e in list_targets()}["torch-2to4-cuda"].target.availability()
    assert status.available and "cutlass" in status.reason and "cuSPARSELt" in status.reason


def test_cutlass_on_hopper_is_a_target_error_not_a_crash(fake_gpu, tmp_path, run_cli):
    fake_gpu((9, 0))
    ckpt = project_nm(masked_checkpoint("transformer_mlp", 0.5, dim=64, hidden=128, depth=1), "2:4").checkpoint
    from dnsconvert.errors import TargetError

    with pytest.raises(TargetError, match="8.x"):
        get_target("torch-2to4-cuda").build(ckpt, tmp_path / "m.safetensors", BuildOptions(extra={"backend": "cutlass"}))
    assert not (tmp_path / "m.safetensors").exists()


def test_kernel_runtime_errors_become_target_errors(fake_gpu, tmp_path, monkeypatch):
    """A RuntimeError from the 2:4 conversion or the first forward is exit 2 with the reason, never exit 3."""
    from dnsconvert.errors import TargetError
    from dnsconvert.targets import torch_semistructured as ts

    fake_gpu((8, 0), name="NVIDIA A100")
    monkeypatch.setattr(ts, "DEVICE", "cpu")  # the real flow on CPU tensors; only the kernel is stood in for

    def kernel_refuses(model, plan, *, backend):
        raise RuntimeError("sparse_semi_structured_mad_op : Supported only on GPUs with compute capability 8.x")

    monkeypatch.setattr(ts, "sparsify_model_", kernel_refuses)
    ckpt = project_nm(masked_checkpoint("transformer_mlp", 0.5, dim=64, hidden=128, depth=1), "2:4").checkpoint
    with pytest.raises(TargetError, match="compute capability 8.x") as info:
        get_target("torch-2to4-cuda").build(ckpt, tmp_path / "m.safetensors", BuildOptions(extra={"backend": "cutlass"}))
    assert info.value.exit_code == 2
    assert not (tmp_path / "m.safetensors").exists()


def test_gpu_benchmark_refuses_cutlass_on_hopper_with_reason(fake_gpu):
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("gpu_2to4", ROOT / "benchmarks" / "gpu_2to4.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    fake_gpu((9, 0))
    runnable, refused = bench.backends_to_run("cutlass")
    assert runnable == [] and "8.x" in refused["cutlass"]
    assert bench.backends_to_run("auto") == (["cusparselt"], {})
    fake_gpu((8, 6), name="NVIDIA RTX A6000", cusparselt=False)
    assert bench.backends_to_run("auto") == (["cutlass"], {})


def test_gpu_benchmark_ffn_is_the_target_against_its_own_dense(monkeypatch, tmp_path):
    """gpu_2to4's end to end, CPU-safe part: bench() without the ONNX Runtime baselines, so the
    recorded speedup is against the target's own dense variant; the fastest-dense ratio kept apart.
    (An `ort` artifact of a small FFN stands in for the torch-2to4-cuda one, which needs a GPU.)"""
    import importlib.util

    import helpers
    from helpers import ROOT

    import dnsconvert.bench
    from dnsconvert.targets.torch_semistructured import TorchSemiStructuredTarget

    spec = importlib.util.spec_from_file_location("gpu_2to4", ROOT / "benchmarks" / "gpu_2to4.py")
    gpu_2to4 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_2to4)
    small = masked_checkpoint("transformer_mlp", 0.5, dim=32, hidden=64, depth=1)
    monkeypatch.setattr(helpers, "masked_checkpoint", lambda *args, **kwargs: small)
    monkeypatch.setattr(TorchSemiStructuredTarget, "build", lambda self, ckpt, output, options: get_target("ort").build(ckpt, output, BuildOptions()))
    monkeypatch.setattr(gpu_2to4, "BATCHES", (1, 4))
    calls = []
    real_bench = dnsconvert.bench.bench

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_bench(*args, **kwargs)

    monkeypatch.setattr(dnsconvert.bench, "bench", spy)
    row = gpu_2to4.end_to_end("cusparselt", "fp16", iterations=4)
    assert calls and calls[0]["baselines"] == ()
    assert [s["batch"] for s in row["speedups"]] == [1, 4]
    for s in row["speedups"]:
        assert s["fastest_dense"] == "ort dense"  # no other dense runtime was timed
        assert s["speedup"] > 0 and s["speedup_interval"][0] <= s["speedup"] <= s["speedup_interval"][1]
        assert s["dense_p50_ms"] > 0 and s["sparse_p50_ms"] > 0
    assert row["dense_baselines"].startswith("the target's own dense") and row["parity"]["passed"]
