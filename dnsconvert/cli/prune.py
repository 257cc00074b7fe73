"""``dnsconvert prune``: train under Dynamic Network Surgery (or a baseline) to a sparse checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ._common import console, emit_json, parse_shape, render_sparsity_report, trust_option


def _pairs(values: tuple[str, ...], what: str) -> dict[str, float]:
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        try:
            out[name] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise click.BadParameter(f"{item!r}: write {what} as NAME=VALUE")
    return out


@click.command("prune")
@click.option("--model", "model_name", default="lenet300100", show_default=True, help="Built-in name (lenet300100, lenet5, mlp, convnet, transformer_mlp) or pkg.module:factory.")
@click.option("--model-kwargs", default="{}", help="JSON kwargs for the model factory.")
@click.option("--input-shape", default=None, help="Input shape for a model outside dnsconvert, e.g. 1,1,28,28.")
@trust_option
@click.option("--method", type=click.Choice(["dns", "magnitude", "imp"]), default="dns", show_default=True, help="DNS, or a baseline: one-shot magnitude + fine-tune, iterative magnitude pruning.")
@click.option("--criterion", type=click.Choice(["magnitude", "taylor", "movement"]), default="magnitude", show_default=True, help="Saliency for DNS cut/splice.")
@click.option("--c", "crate", type=float, default=3.0, show_default=True, help="DNS threshold: mean + c*std of the layer's saliency.")
@click.option("--layer-c", multiple=True, help="Per-layer c, NAME=VALUE (repeatable).")
@click.option("--gamma", type=float, default=1e-4, show_default=True, help="Mask-update probability (1+gamma*iter)^-power.")
@click.option("--power", type=float, default=1.0, show_default=True)
@click.option("--iter-stop", type=int, default=10_000, show_default=True, help="No DNS mask updates from this iteration on.")
@click.option("--reestimate/--no-reestimate", default=None, help="Recompute mean/std at every mask update (default: only for taylor/movement).")
@click.option("--target-sparsity", type=float, default=None, help="DNS: calibrate each layer's c to cut this fraction. Baselines: the sparsity to reach (default 0.9).")
@click.option("--layer-sparsity", multiple=True, help="Per-layer DNS target, NAME=FRACTION (repeatable).")
@click.option("--nm", default=None, metavar="N:M", help="Constrain DNS masks to N:M along the reduction axis.")
@click.option("--prune-bias", is_flag=True, help="Also mask biases (the reference code does).")
@click.option("--epochs", type=float, default=1.0, show_default=True, help="Epochs of DNS / fine-tuning / each IMP round.")
@click.option("--dense-epochs", type=float, default=0.0, show_default=True, help="Train the dense model this long first.")
@click.option("--finetune-epochs", type=float, default=0.0, show_default=True, help="DNS: masked fine-tuning after the DNS phase (masks fixed, learning-rate schedule restarted).")
@click.option("--finetune-lr", type=float, default=None, help="Peak learning rate of the masked fine-tuning (default: --lr).")
@click.option("--imp-rounds", type=int, default=5, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=0.01, show_default=True)
@click.option("--optimizer", type=click.Choice(["sgd", "adam", "adamw"]), default="sgd", show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--lr-schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--data", default="auto", show_default=True, help="MNIST directory, 'mnist', 'synthetic', or 'auto' ($DNSCONVERT_MNIST, cache, download, else synthetic).")
@click.option("--init", "init_path", type=click.Path(path_type=Path), default=None, help="Start from this checkpoint's weights (and masks).")
@click.option("--resume", "resume_path", type=click.Path(path_type=Path), default=None, help="Continue an interrupted run from its checkpoint.")
@click.option("--checkpoint-every", type=int, default=500, show_default=True, help="Write the output checkpoint every N steps (atomically).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="The sparse checkpoint to write.")
@click.option("--json", "as_json", is_flag=True, help="Print the result summary as JSON.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def prune_cmd(**o) -> None:
    """Train a model under Dynamic Network Surgery and write a sparse checkpoint."""
    from ..checkpoint import load_checkpoint
    from ..models import resolve_spec
    from ..surgery import DNSConfig, PruneConfig, prune
    from ..surgery.train import maybe_init_distributed

    maybe_init_distributed()
    try:
        kwargs = json.loads(o["model_kwargs"])
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"--model-kwargs is not JSON ({exc.msg})") from None
    spec = resolve_spec(o["model_name"], parse_shape(o["input_shape"]), **kwargs)
    dns = DNSConfig(
        c=o["crate"],
        gamma=o["gamma"],
        power=o["power"],
        iter_stop=o["iter_stop"],
        criterion=o["criterion"],
        reestimate=o["reestimate"],
        target_sparsity=o["target_sparsity"],
        layer_sparsity=_pairs(o["layer_sparsity"], "--layer-sparsity"),
        layer_c=_pairs(o["layer_c"], "--layer-c"),
        nm=o["nm"],
        prune_bias=o["prune_bias"],
        seed=o["seed"],
    )
    config = PruneConfig(
        model=spec,
        method=o["method"],
        dns=dns,
        epochs=o["epochs"],
        dense_epochs=o["dense_epochs"],
        finetune_epochs=o["finetune_epochs"],
        finetune_lr=o["finetune_lr"],
        batch_size=o["batch_size"],
        lr=o["lr"],
        momentum=o["momentum"],
        optimizer=o["optimizer"],
        weight_decay=o["weight_decay"],
        lr_schedule=o["lr_schedule"],
        target_sparsity=o["target_sparsity"] if o["target_sparsity"] is not None else 0.9,
        imp_rounds=o["imp_rounds"],
        seed=o["seed"],
        checkpoint_every=o["checkpoint_every"],
        data=o["data"],
    )
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
        "test_accuracy": result.test_accuracy,
        "test_error": 1.0 - result.test_accuracy,
        "sparsity": result.sparsity,
        "compression": result.compression,
        "steps": result.steps,
        "wall_seconds": result.wall_seconds,
        "world_size": result.checkpoint.state.get("world_size", 1),
    }
    if o["as_json"]:
        emit_json(summary)
        return
    from ..validate import validate

    out = console()
    render_sparsity_report(validate(result.checkpoint), out)
    out.print(
        f"data {result.data_source}: test error {1 - result.test_accuracy:.2%}, sparsity {result.sparsity:.2%}, "
        f"compression {result.compression:.1f}x, {result.steps} steps in {result.wall_seconds:.1f}s -> {o['output']}"
    )
