"""benchmarks/surgery_overhead.py --whole-run: its two arms are whole prune() runs of equal length,
one with DNS surgery and one dense (no mask at all), so that their time ratio is the surgery's."""

import importlib.util

import torch

from helpers import ROOT


def load_benchmark():
    spec = importlib.util.spec_from_file_location("surgery_overhead", ROOT / "benchmarks" / "surgery_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_whole_run_arms_train_as_long_and_only_one_prunes(mnist_path, tmp_path):
    bench = load_benchmark()
    preset = bench.load_presets()["tuned"]["lenet300100"]
    short = {**preset, "dense_epochs": 0.02, "epochs": 0.05, "finetune_epochs": 0.02, "iter_stop": 40}
    threads = torch.get_num_threads()
    try:  # the worker pins torch to one thread, as in its own process
        dense = bench.whole_run("lenet300100", "dense", short, str(mnist_path), str(tmp_path))
        dns = bench.whole_run("lenet300100", "dns", short, str(mnist_path), str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    assert dense["steps"] == dns["steps"] == 85  # ceil(0.02·937) + ceil(0.05·937) + ceil(0.02·937) = ceil(0.09·937)
    assert dense["sparsity"] == 0.0 and dns["sparsity"] > 0.5
    assert dense["cpu_seconds"] > 0 and dns["cpu_seconds"] > 0
