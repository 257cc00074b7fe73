"""Options and rendering shared by several commands."""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ModelOptions:
    """The model options of a command (:class:`dnsconvert.options.ModelChoice`) and the trust
    its user gave: the same on every command that may rebuild a model."""

    choice: Any
    trust_model_code: bool = False

    def apply(self, ckpt):
        return self.choice.apply(ckpt)


def load_with_model(path: Path, options: ModelOptions | None = None):
    """Load a checkpoint; the model options attach or override its model spec (e.g. for a bare state dict)."""
    from ..loading import load_checkpoint

    ckpt = load_checkpoint(path)
    return options.apply(ckpt) if options is not None else ckpt


def model_options(func):
    """Add the model options (and --trust-model-code); the command gets one ``model_options``."""
    from ..options import ModelChoice
    from ._schema import options_from, schema_options

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        trust = kwargs.pop("trust_model_code")
        choice = options_from(ModelChoice, kwargs)
        return func(*args, model_options=ModelOptions(choice, trust), **kwargs)

    return schema_options(ModelChoice)(trust_option(wrapper))


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
