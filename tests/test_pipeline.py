import json
import textwrap

import pytest

from dnsconvert.errors import GateFailed, PipelineError
from dnsconvert.pipeline import run_pipeline

PIPELINE = """
[pipeline]
workdir = "work"

[prune]
model = "mlp"
model_kwargs = {{ hidden = [64, 32] }}
data = "synthetic"
epochs = 0.3
target_sparsity = 0.9
gamma = 1e-2
checkpoint_every = 0

[validate]
min_sparsity = {min_sparsity}

[export]
targets = ["ort", "torch-sparse-cpu"]

[bench]
batches = [1]
iterations = 5
warmup = 1
min_speedup = {{ "ort" = {min_speedup} }}
"""


def write(tmp_path, min_sparsity=0.8, min_speedup=0.01):
    path = tmp_path / "pipeline.toml"
    path.write_text(PIPELINE.format(min_sparsity=min_sparsity, min_speedup=min_speedup))
    return path


def test_pipeline_runs_then_skips_unchanged_stages(tmp_path):
    path = write(tmp_path)
    first = run_pipeline(path)
    assert [s.status for s in first.stages] == ["ran"] * 6
    report = json.loads((tmp_path / "work" / "report.json").read_text())
    assert report["passed"] and {s["name"] for s in report["stages"]} >= {"prune", "validate", "export:ort", "bench:torch-sparse-cpu"}
    second = run_pipeline(path)
    assert [s.status for s in second.stages] == ["skipped"] * 6
    # change one stage's setting: only it and what depends on it re-run
    path.write_text(path.read_text().replace("iterations = 5", "iterations = 6"))
    third = run_pipeline(path)
    assert {s.name: s.status for s in third.stages} == {
        "prune": "skipped", "validate": "skipped", "export:ort": "skipped", "export:torch-sparse-cpu": "skipped",
        "bench:ort": "ran", "bench:torch-sparse-cpu": "ran",
    }  # fmt: skip
    # a tampered output is noticed and rebuilt
    (tmp_path / "work" / "model-ort" / "model.onnx").write_bytes(b"tampered")
    fourth = run_pipeline(path)
    assert {s.name: s.status for s in fourth.stages}["export:ort"] == "ran"


def test_failed_gate_exits_nonzero_and_names_it(tmp_path, run_cli):
    path = write(tmp_path, min_sparsity=0.99)
    with pytest.raises(GateFailed, match="validate"):
        run_pipeline(path)
    report = json.loads((tmp_path / "work" / "report.json").read_text())
    assert not report["passed"]
    assert report["failed_gates"][0]["stage"] == "validate"
    result = run_cli("run", path, "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["failed_gates"][0]["gate"] == "validate"


def test_speedup_gate(tmp_path):
    path = write(tmp_path, min_speedup=1000)
    with pytest.raises(GateFailed, match="min_speedup:ort"):
        run_pipeline(path)


def test_bad_pipeline_files(tmp_path, run_cli):
    bad = tmp_path / "bad.toml"
    bad.write_text("[prune\n")
    with pytest.raises(PipelineError, match="not valid TOML"):
        run_pipeline(bad)
    bad.write_text(textwrap.dedent("[prune]\nmodel='mlp'\n[bogus]\n"))
    result = run_cli("run", bad)
    assert result.exit_code == 2 and "unknown section" in result.stderr
    result = run_cli("run", tmp_path / "missing.toml")
    assert result.exit_code == 2
    bad.write_text('[input]\ncheckpoint = "nope.safetensors"\n[validate]\n')
    result = run_cli("run", bad, "--workdir", tmp_path / "work")
    assert result.exit_code == 2 and "nope.safetensors" in result.stderr and "Traceback" not in result.output


def test_pipeline_and_cli_mean_the_same_words(tmp_path):
    """[prune] method = "magnitude", target_sparsity = 0.5 prunes to 0.5, as the CLI does."""
    path = tmp_path / "p.toml"
    path.write_text(
        '[prune]\nmodel = "mlp"\nmodel_kwargs = { hidden = [32] }\nmethod = "magnitude"\ntarget_sparsity = 0.5\n'
        'data = "synthetic"\nepochs = 0.05\ncheckpoint_every = 0\n[validate]\n'
    )
    report = run_pipeline(path)
    assert report.stages[0].result["sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    "body, expected",
    [
        ('[prune]\nepochs = "two"\n', "[prune] epochs: Input should be a valid number"),
        ("[prune]\nepoch = 2\n", "[prune] epoch: Unexpected keyword argument"),
        ("[prune]\nmethod = 'nope'\n", "[prune] method: Input should be 'dns', 'magnitude' or 'imp'"),
        ("[bench]\nbatches = 1\n[prune]\n", "[bench] batches"),
        ("[export]\ntargets = 'ort'\n[prune]\n", "[export] targets"),
        ("[validate]\nmin_sparsity = true\n[prune]\n", "[validate] min_sparsity"),
        ("pipeline = 3\n[prune]\n", "pipeline must be a [pipeline] table"),
        ('[input]\ncheckpoint = "a.safetensors"\n[prune]\n', "both a [prune] section and an [input] checkpoint"),
        ("[bench]\nbatches = [1]\n", "needs a [prune] section or [input] checkpoint"),
        ('[bench]\nartifact = "a"\n[export]\n', "needs a [prune] section or [input] checkpoint = ... ([export] work on a checkpoint)"),
        ("[bench]\nartifact = 3\n", "[bench] artifact: Input should be a valid string"),
    ],
)
def test_pipeline_schema_errors_name_the_key(tmp_path, run_cli, body, expected):
    path = tmp_path / "p.toml"
    path.write_text(body)
    result = run_cli("run", path)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(path) in lines[0], lines


def test_corrupt_state_file_is_a_user_error(tmp_path, run_cli):
    from helpers import FIXTURES

    work = tmp_path / "work"
    work.mkdir()
    (work / ".pipeline-state.json").write_text('{"validate": {"key": 3}}')
    path = tmp_path / "p.toml"
    path.write_text(f'[pipeline]\nworkdir = "work"\n[input]\ncheckpoint = "{FIXTURES / "tiny_mlp_unstructured.safetensors"}"\n[validate]\n')
    result = run_cli("run", path)
    assert result.exit_code == 2 and "state file" in result.stderr and "delete" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_stage_output_over_its_input_is_refused(tmp_path, run_cli):
    import shutil

    from helpers import FIXTURES

    work = tmp_path / "work"
    work.mkdir()
    ckpt = work / "projected.safetensors"  # exactly where the project stage writes
    shutil.copy(FIXTURES / "tiny_mlp_unstructured.safetensors", ckpt)
    before = ckpt.read_bytes()
    path = tmp_path / "p.toml"
    path.write_text('[pipeline]\nworkdir = "work"\n[input]\ncheckpoint = "work/projected.safetensors"\n[project]\nnm = "2:4"\n')
    result = run_cli("run", path)
    assert result.exit_code == 2 and "over its input" in result.stderr
    assert ckpt.read_bytes() == before


def test_an_output_over_an_input_stops_the_run_before_any_stage(tmp_path, run_cli):
    """Issue 11: refused before work starts, not when the offending stage comes: here validate
    (which comes first and writes nothing over anything) must not have run either."""
    import shutil

    from helpers import FIXTURES

    work = tmp_path / "work"
    work.mkdir()
    ckpt = work / "projected.safetensors"
    shutil.copy(FIXTURES / "tiny_mlp_unstructured.safetensors", ckpt)
    path = tmp_path / "p.toml"
    path.write_text('[pipeline]\nworkdir = "work"\n[input]\ncheckpoint = "work/projected.safetensors"\n[validate]\n[project]\nnm = "2:4"\n')
    result = run_cli("run", path)
    assert result.exit_code == 2 and "over its input" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in work.iterdir()) == ["projected.safetensors"]  # no report, no state: nothing ran
