"""The model x stage table of real architectures (what tests/test_model_matrix.py checks), with
its figures: sparsity after a few DNS steps, 2:4 layers projected, parity per output for the
``ort`` and ``torch-sparse-cpu`` artifacts.

    python benchmarks/model_matrix.py [--json out.json]

Random weights from transformers configs (needs ``pip install transformers``); one seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from test_model_matrix import MODELS, dns_checkpoint

    from dnsconvert.loading import load_checkpoint
    from dnsconvert.project import project_nm
    from dnsconvert.targets import build_artifact
    from dnsconvert.validate import validate

    rows = []
    print("| model | inputs | masked layers | sparsity | 2:4 projected / skipped | target | parity max abs per output |")
    print("|---|---|---|---|---|---|---|")
    for name in MODELS:
        ckpt = dns_checkpoint(name)
        report = validate(ckpt, trust_model_code=True)
        projection = project_nm(ckpt, "2:4", trust_model_code=True)
        done = sum(1 for layer in projection.layers if layer.skipped_reason is None)
        with tempfile.TemporaryDirectory() as tmp:
            projection.checkpoint.save(Path(tmp) / "p.safetensors")
            source = load_checkpoint(Path(tmp) / "p.safetensors")
            for target, options in (("ort", {}), ("torch-sparse-cpu", {"plan": "sparsity", "min_sparsity": "0.4"})):
                artifact = build_artifact(source, Path(tmp) / target, target=target, options=options, atol=1e-3, rtol=1e-3, trust_model_code=True)
                parity = artifact.manifest.parity
                outputs = ", ".join(f"{o.name} {o.max_abs:.1e}" for o in parity.outputs)
                row = {
                    "model": name, "inputs": [str(i) for i in ckpt.model.inputs], "masked": len(ckpt.masks), "sparsity": report.sparsity,
                    "projected": done, "skipped": len(projection.layers) - done, "target": target, "parity": parity.to_json(),
                }  # fmt: skip
                rows.append(row)
                print(f"| {name} | {len(ckpt.model.inputs)} | {len(ckpt.masks)} | {report.sparsity:.1%} | {done} / {row['skipped']} | {target} | {outputs} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
