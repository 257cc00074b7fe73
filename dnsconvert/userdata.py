"""Training on the user's own data and loss: data factories, batches of any structure, tasks.

``prune --data pkg.module:factory`` names a callable that returns the train and test sets:
a ``(train, test)`` pair, a mapping with ``train`` and ``test``, or an object with those
attributes. Each set is a map-style dataset (``__len__`` and ``__getitem__``) or a
``torch.utils.data.DataLoader`` over one. dnsconvert draws the batches itself (``--batch-size``,
an order seeded by ``--seed``), so that a run resumes bitwise-identically and DDP ranks split
each batch; of a loader it uses the dataset and the ``collate_fn``, not its sampler or batch
size. Streams (an ``IterableDataset``, a generator) cannot be indexed and are refused.

The data owns its normalisation: whatever the dataset's ``__getitem__`` (or the collate
function) returns is fed to the model unchanged.

A batch is matched to the model's inputs (:class:`~dnsconvert.modelspec.InputSpec`):

- a tensor: the model's one input, no target;
- a tuple or list: the inputs in spec order, optionally followed by the target;
- a mapping: inputs by name, the target under ``labels`` (or ``label`` / ``target``);
  keyword inputs it leaves out are left to the model's defaults.

The task turns the model's output and the target into a loss: ``classification``
(cross-entropy on the logits, accuracy), ``causal-lm`` (next-token cross-entropy; the labels
are the batch's target or else its token ids, with padding from ``attention_mask`` ignored),
or a user function ``loss(output, target) -> scalar tensor`` (``--loss pkg.module:fn``).

Importing a data factory or a loss function runs the user's code, exactly like a model
factory, so it needs the same trust from the caller (``--trust-model-code``); a checkpoint
being resumed or a pipeline file naming them never grants it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import DataSplits, resolve_data
from .errors import DataError, UserError
from .model_io import TORCH_DTYPES
from .modelspec import InputSpec, ModelSpec

TASKS = ("classification", "causal-lm")
TARGET_KEYS = ("labels", "label", "target")
IGNORE_INDEX = -100  # label value the losses skip (padding), as in PyTorch and transformers
MNIST_EXAMPLE = (1, 28, 28)
TRUST_HINT = "pass --trust-model-code if you trust this code (it covers the model, data and loss code a command or pipeline names)"


def is_import_path(text: str | None) -> bool:
    """``pkg.module:name`` (a colon after a dotted module name), not a path or a built-in word."""
    if not text or ":" not in text:
        return False
    module, _, attr = text.partition(":")
    return bool(module) and bool(attr) and all(part.isidentifier() for part in module.split(".")) and attr.isidentifier()


def import_callable(text: str, *, what: str, trust: bool) -> Callable[..., Any]:
    """The callable ``pkg.module:name`` names; importing it runs user code, so only with ``trust``."""
    if not is_import_path(text):
        raise UserError(f"{what} {text!r} is not of the form package.module:function")
    if not trust:
        raise UserError(f"{what} {text!r} is outside dnsconvert and would run its code", hint=TRUST_HINT)
    module_name, _, attr = text.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"cannot import {what} {text!r} ({exc})", hint="is the module on PYTHONPATH?") from None
    if not callable(target):
        raise UserError(f"{what} {text!r} is a {type(target).__name__}, not a function")
    return target


# -- the user's data ----------------------------------------------------------------------------
class DatasetExamples:
    """A map-style dataset read by index: ``batch(index)`` collates the examples at ``index``."""

    def __init__(self, dataset: Any, collate: Callable[[list[Any]], Any], name: str):
        self.dataset = dataset
        self.collate = collate
        self.name = name

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, index: torch.Tensor) -> Any:
        return self.collate([self.dataset[i] for i in index.tolist()])


def as_examples(obj: Any, *, name: str, where: str) -> DatasetExamples:
    """A dataset or a DataLoader over one, as indexable examples; anything else is a DataError."""
    from torch.utils.data import DataLoader, IterableDataset, default_collate

    collate = default_collate
    if isinstance(obj, DataLoader):
        # a loader with batch_size=None does not batch (its collate_fn only converts): batch anyway
        if obj.batch_size is not None:
            collate = obj.collate_fn
        obj = obj.dataset
    if isinstance(obj, IterableDataset) or not (hasattr(obj, "__len__") and hasattr(obj, "__getitem__")):
        raise DataError(
            f"{where}: its {name} set is a {type(obj).__name__}, which cannot be read by index",
            hint="return a map-style Dataset (with __len__ and __getitem__) or a DataLoader over one: "
            "dnsconvert draws batches by index so that runs resume exactly and DDP ranks split them",
        )
    try:
        size = len(obj)
    except TypeError as exc:
        raise DataError(f"{where}: its {name} set has no length ({exc})") from None
    if size == 0:
        raise DataError(f"{where}: its {name} set is empty")
    return DatasetExamples(obj, collate, name)


def load_user_data(factory: str, kwargs: Mapping[str, Any] | None = None, *, trust: bool) -> DataSplits:
    """Call the data factory ``pkg.module:fn`` (with ``kwargs``) and wrap its train and test sets."""
    make = import_callable(factory, what="data factory", trust=trust)
    try:
        made = make(**dict(kwargs or {}))
    except TypeError as exc:
        raise DataError(f"data factory {factory!r} rejected its arguments {dict(kwargs or {})} ({exc})", hint="check --data-kwargs") from None
    if isinstance(made, Mapping):
        train, test = made.get("train"), made.get("test")
    elif isinstance(made, (tuple, list)) and len(made) == 2:
        train, test = made
    else:
        train, test = getattr(made, "train", None), getattr(made, "test", None)
    if train is None or test is None:
        raise DataError(
            f"data factory {factory!r} returned a {type(made).__name__}, expected its train and test sets",
            hint="return (train, test), {'train': ..., 'test': ...}, or an object with .train and .test",
        )
    where = f"data factory {factory!r}"
    return DataSplits(as_examples(train, name="train", where=where), as_examples(test, name="test", where=where), f"user:{factory}")


# -- batches ------------------------------------------------------------------------------------
def split_batch(batch: Any, inputs: Sequence[InputSpec], *, where: str = "the data") -> tuple[dict[str, Any], Any]:
    """``(model inputs by name, target or None)`` of one batch; see the module docstring."""
    names = [spec.name for spec in inputs]
    if isinstance(batch, torch.Tensor):
        feeds, target = {names[0]: batch} if names else {}, None
        if len(names) != 1:
            raise DataError(f"{where}: a batch is one tensor, but the model takes {len(names)} inputs ({', '.join(names)})", hint="return a tuple or a dict per example")
    elif isinstance(batch, Mapping):
        unknown = [k for k in batch if k not in names and k not in TARGET_KEYS]
        if unknown:
            raise DataError(
                f"{where}: batch key(s) {', '.join(map(repr, unknown))} are neither model inputs ({', '.join(names)}) nor a target ({', '.join(TARGET_KEYS)})",
                hint="drop them in the dataset, or declare the inputs with --input NAME:SHAPE:DTYPE",
            )
        feeds = {name: batch[name] for name in names if name in batch}
        targets = [k for k in TARGET_KEYS if k in batch]
        if len(targets) > 1:
            raise DataError(f"{where}: a batch has several targets ({', '.join(targets)})", hint="keep one")
        target = batch[targets[0]] if targets else None
    elif isinstance(batch, (tuple, list)):
        if len(batch) not in (len(names), len(names) + 1):
            raise DataError(
                f"{where}: a batch has {len(batch)} items, the model takes {len(names)} input(s) ({', '.join(names)})",
                hint=f"return the inputs in this order, then optionally the target: {len(names)} or {len(names) + 1} items",
            )
        feeds = dict(zip(names, batch))
        target = batch[len(names)] if len(batch) > len(names) else None
    else:
        raise DataError(f"{where}: a batch is a {type(batch).__name__}", hint="return tensors, tuples or dicts of tensors")
    missing = [spec.name for spec in inputs if spec.name not in feeds and not spec.keyword]
    if missing:
        raise DataError(f"{where}: a batch lacks the model input(s) {', '.join(missing)}", hint=f"the model takes {', '.join(names)}")
    for name, value in feeds.items():
        if not isinstance(value, torch.Tensor):
            raise DataError(f"{where}: input {name!r} of a batch is a {type(value).__name__}, expected a tensor")
    return feeds, target


def forward(model: nn.Module, inputs: Sequence[InputSpec], feeds: Mapping[str, torch.Tensor]) -> Any:
    """``model`` called on one batch's inputs: positional ones in spec order, then keywords."""
    positional = [feeds[spec.name] for spec in inputs if not spec.keyword]
    keyword = {spec.name: feeds[spec.name] for spec in inputs if spec.keyword and spec.name in feeds}
    return model(*positional, **keyword)


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model output: the tensor itself, its ``logits`` (a transformers
    ``ModelOutput`` or a dict), or the first tensor of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise DataError(f"the model returns a {type(output).__name__} without logits", hint="pass --loss pkg.module:fn to compute the loss from it")
    return logits


# -- tasks --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchLoss:
    """One batch's loss (reduced as asked), correct predictions (None: no accuracy) and count."""

    loss: torch.Tensor
    correct: int | None
    count: int


class Task:
    """Turns a model output and a batch's target into a loss."""

    name = "task"

    def __call__(self, output: Any, target: Any, feeds: Mapping[str, torch.Tensor], *, reduction: str = "mean") -> BatchLoss:
        raise NotImplementedError


class Classification(Task):
    """Cross-entropy of the logits against integer class labels; accuracy."""

    name = "classification"

    def __call__(self, output, target, feeds, *, reduction="mean"):
        if not isinstance(target, torch.Tensor):
            raise DataError("classification needs a target (class labels) in every batch", hint="return (inputs..., labels) or a dict with 'labels', or choose --task causal-lm / --loss")
        logits = logits_of(output)
        loss = F.cross_entropy(logits, target, reduction=reduction)
        with torch.no_grad():
            correct = int((logits.argmax(1) == target).sum())
        return BatchLoss(loss, correct, int(target.numel()))


class CausalLM(Task):
    """Next-token cross-entropy: logits at t predict the label at t+1; padding is ignored."""

    name = "causal-lm"

    def __init__(self, token_input: str | None):
        self.token_input = token_input

    def __call__(self, output, target, feeds, *, reduction="mean"):
        logits = logits_of(output)
        if isinstance(target, torch.Tensor):
            labels = target
        elif self.token_input is not None and self.token_input in feeds:
            labels = feeds[self.token_input]
            mask = feeds.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.shape == labels.shape:
                labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
        else:
            raise DataError("causal-lm needs token ids (an integer input) or labels in every batch")
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise DataError(f"causal-lm expects logits [batch, seq, vocab] and labels [batch, seq], got {list(logits.shape)} and {list(labels.shape)}", hint="or pass --loss pkg.module:fn")
        shifted, following = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        loss = F.cross_entropy(shifted, following, ignore_index=IGNORE_INDEX, reduction=reduction)
        with torch.no_grad():
            counted = following != IGNORE_INDEX
            correct = int(((shifted.argmax(1) == following) & counted).sum())
        return BatchLoss(loss, correct, int(counted.sum()))


class UserLoss(Task):
    """``fn(output, target) -> scalar tensor``, the user's own; no accuracy."""

    def __init__(self, fn: Callable[[Any, Any], torch.Tensor], name: str):
        self.fn = fn
        self.name = name

    def __call__(self, output, target, feeds, *, reduction="mean"):
        loss = self.fn(output, target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.dtype.is_floating_point:
            raise DataError(f"loss function {self.name!r} returned {type(loss).__name__} {getattr(loss, 'shape', '')}, expected a scalar float tensor")
        count = _batch_size(feeds)
        return BatchLoss(loss.reshape(()) * count if reduction == "sum" else loss.reshape(()), None, count)


def _batch_size(feeds: Mapping[str, torch.Tensor]) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() else 1


def token_input(inputs: Sequence[InputSpec]) -> str | None:
    """The input holding token ids: ``input_ids``, else the first integer input."""
    for spec in inputs:
        if spec.name == "input_ids":
            return spec.name
    return next((spec.name for spec in inputs if not spec.is_float and spec.dtype != "bool"), None)


def make_task(task: str, loss: str | None, inputs: Sequence[InputSpec], *, trust: bool) -> Task:
    """The task a run trains with: ``loss`` (a user function) when given, else the named task."""
    if loss:
        return UserLoss(import_callable(loss, what="loss function", trust=trust), loss)
    if task == "classification":
        return Classification()
    if task == "causal-lm":
        return CausalLM(token_input(inputs))
    raise UserError(f"unknown task {task!r}", hint=f"choose one of {', '.join(TASKS)}, or pass --loss pkg.module:fn")


# -- synthetic data shaped like the model's inputs ------------------------------------------------
class TensorExamples:
    """Examples stored as whole tensors ``[N, ...]`` under names; a batch is a dict of slices."""

    def __init__(self, tensors: dict[str, torch.Tensor], name: str):
        self.tensors = tensors
        self.name = name

    def __len__(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {key: value[index] for key, value in self.tensors.items()}


def takes_mnist_images(spec: ModelSpec) -> bool:
    """One float input of 1×28×28 per example (after its batch dim)."""
    if len(spec.inputs) != 1 or not spec.inputs[0].is_float:
        return False
    only = spec.inputs[0]
    sizes = list(only.sizes("opt"))
    if only.batch_axis is None:
        return False
    del sizes[only.batch_axis]
    return tuple(sizes) == MNIST_EXAMPLE


def synthetic_examples(spec: ModelSpec, task: str, *, n_train: int = 1024, n_test: int = 256, seed: int = 0) -> DataSplits:
    """Examples of the model's declared inputs (values from their ranges, at opt sizes).

    ``causal-lm``: the token input is a learnable stream (each sequence counts up from a random
    start by a random step of 1-3, wrapping inside the vocabulary); an ``attention_mask``
    is all ones. ``classification``: two classes, learnable from the first input (the first
    token's parity, or the sign of the first value). Only for smoke tests of the chain:
    bring your own data for anything you measure.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens = token_input(spec.inputs)
    if task == "causal-lm" and tokens is None:
        raise DataError("synthetic causal-lm data needs an integer token input", hint="declare it with --input input_ids:...:int64:0..VOCAB")

    def make(n: int) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for i, item in enumerate(spec.inputs):
            if item.batch_axis != 0:
                raise DataError(f"synthetic data needs a batch dimension first; input {item.name!r} is {item}", hint="bring your own data (--data pkg.module:factory)")
            shape = (n, *item.sizes("opt")[1:])
            low, high = (0, 2) if item.low is None else (int(item.low), int(item.high))
            if item.name == tokens and task == "causal-lm" and len(shape) == 2:
                start = torch.randint(low, high, (n, 1), generator=generator)
                step = torch.randint(1, 4, (n, 1), generator=generator)
                value = low + (start - low + step * torch.arange(shape[1])) % (high - low)
            elif item.name == "attention_mask":
                value = torch.ones(shape, dtype=torch.int64)
            elif item.dtype == "bool":
                value = torch.randint(0, 2, shape, generator=generator).bool()
            elif not item.is_float:
                value = torch.randint(low, max(high, low + 1), shape, generator=generator)
            elif item.low is None:
                value = torch.randn(shape, generator=generator)
            else:
                value = torch.rand(shape, generator=generator) * (item.high - item.low) + item.low
            tensors[item.name] = value.to(TORCH_DTYPES[item.dtype])
        if task == "classification":
            first = tensors[spec.inputs[0].name].reshape(n, -1)[:, 0]
            tensors["labels"] = (first.long() % 2) if not first.dtype.is_floating_point else (first > 0).long()
        return tensors

    return DataSplits(TensorExamples(make(n_train), "synthetic-train"), TensorExamples(make(n_test), "synthetic-test"), f"synthetic-inputs(seed={seed})")


def resolve_training_data(
    spec: ModelSpec,
    data: str,
    *,
    task: str = "classification",
    data_kwargs: Mapping[str, Any] | None = None,
    trust: bool = False,
) -> DataSplits:
    """The data a run trains on: a user factory, MNIST / synthetic digits for models that take
    MNIST images, or synthetic examples of the model's inputs (``synthetic`` for other models)."""
    if is_import_path(data):
        return load_user_data(data, data_kwargs, trust=trust)
    if data_kwargs:
        raise UserError(f"data_kwargs are the arguments of a data factory, but --data is {data!r}", hint="name a factory with --data pkg.module:function, or drop --data-kwargs")
    if takes_mnist_images(spec):
        return resolve_data(data)
    if data == "synthetic":
        return synthetic_examples(spec, task)
    shapes = ", ".join(str(i) for i in spec.inputs) or "no declared inputs"
    raise DataError(
        f"the model takes {shapes}, not 1x28x28 MNIST images, so --data {data!r} cannot feed it",
        hint="pass your data with --data pkg.module:factory (and --trust-model-code), or --data synthetic for a smoke test",
    )


def first_batch_check(model: nn.Module, spec: ModelSpec, data: DataSplits, task: Task, *, batch_size: int) -> None:
    """One forward pass and loss on the first examples, so that data which does not fit the model
    is a DataError naming the data, not a crash halfway into training."""
    index = torch.arange(min(batch_size, 2, len(data.train)))
    feeds, target = split_batch(data.train.batch(index), spec.inputs, where=data.source)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            task(forward(model, spec.inputs, feeds), target, feeds)
    except UserError:
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"{data.source}: the model ({spec.factory}) fails on the first batch: {first}",
            hint=f"the batch must match the model's inputs ({', '.join(map(str, spec.inputs))}) and the task ({task.name})",
        ) from None
    finally:
        model.train(was_training)


__all__ = [
    "BatchLoss",
    "CausalLM",
    "Classification",
    "DatasetExamples",
    "TASKS",
    "Task",
    "TensorExamples",
    "UserLoss",
    "as_examples",
    "first_batch_check",
    "forward",
    "import_callable",
    "load_user_data",
    "logits_of",
    "make_task",
    "resolve_training_data",
    "split_batch",
    "synthetic_examples",
    "takes_mnist_images",
]
