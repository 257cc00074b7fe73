"""Shared test helpers: fixture paths, a CLI runner, real-MNIST discovery, GPU skips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent


def mnist_dir() -> Path | None:
    """The real MNIST IDX files: $DNSCONVERT_MNIST, else ../shared/data/mnist beside the checkout."""
    candidates = [os.environ.get("DNSCONVERT_MNIST"), ROOT.parent / "shared" / "data" / "mnist"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").exists():
            return Path(candidate)
    return None


@pytest.fixture
def mnist_path() -> Path:
    path = mnist_dir()
    if path is None:
        pytest.skip("real MNIST not found: set DNSCONVERT_MNIST or place the IDX files in ../shared/data/mnist")
    return path


class Cli:
    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str | Path):
        from dnsconvert.cli import cli

        return self.runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def run_cli() -> Cli:
    return Cli()


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU on this machine (the gpu tests need one)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _bench_blocks_unsettled(monkeypatch):
    """bench settles each timed block for BLOCK_SETTLE_S (50 ms) so that the previous runner's
    spinning workers are gone; at ~80 blocks a bench that is ~4 s, which over the suite's
    benches of tiny models added ~1.6 minutes. The planner's whole-model check does the same
    (PLAN_SETTLE_S, ~4 s per batch regime) and spreads its rounds (PLAN_ROUND_GAP_S, 5.5 s per batch
    regime). Tests that time something run their own
    measure_interleaved; test_bench and test_torch_sparse_cpu check that the real values are
    passed by default."""
    import dnsconvert.bench
    import dnsconvert.targets.torch_sparse_cpu

    monkeypatch.setattr(dnsconvert.bench, "BLOCK_SETTLE_S", 0.0)
    monkeypatch.setattr(dnsconvert.targets.torch_sparse_cpu, "PLAN_SETTLE_S", 0.0)
    monkeypatch.setattr(dnsconvert.targets.torch_sparse_cpu, "PLAN_ROUND_GAP_S", 0.0)
