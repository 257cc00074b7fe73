"""Layer kinds: which parameters are layers to prune, and along which axis N:M groups run.

This is the one place that decides it. With a model, the answer comes from the type of the
module that owns the parameter, never from the tensor's shape: an ``[out, in]``
``nn.Linear`` weight and an ``[in, out]`` ``transformers`` ``Conv1D`` weight have the same
shape and opposite reduction axes, and an embedding table is a 2-D tensor that is not a
layer to prune (the facts of torchao's sparsifier and ModelOpt's ``mts.sparsify``, which
configure per module type).

* Prunable kinds (pruned by default): ``linear`` (``nn.Linear``, axis 1), ``conv``
  (``nn.Conv1d/2d/3d``, weight ``[out, in/groups, *kernel]``, axis 1: groups of M input
  channels per output channel and kernel position; a grouped conv's reduction length is
  ``in/groups``, a depthwise conv's is 1) and ``hf-conv1d`` (``transformers``' ``Conv1D``,
  weight ``[in, out]``, axis 0; recognised by its class name, so ``transformers`` stays
  optional).
* Known, not prunable unless the user names them: ``embedding``, ``norm``; a prunable
  layer's ``bias`` (with ``prune_bias``); anything else is ``other``.
* A parameter shared by several modules (tied weights, e.g. GPT-2's ``lm_head`` and
  ``wte``) carries all its names in ``tied``; it is never pruned by default, refused when
  named, and pruned once for all owners with ``prune_tied``.
* Without a model (a bare state dict) the shape is the only clue: :func:`guess_from_shape`
  labels its answer ``source="shape"``, and commands that change weights refuse such
  tensors unless the user selects them (:class:`LayerPattern`, ``GLOB[@AXIS]``).

Plugins add kinds with :func:`register_layer_kind` or through the ``dnsconvert.layer_kinds``
entry-point group (an entry point names a :class:`LayerKind` or a callable returning one
or several); a plugin that fails to load is reported by :func:`layer_kind_errors` and never
breaks the host.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    import torch
    from torch import nn

ENTRY_POINT_GROUP = "dnsconvert.layer_kinds"

# Where a LayerInfo's kind and axis come from.
SOURCE_MODULE = "module"  # the owning module's type, through the registry
SOURCE_USER = "user"  # the user selected the tensor (and maybe gave its axis)
SOURCE_SHAPE = "shape"  # guessed from the tensor's shape: no model was available
SOURCES = (SOURCE_MODULE, SOURCE_USER, SOURCE_SHAPE)


@dataclass(frozen=True)
class LayerKind:
    """A family of modules whose parameters are pruned the same way.

    Attributes:
        name: the kind's name (``linear``, ``conv``, ...), shown in reports.
        module_types: the module classes, as types or qualified names
            (``"transformers.pytorch_utils.Conv1D"``); subclasses match too.
        weights: parameter attribute -> its N:M reduction axis (None: prunable, no N:M axis).
        prunable: pruned by default. Non-prunable kinds (embedding, norm) only name what
            their parameters are.
    """

    name: str
    module_types: tuple[Any, ...]
    weights: Mapping[str, int | None] = field(default_factory=lambda: {"weight": 1})
    prunable: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "module_types", tuple(_qualname(t) if isinstance(t, type) else str(t) for t in self.module_types))
        object.__setattr__(self, "weights", dict(self.weights))


@dataclass(frozen=True)
class LayerInfo:
    """What one parameter is, as far as pruning is concerned.

    Attributes:
        kind: ``linear``, ``conv``, ``hf-conv1d``, ``embedding``, ``norm``, ``bias``,
            ``other``, ``buffer``, or a plugin's kind; for ``source="shape"`` a guess.
        axis: the N:M reduction axis of the tensor, or None when it has none.
        source: how kind and axis are known: ``module``, ``user`` or ``shape``.
        prunable: pruned and projected by default.
        groups: a grouped conv's group count (its reduction length is in_channels/groups).
        tied: every name of this tensor when several modules share it, else empty.
        module: the owning module's class (qualified name), for messages.
    """

    kind: str
    axis: int | None
    source: str
    prunable: bool = False
    groups: int = 1
    tied: tuple[str, ...] = ()
    module: str | None = None

    @property
    def known(self) -> bool:
        """True unless the kind was only guessed from the shape."""
        return self.source != SOURCE_SHAPE

    @property
    def canonical(self) -> str | None:
        """The name a tied tensor is pruned under (its first name), or None if not tied."""
        return self.tied[0] if self.tied else None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"kind": self.kind, "axis": self.axis, "source": self.source, "prunable": self.prunable}
        if self.groups != 1:
            data["groups"] = self.groups
        if self.tied:
            data["tied"] = list(self.tied)
        if self.module:
            data["module"] = self.module
        return data

    @classmethod
    def from_json(cls, data: Any) -> LayerInfo:
        """Read :meth:`to_json`'s output; raises ValueError when it is malformed."""
        if not isinstance(data, Mapping) or not {"kind", "source"} <= set(data):
            raise ValueError(f"a layer entry is {{kind, axis, source, ...}}, got {str(data)[:120]}")
        axis = data.get("axis")
        groups = data.get("groups", 1)
        tied = data.get("tied", [])
        if axis is not None and (not isinstance(axis, int) or isinstance(axis, bool)):
            raise ValueError(f"layer axis must be an integer or null, got {axis!r}")
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"layer groups must be a positive integer, got {groups!r}")
        if not isinstance(tied, list) or not all(isinstance(n, str) for n in tied):
            raise ValueError("layer tied must be a list of names")
        if data["source"] not in SOURCES:
            raise ValueError(f"layer source must be one of {', '.join(SOURCES)}, got {data['source']!r}")
        module = data.get("module")
        return cls(str(data["kind"]), axis, data["source"], bool(data.get("prunable", False)), groups, tuple(tied), None if module is None else str(module))


# -- the registry --------------------------------------------------------------------------------
_NORM_TYPES = (
    "torch.nn.modules.normalization.LayerNorm",
    "torch.nn.modules.normalization.GroupNorm",
    "torch.nn.modules.normalization.RMSNorm",
    "torch.nn.modules.batchnorm._NormBase",  # BatchNorm1d/2d/3d, InstanceNorm*
)
BUILTIN_KINDS: tuple[LayerKind, ...] = (
    LayerKind("linear", ("torch.nn.modules.linear.Linear",), {"weight": 1}),
    LayerKind("conv", ("torch.nn.modules.conv.Conv1d", "torch.nn.modules.conv.Conv2d", "torch.nn.modules.conv.Conv3d"), {"weight": 1}),
    # transformers.pytorch_utils.Conv1D computes x @ W + b with W stored [in, out]; matched by name
    LayerKind("hf-conv1d", ("transformers.pytorch_utils.Conv1D",), {"weight": 0}),
    LayerKind("embedding", ("torch.nn.modules.sparse.Embedding", "torch.nn.modules.sparse.EmbeddingBag"), {}, prunable=False),
    LayerKind("norm", _NORM_TYPES, {}, prunable=False),
)
_registered: dict[str, LayerKind] = {}  # in-process registrations (a plugin uses the entry point)
_plugin_cache: tuple[list[LayerKind], list[str]] | None = None


def register_layer_kind(kind: LayerKind) -> None:
    """Register ``kind`` in this process; it takes precedence over built-in and plugin kinds
    for the same module types."""
    if not isinstance(kind, LayerKind):
        raise TypeError(f"register_layer_kind takes a LayerKind, got {type(kind).__name__}")
    _registered[kind.name] = kind


def unregister_layer_kind(name: str) -> None:
    _registered.pop(name, None)


def _plugin_kinds() -> tuple[list[LayerKind], list[str]]:
    """Kinds from the entry-point group, loaded once per process, and the load errors."""
    global _plugin_cache
    if _plugin_cache is None:
        from importlib.metadata import entry_points

        kinds: list[LayerKind] = []
        errors: list[str] = []
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
                obj = obj() if callable(obj) and not isinstance(obj, LayerKind) else obj
                found = [obj] if isinstance(obj, LayerKind) else list(obj)
                if not all(isinstance(k, LayerKind) for k in found):
                    raise TypeError("expected a LayerKind or an iterable of LayerKind")
                kinds += found
            except Exception as exc:  # a broken plugin is reported, never breaks the host
                errors.append(f"{ep.name} ({ep.value}): {type(exc).__name__}: {str(exc).strip()[:200]}")
        _plugin_cache = (kinds, errors)
    return _plugin_cache


def layer_kinds() -> list[LayerKind]:
    """Every kind in precedence order: registered in-process, plugins, built-ins."""
    return [*_registered.values(), *_plugin_kinds()[0], *BUILTIN_KINDS]


def layer_kind_errors() -> list[str]:
    """Plugins of the ``dnsconvert.layer_kinds`` group that failed to load, with their errors."""
    return list(_plugin_kinds()[1])


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _kind_index(kinds: Iterable[LayerKind]) -> dict[str, LayerKind]:
    index: dict[str, LayerKind] = {}
    for kind in kinds:
        for name in kind.module_types:
            index.setdefault(name, kind)  # the first kind to claim a type wins (precedence order)
    return index


def kind_of_module(module: nn.Module, index: Mapping[str, LayerKind] | None = None) -> LayerKind | None:
    """The registered kind of ``module`` (its class, else the nearest base class), or None."""
    index = index if index is not None else _kind_index(layer_kinds())
    for cls in type(module).__mro__:
        kind = index.get(_qualname(cls))
        if kind is not None:
            return kind
    return None


# -- describing a model -----------------------------------------------------------------------------
def describe_model(model: nn.Module) -> dict[str, LayerInfo]:
    """A LayerInfo for every parameter and buffer of ``model``, by state-dict name.

    A tensor reachable under several names (tied weights, shared modules) gets one LayerInfo,
    listed under each name, whose ``tied`` holds all of them in ``named_parameters`` order.
    """
    model = _unwrap(model)
    index = _kind_index(layer_kinds())
    names_of: dict[int, list[str]] = {}
    infos_of: dict[int, list[LayerInfo]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        kind = kind_of_module(module, index)
        prefix = f"{module_name}." if module_name else ""
        for attr, param in module.named_parameters(recurse=False, remove_duplicate=False):
            names_of.setdefault(id(param), []).append(prefix + attr)
            infos_of.setdefault(id(param), []).append(_param_info(module, kind, attr))
    infos: dict[str, LayerInfo] = {}
    for key, names in names_of.items():
        info = _merge(infos_of[key])
        if len(set(names)) > 1:
            info = replace(info, tied=tuple(dict.fromkeys(names)))
        for name in names:
            infos[name] = info
    for name, _ in model.named_buffers(remove_duplicate=False):
        infos.setdefault(name, LayerInfo("buffer", None, SOURCE_MODULE))
    return infos


def _param_info(module: nn.Module, kind: LayerKind | None, attr: str) -> LayerInfo:
    owner = _qualname(type(module))
    if kind is None:
        return LayerInfo("other", None, SOURCE_MODULE, module=owner)
    if not kind.prunable:
        return LayerInfo(kind.name, None, SOURCE_MODULE, module=owner)
    if attr in kind.weights:
        groups = getattr(module, "groups", 1)
        groups = groups if isinstance(groups, int) and groups > 0 else 1
        return LayerInfo(kind.name, kind.weights[attr], SOURCE_MODULE, prunable=True, groups=groups, module=owner)
    if attr == "bias":
        return LayerInfo("bias", None, SOURCE_MODULE, module=owner)
    return LayerInfo("other", None, SOURCE_MODULE, module=owner)


def _merge(owners: list[LayerInfo]) -> LayerInfo:
    """One tensor, several owners: the first prunable owner decides (e.g. a tied lm_head's Linear
    over the embedding it shares); owners that disagree on the axis leave it unknown."""
    prunable = [info for info in owners if info.prunable]
    if not prunable:
        return owners[0]
    if len({info.axis for info in prunable}) > 1:
        return replace(prunable[0], axis=None)
    return prunable[0]


def guess_from_shape(shape: Iterable[int]) -> LayerInfo:
    """The shape-only fallback for a tensor with no model: 2-D ``linear``, 3- to 5-D ``conv``
    (torch's layout, axis 1), else ``vector``; labelled ``source="shape"`` and never prunable."""
    ndim = len(tuple(shape))
    if ndim == 2:
        return LayerInfo("linear", 1, SOURCE_SHAPE)
    if 3 <= ndim <= 5:
        return LayerInfo("conv", 1, SOURCE_SHAPE)
    return LayerInfo("vector", None, SOURCE_SHAPE)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper, so names match the bare model."""
    from torch import nn

    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# -- selecting layers ---------------------------------------------------------------------------------
_PATTERN_RE = re.compile(r"^(?P<glob>[^@]+?)(?:@(?P<axis>-?\d+))?$")


@dataclass(frozen=True)
class LayerPattern:
    """A user's selection: a glob over parameter names (``*`` also crosses dots), and optionally
    the tensor's reduction axis (``encoder.*.dense.weight``, ``h.*.attn.c_attn.weight@0``)."""

    glob: str
    axis: int | None = None

    @classmethod
    def parse(cls, text: str | LayerPattern) -> LayerPattern:
        if isinstance(text, LayerPattern):
            return text
        match = _PATTERN_RE.match(str(text).strip())
        if not match:
            raise UserError(f"cannot read layer pattern {text!r}", hint="write GLOB or GLOB@AXIS, e.g. 'encoder.*.dense.weight' or 'h.*.c_fc.weight@0'")
        axis = match.group("axis")
        return cls(match.group("glob"), None if axis is None else int(axis))

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.glob)

    def __str__(self) -> str:
        return self.glob if self.axis is None else f"{self.glob}@{self.axis}"


def parse_patterns(layers: Iterable[str | LayerPattern] | str | None) -> list[LayerPattern]:
    """Patterns from a list (or one comma-separated string) of ``GLOB[@AXIS]``."""
    if layers is None:
        return []
    if isinstance(layers, (str, LayerPattern)):
        layers = [layers]
    out: list[LayerPattern] = []
    for item in layers:
        parts = [item] if isinstance(item, LayerPattern) else [p for p in str(item).split(",") if p.strip()]
        out += [LayerPattern.parse(p) for p in parts]
    return out


def select_layers(
    infos: Mapping[str, LayerInfo],
    *,
    names: Iterable[str] | None = None,
    layers: Iterable[str | LayerPattern] | str | None = None,
    prune_bias: bool = False,
    prune_tied: bool = False,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> dict[str, LayerInfo]:
    """The tensors to prune, by name, with the LayerInfo each is pruned under.

    Args:
        infos: every tensor's LayerInfo (:func:`describe_model`, or a checkpoint's).
        names: exact parameter names; the user named them, so any kind is accepted.
        layers: ``GLOB[@AXIS]`` patterns; each must match something. With ``names`` too,
            the patterns only give axes.
        prune_bias: by default, also the biases of prunable layers.
        prune_tied: prune a tensor shared by several modules once, under its first name,
            instead of refusing it.
        shapes: tensor shapes, to check a user-given axis against.

    Without ``names`` and ``layers``: every prunable tensor whose kind is known, tied ones
    left out. A tied tensor named or matched without ``prune_tied`` is refused with its names.

    Raises:
        UserError: an unknown name, a pattern that matches nothing, a user axis that
            contradicts the module's or is out of range, or a tied tensor without opt-in.
    """
    patterns = parse_patterns(layers)
    candidates = {n: i for n, i in infos.items() if i.kind != "buffer"}
    chosen: list[str]
    if names is not None:
        chosen = list(names)
        unknown = [n for n in chosen if n not in candidates]
        if unknown:
            raise UserError(
                f"no parameter named {', '.join(repr(n) for n in unknown[:4])}",
                hint=f"prunable: {_preview([n for n, i in candidates.items() if i.prunable])}",
            )
    elif patterns:
        chosen = []
        for pattern in patterns:
            matched = [n for n in candidates if pattern.matches(n)]
            if not matched:
                raise UserError(
                    f"layer pattern {str(pattern)!r} matches no parameter",
                    hint=f"parameters: {_preview(list(candidates))}",
                )
            chosen += matched
    else:
        chosen = [
            n
            for n, i in candidates.items()
            if i.known and (i.prunable or (prune_bias and i.kind == "bias")) and (not i.tied or prune_tied)
        ]
    selected: dict[str, LayerInfo] = {}
    for name in dict.fromkeys(chosen):
        info = candidates[name]
        if info.tied:
            if not prune_tied:
                raise UserError(
                    f"{name!r} is one tensor shared by {', '.join(info.tied)} (tied weights): pruning it prunes every one of them",
                    hint="leave it out, or opt in with --prune-tied (prune_tied=True) to prune it once for all of them",
                )
            name = next(t for t in info.tied if t in candidates)  # the first name this tensor has here
        pattern = next((p for p in patterns if p.axis is not None and any(p.matches(n) for n in (name, *info.tied))), None)
        if pattern is not None:
            info = _with_user_axis(name, info, pattern, shapes)
        elif names is not None or patterns:
            if not info.known:  # the user vouches for a shape-guessed tensor: torch's layout
                info = replace(info, source=SOURCE_USER, prunable=True)
        selected.setdefault(name, info)
    return selected


def _with_user_axis(name: str, info: LayerInfo, pattern: LayerPattern, shapes: Mapping[str, tuple[int, ...]] | None) -> LayerInfo:
    axis = pattern.axis
    shape = (shapes or {}).get(name)
    if shape is not None:
        if not -len(shape) <= axis < len(shape) or len(shape) < 2:
            raise UserError(f"layer pattern {str(pattern)!r}: axis {axis} does not exist in {name!r} of shape {list(shape)}")
        axis %= len(shape)
    if info.source == SOURCE_MODULE and info.prunable and info.axis is not None and info.axis != axis:
        raise UserError(
            f"layer pattern {str(pattern)!r} gives {name!r} axis {axis}, but its module ({info.module}) reduces along axis {info.axis}",
            hint="drop the @AXIS: the module's type decides it",
        )
    if info.source == SOURCE_MODULE and info.prunable:
        return info
    return replace(info, axis=axis, source=SOURCE_USER, prunable=True)


def _preview(names: list[str], limit: int = 6) -> str:
    text = ", ".join(names[:limit])
    return (text + (f", … ({len(names)} in all)" if len(names) > limit else "")) or "none"


# -- a checkpoint's layers ---------------------------------------------------------------------------
def checkpoint_layers(ckpt: Any, *, trust_model_code: bool = False) -> dict[str, LayerInfo]:
    """A LayerInfo for every tensor of ``ckpt``: from its model when the model may be built
    (built in, or ``trust_model_code``), else as recorded in the checkpoint, else guessed from
    the shape (``source="shape"``)."""
    from_model: dict[str, LayerInfo] = {}
    if ckpt.model is not None:
        from .models import build_model, is_builtin

        if is_builtin(ckpt.model) or trust_model_code:
            import torch

            try:
                with torch.device("meta"):  # structure only: no weights are allocated
                    model = build_model(ckpt.model, trust_code=trust_model_code)
            except (RuntimeError, NotImplementedError, TypeError):  # a factory that computes on its tensors
                model = build_model(ckpt.model, trust_code=trust_model_code)
            from_model = describe_model(model)
    recorded: Mapping[str, LayerInfo] = getattr(ckpt, "layers", None) or {}
    infos: dict[str, LayerInfo] = {}
    for name, tensor in ckpt.weights.items():
        model_info = from_model.get(name)
        stored = recorded.get(name)
        if model_info is not None and (model_info.prunable or stored is None or stored.source != SOURCE_USER):
            infos[name] = model_info  # the module's type is authoritative
        elif stored is not None:
            infos[name] = stored
        else:
            infos[name] = guess_from_shape(tensor.shape)
    return infos


def model_parameters(model: nn.Module) -> dict[str, torch.nn.Parameter]:
    """Every parameter by every name it has (tied ones under each)."""
    return dict(_unwrap(model).named_parameters(remove_duplicate=False))
