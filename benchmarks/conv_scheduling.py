"""What feeding and chunking do to the torch-sparse-cpu convolutions, same process, alternating rounds.

    python benchmarks/conv_scheduling.py ARTIFACT_DIR [--threads 2] [--rounds 10] [--trust-model-code]
    python benchmarks/conv_scheduling.py ARTIFACT_DIR --steps [--trust-model-code]
    python benchmarks/conv_scheduling.py --core-speed 60

ARTIFACT_DIR is a torch-sparse-cpu artifact whose batch-1 plan runs convolution kernels (the README's
ResNet-18 ERK: ``benchmarks/cpu_sparse.py --only resnet18 --workdir DIR`` keeps it in DIR/resnet18).
The artifact is loaded three times and run as built (each convolution kernel writes its output into
the next one's input buffer, ``SparseConv2d.feeds``; two output-channel chunks per thread handed out
one at a time, ``sparse_conv.CHUNKS_PER_THREAD``), with the feeds unlinked (every convolution copies
its own input on one thread first), and with one fixed chunk per thread; then ONNX Runtime dense.
Each round times every variant's p50 over ``--calls`` calls after 60 ms of rest; printed per round
(this VM's slow spells show as rounds where all of them move) with the median of the per-round ratios.

``--steps``: where a whole call's time goes instead: each step of the batch-1 plan (as built) timed inside
whole calls (p50 over ``--calls`` calls, three times), beside the whole call and ONNX Runtime dense.

``--core-speed S``: for S seconds, a fixed L1-resident loop (~1.3 ms) timed on CPU 0, then on CPU 1,
four times a second: whether one core at times runs slower than the other (what a fixed split waits for).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def core_speed(seconds: float) -> None:
    from numba import njit

    @njit(fastmath=True)
    def work(a, b, reps):
        for _ in range(reps):
            for i in range(a.shape[0]):
                b[i] = b[i] * np.float32(0.999) + a[i]
        return b[0]

    cpus = sorted(os.sched_getaffinity(0))[:2]
    if len(cpus) < 2:
        raise SystemExit("--core-speed needs two CPUs")
    a, b = np.ones(4096, np.float32), np.zeros(4096, np.float32)
    work(a, b, 10)
    rows, end = [], time.time() + seconds
    while time.time() < end:
        row = []
        for cpu in cpus:
            os.sched_setaffinity(0, {cpu})
            work(a, b, 500)  # on the new core, past any wake-up
            start = time.perf_counter()
            work(a, b, 6000)
            row.append((time.perf_counter() - start) * 1e3)
        rows.append(row)
        time.sleep(0.2)
    os.sched_setaffinity(0, set(cpus))
    r = np.array(rows)
    medians = np.median(r, axis=0)
    print(f"{len(r)} samples; CPU {cpus[0]} p10/p50/p90 {np.percentile(r[:, 0], [10, 50, 90]).round(2).tolist()} ms, CPU {cpus[1]} {np.percentile(r[:, 1], [10, 50, 90]).round(2).tolist()} ms")
    slow = (r > 1.3 * medians).any(axis=1)
    lopsided = slow & ~(r > 1.3 * medians).all(axis=1)
    print(f"samples with a core over 1.3x its median: {slow.mean():.1%} (only one of the two cores: {lopsided.mean():.1%}); e.g. {r[slow][:8].round(2).tolist()}")


def call_p50(runner, feeds, calls: int) -> float:
    """p50 (ms) of ``calls`` whole calls, after three untimed ones and 60 ms of rest (ONNX
    Runtime's spinning worker, and any other, at rest)."""
    for _ in range(3):
        runner.run(feeds)
    time.sleep(0.06)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        runner.run(feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def profile_steps(runner, dense, steps, feeds, calls: int) -> None:
    """Each step's p50 inside whole calls (its inputs and buffers as cold as in the model)."""
    from dnsconvert.targets.sparse_graph import ConvStep

    for _ in range(5):
        runner.run(feeds)
    for rep in range(3):
        took = np.zeros((calls, len(steps)))
        for call in range(calls):
            env = dict(feeds)
            for i, step in enumerate(steps):
                start = time.perf_counter()
                step(env)
                took[call, i] = time.perf_counter() - start
        per_step = np.median(took, axis=0) * 1e3
        sparse_ms, dense_ms = call_p50(runner, feeds, calls), call_p50(dense, feeds, calls)
        print(f"{rep + 1}: whole call {sparse_ms:.2f} ms, sum of the steps {per_step.sum():.2f} ms, onnxruntime dense {dense_ms:.2f} ms ({dense_ms / sparse_ms:.2f}x)")
    for step, ms in zip(steps, per_step):
        what = type(step).__name__
        if isinstance(step, ConvStep):
            conv = step.conv
            density = conv.nnz / (conv.out_channels * conv.in_channels * conv.kh * conv.kw)
            what += f" {conv.out_channels}x{conv.in_channels}x{conv.kh}x{conv.kw}/{conv.stride} density {density:.2f} threads {conv.parts}{' feeds the next' if conv.feeds is not None else ''}"
        print(f"  {ms:6.3f} ms  {what}  {list(step.names)[:3]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", nargs="?")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=25)
    parser.add_argument("--trust-model-code", action="store_true")
    parser.add_argument("--core-speed", type=float, default=0.0, metavar="S")
    parser.add_argument("--steps", action="store_true", help="time each step of the plan inside whole calls")
    args = parser.parse_args()
    if args.core_speed:
        core_speed(args.core_speed)
        return
    if not args.artifact:
        parser.error("give an artifact folder, or --core-speed S")
    from dnsconvert.errors import UserError
    from dnsconvert.model_io import sample_feeds
    from dnsconvert.targets import get_target, load_artifact
    from dnsconvert.targets.sparse_graph import ConvStep
    from dnsconvert.timing import pin_threads

    pin_threads(args.threads)
    try:
        artifact = load_artifact(args.artifact)
        if artifact.manifest.target != "torch-sparse-cpu":
            parser.error(f"{args.artifact} is a {artifact.manifest.target} artifact; this script times a torch-sparse-cpu one")
        target = get_target(artifact.manifest.target)
        options = {"threads": str(args.threads)}
        variants = {name: target.load(artifact, "sparse", options, trust_model_code=args.trust_model_code) for name in ("as built", "not fed", "one chunk per thread")}
        dense = target.load(artifact, "dense", options, trust_model_code=args.trust_model_code)
    except UserError as error:
        parser.error(str(error))
    feeds = sample_feeds(artifact.manifest.model_spec.inputs, batch=1, seed=0)
    steps = {name: getattr(runner.runners.get("small"), "steps", []) for name, runner in variants.items()}
    convs = {name: [step.conv for step in s if isinstance(step, ConvStep)] for name, s in steps.items()}
    if not convs["as built"]:
        parser.error(f"{args.artifact}: its batch-1 plan runs no convolution kernel")
    for conv in convs["not fed"]:
        conv.feeds = None
    for conv in convs["one chunk per thread"]:
        if conv.parts > 1:
            conv.chunk_bounds, conv._geometry, conv._filled_from = conv.bounds, {}, None  # the accumulators are sized per chunk
    print(f"{len(convs['as built'])} convolution kernels, {sum(c.feeds is not None for c in convs['as built'])} feeding the next, {sum(c.parts > 1 for c in convs['as built'])} split")
    if args.steps:
        profile_steps(variants["as built"], dense, steps["as built"], feeds, args.calls)
        return
    outputs = [runner.run(feeds)[0] for runner in variants.values()]
    print("largest difference between the variants' outputs:", max(float(np.abs(o - outputs[0]).max()) for o in outputs))
    runs = {**variants, "onnxruntime dense": dense}

    table = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name, runner in runs.items():
            table[name].append(call_p50(runner, feeds, args.calls))
        print(f"round {round_ + 1}: " + ", ".join(f"{name} {values[-1]:.2f} ms" for name, values in table.items()), flush=True)
    built = np.array(table["as built"])
    for name in ("not fed", "one chunk per thread", "onnxruntime dense"):
        ratio = np.array(table[name]) / built
        print(f"{name} / as built, per round: {ratio.round(3).tolist()}; median {np.median(ratio):.3f}")


if __name__ == "__main__":
    main()
