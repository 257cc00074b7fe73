"""The bench plot (matplotlib is an optional extra: pip install dnsconvert[plot]).

Left: each target's speedup against the fastest dense runtime of the run, with its interval
(the headline); right: p50 latency of every runtime and variant, bar to p99.
"""

from __future__ import annotations

from pathlib import Path

from .._atomic import atomic_path
from ..errors import UserError


def plot_report(report, path: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plot needs matplotlib", hint="pip install 'dnsconvert[plot]'") from None
    batches = sorted({r.stats.batch for r in report.rows})
    fig, axes = plt.subplots(1, 1 + len(batches), figsize=(4.8 * (1 + len(batches)), 4.0), squeeze=False)
    ax = axes[0][0]
    labels = [f"{s.target}\nbatch {s.batch}" for s in report.comparisons]
    values = [s.vs_fastest_dense.value for s in report.comparisons]
    errors = [[s.vs_fastest_dense.value - s.vs_fastest_dense.low for s in report.comparisons], [s.vs_fastest_dense.high - s.vs_fastest_dense.value for s in report.comparisons]]
    ax.bar(range(len(values)), values, yerr=errors, capsize=4, color="tab:green")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_ylabel(f"speedup vs fastest dense ({report.confidence:.0%} interval)")
    ax.set_title("sparse vs fastest dense runtime")
    for ax, batch in zip(axes[0][1:], batches):
        rows = [r for r in report.rows if r.stats.batch == batch]
        ax.bar(range(len(rows)), [r.stats.p50_ms for r in rows], yerr=[[0] * len(rows), [r.stats.p99_ms - r.stats.p50_ms for r in rows]], capsize=3,
               color=["tab:green" if r.variant == "sparse" else "tab:gray" if r.variant == "dense" else "tab:blue" for r in rows])  # fmt: skip
        ax.set_xticks(range(len(rows)), [f"{r.target}\n{r.variant}" for r in rows], fontsize=7)
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("latency p50 (ms), bar to p99")
    fig.suptitle(f"{Path(report.model).name}: {report.threads or 'default'} threads, {report.rounds} interleaved rounds")
    fig.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format=target.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)
    return target
