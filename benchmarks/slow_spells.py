"""What this VM's slow spells do to ONNX Runtime and to a torch-sparse-cpu artifact, sampled over time.

    python benchmarks/slow_spells.py settings ARTIFACT_DIR [--batch 64] [--seconds 120] [--trust-model-code]
    python benchmarks/slow_spells.py follower ARTIFACT_DIR [--batch 64] [--repeats 4] [--trust-model-code]
    python benchmarks/slow_spells.py plan ARTIFACT_DIR [--batch 1] [--seconds 150] [--trust-model-code]

``settings``: the artifact's dense model in ONNX Runtime sessions sampled in turn (100 calls each, p50 per
sample, for ``--seconds``): two threads spinning (ONNX Runtime's default), not spinning, spinning bounded to
200 us, and one thread. A spell shows as samples where the two-thread sessions slow together (the README:
BERT at batch 64 0.90 -> ~1.6 ms spinning, 1.13 -> ~1.45 not spinning, one thread 1.00 throughout).

``follower``: the interleaved comparison ``bench`` makes (20 rounds, 50 ms settle, ``--repeats`` times):
two-thread ONNX Runtime spinning and not spinning, a bounded-spinning session, and
``dense_fallback.FollowFaster`` over the artifact's dense model; the follower's ratio to the faster of the
first two, with its interval, its probes and switches.

``plan``: the artifact's planned model split over two threads and loaded with one, beside ONNX Runtime on
two threads and one (12 calls each, in turn, for ``--seconds``): which of them a spell slows.

ARTIFACT_DIR is a torch-sparse-cpu artifact folder (``dnsconvert export --target torch-sparse-cpu``).
"""

from __future__ import annotations

import argparse
import time


def p50_ms(call, n: int) -> float:
    from dnsconvert.timing import measure

    return measure(call, batch=1, warmup=2, iterations=n).p50_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("settings", "follower", "plan"))
    parser.add_argument("artifact")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 (settings, follower), 1 (plan)")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--trust-model-code", action="store_true")
    args = parser.parse_args()

    from dnsconvert.model_io import sample_feeds
    from dnsconvert.targets import get_target, load_artifact
    from dnsconvert.targets.dense_fallback import SPIN_US, follow_faster
    from dnsconvert.targets.sparse_graph import ort_session
    from dnsconvert.timing import measure_interleaved, pin_threads

    pin_threads(2)
    artifact = load_artifact(args.artifact)
    dense = artifact.read("dense")
    batch = args.batch or (1 if args.mode == "plan" else 64)
    feeds = sample_feeds(artifact.manifest.model_spec.inputs, batch=batch, seed=0)
    bounded = {"session.intra_op.spin_duration_us": str(SPIN_US)}

    if args.mode == "settings":
        sessions = {
            "spinning": ort_session(dense, 2),
            "not spinning": ort_session(dense, 2, spinning=False),
            "bounded": ort_session(dense, 2, config=bounded),
            "one thread": ort_session(dense, 1),
        }
        end = time.time() + args.seconds
        while time.time() < end:
            row = {name: p50_ms(lambda s=s: s.run(None, feeds), 100) for name, s in sessions.items()}
            print(time.strftime("%H:%M:%S"), "  ".join(f"{name} {ms:.3f}" for name, ms in row.items()), flush=True)
    elif args.mode == "follower":
        spinning, quiet, bounded_session = ort_session(dense, 2), ort_session(dense, 2, spinning=False), ort_session(dense, 2, config=bounded)
        follower = follow_faster(dense, 2)
        calls = {
            "spinning": lambda: spinning.run(None, feeds),
            "not spinning": lambda: quiet.run(None, feeds),
            "bounded": lambda: bounded_session.run(None, feeds),
            "follower": lambda: follower.run_feeds(feeds),
        }
        for _ in range(args.repeats):
            timed = measure_interleaved(calls, batch=batch, rounds=20, iterations=None, time_budget_s=0.5 * len(calls), warmup=10, settle_s=0.05)
            p50s = "  ".join(f"{name} {timed.stats(name).p50_ms:.3f}" for name in calls)
            ratio = timed.ratio(["spinning", "not spinning"], "follower").text()
            print(time.strftime("%H:%M:%S"), p50s, f"| follower vs fastest dense {ratio}; probes {follower.probes}, switches {follower.switches}", flush=True)
    else:
        target = get_target("torch-sparse-cpu")
        split = target.load(artifact, "sparse", {"threads": "2"}, trust_model_code=args.trust_model_code)
        serial = target.load(artifact, "sparse", {"threads": "1"}, trust_model_code=args.trust_model_code)
        ort2, ort1 = ort_session(dense, 2), ort_session(dense, 1)
        calls = {"ort 2 threads": lambda: ort2.run(None, feeds), "ort 1 thread": lambda: ort1.run(None, feeds), "plan split": lambda: split.run(feeds), "plan 1 thread": lambda: serial.run(feeds)}
        end = time.time() + args.seconds
        while time.time() < end:
            row = {name: p50_ms(call, 12) for name, call in calls.items()}
            print(time.strftime("%H:%M:%S"), "  ".join(f"{name} {ms:.2f}" for name, ms in row.items()), f"| split vs ort 2 threads {row['ort 2 threads'] / row['plan split']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
