"""Compiled CSR kernels for sparse Linear layers on CPU (numba), in a [features, batch] layout.

Why not only torch's CSR ops: each ``torch.sparse.mm`` call costs 8-17 µs of dispatch on this
2-core machine — more than ONNX Runtime needs for the whole dense LeNet-300-100 at batch 1 —
so small, very sparse models got slower, not faster. These kernels run a whole chain of
sparse Linear layers and element-wise activations in one compiled call, with activations kept
as [features, batch] so that each nonzero weight updates one contiguous batch row.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2, "tanh": 3, "sigmoid": 4}
# Single-threaded on purpose: numba's threaded kernels cost 0.1-8 ms per call here (its OpenMP
# layer fights PyTorch's and ONNX Runtime's spinning workers for 2 cores; its workqueue layer
# starts slowly), more than these kernels take. Large layers where threads pay off are planned
# onto torch's multi-threaded MKL CSR kernel instead.


@njit(cache=True, inline="always")
def _activate(v: float, act: int) -> float:
    if act == 1:
        return v if v > 0.0 else 0.0
    if act == 2:
        return 0.5 * v * (1.0 + math.erf(v * 0.7071067811865476))
    if act == 3:
        return math.tanh(v)
    if act == 4:
        return 1.0 / (1.0 + math.exp(-v))
    return v


@njit(cache=True, inline="always")
def _row(indptr, indices, data, bias, x, out, act, r, bias_at):
    batch = x.shape[1]
    start, stop = indptr[r], indptr[r + 1]
    if batch == 1:  # a dot product: no per-nonzero row views
        acc = bias[bias_at]
        for k in range(start, stop):
            acc += data[k] * x[indices[k], 0]
        out[r, 0] = _activate(acc, act) if act != 0 else acc
        return
    acc = out[r]  # contiguous batch row; each nonzero adds a scaled contiguous input row
    for b in range(batch):
        acc[b] = bias[bias_at]
    for k in range(start, stop):
        w = data[k]
        src = x[indices[k]]
        for b in range(batch):
            acc[b] += w * src[b]
    if act != 0:
        for b in range(batch):
            acc[b] = _activate(acc[b], act)


@njit(cache=True)
def csr_chain_serial(x, indptr, indices, data, bias, ip_off, nz_off, b_off, acts):
    """Several CSR layers back to back in one call (arrays of all layers concatenated)."""
    h = x
    for i in range(acts.shape[0]):
        ip = indptr[ip_off[i] : ip_off[i + 1]]
        lo, hi = nz_off[i], nz_off[i + 1]
        rows = ip.shape[0] - 1
        out = np.empty((rows, h.shape[1]), dtype=h.dtype)
        for r in range(rows):
            _row(ip, indices[lo:hi], data[lo:hi], bias, h, out, acts[i], r, b_off[i] + r)
        h = out
    return h


class CsrChain:
    """Consecutive sparse Linear layers (+ activations) compiled as one kernel call."""

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]]):
        # each layer: (indptr, indices, data, bias, activation)
        # int32 indices halve the index traffic of the gather loop (nonzeros per layer < 2^31)
        parts = [(ip.astype(np.int64), ix.astype(np.int32), d.astype(np.float32), b.astype(np.float32), ACTIVATIONS[a]) for ip, ix, d, b, a in layers]
        self.indptr = np.concatenate([ip for ip, *_ in parts])
        self.indices = np.concatenate([ix for _, ix, *_ in parts])
        self.data = np.concatenate([d for _, _, d, _, _ in parts])
        self.bias = np.concatenate([b for *_, b, _ in parts])
        self.ip_off = np.cumsum([0] + [ip.size for ip, *_ in parts]).astype(np.int64)
        self.nz_off = np.cumsum([0] + [ix.size for _, ix, *_ in parts]).astype(np.int64)
        self.b_off = np.cumsum([0] + [b.size for *_, b, _ in parts]).astype(np.int64)
        self.acts = np.array([a for *_, a in parts], dtype=np.int64)

    def __call__(self, x_t: np.ndarray) -> np.ndarray:
        """x_t: [in_features, batch] float32, C-contiguous."""
        return csr_chain_serial(x_t, self.indptr, self.indices, self.data, self.bias, self.ip_off, self.nz_off, self.b_off, self.acts)
