"""Artifacts: one commit point (a kill at any file operation leaves the old or the new artifact,
complete), and verified loads (tampered, swapped, escaping, missing, stale: exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dnsconvert.artifact import ArtifactWriter, load_artifact
from dnsconvert.errors import UserError
from helpers import FIXTURES

# A writer run in a child process that dies (os._exit, no cleanup, like SIGKILL) just before
# its KILL_AT-th file operation. Without KILL_AT it reports how many operations there were.
WRITER_SCRIPT = textwrap.dedent(
    """
    import os, pathlib, shutil, sys
    from dnsconvert.artifact import ArtifactWriter, writer as writer_module

    kill_at = int(os.environ.get("KILL_AT", "-1"))
    count = 0

    def counted(fn):
        def wrapper(*args, **kwargs):
            global count
            if count == kill_at:
                os._exit(137)
            count += 1
            return fn(*args, **kwargs)
        return wrapper

    os.rename = counted(os.rename)
    os.mkdir = counted(os.mkdir)
    os.rmdir = counted(os.rmdir)
    shutil.rmtree = counted(shutil.rmtree)
    pathlib.Path.write_bytes = counted(pathlib.Path.write_bytes)
    writer_module._exchange = counted(writer_module._exchange)

    class Checkpoint:
        model = None
        source = None
        source_sha256 = None

    dest, tag = sys.argv[1], sys.argv[2]
    with ArtifactWriter(dest) as writer:
        writer.write_bytes("sparse", "model.onnx", f"sparse {tag}".encode())
        writer.write_bytes("dense", "model.dense.onnx", f"dense {tag} ".encode() * 100)
        writer.commit(target="test", format="bytes", ckpt=Checkpoint())
    print(count)
    """
)


def run_writer(dest: Path, tag: str, kill_at: int | None = None, *, exchange: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_AT": str(-1 if kill_at is None else kill_at)}
    if not exchange:
        env["DNSCONVERT_NO_RENAME_EXCHANGE"] = "1"
    return subprocess.run([sys.executable, "-c", WRITER_SCRIPT, str(dest), tag], capture_output=True, text=True, env=env)


def artifact_tag(dest: Path) -> str | None:
    """Which complete artifact is at ``dest`` (its tag), or None if there is none; fails on a mix."""
    try:
        artifact = load_artifact(dest, verify=True)  # as a reader would: restores an artifact a killed writer left aside
    except UserError as exc:
        if "no such artifact" in str(exc):
            return None
        raise
    sparse = artifact.read("sparse").decode()
    dense = artifact.read("dense").decode()
    tag = sparse.removeprefix("sparse ")
    assert dense.startswith(f"dense {tag} "), (sparse, dense[:40])
    return tag


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
@pytest.mark.parametrize("old", [False, True], ids=["fresh", "replacing"])
def test_a_kill_at_any_file_operation_leaves_one_complete_artifact(tmp_path, exchange, old):
    dest = tmp_path / "model-ort"
    if old:
        assert run_writer(dest, "old").returncode == 0
    probe = tmp_path / "probe"
    if old:
        run_writer(probe, "old")
    done = run_writer(probe, "new", exchange=exchange)
    assert done.returncode == 0, done.stderr
    operations = int(done.stdout)
    assert operations >= 5
    for kill_at in range(operations + 1):
        if old:
            shutil.rmtree(dest, ignore_errors=True)
            assert run_writer(dest, "old").returncode == 0
        else:
            shutil.rmtree(dest, ignore_errors=True)
        result = run_writer(dest, "new", kill_at, exchange=exchange)
        assert result.returncode in (0, 137), result.stderr
        # what a reader sees right after the kill (a loader first restores an artifact left aside)
        tag = artifact_tag(dest)
        assert tag in (("old", "new") if old else (None, "new")), (kill_at, tag)
        # the next writer recognises and removes what the killed one left behind
        assert run_writer(dest, "next").returncode == 0
        assert artifact_tag(dest) == "next"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".model-ort")) == []


def test_a_real_export_killed_at_its_commit_leaves_the_old_artifact(tmp_path):
    """The same, through `dnsconvert export`: killed at the commit rename, the old artifact stays."""
    dest = tmp_path / "m"
    source = FIXTURES / "tiny_mlp_unstructured.safetensors"
    script = textwrap.dedent(
        f"""
        import os, sys
        from dnsconvert.artifact import writer
        if os.environ.get("KILL_COMMIT") == "1":
            writer._commit = lambda staging, destination: os._exit(137)
        from dnsconvert.cli import main
        sys.argv = ["dnsconvert", "export", {str(source)!r}, "--target", "ort", "-o", {str(dest)!r}]
        main()
        """
    )
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    before = load_artifact(dest, verify=True).manifest
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "KILL_COMMIT": "1"})
    assert killed.returncode == 137
    assert load_artifact(dest, verify=True).manifest == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.")]
    assert leftovers and all(".staging-" in name for name in leftovers)  # the killed run's staging folder...
    from dnsconvert.artifact.writer import recover

    recover(dest)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]  # ...recognised as stale and removed


# -- verified loads --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Two ORT artifacts of two different checkpoints (for swaps and stale manifests)."""
    from dnsconvert.loading import load_checkpoint
    from dnsconvert.targets import build_artifact

    base = tmp_path_factory.mktemp("artifacts")
    a = build_artifact(load_checkpoint(FIXTURES / "tiny_mlp_unstructured.safetensors"), base / "a", target="ort")
    b = build_artifact(load_checkpoint(FIXTURES / "tiny_mlp_2to4.safetensors"), base / "b", target="ort")
    return a.root, b.root


def _tamper(folder: Path) -> None:
    path = folder / "model.onnx"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _swap(folder: Path) -> None:
    sparse, dense = folder / "model.onnx", folder / "model.dense.onnx"
    a, b = sparse.read_bytes(), dense.read_bytes()
    sparse.write_bytes(b)
    dense.write_bytes(a)


def _outside(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["sparse"]["path"] = "../a/model.onnx"
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _absolute(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["sparse"]["path"] = "/etc/passwd"
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _symlink_out(folder: Path) -> None:
    target = folder.parent / "elsewhere.onnx"
    target.write_bytes((folder / "model.onnx").read_bytes())
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to(target)


def _missing(folder: Path) -> None:
    (folder / "model.dense.onnx").unlink()


def _stale(folder: Path, other: Path) -> None:
    """Files of another export under this folder's manifest (what a half-finished copy leaves)."""
    for name in ("model.onnx", "model.dense.onnx"):
        shutil.copy(other / name, folder / name)


def _manifest_garbage(folder: Path) -> None:
    (folder / "manifest.json").write_text('{"kind": "dnsconvert-artifact", "files": 3}')


def _manifest_nested(folder: Path) -> None:
    (folder / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)


CASES = {
    "tampered": (_tamper, "does not match its sha256"),
    "swapped": (_swap, "manifest says"),
    "path-outside": (_outside, "files.sparse.path"),
    "absolute-path": (_absolute, "files.sparse.path"),
    "symlink-outside": (_symlink_out, "outside the artifact folder"),
    "missing-file": (_missing, "is missing"),
    "stale-manifest": (_stale, "manifest"),
    "manifest-wrong-types": (_manifest_garbage, "not a valid dnsconvert artifact manifest"),
    "manifest-deeply-nested": (_manifest_nested, "not a valid dnsconvert artifact manifest"),
}


def _prepare(exported, tmp_path, case) -> Path:
    a, b = exported
    folder = tmp_path / "a"
    shutil.copytree(a, folder)
    _damage(case, folder, b)
    return folder


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_artifact_api_refuses(exported, tmp_path, case):
    from dnsconvert.bench import bench

    folder = _prepare(exported, tmp_path, case)
    with pytest.raises(UserError, match=CASES[case][1]):
        bench(folder, batches=(1,), warmup=0, iterations=1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_artifact_bench_exit_2(exported, tmp_path, run_cli, case):
    folder = _prepare(exported, tmp_path, case)
    result = run_cli("bench", folder, "--batch", "1", "--iterations", "1", "--warmup", "0")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert CASES[case][1] in lines[0]


def _damage(case: str, folder: Path, other: Path) -> None:
    damage, _ = CASES[case]
    damage(folder, other) if damage is _stale else damage(folder)


@pytest.fixture(scope="module")
def pipeline_runs(exported, tmp_path_factory):
    """Two pipeline folders, each run once (relative paths, so a copy of the folder is a copy
    of the run): ``own`` exports and benches a checkpoint, ``given`` benches the artifact ``a``."""
    from dnsconvert.pipeline import run_pipeline

    base = tmp_path_factory.mktemp("pipelines")
    bench = "[bench]\nbatches = [1]\niterations = 2\nwarmup = 0\n"
    own, given = base / "own", base / "given"
    own.mkdir()
    (own / "p.toml").write_text(f'[pipeline]\nworkdir = "w"\n[input]\ncheckpoint = "{FIXTURES / "tiny_mlp_unstructured.safetensors"}"\n[export]\ntargets = ["ort"]\n{bench}')
    given.mkdir()
    shutil.copytree(exported[0], given / "a")
    (given / "p.toml").write_text(f'[pipeline]\nworkdir = "w"\n{bench}artifact = "a"\n')
    cwd = Path.cwd()
    try:
        for folder in (own, given):
            os.chdir(folder)
            assert all(s.status == "ran" for s in run_pipeline("p.toml").stages)
        assert [(s.name, s.status) for s in run_pipeline("p.toml").stages] == [("bench:artifact", "skipped")]
    finally:
        os.chdir(cwd)
    return own, given


@pytest.mark.parametrize("case", sorted(CASES))
def test_run_rebuilds_a_damaged_artifact_it_made(exported, pipeline_runs, tmp_path, monkeypatch, case):
    """A pipeline's own artifact, damaged in any way, is noticed (verified as a reader would),
    named in the report and rebuilt, never timed as it is."""
    from dnsconvert.pipeline import run_pipeline

    shutil.copytree(pipeline_runs[0], tmp_path / "own")
    monkeypatch.chdir(tmp_path / "own")
    _damage(case, Path.cwd() / "w" / "model-ort", exported[1])
    report = run_pipeline("p.toml")
    stages = {s.name: s for s in report.stages}
    assert {name: s.status for name, s in stages.items()} == {"export:ort": "ran", "bench:ort": "ran"}
    because = stages["export:ort"].rerun_because
    assert because and "w/model-ort" in because and CASES[case][1] in because, because
    saved = json.loads(Path("w/report.json").read_text())
    assert saved["stages"][0]["rerun_because"] == because
    load_artifact("w/model-ort", verify=True)


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_artifact_run_exit_2(exported, pipeline_runs, tmp_path, monkeypatch, run_cli, case):
    """``[bench] artifact = ...`` names an artifact the pipeline did not make: damaged, the run
    exits 2 with one line naming the file, even though its bench step would be skipped; the
    Python API raises the same UserError."""
    from dnsconvert.pipeline import run_pipeline

    shutil.copytree(pipeline_runs[1], tmp_path / "given")
    monkeypatch.chdir(tmp_path / "given")
    _damage(case, Path.cwd() / "a", exported[1])
    result = run_cli("run", "p.toml")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert CASES[case][1] in lines[0] and "a/manifest.json" in lines[0], lines[0]
    report = json.loads(Path("w/report.json").read_text())
    assert not report["passed"] and report["stages"][-1]["status"] == "failed"
    with pytest.raises(UserError, match=CASES[case][1]):
        run_pipeline("p.toml")


def test_export_refuses_its_input_and_non_artifact_destinations(tmp_path, run_cli):
    source = tmp_path / "ckpt.safetensors"
    shutil.copy(FIXTURES / "tiny_mlp_unstructured.safetensors", source)
    before = source.read_bytes()
    result = run_cli("export", source, "-o", source)
    assert result.exit_code == 2 and "input" in result.stderr
    assert source.read_bytes() == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    result = run_cli("export", source, "-o", tmp_path / "notes")
    assert result.exit_code == 2 and "not a dnsconvert artifact" in result.stderr
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_writer_without_commit_leaves_nothing(tmp_path):
    class Checkpoint:
        model = source = source_sha256 = None

    with pytest.raises(RuntimeError):
        with ArtifactWriter(tmp_path / "x") as writer:
            writer.write_bytes("sparse", "model.onnx", b"x")
            raise RuntimeError("a failure before the commit")
    assert list(tmp_path.iterdir()) == []
