"""Trust comes from the person, never from a file: a planted factory must never run without the flag."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from dnsconvert.checkpoint import PruningInfo, SparseCheckpoint
from dnsconvert.modelspec import ModelSpec
from dnsconvert.surgery.train import PruneConfig

PLANTED = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")

def factory(**kwargs):
    pathlib.Path({marker!r}).write_text("called")
    import torch
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
"""


def plant(tmp_path: Path) -> tuple[Path, Path]:
    """A module whose import and factory both write a marker file; returns (its folder, marker)."""
    folder = tmp_path / "planted"
    folder.mkdir()
    marker = tmp_path / "MARKER"
    (folder / "planted_models.py").write_text(textwrap.dedent(PLANTED.format(marker=str(marker))))
    return folder, marker


def hostile_resume_checkpoint(path: Path) -> Path:
    """A checkpoint whose stored run asks for trust and names the planted factory."""
    spec = ModelSpec("planted_models:factory", {}, (1, 1, 28, 28))
    run = PruneConfig(model=spec, data="synthetic").to_json()
    run["trust_model_code"] = True  # what an attacker would store
    weights = {"1.weight": torch.zeros(10, 784), "1.bias": torch.zeros(10)}
    state = {"run": run, "phase_index": 0, "phase_step": 0, "iteration": 0}
    SparseCheckpoint(weights, {"1.weight": torch.ones(10, 784, dtype=torch.bool)}, model=spec, pruning=PruningInfo("dns"), state=state).save(path)
    return path


def cli(*args, env_path: Path, cwd: Path):
    env = {**os.environ, "PYTHONPATH": f"{env_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dnsconvert", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)


def test_resume_never_takes_trust_from_the_checkpoint(tmp_path):
    folder, marker = plant(tmp_path)
    ckpt = hostile_resume_checkpoint(tmp_path / "hostile.safetensors")
    result = cli("prune", "--resume", ckpt, "--no-progress", "-o", tmp_path / "out.safetensors", env_path=folder, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "--trust-model-code" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_pipeline_file_cannot_grant_trust(tmp_path):
    folder, marker = plant(tmp_path)
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        '[prune]\nmodel = "planted_models:factory"\ninput_shape = [1, 1, 28, 28]\ntrust_model_code = true\ndata = "synthetic"\nepochs = 0.01\n'
    )
    result = cli("run", pipeline, env_path=folder, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "trust_model_code" in result.stderr and "--trust-model-code" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists()


def test_pipeline_naming_a_factory_needs_the_flag(tmp_path):
    folder, marker = plant(tmp_path)
    pipeline = tmp_path / "p.toml"
    body = '[prune]\nmodel = "planted_models:factory"\ninput_shape = [1, 1, 28, 28]\ndata = "synthetic"\nepochs = 0.01\ncheckpoint_every = 0\n'
    pipeline.write_text(body)
    refused = cli("run", pipeline, env_path=folder, cwd=tmp_path)
    assert refused.returncode == 2 and not marker.exists(), refused.stderr
    allowed = cli("run", pipeline, "--trust-model-code", "--json", env_path=folder, cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    assert marker.read_text() == "called"
    assert json.loads(allowed.stdout)["passed"]


def test_help_says_what_trust_allows():
    result = subprocess.run([sys.executable, "-m", "dnsconvert", "run", "--help"], capture_output=True, text=True)
    assert "runs code" in " ".join(result.stdout.split())
