"""How long a spinning ONNX Runtime session slows the torch-sparse-cpu runner that follows it.

    python benchmarks/ort_spin_interference.py ARTIFACT_DIR [--threads 2] [--calls 12] [--trust-model-code]

ARTIFACT_DIR is a torch-sparse-cpu artifact (``dnsconvert export ... --target torch-sparse-cpu``; the
README's ResNet-18 ERK figures: ``benchmarks/cpu_sparse.py --only resnet18 --workdir DIR`` keeps it in
DIR/resnet18). For each gap: one call of the artifact's dense model in ONNX Runtime with spinning on
(its default), a sleep of the gap, then two calls of the sparse runner, timed; ``--calls`` times,
medians printed. With ONNX Runtime's idle worker still spinning, the runner's kernels split over the
threads share a core with it. Why bench settles each block (``bench.BLOCK_SETTLE_S``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=12)
    parser.add_argument("--trust-model-code", action="store_true")
    args = parser.parse_args()
    from dnsconvert.errors import UserError
    from dnsconvert.model_io import sample_feeds
    from dnsconvert.targets import get_target, load_artifact
    from dnsconvert.timing import pin_threads

    pin_threads(args.threads)
    try:  # a missing folder, another target's artifact, model code not trusted: one line
        artifact = load_artifact(args.artifact)
        if artifact.manifest.target != "torch-sparse-cpu":
            parser.error(f"{args.artifact} is a {artifact.manifest.target} artifact; this script times a torch-sparse-cpu one")
        target = get_target(artifact.manifest.target)
        options = {"threads": str(args.threads)}
        sparse = target.load(artifact, "sparse", options, trust_model_code=args.trust_model_code)
        dense = target.load(artifact, "dense", options, trust_model_code=args.trust_model_code)
    except UserError as error:
        parser.error(str(error))
    feeds = sample_feeds(artifact.manifest.model_spec.inputs, batch=1, seed=0)
    for _ in range(5):
        sparse.run(feeds)
        dense.run(feeds)
    for gap_ms in (0, 1, 3, 10, 30, 100):
        first, second = [], []
        for _ in range(args.calls):
            dense.run(feeds)
            time.sleep(gap_ms / 1e3)
            a = time.perf_counter()
            sparse.run(feeds)
            b = time.perf_counter()
            sparse.run(feeds)
            first.append(b - a)
            second.append(time.perf_counter() - b)
        print(f"gap {gap_ms:3d} ms after a spinning ONNX Runtime call: sparse call 1 {np.median(first) * 1e3:.2f} ms, call 2 {np.median(second) * 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
