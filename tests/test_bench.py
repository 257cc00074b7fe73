import json

import numpy as np
import pytest

from helpers import FIXTURES
from dnsconvert.bench import BenchReport, BenchRow, bench, measure, percentile


class FakeClock:
    """A clock that advances only when the runner 'runs': known, exact delays."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_stats_are_exact_on_known_delays():
    clock = FakeClock()
    delays = iter([5.0] * 3 + [float(ms) for ms in range(1, 101)])  # 3 warm-up calls, then 1..100 ms

    def run():
        clock.now += next(delays) / 1000.0

    stats = measure(run, batch=8, warmup=3, iterations=100, clock=clock)
    assert stats.iterations == 100 and stats.warmup == 3
    assert stats.mean_ms == pytest.approx(50.5)
    assert stats.p50_ms == pytest.approx(np.percentile(np.arange(1, 101), 50))
    assert stats.p90_ms == pytest.approx(np.percentile(np.arange(1, 101), 90))
    assert stats.p99_ms == pytest.approx(np.percentile(np.arange(1, 101), 99))
    assert (stats.min_ms, stats.max_ms) == pytest.approx((1.0, 100.0))
    assert stats.throughput == pytest.approx(8 / 0.0505)


def test_time_budget_and_synchronize():
    clock = FakeClock()
    synced = []

    def run():
        clock.now += 0.01

    stats = measure(run, batch=1, warmup=2, iterations=None, time_budget_s=0.1, clock=clock, synchronize=lambda: synced.append(clock.now))
    assert 9 <= stats.iterations <= 11
    assert len(synced) == stats.iterations + 1  # once after warm-up, once per timed call


def test_percentile_matches_numpy():
    values = sorted(np.random.default_rng(0).random(37).tolist())
    for q in (0, 13, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_speedups_pair_dense_and_sparse():
    from dnsconvert.bench.timing import LatencyStats

    def stats(batch, p50):
        return LatencyStats(batch, 0, 1, p50, p50, p50, p50, p50, p50, batch / p50)

    report = BenchReport("m", [BenchRow("t", "dense", stats(1, 4.0)), BenchRow("t", "sparse", stats(1, 1.0))])
    assert report.speedups() == [{"target": "t", "batch": 1, "dense_p50_ms": 4.0, "sparse_p50_ms": 1.0, "speedup": 4.0}]


def test_bench_cli_json_and_plot(run_cli, tmp_path):
    plot = tmp_path / "b.png"
    result = run_cli("bench", FIXTURES / "tiny_mlp_unstructured.safetensors", "--target", "ort", "--batch", "1", "--batch", "4", "--iterations", "5", "--warmup", "1", "--json", "--plot", plot)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {(r["variant"], r["batch"]) for r in data["rows"]} == {("dense", 1), ("dense", 4), ("sparse", 1), ("sparse", 4)}
    assert "densifies" in data["exploits_sparsity"]["ort"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    result = run_cli("bench", FIXTURES / "tiny_mlp_unstructured.safetensors", "--iterations", "5", "--batch", "1", "--min-speedup", "1000")
    assert result.exit_code == 1 and "below --min-speedup" in result.stderr


def test_bench_artifact_folder(tmp_path):
    from dnsconvert.loading import load_checkpoint
    from dnsconvert.targets import build_artifact

    artifact = build_artifact(load_checkpoint(FIXTURES / "tiny_mlp_unstructured.safetensors"), tmp_path / "m", target="ort")
    report = bench(artifact.root, batches=(2,), warmup=1, iterations=3)
    assert len(report.rows) == 2 and report.speedups()[0]["batch"] == 2


def test_device_runners_upload_once(tmp_path):
    from dnsconvert.targets import Artifact, Target, register_target, unregister_target

    calls = {"prepare": 0, "run_device": 0, "run": 0}

    class DeviceRunner:
        def prepare(self, x):
            calls["prepare"] += 1
            return x

        def run_device(self, handle):
            calls["run_device"] += 1

        def run(self, x):
            calls["run"] += 1

        def synchronize(self):
            pass

        def close(self):
            pass

    class DeviceTarget(Target):
        name = "device-double"

        def load(self, artifact, variant="sparse", options=None, *, trust_model_code=False):
            return DeviceRunner()

    register_target("device-double", DeviceTarget)
    try:
        from dnsconvert.artifact import Manifest, SourceRecord
        from dnsconvert.bench import BenchReport, bench_artifact
        from dnsconvert.modelspec import ModelSpec

        manifest = Manifest(target="device-double", format="test", files={}, model=ModelSpec("x:y", {}, (1, 4)).to_json(), source=SourceRecord())
        artifact = Artifact(tmp_path, manifest)

        report = BenchReport("m")
        bench_artifact(artifact, batches=(1, 8), warmup=2, iterations=5, time_budget_s=None, threads=0, report=report)
    finally:
        unregister_target("device-double")
    assert calls == {"prepare": 4, "run_device": 4 * 7, "run": 0}
