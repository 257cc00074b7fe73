"""``dnsconvert validate`` and ``dnsconvert inspect``."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import checkpoint_argument, emit_json, load_with_model, model_options, render_sparsity_report, write_report


@click.command("validate")
@checkpoint_argument
@click.option("--require-nm", default=None, metavar="N:M", help="Fail unless every layer able to hold it follows this pattern.")
@click.option("--min-sparsity", type=float, default=None, help="Fail unless the pruned parameters are at least this sparse (0..1).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Also write the JSON report to this file.")
@model_options
def validate_cmd(checkpoint: Path, require_nm: str | None, min_sparsity: float | None, as_json: bool, report: Path | None, model_options) -> None:
    """Check a checkpoint's sparsity pattern; exit 1 if a rule fails, 2 if it is unusable."""
    from .._atomic import sha256_file
    from ..errors import GateFailed
    from ..validate import validate

    ckpt = load_with_model(checkpoint, model_options)
    result = validate(ckpt, require_nm=require_nm, min_sparsity=min_sparsity)
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
    """Summarise a checkpoint: metadata and the per-layer sparsity table (no gates)."""
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
    render_sparsity_report(validate(ckpt), out)
