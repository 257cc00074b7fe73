"""The sparse convolution's layouts on ResNet-18 ERK's layer shapes, one and two threads, interleaved.

    python benchmarks/conv_layouts.py [--budget 0.6] [--no-fill]

For each 3x3 convolution shape of the ResNet-18 shape at its ERK density (90% global; random weights,
batch 1), ``SparseConv2d`` in every layout (rows, aligned, packed: see its docstring) serial and split
over two threads, beside ONNX Runtime running the same single Conv (two threads, not spinning), in the
same interleaved rounds (p50, ms). Each layout's output is checked against torch first. ``--no-fill``:
as when the previous convolution fed the input buffer (``SparseConv2d.feeds``), the call skips its own
fill. Which layout the planner uses is decided per layer by timing at build (``parallel_packed``).

``--split-loads``: what the packed layout's unaligned loads cost, one thread, input in place: each shape
as is, and with every nonzero's offset rounded down to a whole vector (every load aligned; the same
work and access pattern, wrong results: a diagnostic only).
"""

from __future__ import annotations

import argparse

import numpy as np

# (out, in, input side, density, stride): ResNet-18's 3x3 convolutions at ERK densities (cpu_sparse.py)
SHAPES = [(64, 64, 56, 0.423, 1), (128, 64, 56, 0.312, 2), (128, 128, 28, 0.207, 1), (256, 128, 28, 0.154, 2), (256, 256, 14, 0.102, 1), (512, 256, 14, 0.076, 2), (512, 512, 7, 0.051, 1)]
LAYOUTS = ("rows", "aligned", "packed")


def ort_conv(weight: np.ndarray, stride: int):
    from onnx import TensorProto, helper, numpy_helper

    from dnsconvert.targets.sparse_graph import ort_session

    node = helper.make_node("Conv", ["x", "w"], ["y"], strides=[stride] * 2, pads=[1] * 4)
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "w")])
    return ort_session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), 2, spinning=False)


def split_loads(budget: float) -> None:
    from dnsconvert.targets.sparse_conv import VECTOR, SparseConv2d
    from dnsconvert.timing import measure_interleaved

    rng = np.random.default_rng(0)
    print("| shape | density | stride | packed x1 (ms) | every load aligned (ms) |\n|---|---|---|---|---|")
    for out_ch, in_ch, side, density, stride in SHAPES:
        weight = (rng.standard_normal((out_ch, in_ch, 3, 3)) * (rng.random((out_ch, in_ch, 3, 3)) < density)).astype(np.float32)
        x = rng.standard_normal((1, in_ch, side, side)).astype(np.float32)
        calls = {}
        for variant in ("as is", "aligned"):
            conv = SparseConv2d(weight, None, stride=stride, pads=(1, 1, 1, 1), parts=1, layout="packed")
            conv(x)  # builds the layout and fills the buffer
            if variant == "aligned":
                layout = conv._layout(1, side, side)
                layout.offsets[:] = layout.offsets - layout.offsets % VECTOR  # in place: the kernels read this array
            calls[variant] = lambda conv=conv: (setattr(conv, "_filled_from", x), conv(x))
        timed = measure_interleaved(calls, batch=1, rounds=5, iterations=None, time_budget_s=budget, warmup=3)
        print(f"| {out_ch}x{in_ch}x3x3 on {side}x{side} | {density:.1%} | {stride} | {timed.stats('as is').p50_ms:.3f} | {timed.stats('aligned').p50_ms:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.6, help="seconds per variant and shape")
    parser.add_argument("--no-fill", action="store_true", help="skip each call's own input fill (as when fed)")
    parser.add_argument("--split-loads", action="store_true", help="packed, one thread: as is against every load aligned")
    args = parser.parse_args()
    if args.split_loads:
        split_loads(args.budget)
        return
    import torch

    from dnsconvert.targets.sparse_conv import SparseConv2d
    from dnsconvert.timing import measure_interleaved

    rng = np.random.default_rng(0)
    print("| shape | density | stride | " + " | ".join(f"{lay} x{parts}" for lay in LAYOUTS for parts in (1, 2)) + " | ORT x2 |")
    print("|---" * (4 + 2 * len(LAYOUTS)) + "|")
    for out_ch, in_ch, side, density, stride in SHAPES:
        weight = (rng.standard_normal((out_ch, in_ch, 3, 3)) * (rng.random((out_ch, in_ch, 3, 3)) < density)).astype(np.float32)
        x = rng.standard_normal((1, in_ch, side, side)).astype(np.float32)
        expected = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight), stride=stride, padding=1).numpy()
        calls = {}
        for layout in LAYOUTS:
            for parts in (1, 2):
                conv = SparseConv2d(weight, None, stride=stride, pads=(1, 1, 1, 1), parts=parts, layout=layout)
                np.testing.assert_allclose(conv(x), expected, atol=1e-3, rtol=1e-4)
                if args.no_fill:
                    calls[f"{layout} x{parts}"] = lambda conv=conv: (setattr(conv, "_filled_from", x), conv(x))
                else:
                    calls[f"{layout} x{parts}"] = lambda conv=conv: conv(x)
        session = ort_conv(weight, stride)
        calls["ORT x2"] = lambda: session.run(None, {"x": x})
        timed = measure_interleaved(calls, batch=1, rounds=5, iterations=None, time_budget_s=args.budget, warmup=3)
        cells = " | ".join(f"{timed.stats(name).p50_ms:.3f}" for name in calls)
        print(f"| {out_ch}x{in_ch}x3x3 on {side}x{side} | {density:.1%} | {stride} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
