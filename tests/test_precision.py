"""FP16 / BF16 / INT8 (Q/DQ) ONNX: types, parity in ONNX Runtime vs PyTorch in the same dtype, sparsity kept."""

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from dnsconvert.errors import DataError, UserError
from dnsconvert.export.onnx_export import export_checkpoint
from dnsconvert.model_io import parity_feeds
from dnsconvert.export.precision import (
    TOLERANCES,
    CalibrationSet,
    _bf16_bits,
    cast_model,
    emulate_in_fp32,
    float_types,
    load_calibration,
    model_precision,
    ort_runner,
    precision_parity,
    precision_step,
    torch_runner,
)
from dnsconvert.export.sparse_init import initializer_arrays, sparsify_initializers
from helpers import masked_checkpoint

MODELS = ["lenet300100", "lenet5", "mlp", "convnet", "transformer_mlp"]


def random_calibration(ckpt, samples, seed):
    shape = (samples, *ckpt.model.input_shape[1:])
    return CalibrationSet(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), source=f"randn(seed={seed})")


@pytest.fixture(scope="module")
def exports():
    """Each built-in model at 90% magnitude sparsity, exported to fp32 ONNX once."""
    out = {}
    for name in MODELS:
        ckpt = masked_checkpoint(name, 0.9)
        out[name] = (ckpt, export_checkpoint(ckpt))
    return out


def _single_op_model(op, elem_type, shapes, **attrs):
    inputs = [helper.make_tensor_value_info(f"x{i}", elem_type, s) for i, s in enumerate(shapes)]
    graph = helper.make_graph([helper.make_node(op, [i.name for i in inputs], ["y"], **attrs)], "g", inputs, [helper.make_tensor_value_info("y", elem_type, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_what_ort_cpu_really_runs():
    """The README's claim, checked: no bf16 MatMul/Gemm/Add kernel on ORT's CPU provider; fp16 runs in fp32 between Casts."""
    import onnxruntime as ort

    for op, shapes in (("MatMul", [[2, 4], [4, 3]]), ("Add", [[2, 4], [2, 4]])):
        with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
            ort.InferenceSession(_single_op_model(op, TensorProto.BFLOAT16, shapes).SerializeToString(), providers=["CPUExecutionProvider"])
    weight = numpy_helper.from_array(np.ones((4, 3), np.float16), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], [weight])  # fmt: skip
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    producers = {out: n for n in optimized.graph.node for out in n.output}
    matmul = next(n for n in optimized.graph.node if n.op_type == "MatMul")
    for name in matmul.input:  # both operands upcast: the MatMul runs in fp32
        assert producers[name].op_type == "Cast" and producers[name].attribute[0].i == TensorProto.FLOAT
    assert any(n.op_type == "Cast" and matmul.output[0] in n.input and n.attribute[0].i == TensorProto.FLOAT16 for n in optimized.graph.node)


def test_bf16_rounding_matches_torch():
    values = np.concatenate([np.random.default_rng(0).standard_normal(10_000).astype(np.float32) * 100, np.array([1.00390625, 1.01171875, -3.0e38, 1e-40, 0.0], np.float32)])
    ours = _bf16_bits(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("io", ["fp32", "native"])
def test_cast_model_types_every_float_tensor(exports, precision, io):
    _, exported = exports["lenet5"]
    model = cast_model(exported.model, precision, io=io)
    target = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[precision]
    edges = {v.name for v in [*model.graph.input, *model.graph.output]}
    types = float_types(model)
    inner = {name: t for name, t in types.items() if name not in edges}
    assert inner and set(inner.values()) == {target}
    assert {types[name] for name in edges} == ({TensorProto.FLOAT} if io == "fp32" else {target})
    assert model_precision(model) == precision


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8"])
def test_every_builtin_model_passes_parity_and_stays_sparse(exports, name, precision):
    ckpt, exported = exports[name]
    calibration = random_calibration(ckpt, 128, seed=7) if precision == "int8" else None
    step = precision_step(exported.model, exported.names, precision, calibration=calibration)
    sparse, records = sparsify_initializers(step.model, step.names.values())
    parity = precision_parity(exported.torch_model, ckpt.model, sparse, precision, parity_feeds(ckpt.model.inputs, (1, 4)), exported.output_names)
    assert parity.passed, parity
    arrays = initializer_arrays(sparse)
    for param, init in step.names.items():  # pruned weights are exactly zero in every type
        got = arrays[init].astype(np.float32)
        got = got.T if init.removesuffix("_quantized").endswith(".T") else got
        assert np.all(got[~ckpt.masks[param].numpy().astype(bool)] == 0)
    itemsize = {"fp16": 2, "bf16": 2, "int8": 1}[precision]
    for record in records:  # stored sparse exactly where INT64 indices + values beat dense
        nnz_fraction = record.nnz / int(np.prod(record.shape))
        assert record.sparsified == (nnz_fraction * (8 + itemsize) <= itemsize)
    assert any(r.sparsified for r in records)


def test_parity_fails_on_a_wrong_weight(exports):
    ckpt, exported = exports["lenet300100"]
    model = cast_model(exported.model, "fp16")
    weight = next(i for i in model.graph.initializer if i.name == exported.names["3.weight"])
    array = numpy_helper.to_array(weight).copy()
    array.flat[np.flatnonzero(array)[0]] += np.float16(0.5)
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    assert not precision_parity(exported.torch_model, ckpt.model, model, "fp16", parity_feeds(ckpt.model.inputs, (4,))).passed


def test_bf16_emulation_rounds_every_node(exports):
    """The emulated bf16 run equals PyTorch bf16 much more closely than an unrounded fp32 run does."""
    ckpt, exported = exports["transformer_mlp"]
    bf16 = cast_model(exported.model, "bf16")
    x = parity_feeds(ckpt.model.inputs, (4,))[0]
    reference = torch_runner(exported.torch_model, ckpt.model, "bf16")(x)[0]
    emulated = ort_runner(bf16)(x)[0]
    twin = emulate_in_fp32(bf16)
    assert sum(n.op_type == "Cast" for n in twin.graph.node) > 2 * len(bf16.graph.node) - 4
    unrounded = ort_runner(exported.model)(x)[0]
    assert np.mean(emulated == reference) > 0.5 and np.mean(unrounded == reference) < 0.05  # bf16 values, bit for bit mostly
    assert np.abs(emulated - reference).mean() < 0.5 * np.abs(unrounded - reference).mean()
    atol, rtol = TOLERANCES["bf16"]
    assert np.all(np.abs(emulated - reference) <= atol + rtol * np.abs(reference))


def test_int8_is_explicit_symmetric_qdq(exports):
    ckpt, exported = exports["lenet5"]
    calibration = random_calibration(ckpt, 64, seed=3)
    step = precision_step(exported.model, exported.names, "int8", calibration=calibration)
    ops = [n.op_type for n in step.model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops and "QLinearConv" not in ops
    zero_points = [numpy_helper.to_array(i) for i in step.model.graph.initializer if i.name.endswith("_zero_point")]
    assert zero_points and all(np.all(z == 0) for z in zero_points) and all(z.dtype == np.int8 for z in zero_points)
    assert not any(i.name.endswith("bias_quantized") for i in step.model.graph.initializer)  # biases stay float (TensorRT reads fp32 bias)
    assert set(step.int8.quantized_weights) == set(exported.names.values())
    assert step.int8.metric == "top1_agreement_with_fp32" and 0.9 <= step.int8.int8 <= 1.0


def test_calibration_sets(tmp_path):
    inputs = np.random.default_rng(0).standard_normal((20, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", inputs=inputs, labels=np.arange(20) % 10)
    loaded = load_calibration(str(tmp_path / "cal.npz"), (1, 1, 28, 28), samples=8)
    assert loaded.inputs.shape == (8, 1, 28, 28) and loaded.labels.tolist() == list(range(8))
    synthetic = load_calibration("synthetic", (1, 784), samples=16)
    assert synthetic.inputs.shape == (16, 784) and synthetic.labels is not None
    assert load_calibration("random", (1, 16, 64), samples=4).labels is None
    with pytest.raises(DataError, match="no such calibration"):
        load_calibration(str(tmp_path / "missing.npz"), (1, 1, 28, 28))
    with pytest.raises(DataError, match="shape"):
        load_calibration(str(tmp_path / "cal.npz"), (1, 784))
    with pytest.raises(UserError, match="calibration"):
        precision_step(onnx.ModelProto(), {}, "int8")


def test_cli_precision_exports(run_cli, tmp_path):
    out = tmp_path / "m"
    result = run_cli("export", "fixtures/tiny_mlp_unstructured.safetensors", "--target", "ort", "-o", out, "-T", "precision=bf16", "--json")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    precision = manifest["details"]["precision"]
    assert precision["precision"] == "bf16" and manifest["parity"]["passed"]
    assert precision["sizes"]["fp32"]["dense_bytes"] > precision["sizes"]["bf16"]["dense_bytes"]
    assert model_precision(onnx.load(str(out / "model.onnx"))) == "bf16"
    result = run_cli("export", "fixtures/tiny_mlp_unstructured.safetensors", "--target", "ort", "-o", tmp_path / "q", "-T", "precision=int8")
    assert result.exit_code == 2 and "calibration" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q").exists()
