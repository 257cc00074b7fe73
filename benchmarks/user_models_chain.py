"""The whole chain on your own models and on local Hugging Face folders: one model x stage table.

    python benchmarks/user_models_chain.py [--threads 2] [--json FILE]

Models (random weights, offline): the tests' two-input model (float features + int64 tokens,
a dict of two outputs) on its own dict data; a tiny GPT-2 (``hf:``, one safetensors file,
transformers' Conv1D, tied lm_head) with causal-LM DNS on the synthetic token stream; a tiny
BERT classifier (``hf:``, sharded) with classification DNS on synthetic tokens; a headless
BERT encoder (two outputs) with a user loss. Each: DNS through the library for a few steps
(target sparsity 0.5), validate, project 2:4 and validate it (``--require-nm 2:4``), export
the projected checkpoint to ``ort`` and ``torch-sparse-cpu`` (parity max |Δ| per output), bench
both artifacts at batch 1 and 4 (p50 dense/sparse, 20 iterations). The tiny models say
nothing about speed; the bench column only shows that the stage runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def save_hf_models(root: Path) -> dict[str, Path]:
    import transformers

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0))
    gpt2.save_pretrained(root / "tiny-gpt2")
    config = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64, vocab_size=100, max_position_embeddings=64, num_labels=3)
    transformers.BertForSequenceClassification(config).save_pretrained(root / "tiny-bert", max_shard_size="20KB")
    transformers.BertModel(config).save_pretrained(root / "tiny-bert-encoder")
    return {"gpt2": root / "tiny-gpt2", "bert": root / "tiny-bert", "encoder": root / "tiny-bert-encoder"}


def chain(name: str, options, work: Path) -> dict:
    from dnsconvert import build_artifact, project_nm
    from dnsconvert.bench import bench
    from dnsconvert.surgery import prune
    from dnsconvert.validate import validate

    row: dict = {"model": name}
    result = prune(options.to_config(), output=work / f"{name}.safetensors", progress=False, trust_model_code=True)
    row["prune"] = {"task": result.task, "steps": result.steps, "sparsity": round(result.sparsity, 4), "test_accuracy": result.test_accuracy, "test_loss": round(result.test_loss, 4)}
    row["masked"] = sorted(result.checkpoint.masks)
    row["validate"] = validate(result.checkpoint).passed
    projected = project_nm(result.checkpoint, "2:4").checkpoint
    row["project_2to4_valid"] = validate(projected, require_nm="2:4").passed
    for target in ("ort", "torch-sparse-cpu"):
        artifact = build_artifact(projected, work / f"{name}-{target}", target=target, trust_model_code=True)
        parity = artifact.manifest.parity
        row[f"export:{target}"] = {"passed": parity.passed, "batches": list(parity.batches), "max_abs": {o.name: o.max_abs for o in parity.outputs}}
        report = bench(artifact.root, batches=(1, 4), warmup=3, iterations=20, trust_model_code=True)
        row[f"bench:{target}"] = [{"batch": s["batch"], "dense_p50_ms": round(s["dense_p50_ms"], 4), "sparse_p50_ms": round(s["sparse_p50_ms"], 4)} for s in report.speedups()]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from dnsconvert.options import PruneOptions

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "code").mkdir()
        shutil.copy(ROOT / "tests" / "user_code.py", tmp / "code" / "usermods.py")
        (tmp / "code" / "chain_losses.py").write_text("def hidden_energy(output, target):\n    return output['last_hidden_state'].pow(2).mean()\n")
        sys.path.insert(0, str(tmp / "code"))
        models = save_hf_models(tmp)
        common = dict(target_sparsity=0.5, checkpoint_every=0, batch_size=16, epochs=0.25)
        plans = {
            "user two-input (dict out)": PruneOptions(
                model="usermods:two_input_net", inputs=("features:batch=1..4..64,12", "tokens:batch=1..4..64,5:int64:0..20"),
                data="usermods:pair_data", **{**common, "batch_size": 64, "epochs": 1.0}, optimizer="adam", lr=0.01,
            ),
            "hf GPT-2 (causal-lm)": PruneOptions(model=f"hf:{models['gpt2']}", task="causal-lm", data="synthetic", optimizer="adam", lr=0.001, **common),
            "hf BERT classifier (sharded)": PruneOptions(model=f"hf:{models['bert']}", data="synthetic", **common),
            "hf BERT encoder (user loss)": PruneOptions(model=f"hf:{models['encoder']}", data="synthetic", loss="chain_losses:hidden_energy", **common),
        }  # fmt: skip
        for name, options in plans.items():
            try:
                rows.append(chain(name, options, tmp))
            except Exception as exc:  # a stage that fails is a row of the table, not the end of the run
                rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
