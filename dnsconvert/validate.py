"""Check a checkpoint's sparsity pattern and report it: per-layer table, rules, eligibility.

Unusable input (NaN/Inf weights; structural faults are caught when loading) raises
CheckpointError. Rule failures (non-binary masks, nonzero weights where masked, an N:M
pattern that does not hold, too little sparsity, a layer pruned to 100%, tied copies that
differ) are collected as violations in the report; layers *eligible* for 2:4 sparse kernels
are reported apart from layers that *violate* a required pattern. Each layer's kind and
reduction axis come from :func:`dnsconvert.layers.checkpoint_layers` (the model when it may
be built, else the checkpoint's record, else a labelled guess from the shape).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .checkpoint import SparseCheckpoint
from .errors import CheckpointError
from .layers import SOURCE_SHAPE, LayerInfo, checkpoint_layers
from .pattern import TWO_FOUR, NMPattern, apply_mask, cannot_hold, violating_groups

REPORT_VERSION = 1


@dataclass(frozen=True)
class Violation:
    rule: str
    layer: str | None
    message: str


@dataclass(frozen=True)
class LayerReport:
    """One pruned parameter: its shape, what it is, nonzeros and pattern facts.

    ``kind``/``axis``/``source``: the layer kind, the N:M reduction axis (None: none) and how
    they are known (``module``, ``user``, or ``shape``: a guess, no model was available).
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    numel: int
    nnz: int
    sparsity: float
    eligible_2_4: bool
    eligible_reason: str
    nm_pattern: str | None = None
    nm_compliant: bool | None = None
    nm_skipped_reason: str | None = None
    axis: int | None = None
    source: str = SOURCE_SHAPE
    tied: tuple[str, ...] = ()


@dataclass
class SparsityReport:
    """The result of :func:`validate`: per-layer facts, totals and the rules that failed."""

    source: str
    layers: list[LayerReport]
    total_params: int
    total_nonzero: int
    prunable_params: int
    prunable_nonzero: int
    require_nm: str | None
    min_sparsity: float | None
    violations: list[Violation] = field(default_factory=list)
    allow_dead_layers: bool = False

    @property
    def guessed_layers(self) -> list[str]:
        """Layers whose kind and axis are only guessed from their shape (no model)."""
        return [layer.name for layer in self.layers if layer.source == SOURCE_SHAPE]

    @property
    def passed(self) -> bool:
        return not self.violations

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over the pruned (masked) parameters."""
        return 1.0 - self.prunable_nonzero / self.prunable_params if self.prunable_params else 0.0

    @property
    def compression(self) -> float:
        """All parameters / nonzero parameters (the DNS paper's compression rate)."""
        return self.total_params / max(self.total_nonzero, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "report_version": REPORT_VERSION,
            "kind": "sparsity-report",
            "source": self.source,
            "passed": self.passed,
            "sparsity": self.sparsity,
            "compression": self.compression,
            "total_params": self.total_params,
            "total_nonzero": self.total_nonzero,
            "prunable_params": self.prunable_params,
            "prunable_nonzero": self.prunable_nonzero,
            "require_nm": self.require_nm,
            "min_sparsity": self.min_sparsity,
            "allow_dead_layers": self.allow_dead_layers,
            "layers": [{**asdict(layer), "shape": list(layer.shape), "tied": list(layer.tied)} for layer in self.layers],
            "guessed_layers": self.guessed_layers,
            "eligible_2_4": [layer.name for layer in self.layers if layer.eligible_2_4],
            "violations": [asdict(v) for v in self.violations],
        }


def check_finite(ckpt: SparseCheckpoint) -> None:
    """Raise CheckpointError if any floating weight holds NaN or Inf."""
    for name, value in ckpt.weights.items():
        if value.dtype.is_floating_point and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(
                f"weight {name!r} has {bad} NaN/Inf value(s)",
                path=ckpt.source,
                hint="training diverged; use an earlier checkpoint or a lower learning rate",
            )


def ensure_usable(ckpt: SparseCheckpoint) -> SparseCheckpoint:
    """Raise a UserError unless the checkpoint is structurally sound, finite and fits its model."""
    ckpt.check_structure()
    check_finite(ckpt)
    check_fits_model(ckpt)
    return ckpt


def check_fits_model(ckpt: SparseCheckpoint) -> None:
    """For a built-in model spec, raise ModelSpecError on unknown, missing or mis-shaped layers.

    Models outside dnsconvert are not instantiated here: that would run their code.
    """
    from .models import build_model, check_weights_fit, is_builtin

    if ckpt.model is not None and is_builtin(ckpt.model):
        # on the meta device: kwargs of 30000-wide layers cost nothing until shapes are compared
        with torch.device("meta"):
            model = build_model(ckpt.model, source=ckpt.source)
        check_weights_fit(model, ckpt.weights, where=ckpt.name)


def _nonbinary(mask: torch.Tensor) -> int:
    if mask.dtype == torch.bool:
        return 0
    return int(((mask != 0) & (mask != 1)).sum())


def validate(
    ckpt: SparseCheckpoint,
    *,
    require_nm: NMPattern | str | None = None,
    min_sparsity: float | None = None,
    allow_dead_layers: bool = False,
    trust_model_code: bool = False,
    layers: dict[str, LayerInfo] | None = None,
) -> SparsityReport:
    """Check every rule on ``ckpt`` and return the report (never raises for a rule failure).

    Args:
        ckpt: the checkpoint.
        require_nm: a pattern every layer able to hold it must follow, along its reduction axis.
        min_sparsity: the least fraction of zeros over the pruned parameters.
        allow_dead_layers: do not fail a layer pruned to 100% (rule ``dead-layer``).
        trust_model_code: allow building a model factory outside dnsconvert to learn the
            layer kinds from it (otherwise the checkpoint's record, else a shape guess).
        layers: the layer infos to use instead (as :func:`checkpoint_layers` returns them).

    Raises:
        CheckpointError: the checkpoint is unusable (NaN/Inf weights).
    """
    ensure_usable(ckpt)
    pattern = NMPattern.parse(require_nm) if require_nm is not None else None
    if min_sparsity is not None and not 0.0 <= min_sparsity <= 1.0:
        raise CheckpointError(f"--min-sparsity must lie in [0, 1], got {min_sparsity}")
    infos = layers if layers is not None else checkpoint_layers(ckpt, trust_model_code=trust_model_code)
    violations: list[Violation] = []
    reports: list[LayerReport] = []
    counted: set[str] = set()  # a tied tensor masked under several names counts once
    for name, raw_mask in ckpt.masks.items():
        weight = ckpt.weights[name]
        info = infos.get(name) or LayerInfo("unknown", None, SOURCE_SHAPE)
        mask = raw_mask != 0
        shape = tuple(weight.shape)
        nonbinary = _nonbinary(raw_mask)
        if nonbinary:
            violations.append(Violation("mask-binary", name, f"mask has {nonbinary} value(s) other than 0 and 1"))
        leaked = int(((weight != 0) & ~mask).sum())
        if leaked:
            violations.append(Violation("masked-zero", name, f"{leaked} weight(s) are nonzero where the mask is 0"))
        nnz = int(((weight != 0) & mask).sum())
        if nnz == 0 and weight.numel() and not allow_dead_layers:
            violations.append(
                Violation("dead-layer", name, f"all {weight.numel():,} weights are pruned: the layer passes on nothing but its bias (allow with --allow-dead-layers)")
            )
        violations += _tied_violations(ckpt, name, info)
        reason = cannot_hold(shape, TWO_FOUR, info)
        bad_2_4 = violating_groups(mask, TWO_FOUR, info) if reason is None else 0
        eligible = reason is None and bad_2_4 == 0
        if reason is None and not eligible:
            reason = f"{bad_2_4} group(s) of 4 keep more than 2"
        nm_compliant = nm_skip = None
        if pattern is not None:
            nm_skip = cannot_hold(shape, pattern, info)
            if nm_skip is None:
                bad = violating_groups(mask, pattern, info)
                nm_compliant = bad == 0
                if bad:
                    violations.append(
                        Violation("nm", name, f"{bad} group(s) of {pattern.m} along the reduction axis ({info.axis}) keep more than {pattern.n}")
                    )
        duplicate = bool(info.tied) and any(t in counted for t in info.tied)
        counted.add(name)
        reports.append(
            LayerReport(
                name=name,
                shape=shape,
                kind=info.kind,
                numel=0 if duplicate else weight.numel(),
                nnz=0 if duplicate else nnz,
                sparsity=1.0 - nnz / max(weight.numel(), 1),
                eligible_2_4=eligible,
                eligible_reason=f"2:4 along the reduction axis ({info.axis})" if eligible else str(reason),
                nm_pattern=str(pattern) if pattern else None,
                nm_compliant=nm_compliant,
                nm_skipped_reason=nm_skip,
                axis=info.axis,
                source=info.source,
                tied=info.tied,
            )
        )
    total = sum(v.numel() for v in ckpt.weights.values() if v.dtype.is_floating_point)
    total_nz = sum(int((v != 0).sum()) for v in ckpt.masked_weights().values() if v.dtype.is_floating_point)
    prunable = sum(layer.numel for layer in reports)
    prunable_nz = sum(layer.nnz for layer in reports)
    report = SparsityReport(
        source=ckpt.name,
        layers=reports,
        total_params=total,
        total_nonzero=total_nz,
        prunable_params=prunable,
        prunable_nonzero=prunable_nz,
        require_nm=str(pattern) if pattern else None,
        min_sparsity=min_sparsity,
        violations=violations,
        allow_dead_layers=allow_dead_layers,
    )
    if not reports:
        report.violations.append(Violation("has-masks", None, "checkpoint has no pruned (masked) parameters"))
    if min_sparsity is not None and report.sparsity + 1e-12 < min_sparsity:
        report.violations.append(
            Violation("min-sparsity", None, f"sparsity {report.sparsity:.4f} is below the required {min_sparsity:.4f}")
        )
    return report


def _tied_violations(ckpt: SparseCheckpoint, name: str, info: LayerInfo) -> list[Violation]:
    """A masked tensor the model shares under several names must hold the same values under
    each: a tool that pruned one name alone changed the others when the model loads it."""
    out: list[Violation] = []
    if not info.tied:
        return out
    masked = _masked(ckpt, name)
    for other in info.tied:
        if other == name or other not in ckpt.weights:
            continue
        copy = _masked(ckpt, other)
        if tuple(copy.shape) != tuple(masked.shape) or not torch.equal(copy, masked):
            differ = int((copy != masked).sum()) if tuple(copy.shape) == tuple(masked.shape) else copy.numel()
            out.append(
                Violation("tied", name, f"{name!r} and {other!r} are one tensor in the model (tied weights) but {differ:,} value(s) differ here: one name was pruned alone")
            )
    return out


def _masked(ckpt: SparseCheckpoint, name: str) -> torch.Tensor:
    mask = ckpt.masks.get(name)
    return ckpt.weights[name] if mask is None else apply_mask(ckpt.weights[name], mask != 0)
