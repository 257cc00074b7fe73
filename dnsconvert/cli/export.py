"""``dnsconvert export`` and ``dnsconvert densify``."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import checkpoint_argument, console, emit_json, load_with_model, model_options


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
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Artifact folder to write (model files and manifest.json; replaced as a whole, at one instant).")
@click.option("-T", "target_options", multiple=True, metavar="KEY=VALUE", help="Target-specific option (repeatable).")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Parity tolerance, absolute.")
@click.option("--rtol", type=float, default=1e-4, show_default=True, help="Parity tolerance, relative.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export_cmd(checkpoint: Path, target_name: str, output: Path, target_options: tuple[str, ...], atol: float, rtol: float, model_options, as_json: bool) -> None:
    """Build a target's artifact folder OUTPUT (sparse model, dense baseline, manifest.json) from a checkpoint."""
    from ..artifact.writer import check_destination
    from ..targets import build_artifact, resolve_target

    options = parse_target_options(target_options)
    resolve_target(target_name, options)  # unknown target or option: fail before loading anything
    check_destination(output, [checkpoint])
    ckpt = load_with_model(checkpoint, model_options)
    artifact = build_artifact(ckpt, output, target=target_name, options=options, atol=atol, rtol=rtol, trust_model_code=model_options.trust_model_code)
    if as_json:
        emit_json(artifact.manifest.to_json())
        return
    render_manifest(artifact)


def render_manifest(artifact) -> None:
    from rich.table import Table

    m = artifact.manifest
    out = console()
    table = Table(title=f"{artifact.target}: {artifact.root}", title_justify="left")
    for column in ("layer", "initializer", "shape", "sparsity", "stored"):
        table.add_column(column)
    for layer in m.layers:
        table.add_row(layer.param, layer.initializer, "x".join(map(str, layer.shape)), f"{layer.sparsity:.2%}", "sparse" if layer.stored_sparse else "dense")
    if m.layers:
        out.print(table)
    if m.sizes:
        out.print(f"size: sparse {m.sizes.sparse_bytes:,} B / dense {m.sizes.dense_bytes:,} B = {m.sizes.ratio:.3f}x")
    if m.parity:
        p = m.parity
        per_output = ", ".join(f"{o.name} {o.max_abs:.3g}" for o in p.outputs) if len(p.outputs) > 1 else ""
        out.print(
            f"parity: max |Δ| {p.max_abs:.3g}, max rel {p.max_rel:.3g} (atol {p.atol:g}, rtol {p.rtol:g}) {'ok' if p.passed else 'FAILED'}"
            + (f" [{per_output}]" if per_output else "")
        )
    if m.graph_2_4:
        eligible = [g.initializer for g in m.graph_2_4 if g.compliant]
        out.print(f"2:4 on the exported graph: {len(eligible)} of {len(m.graph_2_4)} weights ({', '.join(eligible) or 'none'})")
    out.print(f"artifact: {artifact.root} ({', '.join(f'{role} {r.path}' for role, r in m.files.items())}, manifest.json)")


@click.command("densify")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True)
def densify_cmd(source: Path, output: Path) -> None:
    """Sparse-initializer ONNX -> dense ONNX (for parsers that read only graph.initializer)."""
    from ..export import densify_file

    densify_file(source, output)  # checks: no overwrite of the input, a checked ONNX read
    click.echo(f"wrote {output}")
