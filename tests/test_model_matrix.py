"""Every stage on real architectures: BERT, GPT-2, ResNet, MobileNetV2, ViT (transformers configs,
random weights, offline), a model with three outputs and a model with two integer inputs.

For each: DNS through the API for a few steps, a checkpoint with its model spec and layer
kinds, validate, project 2:4, export to ``ort`` and ``torch-sparse-cpu`` with parity on every
output, and bench the artifacts. (The axis facts of the HF models are proven in
test_real_models.py; local HF folders through the CLI and pipelines in test_hf.py.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
import transformers  # noqa: F401  a test dependency (the [test] extra): a missing one fails, never skips

import real_models  # tests/ is on sys.path
from dnsconvert.bench import bench
from dnsconvert.checkpoint import PruningInfo, SparseCheckpoint
from dnsconvert.model_io import FlatIO, sample_feeds, to_tensors
from dnsconvert.modelspec import InputSpec, ModelSpec
from dnsconvert.project import project_nm
from dnsconvert.surgery import DNSConfig, DynamicNetworkSurgery
from dnsconvert.targets import build_artifact
from dnsconvert.validate import validate


class ThreeHeads(nn.Module):
    """One trunk, three outputs in a dict: class logits, a box regression and an embedding."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classes = nn.Linear(32, 8)
        self.boxes = nn.Linear(32, 4)
        self.embedding = nn.Linear(32, 16)

    def forward(self, image):
        h = self.trunk(image)
        return {"logits": self.classes(h), "boxes": self.boxes(h), "embedding": self.embedding(h)}


class TwoIds(nn.Module):
    """Two integer inputs (token ids and segment ids), a tuple of two outputs."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(50, 32)
        self.segments = nn.Embedding(3, 32)
        self.mix = nn.Linear(32, 64)
        self.out = nn.Linear(64, 5)

    def forward(self, ids, segment_ids):
        h = torch.relu(self.mix(self.tokens(ids) + self.segments(segment_ids)))
        return self.out(h).mean(1), h.mean(1)


def three_heads() -> nn.Module:
    return ThreeHeads()


def two_ids() -> nn.Module:
    return TwoIds()


def text_inputs() -> tuple[InputSpec, ...]:
    return (InputSpec.parse("input_ids:batch=1..2..8,seq=2..8..16:int64:0..64", keyword=True),)


def image_input(size: int) -> tuple[InputSpec, ...]:
    return (InputSpec.parse(f"pixel_values:batch=1..2..8,3,{size},{size}", keyword=True),)


MODELS = {
    "bert": ("real_models:bert_mlm", text_inputs()),
    "gpt2": ("real_models:gpt2_lm", text_inputs()),
    "resnet": ("real_models:resnet", image_input(32)),
    "mobilenet": ("real_models:mobilenet", image_input(32)),
    "vit": ("real_models:vit", image_input(16)),
    "three-outputs": ("test_model_matrix:three_heads", (InputSpec.parse("image:batch=1..2..8,3,16,16"),)),
    "two-int-inputs": ("test_model_matrix:two_ids", (InputSpec.parse("ids:batch=1..2..8,seq=2..6..12:int64:0..50"), InputSpec.parse("segment_ids:batch=1..2..8,seq=2..6..12:int64:0..3"))),
}
OUTPUTS = {"three-outputs": ["logits", "boxes", "embedding"], "two-int-inputs": ["output_0", "output_1"]}


def dns_checkpoint(name: str) -> SparseCheckpoint:
    """A few DNS steps through the API on the model's outputs (a stand-in loss), then its checkpoint."""
    from dnsconvert.models import build_model

    factory, inputs = MODELS[name]
    spec = ModelSpec(factory, {}, inputs=inputs)
    torch.manual_seed(0)
    model = build_model(spec, trust_code=True)
    if name in ("gpt2", "bert"):
        model.config.use_cache = False
    dns = DynamicNetworkSurgery(model, DNSConfig(target_sparsity=0.6, gamma=0.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    flat = FlatIO(model, inputs).train()
    for step in range(3):
        outputs = flat(*to_tensors(sample_feeds(inputs, batch=2, seed=step), inputs))
        loss = sum(o.float().pow(2).mean() for o in outputs if o.is_floating_point())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        dns.step()
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return SparseCheckpoint(weights, dns.masks(), model=spec, pruning=PruningInfo("dns", "magnitude"), layers=dns.layer_info)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_stage_on_a_real_model(name, tmp_path):
    ckpt = dns_checkpoint(name)
    assert ckpt.masks and 0.4 < validate(ckpt, trust_model_code=True).sparsity < 0.8
    ckpt.save(tmp_path / "dns.safetensors")
    report = validate(ckpt, trust_model_code=True)
    assert report.passed, report.violations
    projected = project_nm(ckpt, "2:4", trust_model_code=True).checkpoint
    assert validate(projected, require_nm="2:4", trust_model_code=True).passed
    projected.save(tmp_path / "projected.safetensors")
    from dnsconvert.loading import load_checkpoint

    source = load_checkpoint(tmp_path / "projected.safetensors")
    artifacts = {}
    for target, options in (("ort", {}), ("torch-sparse-cpu", {"plan": "sparsity", "min_sparsity": "0.4"})):
        # 1e-3: deep random-weight CNNs (BatchNorm folded into convs by the exporter) differ from
        # PyTorch by float32 summation order, which moves with the thread count (seen: 1.9e-4 on
        # MobileNetV2 logits of magnitude ~7, relative 3e-5)
        artifact = build_artifact(source, tmp_path / target, target=target, options=options, atol=1e-3, rtol=1e-3, trust_model_code=True)
        parity = artifact.manifest.parity
        assert parity.passed and parity.outputs, (target, parity)
        assert [o.name for o in parity.outputs] == list(artifact.manifest.outputs)
        if name in OUTPUTS:
            assert list(artifact.manifest.outputs) == OUTPUTS[name]
        artifacts[target] = artifact
    # the exported graph's 2:4 check agrees: no pruned weight violates along its consumer's axis
    pruned = {layer.initializer for layer in artifacts["ort"].manifest.layers}
    checked = [g for g in artifacts["ort"].manifest.graph_2_4 if g.initializer in pruned]
    assert checked and not [g for g in checked if g.compliant is False], checked
    result = bench(artifacts["torch-sparse-cpu"].root, batches=(2,), warmup=1, iterations=4, rounds=2, baselines=("fp32",), trust_model_code=True)
    assert result.comparisons and all(c.sparse_p50_ms > 0 for c in result.comparisons)
