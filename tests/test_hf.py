"""Local Hugging Face models (``--model hf:DIR``): tiny GPT-2 and BERT saved with save_pretrained,
offline, random weights, through prune -> validate -> project -> export -> bench and ``dnsconvert run``."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers  # a test dependency (the [test] extra): a missing one fails, never skips

from dnsconvert.hf import directory_sha256, model_files
from dnsconvert.loading import load_checkpoint

QUIET = ["--no-progress", "--checkpoint-every", "0"]

TOKEN_DATA = '''
import torch
from torch.utils.data import Dataset


class Reviews(Dataset):
    """Token ids with padding and a label: whether token 7 occurs (learnable), as dicts."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 100, (n, 16), generator=g)
        lengths = torch.randint(8, 17, (n,), generator=g)
        self.mask = (torch.arange(16) < lengths[:, None]).long()
        self.ids[self.mask == 0] = 0
        self.labels = (self.ids[:, :4] < 30).any(1).long() + (self.ids[:, 0] > 80).long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def reviews():
    return Reviews(256, 0), Reviews(64, 1)


def hidden_energy(output, target):
    """A loss for an encoder without a head (smoke test only): the mean squared hidden state."""
    return output["last_hidden_state"].pow(2).mean()
'''


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2 (one safetensors file) and a tiny BERT classifier (sharded), random weights."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0))
    gpt2.save_pretrained(root / "tiny-gpt2")
    bert = transformers.BertForSequenceClassification(
        transformers.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32, intermediate_size=64, vocab_size=100, max_position_embeddings=64, num_labels=3)
    )
    bert.save_pretrained(root / "tiny-bert", max_shard_size="20KB")
    encoder = transformers.BertModel(bert.config)
    encoder.save_pretrained(root / "tiny-bert-encoder")
    return {"gpt2": root / "tiny-gpt2", "bert": root / "tiny-bert", "encoder": root / "tiny-bert-encoder"}


@pytest.fixture
def token_data(tmp_path, monkeypatch):
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "hf_user_data.py").write_text(TOKEN_DATA)
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("hf_user_data", None)
    yield "hf_user_data"
    sys.modules.pop("hf_user_data", None)


def run_json(run_cli, *args):
    result = run_cli(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def onnx_input_dims(artifact: Path) -> dict[str, list[str | int]]:
    import onnx

    model = onnx.load(str(artifact / "model.onnx"))
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def test_saved_directories_are_what_the_test_means(hf_models):
    assert (hf_models["gpt2"] / "model.safetensors").is_file()
    assert (hf_models["bert"] / "model.safetensors.index.json").is_file() and len(model_files(hf_models["bert"])) > 4  # config, index, shards


def test_gpt2_through_every_stage(run_cli, hf_models, tmp_path):
    """Causal-LM DNS on the synthetic token stream (no --trust-model-code: no user code runs),
    validate, project 2:4, export to ort and torch-sparse-cpu with parity on the logits at
    dynamic batch and sequence, bench."""
    model = f"hf:{hf_models['gpt2']}"
    pruned = tmp_path / "gpt2.safetensors"
    summary = run_json(
        run_cli, "prune", "--model", model, "--task", "causal-lm", "--data", "synthetic", "--epochs", "0.25", "--batch-size", "16",
        "--target-sparsity", "0.5", "--lr", "0.001", "--optimizer", "adam", *QUIET, "-o", pruned,
    )  # fmt: skip
    assert summary["task"] == "causal-lm" and summary["steps"] == 16 and 0 <= summary["test_accuracy"] <= 1
    ckpt = load_checkpoint(pruned)
    assert ckpt.model.factory == "dnsconvert.hf:pretrained" and [i.name for i in ckpt.model.inputs] == ["input_ids", "attention_mask"]
    assert all(i.keyword and i.dtype == "int64" for i in ckpt.model.inputs)
    conv1d = {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert set(ckpt.masks) == conv1d  # transformers' Conv1D layers: the tied wte/lm_head and wpe are no layers to prune
    assert all(0.3 < 1 - float(m.float().mean()) < 0.7 for m in ckpt.masks.values())
    wte = ckpt.weights["transformer.wte.weight"]  # trained, not pruned, still shared with lm_head
    assert bool((wte != 0).all()) and torch.equal(wte, ckpt.weights["lm_head.weight"])
    assert run_cli("validate", pruned, "--min-sparsity", "0.4").exit_code == 0
    projected = tmp_path / "gpt2-2to4.safetensors"
    assert run_cli("project", pruned, "--nm", "2:4", "-o", projected).exit_code == 0
    assert run_cli("validate", projected, "--require-nm", "2:4").exit_code == 0
    for target in ("ort", "torch-sparse-cpu"):
        out = tmp_path / f"gpt2-{target}"
        result = run_cli("export", projected, "--target", target, "-o", out)
        assert result.exit_code == 0, result.output
        manifest = json.loads((out / "manifest.json").read_text())
        parity = manifest["parity"]
        assert parity["passed"] and [o["name"] for o in parity["outputs"]] == ["logits"]
        assert parity["batches"][0] == 1 and parity["batches"][1] > 1 and len(parity["batches"]) == 3  # + a feed at the minimum sequence length
    graph_2_4 = json.loads((tmp_path / "gpt2-ort" / "manifest.json").read_text())["graph_2_4"]
    checked = {r["initializer"]: r for r in graph_2_4 if r["initializer"] in conv1d}
    assert set(checked) == conv1d and all(r["compliant"] and r["reduction_axis"] == 0 for r in checked.values())  # Conv1D's [in, out]: axis 0
    dims = onnx_input_dims(tmp_path / "gpt2-ort")
    assert set(dims) == {"input_ids", "attention_mask"} and all(isinstance(d, str) for d in dims["input_ids"])  # dynamic batch and sequence
    report = run_json(run_cli, "bench", tmp_path / "gpt2-ort", "--batch", "1", "--batch", "2", "--warmup", "1", "--iterations", "3")
    assert {row["batch"] for row in report["speedups"]} == {1, 2}


def test_sharded_bert_classifier_on_user_data(run_cli, hf_models, tmp_path, token_data):
    """A sharded BertForSequenceClassification, classification on the user's padded token data."""
    model = f"hf:{hf_models['bert']}"
    pruned = tmp_path / "bert.safetensors"
    args = ["prune", "--model", model, "--data", "hf_user_data:reviews", "--epochs", "1", "--batch-size", "32", "--target-sparsity", "0.5", *QUIET, "-o", pruned]
    refused = run_cli(*args)
    assert refused.exit_code == 2 and "--trust-model-code" in refused.stderr  # the data code, not the model, needs it
    summary = run_json(run_cli, *args, "--trust-model-code")
    assert summary["data"] == "user:hf_user_data:reviews" and summary["task"] == "classification" and summary["test_accuracy"] is not None
    ckpt = load_checkpoint(pruned)
    assert "bert.embeddings.word_embeddings.weight" not in ckpt.masks and "classifier.weight" in ckpt.masks
    for target in ("ort", "torch-sparse-cpu"):
        result = run_cli("export", pruned, "--target", target, "-o", tmp_path / f"bert-{target}")
        assert result.exit_code == 0, result.output
        parity = json.loads((tmp_path / f"bert-{target}" / "manifest.json").read_text())["parity"]
        assert parity["passed"] and [o["name"] for o in parity["outputs"]] == ["logits"]
    report = run_json(run_cli, "bench", tmp_path / "bert-torch-sparse-cpu", "--batch", "1", "--batch", "4", "--warmup", "1", "--iterations", "3")
    assert {row["batch"] for row in report["speedups"]} == {1, 4}


def test_encoder_with_two_outputs_and_a_user_loss(run_cli, hf_models, tmp_path, token_data):
    """A BertModel (no head) returns last_hidden_state and pooler_output: a user loss trains it,
    and both outputs are exported and checked."""
    pruned = tmp_path / "encoder.safetensors"
    summary = run_json(
        run_cli, "prune", "--model", f"hf:{hf_models['encoder']}", "--data", "synthetic", "--loss", "hf_user_data:hidden_energy",
        "--trust-model-code", "--epochs", "0.125", "--batch-size", "16", "--target-sparsity", "0.5", *QUIET, "-o", pruned,
    )  # fmt: skip
    assert summary["task"] == "hf_user_data:hidden_energy" and summary["test_accuracy"] is None
    for target in ("ort", "torch-sparse-cpu"):
        result = run_cli("export", pruned, "--target", target, "-o", tmp_path / f"encoder-{target}")
        assert result.exit_code == 0, result.output
        parity = json.loads((tmp_path / f"encoder-{target}" / "manifest.json").read_text())["parity"]
        assert parity["passed"] and [o["name"] for o in parity["outputs"]] == ["last_hidden_state", "pooler_output"]


def test_model_directory_is_a_checkpoint(run_cli, hf_models):
    report = run_json(run_cli, "validate", hf_models["bert"])
    assert report["sha256"] == directory_sha256(hf_models["bert"])
    ckpt = load_checkpoint(hf_models["gpt2"])
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_models["gpt2"])
    assert torch.equal(ckpt.weights["transformer.h.0.attn.c_attn.weight"], model.transformer.h[0].attn.c_attn.weight)
    assert ckpt.model.kwargs == {"path": str(hf_models["gpt2"].resolve())}


def test_custom_inputs_are_passed_by_keyword(hf_models):
    from dnsconvert.models import resolve_spec
    from dnsconvert.modelspec import InputSpec

    spec = resolve_spec(f"hf:{hf_models['bert']}", inputs=[InputSpec.parse("input_ids:batch=1..2..8,seq=4..8..16:int64:0..100")])
    assert [(i.name, i.keyword) for i in spec.inputs] == [("input_ids", True)]
    spec = resolve_spec(f"hf:{hf_models['gpt2']}")
    assert spec.inputs[0].high == 100 and spec.inputs[0].shape[1].max == 64 and (spec.inputs[1].low, spec.inputs[1].high) == (1, 2)


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing", "is not a directory"),
        ("pickle-only", "pickles, which dnsconvert never loads"),
        ("foreign-architecture", "not a model class of transformers"),
        ("remote-code", "transformers cannot load this model"),
        ("no-vocab", "has no vocab_size"),
        ("oversized", "over the limit"),
    ],
)
def test_directories_dnsconvert_will_not_load(run_cli, hf_models, tmp_path, setup, message):
    folder = tmp_path / "model"
    if setup != "missing":
        shutil.copytree(hf_models["gpt2"], folder)
        config = json.loads((folder / "config.json").read_text())
        if setup == "pickle-only":
            (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
        elif setup == "foreign-architecture":
            config["architectures"] = ["AutoConfig"]  # in transformers, but not a model class
        elif setup == "remote-code":
            config.update(model_type="evil", auto_map={"AutoModel": "evil.EvilModel"}, architectures=["EvilModel"])
            (folder / "evil.py").write_text(f"import pathlib\npathlib.Path({str(tmp_path / 'MARKER')!r}).write_text('ran')\n")
        elif setup == "no-vocab":
            del config["vocab_size"]
        elif setup == "oversized":  # ~50B parameters declared beside 140 kB of weights: refused on the meta device
            config.update(n_embd=8192, n_head=64, n_layer=64)
        (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out.safetensors"
    for args in (["prune", "--model", f"hf:{folder}", "--data", "synthetic", *QUIET, "-o", out], ["validate", folder]):
        if setup == "missing" and args[0] == "validate":
            continue
        if setup == "no-vocab" and args[0] == "validate":
            continue  # as a checkpoint it loads; only the default inputs need the vocabulary
        result = run_cli(*args, "--trust-model-code")
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "MARKER").exists()


PIPELINE = """
[pipeline]
workdir = "out"

[prune]
model = "hf:models/tiny-gpt2"
task = "causal-lm"
data = "synthetic"
epochs = 0.1
batch_size = 16
target_sparsity = 0.5
checkpoint_every = 0

[validate]
min_sparsity = 0.3

[export]
targets = ["ort", "torch-sparse-cpu"]

[bench]
batches = [1, 2]
warmup = 1
iterations = 3
"""


def test_pipeline_runs_a_local_hf_model_end_to_end(run_cli, hf_models, tmp_path):
    """hf: folders in a pipeline are relative to the file; their files key the prune step."""
    shutil.copytree(hf_models["gpt2"], tmp_path / "models" / "tiny-gpt2")
    path = tmp_path / "pipeline.toml"
    path.write_text(PIPELINE)
    report = run_json(run_cli, "run", path)
    stages = {s["name"]: s for s in report["stages"]}
    assert {name: s["status"] for name, s in stages.items()} == {
        name: "ran" for name in ("prune", "validate", "export:ort", "export:torch-sparse-cpu", "bench:ort", "bench:torch-sparse-cpu")
    }
    for target in ("ort", "torch-sparse-cpu"):
        assert stages[f"export:{target}"]["result"]["parity"]["passed"]
    again = run_json(run_cli, "run", path)
    assert {s["status"] for s in again["stages"]} == {"skipped"}
    # new weights in the model folder: the prune step (and what follows it) runs again
    torch.manual_seed(1)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "models" / "tiny-gpt2")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(2)
    model.save_pretrained(tmp_path / "models" / "tiny-gpt2")
    path.write_text(PIPELINE.split("[export]")[0])
    third = run_json(run_cli, "run", path)
    assert {s["name"]: s["status"] for s in third["stages"]} == {"prune": "ran", "validate": "ran"}
