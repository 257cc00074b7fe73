"""``dnsconvert bench``: latency of sparse vs dense on the same runtime."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import console, emit_json, load_with_model, model_options, write_report


@click.command("bench")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--target", "targets", multiple=True, help="Target(s) to build and time (repeatable; default ort). Ignored for an artifact.")
@click.option("--batch", "batches", type=int, multiple=True, help="Batch size(s) (repeatable; default 1 and 64).")
@click.option("--warmup", type=int, default=20, show_default=True)
@click.option("--iterations", type=int, default=200, show_default=True, help="Timed iterations (0: use --time-budget).")
@click.option("--time-budget", type=float, default=None, help="Seconds per measurement instead of a fixed count.")
@click.option("--threads", type=int, default=0, help="Intra-op threads for every runtime (0: defaults).")
@click.option("--min-speedup", type=float, default=None, help="Gate: fail (exit 1) if a target's speedup is below this.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Also write the JSON report here.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write a latency plot (PNG) here (needs matplotlib).")
@model_options
def bench_cmd(source: Path, targets, batches, warmup, iterations, time_budget, threads, min_speedup, as_json, report, plot, model_options) -> None:
    """Time a checkpoint (built for each --target) or an artifact folder: dense vs sparse."""
    from ..artifact import MANIFEST_NAME, load_artifact
    from .._atomic import check_outputs
    from ..bench import bench
    from ..errors import GateFailed

    check_outputs([report, plot], [source, *(source.iterdir() if source.is_dir() else ())])
    if source.is_dir() or source.name == MANIFEST_NAME:
        subject = load_artifact(source)
    else:
        subject = load_with_model(source, model_options)
    result = bench(
        subject,
        targets=targets or ("ort",),
        batches=batches or (1, 64),
        warmup=warmup,
        iterations=iterations or None,
        time_budget_s=time_budget,
        threads=threads,
        trust_model_code=model_options.trust_model_code,
    )
    data = result.to_json()
    write_report(report, data)
    if plot:
        from ..bench.plot import plot_report

        plot_report(result, plot)
    if as_json:
        emit_json(data)
    else:
        from rich.table import Table

        table = Table(title=f"bench {source} ({threads or 'default'} threads)", title_justify="left")
        for column in ("target", "batch", "dense p50", "sparse p50", "dense p99", "sparse p99", "speedup", "sparse throughput/s"):
            table.add_column(column, justify="right" if column not in ("target",) else "left")
        stats = {(r.target, r.variant, r.stats.batch): r.stats for r in result.rows}
        for s in result.speedups():
            d, sp = stats[(s["target"], "dense", s["batch"])], stats[(s["target"], "sparse", s["batch"])]
            table.add_row(s["target"], str(s["batch"]), f"{d.p50_ms:.3f} ms", f"{sp.p50_ms:.3f} ms", f"{d.p99_ms:.3f} ms", f"{sp.p99_ms:.3f} ms", f"{s['speedup']:.2f}x", f"{sp.throughput:,.0f}")
        out = console()
        out.print(table)
        for target, note in result.notes.items():
            out.print(f"{target}: exploits sparsity? {note}")
    if min_speedup is not None:
        slow = [s for s in result.speedups() if s["speedup"] < min_speedup]
        if slow:
            raise GateFailed("speedup below --min-speedup " + f"{min_speedup}: " + ", ".join(f"{s['target']} batch {s['batch']} {s['speedup']:.2f}x" for s in slow))
