"""Built-in models and rebuilding a model from a ModelSpec.

LeNet-300-100 and LeNet-5 are the networks of the DNS paper (Caffe's versions). ``mlp`` is a
configurable MLP family (GELU, optional LayerNorm) and ``convnet`` a small modern CNN
(conv-BN-ReLU blocks): both scale up for benchmarks via their kwargs.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import limits
from .modelspec import InputSpec, ModelSpec
from .errors import ModelSpecError

MNIST_SHAPE = (1, 1, 28, 28)


def lenet300100(num_classes: int = 10) -> nn.Module:
    """LeNet-300-100: 784-300-100-10 fully connected, ReLU (266k parameters)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


class LeNet5(nn.Module):
    """Caffe's LeNet-5: conv 20@5x5, pool, conv 50@5x5, pool, fc 500, fc 10 (431k parameters)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.max_pool2d(self.conv1(x), 2)
        x = torch.max_pool2d(self.conv2(x), 2)
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def lenet5(num_classes: int = 10) -> nn.Module:
    return LeNet5(num_classes)


def mlp(
    in_features: int = 784,
    hidden: Sequence[int] = (1024, 1024),
    num_classes: int = 10,
    layer_norm: bool = False,
) -> nn.Module:
    """A plain MLP: [Linear, (LayerNorm), GELU] per hidden width, then a classifier."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for size in hidden:
        layers.append(nn.Linear(width, size))
        if layer_norm:
            layers.append(nn.LayerNorm(size))
        layers.append(nn.GELU())
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class TransformerMLP(nn.Module):
    """A stack of pre-norm transformer feed-forward blocks: x + W2·GELU(W1·LN(x))."""

    def __init__(self, dim: int = 1024, hidden: int = 4096, depth: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def transformer_mlp(dim: int = 1024, hidden: int = 4096, depth: int = 2) -> nn.Module:
    return TransformerMLP(dim, hidden, depth)


def convnet(channels: Sequence[int] = (32, 64, 128), num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """conv3x3-BN-ReLU blocks with stride-2 downsampling, global average pool, linear head."""
    layers: list[nn.Module] = []
    width = in_channels
    for i, size in enumerate(channels):
        layers += [nn.Conv2d(width, size, 3, stride=1 if i == 0 else 2, padding=1, bias=False), nn.BatchNorm2d(size), nn.ReLU()]
        width = size
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


BUILTIN_MODELS = {
    "lenet300100": (lenet300100, MNIST_SHAPE),
    "lenet5": (lenet5, MNIST_SHAPE),
    "mlp": (mlp, MNIST_SHAPE),
    "convnet": (convnet, MNIST_SHAPE),
    "transformer_mlp": (transformer_mlp, (1, 16, 1024)),
}


# The kwargs of each built-in factory and what they must be: checked before anything is built,
# because they come from files (checkpoint metadata, artifacts, pipeline files).
_SIZE, _SIZES, _COUNT, _FLAG = "a positive integer", "a list of positive integers", "a non-negative integer", "true or false"
BUILTIN_KWARGS: dict[str, dict[str, str]] = {
    "lenet300100": {"num_classes": _SIZE},
    "lenet5": {"num_classes": _SIZE},
    "mlp": {"in_features": _SIZE, "hidden": _SIZES, "num_classes": _SIZE, "layer_norm": _FLAG},
    "convnet": {"channels": _SIZES, "num_classes": _SIZE, "in_channels": _SIZE},
    "transformer_mlp": {"dim": _SIZE, "hidden": _SIZE, "depth": _COUNT},
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_builtin_kwargs(name: str, kwargs: Mapping[str, Any], *, source: str | Path | None = None) -> None:
    """Raise ModelSpecError unless ``kwargs`` are of the types built-in model ``name`` takes,
    with no more layers than the ``layers`` limit."""
    schema = BUILTIN_KWARGS[name]
    unknown = sorted(set(map(str, kwargs)) - set(schema))
    if unknown:
        raise ModelSpecError(f"built-in model {name!r} takes no argument {', '.join(unknown)}", path=source, hint=f"its arguments: {', '.join(schema)}")
    for key, value in kwargs.items():
        kind = schema[key]
        if kind == _SIZES:
            ok = isinstance(value, (list, tuple))
            if ok:
                limits.check("layers", len(value), f"model {name!r} argument {key!r}", path=source)
                ok = all(_is_int(v) and v > 0 for v in value)
        elif kind == _COUNT:
            ok = _is_int(value) and value >= 0
            if ok:
                limits.check("layers", value, f"model {name!r} argument {key!r}", path=source)
        elif kind == _SIZE:
            ok = _is_int(value) and value > 0
        else:
            ok = isinstance(value, bool)
        if not ok:
            raise ModelSpecError(f"built-in model {name!r}: argument {key!r} must be {kind}, got {str(value)[:60]}", path=source)


def builtin_spec(name: str, **kwargs: Any) -> ModelSpec:
    """The ModelSpec of a built-in model by short name."""
    if name not in BUILTIN_MODELS:
        raise ModelSpecError(f"unknown built-in model {name!r}", hint=f"choose one of {', '.join(BUILTIN_MODELS)}")
    shape = BUILTIN_MODELS[name][1]
    if name == "transformer_mlp":
        shape = (1, 16, int(kwargs.get("dim", 1024)))
    if name == "mlp" and int(kwargs.get("in_features", 784)) != 784:
        shape = (1, int(kwargs["in_features"]))
    return ModelSpec(f"dnsconvert.models:{name}", dict(kwargs), shape)


def resolve_spec(text: str, input_shape: Sequence[int] | None = None, *, inputs: Sequence[InputSpec] = (), **kwargs: Any) -> ModelSpec:
    """A short built-in name (``lenet5``) or an import path (``pkg.module:factory``) -> ModelSpec.

    ``inputs`` (or the legacy single-input ``input_shape``) describe what the model takes; a
    built-in model knows its own input when neither is given.
    """
    if ":" not in text:
        spec = builtin_spec(text, **kwargs)
        factory, kwargs = spec.factory, spec.kwargs
        if not inputs and not input_shape:
            return spec
    else:
        factory, kwargs = text, dict(kwargs)
        if not inputs and not input_shape:
            raise ModelSpecError(
                f"model {text!r} is not built in, so its inputs are unknown",
                hint="pass --input NAME:SHAPE[:DTYPE[:LOW..HIGH]] (repeatable) or --input-shape, e.g. 1,3,224,224",
            )
    if inputs:
        return ModelSpec(factory, kwargs, inputs=tuple(inputs))
    return ModelSpec(factory, kwargs, tuple(int(d) for d in input_shape))


def is_builtin(spec: ModelSpec) -> bool:
    return spec.factory.startswith("dnsconvert.models:") and spec.factory.split(":", 1)[1] in BUILTIN_MODELS


def _on_meta_device() -> bool:
    return torch.empty(()).device.type == "meta"


def check_model_size(spec: ModelSpec, *, source: str | Path | None = None) -> None:
    """For a built-in model: check its kwargs and, unless already on the meta device, count its
    parameters on the meta device against the ``parameters`` limit (nothing is allocated)."""
    if not is_builtin(spec):
        return
    check_builtin_kwargs(spec.factory.split(":", 1)[1], spec.kwargs, source=source)
    if _on_meta_device():
        return
    with torch.device("meta"):
        probe = build_model(spec, source=source)
    count = sum(t.numel() for t in (*probe.parameters(), *probe.buffers()))
    limits.check("parameters", count, f"model {spec.factory} {spec.kwargs}"[:200], path=source)


def build_model(spec: ModelSpec, *, trust_code: bool = False, source: str | Path | None = None) -> nn.Module:
    """Instantiate ``spec``. A factory outside dnsconvert is imported only with ``trust_code``,
    because a checkpoint from elsewhere could otherwise name any importable callable.

    A built-in model's kwargs are checked first, and, unless this is a build on the meta
    device, its size is taken on the meta device and held to the ``parameters`` limit
    before any weight is allocated (``source``: the file the spec came from, for messages).
    """
    builtin = is_builtin(spec)
    if builtin:
        check_model_size(spec, source=source)
    elif spec.factory.startswith("dnsconvert.models:"):
        raise ModelSpecError(f"unknown built-in model {spec.factory.split(':', 1)[1]!r}", path=source, hint=f"choose one of {', '.join(BUILTIN_MODELS)}")
    elif not trust_code:
        raise ModelSpecError(
            f"model factory {spec.factory!r} is outside dnsconvert and would run its code",
            path=source,
            hint="pass --trust-model-code if you trust this checkpoint",
        )
    module_name, _, attr = spec.factory.partition(":")
    if not module_name or not attr:
        raise ModelSpecError(f"model factory {spec.factory!r} is not of the form package.module:function")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise ModelSpecError(f"cannot import model factory {spec.factory!r} ({exc})", hint="is the package installed?") from None
    try:
        model = factory(**spec.kwargs)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ModelSpecError(f"model factory {spec.factory!r} rejected its arguments {str(spec.kwargs)[:200]} ({first})", path=source) from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model factory {spec.factory!r} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def check_weights_fit(model: nn.Module, weights: Mapping[str, torch.Tensor], *, where: str = "checkpoint") -> None:
    """Raise ModelSpecError unless ``weights`` has exactly the model's keys and shapes (works on a
    model built on the meta device, so nothing is allocated)."""
    expected = model.state_dict()
    unknown = sorted(set(weights) - set(expected))
    missing = sorted(set(expected) - set(weights))
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"unknown layer(s) {', '.join(unknown[:4])}")
        if missing:
            parts.append(f"missing {', '.join(missing[:4])}")
        raise ModelSpecError(f"{where} does not fit the model: {'; '.join(parts)}", hint="is the model spec the one it was trained with?")
    for key, value in weights.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ModelSpecError(
                f"{where}: {key!r} has shape {tuple(value.shape)}, the model expects {tuple(expected[key].shape)}",
                hint="is the model spec the one it was trained with?",
            )


def load_weights_(model: nn.Module, weights: dict[str, torch.Tensor], *, where: str = "checkpoint", assign: bool = False) -> nn.Module:
    """Load a state dict strictly, turning missing/unknown/mis-shaped keys into one clear error."""
    check_weights_fit(model, weights, where=where)
    model.load_state_dict(weights, strict=True, assign=assign)
    return model


def build_masked_model(ckpt: Any, *, trust_code: bool = False) -> nn.Module:
    """The checkpoint's model with its masked weights loaded, in eval mode."""
    if ckpt.model is None:
        raise ModelSpecError(
            "checkpoint has no model spec, so the model cannot be rebuilt",
            path=ckpt.source,
            hint="pass --model NAME or --model pkg.module:factory (with --input-shape)",
        )
    # fresh tensors (masked ones already are), so the model never aliases the checkpoint's
    weights = {k: v if k in ckpt.masks else v.clone() for k, v in ckpt.masked_weights().items()}
    # Build on the meta device and adopt the checkpoint's tensors: skips initialising weights
    # that are overwritten anyway (a tenth of a second per 10M parameters). Falls back to a
    # normal build when the model keeps state outside its state dict.
    with torch.device("meta"):
        model = build_model(ckpt.model, trust_code=trust_code, source=ckpt.source)
    check_weights_fit(model, weights, where=ckpt.name)  # shapes before any weight is materialised
    try:
        load_weights_(model, weights, where=ckpt.name, assign=True)
    except ModelSpecError:
        raise
    except (RuntimeError, TypeError, NotImplementedError):
        model = None
    if model is None or any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = build_model(ckpt.model, trust_code=trust_code, source=ckpt.source)
        load_weights_(model, weights, where=ckpt.name)
    return model.eval()
