"""CPU-side tests of the TensorRT plugin: everything around the build that needs no TensorRT."""

import importlib.util
from pathlib import Path

import onnx
import pytest

from dnsconvert.errors import TargetError
from dnsconvert.project import project_nm
from dnsconvert.targets import BuildOptions, get_target, list_targets
from dnsconvert_tensorrt.compat import check_engine_compat
from dnsconvert_tensorrt.eligibility import layer_eligibility
from dnsconvert_tensorrt.logparse import parse_builder_log, parse_layer_info
from dnsconvert_tensorrt.report import node_to_param, sparsity_record
from dnsconvert_tensorrt.settings import BuildSettings
from dnsconvert_tensorrt.trtexec import trtexec_command

SAMPLES = Path(__file__).parent / "samples"


@pytest.fixture(scope="module")
def lenet5_export(tmp_path_factory):
    """A 2:4-projected LeNet-5 exported to ONNX (dense twin), and the parameter names of its weights."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
    from helpers import masked_checkpoint

    ckpt = project_nm(masked_checkpoint("lenet5", 0.5), "2:4").checkpoint
    artifact = get_target("ort").build(ckpt, tmp_path_factory.mktemp("trt") / "m", BuildOptions())
    model = onnx.load(str(artifact.files["dense"]))
    init_to_param = {layer.initializer: layer.param for layer in artifact.manifest.layers}
    return model, init_to_param


def sample_text(name, model, init_to_param):
    """Fill the samples' {CONV1}-style placeholders with the real node names of this export."""
    names = {}
    for node in model.graph.node:
        for value in node.input:
            param = init_to_param.get(value)
            if param:
                names[{"conv1.weight": "CONV1", "conv2.weight": "CONV2", "fc1.weight": "FC1", "fc2.weight": "FC2"}[param]] = node.name
    names["RELU_UNUSED"] = "node_relu_fused"
    text = (SAMPLES / name).read_text()
    for key, value in names.items():
        text = text.replace("{" + key + "}", value)
    return text


def test_builder_log_parsing(lenet5_export):
    log = parse_builder_log(sample_text("build_verbose.log", *lenet5_export).splitlines())
    assert log.seen and len(log.eligible) == 2 and len(log.picked) == 1
    assert parse_builder_log(["[I] [TRT] nothing here"]).seen is False


def test_layer_info_parsing_finds_sparse_tactics(lenet5_export):
    layers = parse_layer_info(sample_text("layer_info.json", *lenet5_export))
    assert [layer.sparse for layer in layers] == [False, False, True, False]
    assert len(layers[1].onnx_nodes) == 2
    assert parse_layer_info('{"Layers": ["a", "b"]}')[0].name == "a"  # LAYER_NAMES_ONLY


def test_record_maps_back_to_checkpoint_names(lenet5_export):
    model, init_to_param = lenet5_export
    log = parse_builder_log(sample_text("build_verbose.log", model, init_to_param).splitlines())
    layers = parse_layer_info(sample_text("layer_info.json", model, init_to_param))
    records = {r["param"]: r for r in sparsity_record(layer_eligibility(model, "fp16"), log, layers, node_to_param(model, init_to_param), init_to_param)}
    assert set(records) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    assert records["fc1.weight"]["sparse_picked"] and "sparse" in records["fc1.weight"]["sparse_tactic"]
    assert records["conv2.weight"]["trt_eligible"] and not records["conv2.weight"]["sparse_picked"]
    assert not records["conv1.weight"]["eligible_by_rules"]  # one input channel cannot hold 2:4
    assert any("cannot hold" in r for r in records["conv1.weight"]["reasons"])


def test_eligibility_rules(lenet5_export):
    model, _ = lenet5_export
    fp16 = {e.initializer: e for e in layer_eligibility(model, "fp16")}
    fp32 = {e.initializer: e for e in layer_eligibility(model, "fp32")}
    assert fp16["fc1.weight"].eligible and not fp32["fc1.weight"].eligible
    assert any("FP32" in r for r in fp32["fc1.weight"].reasons)
    assert any("not multiples of 16" in w for w in fp16["conv2.weight"].warnings)  # 50 output channels
    assert any("small layer" in w for w in fp16["fc2.weight"].warnings)
    with pytest.raises(ValueError):
        layer_eligibility(model, "fp8")


def test_trtexec_command(tmp_path):
    settings = BuildSettings.from_options({"precision": "fp16", "min_batch": "1", "opt_batch": "8", "max_batch": "32", "workspace_mib": "1024"}, tmp_path / "cache")
    dense = trtexec_command("trtexec", Path("m.onnx"), Path("m.dense.engine"), Path("l.json"), settings, "input", (1, 1, 28, 28), sparse=False)
    sparse = trtexec_command("trtexec", Path("m.onnx"), Path("m.engine"), Path("l.json"), settings, "input", (1, 1, 28, 28), sparse=True)
    assert "--sparsity=enable" in sparse and "--sparsity=disable" in dense
    for flag in ("--fp16", "--minShapes=input:1x1x28x28", "--optShapes=input:8x1x28x28", "--maxShapes=input:32x1x28x28",
                 "--memPoolSize=workspace:1024M", "--profilingVerbosity=detailed", "--exportLayerInfo=l.json", "--verbose", f"--timingCacheFile={tmp_path / 'cache'}"):  # fmt: skip
        assert flag in sparse
    # identical settings apart from the sparsity flag and the output paths
    assert [a for a in dense if not a.startswith(("--sparsity", "--saveEngine"))] == [a for a in sparse if not a.startswith(("--sparsity", "--saveEngine"))]
    int8 = BuildSettings.from_options({"precision": "int8"}, tmp_path / "c")
    assert "--int8" in trtexec_command("trtexec", Path("m"), Path("e"), Path("l"), int8, "input", (1, 8), sparse=True)


@pytest.mark.parametrize("options", [{"precision": "fp8"}, {"min_batch": "8", "opt_batch": "4"}, {"workspace_mib": "lots"}, {"use_trtexec": "maybe"}])
def test_bad_settings(tmp_path, options):
    with pytest.raises(TargetError):
        BuildSettings.from_options(options, tmp_path / "c")


def test_engine_compat_checks():
    built = {"tensorrt": "10.7.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    check_engine_compat(built, dict(built), "m.engine.manifest.json")
    with pytest.raises(TargetError, match="TensorRT 10.7.0, this machine has 10.9.0"):
        check_engine_compat(built, {**built, "tensorrt": "10.9.0"}, "m")
    with pytest.raises(TargetError, match="GPU-specific"):
        check_engine_compat(built, {**built, "gpu": "NVIDIA A100", "compute_capability": "8.0"}, "m")
    with pytest.raises(TargetError, match="not installed"):
        check_engine_compat(built, {"tensorrt": None}, "m")


def test_listed_unavailable_with_reason(run_cli):
    entry = {e.name: e for e in list_targets()}["trt"]
    status = entry.target.availability()
    if importlib.util.find_spec("tensorrt") is None:
        assert not status.available and ("tensorrt" in status.reason or "GPU" in status.reason)
        result = run_cli("export", "fixtures/tiny_mlp_2to4.safetensors", "--target", "trt", "-o", "/tmp/never.engine")
        assert result.exit_code == 2 and "not available here" in result.stderr


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_dense_and_sparse_engines(tmp_path, lenet5_export):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
    from helpers import masked_checkpoint

    ckpt = project_nm(masked_checkpoint("transformer_mlp", 0.5, dim=1024, hidden=4096, depth=1), "2:4").checkpoint
    artifact = get_target("trt").build(ckpt, tmp_path / "m.engine", BuildOptions())
    assert artifact.files["dense"].exists() and artifact.files["sparse"].exists()
    assert artifact.manifest["parity_vs_ort"]["passed"]
