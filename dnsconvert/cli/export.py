"""``dnsconvert export`` and ``dnsconvert densify``."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import checkpoint_argument, console, emit_json, load_with_model, model_options, trust_option


def parse_target_options(pairs: tuple[str, ...]) -> dict[str, str]:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r}: write target options as -T key=value")
        options[key.strip()] = value.strip()
    return options


@click.command("export")
@checkpoint_argument
@click.option("--target", "target_name", default="ort", show_default=True, help="Target runtime; see `dnsconvert targets`.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Artifact path (its dense twin and manifest go beside it).")
@click.option("-T", "target_options", multiple=True, metavar="KEY=VALUE", help="Target-specific option (repeatable).")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Parity tolerance, absolute.")
@click.option("--rtol", type=float, default=1e-4, show_default=True, help="Parity tolerance, relative.")
@model_options
@trust_option
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_cmd(checkpoint: Path, target_name: str, output: Path, target_options: tuple[str, ...], atol: float, rtol: float, model: str | None, input_shape: str | None, trust_model_code: bool, as_json: bool) -> None:
    """Build a target's sparse artifact (and its dense baseline) from a checkpoint."""
    from .._atomic import check_outputs
    from ..export import dense_twin_path
    from ..export.manifest import manifest_path_for
    from ..limits import check_input
    from ..targets import BuildOptions, get_target

    check_outputs([output, dense_twin_path(output), manifest_path_for(output)], [checkpoint])
    options = parse_target_options(target_options)
    target = get_target(target_name)
    target.check_options(options)
    ckpt = load_with_model(checkpoint, model, input_shape)
    if ckpt.model is not None and ckpt.model.input_shape:  # parity runs batches up to 4
        check_input((4, *ckpt.model.input_shape[1:]), "the parity input", path=checkpoint)
    artifact = target.build(ckpt, output, BuildOptions(atol=atol, rtol=rtol, trust_model_code=trust_model_code, extra=options))
    if as_json:
        emit_json(artifact.manifest)
        return
    render_manifest(artifact)


def render_manifest(artifact) -> None:
    from rich.table import Table

    m = artifact.manifest
    out = console()
    table = Table(title=f"{artifact.target}: {artifact.path}", title_justify="left")
    for column in ("layer", "initializer", "shape", "sparsity", "stored"):
        table.add_column(column)
    for layer in m.get("layers", []):
        table.add_row(layer["param"], layer["initializer"], "x".join(map(str, layer["shape"])), f"{layer['sparsity']:.2%}", "sparse" if layer["stored_sparse"] else "dense")
    out.print(table)
    sizes = m.get("sizes")
    if sizes:
        out.print(f"size: sparse {sizes['sparse_bytes']:,} B / dense {sizes['dense_bytes']:,} B = {sizes['ratio']:.3f}x")
    parity = m.get("parity")
    if parity:
        out.print(f"parity: max |Δ| {parity['max_abs']:.3g}, max rel {parity['max_rel']:.3g} (atol {parity['atol']:g}, rtol {parity['rtol']:g}) {'ok' if parity['passed'] else 'FAILED'}")
    eligible = [g["initializer"] for g in m.get("graph_2_4", []) if g.get("compliant")]
    if "graph_2_4" in m:
        out.print(f"2:4 on the exported graph: {len(eligible)} of {len(m['graph_2_4'])} weights ({', '.join(eligible) or 'none'})")
    out.print(f"files: {', '.join(str(p) for p in artifact.files.values())}, manifest {artifact.manifest_path}")


@click.command("densify")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
def densify_cmd(source: Path, output: Path) -> None:
    """Sparse-initializer ONNX -> dense ONNX (for parsers that read only graph.initializer)."""
    from ..export import densify_file

    densify_file(source, output)  # checks: no overwrite of the input, a checked ONNX read
    click.echo(f"wrote {output}")
