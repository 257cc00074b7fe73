"""The prune stage end to end: CLI, resume after SIGKILL, 2-rank DDP, validate accepts the output."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dnsconvert.loading import load_checkpoint

TINY = ["--model", "mlp", "--model-kwargs", '{"hidden": [64, 32]}', "--data", "synthetic", "--no-progress", "--seed", "3"]


def run_prune(args, env=None, check=True):
    cmd = [sys.executable, "-m", "dnsconvert", "prune", *TINY, *map(str, args)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(cmd, capture_output=True, text=True, env=full_env)
    if check:
        assert result.returncode == 0, result.stderr
    return result


DNS_ARGS = ["--epochs", "0.6", "--dense-epochs", "0.2", "--target-sparsity", "0.8", "--iter-stop", "100", "--gamma", "1e-2", "--checkpoint-every", "25"]


def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
    straight = tmp_path / "straight.safetensors"
    run_prune([*DNS_ARGS, "-o", straight])
    killed = tmp_path / "killed.safetensors"
    result = run_prune([*DNS_ARGS, "-o", killed], env={"DNSCONVERT_TEST_SIGKILL_AT_STEP": "90"}, check=False)
    assert result.returncode == -9  # really killed by SIGKILL
    partial = load_checkpoint(killed)
    assert partial.state["iteration"] == 75  # the last periodic checkpoint before the kill
    assert not list(tmp_path.glob("*.partial"))
    run_prune(["--resume", killed, "-o", killed])
    a, b = load_checkpoint(straight), load_checkpoint(killed)
    assert a.masks.keys() == b.masks.keys()
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name
    for name in a.weights:
        assert torch.equal(a.weights[name], b.weights[name]), name
    for name, raw in a.state["sparsifier"]["shadow"].items():
        assert torch.equal(raw, b.state["sparsifier"]["shadow"][name])


@pytest.mark.parametrize("method", ["magnitude", "imp"])
def test_baselines_write_valid_checkpoints(tmp_path, run_cli, method):
    out = tmp_path / f"{method}.safetensors"
    result = run_prune(["--method", method, "--epochs", "0.2", "--target-sparsity", "0.9", "--imp-rounds", "3", "-o", out, "--json"])
    summary = json.loads(result.stdout)
    assert summary["sparsity"] == pytest.approx(0.9, abs=0.01)
    assert run_cli("validate", out, "--min-sparsity", "0.89").exit_code == 0


def test_dns_with_nm_validates_under_require_nm(tmp_path, run_cli):
    out = tmp_path / "nm.safetensors"
    run_prune(["--epochs", "0.3", "--nm", "2:4", "--c", "0.0", "--gamma", "1e-2", "-o", out])
    assert run_cli("validate", out, "--require-nm", "2:4").exit_code == 0


def test_two_rank_ddp_masks_identical(tmp_path):
    out = tmp_path / "ddp.safetensors"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
        "-m", "dnsconvert", "prune", *TINY, "--epochs", "0.3", "--target-sparsity", "0.7", "--gamma", "1e-2", "-o", str(out),
    ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    state = load_checkpoint(out).state
    assert state["world_size"] == 2
    assert len(state["rank_mask_sha256"]) == 2 and len(set(state["rank_mask_sha256"])) == 1


def test_prune_bad_input_is_one_line(tmp_path):
    result = run_prune(["--init", tmp_path / "missing.safetensors", "-o", tmp_path / "x.safetensors"], check=False)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    result = run_prune(["--resume", "fixtures/tiny_mlp_unstructured.safetensors", "-o", tmp_path / "x.safetensors"], check=False)
    assert result.returncode == 2 and "resumable" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()
