"""The builder and the engine runner against TensorRT 10.x and 11.x Python surfaces (stand-in modules; no TensorRT here).

Each generation's documented surface is listed, with its sources, in ``fake_tensorrt.SURFACES``;
the stand-in raises AttributeError on anything outside it, so a call the plugin makes that the
generation does not document fails these tests.
"""

import inspect
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from dnsconvert.export.precision import model_precision
from dnsconvert.project import project_nm
from dnsconvert.targets import BuildOptions
from dnsconvert_tensorrt.api import BuildPlan, TrtFeatures, detect, plan_build
from dnsconvert_tensorrt import builder as builder_module
from dnsconvert_tensorrt.builder import EngineRunner, build_engine, capturing_logger
from dnsconvert_tensorrt.core import ParityReport, TargetError
from dnsconvert_tensorrt.settings import BuildSettings
from dnsconvert_tensorrt.target import TensorRTTarget
from dnsconvert_tensorrt.trtexec import trtexec_command, trtexec_features

sys.path.insert(0, str(Path(__file__).parent))
from fake_tensorrt import DEPRECATED_IN_11, REMOVED_IN_11, SURFACES, FakeTensorRT  # noqa: E402
from test_trt_plugin import sample_text  # noqa: E402

PRECISIONS = ["fp32", "tf32", "fp16", "bf16", "int8"]
TINY_ONNX = onnx.helper.make_model(
    onnx.helper.make_graph([onnx.helper.make_node("Relu", ["input"], ["output"])], "g", [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 4])],
                           [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [1, 4])])
).SerializeToString()  # fmt: skip


def _settings(tmp_path, **options):
    options.setdefault("calibration", "random")
    return BuildSettings.from_options(options, tmp_path / "cache")


def _removed_touched(fake: FakeTensorRT) -> list[str]:
    removed = {f"{kind}.{name}" for kind, names in {**REMOVED_IN_11, **DEPRECATED_IN_11}.items() for name in names}
    used = set(fake.recorder.attributes) | {f"BuilderFlag.{arg}" for what, arg in fake.recorder.calls if what.endswith("_flag")}
    return sorted(used & removed)


def test_surface_lists_differ_exactly_by_the_documented_removals():
    for kind, names in REMOVED_IN_11.items():
        if kind in SURFACES["11"]:
            assert not set(names) & set(SURFACES["11"][kind]), kind
    assert {"TF32", "SPARSE_WEIGHTS"} <= set(SURFACES["11"]["BuilderFlag"])
    assert {"FP16", "BF16", "INT8"} <= set(SURFACES["10"]["BuilderFlag"])


def test_detection_uses_features_not_version_strings():
    # a 10.x surface that claims 11, and an 11.x surface that claims 10: the surface decides
    ten = detect(FakeTensorRT("10", version="11.0.0").module)
    fake11 = FakeTensorRT("11", version="10.99.0")
    eleven = detect(fake11.module)
    assert fake11.recorder.probes == ["BuilderFlag.FP16"] and _removed_touched(fake11) == []  # one failed lookup, nothing used
    assert ten.weak_typing and ten.strongly_typed_flag and ten.version == "11.0.0"
    assert not eleven.weak_typing and not eleven.strongly_typed_flag


@pytest.mark.parametrize("generation", ["10", "11"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("sparse", [False, True])
def test_builder_uses_only_the_generations_surface(tmp_path, generation, precision, sparse):
    fake = FakeTensorRT(generation, layer_info='{"Layers": ["a"], "Bindings": ["input", "output"]}')
    settings = _settings(tmp_path, precision=precision)
    plan = plan_build(precision, detect(fake.module))
    result = build_engine(TINY_ONNX, tmp_path / "e.engine", settings, "input", (1, 4), sparse=sparse, plan=plan, trt=fake.module)
    assert (tmp_path / "e.engine").read_bytes() == b"serialized-engine" and result.layer_info.startswith("{")
    for what, _ in fake.recorder.calls:  # every call is in the generation's documented list
        kind, _, name = what.rstrip("=").partition(".")
        assert name in SURFACES[generation][kind], what
    flags = [arg for what, arg in fake.recorder.calls if what == "IBuilderConfig.set_flag"]
    assert ("SPARSE_WEIGHTS" in flags) == sparse
    network_flags = next(arg for what, arg in fake.recorder.calls if what == "Builder.create_network")
    if generation == "11":
        assert _removed_touched(fake) == [] and network_flags == 0
        assert fake.recorder.probes == ["BuilderFlag.FP16"]  # detect() above, once; the builder probes nothing
        assert set(flags) <= {"SPARSE_WEIGHTS"}
    else:
        expected = {"fp16": ["FP16"], "bf16": ["BF16"]}.get(precision, [])
        assert [f for f in flags if f != "SPARSE_WEIGHTS"] == expected
        strongly = 1 << SURFACES["10"]["NetworkDefinitionCreationFlag"].index("STRONGLY_TYPED")
        assert network_flags == (strongly if precision == "int8" else 0)
    cleared = [arg for what, arg in fake.recorder.calls if what == "IBuilderConfig.clear_flag"]
    assert cleared == (["TF32"] if precision == "fp32" else [])


DYNAMIC_ONNX = onnx.helper.make_model(
    onnx.helper.make_graph([onnx.helper.make_node("Relu", ["input"], ["output"])], "g", [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 4])],
                           [onnx.helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["batch", 4])])
).SerializeToString()  # fmt: skip
FEEDS = {"input": np.array([[-1, 2, -3, 4], [5, -6, 7, -8], [0.5, -0.5, 1, -1]], dtype=np.float32)}  # batch 3: set through the dynamic dim
RUNNER_CALLS = {"Runtime.deserialize_cuda_engine", "ICudaEngine.create_execution_context", "ICudaEngine.get_tensor_name", "ICudaEngine.get_tensor_mode",
                "ICudaEngine.get_tensor_dtype", "IExecutionContext.set_input_shape", "IExecutionContext.get_tensor_shape",
                "IExecutionContext.set_tensor_address", "IExecutionContext.execute_async_v3"}  # fmt: skip


def _built_engine(tmp_path, generation: str, **fake_options) -> tuple[FakeTensorRT, bytes]:
    fake = FakeTensorRT(generation, **fake_options)
    build_engine(DYNAMIC_ONNX, tmp_path / "e.engine", _settings(tmp_path, precision="fp32"), "input", (1, 4), sparse=True,
                 plan=plan_build("fp32", detect(fake.module)), trt=fake.module)  # fmt: skip
    fake.recorder.calls.clear()
    fake.recorder.attributes.clear()
    return fake, (tmp_path / "e.engine").read_bytes()


@pytest.mark.parametrize("generation", ["10", "11"])
def test_runner_uses_only_the_generations_surface(tmp_path, generation):
    """EngineRunner (engine parity, bench, run) against the stand-in: every call and attribute is in the generation's list."""
    fake, engine = _built_engine(tmp_path, generation)
    runner = EngineRunner(engine, trt=fake.module, device="cpu")
    (out,) = runner.run(FEEDS)
    runner.close()
    np.testing.assert_array_equal(out, np.maximum(FEEDS["input"], 0))
    assert runner.inputs == ["input"] and runner.outputs == ["output"]
    calls = {what for what, _ in fake.recorder.calls}
    assert calls == RUNNER_CALLS
    assert ("IExecutionContext.set_input_shape", ("input", (3, 4))) in fake.recorder.calls
    for attribute in set(fake.recorder.attributes):  # Logger.WARNING, TensorIOMode.INPUT, DataType.FLOAT, ICudaEngine.num_io_tensors, ...
        kind, _, name = attribute.rpartition(".")
        assert name in SURFACES[generation][kind], attribute
    assert {"Logger.WARNING", "ICudaEngine.num_io_tensors", "TensorIOMode.INPUT", "TensorIOMode.OUTPUT"} <= set(fake.recorder.attributes)
    if generation == "11":
        assert _removed_touched(fake) == []


@pytest.mark.parametrize(
    "right,wrong",
    [("deserialize_cuda_engine", "deserialize_engine"), ("create_execution_context", "create_context"), ("num_io_tensors", "num_bindings"),
     ("get_tensor_name", "get_binding_name"), ("get_tensor_mode", "get_tensor_io_mode"), ("get_tensor_dtype", "get_binding_dtype"),
     ("set_input_shape", "set_binding_shape"), ("get_tensor_shape", "get_binding_shape"), ("set_tensor_address", "set_tensor_addr"),
     ("execute_async_v3", "execute_async_v2"), ("Logger.WARNING", "Logger.WARN")],
)  # fmt: skip
def test_a_misspelled_runner_call_fails(tmp_path, right, wrong):
    """Each runtime call, misspelled (or in its 8.x spelling) in a copy of EngineRunner, makes the runner test fail."""
    source = inspect.getsource(builder_module)
    runner_source = source[source.index("class EngineRunner"):]
    assert right in runner_source
    namespace = dict(vars(builder_module))
    exec(compile(runner_source.replace(right, wrong), builder_module.__file__, "exec"), namespace)
    fake, engine = _built_engine(tmp_path, "11")
    with pytest.raises(AttributeError, match=wrong.rpartition(".")[2]):
        namespace["EngineRunner"](engine, trt=fake.module, device="cpu").run(FEEDS)


@pytest.mark.parametrize("refused,message", [("set_input_shape", "refused input 'input' of shape \\[3, 4\\]"), ("set_tensor_address", "refused the buffer"),
                                             ("execute_async_v3", "could not enqueue")])  # fmt: skip
def test_runner_failures_reported_by_false_are_target_errors(tmp_path, refused, message):
    fake, engine = _built_engine(tmp_path, "10", refuse=refused)
    with pytest.raises(TargetError, match=message):
        EngineRunner(engine, trt=fake.module, device="cpu").run(FEEDS)
    with pytest.raises(TargetError, match="could not deserialize"):
        EngineRunner(b"an engine of another TensorRT", trt=fake.module, device="cpu")


def test_plans_per_generation():
    ten, eleven = TrtFeatures("10.9", True, True), TrtFeatures("11.4", False, False)
    assert plan_build("fp16", ten) == BuildPlan("fp16", "weak-typing-flags", "fp32", ("FP16",), (), False)
    assert plan_build("fp16", eleven) == BuildPlan("fp16", "strongly-typed", "fp16", (), (), False)
    assert plan_build("bf16", ten, "strong") == BuildPlan("bf16", "strongly-typed", "bf16", (), (), True)
    assert plan_build("int8", ten).path == "strongly-typed" and plan_build("int8", ten).onnx_precision == "int8"
    assert plan_build("int8", ten, "weak").set_flags == ("INT8", "FP16")
    assert plan_build("fp32", eleven).clear_flags == ("TF32",)
    with pytest.raises(TargetError, match="removed in 11"):
        plan_build("fp16", eleven, "weak")


def test_logger_filters_in_log(tmp_path):
    """Issue 16.3: an ILogger subclass gets every message; min_severity does nothing there, so log() filters."""
    messages = (("VERBOSE", "Tactic: 0x1 Time: 0.01"), ("INFO", "(Sparsity) Layers eligible for sparse math: fc1"), ("ERROR", "boom"))
    for level, expected in (("info", ["[INFO] (Sparsity) Layers eligible for sparse math: fc1", "[ERROR] boom"]), ("verbose", None)):
        fake = FakeTensorRT("10", log_messages=messages)
        settings = _settings(tmp_path, precision="fp32", log=level)
        result = build_engine(TINY_ONNX, tmp_path / "e.engine", settings, "input", (1, 4), sparse=True, plan=plan_build("fp32", detect(fake.module)), trt=fake.module)
        assert result.lines == (expected or [f"[{lvl}] {msg}" for lvl, msg in messages])
        assert result.log.eligible == ["fc1"]
    lines: list[str] = []
    logger = capturing_logger(FakeTensorRT("11").module, lines)
    assert "min_severity" not in vars(logger)


def test_timing_cache_from_another_gpu_is_rebuilt_and_said(tmp_path):
    """Issue 16.4: set_timing_cache returns False for a cache recorded on another GPU: build without it, say so, rewrite it."""
    (tmp_path / "cache").write_bytes(b"recorded-on-an-A100")
    fake = FakeTensorRT("11", accept_cache=False)
    settings = _settings(tmp_path, precision="fp16")
    result = build_engine(TINY_ONNX, tmp_path / "e.engine", settings, "input", (1, 4), sparse=True, plan=plan_build("fp16", detect(fake.module)), trt=fake.module)
    assert result.timing_cache["found"] and not result.timing_cache["used"] and "another GPU" in result.timing_cache["reason"]
    assert result.timing_cache["written"] and (tmp_path / "cache").read_bytes() == b"cache-for-this-gpu"
    accepted = FakeTensorRT("11")
    result = build_engine(TINY_ONNX, tmp_path / "e.engine", settings, "input", (1, 4), sparse=True, plan=plan_build("fp16", detect(accepted.module)), trt=accepted.module)
    assert result.timing_cache["used"] and "reason" not in result.timing_cache


def test_no_timing_cache_after_build_is_not_a_crash(tmp_path):
    fake = FakeTensorRT("10", timing_cache_none=True)
    settings = _settings(tmp_path, precision="fp16")
    result = build_engine(TINY_ONNX, tmp_path / "e.engine", settings, "input", (1, 4), sparse=False, plan=plan_build("fp16", detect(fake.module)), trt=fake.module)
    assert result.timing_cache["written"] is False and "None" in result.timing_cache["reason"]
    assert not (tmp_path / "cache").exists()


TRTEXEC_10_HELP = """&&&& RUNNING TensorRT.trtexec [TensorRT v100900] # trtexec --help
=== Build Options ===
  --memPoolSize=poolspec      Specify the size constraints of the designated memory pool(s)
  --fp16                      Enable fp16 precision, in addition to fp32 (default = disabled)
  --bf16                      Enable bf16 precision, in addition to fp32 (default = disabled)
  --int8                      Enable int8 precision, in addition to fp32 (default = disabled)
  --best                      Enable all precisions to achieve the best performance (default = disabled)
  --stronglyTyped             Create a strongly typed network. (default = disabled)
  --noTF32                    Disable tf32 precision (default is to enable tf32, in addition to fp32)
  --sparsity=spec             Control sparsity (default = disabled).
"""
TRTEXEC_11_HELP = """&&&& RUNNING TensorRT.trtexec [TensorRT v110400] # trtexec --help
=== Build Options ===
  --memPoolSize=poolspec      Specify the size constraints of the designated memory pool(s)
  --noTF32                    Disable tf32 precision (default is to enable tf32, in addition to fp32)
  --sparsity=spec             Control sparsity (default = disabled).
"""


@pytest.mark.parametrize("precision", PRECISIONS)
def test_trtexec_arguments_per_generation(tmp_path, precision):
    ten, eleven = trtexec_features(TRTEXEC_10_HELP), trtexec_features(TRTEXEC_11_HELP)
    assert ten.weak_typing and ten.strongly_typed_flag and not eleven.weak_typing
    settings = _settings(tmp_path, precision=precision)
    args = {}
    for name, features in (("10", ten), ("11", eleven)):
        args[name] = trtexec_command("trtexec", Path("m.onnx"), Path("e"), Path("l.json"), settings, "input", (1, 8), sparse=True, plan=plan_build(precision, features))
    removed = {"--fp16", "--bf16", "--int8", "--best", "--calib", "--stronglyTyped", "--fp8", "--int4"}
    assert not removed & set(args["11"])
    assert "--sparsity=enable" in args["10"] and "--sparsity=enable" in args["11"]
    assert ("--noTF32" in args["11"]) == (precision == "fp32")
    expected_10 = {"fp16": {"--fp16"}, "bf16": {"--bf16"}, "int8": {"--stronglyTyped"}}.get(precision, set())
    assert removed & set(args["10"]) == expected_10


@pytest.fixture(scope="module")
def projected_lenet5():
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
    from helpers import masked_checkpoint

    return project_nm(masked_checkpoint("lenet5", 0.5), "2:4").checkpoint


@pytest.mark.parametrize("generation,precision,typed", [("10", "fp16", "fp32"), ("11", "fp16", "fp16"), ("11", "bf16", "bf16"), ("11", "int8", "int8"), ("10", "int8", "int8")])
def test_whole_build_records_the_path_that_ran(tmp_path, projected_lenet5, generation, precision, typed):
    """The target end to end on stand-in TensorRT: typed ONNX where 11.x needs it, sparse layers from the inspector, manifest path."""
    from dnsconvert.export.onnx_export import export_checkpoint

    export = export_checkpoint(projected_lenet5)
    inits = {layer: name for layer, name in export.names.items()}
    schema = "trt10" if generation == "10" else "trt11"
    text = sample_text(f"layer_info_{schema}.json", export.model, {v: k for k, v in inits.items()})
    fake = FakeTensorRT(generation, layer_info=text)
    stand_in = ParityReport(max_abs=0.0, max_rel=0.0, atol=0.0, rtol=0.0, batches=(1,), passed=True, problem="stand-in: no GPU, the engine never ran")
    options = BuildOptions(extra={"precision": precision, "calibration": "random", "calibration_samples": "64"})
    target = TensorRTTarget()
    settings = BuildSettings.from_options(options.extra, tmp_path / "cache")
    features = detect(fake.module)
    plan = plan_build(precision, features)
    artifact = target.build_with(projected_lenet5, tmp_path / "m", options, settings, features, plan, use_trtexec=False, trt=fake.module,
                                 engine_parity_check=lambda engine, feeds: stand_in)  # fmt: skip
    assert model_precision(fake.parsed_onnx) == typed and not fake.parsed_onnx.graph.sparse_initializer
    assert artifact.read("sparse") == b"serialized-engine" and artifact.read("onnx") == fake.parsed_onnx.SerializeToString()
    manifest = {**artifact.manifest.details, **artifact.manifest.details["sparsity"]}
    assert manifest["tensorrt_api"]["plan"]["path"] == ("weak-typing-flags" if typed == "fp32" else "strongly-typed")
    assert manifest["tensorrt_api"]["features"]["weak_typing"] == (generation == "10")
    assert manifest["inspector_schema"].startswith(generation)
    assert manifest["sparse_layers"] == ["fc1.weight"] and manifest["evidence"] == "engine inspector (DETAILED)"
    assert manifest["timing_cache"]["sparse"]["written"] and manifest["onnx_precision"]["precision"] == typed
    assert [u["engine_layer"] for u in manifest["unmapped_engine_layers"]] == [f"{{ForeignNode[{export.model.graph.node[-1].name}...output]}}"]
    records = {r["param"]: r for r in manifest["layers"]}
    assert records["conv2.weight"]["trt_eligible"] and not records["conv2.weight"]["sparse_picked"]  # HasSparseWeights without a sparse tactic
    assert manifest["params_not_located"] == ["fc2.weight"]
    if generation == "11":
        assert _removed_touched(fake) == []
