"""CPU-side tests of the TensorRT plugin: everything around the build that needs no TensorRT."""

import importlib.util
import json
from pathlib import Path

import onnx
import pytest

from dnsconvert.errors import TargetError
from dnsconvert.project import project_nm
from dnsconvert.targets import BuildOptions, get_target, list_targets
from dnsconvert_tensorrt.api import TrtFeatures, plan_build
from dnsconvert_tensorrt.compat import check_engine_compat
from dnsconvert_tensorrt.eligibility import layer_eligibility
from dnsconvert_tensorrt.logparse import parse_builder_log, parse_engine_info, parse_layer_info
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
    """Fill the samples' {CONV1}-style placeholders with the real node names of this LeNet-5 export."""
    names = {}
    by_param = {"conv1.weight": "CONV1", "conv2.weight": "CONV2", "fc1.weight": "FC1", "fc2.weight": "FC2"}
    for node in model.graph.node:
        for value in node.input:
            if init_to_param.get(value) in by_param:
                names[by_param[init_to_param[value]]] = node.name
    pools = [n.name for n in model.graph.node if n.op_type == "MaxPool"]
    names.update(POOL1=pools[0], POOL2=pools[1], RESHAPE=next(n.name for n in model.graph.node if n.op_type == "Reshape"), RELU=next(n.name for n in model.graph.node if n.op_type == "Relu"))
    text = (SAMPLES / name).read_text()
    for key, value in names.items():
        text = text.replace("{" + key + "}", value)
    return text


def test_builder_log_parsing(lenet5_export):
    model, _ = lenet5_export
    log = parse_builder_log(sample_text("build_verbose_trt10.log", *lenet5_export).splitlines())
    assert log.seen and len(log.eligible) == 3 and len(log.picked) == 1
    assert log.eligible[2].startswith("{ForeignNode[")  # a comma-free split kept the ForeignNode whole
    assert parse_builder_log(["[I] [TRT] nothing here"]).seen is False


@pytest.mark.parametrize("schema", ["trt10", "trt11"])
def test_layer_info_of_both_schemas(lenet5_export, schema):
    info = parse_engine_info(sample_text(f"layer_info_{schema}.json", *lenet5_export))
    assert info.schema.startswith(schema[-2:])
    assert [layer.sparse_tactic for layer in info.layers] == [False, False, False, False, True, False]
    assert [layer.has_sparse_weights for layer in info.layers] == [None, False, True, None, True, None]
    assert info.layers[-1].foreign and info.layers[-1].onnx_nodes == []
    assert len(info.layers[1].onnx_nodes) == 2  # from Metadata
    assert info.layers[0].outputs[0].dtype == ("FP16" if schema == "trt10" else "Half")
    assert [t["name"] for t in info.io_tensors] == ["input", "output"]
    if schema == "trt11":
        assert info.io_tensors[0]["mode"] == "Input" and info.io_tensors[0]["dtype"] == "Float"


def test_layer_info_as_a_top_level_list_and_names_only():
    """Issue 16.5: a top-level JSON list parses (it used to raise AttributeError on .get)."""
    layers = parse_layer_info('[{"Name": "a + b", "LayerType": "CaskConvolution", "TacticName": "sm80_xmma_fprop_sparse_conv", "HasSparseWeights": 1}, "c"]')
    assert [layer.name for layer in layers] == ["a + b", "c"] and layers[0].sparse_tactic and layers[0].has_sparse_weights
    assert layers[0].onnx_nodes == ["a", "b"]
    assert parse_layer_info('{"Layers": ["a", "b"]}')[0].name == "a"  # LAYER_NAMES_ONLY


def test_structured_fields_win_over_names_and_log(lenet5_export):
    model, init_to_param = lenet5_export
    nodes = node_to_param(model, init_to_param)
    fc1 = next(n for n, p in nodes.items() if p == "fc1.weight")
    # the name says nothing useful, the Metadata does; the log claims nothing
    text = json.dumps({"Layers": [{"Name": "fused_gemm_7", "LayerType": "CaskGemmConvolution", "HasSparseWeights": 1,
                                   "TacticName": "sm80_xmma_fprop_sparse_conv_f16", "Metadata": f"[ONNX Layer: {fc1}]\u001e[ONNX Layer: relu]"},
                                  {"Name": "{ForeignNode[a...b]}", "LayerType": "Myelin", "TacticValue": "0x0"}]})  # fmt: skip
    report = sparsity_record(layer_eligibility(model, "fp16"), parse_builder_log([]), parse_engine_info(text), nodes, init_to_param)
    records = {r["param"]: r for r in report.layers}
    assert records["fc1.weight"]["sparse_picked"] and records["fc1.weight"]["evidence"] == "inspector"
    assert report.unmapped_engine_layers[0]["engine_layer"] == "{ForeignNode[a...b]}" and "ForeignNode" in report.unmapped_engine_layers[0]["reason"]
    assert set(report.params_not_located) == {"conv1.weight", "conv2.weight", "fc2.weight"}


def test_record_maps_back_to_checkpoint_names(lenet5_export):
    model, init_to_param = lenet5_export
    log = parse_builder_log(sample_text("build_verbose_trt10.log", model, init_to_param).splitlines())
    info = parse_engine_info(sample_text("layer_info_trt10.json", model, init_to_param))
    report = sparsity_record(layer_eligibility(model, "fp16"), log, info, node_to_param(model, init_to_param), init_to_param)
    records = {r["param"]: r for r in report.layers}
    assert set(records) == {"conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"}
    assert records["fc1.weight"]["sparse_picked"] and "sparse" in records["fc1.weight"]["sparse_tactic"]
    assert records["conv2.weight"]["trt_eligible"] and not records["conv2.weight"]["sparse_picked"]
    assert not records["conv1.weight"]["eligible_by_rules"]  # one input channel cannot hold 2:4
    assert any("cannot hold" in r for r in records["conv1.weight"]["reasons"])
    # fc2 sits inside the Myelin ForeignNode: not mappable from the inspector; only the log names that region
    assert records["fc2.weight"]["engine_layers"] == [] and not records["fc2.weight"]["sparse_picked"]
    assert report.unmapped_engine_layers and report.params_not_located == ["fc2.weight"]


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
    plan = plan_build("fp16", TrtFeatures("10.9", True, True))
    dense = trtexec_command("trtexec", Path("m.onnx"), Path("m.dense.engine"), Path("l.json"), settings, "input", (1, 1, 28, 28), sparse=False, plan=plan)
    sparse = trtexec_command("trtexec", Path("m.onnx"), Path("m.engine"), Path("l.json"), settings, "input", (1, 1, 28, 28), sparse=True, plan=plan)
    assert "--sparsity=enable" in sparse and "--sparsity=disable" in dense
    for flag in ("--fp16", "--minShapes=input:1x1x28x28", "--optShapes=input:8x1x28x28", "--maxShapes=input:32x1x28x28",
                 "--memPoolSize=workspace:1024M", "--profilingVerbosity=detailed", "--exportLayerInfo=l.json", "--verbose", f"--timingCacheFile={tmp_path / 'cache'}"):  # fmt: skip
        assert flag in sparse
    # identical settings apart from the sparsity flag and the output paths
    assert [a for a in dense if not a.startswith(("--sparsity", "--saveEngine"))] == [a for a in sparse if not a.startswith(("--sparsity", "--saveEngine"))]
    int8 = BuildSettings.from_options({"precision": "int8", "calibration": "random"}, tmp_path / "c")
    weak_int8 = plan_build("int8", TrtFeatures("10.9", True, True), "weak")
    assert "--int8" in trtexec_command("trtexec", Path("m"), Path("e"), Path("l"), int8, "input", (1, 8), sparse=True, plan=weak_int8)


@pytest.mark.parametrize("options", [{"precision": "fp8"}, {"min_batch": "8", "opt_batch": "4"}, {"workspace_mib": "lots"}, {"use_trtexec": "maybe"},
                                     {"precision": "int8"}, {"typing": "loose"}, {"io": "fp64"}, {"log": "debug"}])
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


def test_listed_unavailable_with_reason(run_cli, monkeypatch, tmp_path):
    """Every branch of availability() on any machine: what cannot exist here (TensorRT, trtexec, a
    GPU) is patched in or out; the decision logic and the CLI's exit 2 are real."""
    import dnsconvert_tensorrt.target as trt_target

    target = {e.name: e for e in list_targets()}["trt"].target
    real_find_spec = importlib.util.find_spec

    def find_spec(installed):
        return lambda name, *a: (object() if installed else None) if name == "tensorrt" else real_find_spec(name, *a)

    monkeypatch.setattr(trt_target.importlib.util, "find_spec", find_spec(False))
    monkeypatch.setattr(trt_target, "find_trtexec", lambda: None)
    status = target.availability()
    assert not status.available and "tensorrt" in status.reason and "trtexec" in status.reason
    result = run_cli("export", "fixtures/tiny_mlp_2to4.safetensors", "--target", "trt", "-o", tmp_path / "m.engine")
    assert result.exit_code == 2 and "not available here" in result.stderr and not list(tmp_path.iterdir())
    monkeypatch.setattr(trt_target, "find_trtexec", lambda: "/usr/bin/trtexec")
    monkeypatch.setattr(trt_target, "_has_gpu", lambda: (False, "no CUDA GPU"))
    status = target.availability()
    assert not status.available and "GPU" in status.reason
    monkeypatch.setattr(trt_target.importlib.util, "find_spec", find_spec(True))
    monkeypatch.setattr(trt_target, "_has_gpu", lambda: (True, "NVIDIA H100"))
    status = target.availability()
    assert status.available and "Python API" in status.reason and "H100" in status.reason


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_build_dense_and_sparse_engines(tmp_path, lenet5_export):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
    from helpers import masked_checkpoint

    ckpt = project_nm(masked_checkpoint("transformer_mlp", 0.5, dim=1024, hidden=4096, depth=1), "2:4").checkpoint
    for precision in ("fp16", "bf16"):
        artifact = get_target("trt").build(ckpt, tmp_path / precision, BuildOptions(extra={"precision": precision}))
        assert artifact.files["dense"].exists() and artifact.files["sparse"].exists()
        assert artifact.manifest.parity.passed
        details = artifact.manifest.details
        assert details["tensorrt_api"]["plan"]["path"] in ("weak-typing-flags", "strongly-typed")
        assert details["sparse_layers"], details["sparsity"]  # 1024x4096 fp16 2:4 GEMMs: TensorRT should pick sparse tactics
