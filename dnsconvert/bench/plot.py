"""The bench plot (matplotlib is an optional extra: pip install dnsconvert[plot])."""

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
    targets = sorted({r.target for r in report.rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 3.8), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for offset, variant in ((-0.2, "dense"), (0.2, "sparse")):
            values = [next((r.stats.p50_ms for r in report.rows if r.target == t and r.variant == variant and r.stats.batch == batch), 0.0) for t in targets]
            errors = [next((r.stats.p99_ms - r.stats.p50_ms for r in report.rows if r.target == t and r.variant == variant and r.stats.batch == batch), 0.0) for t in targets]
            ax.bar([i + offset for i in range(len(targets))], values, width=0.4, yerr=errors, capsize=3, label=variant)
        ax.set_xticks(range(len(targets)), targets, rotation=15)
        ax.set_title(f"batch {batch}")
        ax.set_ylabel("latency p50 (ms), bar to p99")
        ax.legend()
    fig.suptitle(f"dense vs sparse: {Path(report.model).name}")
    fig.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format=target.suffix.lstrip(".") or "png", dpi=110)
    plt.close(fig)
    return target
