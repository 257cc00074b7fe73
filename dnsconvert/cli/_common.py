"""Options and rendering shared by several commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click


TRUST_HELP = (
    "Allow importing the model factory a checkpoint or pipeline names from outside dnsconvert. "
    "This runs code: dnsconvert imports that module and calls the named callable with the "
    "keyword arguments the file chooses. Give it only for files you trust; trust is never read from a file."
)


def trust_option(func):
    return click.option("--trust-model-code", is_flag=True, help=TRUST_HELP)(func)


def checkpoint_argument(func):
    return click.argument("checkpoint", type=click.Path(path_type=Path))(func)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=False, width=None if sys.stdout.isatty() else 140)


def write_report(path: Path | None, data: dict[str, Any]) -> None:
    if path is not None:
        from .._atomic import write_json_atomic

        write_json_atomic(path, data)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a shape; write it as 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise click.BadParameter(f"{text!r} is not a shape of positive sizes")
    return shape


def load_with_model(path: Path, model: str | None, input_shape: str | None, model_kwargs: dict | None = None):
    """Load a checkpoint; ``--model`` attaches or overrides the model spec (e.g. for a bare state dict)."""
    from ..loading import load_checkpoint
    from ..models import resolve_spec

    ckpt = load_checkpoint(path)
    if model:
        ckpt.model = resolve_spec(model, parse_shape(input_shape), **(model_kwargs or {}))
    elif input_shape and ckpt.model is not None:
        from ..modelspec import ModelSpec

        ckpt.model = ModelSpec(ckpt.model.factory, ckpt.model.kwargs, parse_shape(input_shape) or ckpt.model.input_shape)
    return ckpt


def model_options(func):
    func = click.option("--input-shape", default=None, help="Example input shape, e.g. 1,1,28,28 (needed for imported models).")(func)
    func = click.option("--model", default=None, help="Model spec for a bare state dict: built-in name or pkg.module:factory.")(func)
    return func


def layer_options(func):
    """``--layers`` and ``--prune-tied``: which tensors a weight-changing command may touch."""
    func = click.option(
        "--prune-tied", is_flag=True,
        help="Also prune/project a tensor several modules share (tied weights, e.g. lm_head and the token embedding), once for all of them; otherwise it is refused.",
    )(func)  # fmt: skip
    func = click.option(
        "--layers", "layers", multiple=True, metavar="GLOB[@AXIS]",
        help="Select the tensors to prune/project by name (repeatable; * crosses dots), e.g. 'encoder.*.dense.weight'; "
        "@AXIS gives the reduction axis of a tensor no module type describes (a bare state dict). Default: every layer of a prunable kind.",
    )(func)  # fmt: skip
    return func


def render_sparsity_report(report, out=None) -> None:
    from rich.markup import escape
    from rich.table import Table

    out = out or console()
    table = Table(title=f"{report.source}", title_justify="left")
    for column in ("layer", "shape", "kind", "axis", "known from", "nnz", "sparsity", "2:4 eligible"):
        table.add_column(column, justify="right" if column in ("nnz", "sparsity") else "left")
    if report.require_nm:
        table.add_column(f"{report.require_nm}")
    for layer in report.layers:
        row = [
            layer.name,
            "x".join(map(str, layer.shape)),
            layer.kind + (" (tied)" if layer.tied else ""),
            "-" if layer.axis is None else str(layer.axis),
            "shape (guess)" if layer.source == "shape" else layer.source,
            f"{layer.nnz:,}",
            f"{layer.sparsity:.2%}",
            "yes" if layer.eligible_2_4 else f"no: {layer.eligible_reason}",
        ]
        if report.require_nm:
            if layer.nm_skipped_reason:
                row.append(f"skipped: {layer.nm_skipped_reason}")
            else:
                row.append("ok" if layer.nm_compliant else "VIOLATES")
        table.add_row(*row)
    out.print(table)
    out.print(
        f"sparsity {report.sparsity:.2%} over {report.prunable_params:,} pruned parameters; "
        f"compression {report.compression:.1f}x ({report.total_params:,} / {report.total_nonzero:,} nonzero)"
    )
    if report.guessed_layers:
        out.print(
            f"[yellow]note[/yellow]: {len(report.guessed_layers)} layer(s) have a kind and axis guessed from their shape "
            "(no model to ask); pass --model (and --trust-model-code for your own) to know them"
        )
    if report.violations:
        for v in report.violations:
            out.print(f"[red]FAIL[/red] {v.rule}" + (escape(f" [{v.layer}]") if v.layer else "") + f": {escape(v.message)}")
    else:
        out.print("[green]all rules hold[/green]")
