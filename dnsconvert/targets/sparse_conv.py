"""Direct sparse 2-D convolution on CPU (numba), NCHW, any padding and stride, group 1.

Method: each output channel is a sum over its nonzero weights w(c, kh, kw) of the input plane
c shifted by (kh, kw). With the input zero-padded and flattened row by row (row length Wp), that
shift is a constant offset, so each nonzero is one long contiguous axpy over the whole output
plane (computed at the padded width, the Wp - OW extra columns are dropped in the epilogue).
A stride s is reduced to stride 1 by splitting the padded input into s*s phase planes
(space-to-depth): x[s*i + ph, s*j + pw] is plane (ph, pw) at (i, j), and weight (c, kh, kw)
reads phase (kh % s, kw % s) at offset (kh // s, kw // s). Nothing is gathered at run time and
no im2col matrix (K*K copies of the activation) is built; the cost is one padded copy of the
input and one pass per nonzero over the output plane (which stays in L1/L2).

The images of a batch sit one after another in each channel's buffer, so one axpy covers the
whole batch (an output near an image's bottom edge reads into the next image: those outputs
are among the dropped ones). Small planes (LeNet-5's 8x8 at batch 64) would otherwise pay the
per-nonzero overhead once per image.

Epilogue: bias, an optional residual tensor added before the activation (ResNet's
``relu(bn(conv(x)) + identity)``), the activation, and an optional k x k / stride k max pool
(LeNet's conv -> pool) taken from the accumulator, so the unpooled output is never written.
BatchNorm is already folded into the weight by the ONNX exporter.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..timing import fast_fork_join
from .csr_kernels import JIT, activate_row, axpy_rows, run_split

F32 = np.float32
CHUNK = 4096  # output positions per accumulation pass: 16 KiB of accumulator stays in L1
VECTOR = 16  # float32 lanes of an AVX-512 register


@njit(**JIT)
def _fill_phases(x, buf, pad_t, pad_l, stride, plane, ws, phases):
    """Copy [N, C, H, W] into zero-padded phase planes laid out [C, s, s, N, plane]; only the
    phases some nonzero reads (``phases[ph * stride + pw]``), never the borders (they stay zero)."""
    images, channels, height, width = x.shape
    for c in range(channels):
        for ph in range(stride):
            for pw in range(stride):
                if not phases[ph * stride + pw]:
                    continue
                i0 = max(0, -((ph - pad_t) // stride))  # first phase row that holds an image row
                j0 = max(0, -((pw - pad_l) // stride))
                x0 = stride * j0 + pw - pad_l
                count = min(ws - j0, (width - x0 + stride - 1) // stride)
                for n in range(images):
                    base = (((c * stride + ph) * stride + pw) * images + n) * plane
                    for i in range(i0, plane // ws):
                        y = stride * i + ph - pad_t
                        if y >= height:
                            break
                        row = x[n, c, y]
                        dst = buf[base + i * ws + j0 : base + i * ws + j0 + count]
                        if stride == 1:
                            src = row[x0 : x0 + count]
                            for t in range(count):
                                dst[t] = src[t]
                        else:
                            for t in range(count):
                                dst[t] = row[x0 + t * stride]


@njit(**JIT)
def _conv_channels(buf, ptr, off, val, bias, out, res, has_res, act, ws, plane, oh, ow, pool, acc, oc_lo, oc_hi):
    """Output channels [oc_lo, oc_hi) of all images: accumulate, then the epilogue per image."""
    images = out.shape[0]
    length = acc.shape[0]
    for oc in range(oc_lo, oc_hi):
        b = bias[oc]
        for j in range(length):
            acc[j] = b
        for j0 in range(0, length, CHUNK):
            axpy_rows(acc[j0 : min(length, j0 + CHUNK)], buf, off, val, ptr[oc], ptr[oc + 1], 1, j0)
        for n in range(images):
            base = n * plane
            if pool > 0:  # max over each pool x pool window, then the (monotonic) activation
                for py in range(out.shape[2]):
                    dst = out[n, oc, py]
                    for px in range(out.shape[3]):
                        start = base + py * pool * ws + px * pool
                        best = acc[start]
                        for dy in range(pool):
                            row = acc[start + dy * ws : start + dy * ws + pool]
                            for dx in range(pool):
                                v = row[dx]
                                best = v if v > best else best
                        dst[px] = best
                    activate_row(dst, act)
                continue
            for oy in range(oh):
                src = acc[base + oy * ws : base + oy * ws + ow]
                dst = out[n, oc, oy]
                if has_res:
                    r = res[n, oc, oy]
                    for ox in range(ow):
                        dst[ox] = src[ox] + r[ox]
                else:
                    for ox in range(ow):
                        dst[ox] = src[ox]
                activate_row(dst, act)  # one loop per activation: a per-element switch is not vectorised


@njit(**JIT)
def conv_serial(x, buf, acc, ptr, off, val, bias, res, has_res, act, pad_t, pad_l, stride, plane, ws, phases, oh, ow, pool, out):
    _fill_phases(x, buf, pad_t, pad_l, stride, plane, ws, phases)
    _conv_channels(buf, ptr, off, val, bias, out, res, has_res, act, ws, plane, oh, ow, pool, acc, 0, out.shape[1])
    return out


@njit(**JIT)
def fill(x, buf, pad_t, pad_l, stride, plane, ws, phases):
    _fill_phases(x, buf, pad_t, pad_l, stride, plane, ws, phases)


@njit(**JIT)
def channels(buf, ptr, off, val, bias, out, res, has_res, act, ws, plane, oh, ow, pool, acc, oc_lo, oc_hi):
    """Output channels [oc_lo, oc_hi): one thread's share of a parallel convolution."""
    _conv_channels(buf, ptr, off, val, bias, out, res, has_res, act, ws, plane, oh, ow, pool, acc, oc_lo, oc_hi)


@njit(parallel=True, **JIT)
def conv_parallel(x, buf, accs, length, ptr, off, val, bias, res, has_res, act, pad_t, pad_l, stride, plane, ws, phases, oh, ow, pool, out, bounds):
    """``conv_serial`` with the output channels split at ``bounds`` over numba's (TBB) pool;
    share p accumulates in ``accs[p, :length]``."""
    _fill_phases(x, buf, pad_t, pad_l, stride, plane, ws, phases)
    for p in prange(bounds.shape[0] - 1):
        _conv_channels(buf, ptr, off, val, bias, out, res, has_res, act, ws, plane, oh, ow, pool, accs[p, :length], bounds[p], bounds[p + 1])
    return out


class SparseConv2d:
    """One sparse convolution (+ bias, residual, activation, max pool) on float32 NCHW arrays."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, *, stride: int, pads: tuple[int, int, int, int], activation: int = 0, parts: int = 1, pool: int = 0):
        self.out_channels, self.in_channels, self.kh, self.kw = weight.shape
        self.stride, self.pads, self.activation, self.parts, self.pool = int(stride), tuple(int(p) for p in pads), int(activation), int(parts), int(pool)
        oc, c, kh, kw = np.nonzero(weight)  # row-major order: grouped by output channel
        self._coords = (c.astype(np.int64), kh.astype(np.int64), kw.astype(np.int64))
        s = self.stride
        self.phases = np.zeros(s * s, dtype=np.bool_)
        self.phases[(kh % s) * s + kw % s] = True
        self.values = weight[oc, c, kh, kw].astype(np.float32)
        self.ptr = np.zeros(self.out_channels + 1, dtype=np.int64)
        np.add.at(self.ptr, oc + 1, 1)
        self.ptr = np.cumsum(self.ptr)
        self.bias = (bias if bias is not None else np.zeros(self.out_channels)).astype(np.float32)
        self.nnz = int(self.values.size)
        bounds = np.searchsorted(self.ptr, np.linspace(0, self.nnz, self.parts + 1)).astype(np.int64)
        bounds[0], bounds[-1] = 0, self.out_channels
        self.bounds = np.minimum(bounds, self.out_channels)
        self._geometry: dict[tuple[int, int, int], tuple] = {}
        self._no_res = np.zeros((1, 1, 1, 1), dtype=np.float32)

    def conv_hw(self, height: int, width: int) -> tuple[int, int]:
        top, left, bottom, right = self.pads
        return (height + top + bottom - self.kh) // self.stride + 1, (width + left + right - self.kw) // self.stride + 1

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        oh, ow = self.conv_hw(height, width)
        return (oh // self.pool, ow // self.pool) if self.pool else (oh, ow)

    def _layout(self, images: int, height: int, width: int) -> tuple:
        """Offsets and buffers for one input size (built once per size)."""
        key = (images, height, width)
        if key not in self._geometry:
            s = self.stride
            top, left, bottom, right = self.pads
            hp, wp = height + top + bottom, width + left + right
            oh, ow = self.conv_hw(height, width)
            hs, ws = -(-hp // s), -(-wp // s)
            plane = hs * ws  # one image's phase plane; images follow one another
            c, kh, kw = self._coords
            offsets = ((c * s + kh % s) * s + kw % s) * (images * plane) + (kh // s) * ws + kw // s
            # a whole number of 16-float vectors: the compiled axpy then never runs its scalar
            # remainder loop (a 7x7 plane at padded width 9 is 63 floats: 3 vectors + 15 scalars)
            length = -(-((images - 1) * plane + oh * ws) // VECTOR) * VECTOR  # the last image's rows below oh are not needed
            slack = ((self.kh - 1) // s + 1) * ws + VECTOR  # dropped outputs read past the last plane
            buf = np.zeros(self.in_channels * s * s * images * plane + slack, dtype=np.float32)
            # each thread's accumulator on cache lines of its own: rows packed end to end shared a
            # line at each boundary, rewritten by both cores at every pass (a 14x14 layer split
            # over two threads ran 0.90 ms against 0.72 ms on one)
            row = -(-length // VECTOR) * VECTOR + VECTOR
            accs = np.empty((self.parts, row), dtype=np.float32)
            self._geometry[key] = (offsets.astype(np.int64), buf, accs, length, plane, ws, oh, ow)
        return self._geometry[key]

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected [batch, {self.in_channels}, height, width] input, got {list(x.shape)}")  # the kernels do not bounds-check
        if min(self.conv_hw(x.shape[2], x.shape[3])) < max(1, self.pool):
            raise ValueError(f"input {x.shape[2]}x{x.shape[3]} is smaller than the {self.kh}x{self.kw} kernel")
        x = np.ascontiguousarray(x, dtype=np.float32)
        has_res = residual is not None
        if has_res and (self.pool or residual.shape != (x.shape[0], self.out_channels, *self.conv_hw(x.shape[2], x.shape[3]))):
            raise ValueError(f"residual of shape {list(residual.shape)} does not match the convolution's output")
        offsets, buf, accs, length, plane, ws, oh, ow = self._layout(*x.shape[:1], *x.shape[2:])
        out = np.empty((x.shape[0], self.out_channels, *self.output_hw(x.shape[2], x.shape[3])), dtype=np.float32)
        res = np.ascontiguousarray(residual, dtype=np.float32) if has_res else self._no_res
        top, left = self.pads[0], self.pads[1]
        if self.parts > 1:  # output channels split over threads, in blocks of about equal nonzeros
            if fast_fork_join():
                return conv_parallel(x, buf, accs, length, self.ptr, offsets, self.values, self.bias, res, has_res, self.activation, top, left, self.stride, plane, ws, self.phases, oh, ow, self.pool, out, self.bounds)

            fill(x, buf, top, left, self.stride, plane, ws, self.phases)
            shared = (buf, self.ptr, offsets, self.values, self.bias, out, res, has_res, self.activation, ws, plane, oh, ow, self.pool)
            run_split(channels, [(*shared, accs[p, :length], self.bounds[p], self.bounds[p + 1]) for p in range(self.parts)])
            return out
        return conv_serial(x, buf, accs[0, :length], self.ptr, offsets, self.values, self.bias, res, has_res, self.activation, top, left, self.stride, plane, ws, self.phases, oh, ow, self.pool, out)
