"""Hostile and faulty files through every command that reads a file: the exit-code contract.

Each case builds its input files in a fresh folder (``in``; generators in fixtures/hostile.py)
and runs one command, and its test asserts: the exit code; for a failure, exactly one stderr
line that starts ``dnsconvert: error:``, names the offending file and says what was wrong, no
traceback; no file written under ``out`` (and no partial file anywhere); every input byte-
identical afterwards; no planted code run; and peak memory under 1 GiB above the baseline.
A few controls (exit 0) prove the generators make valid files apart from the fault they plant.

How the memory is measured. pytest makes every selected case's files, then one worker
subprocess (``python tests/test_hostile.py --worker``: a fresh interpreter started with exec,
never a fork of pytest, whose torch and ONNX Runtime threads would not survive one) imports
dnsconvert and every command once and runs the cases in turn through click's CliRunner. Before
each case it applies the case's patch, collects garbage, hands glibc's free heap back
(malloc_trim, so memory freed by an earlier case cannot be reused unseen) and takes the baseline
RSS; it then resets the kernel's peak-RSS mark (/proc/self/clear_refs, so a spike of any length
counts; a 1 ms /proc/self/statm sampler where that is not allowed) and sets RLIMIT_AS to the
baseline address space + 1 GiB + a margin for thread stacks and arenas, so that even an
allocation never touched fails the case (MemoryError). What runtimes write to fd 2 themselves
is captured as stderr too. The worker reports per case (exit code, stderr, output, exception,
peak above baseline) as JSON lines; each case stays its own parametrized test. One interpreter
for ~170 cases costs seconds, not the minutes of one per case; a worker that crashes or hangs
(120 s, faulthandler says where) is blamed on its current case and a new one takes the rest.
Two probes prove the measurement can fail. The memory bombs also run in a fresh interpreter
each (run_measured: the command's real entry point and stderr). Real full-disk and read-only
file systems are tried on a small tmpfs when this machine lets an unprivileged user namespace
mount one.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import traceback
import warnings
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from helpers import FIXTURES, ROOT

sys.path.insert(0, str(FIXTURES))
import hostile  # noqa: E402  (fixtures/hostile.py: the file generators)
from hostile import Storage, View, craft_pt, f32, gz, idx_bytes, mnist_folder, onnx_file, onnx_model, safetensors_file  # noqa: E402

from dnsconvert.cli import cli  # noqa: E402

GIB = 1 << 30
GOOD = FIXTURES / "tiny_mlp_unstructured.safetensors"


@dataclass
class Run:
    args: list
    blame: Path | None = None  # the file the error line must name (default: the first input path)


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[Path], list | Run]
    exit: int = 2
    match: str = ""  # must appear in the error line
    patch: Callable | None = None  # (monkeypatch, folder) -> None, applied just before the command
    leaves: tuple[str, ...] = ()  # files a run may leave under out/ (a control's output, the pipeline's failure report)
    needs: tuple[str, ...] = field(default=())  # session artifacts the case copies ("ort", "csr")


# ---------------------------------------------------------------------------------------------
# helpers
def _in(d: Path) -> Path:
    (d / "in").mkdir(exist_ok=True)
    return d / "in"


def _out(d: Path, name: str) -> Path:
    return d / "out" / name


def meta_edit(fn):
    return lambda d: ["validate", safetensors_file(_in(d) / "ckpt.safetensors", meta_edit=fn)]


def with_meta(text: str, command: str = "validate"):
    return lambda d: [command, safetensors_file(_in(d) / "ckpt.safetensors", meta=text)]


def kwargs_case(kwargs: dict, command: str = "validate"):
    def make(d):
        def edit(meta):
            meta["model"]["kwargs"] = kwargs

        path = safetensors_file(_in(d) / "ckpt.safetensors", meta_edit=edit)
        return [command, path] + (["-o", _out(d, "p.safetensors")] if command == "project" else [])

    return make


def tensors_case(tensors: Callable[[], dict], command: str = "validate"):
    def make(d):
        path = safetensors_file(_in(d) / "ckpt.safetensors", tensors())
        if command == "export":
            return ["export", path, "-o", _out(d, "m.onnx")]
        return [command, path]

    return make


def set_model(**changes):
    def edit(meta):
        meta["model"].update(changes)
        if "input_shape" in changes:
            meta["model"]["inputs"] = []

    return edit


def pt_case(tensors: Callable[[], dict], storages: Callable[[], dict], command: str = "validate", **kwargs):
    def make(d):
        path = craft_pt(_in(d) / "ckpt.pt", tensors(), storages(), **kwargs)
        if command == "project":
            return ["project", path, "-o", _out(d, "p.safetensors")]
        if command == "prune-init":
            return Run(["prune", "--init", path, "--model", "mlp", "--data", "synthetic", "--no-progress", "-o", _out(d, "p.safetensors")], path)
        return [command, path]

    return make


def saved_pt(obj: Callable[[], object], **save_kwargs):
    def make(d):
        path = _in(d) / "ckpt.pt"
        torch.save(obj(), path, **save_kwargs)
        return ["validate", path]

    return make


def legacy_pt(d: Path, *, size=(2, 2), stride=(2, 1), numel=4, data_numel=4) -> list:
    """A legacy (pre-1.6) torch file written by hand, with the storage it is told."""
    import torch

    class LegacyPickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel, None)
            return None

    import io
    from collections import OrderedDict

    buf = io.BytesIO()
    for obj in (hostile_magic(), 1001, {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}):
        pickle.dump(obj, buf, protocol=2)
    storage = Storage("0", "FloatStorage", numel)
    LegacyPickler(buf, protocol=2).dump(OrderedDict({"0.weight": View(storage, 0, size, stride)}))
    pickle.dump(["0"], buf, protocol=2)
    buf.write(struct.pack("<q", data_numel) + f32(data_numel))
    path = _in(d) / "legacy.pt"
    path.write_bytes(buf.getvalue())
    return ["validate", path]


def hostile_magic() -> int:
    from dnsconvert.torch_file import LEGACY_MAGIC

    return LEGACY_MAGIC


def densify_case(**kwargs):
    return lambda d: ["densify", onnx_file(_in(d) / "m.onnx", **kwargs), "-o", _out(d, "dense.onnx")]


def densify_model(build: Callable[[], object]):
    return lambda d: ["densify", onnx_file(_in(d) / "m.onnx", build()), "-o", _out(d, "dense.onnx")]


def densify_bytes(data: Callable[[], bytes]):
    def make(d):
        path = _in(d) / "m.onnx"
        path.write_bytes(data())
        return ["densify", path, "-o", _out(d, "dense.onnx")]

    return make


def _edit_attr_constant(model):
    from onnx import helper, numpy_helper

    values = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), name="C")
    indices = numpy_helper.from_array(np.array([3, 3], np.int64), name="C.indices")
    node = helper.make_node("Constant", [], ["c"], sparse_value=helper.make_sparse_tensor(values, indices, [4, 4]))
    model.graph.node.insert(0, node)


def _external(model):
    from onnx import TensorProto

    tensor = model.graph.sparse_initializer[0].values
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"


def _short_dense(model):
    from onnx import numpy_helper

    tensor = numpy_helper.from_array(np.zeros((4, 4), np.float32), name="B")
    tensor.dims[:] = [4, 400]
    model.graph.initializer.append(tensor)


def _unknown_dtype(model):
    model.graph.sparse_initializer[0].values.data_type = 999


def _no_opset(model):
    del model.opset_import[:]


def _bad_op(model):
    model.graph.node[0].op_type = "NoSuchOp"


# -- MNIST -------------------------------------------------------------------------------------
def prune_data(**replace: bytes):
    def make(d):
        folder = mnist_folder(_in(d) / "mnist", **replace)
        return Run(["prune", "--data", folder, "--model", "lenet300100", "--epochs", "0.01", "--no-progress", "-o", _out(d, "p.safetensors")], folder)

    return make


def images(n=8, side=28, **kw):
    return gz(idx_bytes([n, side, side], bytes(n * side * side), **kw))


def labels(values):
    return gz(idx_bytes([len(values)], bytes(values)))


def two_members() -> bytes:
    return images() + gz(b"more")


def truncated_gzip() -> bytes:
    data = images()
    return data[: len(data) // 2]


def corrupt_gzip() -> bytes:
    data = bytearray(gz(idx_bytes([8, 28, 28], np.random.default_rng(1).integers(0, 256, 8 * 784, dtype=np.uint8).tobytes())))
    for i in range(len(data) // 2, len(data) // 2 + 20):  # inside the data, past the IDX header
        data[i] ^= 0xFF
    return bytes(data)


# -- artifacts (built once per session, copied per case) --------------------------------------------
_ARTIFACTS: dict[str, Path] = {}


def _artifact(kind: str) -> Path:
    return _ARTIFACTS[kind]


def copy_artifact(d: Path, kind: str) -> tuple[Path, dict]:
    """Copy the session's ``kind`` artifact folder into ``in``; returns (manifest path, manifest)."""
    source = _artifact(kind)
    target = _in(d) / "artifact"
    shutil.copytree(source.parent, target)
    manifest = target / source.name
    return manifest, json.loads(manifest.read_text())


def reseal(manifest_path: Path, manifest: dict) -> None:
    """Record the (edited) files' hashes, so the case reaches the check it is about."""
    for record in manifest.get("files", {}).values():
        path = manifest_path.parent / record["path"]
        record["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        record["bytes"] = path.stat().st_size
    manifest_path.write_text(json.dumps(manifest))


def bench_args(manifest: Path) -> list:
    return ["bench", manifest, "--iterations", "2", "--warmup", "0", "--batch", "1"]


def csr_case(edit: Callable[[Any, Any], None]):
    """Edit the torch-sparse-cpu artifact's sparse ONNX (``edit(model, plan)``: its sparse
    initializers, or the execution plan in its metadata; a str plan is written as it is), then bench it."""

    def make(d):
        import onnx

        manifest_path, manifest = copy_artifact(d, "csr")
        path = manifest_path.parent / manifest["files"]["sparse"]["path"]
        model = onnx.load_from_string(path.read_bytes())
        prop = next(p for p in model.metadata_props if p.key == CSR_PLAN_KEY)
        box = [json.loads(prop.value)]
        edit(model, box)
        if box[0] is None:
            model.metadata_props.remove(prop)
        else:
            prop.value = box[0] if isinstance(box[0], str) else json.dumps(box[0])
        path.write_bytes(model.SerializeToString())
        reseal(manifest_path, manifest)
        return Run(bench_args(manifest_path), path)

    return make


CSR_PLAN_KEY = "dnsconvert.sparse_cpu_plan"


def _indices(fn):
    """Edit the first sparse initializer's [NNZ] indices with ``fn(array) -> array``."""

    def edit(model, box):
        from onnx import numpy_helper

        index = model.graph.sparse_initializer[0].indices
        index.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(index).copy()), index.name))

    return edit


def _set0(value):
    def fn(a):
        a[0] = value
        return a

    return fn


def _swap01(a):
    a[0], a[1] = a[1], a[0]
    return a


def _dup01(a):
    a[1] = a[0]
    return a


def _dims(dims):
    def edit(model, box):
        sparse = model.graph.sparse_initializer[0]
        del sparse.dims[:]
        sparse.dims.extend(dims)

    return edit


def _plan(fn):
    def edit(model, box):
        box[0] = fn(box[0])

    return edit


def _kernels(value):
    def fn(plan):
        regime = plan["regimes"]["small"]
        regime["kernels"] = {k: value for k in regime["kernels"]}
        return plan

    return fn


def _unknown_layer(plan):
    plan["ops"]["no.such.weight"] = next(iter(plan["ops"].values()))
    return plan


def ort_case(edit: Callable[[Path, dict], None], batches: tuple[str, ...] = ("--batch", "1")):
    def make(d):
        manifest_path, manifest = copy_artifact(d, "ort")
        edit(manifest_path.parent, manifest)
        reseal(manifest_path, manifest)
        return Run(["bench", manifest_path, "--iterations", "2", "--warmup", "0", *batches], manifest_path.parent)

    return make


def _truncate_sparse(folder: Path, manifest: dict) -> None:
    path = folder / manifest["files"]["sparse"]["path"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _ort_rejects(folder: Path, manifest: dict) -> None:
    """A model the checker accepts but ONNX Runtime cannot load (MatMul of [1,4] by [3,3])."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, 3), np.float32), name="W")
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 3])
    graph = helper.make_graph([helper.make_node("MatMul", ["input", "W"], ["output"])], "g", [x], [y], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    (folder / manifest["files"]["sparse"]["path"]).write_bytes(model.SerializeToString())


def _manifest_input(shape):
    """Replace the shape of the artifact's (first) model input in its manifest."""

    def edit(folder, manifest):
        manifest["model"]["inputs"][0]["shape"] = shape
        manifest["model"].pop("input_shape", None)

    return edit


BATCH = {"min": 1, "opt": 1, "max": 4096, "label": "batch"}


# -- pipelines ------------------------------------------------------------------------------------
def pipeline(text: str, *, state: str | None = None, state_dir: bool = False, extra: Callable[[Path], None] | None = None, blame: str = "pipeline.toml", work_in_inputs: bool = False):
    """A pipeline file (``{input}`` is the input folder); a state file or a workdir holding inputs
    live under ``in/work`` (they are inputs of the run: they must come out unchanged)."""

    def make(d):
        folder = _in(d)
        if extra is not None:
            extra(folder)
        path = folder / "pipeline.toml"
        path.write_text(textwrap.dedent(text).format(input=folder))
        work = _out(d, "work")
        if state is not None or state_dir or work_in_inputs:
            work = folder / "work"
            work.mkdir(exist_ok=True)
            target = work / ".pipeline-state.json"
            if state_dir:
                target.mkdir()
            elif state is not None:
                target.write_text(state)
        return Run(["run", path, "--workdir", work], folder / blame)

    return make


def _stride0_into(folder: Path) -> None:
    craft_pt(folder / "ckpt.pt", {"0.weight": View(Storage("0", "FloatStorage", 1), 0, (40000, 40000), (0, 0))}, {"0": f32(1)})


def _good_into(folder: Path) -> None:
    (folder / "work").mkdir()
    shutil.copy(GOOD, folder / "work" / "projected.safetensors")


# -- trust: a planted factory that writes a marker if it is ever imported ------------------------------
PLANTED = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")

def factory(**kwargs):
    pathlib.Path({marker!r}).write_text("called")
    import torch
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 4))
"""


def planted(d: Path) -> Path:
    folder = d / "planted"
    folder.mkdir(exist_ok=True)
    (folder / "planted_hostile_models.py").write_text(textwrap.dedent(PLANTED.format(marker=str(d / "MARKER"))))
    weights = {"weight/1.weight": torch.zeros(4, 16), "weight/1.bias": torch.zeros(4)}

    def edit(meta):
        meta["model"] = {"factory": "planted_hostile_models:factory", "kwargs": {}, "input_shape": [1, 16]}

    from safetensors.torch import save_file

    tensors = {**weights, "mask/1.weight": torch.ones(4, 16, dtype=torch.bool)}
    meta = {"format_version": 1, "model": None, "pruning": {"method": "magnitude"}, "state": {}}
    edit(meta)
    path = _in(d) / "planted.safetensors"
    save_file(tensors, str(path), metadata={"dnsconvert": json.dumps(meta)})
    return path


def plant_path(monkeypatch, d):
    monkeypatch.syspath_prepend(str(d / "planted"))


# -- outputs ------------------------------------------------------------------------------------
def copy_good(d: Path, name: str = "ckpt.safetensors") -> Path:
    path = _in(d) / name
    shutil.copy(GOOD, path)
    return path


def fail_mkstemp(code: int):
    def patch(monkeypatch, d):
        import tempfile

        def refuse(*args, **kwargs):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(tempfile, "mkstemp", refuse)

    return patch


def fail_replace(code: int):
    def patch(monkeypatch, d):
        def refuse(src, dst, *args, **kwargs):
            raise OSError(code, os.strerror(code), str(dst))

        monkeypatch.setattr(os, "replace", refuse)

    return patch


def full_disk_safetensors(monkeypatch, d):
    """safetensors' writer (Rust) fails half-way, as it reports a full disk."""
    import safetensors.torch
    from safetensors import SafetensorError

    def half_then_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_full)


def full_disk_write_bytes(monkeypatch, d):
    real = Path.write_bytes

    def half_then_full(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", half_then_full)


def finished_run(d: Path, *, finished: bool = True, run_override: dict | None = None) -> Path:
    from dnsconvert.checkpoint import PruningInfo, SparseCheckpoint
    from dnsconvert.loading import load_checkpoint
    from dnsconvert.surgery.train import PruneConfig

    good = load_checkpoint(GOOD)
    run = PruneConfig(model=good.model, data="synthetic").to_json()
    run.update(run_override or {})
    state = {"run": run, "phase_index": 1, "phase_step": 0, "iteration": 10, "finished": finished, "model_raw": dict(good.weights)}
    path = _in(d) / "run.safetensors"
    SparseCheckpoint(good.weights, good.masks, model=good.model, pruning=PruningInfo("dns"), state=state).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# the table
CASES: list[Case] = [
    # -- checkpoints: dtypes, metadata, model kwargs, safetensors headers --------------------------
    Case("ckpt-float8-weight", tensors_case(lambda: {"weight/1.weight": torch.ones(32, 16).to(torch.float8_e4m3fn)}), match="float8"),
    Case("ckpt-float8-weight-export", tensors_case(lambda: {"weight/1.weight": torch.ones(32, 16).to(torch.float8_e4m3fn)}, "export"), match="float8"),
    Case("ckpt-complex-bias", tensors_case(lambda: {"weight/1.bias": torch.ones(32, dtype=torch.complex64)}), match="complex"),
    Case("ckpt-uint16-buffer", tensors_case(lambda: {"weight/1.bias": torch.ones(32, dtype=torch.uint16)}), match="uint16"),
    Case("ckpt-meta-nested-100000", with_meta(hostile.nested_json(100_000)), match="nest"),
    Case("ckpt-meta-nested-100-inspect", with_meta(json.dumps({"format_version": 1, "state": json.loads(hostile.nested_json(100))}), "inspect"), match="nests more than"),
    Case("ckpt-meta-not-an-object", with_meta("[1, 2]"), match="not a JSON object"),
    Case("ckpt-meta-model-is-string", meta_edit(lambda m: m.__setitem__("model", "mlp")), match="model spec"),
    Case("ckpt-meta-kwargs-is-list", meta_edit(lambda m: m["model"].__setitem__("kwargs", [1, 2])), match="kwargs"),
    Case("ckpt-meta-history-is-int", meta_edit(lambda m: m.__setitem__("pruning", {"method": "x", "history": 5})), match="metadata is malformed"),
    Case("ckpt-meta-state-tensor-ref", meta_edit(lambda m: m.__setitem__("state", {"__tensor__": "999"})), match="metadata is malformed"),
    Case("ckpt-meta-state-bad-pair", meta_edit(lambda m: m.__setitem__("state", {"__dict__": [[1]]})), match="metadata is malformed"),
    Case("ckpt-meta-version-string", meta_edit(lambda m: m.__setitem__("format_version", "1")), match="format_version"),
    Case("ckpt-meta-input-shape-negative", meta_edit(set_model(input_shape=[-1, 16])), match="positive"),
    Case("ckpt-meta-input-shape-zero", meta_edit(set_model(input_shape=[0, 16])), match="positive"),
    Case("ckpt-meta-input-shape-strings", meta_edit(set_model(input_shape=["a"])), match="input_shape"),
    Case("ckpt-meta-factory-int", meta_edit(set_model(factory=5)), match="factory"),
    Case("ckpt-meta-unknown-builtin", lambda d: ["export", safetensors_file(_in(d) / "c.safetensors", meta_edit=set_model(factory="dnsconvert.models:nope")), "-o", _out(d, "m.onnx")], match="unknown built-in model"),
    Case("ckpt-kwargs-hidden-string", kwargs_case({"in_features": 16, "hidden": "abc", "num_classes": 4}), match="list of positive integers"),
    Case("ckpt-kwargs-hidden-negative", kwargs_case({"in_features": 16, "hidden": [-5, 16], "num_classes": 4}), match="list of positive integers"),
    Case("ckpt-kwargs-hidden-float", kwargs_case({"in_features": 16, "hidden": [32.0, 16], "num_classes": 4}), match="list of positive integers"),
    Case("ckpt-kwargs-hidden-bool", kwargs_case({"in_features": 16, "hidden": [True, 16], "num_classes": 4}), match="list of positive integers"),
    Case("ckpt-kwargs-unknown-key", kwargs_case({"in_features": 16, "width": 3}), match="takes no argument width"),
    Case("ckpt-kwargs-5000-layers", kwargs_case({"in_features": 16, "hidden": [16] * 5000, "num_classes": 4}), match="DNSCONVERT_MAX_LAYERS"),
    Case("ckpt-kwargs-num-classes-zero", kwargs_case({"in_features": 16, "hidden": [32, 16], "num_classes": 0}), match="positive integer"),
    Case("ckpt-kwargs-30000-wide-validate", kwargs_case({"in_features": 16, "hidden": [30000, 30000], "num_classes": 4}), match="the model expects (30000"),
    Case("ckpt-kwargs-30000-wide-inspect", kwargs_case({"in_features": 16, "hidden": [30000, 30000], "num_classes": 4}, "inspect"), match="the model expects (30000"),
    Case("ckpt-kwargs-30000-wide-project", kwargs_case({"in_features": 16, "hidden": [30000, 30000], "num_classes": 4}, "project"), match="the model expects (30000"),
    Case("ckpt-kwargs-transformer-depth-1e9", lambda d: ["validate", safetensors_file(_in(d) / "c.safetensors", meta_edit=set_model(factory="dnsconvert.models:transformer_mlp", kwargs={"dim": 16, "depth": 10**9}))], match="DNSCONVERT_MAX_LAYERS"),
    Case("ckpt-export-input-1e9", lambda d: ["export", safetensors_file(_in(d) / "c.safetensors", meta_edit=set_model(input_shape=[1, 10**9])), "-o", _out(d, "m.onnx")], match="DNSCONVERT_MAX_INPUT_ELEMENTS"),
    Case("ckpt-export-input-negative", lambda d: ["export", safetensors_file(_in(d) / "c.safetensors", meta_edit=set_model(input_shape=[1, -16])), "-o", _out(d, "m.onnx")], match="positive"),
    Case("ckpt-export-torch-sparse-cpu-input-1e9", lambda d: ["export", safetensors_file(_in(d) / "c.safetensors", meta_edit=set_model(input_shape=[1, 10**9])), "--target", "torch-sparse-cpu", "-o", _out(d, "m.safetensors")], match="DNSCONVERT_MAX_INPUT_ELEMENTS"),
    Case("st-offsets-beyond-file", lambda d: ["validate", hostile.raw_safetensors(_in(d) / "c.safetensors", {"w": {"dtype": "F32", "shape": [40000, 40000], "data_offsets": [0, 6_400_000_000]}}, bytes(16))], match="safetensors"),
    Case("st-overlapping-offsets", lambda d: ["validate", hostile.raw_safetensors(_in(d) / "c.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, "b": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16))], match="safetensors"),
    Case("st-unknown-dtype", lambda d: ["validate", hostile.raw_safetensors(_in(d) / "c.safetensors", {"w": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}, bytes(16))], match="safetensors"),
    Case("st-shape-mismatch-data", lambda d: ["validate", hostile.raw_safetensors(_in(d) / "c.safetensors", {"w": {"dtype": "F32", "shape": [400], "data_offsets": [0, 16]}}, bytes(16))], match="safetensors"),
    Case("st-metadata-not-strings", lambda d: ["validate", hostile.raw_safetensors(_in(d) / "c.safetensors", {"__metadata__": {"dnsconvert": {"a": 1}}, "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(16))], match="safetensors"),
    # -- PyTorch .pt: sizes a file states, against the bytes it holds -----------------------------
    Case("pt-control-valid", pt_case(lambda: {"0.weight": View(Storage("0", "FloatStorage", 6), 0, (2, 3), (3, 1))}, lambda: {"0": f32(6)}), exit=0),
    Case("pt-stride0-40000x40000", pt_case(lambda: {"0.weight": View(Storage("0", "FloatStorage", 1), 0, (40000, 40000), (0, 0))}, lambda: {"0": f32(1)}), match="stride 0"),
    Case("pt-stride0-project", pt_case(lambda: {"0.weight": View(Storage("0", "FloatStorage", 1), 0, (40000, 40000), (0, 0))}, lambda: {"0": f32(1)}, "project"), match="stride 0"),
    Case("pt-stride0-prune-init", pt_case(lambda: {"0.weight": View(Storage("0", "FloatStorage", 1), 0, (40000, 40000), (0, 0))}, lambda: {"0": f32(1)}, "prune-init"), match="stride 0"),
    Case("pt-overlapping-view", pt_case(lambda: {"0.weight": View(Storage("0", "FloatStorage", 1999), 0, (1000, 1000), (1, 1))}, lambda: {"0": f32(1999)}), match="overlap"),
    Case("pt-view-beyond-storage", pt_case(lambda: {"0.weight": View(Storage("0", "FloatStorage", 10), 100, (10,), (1,))}, lambda: {"0": f32(10)}), match="reaches element"),
    Case("pt-storage-larger-than-record", pt_case(lambda: {"0.weight": View(Storage("0", "FloatStorage", 10**9), 0, (1000, 1000), (1000, 1))}, lambda: {"0": f32(10)}), match="its record holds"),
    Case("pt-storage-record-missing", pt_case(lambda: {"0.weight": View(Storage("7", "FloatStorage", 4), 0, (4,), (1,))}, lambda: {"0": f32(4)}), match="no data record"),
    Case("pt-negative-stride", pt_case(lambda: {"0.weight": View(Storage("0", "FloatStorage", 4), 3, (4,), (-1,))}, lambda: {"0": f32(4)}), match="malformed"),
    Case("pt-compressed-entry", pt_case(lambda: {"0.weight": View(Storage("0", "FloatStorage", 4), 0, (4,), (1,))}, lambda: {"0": f32(4)}, compress=True), match="compressed"),
    Case("pt-no-data-pkl", lambda d: ["validate", _zip(_in(d) / "c.pt", {"archive/data/0": f32(4), "archive/version": b"3"})], match="data.pkl"),
    Case("pt-empty-data-pkl", pt_case(lambda: {}, lambda: {}, pickle_bytes=b""), match="truncated or corrupt"),
    Case("pt-duplicate-entry", lambda d: ["validate", _zip(_in(d) / "c.pt", {"archive/data.pkl": b"x", "archive/data/0": f32(4)}, duplicate="archive/data/0")], match="twice"),
    Case("pt-many-views-of-one-storage", lambda d: hostile.bomb_many_views(_in(d)), match="DNSCONVERT_MAX_SHARED_VIEW_BYTES"),
    Case("pt-tied-weights-control", pt_case(lambda: {"0.weight": View(Storage("0", "FloatStorage", 6), 0, (2, 3), (3, 1)), "1.weight": View(Storage("0", "FloatStorage", 6), 0, (2, 3), (3, 1))}, lambda: {"0": f32(6)}), exit=0),
    Case("pt-legacy-control-valid", lambda d: legacy_pt(d), exit=0),
    Case("pt-legacy-storage-claims-1e12", lambda d: legacy_pt(d, numel=10**12, size=(10**6, 10**6), stride=(10**6, 1)), match="claim"),
    Case("pt-legacy-stride0", lambda d: legacy_pt(d, size=(40000, 40000), stride=(0, 0), numel=1, data_numel=1), match="stride 0"),
    Case("pt-global-os-system", lambda d: ["validate", _pickle_global(d)], match="refused to unpickle"),
    Case("pt-sparse-tensor", saved_pt(lambda: {"1.weight": torch.eye(4).to_sparse()}), match="does not read"),
    Case("pt-float8-weight", saved_pt(lambda: {"1.weight": torch.ones(4, 4).to(torch.float8_e5m2)}), match="float8"),
    Case("pt-nested-100-deep", saved_pt(lambda: {"state_dict": _nest(torch.zeros(2), 100)}), match="nests"),
    Case("pt-integer-keys", saved_pt(lambda: {1: torch.zeros(2, 2)}), match="not a tensor"),
    Case("pt-truncated-zip", lambda d: ["validate", _truncated(hostile.GOOD_PT, _in(d) / "t.pt")], match="truncated"),
    # -- ONNX through densify (one checked read) ------------------------------------------------
    Case("onnx-control-valid", densify_case(), exit=0, leaves=("dense.onnx",)),
    Case("onnx-empty", densify_bytes(lambda: b""), match="empty"),
    Case("onnx-truncated", densify_bytes(lambda: onnx_model().SerializeToString()[:60]), match="ONNX"),
    Case("onnx-garbage", densify_bytes(lambda: bytes(range(256)) * 4), match="ONNX"),
    Case("onnx-negative-index", densify_case(indices=(-1, 5, 10)), match="outside"),
    Case("onnx-duplicate-index", densify_case(indices=(1, 5, 5)), match="sorted and unique"),
    Case("onnx-unsorted-index", densify_case(indices=(5, 1, 10)), match="sorted and unique"),
    Case("onnx-index-out-of-range", densify_case(indices=(1, 5, 16)), match="outside"),
    Case("onnx-more-indices-than-values", densify_case(indices=(1, 5, 10, 11)), match="4 indices for 3 values"),
    Case("onnx-fewer-indices-than-values", densify_case(indices=(1, 5)), match="2 indices for 3 values"),
    Case("onnx-negative-dims", densify_case(dims=(4, -4)), match="non-negative"),
    Case("onnx-dims-2GiB", densify_case(indices=(1,), values=(1.0,), dims=(4, 1 << 27)), match="DNSCONVERT_MAX_DENSE_BYTES"),
    Case("onnx-external-data", densify_model(lambda: onnx_model(edit=_external)), match="external"),
    Case("onnx-dense-init-short", densify_model(lambda: onnx_model(edit=_short_dense)), match="holds only"),
    Case("onnx-float-indices", densify_case(index_dtype=np.float32), match="indices"),
    Case("onnx-values-2d", densify_case(indices=(1, 5), values=(1.0, 2.0), values_shape=(2, 1)), match="values of shape"),
    Case("onnx-coords-out-of-range", densify_case(indices=[[0, 1], [9, 9]], values=(1.0, 2.0)), match="outside"),
    Case("onnx-constant-sparse-value-dup", densify_model(lambda: onnx_model(edit=_edit_attr_constant)), match="sorted and unique"),
    Case("onnx-unknown-dtype", densify_model(lambda: onnx_model(edit=_unknown_dtype)), match="unknown data type"),
    Case("onnx-no-opset", densify_model(lambda: onnx_model(edit=_no_opset)), match="onnx.checker"),
    Case("onnx-unknown-op", densify_model(lambda: onnx_model(edit=_bad_op)), match="onnx.checker"),
    Case("onnx-missing-file", lambda d: ["densify", _in(d) / "nope.onnx", "-o", _out(d, "dense.onnx")], match="no such"),
    Case("onnx-directory", lambda d: ["densify", _in(d), "-o", _out(d, "dense.onnx")], match="directory"),
    # -- ONNX Runtime artifacts through bench (read_onnx, then ORT's own load) ----------------------
    Case("ort-control-bench", ort_case(lambda f, m: None), exit=0, needs=("ort",)),
    Case("ort-truncated-model", ort_case(_truncate_sparse), needs=("ort",), match="ONNX"),
    Case("ort-runtime-rejects-model", ort_case(_ort_rejects), needs=("ort",), match="ONNX Runtime cannot load"),
    Case("ort-manifest-input-2^24-batch-64", ort_case(_manifest_input([BATCH, 1 << 24]), batches=("--batch", "64")), needs=("ort",), match="DNSCONVERT_MAX_INPUT_ELEMENTS"),
    Case("ort-manifest-input-mismatch", ort_case(_manifest_input([BATCH, 17])), needs=("ort",), match="refused the inputs"),
    Case("ort-manifest-input-renamed", ort_case(lambda f, m: m["model"]["inputs"][0].__setitem__("name", "other")), needs=("ort",), match="needs an input"),
    Case("ort-manifest-input-zero", ort_case(_manifest_input([BATCH, 0])), needs=("ort",), match="dimension"),
    Case("ort-manifest-input-negative", ort_case(_manifest_input([BATCH, -16])), needs=("ort",), match="dimension"),
    Case("ort-manifest-input-string", ort_case(_manifest_input("big")), needs=("ort",), match="shape must be a list"),
    # -- CSR artifacts (torch-sparse-cpu) through bench ------------------------------------------
    Case("csr-control-bench", csr_case(lambda m, p: None), exit=0, needs=("csr",)),
    Case("csr-index-out-of-range", csr_case(_indices(_set0(10**9))), needs=("csr",), match="outside"),
    Case("csr-index-negative", csr_case(_indices(_set0(-1))), needs=("csr",), match="outside"),
    Case("csr-indices-unsorted", csr_case(_indices(_swap01)), needs=("csr",), match="sorted and unique"),
    Case("csr-indices-duplicate", csr_case(_indices(_dup01)), needs=("csr",), match="sorted and unique"),
    Case("csr-indices-short", csr_case(_indices(lambda a: a[:-1])), needs=("csr",), match="indices for"),
    Case("csr-float-indices", csr_case(_indices(lambda a: a.astype(np.float32))), needs=("csr",), match="indices"),
    Case("csr-dims-300x2^21", csr_case(_dims([300, 1 << 21])), needs=("csr",), match="DNSCONVERT_MAX_DENSE_BYTES"),
    Case("csr-plan-missing", csr_case(_plan(lambda p: None)), needs=("csr",), match="no execution plan"),
    Case("csr-plan-not-json", csr_case(_plan(lambda p: "{not json")), needs=("csr",), match="not valid JSON"),
    Case("csr-plan-unknown-kernel", csr_case(_plan(_kernels("gpu"))), needs=("csr",), match="plan"),
    Case("csr-plan-unknown-layer", csr_case(_plan(_unknown_layer)), needs=("csr",), match="plan names layers"),
    Case("csr-plan-wrong-version", csr_case(_plan(lambda p: {**p, "version": 99})), needs=("csr",), match="plan"),
    # -- pipeline files and their state files ----------------------------------------------------
    Case("pipe-state-corrupt-json", pipeline("[input]\ncheckpoint = '{input}/c.safetensors'\n[validate]\n", state="{not json", extra=lambda f: shutil.copy(GOOD, f / "c.safetensors")), match="unreadable"),
    Case("pipe-state-nested-100000", pipeline("[input]\ncheckpoint = '{input}/c.safetensors'\n[validate]\n", state=hostile.nested_json(100_000), extra=lambda f: shutil.copy(GOOD, f / "c.safetensors")), match="nests too deeply"),
    Case("pipe-state-wrong-types", pipeline("[input]\ncheckpoint = '{input}/c.safetensors'\n[validate]\n", state='{"validate": [1, 2]}', extra=lambda f: shutil.copy(GOOD, f / "c.safetensors")), match="unreadable"),
    Case("pipe-state-outputs-wrong-type", pipeline("[input]\ncheckpoint = '{input}/c.safetensors'\n[validate]\n", state='{"validate": {"key": "k", "outputs": 5}}', extra=lambda f: shutil.copy(GOOD, f / "c.safetensors")), match="unreadable"),
    Case("pipe-state-is-directory", pipeline("[input]\ncheckpoint = '{input}/c.safetensors'\n[validate]\n", state_dir=True, extra=lambda f: shutil.copy(GOOD, f / "c.safetensors")), match="unreadable"),
    Case("pipe-input-stride0-pt", pipeline("[input]\ncheckpoint = '{input}/ckpt.pt'\n[validate]\n", extra=_stride0_into, blame="ckpt.pt"), match="stride 0", leaves=("report.json",)),
    Case("pipe-stage-overwrites-input", pipeline("[input]\ncheckpoint = '{input}/work/projected.safetensors'\n[project]\n", extra=_good_into, work_in_inputs=True), match="over its input", leaves=("report.json",)),
    Case("pipe-kwargs-900M-params", pipeline("[prune]\nmodel = 'mlp'\nmodel_kwargs = {{ hidden = [30000, 30000] }}\ndata = 'synthetic'\nepochs = 0.01\n"), match="DNSCONVERT_MAX_PARAMETERS", leaves=("report.json",)),
    Case("pipe-input-shape-zero", pipeline("[prune]\nmodel = 'mlp'\ninput_shape = [0, 784]\ndata = 'synthetic'\n"), match="positive", leaves=("report.json",)),
    Case("pipe-invalid-toml", pipeline("[prune\nmodel = 1\n"), match="TOML"),
    Case("pipe-empty-file", pipeline(""), match="[prune]"),
    Case("pipe-trust-key", pipeline("[prune]\ntrust_model_code = true\n"), match="trust"),
    Case("pipe-missing-file", lambda d: ["run", _in(d) / "nope.toml", "--workdir", _out(d, "work")], match="cannot read"),
    Case("pipe-directory", lambda d: ["run", _in(d), "--workdir", _out(d, "work")], match="cannot read"),
    # -- MNIST data folders (prune --data) -------------------------------------------------------
    Case("mnist-gzip-3MB-to-3GiB", lambda d: Run(hostile.bomb_gzip(_in(d))[:-2] + ["-o", _out(d, "p.safetensors")], _in(d) / "mnist"), match="more data than its header"),
    Case("mnist-header-2^31-images", prune_data(train_images=gz(idx_bytes([1 << 31, 28, 28], b""))), match="DNSCONVERT_MAX_DENSE_BYTES"),
    Case("mnist-truncated-gzip", prune_data(train_images=truncated_gzip()), match="truncated"),
    Case("mnist-corrupt-gzip", prune_data(train_images=corrupt_gzip()), match="corrupt"),
    Case("mnist-float-idx", prune_data(train_images=images(dtype_code=0x0D)), match="unsigned-byte"),
    Case("mnist-ndim-0", prune_data(train_labels=gz(idx_bytes([], b"", ndim=0))), match="dimensions"),
    Case("mnist-ndim-9", prune_data(train_images=gz(idx_bytes([1] * 9, b"\0"))), match="dimensions"),
    Case("mnist-short-header", prune_data(train_images=gz(b"\0\0\x08")), match="header"),
    Case("mnist-images-10x10", prune_data(train_images=images(side=10)), match="28x28"),
    Case("mnist-labels-over-9", prune_data(train_labels=labels([0, 1, 2, 3, 4, 5, 6, 200])), match="0..9"),
    Case("mnist-count-mismatch", prune_data(train_labels=labels([1, 2, 3])), match="do not match"),
    Case("mnist-zero-images", prune_data(train_images=images(n=0), train_labels=labels([])), match="one or more"),
    Case("mnist-truncated-data", prune_data(train_images=gz(idx_bytes([8, 28, 28], bytes(100)))), match="ends after"),
    Case("mnist-trailing-data", prune_data(train_images=gz(idx_bytes([8, 28, 28], bytes(8 * 784 + 5)))), match="more data"),
    Case("mnist-two-gzip-members", prune_data(train_images=two_members()), match="after its gzip stream"),
    Case("mnist-empty-file", prune_data(test_images=b""), match="header"),
    Case("mnist-missing-file", lambda d: Run(prune_data()(d).args, None), match="missing", patch=lambda mp, d: (d / "in" / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()),
    Case("mnist-folder-is-a-file", lambda d: Run(["prune", "--data", copy_good(d), "--no-progress", "-o", _out(d, "p.safetensors")]), match="not a directory"),
    # -- outputs: never an input, never half-written, OS refusals as one line ---------------------
    Case("out-export-ort-onto-input", lambda d: Run(["export", copy_good(d), "-o", _in(d) / "ckpt.safetensors"]), match="input"),
    Case("out-export-csr-onto-input", lambda d: Run(["export", copy_good(d), "--target", "torch-sparse-cpu", "-o", _in(d) / "ckpt.safetensors"]), match="input"),
    Case("out-export-into-folder-holding-input", lambda d: Run(["export", copy_good(d), "-o", _in(d)], _in(d)), match="holds the input"),
    Case("out-validate-report-onto-input", lambda d: Run(["validate", copy_good(d), "--report", _in(d) / "ckpt.safetensors"]), match="also an input"),
    Case("out-project-onto-input", lambda d: Run(["project", copy_good(d), "-o", _in(d) / "ckpt.safetensors"]), match="also an input"),
    Case("out-project-report-onto-input", lambda d: Run(["project", copy_good(d), "-o", _out(d, "p.safetensors"), "--report", _in(d) / "ckpt.safetensors"]), match="also an input"),
    Case("out-project-report-is-output", lambda d: Run(["project", copy_good(d), "-o", _out(d, "p.safetensors"), "--report", _out(d, "p.safetensors")], _out(d, "p.safetensors")), match="two outputs"),
    Case("out-prune-init-onto-input", lambda d: Run(["prune", "--init", copy_good(d), "--model", "mlp", "--no-progress", "-o", _in(d) / "ckpt.safetensors"]), match="also an input"),
    Case("out-densify-onto-input", lambda d: Run(["densify", onnx_file(_in(d) / "m.onnx"), "-o", _in(d) / "m.onnx"]), match="also an input"),
    Case("out-bench-report-onto-input", lambda d: Run(["bench", copy_good(d), "--report", _in(d) / "ckpt.safetensors"]), match="also an input"),
    Case("out-symlink-to-input", lambda d: Run(["project", copy_good(d), "-o", _symlink(d)], _in(d) / "link.safetensors"), match="also an input"),
    Case("out-hardlink-to-input", lambda d: Run(["project", copy_good(d), "-o", _hardlink(d)], _in(d) / "hard.safetensors"), match="also an input"),
    Case("out-validate-report-is-dir", lambda d: Run(["validate", copy_good(d), "--report", _outdir(d)], _outdir(d)), match="is a directory"),
    Case("out-project-output-is-dir", lambda d: Run(["project", copy_good(d), "-o", _outdir(d)], _outdir(d)), match="is a directory"),
    Case("out-densify-output-is-dir", lambda d: Run(["densify", onnx_file(_in(d) / "m.onnx"), "-o", _outdir(d)], _outdir(d)), match="is a directory"),
    Case("out-export-output-is-a-file", lambda d: Run(["export", copy_good(d), "-o", _in(d) / "other.txt"], _in(d) / "other.txt"), match="is a file", patch=lambda mp, d: (d / "in" / "other.txt").write_text("mine")),
    Case("out-parent-is-a-file", lambda d: Run(["project", copy_good(d), "-o", _in(d) / "ckpt.safetensors" / "p.safetensors"], _in(d) / "ckpt.safetensors" / "p.safetensors"), match="not a folder"),
    Case("out-project-erofs", lambda d: Run(["project", copy_good(d), "-o", _out(d, "sub/p.safetensors")], _out(d, "sub/p.safetensors")), patch=fail_mkstemp(errno.EROFS), match="read-only file system"),
    Case("out-validate-report-eacces", lambda d: Run(["validate", copy_good(d), "--report", _out(d, "r.json")], _out(d, "r.json")), patch=fail_mkstemp(errno.EACCES), match="permission denied"),
    Case("out-project-enospc-midwrite", lambda d: Run(["project", copy_good(d), "-o", _out(d, "p.safetensors")], _out(d, "p.safetensors")), patch=full_disk_safetensors, match="disk full"),
    Case("out-densify-enospc-midwrite", lambda d: Run(["densify", onnx_file(_in(d) / "m.onnx"), "-o", _out(d, "dense.onnx")], _out(d, "dense.onnx")), patch=full_disk_write_bytes, match="disk full"),
    Case("out-validate-report-enospc-rename", lambda d: Run(["validate", copy_good(d), "--report", _out(d, "r.json")], _out(d, "r.json")), patch=fail_replace(errno.ENOSPC), match="disk full"),
    Case("out-project-efbig", lambda d: Run(["project", copy_good(d), "-o", _out(d, "p.safetensors")], _out(d, "p.safetensors")), patch=fail_replace(errno.EFBIG), match="too large"),
    # -- prune --resume ---------------------------------------------------------------------------
    Case("resume-finished-run", lambda d: Run(["prune", "--resume", finished_run(d), "--no-progress", "-o", _in(d) / "run.safetensors"]), match="had finished"),
    Case("resume-malformed-run", lambda d: Run(["prune", "--resume", finished_run(d, finished=False, run_override={"dns": 5}), "--no-progress", "-o", _out(d, "p.safetensors")]), match="malformed"),
    Case("resume-no-state", lambda d: Run(["prune", "--resume", copy_good(d), "--no-progress", "-o", _out(d, "p.safetensors")]), match="no resumable run state"),
    # -- trust: a factory named by a file is never imported without the flag --------------------------
    Case("trust-export-planted-factory", lambda d: ["export", planted(d), "-o", _out(d, "m.onnx")], patch=plant_path, match="--trust-model-code"),
    Case("trust-bench-planted-factory", lambda d: ["bench", planted(d), "--iterations", "1"], patch=plant_path, match="--trust-model-code"),
    Case("trust-export-csr-planted-factory", lambda d: ["export", planted(d), "--target", "torch-sparse-cpu", "-o", _out(d, "m.safetensors")], patch=plant_path, match="--trust-model-code"),
]


def _zip(path: Path, entries: dict[str, bytes], duplicate: str | None = None) -> Path:
    import zipfile

    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as archive:
        warnings.simplefilter("ignore")
        for name, data in entries.items():
            archive.writestr(name, data)
        if duplicate:
            archive.writestr(duplicate, entries[duplicate])
    return path


def _pickle_global(d: Path) -> Path:
    """A plain pickle whose GLOBAL would call os.system (writing the marker) when unpickled."""

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'MARKER'}",))

    path = _in(d) / "evil.pt"
    path.write_bytes(pickle.dumps({"w": RunsCode()}, protocol=2))
    return path


def _nest(value, depth):
    for _ in range(depth):
        value = [value]
    return value


def _truncated(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def _symlink(d: Path) -> Path:
    link = _in(d) / "link.safetensors"
    link.symlink_to(_in(d) / "ckpt.safetensors")
    return link


def _hardlink(d: Path) -> Path:
    link = _in(d) / "hard.safetensors"
    os.link(_in(d) / "ckpt.safetensors", link)
    return link


def _outdir(d: Path) -> Path:
    folder = d / "out" / "a-folder"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ---------------------------------------------------------------------------------------------
# running the table
@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """One ORT and one CSR artifact of the tiny MLP, built once; cases copy them."""
    from dnsconvert.loading import load_checkpoint
    from dnsconvert.targets import BuildOptions, get_target

    ckpt = load_checkpoint(GOOD)
    base = tmp_path_factory.mktemp("artifacts")
    ort = get_target("ort").build(ckpt, base / "ort" / "m.onnx", BuildOptions())
    csr = get_target("torch-sparse-cpu").build(ckpt, base / "csr" / "m", BuildOptions(extra={"plan": "sparsity", "min_sparsity": "0.5"}))
    assert onnx.load_from_string(csr.read("sparse")).graph.sparse_initializer  # the cases edit its sparse tensors
    _ARTIFACTS.update({"ort": ort.manifest_path, "csr": csr.manifest_path})
    return _ARTIFACTS


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` except ``out/``, symlinks by target."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if rel.parts[0] == "out" or path.is_dir():
            continue
        files[str(rel)] = "link->" + os.readlink(path) if path.is_symlink() else hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def first_path(args: list) -> Path | None:
    return next((a for a in args if isinstance(a, Path)), None)


# ---------------------------------------------------------------------------------------------
# the measured worker: the table's commands run in one fresh interpreter, each case's peak memory
# measured above the worker's baseline just before it (see the module docstring)
MEMORY_BOUND = GIB  # the goal: no file under 10 MB takes a command 1 GB above its baseline
AS_MARGIN = 512 << 20  # address space that is not memory: new thread stacks, malloc arenas, mapped files
CASE_TIMEOUT = 120  # seconds; a case that hangs ends its worker, faulthandler says where
WORKER_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}  # as run_measured; fewer arenas: less address space
ALLOC_FAILED = re.compile(r"MemoryError|bad_alloc|can't allocate|cannot allocate|failed to allocate|out of memory", re.IGNORECASE)


@dataclass
class Measured:
    """A case's folder and command, made in pytest's process, and what the worker reported."""

    folder: Path
    run: Run | None = None
    result: dict = field(default_factory=dict)
    error: Exception | None = None  # making the case's files failed: the case's test raises it


def _statm() -> tuple[int, int]:
    """(resident, virtual) bytes of this process."""
    with open("/proc/self/statm") as fh:
        size, resident = fh.read().split()[:2]
    page = os.sysconf("SC_PAGE_SIZE")
    return int(resident) * page, int(size) * page


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _vm_hwm() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))


class PeakRss:
    """Peak resident bytes of this process between start() and stop(): the kernel's high-water
    mark where /proc/self/clear_refs may reset it (exact: a spike of any length counts), else a
    thread sampling /proc/self/statm every millisecond."""

    def __init__(self) -> None:
        self.kernel = _reset_hwm()

    def start(self) -> None:
        self.peak = _statm()[0]
        if self.kernel:
            _reset_hwm()
            return
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.wait(0.001):
            self.peak = max(self.peak, _statm()[0])

    def stop(self) -> int:
        if self.kernel:
            return max(self.peak, _vm_hwm())
        self.done.set()
        self.thread.join()
        return max(self.peak, _statm()[0])


def _run_case(case: Case, folder: Path, args: list[str], peak: PeakRss, stderr_fd: int, captured) -> dict:
    """In the worker: apply the case's patch, run its command through the CLI and measure it."""
    import ctypes
    import gc
    import resource
    import time

    monkeypatch = pytest.MonkeyPatch()
    try:
        if case.patch is not None:
            case.patch(monkeypatch, folder)
        before = snapshot(folder)  # after the patch: a patch may remove an input on purpose
        folders_before = sorted(str(p) for p in (folder / "out").rglob("*") if p.is_dir())
        gc.collect()
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
        if trim is not None:
            trim(0)  # glibc keeps freed heap resident: return it, or a case could reuse it unseen
        base, vm = _statm()
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = vm + MEMORY_BOUND + AS_MARGIN
        captured.seek(0)
        captured.truncate()
        sys.stderr.flush()
        os.dup2(captured.fileno(), 2)  # what runtimes write to fd 2 themselves is stderr too
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
        peak.start()
        started = time.perf_counter()
        try:
            result = CliRunner().invoke(cli, args)
        finally:
            top = peak.stop()
            seconds = time.perf_counter() - started
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
            sys.stderr.flush()
            os.dup2(stderr_fd, 2)
    finally:
        monkeypatch.undo()
    captured.seek(0)
    exception = result.exception
    return {
        "id": case.id,
        "exit": result.exit_code,
        "stderr": result.stderr + captured.read().decode(errors="replace"),
        "output": result.output,
        "exception": None if exception is None or isinstance(exception, SystemExit) else "".join(traceback.format_exception(*result.exc_info)),
        "before": before,
        "folders_before": folders_before,
        "base": base,
        "above": top - base,
        "seconds": seconds,
    }


def worker(jobs_file: Path, results_file: Path) -> None:
    """The worker subprocess: ``python tests/test_hostile.py --worker JOBS RESULTS``. Each case is
    a line ``{"started": id}`` and then its result, so a crash is blamed on the case it hit."""
    import faulthandler
    import tempfile

    import importlib

    for name in ("onnxruntime", "safetensors.torch", "dnsconvert.loading", "dnsconvert.validate", "dnsconvert.export", "dnsconvert.targets", "dnsconvert.data", "dnsconvert.pipeline", "dnsconvert.bench", "dnsconvert.surgery"):
        importlib.import_module(name)  # what every command imports anyway is the baseline (as run_measured)
    main = importlib.import_module("dnsconvert.cli.main")
    for name in main.COMMANDS:
        main.cli.get_command(None, name)
    cases = {c.id: c for c in CASES + PROBES}
    peak = PeakRss()
    stderr_fd = os.dup(2)
    captured = tempfile.TemporaryFile()  # opened before any patch replaces tempfile's functions
    with open(results_file, "a") as out:
        for job in json.loads(jobs_file.read_text()):
            out.write(json.dumps({"started": job["id"]}) + "\n")
            out.flush()
            faulthandler.dump_traceback_later(CASE_TIMEOUT, exit=True, file=stderr_fd)
            try:
                record = _run_case(cases[job["id"]], Path(job["folder"]), job["args"], peak, stderr_fd, captured)
            except Exception:  # the harness, not the command (that is CliRunner's): report it as such
                record = {"id": job["id"], "worker_error": traceback.format_exc()}
            faulthandler.cancel_dump_traceback_later()
            out.write(json.dumps(record) + "\n")
            out.flush()


def run_workers(jobs: list[dict], work: Path) -> dict[str, dict]:
    """Run the jobs in a worker subprocess; results by case id. A worker that dies (a crash, a
    hang) is blamed on the case it was running and a new worker takes the cases left."""
    results: dict[str, dict] = {}
    for attempt in itertools.count():
        pending = [job for job in jobs if job["id"] not in results]
        if not pending:
            return results
        spec, lines = work / f"jobs-{attempt}.json", work / f"results-{attempt}.jsonl"
        spec.write_text(json.dumps(pending))
        command = [sys.executable, __file__, "--worker", str(spec), str(lines)]
        try:
            proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **WORKER_ENV}, timeout=CASE_TIMEOUT * len(pending) + 120)
            why = f"the worker exited {proc.returncode} during this case: {proc.stderr[-3000:]}"
        except subprocess.TimeoutExpired as exc:
            why = f"the worker timed out during this case: {str(exc.stderr)[-3000:]}"
        current = None
        for line in lines.read_text().splitlines() if lines.exists() else []:
            record = json.loads(line)
            current = record.get("started")
            if current is None:
                results[record["id"]] = record
        if current is not None:
            results[current] = {"crashed": why}
        elif any(job["id"] not in results for job in pending):  # died between cases or on start: no culprit
            return {**results, **{job["id"]: {"crashed": why} for job in pending if job["id"] not in results}}
    return results


def _probe(allocate: Callable[[], object]):
    """Patch validate to allocate first, so a probe proves the measurement can see memory."""

    def patch(monkeypatch, d):
        import dnsconvert.validate as module

        real = module.validate

        def validate(*args, **kwargs):
            allocate()
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "validate", validate)

    return patch


SPIKE = 300 << 20
PROBES = [
    Case("probe-spike-300MiB", lambda d: ["validate", copy_good(d)], exit=0, patch=_probe(lambda: np.ones(SPIKE, np.uint8).sum())),
    Case("probe-untouched-past-bound", lambda d: ["validate", copy_good(d)], exit=3, patch=_probe(lambda: np.empty(MEMORY_BOUND + AS_MARGIN, np.uint8))),
]


@pytest.fixture(scope="module")
def measured(request, tmp_path_factory) -> dict[str, Measured]:
    """Make the files of the selected table cases (and the probes) here, then run them all in
    one worker; what each case did, by id."""
    chosen = [item.callspec.params["case"] for item in request.session.items if getattr(item, "function", None) is test_hostile_case]
    cases = chosen + PROBES
    if any(case.needs for case in cases):
        request.getfixturevalue("artifacts")
    made: dict[str, Measured] = {}
    for case in cases:
        folder = tmp_path_factory.mktemp(case.id)
        (folder / "out").mkdir()
        made[case.id] = entry = Measured(folder)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zipfile's "Duplicate name" and friends while crafting files
                built = case.make(folder)
            entry.run = built if isinstance(built, Run) else Run(built)
        except Exception as exc:
            entry.error = exc
    jobs = [{"id": key, "folder": str(m.folder), "args": [str(a) for a in m.run.args]} for key, m in made.items() if m.error is None]
    for key, result in run_workers(jobs, tmp_path_factory.mktemp("worker")).items():
        made[key].result = result
    return made


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_case(case: Case, measured: dict[str, Measured]):
    entry = measured[case.id]
    if entry.error is not None:
        raise entry.error
    got, folder, run = entry.result, entry.folder, entry.run
    assert "crashed" not in got and "worker_error" not in got, got.get("crashed") or got.get("worker_error")
    stderr = got["stderr"]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert got["exit"] == case.exit, f"exit {got['exit']}, stderr: {stderr[-2000:]}"
    assert "Traceback" not in got["output"] and "Traceback" not in stderr
    assert got["exception"] is None, got["exception"]
    assert not ALLOC_FAILED.search(stderr), f"an allocation failed (past the bound?): {stderr[-2000:]}"
    assert got["above"] < MEMORY_BOUND, f"peak {got['above'] / 2**20:.0f} MiB above the worker's baseline"
    if case.exit != 0:
        assert len(lines) == 1, stderr
        line = lines[0]
        assert line.startswith("dnsconvert: error:"), line
        blame = run.blame if run.blame is not None else first_path(run.args)
        assert blame is None or str(blame) in line, f"{blame} not named in: {line}"
        assert case.match in line, line
    before = got["before"]
    after = {k: v for k, v in snapshot(folder).items() if k in before or Path(k).name not in case.leaves}
    assert after == before, "an input was changed, or a file was left beside the inputs"
    if case.exit != 0:
        left = [p for p in (folder / "out").rglob("*") if p.is_file() and p.name not in case.leaves]
        assert left == [], f"left behind: {left}"
        if not case.leaves:  # not even a folder the command made for its output
            assert sorted(str(p) for p in (folder / "out").rglob("*") if p.is_dir()) == got["folders_before"]
    assert not (folder / "MARKER").exists(), "a file made dnsconvert run its code"


def test_the_measurement_sees_memory(measured: dict[str, Measured]):
    """The bound could not fail if nothing were measured: a 300 MiB spike freed at once is seen
    (less what the heap held free at the baseline), and an allocation past the bound that is
    never touched is refused (MemoryError, exit 3)."""
    spike, untouched = (measured[case.id].result for case in PROBES)
    assert spike.get("exit") == 0 and 0.9 * SPIKE <= spike["above"] < MEMORY_BOUND, spike
    assert untouched.get("exit") == 3 and "MemoryError" in untouched["stderr"], untouched


def test_the_table_is_large_and_its_ids_unique():
    ids = [c.id for c in CASES + PROBES]
    assert len(ids) == len(set(ids))
    assert len(CASES) >= 120  # the number, each case measured; the memory bombs come on top


# ---------------------------------------------------------------------------------------------
# memory bombs: a fresh interpreter each, peak RSS above its baseline


@pytest.mark.parametrize("name", sorted(hostile.MEMORY_BOMBS))
def test_memory_bomb_is_refused_within_bound(name, tmp_path):
    (tmp_path / "out").mkdir()
    args = hostile.MEMORY_BOMBS[name](tmp_path)
    result = hostile.run_measured(args, result_file=tmp_path / "measured.json")
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert result["exit"] == 2, result["stderr"][-2000:]
    assert len(lines) == 1 and lines[0].startswith("dnsconvert: error:") and "Traceback" not in result["stderr"], result["stderr"]
    assert str(tmp_path) in lines[0]
    assert 0 < result["base"] and result["above_baseline"] < MEMORY_BOUND, f"{result['above_baseline'] / 2**20:.0f} MiB above baseline"
    left = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != "report.json"]
    assert left == []


# ---------------------------------------------------------------------------------------------
# a real full disk and a real read-only file system (a small tmpfs in a private mount namespace)
def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /tmp && true"], capture_output=True)
    return probe.returncode == 0


_TMPFS = pytest.mark.skipif(not sys.platform.startswith("linux") or not _can_mount_tmpfs(), reason="cannot mount a tmpfs in an unprivileged user namespace here")


def _in_tmpfs(tmp_path: Path, script: str) -> subprocess.CompletedProcess:
    mount = tmp_path / "mnt"
    mount.mkdir()
    shell = f"set -e\n{script}".format(mnt=mount, py=sys.executable, good=GOOD)
    return subprocess.run(["unshare", "-rm", "sh", "-c", shell], capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)


@_TMPFS
def test_real_full_disk_says_disk_full_and_leaves_nothing(tmp_path):
    # a 64 KiB tmpfs, filled but for 2 KiB: the projected checkpoint (~7 KB) cannot fit
    result = _in_tmpfs(tmp_path, textwrap.dedent("""
        mount -t tmpfs -o size=64k none {mnt}
        dd if=/dev/zero of={mnt}/filler bs=1k count=62 2>/dev/null || true
        code=0; {py} -m dnsconvert project {good} -o {mnt}/sub/p.safetensors 2>{mnt}.err || code=$?
        echo "exit=$code"; echo "files=$(ls -A {mnt} | tr '\\n' ' ')"; cat {mnt}.err
    """))
    out = result.stdout
    assert "exit=2" in out.splitlines(), out + result.stderr
    assert "files=filler" in [line.strip() for line in out.splitlines()], out  # no partial file, not even the folder it made
    errors = [line for line in out.splitlines() if line.startswith("dnsconvert:")]
    assert len(errors) == 1 and "disk full" in errors[0] and "p.safetensors" in errors[0], out


@_TMPFS
def test_real_read_only_file_system(tmp_path):
    result = _in_tmpfs(tmp_path, textwrap.dedent("""
        mount -t tmpfs -o size=1m,ro none {mnt}
        code=0; {py} -m dnsconvert validate {good} --report {mnt}/r.json 2>{mnt}.err || code=$?
        echo "exit=$code"; echo "files=$(ls -A {mnt} | tr '\\n' ' ')"; cat {mnt}.err
    """))
    out = result.stdout
    assert "exit=2" in out.splitlines() and "files=" in [line.strip() for line in out.splitlines()], out + result.stderr
    errors = [line for line in out.splitlines() if line.startswith("dnsconvert:")]
    assert len(errors) == 1 and "read-only file system" in errors[0] and "r.json" in errors[0], out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"] and len(sys.argv) == 4:
        worker(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit("usage: python tests/test_hostile.py --worker JOBS.json RESULTS.jsonl (run by pytest)")
