"""``dnsconvert run pipeline.toml``: prune -> validate -> project -> export -> bench in one file.

Each stage calls the same library function as its sub-command. A stage is skipped when its
*key* — the sha256 of its settings, the content hashes of its inputs and the dnsconvert
version — equals the one recorded at its last successful run and its outputs still hash
to what was recorded. One JSON report covers the run; a failed gate (validation rules,
parity, minimum speedup) makes the run exit 1 and is named in the report.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from ._atomic import sha256_file, write_json_atomic
from .errors import DnsconvertError, GateFailed, PipelineError, UserError

STAGES = ("prune", "validate", "project", "export", "bench")
STATE_FILE = ".pipeline-state.json"


@dataclass
class StageResult:
    name: str
    status: str  # ran | skipped | failed
    key: str
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)  # name -> path
    result: dict[str, Any] = field(default_factory=dict)
    gates: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


@dataclass
class PipelineReport:
    pipeline: str
    workdir: str
    stages: list[StageResult] = field(default_factory=list)

    @property
    def failed_gates(self) -> list[dict[str, Any]]:
        return [dict(gate, stage=s.name) for s in self.stages for gate in s.gates if not gate["passed"]]

    @property
    def passed(self) -> bool:
        return not self.failed_gates and all(s.status != "failed" for s in self.stages)

    def gate_error(self) -> GateFailed:
        names = ", ".join(f"{g['stage']}:{g['gate']}" for g in self.failed_gates)
        return GateFailed(f"pipeline gate(s) failed: {names}; see {Path(self.workdir) / 'report.json'}")

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "pipeline-report",
            "report_version": 1,
            "pipeline": self.pipeline,
            "workdir": self.workdir,
            "passed": self.passed,
            "failed_gates": self.failed_gates,
            "stages": [s.__dict__ for s in self.stages],
        }


def load_pipeline(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PipelineError(f"cannot read ({exc.strerror})", path=path) from None
    try:
        if path.suffix in (".yaml", ".yml"):
            raise PipelineError("YAML pipelines are not supported; write TOML", path=path)
        import tomllib

        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PipelineError(f"is not valid TOML ({exc})", path=path) from None
    unknown = set(config) - {"pipeline", "input", *STAGES}
    if unknown:
        raise PipelineError(f"unknown section(s) {', '.join(sorted(unknown))}", path=path, hint=f"sections: pipeline, input, {', '.join(STAGES)}")
    if "prune" not in config and "checkpoint" not in config.get("input", {}):
        raise PipelineError("needs a [prune] section or [input] checkpoint = ...", path=path)
    for section, values in config.items():
        if isinstance(values, dict) and "trust_model_code" in values:
            raise PipelineError(
                f"[{section}] trust_model_code: trust cannot come from a file",
                path=path,
                hint="remove the key and pass dnsconvert run --trust-model-code if you trust the model code this pipeline names",
            )
    return config


def _read_state(path: Path) -> dict[str, Any]:
    """The state file of earlier runs: a JSON object of stage name -> record (h11, issue 11)."""
    from .loading import read_json_file

    state = read_json_file(path, what="pipeline state file", error=PipelineError)
    records_ok = isinstance(state, dict) and all(
        isinstance(r, dict) and isinstance(r.get("outputs", {}), dict) and isinstance(r.get("output_sha256", {}), dict) and isinstance(r.get("gates", []), list)
        for r in state.values()
    )
    if not records_ok:
        raise PipelineError("pipeline state file is malformed (expected stage name -> record objects)", path=path, hint="delete it to re-run every stage")
    return state


def _key(settings: Any, inputs: dict[str, Path]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"settings": settings, "version": __version__}, sort_keys=True, default=str).encode())
    for name in sorted(inputs):
        digest.update(name.encode())
        digest.update(sha256_file(inputs[name]).encode())
    return digest.hexdigest()


class _Runner:
    def __init__(self, config: dict[str, Any], source: Path, workdir: Path):
        self.config = config
        self.source = source
        self.base = source.parent
        self.workdir = workdir
        self.state_path = workdir / STATE_FILE
        self.state = _read_state(self.state_path) if self.state_path.exists() else {}  # h11 (issue 11): checked read
        self.report = PipelineReport(str(source), str(workdir))

    def _fresh(self, name: str, key: str) -> dict[str, Any] | None:
        recorded = self.state.get(name)
        if not recorded or recorded.get("key") != key:
            return None
        for path, digest in recorded.get("output_sha256", {}).items():
            if not Path(path).exists() or sha256_file(path) != digest:
                return None
        return recorded

    def stage(self, name: str, settings: Any, inputs: dict[str, Path], work) -> StageResult:
        for role, path in inputs.items():
            if not Path(path).is_file():
                raise PipelineError(f"[{name}] needs its {role} {path}, which does not exist", path=self.source, hint="fix the path in the pipeline file")
        key = _key(settings, inputs)
        recorded = self._fresh(name, key)
        if recorded is not None:
            result = StageResult(name, "skipped", key, outputs=recorded["outputs"], result=recorded["result"], gates=recorded["gates"])
            self.report.stages.append(result)
            return result
        started = time.perf_counter()
        result = StageResult(name, "ran", key)
        self.report.stages.append(result)
        try:
            outputs, summary, gates = work()
        except GateFailed as exc:  # a gate raised inside the library (e.g. parity)
            result.status, result.seconds = "failed", time.perf_counter() - started
            result.gates = [{"gate": name, "passed": False, "detail": str(exc)}]
            raise
        except DnsconvertError as exc:
            if isinstance(exc, UserError) and exc.path is None:  # h11: a stage's user error names the pipeline file
                exc.path = str(self.source)
                exc.message = f"[{name}] {exc.message}"
            result.status, result.error, result.seconds = "failed", str(exc), time.perf_counter() - started
            raise
        result.seconds = time.perf_counter() - started
        result.outputs = {k: str(v) for k, v in outputs.items()}
        result.result, result.gates = summary, gates
        if all(g["passed"] for g in gates):
            self.state[name] = {
                "key": key,
                "outputs": result.outputs,
                "output_sha256": {str(p): sha256_file(p) for p in outputs.values()},
                "result": summary,
                "gates": gates,
            }
            write_json_atomic(self.state_path, self.state)
        return result

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else (self.base / p)


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
    (validation rules, minimum speedup) let the later stages run.

    ``trust_model_code`` allows model factories outside dnsconvert; it is the caller's
    decision and never read from the pipeline file.

    Raises:
        GateFailed: a gate failed (after the report is written), unless ``fail_on_gate`` is False.
        PipelineError / other UserError: the file or a stage's input is unusable.
    """
    from .loading import load_checkpoint

    source = Path(path)
    config = load_pipeline(source)
    settings = config.get("pipeline", {})
    work = Path(workdir) if workdir else source.parent / settings.get("workdir", "pipeline-out")
    _check_stage_outputs(config, source, work)  # h11 (issue 11): no stage may overwrite an input
    work.mkdir(parents=True, exist_ok=True)
    runner = _Runner(config, source, work)
    try:
        _run_stages(runner, config, work, progress, load_checkpoint, trust_model_code)
    except GateFailed:
        pass  # the stage recorded it in the report; the stages after it depend on its output
    finally:
        write_json_atomic(work / "report.json", runner.report.to_json())
    if fail_on_gate and not runner.report.passed:
        raise runner.report.gate_error()
    return runner.report


def _check_stage_outputs(config: dict[str, Any], source: Path, work: Path) -> None:
    """Refuse, before any stage runs, a pipeline whose outputs include one of its inputs (h11)."""
    from ._atomic import check_outputs

    outputs = [work / "report.json", work / STATE_FILE, work / "pruned.safetensors", work / "projected.safetensors"]
    export = config.get("export", {})
    targets = export.get("targets", ["ort"]) if isinstance(export, dict) else []
    outputs += [work / f"model.{name}.onnx" for name in targets if isinstance(name, str)]
    outputs += [work / f"model.{name}.safetensors" for name in targets if isinstance(name, str)]
    inputs = [source]
    given = config.get("input", {}).get("checkpoint") if isinstance(config.get("input"), dict) else None
    if isinstance(given, str):
        inputs.append(Path(given) if Path(given).is_absolute() else source.parent / given)
    check_outputs(outputs, inputs)


def _run_stages(runner: _Runner, config: dict[str, Any], work: Path, progress: bool, load_checkpoint, trust_model_code: bool) -> Path:
    if "prune" in config:
        from .models import resolve_spec
        from .surgery import DNSConfig, PruneConfig, prune

        opts = dict(config["prune"])
        out = work / "pruned.safetensors"

        def do_prune():
            spec = resolve_spec(opts.pop("model", "lenet300100"), opts.pop("input_shape", None), **opts.pop("model_kwargs", {}))
            dns_keys = set(DNSConfig.__dataclass_fields__) - {"seed"}
            dns = DNSConfig(**{k: opts.pop(k) for k in list(opts) if k in dns_keys}, seed=opts.get("seed", 0))
            try:
                cfg = PruneConfig(model=spec, dns=dns, **opts)
            except TypeError as exc:
                raise PipelineError(f"[prune]: {exc}", path=runner.source, hint="use the option names of dnsconvert prune, with _ for -") from None
            result = prune(cfg, output=out, progress=progress, trust_model_code=trust_model_code)
            return {"checkpoint": out}, {"test_accuracy": result.test_accuracy, "sparsity": result.sparsity, "compression": result.compression, "data": result.data_source}, []

        checkpoint = Path(runner.stage("prune", config["prune"], {}, do_prune).outputs["checkpoint"])
    else:
        checkpoint = runner.path(config["input"]["checkpoint"])

    if "validate" in config:
        from .validate import validate

        opts = config["validate"]

        def do_validate():
            report = validate(load_checkpoint(checkpoint), require_nm=opts.get("require_nm"), min_sparsity=opts.get("min_sparsity"))
            gates = [{"gate": "validate", "passed": report.passed, "detail": "; ".join(f"{v.rule}: {v.message}" for v in report.violations) or "all rules hold"}]
            return {}, {"sparsity": report.sparsity, "compression": report.compression, "violations": len(report.violations)}, gates

        runner.stage("validate", opts, {"checkpoint": checkpoint}, do_validate)

    if "project" in config:
        from .project import project_nm

        opts = config["project"]
        projected = work / "projected.safetensors"

        def do_project():
            result = project_nm(load_checkpoint(checkpoint), opts.get("nm", "2:4"))
            result.checkpoint.save(projected)
            return {"checkpoint": projected}, {"removed_magnitude_fraction": result.removed_magnitude_fraction}, []

        checkpoint = Path(runner.stage("project", opts, {"checkpoint": checkpoint}, do_project).outputs["checkpoint"])

    artifacts: dict[str, Path] = {}
    if "export" in config:
        from .targets import BuildOptions, get_target

        opts = config["export"]
        for name in opts.get("targets", ["ort"]):
            target = get_target(name)
            extra = {k: str(v) for k, v in opts.get("options", {}).get(name, {}).items()}
            target.check_options(extra)
            output = work / f"model.{name}{target.suffix}"
            stage_settings = {"target": name, "extra": extra, "atol": opts.get("atol", 1e-4), "rtol": opts.get("rtol", 1e-4)}

            def do_export(target=target, output=output, extra=extra, name=name):
                artifact = target.build(load_checkpoint(checkpoint), output, BuildOptions(atol=opts.get("atol", 1e-4), rtol=opts.get("rtol", 1e-4), trust_model_code=trust_model_code, extra=extra))
                files = {f"file:{k}": v for k, v in artifact.files.items()}
                files["manifest"] = artifact.manifest_path
                parity = artifact.manifest.get("parity", {})
                return files, {"parity": parity, "sizes": artifact.manifest.get("sizes")}, [{"gate": f"parity:{name}", "passed": bool(parity.get("passed", True)), "detail": f"max |Δ| {parity.get('max_abs')}"}]

            result = runner.stage(f"export:{name}", stage_settings, {"checkpoint": checkpoint}, do_export)
            artifacts[name] = Path(result.outputs["manifest"])

    if "bench" in config:
        from .bench import bench

        opts = config["bench"]
        min_speedup = opts.get("min_speedup", {})
        for name, manifest in artifacts.items():

            def do_bench(manifest=manifest, name=name):
                report = bench(manifest, batches=opts.get("batches", [1, 64]), warmup=opts.get("warmup", 10), iterations=opts.get("iterations", 100), threads=opts.get("threads", 0))
                speedups = report.speedups()
                floor = min_speedup.get(name) if isinstance(min_speedup, dict) else min_speedup
                gates = []
                if floor is not None:
                    worst = min(s["speedup"] for s in speedups)
                    gates.append({"gate": f"min_speedup:{name}", "passed": worst >= floor, "detail": f"worst speedup {worst:.2f}x vs required {floor}x"})
                return {}, report.to_json(), gates

            runner.stage(f"bench:{name}", opts, {"manifest": manifest}, do_bench)
    return checkpoint
