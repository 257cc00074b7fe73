"""``dnsconvert prune``: train under Dynamic Network Surgery (or a baseline) to a sparse checkpoint.

Its options are :class:`dnsconvert.options.PruneOptions`, the schema a pipeline's ``[prune]``
section uses too.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..options import PruneOptions
from ._common import console, emit_json, render_sparsity_report, trust_option
from ._schema import options_from, schema_options


@click.command("prune")
@schema_options(PruneOptions)
@trust_option
@click.option("--init", "init_path", type=click.Path(path_type=Path), default=None, help="Start from this checkpoint's weights (and masks).")
@click.option("--resume", "resume_path", type=click.Path(path_type=Path), default=None, help="Continue an interrupted run from its checkpoint (its stored settings are used; trust is not).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The sparse checkpoint to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the result summary as JSON.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def prune_cmd(**o) -> None:
    """Train a model under Dynamic Network Surgery and write a sparse checkpoint."""
    from ..loading import load_checkpoint
    from ..surgery import prune
    from ..surgery.train import maybe_init_distributed

    from .._atomic import check_outputs

    # --resume X -o X is how an interrupted run continues; --init X -o X would destroy X
    check_outputs([o["output"]], [o["init_path"]])
    maybe_init_distributed()
    config = options_from(PruneOptions, o).to_config()
    init = load_checkpoint(o["init_path"]) if o["init_path"] else None
    resume = load_checkpoint(o["resume_path"]) if o["resume_path"] else None
    progress = not o["no_progress"] and not o["as_json"]
    result = prune(config, output=o["output"], init=init, resume=resume, progress=progress, trust_model_code=o["trust_model_code"])
    from .._atomic import sha256_file
    from ..surgery.train import _dist_info

    if _dist_info()[0] != 0:
        return
    summary = {
        "kind": "prune-result",
        "output": str(o["output"]),
        "sha256": sha256_file(o["output"]),
        "method": result.checkpoint.pruning.method if result.checkpoint.pruning else None,
        "data": result.data_source,
        "task": result.task,
        "test_accuracy": result.test_accuracy,
        "test_error": None if result.test_accuracy is None else 1.0 - result.test_accuracy,
        "test_loss": result.test_loss,
        "sparsity": result.sparsity,
        "compression": result.compression,
        "steps": result.steps,
        "wall_seconds": result.wall_seconds,
        "world_size": result.checkpoint.state.get("world_size", 1),
    }
    from ..validate import validate

    report = validate(result.checkpoint)
    # validate's dead-layer rule: the layers whose every weight is cut
    summary["emptied_layers"] = emptied = [v.layer for v in report.violations if v.rule == "dead-layer"]
    if o["as_json"]:
        emit_json(summary)
    else:
        out = console()
        render_sparsity_report(report, out)
        quality = f"test error {1 - result.test_accuracy:.2%}" if result.test_accuracy is not None else f"test loss {result.test_loss:.4g}"
        out.print(
            f"data {result.data_source}: {quality}, sparsity {result.sparsity:.2%}, "
            f"compression {result.compression:.1f}x, {result.steps} steps in {result.wall_seconds:.1f}s -> {o['output']}"
        )
    if emptied:  # last, after the report's dead-layer lines: why it happened and what to change
        console(stderr=True).print(f"[yellow]warning:[/] {emptied_hint(emptied, None if resume else config)}", highlight=False)


def emptied_hint(names: list[str], config) -> str:
    which = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    if config is not None and config.method == "dns" and config.dns.target_sparsity is None and not config.dns.layer_sparsity:
        why = (
            f"DNS's threshold (mean + c·std of |W|, c = {config.dns.c:g}) lay above every weight there, as it does on a "
            "freshly initialised layer whose |W| is uniform; give --target-sparsity or --layer-sparsity, a lower --c "
            "(or --layer-c), or --dense-epochs to train first"
        )
    else:
        why = "lower those layers' target sparsity (or DNS's c)"
    return f"every weight of {which} is cut (the model ignores its input there): {why}"
