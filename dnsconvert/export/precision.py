"""Precision as the exported graph's own types: FP16/BF16 ONNX and INT8 explicit Q/DQ ONNX.

TensorRT 11 removed the precision builder flags (FP16/BF16/INT8, calibrators): precision comes
from the ONNX model's tensor types, INT8 from explicit QuantizeLinear/DequantizeLinear nodes.
These are standalone steps over an ``onnx.ModelProto`` with dense initializers (run them
before :func:`~dnsconvert.export.sparse_init.sparsify_initializers`; pruned zeros stay exactly
zero in every type, so the sparse initializers stay sparse):

- :func:`cast_model` -- weights and compute in fp16 or bf16; graph inputs/outputs either stay
  float32 behind a ``Cast`` (``io="fp32"``) or take the type (``io="native"``).
- :func:`quantize_int8` -- ONNX Runtime's static quantization in QDQ format (symmetric int8
  activations and per-channel symmetric int8 weights, the form TensorRT's explicit
  quantization reads) from a calibration set; reports the accuracy (or fp32 agreement) drop.
- :func:`torch_runner` -- the PyTorch reference run in the same dtype, for parity.
- :func:`ort_runner` -- what ONNX Runtime's CPU provider runs for each type (see below).

What ONNX Runtime's CPU provider really runs (onnxruntime 1.32, x86-64, measured in
``tests/test_precision.py``): **fp16** graphs load, but the CPU provider has fp16 kernels for
few ops on x86; its graph transformer inserts ``Cast`` nodes so that MatMul/Gemm/Conv/Relu/Gelu
run in fp32 on the fp16 weights (exactly representable in fp32), with fp16 only at the
graph's edges. **bf16**: MatMul, Gemm, Conv, Add, Mul, Relu, Erf, Sqrt, BatchNormalization,
pooling have no bf16 CPU kernel at all ("NOT_IMPLEMENTED"), so a bf16 graph does not load.
:func:`ort_runner` therefore runs a bf16 model through :func:`emulate_in_fp32`: every node
computes in fp32 on bf16 values and rounds its float outputs back to bf16, which is what bf16
storage with fp32 accumulation means on a GPU. Neither is a speed claim for CPUs.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import ExportError, UserError

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
ONNX_TYPE = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
IO_CHOICES = ("fp32", "native")
# Parity tolerances against PyTorch run in the same dtype (|Δ| <= atol + rtol*|ref|, elementwise),
# chosen from the types' unit roundoff (fp16 2^-11, bf16 2^-8) with headroom for accumulation-order
# differences over a few layers; int8 is compared with fp32 PyTorch relative to the output range.
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (2e-3, 1e-2), "bf16": (2e-2, 5e-2)}
INT8_RANGE_TOLERANCE = 0.1  # int8: max |Δ| <= 10% of max |ref| (fp32 PyTorch)
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")  # where TensorRT runs int8 math; elementwise ops stay float
_CAST_ATTR_OPS = {"Cast": "to"}


def _bf16_bits(array: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns with round-to-nearest-even (as torch's ``.to(bfloat16)``)."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    nan = np.isnan(array)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(nan, np.uint16(0x7FC0), rounded)


def _retyped_tensor(tensor: onnx.TensorProto, precision: str) -> onnx.TensorProto:
    """A float32 TensorProto in fp16 or bf16 (other tensors are returned unchanged)."""
    if tensor.data_type != TensorProto.FLOAT:
        return tensor
    array = numpy_helper.to_array(tensor)
    if precision == "fp16":
        if np.any(np.abs(array[np.isfinite(array)]) > np.finfo(np.float16).max):
            raise ExportError(f"initializer {tensor.name!r} has values beyond fp16's range (65504)", hint="export in bf16 instead")
        out = numpy_helper.from_array(array.astype(np.float16), name=tensor.name)
    else:
        out = onnx.TensorProto()
        out.name, out.data_type = tensor.name, TensorProto.BFLOAT16
        out.dims.extend(array.shape)
        out.raw_data = _bf16_bits(array).tobytes()
    return out


def _float_value_names(model: onnx.ModelProto) -> set[str]:
    inferred = onnx.shape_inference.infer_shapes(model)
    infos = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    return {v.name for v in infos if v.type.tensor_type.elem_type == TensorProto.FLOAT}


def cast_model(model: onnx.ModelProto, precision: str, *, io: str = "fp32") -> onnx.ModelProto:
    """Weights and compute in ``precision`` ("fp16" or "bf16"); returns a new model.

    Every float32 initializer, ``Constant`` and ``Cast(to=FLOAT)`` takes the type, so type
    inference makes every float tensor of the graph that type. ``io="fp32"`` keeps float32 graph
    inputs/outputs with a ``Cast`` at each edge (drop-in for fp32 callers); ``io="native"`` makes
    the inputs/outputs themselves fp16/bf16. ``LayerNormalization`` keeps its default fp32
    ``stash_type`` (statistics in fp32, as PyTorch computes them).
    """
    if precision not in ("fp16", "bf16"):
        raise ValueError(f"cast_model precision must be fp16 or bf16, got {precision!r}")
    if io not in IO_CHOICES:
        raise UserError(f"io={io!r} is not one of {', '.join(IO_CHOICES)}")
    target = ONNX_TYPE[precision]
    if model.graph.sparse_initializer:
        raise ValueError("cast_model takes dense initializers; sparsify after casting")
    out = copy.deepcopy(model)
    graph = out.graph
    retyped = [_retyped_tensor(init, precision) for init in graph.initializer]
    del graph.initializer[:]
    graph.initializer.extend(retyped)
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = target
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT and node.op_type in ("Constant", "ConstantOfShape"):
                attr.t.CopyFrom(_retyped_tensor(attr.t, precision))
    del graph.value_info[:]
    new_nodes: list[onnx.NodeProto] = []
    for value in graph.input:
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        if io == "native":
            value.type.tensor_type.elem_type = target
        else:
            cast_name = f"{value.name}.{precision}"
            new_nodes.append(helper.make_node("Cast", [value.name], [cast_name], to=target, name=f"cast_in_{value.name}"))
            for node in graph.node:
                for i, name in enumerate(node.input):
                    if name == value.name:
                        node.input[i] = cast_name
    tail: list[onnx.NodeProto] = []
    for value in graph.output:
        if value.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        if io == "native":
            value.type.tensor_type.elem_type = target
        else:
            inner = f"{value.name}.{precision}"
            for node in graph.node:
                for i, name in enumerate(node.output):
                    if name == value.name:
                        node.output[i] = inner
            for node in graph.node:  # consumers of an output inside the graph read the inner value
                for i, name in enumerate(node.input):
                    if name == value.name:
                        node.input[i] = inner
            tail.append(helper.make_node("Cast", [inner], [value.name], to=TensorProto.FLOAT, name=f"cast_out_{value.name}"))
    nodes = [*new_nodes, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    entry = out.metadata_props.add()
    entry.key, entry.value = "dnsconvert.precision", f"{precision};io={io}"
    try:
        onnx.checker.check_model(out)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the {precision} model fails onnx.checker: {str(exc).splitlines()[0]}") from None
    leftover = _float_value_names(out) - ({v.name for v in graph.input} | {v.name for v in graph.output} if io == "fp32" else set())
    if leftover:  # a post-condition: the whole graph computes in the chosen type
        from ..errors import InternalError

        raise InternalError(f"{precision} cast left float32 tensors: {sorted(leftover)[:5]}")
    return out


def float_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every float tensor of the graph (after type inference), by name."""
    inferred = onnx.shape_inference.infer_shapes(model)
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return {name: t for name, t in types.items() if t in floats}


# --- INT8: explicit Q/DQ from a calibration set -------------------------------------------------


@dataclass(frozen=True)
class CalibrationSet:
    """Inputs for calibration (float32, [N, ...]) and, when known, their integer labels."""

    inputs: np.ndarray
    labels: np.ndarray | None = None
    source: str = ""

    def batches(self, batch_size: int) -> list[np.ndarray]:
        return [self.inputs[i : i + batch_size] for i in range(0, len(self.inputs), batch_size)]


@dataclass
class Int8Report:
    calibration: str
    samples: int
    method: str
    per_channel: bool
    symmetric: bool
    quantized_ops: tuple[str, ...]
    quantized_weights: dict[str, str]  # original initializer -> int8 initializer
    metric: str  # "accuracy" (labels) or "top1_agreement_with_fp32" (no labels)
    fp32: float
    int8: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.fp32 - self.int8)

    def to_json(self) -> dict[str, Any]:
        return {
            "calibration": self.calibration, "samples": self.samples, "method": self.method, "per_channel": self.per_channel,
            "symmetric": self.symmetric, "quantized_ops": list(self.quantized_ops), "quantized_weights": self.quantized_weights,
            "metric": self.metric, "fp32": self.fp32, "int8": self.int8, "drop_points": self.drop_points, **self.extra,
        }  # fmt: skip


def quantize_int8(
    model: onnx.ModelProto,
    calibration: CalibrationSet,
    *,
    per_channel: bool = True,
    batch_size: int = 64,
    method: str = "minmax",
) -> tuple[onnx.ModelProto, Int8Report]:
    """Explicit-quantization INT8 ONNX (QuantizeLinear/DequantizeLinear) from a calibration set.

    ONNX Runtime's ``quantize_static`` in QDQ format, int8 activations and weights, both
    symmetric (zero point 0: TensorRT supports only symmetric int8, and a pruned zero weight
    stays exactly 0), per-channel weights, Q/DQ only around Conv/MatMul/Gemm inputs, biases left
    in float (as NVIDIA's quantization toolkits export them for TensorRT). The report
    compares the int8 model with the fp32 one on the calibration set itself: accuracy when
    labels are given, else top-1 agreement with the fp32 model.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    if model.graph.sparse_initializer:
        raise ValueError("quantize_int8 takes dense initializers; sparsify after quantizing")
    if len(calibration.inputs) == 0:
        raise UserError("the INT8 calibration set is empty", hint="give a calibration set with at least one sample")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
    if method not in methods:
        raise UserError(f"calibration method {method!r} is not one of {', '.join(methods)}")
    if len(model.graph.input) != 1:
        raise UserError(f"INT8 calibration supports single-input models; this one has {len(model.graph.input)} inputs")
    input_name = model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(calibration.batches(batch_size))

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch.astype(np.float32)}

    before = {init.name for init in model.graph.initializer}
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static logs a "consider pre-processing" warning per call
    tmp_dir = tempfile.TemporaryDirectory()
    try:
        source, target = Path(tmp_dir.name) / "fp32.onnx", Path(tmp_dir.name) / "int8.onnx"
        onnx.save(model, str(source))
        quantize_static(
            str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
            per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}, calibration_providers=["CPUExecutionProvider"],
        )  # fmt: skip
        quantized = onnx.load(str(target))
    finally:
        root.setLevel(level)
        tmp_dir.cleanup()
    weights = {}
    for init in quantized.graph.initializer:
        if init.data_type == TensorProto.INT8 and init.name not in before:
            original = init.name.removesuffix("_quantized")
            if original in before:
                weights[original] = init.name
    feeds = [{input_name: b} for b in calibration.batches(batch_size)]
    fp32_out = _run_all(ort_runner(model), feeds)
    int8_out = _run_all(ort_runner(quantized), feeds)
    if calibration.labels is not None:
        metric = "accuracy"
        fp32_score = float(np.mean(fp32_out.argmax(-1) == calibration.labels))
        int8_score = float(np.mean(int8_out.argmax(-1) == calibration.labels))
    else:
        metric = "top1_agreement_with_fp32"
        fp32_score, int8_score = 1.0, float(np.mean(int8_out.argmax(-1) == fp32_out.argmax(-1)))
    scale = float(np.abs(fp32_out).max()) or 1.0
    report = Int8Report(
        calibration.source, int(len(calibration.inputs)), method, per_channel, True, QUANTIZED_OPS, weights, metric, fp32_score, int8_score,
        extra={"max_abs_vs_fp32_onnx": float(np.abs(int8_out - fp32_out).max()), "max_rel_to_range_vs_fp32_onnx": float(np.abs(int8_out - fp32_out).max()) / scale},
    )  # fmt: skip
    return quantized, report


def _run_all(run: Callable[[Mapping[str, np.ndarray]], list[np.ndarray]], feeds: Iterable[Mapping[str, np.ndarray]]) -> np.ndarray:
    """The first output over all feeds, concatenated."""
    return np.concatenate([np.asarray(run(f)[0], dtype=np.float32) for f in feeds])


# --- running each type: ONNX Runtime (CPU) and the PyTorch reference ----------------------------


def model_precision(model: onnx.ModelProto) -> str:
    """fp32, fp16, bf16 or int8, from what the graph holds."""
    if any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node):
        return "int8"
    types = {i.data_type for i in model.graph.initializer} | {s.values.data_type for s in model.graph.sparse_initializer}
    if TensorProto.BFLOAT16 in types:
        return "bf16"
    if TensorProto.FLOAT16 in types:
        return "fp16"
    return "fp32"


def emulate_in_fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A bf16 graph rewritten to run on fp32 kernels with bf16 rounding after every node.

    bf16 values are exactly representable in fp32, so retyping initializers is exact; each
    node then computes in fp32 (fp32 accumulation, as on tensor cores) and every float output
    is rounded to bf16 (Cast to bf16 and back), so stored activations are bf16 as they would be
    in a native bf16 run. Graph inputs/outputs keep their declared types.
    """
    from .sparse_init import densify

    src = densify(model)
    out = copy.deepcopy(src)
    graph = out.graph
    new_inits = []
    for init in graph.initializer:
        if init.data_type == TensorProto.BFLOAT16:
            new_inits.append(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), name=init.name))
        else:
            new_inits.append(init)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    types = float_types(src)
    nodes: list[onnx.NodeProto] = []
    renamed_inputs = {}
    for value in graph.input:  # bf16 inputs are declared float32 and rounded to bf16 on entry
        if value.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
            renamed_inputs[value.name] = f"{value.name}.rounded"
            nodes.append(helper.make_node("Cast", [value.name], [f"{value.name}.bf16"], to=TensorProto.BFLOAT16))
            nodes.append(helper.make_node("Cast", [f"{value.name}.bf16"], [f"{value.name}.rounded"], to=TensorProto.FLOAT))
    for value in graph.output:
        if value.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        node = copy.deepcopy(node)
        for i, name in enumerate(node.input):
            node.input[i] = renamed_inputs.get(name, name)
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.BFLOAT16:
                attr.i = TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.BFLOAT16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), name=attr.t.name))
        rounded = []
        for i, name in enumerate(list(node.output)):
            if types.get(name) == TensorProto.BFLOAT16:
                node.output[i] = f"{name}.unrounded"
                rounded.append(helper.make_node("Cast", [f"{name}.unrounded"], [f"{name}.bf16"], to=TensorProto.BFLOAT16))
                rounded.append(helper.make_node("Cast", [f"{name}.bf16"], [name], to=TensorProto.FLOAT))
        nodes.append(node)
        nodes.extend(rounded)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return out


def ort_runner(model: onnx.ModelProto | bytes, threads: int = 1) -> Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]:
    """Run a model of any of the four precisions on ONNX Runtime's CPU provider (bf16 emulated).

    The runner takes named float32/int feeds (cast to each fp16 input's type) and returns every
    output as float32 (floating outputs) or as is.
    """
    import onnxruntime as ort

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)
    if model_precision(proto) == "bf16":
        proto = emulate_in_fp32(proto)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # ORT_ENABLE_BASIC keeps the Cast round trips of the bf16 emulation (no cast-chain elimination)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(proto.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])
    wants = {i.name: {"tensor(float16)": np.float16, "tensor(float)": np.float32}.get(i.type) for i in session.get_inputs()}

    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        cast = {name: np.asarray(value).astype(wants[name]) if wants.get(name) is not None else np.asarray(value) for name, value in feeds.items()}
        return [np.asarray(o).astype(np.float32) if np.asarray(o).dtype.kind == "f" else np.asarray(o) for o in session.run(None, cast)]

    return run


def torch_runner(module: Any, spec: Any, precision: str) -> Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]:
    """The PyTorch model run in ``precision`` (a copy; int8 and fp32 run in fp32): named feeds in,
    floating outputs as float32."""
    import torch

    from ..model_io import FlatIO, to_tensors

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    flat = FlatIO(copy.deepcopy(module).to(dtype), spec.inputs).eval()

    @torch.no_grad()
    def run(feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        tensors = [t.to(dtype) if t.is_floating_point() else t for t in to_tensors(feeds, spec.inputs)]
        return [o.float().numpy() if o.is_floating_point() else o.numpy() for o in flat(*tensors)]

    return run


def precision_parity(module: Any, spec: Any, model: onnx.ModelProto, precision: str, feeds: Sequence[Mapping[str, np.ndarray]], output_names: Sequence[str] | None = None):
    """The ONNX model in ONNX Runtime vs the PyTorch model in the same dtype, at :data:`TOLERANCES`.

    INT8 is compared with fp32 PyTorch and passes when, per output, max |Δ| <=
    INT8_RANGE_TOLERANCE * max |ref| (reported as atol 0, rtol INT8_RANGE_TOLERANCE).
    Returns the manifest's ``ParityReport``.
    """
    from ..artifact.manifest import OutputParity, ParityReport
    from .parity import compare

    reference = torch_runner(module, spec, precision)
    candidate = ort_runner(model)
    if precision != "int8":
        atol, rtol = TOLERANCES[precision]
        return compare(reference, candidate, feeds, atol=atol, rtol=rtol, output_names=output_names)
    loose = compare(reference, candidate, feeds, atol=float("inf"), rtol=0.0, output_names=output_names)  # only the statistics
    if loose.problem:
        return loose
    outputs = tuple(OutputParity(name=o.name, max_abs=o.max_abs, max_rel=o.max_rel, passed=o.max_rel <= INT8_RANGE_TOLERANCE) for o in loose.outputs)
    return ParityReport(max_abs=loose.max_abs, max_rel=loose.max_rel, atol=0.0, rtol=INT8_RANGE_TOLERANCE, batches=loose.batches,
                        passed=all(o.passed for o in outputs), outputs=outputs)  # fmt: skip


# --- calibration sets and the export step ----------------------------------------------------


def load_calibration(spec: str, input_shape: Sequence[int], *, samples: int = 512, seed: int = 0) -> CalibrationSet:
    """A calibration set from ``spec``.

    ``DIR`` (the four MNIST IDX files: a seeded draw of ``samples`` *training* images, normalised
    as in training, with labels), ``synthetic`` (the built-in digits, with labels), ``random``
    (standard normal inputs of the model's shape, no labels), ``FILE.npy`` (inputs) or
    ``FILE.npz`` (arrays ``inputs`` and optionally ``labels``).
    """
    from ..errors import DataError

    shape = tuple(int(d) for d in input_shape[1:])
    rng = np.random.default_rng(seed)
    if spec == "random":
        return CalibrationSet(rng.standard_normal((samples, *shape)).astype(np.float32), None, f"random(n={samples}, seed={seed})")
    if spec == "synthetic" or Path(spec).is_dir():
        import torch

        from ..data import load_mnist, synthetic_digits

        split = synthetic_digits().train if spec == "synthetic" else load_mnist(spec).train
        index = torch.from_numpy(rng.permutation(len(split))[:samples])
        x, y = split.batch(index)
        if tuple(x.shape[1:]) != shape:
            x = x.reshape(len(x), *shape)
        return CalibrationSet(x.numpy().astype(np.float32), y.numpy(), f"{split.name}[{samples} drawn, seed={seed}]")
    path = Path(spec)
    if not path.is_file():
        raise DataError("no such calibration set", path=path, hint="give a MNIST folder, synthetic, random, a .npy or a .npz")
    try:
        loaded = np.load(path, allow_pickle=False)
        inputs, labels = (loaded["inputs"], loaded["labels"] if "labels" in loaded.files else None) if path.suffix == ".npz" else (loaded, None)
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"cannot read the calibration set ({exc})", path=path, hint=".npy of inputs, or .npz with 'inputs' (and 'labels')") from None
    if tuple(inputs.shape[1:]) != shape:
        raise DataError(f"calibration inputs have shape {tuple(inputs.shape)}, the model takes [N, {', '.join(map(str, shape))}]", path=path)
    if labels is not None and len(labels) != len(inputs):
        raise DataError(f"{len(labels)} labels for {len(inputs)} calibration inputs", path=path)
    return CalibrationSet(inputs.astype(np.float32)[:samples], None if labels is None else labels.astype(np.int64)[:samples], str(path))


@dataclass
class PrecisionStep:
    """The model in its precision, with what the export records about it."""

    precision: str
    io: str
    model: onnx.ModelProto
    names: dict[str, str]  # checkpoint parameter -> initializer holding its weight (int8: the quantized one)
    int8: Int8Report | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"precision": self.precision, "io": self.io}
        if self.int8 is not None:
            data["int8"] = self.int8.to_json()
        return data


def precision_step(model: onnx.ModelProto, names: dict[str, str], precision: str, *, io: str = "fp32", calibration: CalibrationSet | None = None) -> PrecisionStep:
    """fp32 model -> the same model in ``precision`` (fp32 returns it unchanged)."""
    if precision not in PRECISIONS:
        raise UserError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return PrecisionStep("fp32", "fp32", model, dict(names))
    if precision in ("fp16", "bf16"):
        return PrecisionStep(precision, io, cast_model(model, precision, io=io), dict(names))
    if calibration is None:
        raise UserError("precision=int8 needs a calibration set", hint="add -T calibration=DIR|synthetic|random|FILE.npz")
    if io != "fp32":
        raise UserError("int8 keeps float32 inputs/outputs (Q/DQ inside the graph)", hint="drop -T io=native")
    quantized, report = quantize_int8(model, calibration)
    renamed = {param: report.quantized_weights.get(init, init) for param, init in names.items()}
    return PrecisionStep("int8", "fp32", quantized, renamed, report)
