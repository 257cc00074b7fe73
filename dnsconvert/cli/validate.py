"""``dnsconvert validate`` and ``dnsconvert inspect``."""

from __future__ import annotations

from pathlib import Path

import click

from ..options import ValidateOptions
from ._common import checkpoint_argument, emit_json, load_with_model, model_options, render_sparsity_report, write_report
from ._schema import options_from, schema_options


@click.command("validate")
@checkpoint_argument
@schema_options(ValidateOptions)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Also write the JSON report to this file.")
@model_options
def validate_cmd(checkpoint: Path, as_json: bool, report: Path | None, model_options, **params) -> None:
    """Check a checkpoint's sparsity pattern; exit 1 if a rule fails, 2 if it is unusable.

    Each layer's kind and N:M axis come from the model when it can be built (built in, or with
    --trust-model-code), else from the checkpoint's record, else a labelled guess from its shape.
    """
    from .._atomic import sha256_file
    from ..errors import GateFailed
    from ..validate import validate

    from .._atomic import check_outputs

    check_outputs([report], [checkpoint])
    options = options_from(ValidateOptions, params)
    ckpt = load_with_model(checkpoint, model_options)
    result = validate(
        ckpt,
        require_nm=options.require_nm,
        min_sparsity=options.min_sparsity,
        allow_dead_layers=options.allow_dead_layers,
        trust_model_code=model_options.trust_model_code,
    )
    data = {**result.to_json(), "sha256": sha256_file(checkpoint)}
    write_report(report, data)
    if as_json:
        emit_json(data)
    else:
        render_sparsity_report(result)
    if not result.passed:
        raise GateFailed(f"{len(result.violations)} rule(s) failed: " + ", ".join(sorted({v.rule for v in result.violations})))


@click.command("inspect")
@checkpoint_argument
@model_options
def inspect_cmd(checkpoint: Path, model_options) -> None:
    """Summarise a checkpoint: metadata and the per-layer table (kind, N:M axis, how known; no gates)."""
    from ..validate import validate
    from ._common import console

    ckpt = load_with_model(checkpoint, model_options)
    out = console()
    if ckpt.model:
        inputs = ", ".join(str(i) for i in ckpt.model.inputs) or "unknown"
        out.print(f"model: {ckpt.model.factory} {ckpt.model.kwargs or ''} inputs {inputs}")
    else:
        out.print("model: (none: a bare state dict; pass --model to commands that rebuild it)")
    if ckpt.pruning:
        p = ckpt.pruning
        out.print(f"pruning: {p.method}" + (f", criterion {p.criterion}" if p.criterion else "") + (f", N:M {p.nm}" if p.nm else ""))
    if ckpt.state:
        out.print(f"resumable surgery state: iteration {ckpt.state.get('iteration', '?')}")
    render_sparsity_report(validate(ckpt, allow_dead_layers=True, trust_model_code=model_options.trust_model_code), out)
