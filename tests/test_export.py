import json
import textwrap

import numpy as np
import onnx
import pytest

from helpers import FIXTURES, masked_checkpoint, save_torch_pruned_lenet5
from dnsconvert.errors import GateFailed
from dnsconvert.export import build_onnx, densify, sparsify_initializers
from dnsconvert.export.graph_nm import check_graph_nm
from dnsconvert.export.sparse_init import initializer_arrays
from dnsconvert.models import BUILTIN_MODELS
from dnsconvert.pattern import TWO_FOUR
from dnsconvert.model_io import sample_feeds
from dnsconvert.targets import BuildOptions, get_target, load_artifact


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_ort_matches_torch_for_every_builtin_model(tmp_path, name):
    ckpt = masked_checkpoint(name, 0.9)
    artifact = get_target("ort").build(ckpt, tmp_path / "m", BuildOptions(atol=1e-5, rtol=1e-5))
    parity = artifact.manifest.parity
    assert parity.passed and parity.max_abs <= 1e-5
    # every pruned weight is traceable by name and stored sparse at 90%
    layers = {layer.param: layer for layer in artifact.manifest.layers}
    assert set(layers) == set(ckpt.masks)
    assert all(layer.stored_sparse for layer in layers.values())
    sparse = onnx.load(str(artifact.files["sparse"]))
    assert len(sparse.graph.sparse_initializer) == len(ckpt.masks)
    assert artifact.manifest.sizes.ratio < 1.0
    # re-run the ORT runner from the artifact on a new batch size
    runner = get_target("ort").load(load_artifact(tmp_path / "m"))
    assert runner.run(sample_feeds(ckpt.model.inputs, batch=3))[0].shape[0] == 3


def test_densify_round_trip_is_exact_and_deterministic(tmp_path):
    ckpt = masked_checkpoint("lenet5", 0.95)
    artifact = get_target("ort").build(ckpt, tmp_path / "m", BuildOptions())
    sparse = onnx.load(str(artifact.files["sparse"]))
    dense_bytes = artifact.files["dense"].read_bytes()
    assert densify(sparse).SerializeToString() == dense_bytes
    assert densify(sparse).SerializeToString() == densify(sparse).SerializeToString()
    again, _ = sparsify_initializers(onnx.load_from_string(dense_bytes), [s.values.name for s in sparse.graph.sparse_initializer])
    assert again.SerializeToString() == sparse.SerializeToString()


def test_only_sparsify_when_smaller():
    ckpt = masked_checkpoint("mlp", 0.5)
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    for name, weight in ckpt.weights.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(weight.numpy(), name=name))
    out, records = sparsify_initializers(model)
    assert not out.graph.sparse_initializer  # 12 bytes per nonzero at 50% > 4 bytes per element
    assert all(not r.sparsified for r in records)
    ckpt = masked_checkpoint("mlp", 0.8)
    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    for name in ckpt.masks:
        model.graph.initializer.append(onnx.numpy_helper.from_array(ckpt.weights[name].numpy(), name=name))
    out, records = sparsify_initializers(model)
    assert all(r.sparsified for r in records)
    for sparse in out.graph.sparse_initializer:
        assert sparse.indices.data_type == onnx.TensorProto.INT64 and len(sparse.indices.dims) == 1
    arrays = initializer_arrays(out)
    for name in ckpt.masks:
        assert np.array_equal(arrays[name], ckpt.weights[name].numpy())


def test_graph_nm_axes_for_gemm_matmul_and_conv(tmp_path):
    from dnsconvert.project import project_nm

    for name in ("lenet300100", "transformer_mlp", "convnet"):
        ckpt = project_nm(masked_checkpoint(name, 0.5), TWO_FOUR).checkpoint
        artifact = get_target("ort").build(ckpt, tmp_path / name, BuildOptions())
        graph = artifact.manifest.graph_2_4
        ops = {g.op for g in graph}
        assert all(g.compliant or g.skipped for g in graph), graph
        if name == "transformer_mlp":
            assert ops == {"MatMul"} and all(g.initializer.endswith(".T") for g in graph)
        # Axis check, both ways, for every model: a weight that is 2:4 along another axis but dense
        # along its reduction axis must be reported violating; the same pattern laid along the
        # reduction axis must be reported compliant.
        compliant = {g.initializer: g.reduction_axis for g in graph if g.compliant}
        for along_reduction in (False, True):
            model = onnx.load(str(artifact.files["dense"]))
            touched = set()
            for init in model.graph.initializer:
                if init.name not in compliant:
                    continue
                array = onnx.numpy_helper.to_array(init)
                axis = compliant[init.name]
                other = next((a for a in range(array.ndim) if a != axis and array.shape[a] % 4 == 0), None)
                if other is None:
                    continue
                laid = axis if along_reduction else other
                keep = (np.arange(array.shape[laid]) % 4 < 2).reshape([-1 if a == laid else 1 for a in range(array.ndim)])
                pattern = np.ascontiguousarray(np.broadcast_to(keep, array.shape).astype(array.dtype))
                init.CopyFrom(onnx.numpy_helper.from_array(pattern, name=init.name))
                touched.add(init.name)
            assert touched, f"{name}: no weight to test the axis with"
            results = {r.initializer: r.compliant for r in check_graph_nm(model, TWO_FOUR) if r.initializer in touched}
            assert set(results) == touched
            assert all(results.values()) if along_reduction else not any(results.values()), (name, along_reduction, results)


def test_parity_failure_writes_nothing(tmp_path):
    from dnsconvert.targets.ort import write_onnx_artifact

    ckpt = masked_checkpoint("lenet300100", 0.9)
    wrong = lambda model: (lambda feeds: [np.zeros((len(feeds["input"]), 10), np.float32)])  # noqa: E731
    built = build_onnx(ckpt, make_runner=wrong)
    assert not built.parity.passed
    with pytest.raises(GateFailed, match="parity"):
        write_onnx_artifact(get_target("ort"), ckpt, built, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_torch_prune_state_dict(run_cli, tmp_path):
    save_torch_pruned_lenet5(tmp_path / "lenet5.pt", 0.9)
    out = tmp_path / "lenet5-ort"
    result = run_cli("export", tmp_path / "lenet5.pt", "--target", "ort", "--model", "lenet5", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["parity"]["passed"]
    assert manifest["source"]["sha256"] and manifest["files"]["sparse"]["sha256"]
    assert json.loads((out / "manifest.json").read_text())["files"] == manifest["files"]


def test_cli_export_prune_output(run_cli, tmp_path):
    result = run_cli("export", FIXTURES / "tiny_mlp_unstructured.safetensors", "--target", "onnx", "-o", tmp_path / "t")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t" / "model.dense.onnx").exists()
    out = tmp_path / "d.onnx"
    assert run_cli("densify", tmp_path / "t" / "model.onnx", "-o", out).exit_code == 0
    assert out.read_bytes() == (tmp_path / "t" / "model.dense.onnx").read_bytes()


def one_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_cli_export_bad_inputs(run_cli, tmp_path, monkeypatch):
    out = tmp_path / "x"
    result = run_cli("export", FIXTURES / "tiny_mlp_unstructured.safetensors", "--target", "nope", "-o", out)
    assert result.exit_code == 2 and "unknown target" in one_line(result)
    result = run_cli("export", FIXTURES / "tiny_mlp_torch_prune.pt", "-o", out)
    assert result.exit_code == 2 and "no model spec" in one_line(result)
    result = run_cli("export", FIXTURES / "tiny_mlp_unstructured.safetensors", "-T", "bogus=1", "-o", out)
    assert result.exit_code == 2 and "no option bogus" in one_line(result)
    result = run_cli("export", FIXTURES / "broken" / "hostile_factory.safetensors", "-o", out)
    assert result.exit_code == 2 and "--trust-model-code" in one_line(result)
    # an op the ONNX exporter cannot translate
    (tmp_path / "odd_models.py").write_text(textwrap.dedent('''
        import torch
        class Odd(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(8, 8)
            def forward(self, x):
                return torch.special.airy_ai(self.fc(x))
        def odd():
            return Odd()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    import torch

    model = __import__("odd_models").odd()
    torch.save(model.state_dict(), tmp_path / "odd.pt")
    result = run_cli("export", tmp_path / "odd.pt", "--model", "odd_models:odd", "--input-shape", "1,8", "--trust-model-code", "-o", out)
    assert result.exit_code == 2 and "export failed" in one_line(result)
    assert not out.exists() and not list(tmp_path.glob("x*"))


def test_export_checkpoint_written_by_prune(run_cli, tmp_path):
    from dnsconvert.data import synthetic_digits
    from dnsconvert.models import builtin_spec
    from dnsconvert.surgery import DNSConfig, PruneConfig, prune

    config = PruneConfig(builtin_spec("mlp", hidden=[64, 32]), dns=DNSConfig(target_sparsity=0.9, gamma=1e-2), epochs=0.2, checkpoint_every=0)
    prune(config, output=tmp_path / "p.safetensors", data=synthetic_digits(2000, 200), progress=False)
    result = run_cli("export", tmp_path / "p.safetensors", "--target", "ort", "-o", tmp_path / "p", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["parity"]["passed"] and all(layer["stored_sparse"] for layer in manifest["layers"])
