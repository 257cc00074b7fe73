"""``dnsconvert project``: N:M projection of a checkpoint's masks."""

from __future__ import annotations

from pathlib import Path

import click

from ..options import ProjectOptions
from ._common import checkpoint_argument, console, emit_json, load_with_model, model_options, write_report
from ._schema import options_from, schema_options


@click.command("project")
@checkpoint_argument
@schema_options(ProjectOptions)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the projected checkpoint.")
@click.option("--json", "as_json", is_flag=True, help="Print the projection report as JSON.")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Also write the JSON report to this file.")
@model_options
def project_cmd(checkpoint: Path, output: Path, as_json: bool, report: Path | None, model_options, **params) -> None:
    """Project unstructured masks onto N:M along each layer's reduction axis.

    The layers and their axes come from the model (built in, or with --trust-model-code), else
    from the checkpoint's record; tensors of a bare state dict, whose kind is only guessed from
    their shape, are refused unless --model or --layers says what they are.
    """
    from .._atomic import check_outputs, sha256_file
    from ..pattern import NMPattern
    from ..project import project_nm
    from ..validate import ensure_usable

    check_outputs([output, report], [checkpoint])
    options = options_from(ProjectOptions, params)
    pattern = NMPattern.parse(options.nm)
    ckpt = ensure_usable(load_with_model(checkpoint, model_options))
    result = project_nm(ckpt, pattern, layers=list(options.layers) or None, prune_tied=options.prune_tied, trust_model_code=model_options.trust_model_code)
    result.checkpoint.save(output)
    data = {**result.to_json(), "input": str(checkpoint), "input_sha256": sha256_file(checkpoint), "output": str(output)}
    write_report(report, data)
    if as_json:
        emit_json(data)
        return
    from rich.table import Table

    table = Table(title=f"{checkpoint} -> {output} ({pattern})", title_justify="left")
    for column in ("layer", "sparsity before", "after", "|w| removed", "note"):
        table.add_column(column)
    for layer in result.layers:
        table.add_row(
            layer.name,
            f"{layer.sparsity_before:.2%}",
            f"{layer.sparsity_after:.2%}",
            f"{layer.removed_magnitude_fraction:.2%}",
            f"skipped: {layer.skipped_reason}" if layer.skipped_reason else "",
        )
    out = console()
    out.print(table)
    out.print(f"kept magnitude removed overall: {result.removed_magnitude_fraction:.2%}")
