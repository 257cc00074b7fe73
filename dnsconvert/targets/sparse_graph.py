"""An ONNX graph run as a mix of ONNX Runtime segments and compiled sparse kernels.

The graph is the dense ONNX export of the model. Pattern matching finds the *sparse ops*:
a Gemm / MatMul(+Add) or Conv whose weight is a pruned initializer, with the element-wise
epilogue that follows it fused in (bias, a residual Add for convolutions, Relu / GELU / Tanh /
Sigmoid). A plan chooses which sparse ops run as compiled kernels (:mod:`.csr_kernels`,
:mod:`.sparse_conv`); every other node runs in ONNX Runtime, each maximal run of such nodes
as one ONNX Runtime session (a *segment*), so attention, normalisation and dense layers keep
ONNX Runtime's fused kernels. Reshape, Flatten and Relu between kernels run natively when their
input comes from a kernel, and a k x k / stride k max pool is fused into the convolution before
it, so a fully sparse LeNet never enters ONNX Runtime at all (other pooling stays in ONNX Runtime:
a compiled 3x3 / stride 2 max pool took 1.2 ms where ONNX Runtime takes a tenth of that), and consecutive sparse Linear layers run as one
compiled chain in [features, tokens] layout (no transposes between them).

Inputs and outputs are named: :meth:`GraphRunner.run_feeds` takes ``{name: array}`` and returns
the graph outputs in order; the kernels never see how inputs arrived.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import TargetError
from .csr_kernels import ACTIVATIONS

ELEMENTWISE = {"Relu": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid"}


@dataclass
class SparseOp:
    """One weight layer and its fused epilogue, runnable as a compiled kernel."""

    name: str  # the weight initializer's name (unique): how plans refer to the op
    kind: str  # linear | conv
    nodes: list[int]  # node indices fused into this op (weight node first)
    x: str  # activation input
    y: str  # final output
    weight: np.ndarray  # linear: [out, in]; conv: [out, in, kh, kw]
    bias: np.ndarray | None
    activation: str = "identity"
    residual: str | None = None  # conv only: a tensor added before the activation
    stride: int = 1
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    pool: int = 0  # conv only: a fused k x k, stride k max pool after the activation

    @property
    def sparsity(self) -> float:
        return 1.0 - float(np.count_nonzero(self.weight)) / max(1, self.weight.size)

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.weight))

    def describe(self) -> dict:
        return {"kind": self.kind, "shape": list(self.weight.shape), "sparsity": round(self.sparsity, 6), "nnz": self.nnz, "activation": self.activation, "residual": self.residual is not None, "stride": self.stride, "pool": self.pool}


@dataclass
class Graph:
    """A normalised ONNX model: named nodes, constants as initializers, dense arrays by name."""

    model: onnx.ModelProto
    arrays: dict[str, np.ndarray]
    elem_types: dict[str, int]
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, list[int]] = field(default_factory=dict)
    taken: set[int] = field(default_factory=set)  # nodes already fused into a sparse op

    @property
    def nodes(self):
        return self.model.graph.node

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.model.graph.input if i.name not in self.arrays]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.model.graph.output]

    def const(self, name: str) -> np.ndarray | None:
        return self.arrays.get(name)


def load_graph(model: onnx.ModelProto) -> Graph:
    """Densify, turn Constant nodes into initializers, name nodes, infer element types."""
    from ..export.sparse_init import densify

    for sparse in model.graph.sparse_initializer:
        indices = numpy_helper.to_array(sparse.indices)
        size = int(np.prod(sparse.dims))
        if indices.size and (indices.min() < 0 or indices.max() >= size):
            raise TargetError(f"sparse initializer {sparse.values.name!r} has indices outside its {list(sparse.dims)} tensor")
    proto = densify(model)
    graph = proto.graph
    constants = [n for n in graph.node if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"]
    for node in constants:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(node.attribute[0].t)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        graph.node.remove(node)
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"node{i}_{node.op_type}"
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # inference is only used for element types; fall back to float
        inferred = proto
    elem_types = {}
    for info in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        elem_types[info.name] = info.type.tensor_type.elem_type
    arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    result = Graph(proto, arrays, elem_types)
    for i, node in enumerate(graph.node):
        for out in node.output:
            result.producer[out] = i
        for name in node.input:
            if name:
                result.consumers.setdefault(name, []).append(i)
    return result


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _sole_consumer(graph: Graph, value: str) -> int | None:
    users = graph.consumers.get(value, [])
    if len(users) != 1 or value in graph.output_names or users[0] in graph.taken:
        return None
    return users[0]


def _scalar(graph: Graph, name: str) -> float | None:
    value = graph.const(name)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(-1)[0])


def _other_input(node, value: str) -> str | None:
    others = [i for i in node.input if i != value]
    return others[0] if len(others) == 1 else None


def _match_gelu(graph: Graph, value: str) -> tuple[list[int], str] | None:
    """The exporter's erf GELU: v * (0.5 * (erf(v / sqrt2) + 1)), in any operand order."""
    users = graph.consumers.get(value, [])
    if len(users) != 2 or value in graph.output_names:
        return None
    nodes = graph.nodes
    first = next((u for u in users if nodes[u].op_type in ("Div", "Mul") and nodes[u].input[0] == value), None)
    if first is None:
        return None
    c = _scalar(graph, nodes[first].input[1])
    if c is None or not (nodes[first].op_type == "Div" and abs(c - 2**0.5) < 1e-5 or nodes[first].op_type == "Mul" and abs(c - 2**-0.5) < 1e-5):
        return None
    chain = [first]
    erf = _sole_consumer(graph, nodes[first].output[0])
    if erf is None or nodes[erf].op_type != "Erf":
        return None
    add = _sole_consumer(graph, nodes[erf].output[0])
    if add is None or nodes[add].op_type != "Add" or _scalar(graph, _other_input(nodes[add], nodes[erf].output[0]) or "") != 1.0:
        return None
    chain += [erf, add]
    current, seen_half, seen_value = nodes[add].output[0], False, False
    for _ in range(2):
        nxt = _sole_consumer(graph, current)
        if nxt is None or nodes[nxt].op_type != "Mul":
            return None
        other = _other_input(nodes[nxt], current)
        if other == value and not seen_value:
            seen_value = True
        elif other is not None and _scalar(graph, other) == 0.5 and not seen_half:
            seen_half = True
        else:
            return None
        chain.append(nxt)
        current = nodes[nxt].output[0]
    if set(users) != {first, chain[-1]} and set(users) != {first, chain[-2]}:
        return None
    return chain, current


def _epilogue(graph: Graph, value: str, allow_residual: bool) -> tuple[list[int], str, str, str | None]:
    """Fuse what follows ``value``: [Add(residual)] then one activation. Returns (nodes, output, activation, residual)."""
    nodes, current, residual = [], value, None
    if allow_residual:
        nxt = _sole_consumer(graph, current)
        if nxt is not None and graph.nodes[nxt].op_type == "Add":
            other = _other_input(graph.nodes[nxt], current)
            if other is not None and graph.const(other) is None:
                nodes.append(nxt)
                residual, current = other, graph.nodes[nxt].output[0]
    nxt = _sole_consumer(graph, current)
    if nxt is not None and graph.nodes[nxt].op_type in ELEMENTWISE:
        return nodes + [nxt], graph.nodes[nxt].output[0], ELEMENTWISE[graph.nodes[nxt].op_type], residual
    if nxt is not None and graph.nodes[nxt].op_type == "Gelu" and _attr(graph.nodes[nxt], "approximate", b"none") in (b"none", "none"):
        return nodes + [nxt], graph.nodes[nxt].output[0], "gelu", residual
    gelu = _match_gelu(graph, current)
    if gelu is not None:
        return nodes + gelu[0], gelu[1], "gelu", residual
    return nodes, current, "identity", residual


MONOTONIC = ("identity", "relu", "tanh", "sigmoid")  # max pooling commutes with these


def _plain_pool(node) -> bool:
    """MaxPool k x k with stride k, no padding: what a conv epilogue can take over."""
    if node.op_type != "MaxPool" or len(node.output) != 1:
        return False
    kernel = list(_attr(node, "kernel_shape") or [])
    return (
        len(kernel) == 2 and kernel[0] == kernel[1] and list(_attr(node, "strides", [1, 1])) == kernel
        and not any(_attr(node, "pads", [0, 0, 0, 0])) and not _attr(node, "ceil_mode", 0)
        and _attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET") and all(d == 1 for d in _attr(node, "dilations", [1, 1]))
    )  # fmt: skip


def find_sparse_ops(graph: Graph, weights: Sequence[str]) -> list[SparseOp]:
    """Every Gemm / MatMul / Conv whose weight initializer is in ``weights`` and that a kernel can run."""
    wanted = set(weights)
    ops: list[SparseOp] = []
    graph.taken.clear()
    for i, node in enumerate(graph.nodes):
        if ops:
            graph.taken.update(ops[-1].nodes)
        if node.op_type == "Gemm" and len(node.input) >= 2 and node.input[1] in wanted:
            if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
                continue
            w = graph.arrays[node.input[1]]
            weight = w if _attr(node, "transB", 0) else w.T
            bias = graph.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if bias is not None and bias.shape not in ((weight.shape[0],), (1, weight.shape[0])):
                continue
            fused, y, act, _ = _epilogue(graph, node.output[0], allow_residual=False)
            ops.append(SparseOp(node.input[1], "linear", [i, *fused], node.input[0], y, np.ascontiguousarray(weight, np.float32), None if bias is None else bias.reshape(-1).astype(np.float32), act))
        elif node.op_type == "MatMul" and node.input[1] in wanted and graph.arrays[node.input[1]].ndim == 2:
            weight = graph.arrays[node.input[1]].T
            fused, y, bias = [i], node.output[0], None
            nxt = _sole_consumer(graph, y)
            if nxt is not None and graph.nodes[nxt].op_type == "Add":
                other = graph.const(_other_input(graph.nodes[nxt], y) or "")
                if other is not None and other.shape == (weight.shape[0],):
                    fused, y, bias = [i, nxt], graph.nodes[nxt].output[0], other.astype(np.float32)
            more, y, act, _ = _epilogue(graph, y, allow_residual=False)
            ops.append(SparseOp(node.input[1], "linear", fused + more, node.input[0], y, np.ascontiguousarray(weight, np.float32), bias, act))
        elif node.op_type == "Conv" and node.input[1] in wanted:
            w = graph.arrays[node.input[1]]
            strides = list(_attr(node, "strides", [1, 1]))
            pads = list(_attr(node, "pads", [0, 0, 0, 0]))
            if w.ndim != 4 or _attr(node, "group", 1) != 1 or any(d != 1 for d in _attr(node, "dilations", [1, 1])):
                continue
            if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or strides[0] != strides[1]:
                continue
            bias = graph.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            fused, y, act, residual = _epilogue(graph, node.output[0], allow_residual=True)
            pool = 0
            nxt = _sole_consumer(graph, y)
            if nxt is not None and residual is None and act in MONOTONIC and _plain_pool(graph.nodes[nxt]):
                pool, y = int(_attr(graph.nodes[nxt], "kernel_shape")[0]), graph.nodes[nxt].output[0]
                fused = [*fused, nxt]
            ops.append(SparseOp(node.input[1], "conv", [i, *fused], node.input[0], y, np.ascontiguousarray(w, np.float32), None if bias is None else bias.astype(np.float32), act, residual, int(strides[0]), (pads[0], pads[1], pads[2], pads[3]), pool))
    graph.taken.clear()
    return ops


# ---------------------------------------------------------------- steps


class LinearChainStep:
    """Consecutive sparse Linear ops as one compiled call on [tokens, features] input."""

    def __init__(self, ops: list[SparseOp], parts: int):
        from .csr_kernels import CsrChain, CsrLayer

        layers = [CsrLayer.from_dense(op.weight, op.bias, op.activation) for op in ops]
        self.chain = CsrChain(layers, parts=parts)
        self.ops, self.parts = list(ops), parts
        self.inputs, self.outputs = [ops[0].x], [ops[-1].y]
        self.in_features, self.out_features = ops[0].weight.shape[1], ops[-1].weight.shape[0]
        self.names = [op.name for op in ops]

        self.flatten = False  # set when a Flatten/Reshape to [batch, features] before it is absorbed

    def __call__(self, env: dict) -> None:
        x = env[self.inputs[0]]
        if self.flatten:
            env[self.outputs[0]] = self.chain.rows_major(x.reshape(x.shape[0], -1))
            return
        lead = x.shape[:-1]
        y = self.chain.rows_major(x.reshape(-1, self.in_features))
        env[self.outputs[0]] = y.reshape(*lead, self.out_features)

    def absorb_flatten(self, step: SimpleStep) -> bool:
        """Take over a preceding Flatten(axis 1) / Reshape to [batch or 0 or -1, features or -1]
        whose only reader is this chain: one Python step less per call (LeNet at batch 1: ~1 us)."""
        if self.inputs[0] != step.outputs[0]:
            return False
        if step.op == "Flatten":
            ok = step.axis == 1
        elif step.op == "Reshape":
            ok = len(step.shape) == 2 and step.shape[0] in (0, -1) and step.shape[1] in (-1, self.in_features)
        else:
            ok = False
        if ok:
            self.inputs, self.flatten = [step.inputs[0]], True
        return ok


class ConvStep:
    def __init__(self, op: SparseOp, parts: int, layout: str = "auto"):
        from .sparse_conv import SparseConv2d

        self.conv = SparseConv2d(op.weight, op.bias, stride=op.stride, pads=op.pads, activation=ACTIVATIONS[op.activation], parts=parts, pool=op.pool, layout=layout)
        self.inputs = [op.x] + ([op.residual] if op.residual else [])
        self.outputs = [op.y]
        self.names = [op.name]
        self.residual = op.residual
        self.ops, self.parts = [op], parts

    def __call__(self, env: dict) -> None:
        env[self.outputs[0]] = self.conv(env[self.inputs[0]], env[self.residual] if self.residual else None)


class SimpleStep:
    """Reshape / Flatten / Relu between kernels, without an ONNX Runtime call."""

    def __init__(self, graph: Graph, index: int):
        node = graph.nodes[index]
        self.op, self.inputs, self.outputs = node.op_type, [node.input[0]], [node.output[0]]
        self.names = [node.name]
        if self.op == "Reshape":
            self.shape = tuple(int(d) for d in graph.arrays[node.input[1]])
            if 0 in self.shape and _attr(node, "allowzero", 0):
                raise TargetError("Reshape with allowzero=1 and a 0 dim is not supported natively")
        elif self.op == "Flatten":
            self.axis = int(_attr(node, "axis", 1))

    @staticmethod
    def supports(graph: Graph, index: int) -> bool:
        node = graph.nodes[index]
        if node.op_type in ("Relu", "Flatten"):
            return True
        if node.op_type == "Reshape":
            shape = graph.const(node.input[1])
            return shape is not None and not (0 in shape.tolist() and _attr(node, "allowzero", 0))
        return False

    def __call__(self, env: dict) -> None:
        x = env[self.inputs[0]]
        if self.op == "Relu":
            y = np.maximum(x, 0.0)
        elif self.op == "Reshape":
            shape = tuple(x.shape[i] if d == 0 else d for i, d in enumerate(self.shape))
            y = x.reshape(shape)
        else:  # Flatten
            y = x.reshape(int(np.prod(x.shape[: self.axis])), -1)
        env[self.outputs[0]] = y


class OrtStep:
    """A run of ordinary nodes as one ONNX Runtime session."""

    def __init__(self, session, inputs: list[str], outputs: list[str], names: list[str]):
        self.session, self.inputs, self.outputs, self.names = session, inputs, outputs, names

    def __call__(self, env: dict) -> None:
        results = self.session.run(self.outputs, {name: env[name] for name in self.inputs})
        for name, value in zip(self.outputs, results):
            env[name] = value


def subgraph_model(graph: Graph, node_indices: Sequence[int], inputs: Sequence[str], outputs: Sequence[str]) -> onnx.ModelProto:
    """The given nodes as a standalone model with the given inputs and outputs (types from the graph)."""
    nodes = [graph.nodes[i] for i in node_indices]
    used = {name for n in nodes for name in n.input if name}
    initializers = [init for init in graph.model.graph.initializer if init.name in used]

    def info(name: str):
        return helper.make_tensor_value_info(name, graph.elem_types.get(name, onnx.TensorProto.FLOAT), None)

    sub = helper.make_graph(nodes, "segment", [info(n) for n in inputs], [info(n) for n in outputs], initializer=initializers)
    model = helper.make_model(sub, opset_imports=graph.model.opset_import, ir_version=graph.model.ir_version)
    return model


def ort_session(model: bytes | onnx.ModelProto, threads: int, *, spinning: bool = True, config: Mapping[str, str] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        # ORT's idle workers spin for a while after each run: between segments that steals the
        # core a compiled kernel is about to use.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    options.log_severity_level = 3
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


# the planner's split kernels -> the layout a convolution runs in (``SparseConv2d``); "serial" is unsplit
SPLIT_KERNELS = {"parallel": "auto", "parallel_packed": "packed"}


def build_steps(graph: Graph, ops: Sequence[SparseOp], chosen: Mapping[str, str], threads: int, *, spinning: bool = False, split: int | None = None) -> list:
    """Steps that run the whole graph: the ``chosen`` ops (name -> serial | parallel |
    parallel_packed, a convolution split in ``SparseConv2d``'s packed layout) as kernels,
    cheap ops between kernels natively, every other node in ONNX Runtime segments (``threads``
    intra-op threads, 0: its default). A parallel kernel splits over ``split`` threads (default
    ``threads``)."""
    split = threads if split is None else split
    by_name = {op.name: op for op in ops if op.name in chosen}
    claimed: dict[int, SparseOp] = {}
    for op in by_name.values():
        for n in op.nodes:
            claimed[n] = op
    last_node = {op.name: max(op.nodes) for op in by_name.values()}
    native_values = set(graph.input_names)
    pending: list[int] = []
    plan: list[tuple[str, object]] = []  # ("ort", [node indices]) | ("op", SparseOp) | ("simple", index)
    for i, node in enumerate(graph.nodes):
        if i in claimed:
            op = claimed[i]
            if i == last_node[op.name]:
                if pending:
                    plan.append(("ort", pending))
                    pending = []
                plan.append(("op", op))
                native_values.add(op.y)
            continue
        if SimpleStep.supports(graph, i) and node.input[0] in native_values and not pending:
            plan.append(("simple", i))
            native_values.update(node.output)
            continue
        pending.append(i)
    if pending:
        plan.append(("ort", pending))
    # which values each ORT segment must hand on: used by any later step or a graph output
    needed_after: list[set[str]] = []
    later: set[str] = set(graph.output_names)
    for kind, item in reversed(plan):
        needed_after.append(set(later))
        later |= _step_inputs(graph, kind, item)
    needed_after.reverse()
    steps: list = []
    for (kind, item), needed in zip(plan, needed_after):
        if kind == "op":
            kernel = chosen[item.name]
            parts = split if kernel in SPLIT_KERNELS and split > 1 else 1
            if item.kind == "linear" and steps and isinstance(steps[-1], LinearChainStep) and _chains(steps[-1], item, graph):
                previous = steps[-1]
                steps[-1] = LinearChainStep(previous.ops + [item], max(parts, previous.parts))
                steps[-1].inputs, steps[-1].flatten = previous.inputs, previous.flatten
                continue
            step = LinearChainStep([item], parts) if item.kind == "linear" else ConvStep(item, parts, SPLIT_KERNELS[kernel] if parts > 1 else "auto")
            if isinstance(step, LinearChainStep) and steps and isinstance(steps[-1], SimpleStep) and len(graph.consumers.get(steps[-1].outputs[0], [])) == 1 and steps[-1].outputs[0] not in graph.output_names and step.absorb_flatten(steps[-1]):
                steps.pop()
            steps.append(step)
        elif kind == "simple":
            steps.append(SimpleStep(graph, item))
        else:
            produced = [o for i in item for o in graph.nodes[i].output]
            internal = set(produced)
            inputs = sorted({name for i in item for name in graph.nodes[i].input if name and name not in internal and name not in graph.arrays})
            outputs = [o for o in produced if o in needed]
            session = ort_session(subgraph_model(graph, item, inputs, outputs), threads, spinning=spinning)
            steps.append(OrtStep(session, inputs, outputs, [graph.nodes[i].name for i in item]))
    _link_feeds(steps)
    return steps


def _link_feeds(steps: list) -> None:
    """Let each convolution kernel write its output straight into the input buffer of a
    convolution kernel that reads it (``SparseConv2d.feeds``); of several readers (a ResNet
    block's output goes to the next block's 3x3 convolution and to its 1x1 downsample) the one
    with the largest kernel, whose buffer (a copy per column shift) costs the most to fill."""
    producers = {step.outputs[0]: step.conv for step in steps if isinstance(step, ConvStep)}
    readers: dict[str, list] = {}
    for step in steps:
        if isinstance(step, ConvStep) and step.inputs[0] in producers:
            readers.setdefault(step.inputs[0], []).append(step.conv)
    for name, convs in readers.items():
        producer = producers[name]
        consumer = max(convs, key=lambda conv: conv.kh * conv.kw)
        if consumer.in_channels == producer.out_channels:
            producer.feeds = consumer


def _chains(previous: LinearChainStep, op: SparseOp, graph: Graph) -> bool:
    """``op`` can join the chain if it reads the chain's output and nothing else reads that."""
    return op.x == previous.outputs[0] and op.weight.shape[1] == previous.out_features and len(graph.consumers.get(op.x, [])) == 1 and op.x not in graph.output_names


def _step_inputs(graph: Graph, kind: str, item) -> set[str]:
    if kind == "op":
        return {item.x} | ({item.residual} if item.residual else set())
    indices = [item] if kind == "simple" else item
    return {name for i in indices for name in graph.nodes[i].input if name and name not in graph.arrays}


class GraphRunner:
    """Runs a graph as steps; ``run_feeds`` is the named-input entry point."""

    def __init__(self, graph: Graph, steps: list, mode: str):
        self.graph, self.steps, self.mode = graph, steps, mode
        self.input_names, self.output_names = graph.input_names, graph.output_names

    def run_feeds(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        env = dict(feeds)
        for step in self.steps:
            step(env)
        return [env[name] for name in self.output_names]

    run = run_feeds  # the Runner protocol's name

    def describe(self) -> list[dict]:
        out = []
        for step in self.steps:
            kind = {LinearChainStep: "sparse linear chain", ConvStep: "sparse conv", SimpleStep: "native", OrtStep: "onnxruntime"}[type(step)]
            out.append({"step": kind, "nodes": list(step.names), **({"threads": step.parts} if hasattr(step, "parts") else {}), **({"layout": step.conv.layout} if isinstance(step, ConvStep) and step.conv.layout != "auto" else {})})
        return out
