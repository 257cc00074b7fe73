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

# Every file operation an export may use, wrapped so that a hook runs just before each
# top-level one (the calls inside it, e.g. rmtree's unlinks, belong to that one operation)
# and sees its arguments.
# Each script below defines the hook; os._exit in it is a kill: no cleanup, like SIGKILL.
FILE_OPERATIONS = textwrap.dedent(
    """
    import functools, os, pathlib, shutil
    from dnsconvert.artifact import writer as writer_module

    depth = 0

    def counted(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            global depth
            if depth == 0:
                before_operation(args)
            depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth -= 1
        return wrapper

    for owner, name in [
        (os, "rename"), (os, "replace"), (os, "mkdir"), (os, "makedirs"), (os, "rmdir"), (os, "unlink"), (os, "remove"),
        (os, "fsync"), (shutil, "rmtree"), (shutil, "copyfile"), (pathlib.Path, "write_bytes"), (pathlib.Path, "write_text"),
        (pathlib.Path, "mkdir"), (pathlib.Path, "unlink"), (pathlib.Path, "rename"), (pathlib.Path, "replace"),
        (writer_module, "_exchange"),
    ]:
        setattr(owner, name, counted(getattr(owner, name)))
    """
)

# A writer with two stand-in files that dies just before its KILL_AT-th file operation.
# Without KILL_AT it reports how many operations there were.
WRITER_SCRIPT = FILE_OPERATIONS + textwrap.dedent(
    """
    import sys
    from dnsconvert.artifact import ArtifactWriter

    kill_at = int(os.environ.get("KILL_AT", "-1"))
    count = 0

    def before_operation(args):
        global count
        if count == kill_at:
            os._exit(137)
        count += 1

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

# Real `dnsconvert export` runs killed at every file operation in the destination's folder
# (operations elsewhere, e.g. the exporter's caches, cannot change what is there). The
# expensive part of an export (model export, parity) comes before the first of them, so the
# driver runs one export per scenario and, at that first operation, forks one child per kill
# point k: each child is that export going on from there and dying just before its k-th
# operation (the last child completes). Between children the driver records what a reader
# finds at the destination, lets the writer's recovery clean up, and puts it back. Torch runs
# on one thread: a child forked from a process with a live OpenMP pool may hang.
EXPORT_SCRIPT = FILE_OPERATIONS + textwrap.dedent(
    """
    import hashlib, itertools, json, sys
    from pathlib import Path
    import torch
    from dnsconvert.artifact import load_artifact
    from dnsconvert.artifact.writer import recover
    from dnsconvert.cli import cli
    from dnsconvert.errors import UserError

    torch.set_num_threads(1)
    new_ckpt, old_ckpt, work, results = sys.argv[1:5]
    targets = json.loads(sys.argv[5])  # target -> its -T options
    work = Path(work)
    dest, pristine = work / "model", work / "old"
    tags = {hashlib.sha256(Path(p).read_bytes()).hexdigest(): tag for p, tag in ((new_ckpt, "new"), (old_ckpt, "old"))}
    branch_here, kill_at, count, rows = False, None, 0, []

    class Branched(BaseException):  # unwinds the driver's own export once its children covered every kill point
        pass

    def in_work(path):
        if not isinstance(path, (str, os.PathLike)):
            return True  # a file descriptor: counted, to be safe
        path = os.path.abspath(path)
        return path == str(work) or path.startswith(str(work) + os.sep)

    def before_operation(args):
        global branch_here, count
        if not args or not in_work(args[0]):
            return
        if branch_here:
            branch_here = False
            branch()  # returns only in a child, which goes on with the export
        if kill_at is not None:
            if count == kill_at:
                os._exit(137)
            count += 1

    def export(ckpt, output, options):
        try:
            cli.main(["export", ckpt, "-o", str(output), *options], standalone_mode=True)
        except SystemExit as exc:
            return exc.code
        return 0

    def found():  # the complete, verified artifact a reader finds at dest ('old', 'new'), or None
        try:
            return tags.get(load_artifact(dest, verify=True).manifest.source.sha256, "unknown")
        except UserError as exc:
            return None if "no such artifact" in str(exc) else f"refused: {exc}"

    def reset(replacing):
        shutil.rmtree(dest, ignore_errors=True)
        if replacing:
            shutil.copytree(pristine, dest)

    def branch():
        global kill_at, count
        for k in itertools.count():
            reset(replacing)
            pid = os.fork()
            if pid == 0:
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, 1), os.dup2(null, 2)
                kill_at, count = k, 0
                return
            rc = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
            what = found()
            recover(dest)  # as the next writer would
            leftovers = sorted(p.name for p in work.iterdir() if p.name.startswith(".model."))
            rows.append({"kill_at": k, "rc": rc, "found": what, "leftovers": leftovers})
            if rc != 137:
                break
        raise Branched

    scenarios = {"fresh": (False, False), "replacing": (True, False), "replacing-rename-aside": (True, True)}
    report = {}
    for target, options in targets.items():
        options = ["--target", target, *options]
        shutil.rmtree(pristine, ignore_errors=True)
        assert export(old_ckpt, pristine, options) == 0  # also warms up every lazy import
        for scenario, (replacing, aside) in scenarios.items():
            os.environ["DNSCONVERT_NO_RENAME_EXCHANGE"] = "1" if aside else "0"
            rows = []
            reset(replacing)
            branch_here = True
            try:
                code = export(new_ckpt, dest, options)
            except Branched:
                report[f"{target}/{scenario}"] = rows
                continue
            if kill_at is None:
                sys.exit(f"the {target} export made no file operation in {work}")
            os._exit(code)  # a child that completed the export; it must not go on as the driver
    Path(results).write_text(json.dumps(report))
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


def test_a_real_export_killed_at_every_file_operation_leaves_one_complete_artifact(tmp_path):
    """`dnsconvert export` (ort, and torch-sparse-cpu with its untimed plan), into an empty
    destination and over an older artifact (renameat2 exchange and the rename-aside fallback),
    killed just before each of its file operations in turn: the destination holds the complete
    old artifact (or none) up to the commit and the complete new one after it, verified by
    load_artifact; what the killed run left behind is recognised and removed."""
    results = tmp_path / "results.json"
    targets = {"ort": [], "torch-sparse-cpu": ["-T", "plan=sparsity"]}
    new, old = FIXTURES / "tiny_mlp_unstructured.safetensors", FIXTURES / "tiny_mlp_2to4.safetensors"
    done = subprocess.run([sys.executable, "-c", EXPORT_SCRIPT, str(new), str(old), str(tmp_path), str(results), json.dumps(targets)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(results.read_text())
    assert sorted(report) == sorted(f"{t}/{s}" for t in targets for s in ("fresh", "replacing", "replacing-rename-aside"))
    for scenario, rows in report.items():
        before = None if scenario.endswith("fresh") else "old"
        *killed, completed = rows
        assert len(killed) >= 5 and all(row["rc"] == 137 for row in killed), (scenario, rows)  # mkdir, 3 files, commit...
        assert completed["rc"] == 0 and completed["found"] == "new", (scenario, completed)
        states = [row["found"] for row in rows]
        committed = states.index("new")
        assert states == [before] * committed + ["new"] * (len(states) - committed), (scenario, states)
        assert all(row["leftovers"] == [] for row in rows), (scenario, rows)


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


def _manifest_unknown_key(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["runtime_hint"] = "trust me"
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _manifest_oversized(folder: Path) -> None:
    """A valid manifest padded past the limit: refused by its size, before it is parsed."""
    from dnsconvert.artifact.manifest import MAX_MANIFEST_BYTES

    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text + " " * (MAX_MANIFEST_BYTES + 1 - len(text)))


def _manifest_too_many_files(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    record = manifest["files"]["sparse"]
    for i in range(65):
        manifest["files"][f"extra_{i}"] = {**record, "path": f"extra_{i}.onnx"}
    (folder / "manifest.json").write_text(json.dumps(manifest))


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
    "manifest-unknown-key": (_manifest_unknown_key, "runtime_hint: Unexpected keyword argument"),
    "manifest-oversized": (_manifest_oversized, "over the 16,777,216-byte limit"),
    "manifest-too-many-files": (_manifest_too_many_files, "at most 64 files"),
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
    with pytest.raises(UserError, match=CASES[case][1]) as refused:
        bench(folder, batches=(1,), warmup=0, iterations=1)
    assert refused.value.path == str(folder / "manifest.json")


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_artifact_bench_exit_2(exported, tmp_path, run_cli, case):
    folder = _prepare(exported, tmp_path, case)
    result = run_cli("bench", folder, "--batch", "1", "--iterations", "1", "--warmup", "0")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert CASES[case][1] in lines[0] and str(folder / "manifest.json") in lines[0], lines[0]


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
