"""Small real architectures from ``transformers`` configs (random weights, offline), as model
factories a ModelSpec can name (``real_models:gpt2_lm``), and how to feed and train each."""

from __future__ import annotations

import torch
from torch import nn


def _transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def bert_mlm() -> nn.Module:
    """BERT with a masked-LM head whose decoder is tied to the word embeddings."""
    t = _transformers()
    config = t.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    return t.BertForMaskedLM(config)


def bert_encoder() -> nn.Module:
    """A bare BERT encoder (word embeddings not tied to anything)."""
    t = _transformers()
    config = t.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    return t.BertModel(config, add_pooling_layer=False)


def gpt2_lm() -> nn.Module:
    """GPT-2: transformers' Conv1D ([in, out] weights) and an lm_head tied to wte."""
    t = _transformers()
    config = t.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0)
    return t.GPT2LMHeadModel(config)


def resnet() -> nn.Module:
    t = _transformers()
    config = t.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=4)
    return t.ResNetForImageClassification(config)


def mobilenet() -> nn.Module:
    """MobileNetV2: depthwise 3x3 convs (groups = channels) between pointwise 1x1 convs."""
    t = _transformers()
    config = t.MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.25, num_labels=4)
    return t.MobileNetV2ForImageClassification(config)


def vit() -> nn.Module:
    t = _transformers()
    config = t.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=4)
    return t.ViTForImageClassification(config)


FACTORIES = {"bert": bert_mlm, "gpt2": gpt2_lm, "resnet": resnet, "mobilenet": mobilenet, "vit": vit}
TEXT = {"bert", "gpt2"}
IMAGE_SIZE = {"resnet": 32, "mobilenet": 32, "vit": 16}


def example_inputs(name: str, batch: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    if name in TEXT:
        return torch.randint(0, 64, (batch, 8), generator=generator)
    size = IMAGE_SIZE[name]
    return torch.randn(batch, 3, size, size, generator=generator)


def loss(name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's own training loss: language modelling on the ids, or classification."""
    if name in TEXT:
        kwargs = {"use_cache": False} if name == "gpt2" else {}
        return model(input_ids=x, labels=x, **kwargs).loss
    labels = torch.arange(x.shape[0]) % 4
    return model(pixel_values=x, labels=labels).loss


class Logits(nn.Module):
    """The model's first output only, for a plain ONNX export."""

    def __init__(self, name: str, model: nn.Module):
        super().__init__()
        self.name = name
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name in TEXT:
            kwargs = {"use_cache": False} if self.name == "gpt2" else {}
            return self.model(input_ids=x, return_dict=True, **kwargs).logits
        return self.model(pixel_values=x, return_dict=True).logits
