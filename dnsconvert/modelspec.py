"""What a model is: how to rebuild it (an importable factory + kwargs) and what it takes.

A model's inputs are described, not assumed (in the spirit of trtexec's ``--shapes`` and
Polygraphy's ``--input-shapes``): each input has a name, a dtype, a shape whose dims may be
dynamic (``min..opt..max``; dims with the same label, e.g. ``batch``, are one symbol across
inputs), a value range for sample data (token ids need ``0..vocab``), and is passed to the
model positionally or by keyword. Outputs are whatever pytree the model returns; they are
named when the model is exported. Pure Python: reading a spec never imports torch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ModelSpecError

FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
INT_DTYPES = ("int64", "int32", "int16", "int8", "uint8")
DTYPES = (*FLOAT_DTYPES, *INT_DTYPES, "bool")
DEFAULT_BATCH_MAX = 4096  # the batch a legacy input_shape may grow to (export profiles, bench bound)
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class Dim:
    """One dimension: static when ``min == opt == max``; ``label`` ties dynamic dims together."""

    min: int
    opt: int
    max: int
    label: str | None = None

    def __post_init__(self) -> None:
        for value in (self.min, self.opt, self.max):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ModelSpecError(f"dimension sizes must be integers, got {value!r}")
        if not 1 <= self.min <= self.opt <= self.max:
            raise ModelSpecError(f"a dimension needs 1 <= min <= opt <= max, got {self.min}..{self.opt}..{self.max}")
        if self.label is not None and not _NAME_RE.match(self.label):
            raise ModelSpecError(f"dimension label {self.label!r} is not a plain name")

    @classmethod
    def static(cls, size: int) -> Dim:
        return cls(size, size, size)

    @property
    def dynamic(self) -> bool:
        return self.min != self.max

    def __str__(self) -> str:
        text = str(self.opt) if not self.dynamic else f"{self.min}..{self.opt}..{self.max}"
        return f"{self.label}={text}" if self.label else text

    @classmethod
    def parse(cls, text: str) -> Dim:
        """``N``, ``MIN..MAX`` (opt = max), ``MIN..OPT..MAX``, each optionally ``label=...``."""
        label, sep, body = text.strip().rpartition("=")
        label = label.strip() or None if sep else None
        parts = [p.strip() for p in body.split("..")]
        try:
            sizes = [int(p) for p in parts]
        except ValueError:
            raise ModelSpecError(f"cannot read dimension {text!r}", hint="write N, MIN..MAX or MIN..OPT..MAX, optionally label=...") from None
        if len(sizes) == 1:
            return cls(sizes[0], sizes[0], sizes[0], label)
        if len(sizes) == 2:
            return cls(sizes[0], sizes[1], sizes[1], label)
        if len(sizes) == 3:
            return cls(sizes[0], sizes[1], sizes[2], label)
        raise ModelSpecError(f"cannot read dimension {text!r}", hint="write N, MIN..MAX or MIN..OPT..MAX")

    def to_json(self) -> Any:
        if not self.dynamic and self.label is None:
            return self.opt
        return {"min": self.min, "opt": self.opt, "max": self.max, "label": self.label}

    @classmethod
    def from_json(cls, data: Any) -> Dim:
        if isinstance(data, int) and not isinstance(data, bool):
            return cls.static(data)
        if isinstance(data, Mapping) and set(data) <= {"min", "opt", "max", "label"}:
            return cls(data.get("min"), data.get("opt"), data.get("max"), data.get("label"))
        raise ModelSpecError(f"a dimension is an integer or {{min, opt, max, label}}, got {data!r}")


@dataclass(frozen=True)
class InputSpec:
    """One model input.

    Attributes:
        name: the input's name (the ONNX graph input, the keyword when ``keyword``).
        shape: its dims; dynamic dims carry min/opt/max.
        dtype: one of :data:`DTYPES`.
        low, high: the value range of sample data: integers are drawn from ``[low, high)``,
            floats uniformly from ``[low, high)``; without a range floats are standard normal
            and integers ``0`` or ``1``.
        keyword: pass it as ``model(name=x)`` instead of positionally.
    """

    name: str
    shape: tuple[Dim, ...]
    dtype: str = "float32"
    low: float | None = None
    high: float | None = None
    keyword: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ModelSpecError(f"input name {self.name!r} is not a plain name (letters, digits, _ . -)")
        if self.dtype not in DTYPES:
            raise ModelSpecError(f"input {self.name!r} has dtype {self.dtype!r}", hint=f"choose one of {', '.join(DTYPES)}")
        if not self.shape:
            raise ModelSpecError(f"input {self.name!r} has no shape", hint="give at least a batch dimension, e.g. 1,784")
        if not all(isinstance(d, Dim) for d in self.shape):
            object.__setattr__(self, "shape", tuple(d if isinstance(d, Dim) else Dim.from_json(d) for d in self.shape))
        if (self.low is None) != (self.high is None):
            raise ModelSpecError(f"input {self.name!r}: give both ends of the value range or neither")
        if self.low is not None and not self.low < self.high:
            raise ModelSpecError(f"input {self.name!r}: value range {self.low}..{self.high} is empty")

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    def sizes(self, which: str = "opt", *, batch: int | None = None) -> tuple[int, ...]:
        """Concrete sizes: each dim's ``min``, ``opt`` or ``max``; ``batch`` replaces the batch dim."""
        sizes = [getattr(d, which) for d in self.shape]
        index = self.batch_axis
        if batch is not None and index is not None:
            sizes[index] = batch
        return tuple(sizes)

    @property
    def batch_axis(self) -> int | None:
        """The dim labelled ``batch``, else dim 0 when it is dynamic, else None."""
        for i, d in enumerate(self.shape):
            if d.label == "batch":
                return i
        return 0 if self.shape[0].dynamic else None

    def __str__(self) -> str:
        text = f"{self.name}:{','.join(map(str, self.shape))}:{self.dtype}"
        if self.low is not None:
            text += f":{_num(self.low)}..{_num(self.high)}"
        return text

    @classmethod
    def parse(cls, text: str, *, keyword: bool = False) -> InputSpec:
        """``NAME:SHAPE[:DTYPE[:LOW..HIGH]]``; SHAPE is dims joined by ``,`` or ``x``.

        Example: ``input_ids:batch=1..2..8,seq=1..16..128:int64:0..30522``.
        """
        parts = text.split(":")
        if len(parts) < 2 or len(parts) > 4:
            raise ModelSpecError(f"cannot read input {text!r}", hint="write NAME:SHAPE[:DTYPE[:LOW..HIGH]], e.g. input_ids:batch=1..2..8,seq=1..16..128:int64:0..30522")
        name, shape_text = parts[0].strip(), parts[1]
        dims = tuple(Dim.parse(d) for d in re.split(r"[,x]", shape_text) if d.strip())
        dtype = parts[2].strip() if len(parts) > 2 and parts[2].strip() else "float32"
        low = high = None
        if len(parts) > 3:
            ends = parts[3].split("..")
            try:
                low, high = float(ends[0]), float(ends[1])
            except (ValueError, IndexError):
                raise ModelSpecError(f"input {name!r}: cannot read value range {parts[3]!r}", hint="write LOW..HIGH, e.g. 0..30522") from None
            if len(ends) != 2:
                raise ModelSpecError(f"input {name!r}: cannot read value range {parts[3]!r}", hint="write LOW..HIGH")
        return cls(name, dims, dtype, low, high, keyword)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "shape": [d.to_json() for d in self.shape], "dtype": self.dtype}
        if self.low is not None:
            data["range"] = [self.low, self.high]
        if self.keyword:
            data["keyword"] = True
        return data

    @classmethod
    def from_json(cls, data: Any) -> InputSpec:
        if not isinstance(data, Mapping) or not set(data) <= {"name", "shape", "dtype", "range", "keyword"}:
            raise ModelSpecError(f"an input spec is {{name, shape, dtype, range, keyword}}, got {str(data)[:120]}")
        shape = data.get("shape")
        if not isinstance(shape, list):
            raise ModelSpecError(f"input {data.get('name')!r}: shape must be a list")
        value_range = data.get("range")
        if value_range is not None and (not isinstance(value_range, list) or len(value_range) != 2 or not all(_is_number(v) for v in value_range)):
            raise ModelSpecError(f"input {data.get('name')!r}: range must be [low, high]")
        keyword = data.get("keyword", False)
        if not isinstance(keyword, bool):
            raise ModelSpecError(f"input {data.get('name')!r}: keyword must be true or false")
        return cls(
            data.get("name"),
            tuple(Dim.from_json(d) for d in shape),
            data.get("dtype", "float32"),
            None if value_range is None else float(value_range[0]),
            None if value_range is None else float(value_range[1]),
            keyword,
        )


def legacy_input(shape: Sequence[int], name: str = "input") -> InputSpec:
    """The single float input of an ``input_shape`` (dim 0 is a dynamic batch, the rest static)."""
    shape = tuple(int(d) for d in shape)
    if not shape or any(d <= 0 for d in shape):
        raise ModelSpecError(f"input shape {list(shape)} must have positive sizes")
    batch = Dim(1, shape[0], max(shape[0], DEFAULT_BATCH_MAX), "batch")
    return InputSpec(name, (batch, *(Dim.static(d) for d in shape[1:])))


@dataclass(frozen=True)
class ModelSpec:
    """How to rebuild the model, and its inputs.

    Attributes:
        factory: ``package.module:function`` (or a built-in ``dnsconvert.models:name``).
        kwargs: keyword arguments of the factory.
        input_shape: legacy shortcut for one float input named ``input`` with a dynamic batch;
            kept in sync with ``inputs`` (the first input's opt sizes).
        inputs: the model's inputs; derived from ``input_shape`` when not given.
    """

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = ()
    inputs: tuple[InputSpec, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.factory, str) or not self.factory:
            raise ModelSpecError(f"model factory must be a non-empty string, got {self.factory!r}")
        if not isinstance(self.kwargs, dict):
            raise ModelSpecError(f"model kwargs must be a mapping, got {type(self.kwargs).__name__}")
        if not self.inputs and self.input_shape:
            object.__setattr__(self, "inputs", (legacy_input(self.input_shape),))
        if self.inputs and not self.input_shape:
            object.__setattr__(self, "input_shape", self.inputs[0].sizes("opt"))
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ModelSpecError(f"input names must be unique, got {names}")

    def with_inputs(self, inputs: Sequence[InputSpec]) -> ModelSpec:
        inputs = tuple(inputs)
        return replace(self, inputs=inputs, input_shape=inputs[0].sizes("opt") if inputs else ())

    def to_json(self) -> dict[str, Any]:
        return {
            "factory": self.factory,
            "kwargs": dict(self.kwargs),
            "input_shape": list(self.input_shape),
            "inputs": [i.to_json() for i in self.inputs],
        }

    @classmethod
    def from_json(cls, data: Any) -> ModelSpec:
        if not isinstance(data, Mapping):
            raise ModelSpecError(f"a model spec is a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"factory", "kwargs", "input_shape", "inputs"}
        if unknown:
            raise ModelSpecError(f"model spec has unknown key(s) {', '.join(sorted(map(str, unknown)))}")
        kwargs = data.get("kwargs") or {}
        shape = data.get("input_shape") or ()
        inputs = data.get("inputs") or ()
        if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise ModelSpecError(f"model spec input_shape must be a list of integers, got {str(shape)[:80]}")
        if not isinstance(inputs, (list, tuple)):
            raise ModelSpecError("model spec inputs must be a list")
        parsed = tuple(InputSpec.from_json(i) for i in inputs)
        return cls(data.get("factory"), kwargs, tuple(shape) if not parsed else (), parsed)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
