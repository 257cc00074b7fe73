"""``dnsconvert bench``: sparse latency against the fastest dense runtime, measured in the same run."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import console, emit_json, load_with_model, model_options, write_report


@click.command("bench")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--target", "targets", multiple=True, help="Target(s) to build and time (repeatable; default ort). Ignored for an artifact.")
@click.option("--batch", "batches", type=int, multiple=True, help="Batch size(s) (repeatable; default 1 and 64).")
@click.option("--warmup", type=int, default=20, show_default=True)
@click.option("--iterations", type=int, default=None, help="Timed calls per runner and batch, spread over the rounds [default: 200, unless --time-budget].")
@click.option("--time-budget", type=float, default=None, help="Seconds per runner and batch instead of a fixed count (bounds a large model's run).")
@click.option("--rounds", type=int, default=10, show_default=True, help="Interleaved rounds: every runner is timed in each round, in rotating order.")
@click.option("--confidence", type=float, default=0.95, show_default=True, help="Level of the speedup intervals (bootstrap over rounds).")
@click.option("--baseline", "baselines", type=click.Choice(["fp32", "int8", "none"]), multiple=True, help="ONNX Runtime dense baselines (repeatable; default fp32 and int8).")
@click.option("--threads", type=int, default=0, help="Intra-op threads for every runtime (0: defaults; torch-sparse-cpu then splits its kernels over the threads its plan was timed with); recorded in the report.")
@click.option("--pin-cpus", is_flag=True, help="Also bind the process to the first --threads CPUs.")
@click.option("--min-speedup", type=float, default=None, help="Gate: fail (exit 1) if a speedup against the fastest dense runtime is below this beyond noise (the upper end of its interval).")
@click.option("--json", "as_json", is_flag=True)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar (shown on stderr unless --json).")
@click.option("--report", type=click.Path(path_type=Path), default=None, help="Also write the JSON report here.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, help="Write a speedup and latency plot (PNG) here (needs matplotlib).")
@model_options
def bench_cmd(source: Path, targets, batches, warmup, iterations, time_budget, rounds, confidence, baselines, threads, pin_cpus, min_speedup, as_json, no_progress, report, plot, model_options) -> None:
    """Time a checkpoint (built for each --target) or an artifact folder against the fastest dense runtime."""
    from ..artifact import MANIFEST_NAME, load_artifact
    from .._atomic import check_outputs
    from ..bench import bench, check_bench_settings
    from ..errors import GateFailed

    batches = batches or (1, 64)
    # the settings first: a mistake there is one line before anything is loaded or built
    check_bench_settings(batches=batches, warmup=warmup, iterations=iterations, time_budget_s=time_budget, threads=threads, rounds=rounds, confidence=confidence)
    check_outputs([report, plot], [source, *(source.iterdir() if source.is_dir() else ())])
    if source.is_dir() or source.name == MANIFEST_NAME:
        subject = load_artifact(source)
    else:
        subject = load_with_model(source, model_options)
    chosen = () if "none" in baselines else (baselines or ("fp32", "int8"))
    result = bench(
        subject,
        targets=targets or ("ort",),
        batches=batches,
        warmup=warmup,
        iterations=iterations,
        time_budget_s=time_budget,
        threads=threads,
        rounds=rounds,
        confidence=confidence,
        baselines=chosen,
        pin_cpus=pin_cpus,
        trust_model_code=model_options.trust_model_code,
        progress=not (no_progress or as_json),
    )
    data = result.to_json()
    write_report(report, data)
    if plot:
        from ..bench.plot import plot_report

        plot_report(result, plot)
    if as_json:
        emit_json(data)
    else:
        render(result, f"bench {source}")
    if min_speedup is not None:
        slow = result.below(min_speedup)
        if slow:
            raise GateFailed(
                f"speedup below --min-speedup {min_speedup} beyond noise: "
                + ", ".join(f"{s.target} batch {s.batch} {s.vs_fastest_dense.value:.2f}x [{s.vs_fastest_dense.low:.2f}, {s.vs_fastest_dense.high:.2f}] vs {s.fastest_dense}" for s in slow)
            )


def render(result, title: str) -> None:
    """Speedups first (against the fastest dense runtime, with interval), then every row's latency."""
    from rich.table import Table

    settings = result.thread_settings
    threads = f"{result.threads or 'default'} threads"
    if settings is not None:
        threads += f", OpenMP runtimes {settings.openmp_runtimes or 'none'}, numba {settings.numba_threading_layer or 'not loaded'}"
    level = f"{result.confidence:.0%}"
    speed = Table(title=f"{title} ({threads}; {result.rounds} interleaved rounds)", title_justify="left")
    for column in ("target", "batch", "sparse p50", f"vs fastest dense [{level}]", "verdict", "fastest dense", "vs own dense", "vs int8 dense"):
        speed.add_column(column, justify="left" if column in ("target", "verdict", "fastest dense") else "right")
    for s in result.comparisons:
        speed.add_row(
            s.target, str(s.batch), f"{s.sparse_p50_ms:.4f} ms", s.vs_fastest_dense.text(), s.vs_fastest_dense.verdict,
            f"{s.fastest_dense} ({s.fastest_dense_p50_ms:.4f} ms)",
            s.vs_own_dense.text() if s.vs_own_dense else "-", s.vs_int8_dense.text() if s.vs_int8_dense else "-",
        )  # fmt: skip
    rows = Table(title="latency", title_justify="left")
    for column in ("runtime", "variant", "batch", "p50", "p90", "p99", "throughput/s"):
        rows.add_column(column, justify="left" if column in ("runtime", "variant") else "right")
    for r in result.rows:
        rows.add_row(r.target, r.variant, str(r.stats.batch), f"{r.stats.p50_ms:.4f} ms", f"{r.stats.p90_ms:.4f} ms", f"{r.stats.p99_ms:.4f} ms", f"{r.stats.throughput:,.0f}")
    out = console()
    out.print(speed)
    out.print(rows)
    for note in result.baseline_notes:
        out.print(note)
    for target, note in result.notes.items():
        out.print(f"{target}: exploits sparsity? {note}")
