"""Benchmark sparse artifacts against the fastest dense runtime measured in the same run.

:func:`bench` builds (or reads) each target's artifact and loads every runner: the dense model
in ONNX Runtime (fp32 with its default spin-waiting workers and with spinning off, and int8
by ``onnxruntime.quantization.quantize_dynamic`` where it applies) and each target's dense and sparse variants. At each batch size all of them are timed
in the same interleaved rounds (:func:`dnsconvert.timing.measure_interleaved`), with the same
inputs and thread settings. The headline is ``speedup_vs_fastest_dense``: the fastest fp32
dense p50 of the run (over ONNX Runtime's two settings and every target's dense variant) divided by the sparse p50, with a bootstrap confidence interval ("within
noise" when it spans 1.0). The ratio to the target's own dense variant and to int8 dense follow.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..timing import Interleaved, LatencyStats, Ratio, ThreadSettings, measure, measure_interleaved, percentile, pin_threads

__all__ = ["BASELINE", "BenchReport", "BenchRow", "LatencyStats", "Speedup", "bench", "bench_runners", "measure", "percentile"]

REPORT_VERSION = 2
BASELINE = "onnxruntime"  # the target name of the reference dense rows
DENSE, SPARSE, INT8 = "dense", "sparse", "dense-int8"
NO_SPIN = "dense-nospin"  # ONNX Runtime fp32 dense with its workers' spin-waiting off
FP32_DENSE = (DENSE, NO_SPIN)  # variants that compete for "fastest dense"
# untimed calls at the start of each block for at least this long: the previous runner's idle
# workers (ONNX Runtime spins ~30-40 ms after a call) would otherwise share the cores with the
# first timed calls (see timing.measure_interleaved)
BLOCK_SETTLE_S = 0.05


@dataclass
class BenchRow:
    target: str  # a target name, or "onnxruntime" for the reference dense models
    variant: str  # dense | sparse | dense-int8
    stats: LatencyStats

    @property
    def label(self) -> str:
        return f"{self.target} {self.variant}"

    def to_json(self) -> dict:
        return {"target": self.target, "variant": self.variant, "precision": "int8" if self.variant == INT8 else "fp32", **self.stats.to_json()}


@dataclass
class Speedup:
    """One sparse row against the dense rows of the same batch (all ratios: dense p50 / sparse p50)."""

    target: str
    batch: int
    sparse_p50_ms: float
    fastest_dense: str  # label of the fastest fp32 dense row
    fastest_dense_p50_ms: float
    vs_fastest_dense: Ratio
    vs_own_dense: Ratio | None = None
    own_dense_p50_ms: float | None = None
    vs_int8_dense: Ratio | None = None

    def to_json(self) -> dict:
        def ratio(r: Ratio | None) -> dict | None:
            return None if r is None else {"value": r.value, "low": r.low, "high": r.high, "confidence": r.confidence, "verdict": r.verdict, "baseline": r.baseline}

        return {
            "target": self.target,
            "batch": self.batch,
            "speedup": self.vs_fastest_dense.value,  # the headline: against the fastest dense runtime
            # the baseline named is the fastest dense row; the interval resamples that choice among all of them
            "speedup_vs_fastest_dense": {**ratio(self.vs_fastest_dense), "baseline": self.fastest_dense, "baseline_p50_ms": self.fastest_dense_p50_ms, "chosen_from": self.vs_fastest_dense.baseline},
            "speedup_vs_own_dense": ratio(self.vs_own_dense),
            "speedup_vs_int8_dense": ratio(self.vs_int8_dense),
            "sparse_p50_ms": self.sparse_p50_ms,
            "dense_p50_ms": self.own_dense_p50_ms,
        }


@dataclass
class BenchReport:
    model: str
    rows: list[BenchRow] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)  # target -> does it exploit sparsity?
    threads: int = 0
    thread_settings: ThreadSettings | None = None
    comparisons: list[Speedup] = field(default_factory=list)
    rounds: int = 0
    confidence: float = 0.95
    baseline_notes: list[str] = field(default_factory=list)  # why a baseline is missing
    own_dense_alias: dict[str, str] = field(default_factory=dict)  # target -> row that is its dense variant

    def speedups(self) -> list[dict[str, Any]]:
        return [c.to_json() for c in self.comparisons]

    def below(self, floor: float, target: str | None = None) -> list[Speedup]:
        """The comparisons slower than ``floor`` beyond the noise: the upper end of their
        interval against the fastest dense runtime is under it (what a speed gate fails on)."""
        return [c for c in self.comparisons if (target is None or c.target == target) and c.vs_fastest_dense.high < floor]

    def to_json(self) -> dict:
        return {
            "kind": "bench-report",
            "report_version": REPORT_VERSION,
            "model": self.model,
            "threads": self.threads,
            "thread_settings": self.thread_settings.to_json() if self.thread_settings else None,
            "rounds": self.rounds,
            "confidence": self.confidence,
            "rows": [r.to_json() for r in self.rows],
            "speedups": self.speedups(),
            "exploits_sparsity": self.notes,
            "baseline_notes": self.baseline_notes,
            "own_dense_is": self.own_dense_alias,
        }


def _no_spin_runner(model: bytes, threads: int, where: Any):
    """ONNX Runtime's runner (its input checks and messages) on a session whose workers do not spin."""
    from ..targets.ort import OrtRunner
    from ..targets.sparse_graph import ort_session

    runner = OrtRunner(model, threads, where=where)
    runner.session = ort_session(model, threads, spinning=False)
    return runner


@dataclass
class _Entry:
    target: str
    variant: str
    runner: Any


def compare_rows(timed: Interleaved, entries: Sequence[_Entry], batch: int, confidence: float, aliases: dict[str, str] | None = None) -> tuple[list[BenchRow], list[Speedup]]:
    """Rows for every entry and a Speedup for every sparse entry, from one interleaved timing."""
    label = {id(e): f"{e.target} {e.variant}" for e in entries}
    rows = [BenchRow(e.target, e.variant, timed.stats(label[id(e)])) for e in entries]
    p50 = {label[id(e)]: row.stats.p50_ms for e, row in zip(entries, rows)}
    dense = [label[id(e)] for e in entries if e.variant in FP32_DENSE]
    int8 = next((label[id(e)] for e in entries if e.variant == INT8), None)
    speedups = []
    for e in entries:
        if e.variant != SPARSE:
            continue
        sparse = label[id(e)]
        if not dense:
            continue
        fastest = min(dense, key=p50.get)
        head = timed.ratio(dense, sparse, confidence=confidence)  # the choice of the fastest is resampled too
        own = (aliases or {}).get(e.target, f"{e.target} {DENSE}")
        own = own if own in p50 else None
        speedups.append(
            Speedup(
                target=e.target, batch=batch, sparse_p50_ms=p50[sparse], fastest_dense=fastest, fastest_dense_p50_ms=p50[fastest],
                vs_fastest_dense=head,
                vs_own_dense=timed.ratio(own, sparse, confidence=confidence) if own else None, own_dense_p50_ms=p50.get(own) if own else None,
                vs_int8_dense=timed.ratio(int8, sparse, confidence=confidence) if int8 else None,
            )
        )  # fmt: skip
    return rows, speedups


def bench_runners(
    entries: Sequence[_Entry], report: BenchReport, *, inputs: Sequence[Any], batches: Sequence[int], warmup: int,
    iterations: int | None, time_budget_s: float | None, rounds: int, confidence: float, where: Any = None,
    progress: bool = False,
) -> None:  # fmt: skip
    """Time every runner at every batch in the same interleaved rounds (same feeds for all:
    ``inputs`` are the model's InputSpecs); add rows and speedups to ``report``. ``progress``:
    a bar per batch on stderr (a large model at batch 64 can take many minutes per runner)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from ..model_io import sample_feeds

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    # On stderr, so that the table or JSON on stdout stays whole; gone once done. Redrawn only
    # between blocks (auto_refresh off): rich's refresh thread would wake ten times a second
    # inside the timed calls, on the cores the runners use.
    console = Console(stderr=True)
    with Progress(*columns, console=console, disable=not (progress and console.is_terminal), transient=True, auto_refresh=False) as bar:
        for batch in batches:
            feeds = sample_feeds(inputs, batch=batch, seed=0, where=where)
            calls, syncs = {}, {}
            for e in entries:
                key = f"{e.target} {e.variant}"
                runner = e.runner
                # GPU runners take the inputs on the device once (prepare), so the timing is the model's
                calls[key] = (lambda r=runner, h=runner.prepare(feeds): r.run_device(h)) if hasattr(runner, "prepare") else (lambda r=runner: r.run(feeds))
                syncs[key] = runner.synchronize
            per_round = max(1, -(-iterations // rounds)) if iterations is not None else None
            budget = time_budget_s * len(calls) if time_budget_s is not None else None
            task = bar.add_task(f"bench batch {batch}", total=len(calls) * (rounds + 1))

            def done(name: str, task=task, batch=batch) -> None:
                bar.update(task, advance=1, description=f"bench batch {batch}: {name}", refresh=True)

            timed = measure_interleaved(calls, batch=batch, rounds=rounds, iterations=per_round, time_budget_s=budget, warmup=warmup, settle_s=BLOCK_SETTLE_S, synchronize=syncs, done=done)
            bar.remove_task(task)
            rows, speedups = compare_rows(timed, entries, batch, confidence, report.own_dense_alias)
            report.rows.extend(rows)
            report.comparisons.extend(speedups)
    report.rounds, report.confidence = rounds, confidence


def baseline_entries(dense_onnx: Path | None, workdir: Path, threads: int, *, int8: bool, notes: list[str], origin: Path | None = None) -> list[_Entry]:
    """ONNX Runtime running the dense model in fp32 and, where quantize_dynamic applies, int8.
    ``origin``: the file the model came from, named in errors (``dense_onnx`` may be a copy)."""
    if dense_onnx is None:
        return []
    from ..targets.ort import OrtRunner

    entries = [_Entry(BASELINE, DENSE, OrtRunner(dense_onnx.read_bytes(), threads, where=origin or dense_onnx))]
    if threads != 1:
        # ONNX Runtime's workers spin after each run by default: fastest on an idle machine,
        # slower when other processes want the cores. Both settings are timed; the faster counts.
        entries.append(_Entry(BASELINE, NO_SPIN, _no_spin_runner(dense_onnx.read_bytes(), threads, origin or dense_onnx)))
    if int8:
        try:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = workdir / "baseline.int8.onnx"
            logging.disable(logging.WARNING)  # it logs advice to the root logger: the CLI's stderr is one line per error
            try:
                quantize_dynamic(str(dense_onnx), str(quantized), weight_type=QuantType.QInt8)
            finally:
                logging.disable(logging.NOTSET)
            entries.append(_Entry(BASELINE, INT8, OrtRunner(quantized.read_bytes(), threads, where=origin or quantized)))
        except Exception as exc:  # quantization is a courtesy baseline; its failure is reported, not fatal
            notes.append(f"int8 baseline unavailable: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return entries


def dense_onnx_of(artifact, workdir: Path, *, notes: list[str], trust_model_code: bool = False) -> Path | None:
    """The dense ONNX model behind an artifact: its own dense file if it is ONNX (hash-checked),
    else an export of the checkpoint its manifest names."""
    dense = artifact.files.get(DENSE)
    if dense is not None and Path(dense).suffix == ".onnx":
        path = workdir / "baseline.dense.onnx"
        path.write_bytes(artifact.read(DENSE))
        return path
    source = artifact.manifest.source.checkpoint
    if source and Path(source).is_file():
        from ..loading import load_checkpoint

        return export_dense_onnx(load_checkpoint(source), workdir, trust_model_code=trust_model_code)
    notes.append("onnxruntime dense baseline unavailable: the artifact has no dense ONNX file and its checkpoint is not found")
    return None


def _same_bytes(artifact, dense_onnx: Path) -> bool:
    """Is the artifact's dense file the very model the baseline runs?"""
    record = artifact.manifest.files.get(DENSE)
    if record is None or not record.path.endswith(".onnx") or record.bytes != dense_onnx.stat().st_size:
        return False
    import hashlib

    return hashlib.sha256(dense_onnx.read_bytes()).hexdigest() == record.sha256


def export_dense_onnx(ckpt, workdir: Path, *, trust_model_code: bool = False) -> Path:
    from ..export import export_checkpoint

    path = workdir / "baseline.dense.onnx"
    path.write_bytes(export_checkpoint(ckpt, trust_code=trust_model_code).model.SerializeToString())
    return path


DEFAULT_ITERATIONS = 200


def check_bench_settings(*, batches: Sequence[int], warmup: int, iterations: int | None, time_budget_s: float | None, threads: int, rounds: int, confidence: float) -> int | None:
    """A user's bench settings, checked before anything is built (one-line errors, not a
    runtime's traceback halfway through); returns the timed calls per runner (None: by time)."""
    if not batches or any(int(b) < 1 for b in batches):
        raise UserError(f"batch sizes must be at least 1, got {', '.join(map(str, batches)) or 'none'}")
    if warmup < 0:
        raise UserError(f"warm-up calls must be 0 or more, got {warmup}")
    if iterations is not None and time_budget_s is not None:
        raise UserError("give iterations or a time budget, not both", hint="a time budget ends each runner's share after that many seconds; iterations after that many calls")
    if iterations is not None and iterations < 1:
        raise UserError(f"iterations must be at least 1, got {iterations}", hint="or give a time budget in seconds instead")
    if time_budget_s is not None and not (math.isfinite(time_budget_s) and time_budget_s > 0):
        raise UserError(f"the time budget must be a positive, finite number of seconds, got {time_budget_s}")
    if threads < 0:
        raise UserError(f"threads must be 0 (each runtime's default) or more, got {threads}")
    if rounds < 1:
        raise UserError(f"rounds must be at least 1, got {rounds}")
    if not 0.5 <= confidence < 1.0:
        raise UserError(f"confidence {confidence} must be in [0.5, 1)", hint="e.g. 0.95")
    return DEFAULT_ITERATIONS if iterations is None and time_budget_s is None else iterations


def bench(
    source: Any,
    *,
    targets: Sequence[str] = ("ort",),
    batches: Sequence[int] = (1, 64),
    warmup: int = 20,
    iterations: int | None = None,
    time_budget_s: float | None = None,
    threads: int = 0,
    rounds: int = 10,
    confidence: float = 0.95,
    baselines: Sequence[str] = ("fp32", "int8"),
    pin_cpus: bool = False,
    workdir: str | Path | None = None,
    build_options: dict[str, dict[str, str]] | None = None,
    trust_model_code: bool = False,
    progress: bool = False,
) -> BenchReport:
    """Benchmark a SparseCheckpoint (built for each target) or an Artifact (as built).

    Args:
        source: a SparseCheckpoint, or an Artifact / its folder.
        targets: targets to build for when ``source`` is a checkpoint.
        batches, warmup: batch sizes, untimed calls per runner before the first round.
        iterations / time_budget_s: timed calls, or seconds, per runner and batch, spread over
            ``rounds``: one of them (neither: 200 calls).
        threads: intra-op threads for every runtime (0: each runtime's default; torch-sparse-cpu's
            kernels then split over the threads their plan was timed with), recorded in the report.
        rounds, confidence: interleaving rounds and the level of the speedup intervals.
        baselines: ONNX Runtime dense baselines to add: ``fp32`` and/or ``int8`` (none: only the targets' own dense).
        pin_cpus: also bind the process to the first ``threads`` CPUs.
        workdir: where to build artifacts (default: a temporary directory).
        build_options: ``-T`` options per target name, e.g. ``{"torch-sparse-cpu": {"plan": "sparsity"}}``.
        trust_model_code: allow rebuilding a model factory outside dnsconvert (the caller's
            decision, never an artifact's).
        progress: show a progress bar per batch on stderr while timing.
    """
    from ..checkpoint import SparseCheckpoint
    from ..targets import Artifact, build_artifact, get_target, load_artifact

    unknown = sorted(set(baselines) - {"fp32", "int8"})
    if unknown:
        raise UserError(f"unknown baseline {', '.join(unknown)}", hint="choose fp32 and/or int8")
    iterations = check_bench_settings(batches=batches, warmup=warmup, iterations=iterations, time_budget_s=time_budget_s, threads=threads, rounds=rounds, confidence=confidence)
    pin_threads(threads, pin_cpus=pin_cpus)  # before any runtime is loaded: torch and numba pools take it at start
    if isinstance(source, (str, Path)):
        source = load_artifact(source)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(workdir) if workdir else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        origin = None  # the artifact file the baseline model was copied from, for messages
        if isinstance(source, Artifact):
            artifacts = [source]
            report = BenchReport(model=str(source.manifest.source.checkpoint), threads=threads)
            spec, where = source.manifest.model_spec, source.manifest_path
            dense_onnx = dense_onnx_of(source, base, notes=report.baseline_notes, trust_model_code=trust_model_code) if baselines else None
            origin = source.files.get(DENSE) if dense_onnx is not None and Path(source.files.get(DENSE, "")).suffix == ".onnx" else None
        elif isinstance(source, SparseCheckpoint):
            report = BenchReport(model=source.name, threads=threads)
            spec, where = source.model, source.source
            artifacts = []
            for name in targets:
                extra = dict((build_options or {}).get(name, {}))
                if threads and "threads" in get_target(name).option_help:
                    extra.setdefault("threads", str(threads))
                artifacts.append(build_artifact(source, base / f"model-{name}", target=name, options=extra, trust_model_code=trust_model_code))
            onnx_dense = [a for a in artifacts if Path(a.files.get(DENSE, "")).suffix == ".onnx"]
            dense_onnx = None
            if baselines:
                dense_onnx = dense_onnx_of(onnx_dense[0], base, notes=report.baseline_notes) if onnx_dense else export_dense_onnx(source, base, trust_model_code=trust_model_code)
                origin = onnx_dense[0].files[DENSE] if onnx_dense else None
        else:
            raise UserError(f"cannot benchmark a {type(source).__name__}")
        if spec is None or not spec.inputs:
            raise UserError("the model's inputs are unknown, so there is nothing to feed", path=where, hint="re-export it, or pass --input-shape")
        entries: list[_Entry] = []
        try:
            if baselines:
                found = baseline_entries(dense_onnx, base, threads, int8="int8" in baselines, notes=report.baseline_notes, origin=origin)
                entries += [e for e in found if (e.variant in FP32_DENSE and "fp32" in baselines) or e.variant == INT8]
            same_as_baseline = {}
            for artifact in artifacts:
                target = get_target(artifact.target)
                report.notes[artifact.target] = target.exploits_sparsity
                options = {"threads": str(threads)} if threads and "threads" in target.option_help else {}
                for variant in (DENSE, SPARSE):
                    if variant == DENSE and "fp32" in baselines and dense_onnx is not None and _same_bytes(artifact, dense_onnx):
                        # the target's dense variant is the reference model itself: time it once
                        same_as_baseline[artifact.target] = f"{BASELINE} {DENSE}"
                        continue
                    entries.append(_Entry(artifact.target, variant, target.load(artifact, variant, options, trust_model_code=trust_model_code)))
            report.own_dense_alias = same_as_baseline
            report.thread_settings = pin_threads(threads)  # after every runtime is loaded (with 0 it only records)
            bench_runners(
                entries, report, inputs=spec.inputs, batches=batches, warmup=warmup, iterations=iterations,
                time_budget_s=time_budget_s, rounds=rounds, confidence=confidence, where=where, progress=progress,
            )  # fmt: skip
        finally:
            for e in entries:
                e.runner.close()
    return report
