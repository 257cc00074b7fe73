"""benchmarks/surgery_overhead.py --whole-run: its two arms are whole prune() runs of equal length,
one with DNS surgery and one dense (no step touches a mask), so that their time ratio is the
surgery's; the pairs alternate (or swap CPUs side by side) after an untimed warm-up of each arm."""

import importlib.util

import pytest
import torch

from helpers import ROOT


def load_benchmark():
    spec = importlib.util.spec_from_file_location("surgery_overhead", ROOT / "benchmarks" / "surgery_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_whole_run_arms_train_as_long_and_only_one_prunes(mnist_path, tmp_path):
    bench = load_benchmark()
    short = bench.short_settings(bench.load_presets()["tuned"]["lenet300100"])
    threads = torch.get_num_threads()
    try:  # the worker pins torch to one thread, as in its own process
        dense = bench.whole_run("lenet300100", "dense", short, str(mnist_path), str(tmp_path))
        dns = bench.whole_run("lenet300100", "dns", short, str(mnist_path), str(tmp_path))
    finally:
        torch.set_num_threads(threads)
    assert dense["steps"] == dns["steps"] == 85 == bench.steps_of(short)[0]
    assert dense["sparsity"] == 0.0 and dns["sparsity"] > 0.5
    assert dense["cpu_seconds"] > 0 and dns["cpu_seconds"] > 0


def fake_runner(calls, seconds):
    """Stands in for run_at_once: records each batch of jobs and answers with set times."""

    def run(jobs, data_dir, out):
        calls.append([(kind, s["epochs"], cpu) for _, kind, s, cpu in jobs])
        return [{"kind": kind, "cpu": cpu, "steps": 1, "cpu_seconds": seconds[kind], "wall_seconds": seconds[kind], "sparsity": 0.0, "test_error": 0.0} for _, kind, s, cpu in jobs]

    return run


def test_whole_runs_warm_up_then_alternate_and_side_by_side_swap_cpus():
    bench = load_benchmark()
    s = bench.load_presets()["tuned"]["lenet300100"]
    calls: list = []
    result = bench.measure_whole_runs("lenet300100", s, 2, "unused", runner=fake_runner(calls, {"dense": 40.0, "dns": 44.0}))
    warm = bench.short_settings(s)["epochs"]
    assert calls[:2] == [[("dns", warm, None)], [("dense", warm, None)]]  # untimed: not among the pairs
    assert [c[0][0] for c in calls[2:]] == ["dense", "dns", "dns", "dense"]
    assert result["whole_run_cpu"]["ratios"] == [pytest.approx(1.1)] * 2 and len(result["pairs"]) == 2
    calls.clear()
    bench.measure_whole_runs("lenet300100", s, 2, "unused", side_by_side=True, runner=fake_runner(calls, {"dense": 40.0, "dns": 42.0}), cpus=(3, 5))
    assert calls[2:] == [[("dense", s["epochs"], 3), ("dns", s["epochs"], 5)], [("dense", s["epochs"], 5), ("dns", s["epochs"], 3)]]


def test_whole_runs_refuse_arms_of_different_lengths_before_running():
    bench = load_benchmark()
    s = {**bench.load_presets()["tuned"]["lenet300100"], "dense_epochs": 0.3, "epochs": 0.3, "finetune_epochs": 0.3}
    dns_steps, dense_steps = bench.steps_of(s)  # ceil(281.1) * 3 = 846 against ceil(843.3) = 844
    assert dns_steps != dense_steps
    calls: list = []
    with pytest.raises(SystemExit, match="different|would train"):
        bench.measure_whole_runs("lenet300100", s, 1, "unused", runner=fake_runner(calls, {"dense": 1.0, "dns": 1.0}))
    assert calls == []


def test_pairs_estimate_is_the_geometric_mean_with_an_interval_over_pairs():
    bench = load_benchmark()
    ratios = [1.05, 1.10, 1.07, 1.04, 1.146, 1.06]
    e = bench.pairs_estimate(ratios)
    assert e["geomean"] == pytest.approx(torch.tensor(ratios, dtype=torch.float64).log().mean().exp().item())
    assert min(ratios) < e["low"] < e["geomean"] < e["high"] < max(ratios)
    assert bench.pairs_estimate(ratios) == e  # seeded: the same ratios give the same interval
    wide = bench.pairs_estimate([0.9, 1.3, 0.95, 1.25, 1.0, 1.2])
    assert wide["high"] - wide["low"] > e["high"] - e["low"]
    assert bench.pairs_estimate([1.2]) == {"geomean": pytest.approx(1.2), "low": None, "high": None}
    few = bench.pairs_estimate([0.965, 0.971, 0.964])  # too few pairs: a range, not an interval
    assert few["low"] is None and few["high"] is None and few["geomean"] == pytest.approx(0.9667, abs=1e-4)


def test_null_run_pairs_two_dense_arms():
    bench = load_benchmark()
    s = bench.load_presets()["tuned"]["lenet300100"]
    calls: list = []
    result = bench.measure_whole_runs("lenet300100", s, 2, "unused", runner=fake_runner(calls, {"dense": 40.0, "dense-b": 40.0}), null=True)
    assert {kind for batch in calls for kind, _, _ in batch} == {"dense", "dense-b"}
    assert result["null"] and result["whole_run_cpu"]["geomean"] == pytest.approx(1.0)
    assert "dns" not in result["pairs"][0]
