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


def test_dns_from_an_imported_sparse_checkpoint_reaches_the_target(tmp_path):
    """Issue 10: DNS started (--init) from an 85%-pruned checkpoint with --target-sparsity 0.85
    ended far below it, because the cut weights' values are lost (zeros)."""
    pruned = tmp_path / "pruned.safetensors"
    run_prune(["--method", "magnitude", "--epochs", "0.2", "--target-sparsity", "0.85", "-o", pruned])
    out = tmp_path / "dns.safetensors"
    result = run_prune(["--init", pruned, "--epochs", "0.6", "--target-sparsity", "0.85", "--iter-stop", "100", "--gamma", "1e-2", "-o", out, "--json"])
    sparsity = {n: 1.0 - float(m.float().mean()) for n, m in load_checkpoint(out).masks.items()}
    assert all(0.84 <= s <= 0.93 for s in sparsity.values()), sparsity


def test_masked_finetune_keeps_the_dns_masks(tmp_path):
    plain, tuned = tmp_path / "plain.safetensors", tmp_path / "tuned.safetensors"
    args = ["--epochs", "0.4", "--target-sparsity", "0.8", "--iter-stop", "60", "--gamma", "1e-2", "--checkpoint-every", "0"]
    plain_steps = json.loads(run_prune([*args, "-o", plain, "--json"]).stdout)["steps"]
    tuned_steps = json.loads(run_prune([*args, "--finetune-epochs", "0.3", "--finetune-lr", "0.005", "-o", tuned, "--json"]).stdout)["steps"]
    assert tuned_steps > plain_steps
    a, b = load_checkpoint(plain), load_checkpoint(tuned)
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name
        assert not torch.equal(a.weights[name], b.weights[name])  # fine-tuning moved the kept weights
        assert not bool(b.weights[name][~b.masks[name]].any())  # and the cut ones stayed zero


def test_a_layer_left_without_any_weight_is_warned_about(tmp_path, run_cli):
    """DNS with its default c = 3 straight from initialisation: a uniform |W| has its mean + 3·std
    above its largest weight, so every weight is cut; the user is told which layers and what to do."""
    out = tmp_path / "emptied.safetensors"
    result = run_cli("prune", "--model", "lenet300100", "--data", "synthetic", "--dense-epochs", "0.05", "--epochs", "0.1", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["emptied_layers"] == ["1.weight", "3.weight", "5.weight"]
    assert "every weight of 1.weight, 3.weight, 5.weight is cut" in result.stderr and "--target-sparsity" in result.stderr
    kept = run_cli("prune", "--model", "lenet300100", "--data", "synthetic", "--epochs", "0.1", "--target-sparsity", "0.9", "-o", tmp_path / "kept.safetensors", "--json")
    assert json.loads(kept.stdout)["emptied_layers"] == [] and "every weight" not in kept.stderr
