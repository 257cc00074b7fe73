"""One option schema per stage, shared by the command line and the pipeline file.

Each stage's options are one typed record (a pydantic dataclass: types, known keys,
defaults, help text). ``dnsconvert prune --target-sparsity 0.5`` and a pipeline's
``[prune] target_sparsity = 0.5`` are the same field of :class:`PruneOptions` and reach the
library through the same function (:meth:`PruneOptions.to_config`), so the same words mean
the same thing in both. The CLI builds its options from these records
(:mod:`dnsconvert.cli._schema`); a pipeline section is validated by :func:`parse_options`.
Trust to run model code is deliberately not an option here: it comes from the person.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from .errors import UserError

_SCHEMA = ConfigDict(extra="forbid", strict=True)
T = TypeVar("T")


@dataclass(frozen=True, config=_SCHEMA)
class ModelChoice:
    """Which model, and what it takes (shared by every stage that may rebuild a model)."""

    model: str | None = Field(None, description="Model spec: a built-in name or pkg.module:factory.")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the model factory.")
    input_shape: tuple[int, ...] | None = Field(None, description="Shortcut for one float input with a dynamic batch, e.g. 1,3,224,224.")
    inputs: tuple[str, ...] = Field(
        (),
        description="A model input, NAME:SHAPE[:DTYPE[:LOW..HIGH]], in call order: dims joined by ',' or 'x', each N, "
        "MIN..MAX or MIN..OPT..MAX, optionally labelled (batch=1..8..64); dtype float32 (default), float16, int64, int32, "
        "bool...; LOW..HIGH is the range of sample values (token ids: 0..VOCAB). "
        "E.g. input_ids:batch=1..2..8,seq=1..16..128:int64:0..30522",
        json_schema_extra={"flag": "input", "metavar": "NAME:SHAPE[:DTYPE[:LOW..HIGH]]"},
    )
    keyword_inputs: bool = Field(False, description="Pass the inputs to the model by name (model(input_ids=..., ...)), as Hugging Face models take them.")

    def given(self) -> bool:
        return bool(self.model or self.model_kwargs or self.input_shape or self.inputs or self.keyword_inputs)

    def apply(self, ckpt):
        """``ckpt`` with its model spec attached, or overridden where these options say so."""
        from .modelspec import InputSpec, ModelSpec

        if self.model:
            ckpt.model = self.spec()
            return ckpt
        if not self.given():
            return ckpt
        if ckpt.model is None:
            raise UserError("model inputs or kwargs were given, but the checkpoint has no model spec", path=ckpt.source, hint="name the model too (--model)")
        spec = ckpt.model
        kwargs = self.model_kwargs or spec.kwargs
        inputs = tuple(InputSpec.parse(text, keyword=self.keyword_inputs) for text in self.inputs)
        if inputs:
            spec = ModelSpec(spec.factory, kwargs, inputs=inputs)
        elif self.input_shape:
            spec = ModelSpec(spec.factory, kwargs, self.input_shape)
        else:
            spec = ModelSpec(spec.factory, kwargs, inputs=spec.inputs)
        if self.keyword_inputs and not inputs:
            spec = spec.with_inputs([InputSpec(i.name, i.shape, i.dtype, i.low, i.high, True) for i in spec.inputs])
        ckpt.model = spec
        return ckpt

    def spec(self, default: str | None = None):
        """The ModelSpec these options describe (``default`` when no model is named)."""
        from .models import resolve_spec
        from .modelspec import InputSpec

        name = self.model or default
        if name is None:
            return None
        inputs = tuple(InputSpec.parse(text, keyword=self.keyword_inputs) for text in self.inputs)
        return resolve_spec(name, self.input_shape, inputs=inputs, **self.model_kwargs)


@dataclass(frozen=True, config=_SCHEMA)
class PruneOptions(ModelChoice):
    """Everything ``dnsconvert prune`` and a pipeline's ``[prune]`` section take."""

    model: str = Field("lenet300100", description="Built-in name (lenet300100, lenet5, mlp, convnet, transformer_mlp), pkg.module:factory, or hf:DIR (a local transformers model).")
    method: Literal["dns", "magnitude", "imp"] = Field("dns", description="DNS, or a baseline: one-shot magnitude + fine-tune, iterative magnitude pruning.")
    criterion: Literal["magnitude", "taylor", "movement"] = Field("magnitude", description="Saliency for DNS cut/splice.")
    c: float = Field(3.0, description="DNS threshold: mean + c*std of the layer's saliency.")
    layer_c: dict[str, float] = Field(default_factory=dict, description="Per-layer c, NAME=VALUE.")
    gamma: float = Field(1e-4, description="Mask-update probability (1+gamma*iter)^-power.")
    power: float = Field(1.0, description="Exponent of the mask-update probability.")
    iter_stop: int = Field(10_000, description="No DNS mask updates from this iteration on.")
    reestimate: bool | None = Field(None, description="Recompute mean/std at every mask update (default: only for taylor/movement).")
    target_sparsity: float | None = Field(None, description="DNS: calibrate each layer's c to cut this fraction. Baselines: the sparsity to reach (default 0.9).")
    layer_sparsity: dict[str, float] = Field(default_factory=dict, description="Per-layer target sparsity, NAME=FRACTION (DNS calibration and baselines).")
    nm: str | None = Field(None, description="Constrain DNS masks to N:M along the reduction axis, e.g. 2:4.")
    prune_bias: bool = Field(False, description="Also mask biases (the reference code does).")
    layers: tuple[str, ...] = Field(
        (),
        description="Select the tensors to prune by name, GLOB[@AXIS] (* crosses dots), e.g. 'encoder.*.dense.weight'; @AXIS gives the "
        "reduction axis of a tensor no module type describes (a bare state dict). Default: every layer of a prunable kind.",
        json_schema_extra={"metavar": "GLOB[@AXIS]"},
    )
    prune_tied: bool = Field(False, description="Also prune a tensor several modules share (tied weights, e.g. lm_head and the token embedding), once for all of them; otherwise it is refused.")
    epochs: float = Field(1.0, description="Epochs of DNS / fine-tuning / each IMP round.")
    dense_epochs: float = Field(0.0, description="Train the dense model this long first.")
    finetune_epochs: float = Field(0.0, description="DNS: masked fine-tuning after the DNS phase (masks fixed, learning-rate schedule restarted).")
    finetune_lr: float | None = Field(None, description="Peak learning rate of the masked fine-tuning (default: lr).")
    imp_rounds: int = Field(5, description="Rounds of iterative magnitude pruning.")
    batch_size: int = Field(64, description="Training batch size.")
    lr: float = Field(0.01, description="Learning rate.")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("sgd", description="Optimizer.")
    momentum: float = Field(0.9, description="SGD momentum.")
    weight_decay: float = Field(0.0, description="Weight decay.")
    lr_schedule: Literal["cosine", "constant"] = Field("cosine", description="Learning-rate schedule within each phase.")
    seed: int = Field(0, description="Seed of initialisation, data order and mask-update draws.")
    data: str = Field(
        "auto",
        description="Your data: pkg.module:factory returning (train, test) datasets or DataLoaders (runs your code: needs --trust-model-code). "
        "Built in: an MNIST directory, 'mnist', 'auto' ($DNSCONVERT_MNIST, cache, download, else synthetic digits) for models taking 1x28x28 images; "
        "'synthetic' (digits for those, else examples of the model's declared inputs: smoke tests only).",
    )
    data_kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the data factory.")
    task: Literal["classification", "causal-lm"] = Field(
        "classification",
        description="The loss: classification (cross-entropy on the logits against the batch's labels) or causal-lm (next-token cross-entropy on the token ids).",
    )
    loss: str | None = Field(None, description="Your loss instead of the task's: pkg.module:fn(output, target) -> scalar tensor (needs --trust-model-code).")
    checkpoint_every: int = Field(500, description="Write the output checkpoint every N steps (atomically); 0: only at the end.")

    def to_config(self):
        """The library's PruneConfig: the one mapping from these words to a run."""
        from .surgery import DNSConfig, PruneConfig

        dns = DNSConfig(
            c=self.c,
            gamma=self.gamma,
            power=self.power,
            iter_stop=self.iter_stop,
            criterion=self.criterion,
            reestimate=self.reestimate,
            target_sparsity=self.target_sparsity,
            layer_sparsity=dict(self.layer_sparsity),
            layer_c=dict(self.layer_c),
            nm=self.nm,
            prune_bias=self.prune_bias,
            seed=self.seed,
            layers=list(self.layers) or None,
            prune_tied=self.prune_tied,
        )
        return PruneConfig(
            model=self.spec(),
            method=self.method,
            dns=dns,
            epochs=self.epochs,
            dense_epochs=self.dense_epochs,
            finetune_epochs=self.finetune_epochs,
            finetune_lr=self.finetune_lr,
            batch_size=self.batch_size,
            lr=self.lr,
            momentum=self.momentum,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            lr_schedule=self.lr_schedule,
            target_sparsity=self.target_sparsity if self.target_sparsity is not None else 0.9,
            imp_rounds=self.imp_rounds,
            seed=self.seed,
            checkpoint_every=self.checkpoint_every,
            data=self.data,
            data_kwargs=dict(self.data_kwargs),
            task=self.task,
            loss=self.loss,
        )


@dataclass(frozen=True, config=_SCHEMA)
class ValidateOptions:
    require_nm: str | None = Field(None, description="Fail unless every layer able to hold it follows this N:M pattern along its reduction axis.")
    min_sparsity: float | None = Field(None, description="Fail unless the pruned parameters are at least this sparse (0..1).")
    allow_dead_layers: bool = Field(False, description="Do not fail a layer pruned to 100% (rule dead-layer).")


@dataclass(frozen=True, config=_SCHEMA)
class ProjectOptions:
    nm: str = Field("2:4", description="The N:M pattern to project onto.")
    layers: tuple[str, ...] = Field(
        (),
        description="Select the tensors to project by name, GLOB[@AXIS] (* crosses dots), e.g. 'encoder.*.dense.weight'; @AXIS gives the "
        "reduction axis of a tensor no module type describes (a bare state dict). Default: every layer of a prunable kind.",
        json_schema_extra={"metavar": "GLOB[@AXIS]"},
    )
    prune_tied: bool = Field(False, description="Also project a tensor several modules share (tied weights, e.g. lm_head and the token embedding), once for all of them; otherwise it is refused.")


@dataclass(frozen=True, config=_SCHEMA)
class ExportOptions:
    targets: tuple[str, ...] = Field(("ort",), description="Targets to build (see dnsconvert targets).")
    atol: float = Field(1e-4, description="Parity tolerance, absolute.")
    rtol: float = Field(1e-4, description="Parity tolerance, relative.")
    options: dict[str, dict[str, str | int | float | bool]] = Field(default_factory=dict, description="Per target, its -T options.")


@dataclass(frozen=True, config=_SCHEMA)
class BenchOptions:
    batches: tuple[int, ...] = Field((1, 64), description="Batch sizes.")
    warmup: int = Field(10, description="Untimed calls before timing.")
    iterations: int = Field(100, description="Timed calls per measurement.")
    threads: int = Field(0, description="Intra-op threads for every runtime (0: defaults).")
    min_speedup: float | dict[str, float] | None = Field(None, description="Gate: the least speedup against the fastest dense runtime, overall or per target; fails when below it beyond noise (the interval's upper end).")


def parse_options(kind: type[T], values: Mapping[str, Any], *, where: str | Path | None = None, section: str | None = None) -> T:
    """Validate a mapping (e.g. a pipeline section) as ``kind``; a wrong type or an unknown
    key is a UserError naming the key."""
    try:
        return _adapter(kind).validate_json(json.dumps(dict(values)))
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(p) for p in error.get("loc", ())) or "(section)"
        prefix = f"[{section}] " if section else ""
        hint = f"known keys: {', '.join(kind.__pydantic_fields__)}" if error.get("type") == "unexpected_keyword_argument" else None
        raise UserError(f"{prefix}{key}: {error.get('msg', 'invalid')}", path=where, hint=hint) from None
    except (TypeError, ValueError) as exc:
        raise UserError(f"[{section}] cannot be read: {exc}", path=where) from None


_ADAPTERS: dict[Any, TypeAdapter] = {}


def _adapter(kind: Any) -> TypeAdapter:
    if kind not in _ADAPTERS:
        _ADAPTERS[kind] = TypeAdapter(kind)
    return _ADAPTERS[kind]
