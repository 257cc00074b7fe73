"""``dnsconvert run pipeline.toml``: prune -> validate -> project -> export -> bench in one file.

Each section is validated against the same option schema as its sub-command
(:mod:`dnsconvert.options`), and each stage calls the same library function. The stages are
a table of functions (:data:`STAGES`); each runs zero or more *steps*. A step is skipped
when its *key* — the sha256 of its settings, the content hashes of its inputs and the
dnsconvert version — equals the one recorded at its last successful run and its outputs
still hash to what was recorded. One JSON report covers the run; a failed gate (validation
rules, parity, minimum speedup) makes the run exit 1 and is named in the report. Trust to
run model code comes from the caller (``dnsconvert run --trust-model-code``), never the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass as schema

from . import __version__
from ._atomic import sha256_file, write_json_atomic
from .errors import DnsconvertError, GateFailed, PipelineError, UserError
from .options import BenchOptions, ExportOptions, ModelChoice, ProjectOptions, PruneOptions, ValidateOptions, parse_options

STATE_FILE = ".pipeline-state.json"
REPORT, PRUNED, PROJECTED = "report.json", "pruned.safetensors", "projected.safetensors"  # in the workdir


def export_folder(target: str) -> str:
    return f"model-{target}"
T = TypeVar("T")
SECTIONS = ("pipeline", "input", "prune", "validate", "project", "export", "bench")


@schema(frozen=True, config=ConfigDict(extra="forbid", strict=True))
class PipelineSettings:
    workdir: str = Field("pipeline-out", description="Folder of the run's outputs, relative to the pipeline file.")


@schema(frozen=True, config=ConfigDict(extra="forbid", strict=True))
class InputSettings(ModelChoice):
    checkpoint: str | None = Field(None, description="The checkpoint to start from (instead of a [prune] section).")


@schema(frozen=True, config=ConfigDict(extra="forbid", strict=True))
class BenchSettings(BenchOptions):
    artifact: str | None = Field(
        None,
        description="Also bench this artifact folder, relative to the pipeline file (e.g. one exported elsewhere); it is verified "
        "(paths, sizes, sha256) on every run, even when its bench step is skipped.",
    )


@dataclass(frozen=True)
class PipelineFile:
    """A pipeline file, validated: every section typed, no unknown key."""

    path: Path
    pipeline: PipelineSettings
    input: InputSettings | None = None
    prune: PruneOptions | None = None
    validate: ValidateOptions | None = None
    project: ProjectOptions | None = None
    export: ExportOptions | None = None
    bench: BenchSettings | None = None


@dataclass(frozen=True)
class Gate:
    """A pass/fail check a stage recorded (validation rules, parity, minimum speedup)."""

    gate: str
    passed: bool
    detail: str


@dataclass
class StageResult:
    name: str
    status: str  # ran | skipped | failed
    key: str
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)  # name -> path
    result: dict[str, Any] = field(default_factory=dict)
    gates: list[Gate] = field(default_factory=list)
    error: str | None = None
    rerun_because: str | None = None  # why a step that ran before ran again (e.g. a damaged output)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "gates": [asdict(g) for g in self.gates]}


@dataclass
class PipelineReport:
    pipeline: str
    workdir: str
    stages: list[StageResult] = field(default_factory=list)

    @property
    def failed_gates(self) -> list[dict[str, Any]]:
        return [dict(asdict(gate), stage=s.name) for s in self.stages for gate in s.gates if not gate.passed]

    @property
    def passed(self) -> bool:
        return not self.failed_gates and all(s.status != "failed" for s in self.stages)

    def gate_error(self) -> GateFailed:
        names = ", ".join(f"{g['stage']}:{g['gate']}" for g in self.failed_gates)
        return GateFailed(f"pipeline gate(s) failed: {names}; see {Path(self.workdir) / 'report.json'}")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "pipeline-report",
            "report_version": 2,
            "pipeline": self.pipeline,
            "workdir": self.workdir,
            "passed": self.passed,
            "failed_gates": self.failed_gates,
            "stages": [s.to_json() for s in self.stages],
        }


# -- the file ---------------------------------------------------------------------------------
def load_pipeline(path: str | Path) -> PipelineFile:
    """Read and validate a pipeline file; any fault is a PipelineError naming the file and key."""
    import tomllib

    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        raise PipelineError("YAML pipelines are not supported; write TOML", path=path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PipelineError(f"cannot read ({exc.strerror})", path=path) from None
    except UnicodeDecodeError:
        raise PipelineError("is not a text file", path=path, hint="a pipeline is a TOML file") from None
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"is not valid TOML ({exc})", path=path) from None
    unknown = set(config) - set(SECTIONS)
    if unknown:
        raise PipelineError(f"unknown section(s) {', '.join(sorted(unknown))}", path=path, hint=f"sections: {', '.join(SECTIONS)}")
    for section, values in config.items():
        if not isinstance(values, dict):
            raise PipelineError(f"{section} must be a [{section}] table", path=path)
        if "trust_model_code" in values:
            raise PipelineError(
                f"[{section}] trust_model_code: trust cannot come from a file",
                path=path,
                hint="remove the key and pass dnsconvert run --trust-model-code if you trust the model code this pipeline names",
            )
    kinds = {"pipeline": PipelineSettings, "input": InputSettings, "prune": PruneOptions, "validate": ValidateOptions, "project": ProjectOptions, "export": ExportOptions, "bench": BenchSettings}
    sections = {}
    for name, values in config.items():
        try:
            sections[name] = parse_options(kinds[name], values, where=path, section=name)
        except UserError as exc:
            raise PipelineError(exc.message, path=path, hint=exc.hint or "use the option names of the matching dnsconvert command, with _ for -") from None
    pipeline = PipelineFile(path, sections.pop("pipeline", PipelineSettings()), **sections)
    has_checkpoint = pipeline.prune is not None or (pipeline.input is not None and pipeline.input.checkpoint is not None)
    on_checkpoint = [f"[{name}]" for name in ("validate", "project", "export") if getattr(pipeline, name) is not None]
    benches_artifact = pipeline.bench is not None and pipeline.bench.artifact is not None
    if not has_checkpoint and (on_checkpoint or not benches_artifact):
        hint = f"{', '.join(on_checkpoint)} work on a checkpoint" if on_checkpoint else "or only bench an artifact: [bench] artifact = ..."
        raise PipelineError("needs a [prune] section or [input] checkpoint = ...", path=path, hint=hint)
    if pipeline.prune is not None and pipeline.input is not None and pipeline.input.checkpoint is not None:
        raise PipelineError("has both a [prune] section and an [input] checkpoint; keep one", path=path)
    return pipeline


# -- running steps ----------------------------------------------------------------------------
@dataclass
class StepOutput:
    outputs: dict[str, Path]
    summary: dict[str, Any]
    gates: list[Gate] = field(default_factory=list)


def _key(settings: Any, inputs: dict[str, Path]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"settings": settings, "version": __version__}, sort_keys=True, default=str).encode())
    for name in sorted(inputs):
        digest.update(name.encode())
        path = Path(inputs[name])
        digest.update((_tree_sha256(path) if path.is_dir() else sha256_file(path)).encode())  # a folder: a model directory
    return digest.hexdigest()


@schema(frozen=True, config=ConfigDict(extra="forbid", strict=True))
class _RecordedStep:
    key: str
    outputs: dict[str, str]
    output_sha256: dict[str, str]
    result: dict[str, Any]
    gates: list[dict[str, Any]]


def _read_state(path: Path, pipeline_path: Path) -> dict[str, _RecordedStep]:
    if not path.exists():
        return {}
    from .loading import read_json_text

    try:
        data = read_json_text(path.read_bytes(), what="it", path=path)  # h11: depth-bounded, never a RecursionError
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return {str(k): parse_options(_RecordedStep, v, where=path, section=str(k)) for k, v in data.items()}
    except (OSError, ValueError, UserError) as exc:
        detail = exc.message if isinstance(exc, UserError) else str(exc)
        raise PipelineError(f"its state file {path} is unreadable ({detail})", path=pipeline_path, hint=f"delete {path} to re-run every stage") from None


class Run:
    """One pipeline run: the steps' skip logic, their results and the report."""

    def __init__(self, pipeline: PipelineFile, work: Path, *, progress: bool, trust_model_code: bool):
        self.pipeline = pipeline
        self.work = work
        self.progress = progress
        self.trust_model_code = trust_model_code
        self.state_path = work / STATE_FILE
        self.state = _read_state(self.state_path, pipeline.path)
        self.report = PipelineReport(str(pipeline.path), str(work))
        self.checkpoint: Path | None = None  # the current checkpoint, as stages pass it on
        self.artifacts: dict[str, Path] = {}  # target -> artifact folder
        self.user_inputs: list[Path] = []  # files the user gave: never an output

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else (self.pipeline.path.parent / p)

    def with_model_path(self, options: T) -> T:
        """``options`` with an ``hf:DIR`` model made absolute: DIR is relative to the pipeline
        file, like every other path in it."""
        from .hf import PREFIX, is_hf_model

        if options is None or not is_hf_model(options.model):
            return options
        return replace(options, model=PREFIX + str(self.path(options.model[len(PREFIX) :])))

    def model_inputs(self, options: Any) -> dict[str, Path]:
        """The files of an ``hf:DIR`` model, so that its step re-runs when they change."""
        from .hf import PREFIX, is_hf_model, model_files

        if options is None or not is_hf_model(options.model):
            return {}
        return {f"model:{f.name}": f for f in model_files(options.model[len(PREFIX) :])}

    def given_files(self) -> list[Path]:
        """The files the user gave that no stage may write over: the input checkpoint, a benched artifact."""
        files = []
        if self.pipeline.input is not None and self.pipeline.input.checkpoint is not None:
            files.append(self.path(self.pipeline.input.checkpoint))
        if self.pipeline.bench is not None and self.pipeline.bench.artifact is not None:
            files.append(self.path(self.pipeline.bench.artifact))
        return files

    def refuse_overwrite(self, who: str, outputs: list[Path], given: list[Path]) -> None:
        for out in outputs:
            for path in given:
                if Path(path).exists() and Path(out).exists() and os.path.samefile(path, out):
                    raise PipelineError(f"{who} would write its output over its input {path}", path=self.pipeline.path, hint="choose another workdir or input path")

    def given_artifact(self, folder: Path):
        """The artifact the user named, verified now (paths, sizes, sha256): its bench step may
        be skipped, but a damaged artifact is refused on every run, naming the file."""
        from .artifact import load_artifact

        try:
            return load_artifact(folder, verify=True)
        except UserError as exc:
            self.report.stages.append(StageResult("bench:artifact", "failed", "", error=str(exc)))
            raise

    def _stale(self, name: str, key: str) -> str | None:
        """Why step ``name`` must run again (None: its recorded run still holds)."""
        recorded = self.state.get(name)
        if recorded is None:
            return "no recorded run"
        if recorded.key != key:
            return "its settings or inputs changed"
        for path, digest in recorded.output_sha256.items():
            damage = _output_damage(Path(path), digest)
            if damage:
                return damage
        return None

    def step(self, name: str, settings: Any, inputs: dict[str, Path], outputs: list[Path], work: Callable[[], StepOutput]) -> StageResult:
        """Run (or skip) one step; ``outputs`` are checked against every input before it runs."""
        for role, path in inputs.items():
            if not Path(path).exists():
                raise PipelineError(f"[{name}] needs its {role} {path}, which does not exist", path=self.pipeline.path, hint="fix the path in the pipeline file")
        self.refuse_overwrite(f"[{name}]", outputs, [*self.user_inputs, *inputs.values()])
        key = _key(settings, inputs)
        stale = self._stale(name, key)
        if stale is None:
            recorded = self.state[name]
            result = StageResult(name, "skipped", key, outputs=dict(recorded.outputs), result=dict(recorded.result), gates=[Gate(**g) for g in recorded.gates])
            self.report.stages.append(result)
            return result
        started = time.perf_counter()
        result = StageResult(name, "ran", key, rerun_because=None if name not in self.state else stale)
        self.report.stages.append(result)
        try:
            done = work()
        except GateFailed as exc:  # a gate raised inside the library (e.g. parity)
            result.status, result.seconds = "failed", time.perf_counter() - started
            result.gates = [Gate(name, False, str(exc))]
            raise
        except DnsconvertError as exc:
            if isinstance(exc, UserError) and exc.path is None:  # h11: a step's user error names the pipeline file
                exc.path, exc.message = str(self.pipeline.path), f"[{name}] {exc.message}"
            result.status, result.error, result.seconds = "failed", str(exc), time.perf_counter() - started
            raise
        result.seconds = time.perf_counter() - started
        result.outputs = {k: str(v) for k, v in done.outputs.items()}
        result.result, result.gates = done.summary, done.gates
        if all(g.passed for g in done.gates):
            self.state[name] = _RecordedStep(
                key=key,
                outputs=result.outputs,
                output_sha256={str(p): (_tree_sha256(p) if Path(p).is_dir() else sha256_file(p)) for p in done.outputs.values()},
                result=json.loads(json.dumps(done.summary, default=str)),
                gates=[asdict(g) for g in done.gates],
            )
            write_json_atomic(self.state_path, {k: asdict(v) for k, v in self.state.items()})
        return result


def _output_damage(path: Path, digest: str) -> str | None:
    """What changed in a step's output since it was recorded, or None."""
    from .artifact import MANIFEST_NAME, load_artifact

    if not path.exists():
        return f"its output {path} is missing"
    if path.is_dir() and (path / MANIFEST_NAME).is_file():  # an artifact: verified as a reader would (paths, sizes, sha256)
        try:
            load_artifact(path, verify=True)
        except UserError as exc:
            return f"its output is damaged: {exc.path}: {exc.message}"
    if (_tree_sha256(path) if path.is_dir() else sha256_file(path)) != digest:
        return f"its output {path} changed"
    return None


def _tree_sha256(folder: Path) -> str:
    """One digest of a folder's files (an artifact): names and contents."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(sha256_file(path).encode())
    return digest.hexdigest()


def _load(run: Run, path: Path):
    from .loading import load_checkpoint

    ckpt = load_checkpoint(path)
    if run.pipeline.input is not None:
        ckpt = run.with_model_path(run.pipeline.input).apply(ckpt)
    return ckpt


# -- the stages -------------------------------------------------------------------------------
def stage_input(run: Run) -> None:
    source = run.pipeline.input
    if source is not None and source.checkpoint is not None:
        run.checkpoint = run.path(source.checkpoint)
    run.user_inputs += run.given_files()  # no stage may write over them


def stage_prune(run: Run) -> None:
    options = run.with_model_path(run.pipeline.prune)
    if options is None:
        return
    from .surgery import prune

    out = run.work / PRUNED

    def work() -> StepOutput:
        result = prune(options.to_config(), output=out, progress=run.progress, trust_model_code=run.trust_model_code)
        summary = {"test_accuracy": result.test_accuracy, "sparsity": result.sparsity, "compression": result.compression, "data": result.data_source}
        return StepOutput({"checkpoint": out}, summary)

    done = run.step("prune", asdict(options), run.model_inputs(options), [out], work)
    run.checkpoint = Path(done.outputs["checkpoint"])


def stage_validate(run: Run) -> None:
    options = run.pipeline.validate
    if options is None:
        return
    from .validate import validate

    checkpoint = run.checkpoint

    def work() -> StepOutput:
        report = validate(
            _load(run, checkpoint),
            require_nm=options.require_nm,
            min_sparsity=options.min_sparsity,
            allow_dead_layers=options.allow_dead_layers,
            trust_model_code=run.trust_model_code,
        )
        detail = "; ".join(f"{v.rule}: {v.message}" for v in report.violations) or "all rules hold"
        summary = {"sparsity": report.sparsity, "compression": report.compression, "violations": len(report.violations)}
        return StepOutput({}, summary, [Gate("validate", report.passed, detail)])

    run.step("validate", asdict(options), {"checkpoint": checkpoint}, [], work)


def stage_project(run: Run) -> None:
    options = run.pipeline.project
    if options is None:
        return
    from .project import project_nm

    checkpoint = run.checkpoint
    projected = run.work / PROJECTED

    def work() -> StepOutput:
        result = project_nm(
            _load(run, checkpoint), options.nm, layers=list(options.layers) or None, prune_tied=options.prune_tied, trust_model_code=run.trust_model_code
        )
        result.checkpoint.save(projected)
        return StepOutput({"checkpoint": projected}, {"removed_magnitude_fraction": result.removed_magnitude_fraction})

    done = run.step("project", asdict(options), {"checkpoint": checkpoint}, [projected], work)
    run.checkpoint = Path(done.outputs["checkpoint"])


def stage_export(run: Run) -> None:
    options = run.pipeline.export
    if options is None:
        return
    from .targets import build_artifact, resolve_target

    checkpoint = run.checkpoint
    for name in options.targets:
        extra = {k: str(v) for k, v in options.options.get(name, {}).items()}
        resolve_target(name, extra)  # unknown target or option: fail before any work
        output = run.work / export_folder(name)

        def work(name=name, extra=extra, output=output) -> StepOutput:
            artifact = build_artifact(_load(run, checkpoint), output, target=name, options=extra, atol=options.atol, rtol=options.rtol, trust_model_code=run.trust_model_code)
            parity = artifact.manifest.parity
            summary = {"parity": parity.to_json() if parity else None, "sizes": asdict(artifact.manifest.sizes) if artifact.manifest.sizes else None}
            gates = [Gate(f"parity:{name}", parity.passed, f"max |Δ| {parity.max_abs:.3g}")] if parity else []
            return StepOutput({"artifact": output}, summary, gates)

        settings = {"target": name, "extra": extra, "atol": options.atol, "rtol": options.rtol}
        done = run.step(f"export:{name}", settings, {"checkpoint": checkpoint}, [output], work)
        run.artifacts[name] = Path(done.outputs["artifact"])


def stage_bench(run: Run) -> None:
    options = run.pipeline.bench
    if options is None:
        return
    from .bench import bench

    subjects = [(f"bench:{name}", name, folder) for name, folder in run.artifacts.items()]
    if options.artifact is not None:
        folder = run.path(options.artifact)
        subjects.append(("bench:artifact", run.given_artifact(folder).target, folder))
    settings = asdict(replace(options, artifact=None))  # where the artifact is lies in the step's inputs
    for step_name, target, folder in subjects:

        def work(folder=folder, target=target) -> StepOutput:
            report = bench(folder, batches=options.batches, warmup=options.warmup, iterations=options.iterations, threads=options.threads, trust_model_code=run.trust_model_code, progress=run.progress)
            floor = options.min_speedup.get(target) if isinstance(options.min_speedup, dict) else options.min_speedup
            gates = []
            if floor is not None:
                worst = min(report.comparisons, key=lambda c: c.vs_fastest_dense.value)
                ratio = worst.vs_fastest_dense
                detail = f"worst speedup vs {worst.fastest_dense} {ratio.value:.2f}x [{ratio.low:.2f}, {ratio.high:.2f}] (batch {worst.batch}) vs required {floor}x"
                gates.append(Gate(f"min_speedup:{target}", not report.below(floor, target), detail))
            return StepOutput({}, report.to_json(), gates)

        run.step(step_name, settings, {"artifact": folder}, [], work)


STAGES: tuple[tuple[str, Callable[[Run], None]], ...] = (
    ("input", stage_input),
    ("prune", stage_prune),
    ("validate", stage_validate),
    ("project", stage_project),
    ("export", stage_export),
    ("bench", stage_bench),
)


def planned_outputs(run: Run) -> list[Path]:
    """Every path a run of this pipeline may write (its stages' outputs, its report and state)."""
    outputs = [run.work / REPORT, run.state_path]
    if run.pipeline.prune is not None:
        outputs.append(run.work / PRUNED)
    if run.pipeline.project is not None:
        outputs.append(run.work / PROJECTED)
    if run.pipeline.export is not None:
        outputs += [run.work / export_folder(name) for name in run.pipeline.export.targets]
    return outputs


def refuse_outputs_over_inputs(run: Run) -> None:
    """Before any stage runs: no output of the run may be a file the user gave (the pipeline
    file, its input checkpoint, a benched artifact, a model folder's files), so that a run that
    would overwrite one stops before doing any work (each step checks again before it writes)."""
    given = [run.pipeline.path, *run.given_files()]
    for options in (run.pipeline.prune, run.pipeline.input):
        given += run.model_inputs(run.with_model_path(options)).values()
    run.refuse_overwrite("the run", planned_outputs(run), given)


def run_pipeline(
    path: str | Path,
    *,
    workdir: str | Path | None = None,
    progress: bool = False,
    fail_on_gate: bool = True,
    trust_model_code: bool = False,
) -> PipelineReport:
    """Run the pipeline file at ``path``; returns the report (also written to workdir/report.json).

    A stage whose gate raises (parity) ends the run there; gates that only record a result
    (validation rules, minimum speedup) let the later stages run. ``trust_model_code``
    allows model factories outside dnsconvert; it is the caller's decision and never read
    from the pipeline file.

    Raises:
        GateFailed: a gate failed (after the report is written), unless ``fail_on_gate`` is False.
        PipelineError / other UserError: the file or a stage's input is unusable.
    """
    pipeline = load_pipeline(path)
    # normalised, so that reports and messages name runs/x rather than examples/../runs/x
    work = Path(os.path.normpath(Path(workdir) if workdir else pipeline.path.parent / pipeline.pipeline.workdir))
    from ._atomic import output_error

    with output_error(work):
        work.mkdir(parents=True, exist_ok=True)
    run = Run(pipeline, work, progress=progress, trust_model_code=trust_model_code)
    refuse_outputs_over_inputs(run)
    try:
        for _, stage in STAGES:
            stage(run)
    except GateFailed:
        pass  # the step recorded it in the report; the stages after it depend on its output
    finally:
        write_json_atomic(work / REPORT, run.report.to_json())
    if fail_on_gate and not run.report.passed:
        raise run.report.gate_error()
    return run.report
