"""Variants of a torch-sparse-cpu artifact's batch-1 plan, timed in the same process against ONNX Runtime dense.

    python benchmarks/plan_candidates.py ARTIFACT_DIR [--repeats 3] [--spin]

From the plan's own per-layer timings: the per-layer plan (every layer whose kernel was faster than
dense alone) and the plans of only the layers ``CLEAR_WIN`` times faster (1.1, 1.15, 1.3), each run as
the runner builds it (two threads, ONNX Runtime segments not spinning), beside the artifact's dense
model in ONNX Runtime (two threads, spinning: its default); interleaved rounds, p50 ms, ``--repeats``
times. ``--spin``: the per-layer plan also with its ONNX Runtime segments spinning for a bounded
time after each call (10 and 40 us; ``session.intra_op.spin_duration_us``, ONNX Runtime >= 1.26).
The README's ResNet-18 ERK figures for the clear-wins candidates and for spinning segments come from
here (``benchmarks/cpu_sparse.py --only resnet18 --workdir DIR`` keeps the artifact in DIR/resnet18).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--spin", action="store_true", help="also the per-layer plan with briefly spinning segments")
    args = parser.parse_args()
    import onnx

    from dnsconvert.model_io import sample_feeds
    from dnsconvert.targets import load_artifact, sparse_graph
    from dnsconvert.timing import measure_interleaved, pin_threads

    pin_threads(2)
    manifest = json.loads((args.artifact / "manifest.json").read_text())
    plan = manifest["details"]["plan"]
    decision = plan["regimes"]["small"]
    timings = decision["timings_ms"]
    graph = sparse_graph.load_graph(onnx.load(str(args.artifact / "model.onnx")))
    ops = sparse_graph.find_sparse_ops(graph, list(plan["ops"]))
    per_layer = {name: min((k for k in t if k != "dense"), key=t.get) for name, t in timings.items()}
    per_layer = {name: k for name, k in per_layer.items() if timings[name][k] < timings[name]["dense"]}
    variants = {"per-layer": (per_layer, None)}
    for margin in (1.1, 1.15, 1.3):
        variants[f"clear {margin}x"] = ({n: k for n, k in per_layer.items() if timings[n]["dense"] >= margin * timings[n][k]}, None)
    if args.spin:
        for us in (10, 40):
            variants[f"per-layer, segments spin {us} us"] = (per_layer, {"session.intra_op.spin_duration_us": str(us)})
    runners = {}
    original = sparse_graph.ort_session
    try:
        for label, (chosen, config) in variants.items():
            # build_steps makes its segments' sessions through this module-level function
            sparse_graph.ort_session = functools.partial(original, config=config) if config else original
            steps = sparse_graph.build_steps(graph, ops, chosen, 2, spinning=config is not None)
            runners[label] = sparse_graph.GraphRunner(graph, steps, "planned")
            print(f"{label}: {len(chosen)} layers sparse")
    finally:
        sparse_graph.ort_session = original
    dense = original((args.artifact / "model.dense.onnx").read_bytes(), 2)
    feeds = sample_feeds(load_artifact(args.artifact).manifest.model_spec.inputs, batch=1, seed=0)
    calls = {label: (lambda r=r: r.run_feeds(feeds)) for label, r in runners.items()}
    calls["onnxruntime dense"] = lambda: dense.run(None, feeds)
    for _ in range(args.repeats):
        timed = measure_interleaved(calls, batch=1, rounds=8, iterations=None, time_budget_s=3.0, warmup=3, settle_s=0.05)
        print("  ".join(f"{label} {timed.stats(label).p50_ms:.2f}" for label in calls), flush=True)


if __name__ == "__main__":
    main()
