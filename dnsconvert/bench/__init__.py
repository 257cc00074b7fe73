"""Benchmark a sparse artifact against its dense baseline on the same runtime.

:func:`bench` builds (or reads) each target's artifact, times the dense and the sparse
variant at every batch size with the same inputs, thread count and warm-up, and returns a
BenchReport: rows of latency statistics plus the speedup (dense p50 / sparse p50).
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .timing import LatencyStats, measure, percentile

__all__ = ["BenchReport", "BenchRow", "LatencyStats", "bench", "bench_artifact", "measure", "percentile"]

REPORT_VERSION = 1


@dataclass
class BenchRow:
    target: str
    variant: str  # dense | sparse
    stats: LatencyStats

    def to_json(self) -> dict:
        return {"target": self.target, "variant": self.variant, **self.stats.to_json()}


@dataclass
class BenchReport:
    model: str
    rows: list[BenchRow] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # target -> does it exploit sparsity?
    threads: int = 0

    def speedups(self) -> list[dict[str, Any]]:
        out = []
        by_key = {(r.target, r.variant, r.stats.batch): r.stats for r in self.rows}
        for (target, variant, batch), sparse in by_key.items():
            if variant != "sparse" or (target, "dense", batch) not in by_key:
                continue
            dense = by_key[(target, "dense", batch)]
            out.append({"target": target, "batch": batch, "dense_p50_ms": dense.p50_ms, "sparse_p50_ms": sparse.p50_ms, "speedup": dense.p50_ms / sparse.p50_ms})
        return out

    def to_json(self) -> dict:
        return {
            "kind": "bench-report",
            "report_version": REPORT_VERSION,
            "model": self.model,
            "threads": self.threads,
            "rows": [r.to_json() for r in self.rows],
            "speedups": self.speedups(),
            "exploits_sparsity": self.notes,
        }


def bench_artifact(
    artifact,
    *,
    batches: Sequence[int],
    warmup: int,
    iterations: int | None,
    time_budget_s: float | None,
    threads: int,
    report: BenchReport,
    trust_model_code: bool = False,
) -> None:
    from ..model_io import sample_feeds
    from ..targets import get_target

    target = get_target(artifact.target)
    report.notes[artifact.target] = target.exploits_sparsity
    spec = artifact.manifest.model_spec
    if spec is None or not spec.inputs:
        raise UserError("the artifact's manifest has no model inputs to feed", path=artifact.manifest_path, hint="re-export it")
    options = {"threads": str(threads)} if threads and "threads" in target.option_help else {}
    for variant in ("dense", "sparse"):
        runner = target.load(artifact, variant, options, trust_model_code=trust_model_code)
        try:
            for batch in batches:
                feeds = sample_feeds(spec.inputs, batch=batch, seed=0, where=artifact.manifest_path)
                # GPU runners take the inputs on the device once (prepare), so the timing is the model's
                call = (lambda h=runner.prepare(feeds): runner.run_device(h)) if hasattr(runner, "prepare") else (lambda: runner.run(feeds))
                stats = measure(call, batch=batch, warmup=warmup, iterations=iterations, time_budget_s=time_budget_s, synchronize=runner.synchronize)
                report.rows.append(BenchRow(artifact.target, variant, stats))
        finally:
            runner.close()


def bench(
    source: Any,
    *,
    targets: Sequence[str] = ("ort",),
    batches: Sequence[int] = (1, 64),
    warmup: int = 20,
    iterations: int | None = 200,
    time_budget_s: float | None = None,
    threads: int = 0,
    workdir: str | Path | None = None,
    build_options: dict[str, str] | None = None,
    trust_model_code: bool = False,
) -> BenchReport:
    """Benchmark a SparseCheckpoint (built for each target) or an Artifact (as built).

    Args:
        source: a SparseCheckpoint, or an Artifact / its folder.
        targets: targets to build for when ``source`` is a checkpoint.
        batches, warmup, iterations, time_budget_s: the timing plan.
        threads: intra-op threads for every runtime (0: each runtime's default).
        workdir: where to build artifacts (default: a temporary directory).
        trust_model_code: allow rebuilding a model factory outside dnsconvert (the caller's
            decision, never an artifact's).
    """
    from ..checkpoint import SparseCheckpoint
    from ..targets import Artifact, build_artifact, get_target, load_artifact

    if threads:
        import torch

        torch.set_num_threads(threads)
    timing = {"batches": batches, "warmup": warmup, "iterations": iterations, "time_budget_s": time_budget_s, "threads": threads, "trust_model_code": trust_model_code}
    if isinstance(source, (str, Path)):
        source = load_artifact(source)
    if isinstance(source, Artifact):
        report = BenchReport(model=str(source.manifest.source.checkpoint), threads=threads)
        bench_artifact(source, report=report, **timing)
        return report
    if not isinstance(source, SparseCheckpoint):
        raise UserError(f"cannot benchmark a {type(source).__name__}")
    report = BenchReport(model=source.name, threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(workdir) if workdir else Path(tmp)
        for name in targets:
            extra = dict(build_options or {})
            if threads and "threads" in get_target(name).option_help:
                extra.setdefault("threads", str(threads))
            artifact = build_artifact(source, base / f"model-{name}", target=name, options=extra, trust_model_code=trust_model_code)
            bench_artifact(artifact, report=report, **timing)
    return report
