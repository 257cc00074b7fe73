"""Your own model, data and loss: prune -> validate -> export -> bench, by CLI, API and pipeline."""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dnsconvert.data import MNIST_MEAN, MNIST_STD, SYNTHETIC_MEAN, SYNTHETIC_STD, ImageDataset, load_mnist, synthetic_digits
from dnsconvert.errors import DataError
from dnsconvert.loading import load_checkpoint
from dnsconvert.modelspec import InputSpec
from dnsconvert.userdata import CausalLM, Classification, UserLoss, split_batch

ROOT = Path(__file__).resolve().parent.parent
USER_CODE = Path(__file__).with_name("user_code.py")
TWO_INPUTS = ["--input", "features:batch=1..4..64,12", "--input", "tokens:batch=1..4..64,5:int64:0..20"]
QUIET = ["--no-progress", "--checkpoint-every", "0"]


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    """tests/user_code.py as the user's module ``usermods``, importable from a folder outside dnsconvert."""
    folder = tmp_path / "usercode"
    folder.mkdir()
    shutil.copy(USER_CODE, folder / "usermods.py")
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("usermods", None)
    yield folder
    sys.modules.pop("usermods", None)


def prune_json(run_cli, *args):
    result = run_cli("prune", *args, *QUIET, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# -- the user's data, through the CLI -----------------------------------------------------------
def test_two_input_model_with_dict_outputs_on_user_dicts(run_cli, tmp_path, user_code):
    """Positional float + int64 inputs, a dict of two outputs, a DataLoader of dict examples:
    prune (classification on 'logits'), then export to ort and torch-sparse-cpu with parity on
    both outputs and dynamic batch, and bench."""
    from dnsconvert import build_artifact
    from dnsconvert.bench import bench

    out = tmp_path / "two.safetensors"
    summary = prune_json(
        run_cli, "--model", "usermods:two_input_net", *TWO_INPUTS, "--data", "usermods:pair_data", "--trust-model-code",
        "--epochs", "4", "--batch-size", "64", "--optimizer", "adam", "--lr", "0.01", "--target-sparsity", "0.5", "-o", out,
    )  # fmt: skip
    assert summary["data"] == "user:usermods:pair_data" and summary["task"] == "classification"
    assert summary["steps"] == 64  # 1024 examples / --batch-size 64 (not the loader's 32) x 4 epochs
    assert summary["test_accuracy"] > 0.65  # majority class 0.5; learnable from features and tokens
    ckpt = load_checkpoint(out)
    assert set(ckpt.masks) == {"body.weight", "head.weight", "aux.weight"}  # the embedding is not a layer to prune
    assert 0.3 < summary["sparsity"] < 0.7
    assert [i.name for i in ckpt.model.inputs] == ["features", "tokens"] and ckpt.model.inputs[1].dtype == "int64"
    for target in ("ort", "torch-sparse-cpu"):
        artifact = build_artifact(ckpt, tmp_path / f"two-{target}", target=target, trust_model_code=True)
        parity = artifact.manifest.parity
        assert parity.passed and [o.name for o in parity.outputs] == ["logits", "score"], parity
        assert 1 in parity.batches and len(parity.batches) >= 2  # a single sample and a batch (each target picks its sizes)
    report = bench(tmp_path / "two-torch-sparse-cpu", batches=(1, 4), warmup=1, iterations=3, trust_model_code=True)
    assert {row["batch"] for row in report.speedups()} == {1, 4}


def test_user_loss_on_a_three_channel_model_with_its_own_normalisation(run_cli, tmp_path, user_code):
    """(image, label) tuples normalised by the dataset, a user loss: no accuracy, a finite loss."""
    args = ["--model", "usermods:rgb_net", "--input-shape", "1,3,16,16", "--trust-model-code", "--epochs", "1", "--batch-size", "32"]
    summary = prune_json(run_cli, *args, "--data", "usermods:colour_data", "--loss", "usermods:smooth_ce", "--target-sparsity", "0.5", "-o", tmp_path / "rgb.safetensors")
    assert summary["task"] == "usermods:smooth_ce" and summary["test_accuracy"] is None and summary["test_error"] is None
    assert math.isfinite(summary["test_loss"]) and summary["test_loss"] > 0
    # a 3-channel model used to be fed 1x28x28 digits (exit 3): synthetic data now follows its inputs
    summary = prune_json(run_cli, *args, "--data", "synthetic", "-o", tmp_path / "rgb-synthetic.safetensors")
    assert summary["data"].startswith("synthetic-inputs")
    result = run_cli("prune", *args, "--data", "auto", *QUIET, "-o", tmp_path / "never.safetensors")
    assert result.exit_code == 2 and "not 1x28x28 MNIST images" in result.stderr and "--data pkg.module:factory" in result.stderr
    assert not (tmp_path / "never.safetensors").exists()


def test_causal_lm_on_user_token_data(run_cli, tmp_path, user_code):
    """Keyword inputs input_ids + attention_mask, dict batches, next-token loss: it learns to count."""
    inputs = ["--input", "input_ids:batch=1..4..64,seq=2..12..12:int64:0..16", "--input", "attention_mask:batch=1..4..64,seq=2..12..12:int64:1..2", "--keyword-inputs"]
    summary = prune_json(
        run_cli, "--model", "usermods:tiny_lm", *inputs, "--task", "causal-lm", "--data", "usermods:counting_data", "--trust-model-code",
        "--epochs", "4", "--batch-size", "32", "--optimizer", "adam", "--lr", "0.01", "--target-sparsity", "0.3", "-o", tmp_path / "lm.safetensors",
    )  # fmt: skip
    assert summary["task"] == "causal-lm"
    assert summary["test_accuracy"] > 0.5  # next-token accuracy; chance is 1/16


# -- trust: data and loss code run only with the caller's flag ------------------------------------
PLANTED = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")

def data():
    raise AssertionError("must never be called")

def loss(output, target):
    raise AssertionError("must never be called")
"""


def test_data_and_loss_code_need_trust(run_cli, tmp_path, monkeypatch):
    folder = tmp_path / "planted"
    folder.mkdir()
    marker = tmp_path / "MARKER"
    (folder / "planted_data.py").write_text(PLANTED.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("planted_data", None)
    base = ["--model", "lenet300100", *QUIET, "-o", tmp_path / "out.safetensors"]
    for extra in (["--data", "planted_data:data"], ["--data", "synthetic", "--loss", "planted_data:loss"]):
        result = run_cli("prune", *base, *extra)
        assert result.exit_code == 2, result.output
        assert "--trust-model-code" in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not marker.exists() and "planted_data" not in sys.modules
    # a checkpoint whose stored run names the data factory does not grant trust on --resume
    from dnsconvert.checkpoint import PruningInfo, SparseCheckpoint
    from dnsconvert.models import builtin_spec
    from dnsconvert.surgery.train import PruneConfig

    spec = builtin_spec("lenet300100")
    run = PruneConfig(model=spec, data="planted_data:data").to_json()
    weights = {k: v.detach().clone() for k, v in __import__("dnsconvert.models", fromlist=["x"]).build_model(spec).state_dict().items()}
    resume = tmp_path / "hostile.safetensors"
    SparseCheckpoint(weights, {}, model=spec, pruning=PruningInfo("dns"), state={"run": run, "phase_index": 0, "phase_step": 0, "iteration": 0}).save(resume)
    result = run_cli("prune", "--resume", resume, "--no-progress", "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 2 and "--trust-model-code" in result.stderr
    assert not marker.exists()


# -- data that does not fit: one line, exit 2, nothing written -------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "usermods:rgb_net", "--input-shape", "1,3,16,16", "--data", "usermods:stream_data"], "cannot be read by index"),
        (["--model", "usermods:two_input_net", *TWO_INPUTS, "--data", "usermods:extra_key_data"], "'weights' are neither model inputs"),
        (["--model", "usermods:two_input_net", *TWO_INPUTS, "--data", "usermods:colour_data"], "fails on the first batch"),
        (["--model", "usermods:rgb_net", "--input-shape", "1,3,16,16", "--data", "usermods:colour_data", "--loss", "usermods:bad_loss"], "expected a scalar float tensor"),
        (["--model", "usermods:rgb_net", "--input-shape", "1,3,16,16", "--data", "usermods:nope"], "cannot import data factory"),
        (["--model", "usermods:rgb_net", "--input-shape", "1,3,16,16", "--data", "synthetic", "--data-kwargs", '{"n": 3}'], "data_kwargs are the arguments of a data factory"),
        (["--model", "usermods:rgb_net", "--input-shape", "1,3,16,16", "--data", "usermods:colour_data", "--data-kwargs", '{"n": 3}'], "rejected its arguments"),
    ],
)
def test_data_that_does_not_fit_is_a_user_error(run_cli, tmp_path, user_code, args, message):
    out = tmp_path / "out.safetensors"
    result = run_cli("prune", *args, "--trust-model-code", *QUIET, "-o", out)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()


# -- batches and losses, unit by unit ---------------------------------------------------------------
def specs(*texts: str, keyword: bool = False) -> tuple[InputSpec, ...]:
    return tuple(InputSpec.parse(t, keyword=keyword) for t in texts)


def test_split_batch_matches_batches_to_the_model_inputs():
    x, y, ids = torch.zeros(2, 3), torch.tensor([0, 1]), torch.ones(2, 4, dtype=torch.int64)
    one = specs("x:2,3")
    assert split_batch(x, one)[1] is None and split_batch(x, one)[0]["x"] is x
    feeds, target = split_batch((x, y), one)
    assert feeds["x"] is x and target is y
    two = specs("x:2,3", "ids:2,4:int64")
    feeds, target = split_batch([x, ids], two)
    assert list(feeds) == ["x", "ids"] and target is None
    feeds, target = split_batch({"ids": ids, "x": x, "labels": y}, two)
    assert feeds["ids"] is ids and target is y
    keyword = specs("input_ids:2,4:int64", "attention_mask:2,4:int64", keyword=True)
    feeds, target = split_batch({"input_ids": ids}, keyword)  # a keyword input left to the model's default
    assert list(feeds) == ["input_ids"] and target is None
    with pytest.raises(DataError, match="lacks the model input"):
        split_batch({"x": x}, two)
    with pytest.raises(DataError, match="has 4 items"):
        split_batch((x, ids, y, y), two)
    with pytest.raises(DataError, match="several targets"):
        split_batch({"x": x, "labels": y, "target": y}, one)
    with pytest.raises(DataError, match="one tensor, but the model takes 2"):
        split_batch(x, two)


def test_causal_lm_loss_is_next_token_cross_entropy_without_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    ids = torch.tensor([[1, 2, 3, 4], [0, 4, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])  # the last token of row 2 is padding
    measured = CausalLM("input_ids")({"logits": logits}, None, {"input_ids": ids, "attention_mask": mask})
    pairs = [(b, t) for b in range(2) for t in range(3) if mask[b, t + 1]]
    expected = sum(-torch.log_softmax(logits[b, t], -1)[ids[b, t + 1]] for b, t in pairs) / len(pairs)
    assert measured.count == 5 and torch.allclose(measured.loss, expected)
    assert measured.correct == sum(int(logits[b, t].argmax() == ids[b, t + 1]) for b, t in pairs)
    # explicit labels (the target) win over the token ids
    labels = torch.full_like(ids, -100)
    labels[0, 2] = 3
    measured = CausalLM("input_ids")(logits, labels, {"input_ids": ids})
    assert measured.count == 1 and torch.allclose(measured.loss, -torch.log_softmax(logits[0, 1], -1)[3])


def test_classification_and_user_loss_reductions():
    logits, y = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]), torch.tensor([0, 0, 0])
    mean = Classification()(logits, y, {"x": logits})
    total = Classification()(logits, y, {"x": logits}, reduction="sum")
    assert mean.correct == 2 and mean.count == 3 and torch.allclose(total.loss, mean.loss * 3)
    user = UserLoss(lambda output, target: output.pow(2).mean(), "squares")
    assert user(logits, None, {"x": logits}).correct is None
    assert torch.allclose(user(logits, None, {"x": logits}, reduction="sum").loss, logits.pow(2).mean() * 3)


# -- normalisation belongs to the data ------------------------------------------------------------
def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_image_sets_normalise_with_their_own_statistics(tmp_path):
    digits = synthetic_digits(20, 5, seed=1)
    x, _ = digits.train.batch(torch.arange(4))
    assert (digits.train.mean, digits.train.std) == (SYNTHETIC_MEAN, SYNTHETIC_STD)
    assert torch.allclose(x, (digits.train.images[:4].float() / 255 - SYNTHETIC_MEAN) / SYNTHETIC_STD)
    # the constants are the synthetic set's own statistics (measured on seed 0's training split)
    pixels = synthetic_digits(seed=0).train.images.float() / 255
    assert abs(float(pixels.mean()) - SYNTHETIC_MEAN) < 1e-3 and abs(float(pixels.std()) - SYNTHETIC_STD) < 1e-3
    rng = np.random.default_rng(0)
    for stem, count in (("train", 6), ("t10k", 3)):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, (count,)))
    mnist = load_mnist(tmp_path)
    assert (mnist.train.mean, mnist.train.std) == (MNIST_MEAN, MNIST_STD)
    custom = ImageDataset(mnist.train.images, mnist.train.labels, "custom", 0.5, 0.25)
    assert torch.allclose(custom.batch(torch.arange(2))[0], (mnist.train.images[:2].float() / 255 - 0.5) / 0.25)


# -- dnsconvert run with a user model -------------------------------------------------------------
PIPELINE = """
[pipeline]
workdir = "out"

[prune]
model = "usermods:two_input_net"
inputs = ["features:batch=1..4..64,12", "tokens:batch=1..4..64,5:int64:0..20"]
data = "usermods:pair_data"
epochs = 1.0
batch_size = 32
target_sparsity = 0.5
checkpoint_every = 0

[validate]
min_sparsity = 0.3

[export]
targets = ["ort", "torch-sparse-cpu"]

[bench]
batches = [1, 4]
warmup = 1
iterations = 3
"""


def test_pipeline_runs_a_user_model_end_to_end(run_cli, tmp_path, user_code):
    path = tmp_path / "pipeline.toml"
    path.write_text(PIPELINE)
    refused = run_cli("run", path)
    assert refused.exit_code == 2 and "--trust-model-code" in refused.stderr
    result = run_cli("run", path, "--trust-model-code", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    status = {s["name"]: s["status"] for s in report["stages"]}
    assert status == {name: "ran" for name in ("prune", "validate", "export:ort", "export:torch-sparse-cpu", "bench:ort", "bench:torch-sparse-cpu")}
    stages = {s["name"]: s for s in report["stages"]}
    assert stages["prune"]["result"]["data"] == "user:usermods:pair_data"
    for target in ("ort", "torch-sparse-cpu"):
        parity = stages[f"export:{target}"]["result"]["parity"]
        assert parity["passed"] and [o["name"] for o in parity["outputs"]] == ["logits", "score"]
        assert {row["batch"] for row in stages[f"bench:{target}"]["result"]["speedups"]} == {1, 4}


# -- the README's Python example runs as written ----------------------------------------------------
def readme_block(marker: str) -> str:
    """The README's ```python block whose first line is ``marker``."""
    text = (ROOT / "README.md").read_text()
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        if block.splitlines()[0].strip() == marker:
            return block
    raise AssertionError(f"README.md has no python block starting with {marker!r}")


def test_readme_python_example_runs_verbatim(tmp_path, run_cli):
    code = readme_block("# my_sparse.py")
    (tmp_path / "my_sparse.py").write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    ran = subprocess.run([sys.executable, "my_sparse.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    ckpt = load_checkpoint(tmp_path / "sparse.safetensors")
    assert ckpt.model.factory == "my_sparse:make_model" and ckpt.masks
    assert 0.5 < 1 - sum(int(m.sum()) for m in ckpt.masks.values()) / sum(m.numel() for m in ckpt.masks.values())
    # the commands the README gives next, with the module importable as it says
    exported = subprocess.run(
        [sys.executable, "-m", "dnsconvert", "export", "sparse.safetensors", "--trust-model-code", "--target", "ort", "-o", "sparse-ort"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    manifest = json.loads((tmp_path / "sparse-ort" / "manifest.json").read_text())
    assert manifest["parity"]["passed"]


def test_readme_commands_for_your_own_data_are_real_options():
    """Every --flag the README's own-model/own-data sections use is an option of its command."""
    from click.testing import CliRunner

    from dnsconvert.cli import cli

    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own model") : text.index("## Commands")]
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", section, flags=re.S))
    commands = re.findall(r"^\s*(?:PYTHONPATH=\S+ )?dnsconvert (\w+)(.*(?:\\\n.*)*)", blocks, flags=re.M)
    assert commands
    for name, rest in commands:
        help_text = CliRunner().invoke(cli, [name, "--help"]).output
        for flag in re.findall(r"(--[a-z][a-z0-9-]+)", rest):
            assert flag in help_text, f"dnsconvert {name} has no {flag}"


