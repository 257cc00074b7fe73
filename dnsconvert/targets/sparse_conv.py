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

Epilogue: bias, an optional residual tensor added before the activation (ResNet's
``relu(bn(conv(x)) + identity)``), the activation. BatchNorm is already folded into the weight
by the ONNX exporter. Also here: max pooling, which sits between sparse convolutions in LeNets.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .csr_kernels import JIT, activate_row, axpy_rows

F32 = np.float32


@njit(**JIT)
def _fill_phases(image, buf, pad_t, pad_l, stride, plane, ws, phases):
    """Copy one [C, H, W] image into its zero-padded phase planes; only the phases some nonzero
    reads (``phases[ph * stride + pw]``), and never the borders, which stay zero."""
    channels, height, width = image.shape
    for c in range(channels):
        for ph in range(stride):
            for pw in range(stride):
                if not phases[ph * stride + pw]:
                    continue
                base = ((c * stride + ph) * stride + pw) * plane
                # rows i of this phase hold padded row s*i + ph, i.e. image row s*i + ph - pad_t
                i0 = max(0, -((ph - pad_t) // stride))
                j0 = max(0, -((pw - pad_l) // stride))
                for i in range(i0, plane // ws):
                    y = stride * i + ph - pad_t
                    if y >= height:
                        break
                    row = image[c, y]
                    dst = buf[base + i * ws : base + (i + 1) * ws]
                    x0 = stride * j0 + pw - pad_l
                    count = min(ws - j0, (width - x0 + stride - 1) // stride)
                    if stride == 1:
                        part, src = dst[j0 : j0 + count], row[x0 : x0 + count]
                        for t in range(count):
                            part[t] = src[t]
                    else:
                        for t in range(count):
                            dst[j0 + t] = row[x0 + t * stride]


CHUNK = 4096  # output positions per accumulation pass: 16 KiB of accumulator stays in L1


@njit(**JIT)
def _conv_channels(buf, ptr, off, val, bias, out, res, has_res, act, ws, acc, oc_lo, oc_hi):
    oh, ow = out.shape[1], out.shape[2]
    length = acc.shape[0]
    for oc in range(oc_lo, oc_hi):
        b = bias[oc]
        for j in range(length):
            acc[j] = b
        for j0 in range(0, length, CHUNK):
            axpy_rows(acc[j0 : min(length, j0 + CHUNK)], buf, off, val, ptr[oc], ptr[oc + 1], 1, j0)
        for oy in range(oh):
            src = acc[oy * ws : oy * ws + ow]
            dst = out[oc, oy]
            if has_res:
                r = res[oc, oy]
                for ox in range(ow):
                    dst[ox] = src[ox] + r[ox]
            else:
                for ox in range(ow):
                    dst[ox] = src[ox]
            activate_row(dst, act)  # one loop per activation: a per-element switch is not vectorised


@njit(**JIT)
def conv_serial(x, buf, acc, ptr, off, val, bias, res, has_res, act, pad_t, pad_l, stride, plane, ws, phases, out):
    for n in range(x.shape[0]):
        _fill_phases(x[n], buf, pad_t, pad_l, stride, plane, ws, phases)
        _conv_channels(buf, ptr, off, val, bias, out[n], res[n if has_res else 0], has_res, act, ws, acc, 0, out.shape[1])
    return out


@njit(parallel=True, cache=True, fastmath=True, error_model="numpy")
def conv_parallel(x, bufs, accs, ptr, off, val, bias, res, has_res, act, pad_t, pad_l, stride, plane, ws, phases, out, bounds):
    """Images split over threads when there are enough, else each image's channels (by nonzeros)."""
    parts = bufs.shape[0]
    if x.shape[0] >= parts:
        for p in prange(parts):
            for n in range(p, x.shape[0], parts):
                _fill_phases(x[n], bufs[p], pad_t, pad_l, stride, plane, ws, phases)
                _conv_channels(bufs[p], ptr, off, val, bias, out[n], res[n if has_res else 0], has_res, act, ws, accs[p], 0, out.shape[1])
        return out
    for n in range(x.shape[0]):
        _fill_phases(x[n], bufs[0], pad_t, pad_l, stride, plane, ws, phases)
        for p in prange(parts):
            _conv_channels(bufs[0], ptr, off, val, bias, out[n], res[n if has_res else 0], has_res, act, ws, accs[p], bounds[p], bounds[p + 1])
    return out


class SparseConv2d:
    """One sparse convolution (+ bias, residual, activation) on float32 NCHW arrays."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, *, stride: int, pads: tuple[int, int, int, int], activation: int = 0, parts: int = 1):
        self.out_channels, self.in_channels, self.kh, self.kw = weight.shape
        self.stride, self.pads, self.activation, self.parts = int(stride), tuple(int(p) for p in pads), int(activation), int(parts)
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
        self._geometry: dict[tuple[int, int], tuple] = {}
        self._no_res = np.zeros((1, 1, 1, 1), dtype=np.float32)

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        top, left, bottom, right = self.pads
        return (height + top + bottom - self.kh) // self.stride + 1, (width + left + right - self.kw) // self.stride + 1

    def _layout(self, height: int, width: int) -> tuple:
        """Offsets and buffers for one input size (built once per size)."""
        key = (height, width)
        if key not in self._geometry:
            s = self.stride
            top, left, bottom, right = self.pads
            hp, wp = height + top + bottom, width + left + right
            oh, ow = self.output_hw(height, width)
            hs, ws = -(-hp // s), -(-wp // s)
            rows = max(hs, oh + (self.kh - 1) // s) + 1  # slack: the last axpy may run past the plane
            plane = rows * ws
            c, kh, kw = self._coords
            offsets = ((c * s + kh % s) * s + kw % s) * plane + (kh // s) * ws + kw // s
            size = self.in_channels * s * s * plane
            bufs = np.zeros((self.parts, size), dtype=np.float32)
            accs = np.empty((self.parts, oh * ws), dtype=np.float32)
            bounds = np.searchsorted(self.ptr, np.linspace(0, self.nnz, self.parts + 1)).astype(np.int64)
            bounds[0], bounds[-1] = 0, self.out_channels
            self._geometry[key] = (offsets.astype(np.int64), bufs, accs, plane, ws, oh, ow, np.minimum(bounds, self.out_channels))
        return self._geometry[key]

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected [batch, {self.in_channels}, height, width] input, got {list(x.shape)}")  # the kernels do not bounds-check
        if min(self.output_hw(x.shape[2], x.shape[3])) < 1:
            raise ValueError(f"input {x.shape[2]}x{x.shape[3]} is smaller than the {self.kh}x{self.kw} kernel")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if residual is not None and residual.shape != (x.shape[0], self.out_channels, *self.output_hw(x.shape[2], x.shape[3])):
            raise ValueError(f"residual of shape {list(residual.shape)} does not match the convolution's output")
        offsets, bufs, accs, plane, ws, oh, ow, bounds = self._layout(x.shape[2], x.shape[3])
        out = np.empty((x.shape[0], self.out_channels, oh, ow), dtype=np.float32)
        has_res = residual is not None
        res = np.ascontiguousarray(residual, dtype=np.float32) if has_res else self._no_res
        top, left = self.pads[0], self.pads[1]
        if self.parts > 1:
            return conv_parallel(x, bufs, accs, self.ptr, offsets, self.values, self.bias, res, has_res, self.activation, top, left, self.stride, plane, ws, self.phases, out, bounds)
        return conv_serial(x, bufs[0], accs[0], self.ptr, offsets, self.values, self.bias, res, has_res, self.activation, top, left, self.stride, plane, ws, self.phases, out)


@njit(**JIT)
def max_pool2d(x, kh, kw, sh, sw, pad_t, pad_l, oh, ow):
    """Max pooling over NCHW (padding never wins: it is -inf, as ONNX MaxPool defines)."""
    n_, c_, height, width = x.shape
    out = np.empty((n_, c_, oh, ow), dtype=x.dtype)
    for n in range(n_):
        for c in range(c_):
            plane = x[n, c]
            for oy in range(oh):
                y0 = oy * sh - pad_t
                for ox in range(ow):
                    x0 = ox * sw - pad_l
                    best = -np.inf
                    for dy in range(kh):
                        y = y0 + dy
                        if 0 <= y < height:
                            for dx in range(kw):
                                xx = x0 + dx
                                if 0 <= xx < width:
                                    v = plane[y, xx]
                                    best = v if v > best else best
                    out[n, c, oy, ox] = best
    return out

