"""Compiled CSR kernels for sparse Linear layers on CPU (numba), in a [features, tokens] layout.

Activations are kept as [features, tokens] so that each nonzero weight updates one contiguous
row of tokens (an axpy the compiler vectorises); at one token a row is a gather dot product.
A whole chain of sparse Linear layers with their activations runs in one compiled call.

Code-generation facts these kernels depend on (measured with ``inspect_asm`` on this machine):
- a row is read through a view (``x[c]``) or a slice, never ``x[o + j]``: numba's negative-index
  wrap-around turns computed indices into gathers (0.6 -> 25 GMAC/s for a 3k-long axpy); for
  short rows views cost less than slices (LeNet-300-100's first layer at 64 tokens: 22 -> 10 us);
- eight nonzeros per pass over the output row (accumulator loads/stores amortised: one per
  nonzero gave 25-40, four 50-59, eight 54-63 GMAC/s on one core for 784-3248-long rows); rows
  of up to ``register_tiles.TILE_MAX`` tokens are accumulated in registers instead (the axpy
  passes pay ~19 cycles per nonzero on short rows, see ``register_tiles``);
- ``error_model="numpy"``: with Python's error model a float division checks for zero and the
  loop is not vectorised (GELU over 393k values: 0.8 ms -> 0.065 ms).
Parallel variants split output rows (or channels) over threads in one ``prange`` kernel on
numba's TBB pool (a fork/join of ~5 us here); where TBB is missing, over the calling thread and a
persistent Python worker (:func:`run_split`, ~60 us a split), the compiled kernels releasing the
GIL. Never numba's OpenMP layer (a second OpenMP runtime beside torch's: see
``timing.use_numba_threading_layer``). A split still costs something, so the planner times serial
and parallel kernels and keeps the faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit, prange

from ..timing import fast_fork_join, use_numba_threading_layer
from .register_tiles import LANES, TILE_MAX, tile_rows

use_numba_threading_layer()

ACTIVATIONS = {"identity": 0, "relu": 1, "gelu": 2, "tanh": 3, "sigmoid": 4}
F32 = np.float32
JIT = {"cache": True, "fastmath": True, "error_model": "numpy", "nogil": True}


@njit(inline="always", **JIT)
def _erf(a):
    # Rational approximation of erf on [-4, 4] (the one Eigen and TensorFlow use for float32);
    # |error| < 1e-6 after GELU, and it vectorises where math.erf (a libm call) does not.
    x = a if a < F32(4.0) else F32(4.0)
    x = x if x > F32(-4.0) else F32(-4.0)
    x2 = x * x
    p = x2 * F32(-2.72614225801306e-10) + F32(2.77068142495902e-08)
    p = x2 * p + F32(-2.10102402082508e-06)
    p = x2 * p + F32(-5.69250639462346e-05)
    p = x2 * p + F32(-7.34990630326855e-04)
    p = x2 * p + F32(-2.95459980854025e-03)
    p = x2 * p + F32(-1.60960333262415e-02)
    q = x2 * F32(-1.45660718464996e-05) + F32(-2.13374055278905e-04)
    q = x2 * q + F32(-1.68282697438203e-03)
    q = x2 * q + F32(-7.37332916720468e-03)
    q = x2 * q + F32(-1.42647390514189e-02)
    return x * p / q


@njit(inline="always", **JIT)
def activate(v, act):
    if act == 1:
        return v if v > F32(0.0) else F32(0.0)
    if act == 2:
        return F32(0.5) * v * (F32(1.0) + _erf(v * F32(0.7071067811865476)))
    if act == 3:
        return F32(math.tanh(v))
    if act == 4:
        return F32(1.0) / (F32(1.0) + F32(math.exp(-v)))
    return v


@njit(inline="always", **JIT)
def activate_row(row, act):
    if act == 1:
        for t in range(row.shape[0]):
            v = row[t]
            row[t] = v if v > F32(0.0) else F32(0.0)
    elif act == 2:
        for t in range(row.shape[0]):
            v = row[t]
            row[t] = F32(0.5) * v * (F32(1.0) + _erf(v * F32(0.7071067811865476)))
    elif act != 0:
        for t in range(row.shape[0]):
            row[t] = activate(row[t], act)


@njit(inline="always", **JIT)
def axpy_rows(acc, src, indices, data, start, stop, stride, shift):
    """acc += sum over k in [start, stop) of data[k] * src[o : o + len(acc)], o = indices[k] * stride + shift.

    Eight nonzeros per pass: the accumulator is loaded and stored once per eight products."""
    n = acc.shape[0]
    k = start
    while k + 8 <= stop:
        w0, w1, w2, w3 = data[k], data[k + 1], data[k + 2], data[k + 3]
        w4, w5, w6, w7 = data[k + 4], data[k + 5], data[k + 6], data[k + 7]
        o0, o1, o2, o3 = indices[k] * stride + shift, indices[k + 1] * stride + shift, indices[k + 2] * stride + shift, indices[k + 3] * stride + shift
        o4, o5, o6, o7 = indices[k + 4] * stride + shift, indices[k + 5] * stride + shift, indices[k + 6] * stride + shift, indices[k + 7] * stride + shift
        s0, s1, s2, s3 = src[o0 : o0 + n], src[o1 : o1 + n], src[o2 : o2 + n], src[o3 : o3 + n]
        s4, s5, s6, s7 = src[o4 : o4 + n], src[o5 : o5 + n], src[o6 : o6 + n], src[o7 : o7 + n]
        for t in range(n):
            acc[t] += (w0 * s0[t] + w1 * s1[t] + w2 * s2[t] + w3 * s3[t]) + (w4 * s4[t] + w5 * s5[t] + w6 * s6[t] + w7 * s7[t])
        k += 8
    while k + 2 <= stop:
        w0, w1 = data[k], data[k + 1]
        o0, o1 = indices[k] * stride + shift, indices[k + 1] * stride + shift
        s0, s1 = src[o0 : o0 + n], src[o1 : o1 + n]
        for t in range(n):
            acc[t] += w0 * s0[t] + w1 * s1[t]
        k += 2
    if k < stop:
        w = data[k]
        o = indices[k] * stride + shift
        s = src[o : o + n]
        for t in range(n):
            acc[t] += w * s[t]


@njit(**JIT)
def _linear_rows(indptr, indices, data, bias, x_t, out_t, act, r_lo, r_hi, first, last):
    """Rows [r_lo, r_hi) of one column block: ``first`` starts the rows at the bias, ``last``
    applies the activation (a layer's blocks run first to last into the same output)."""
    tokens = x_t.shape[1]
    if tokens == 1:
        # [features, 1] is C-contiguous here (the callers' arrays are): as a 1-D contiguous
        # vector each gather is one load; the column view x_t[:, 0] is strided, a multiply per
        # gather (LeNet-300-100's first layer: 2.9 -> 2.5 us)
        x = x_t.reshape(x_t.shape[0])
        y = out_t.reshape(out_t.shape[0])
        for r in range(r_lo, r_hi):
            # four accumulators: one would serialise on the add latency
            a0, a1, a2, a3 = F32(0.0), F32(0.0), F32(0.0), F32(0.0)
            k, stop = indptr[r], indptr[r + 1]
            while k + 4 <= stop:
                a0 += data[k] * x[indices[k]]
                a1 += data[k + 1] * x[indices[k + 1]]
                a2 += data[k + 2] * x[indices[k + 2]]
                a3 += data[k + 3] * x[indices[k + 3]]
                k += 4
            while k < stop:
                a0 += data[k] * x[indices[k]]
                k += 1
            v = ((a0 + a1) + (a2 + a3)) + (bias[r] if first else y[r])
            y[r] = activate(v, act) if last else v
        return
    # Up to TILE_MAX tokens, the whole multiple of LANES is accumulated in registers (see
    # register_tiles: 1.3x at 128 tokens, 1.75x at 64); the rest (all of a longer row) by the
    # same eight-way pass as axpy_rows, written out here and through row views: calling a
    # helper per row (even with inline="always") and slicing doubled the time of short rows.
    tiled = tokens // LANES * LANES if tokens <= TILE_MAX else 0
    x_flat = x_t.reshape(x_t.size)
    for r in range(r_lo, r_hi):
        acc = out_t[r]
        if first:
            b = bias[r]
            for t in range(tokens):
                acc[t] = b
        k, stop = indptr[r], indptr[r + 1]
        if tiled:
            tile_rows(acc, x_flat, indices, data, k, stop, tokens, 0, tiled)
            if tiled == tokens:
                k = stop
        while k + 8 <= stop:
            w0, w1, w2, w3 = data[k], data[k + 1], data[k + 2], data[k + 3]
            w4, w5, w6, w7 = data[k + 4], data[k + 5], data[k + 6], data[k + 7]
            s0, s1, s2, s3 = x_t[indices[k]], x_t[indices[k + 1]], x_t[indices[k + 2]], x_t[indices[k + 3]]
            s4, s5, s6, s7 = x_t[indices[k + 4]], x_t[indices[k + 5]], x_t[indices[k + 6]], x_t[indices[k + 7]]
            for t in range(tiled, tokens):
                acc[t] += (w0 * s0[t] + w1 * s1[t] + w2 * s2[t] + w3 * s3[t]) + (w4 * s4[t] + w5 * s5[t] + w6 * s6[t] + w7 * s7[t])
            k += 8
        while k + 2 <= stop:
            w0, w1 = data[k], data[k + 1]
            s0, s1 = x_t[indices[k]], x_t[indices[k + 1]]
            for t in range(tiled, tokens):
                acc[t] += w0 * s0[t] + w1 * s1[t]
            k += 2
        if k < stop:
            w = data[k]
            s = x_t[indices[k]]
            for t in range(tiled, tokens):
                acc[t] += w * s[t]
        if not last:
            continue
        if act == 1:
            for t in range(tokens):
                v = acc[t]
                acc[t] = v if v > F32(0.0) else F32(0.0)
        elif act != 0:
            activate_row(acc, act)


# A chain's column blocks, one row of ``blocks`` each: where its CSR row pointers, nonzeros and
# bias lie in the packed arrays, its activation, and whether it opens / closes its layer. Five
# arrays per call instead of eleven: numba's dispatch checks every argument's type, ~0.1 us an
# array, which at one token is a fifth of LeNet-300-100's whole chain.
_IP_LO, _IP_HI, _NZ_LO, _NZ_HI, _BIAS, _ACT, _EDGES = range(7)
_FIRST, _LAST = 1, 2


@njit(inline="always", **JIT)
def _block_rows(blocks, b, indptr, indices, values, h, out, lo, hi):
    ip = indptr[blocks[b, _IP_LO] : blocks[b, _IP_HI]]
    nz_lo, nz_hi, bias_at = blocks[b, _NZ_LO], blocks[b, _NZ_HI], blocks[b, _BIAS]
    edges = blocks[b, _EDGES]
    rows = ip.shape[0] - 1
    _linear_rows(ip, indices[nz_lo:nz_hi], values[nz_lo:nz_hi], values[bias_at : bias_at + rows], h, out, blocks[b, _ACT], lo, hi, (edges & _FIRST) != 0, (edges & _LAST) != 0)


@njit(**JIT)
def chain_serial(x_t, blocks, indptr, indices, values):
    """Several CSR layers back to back in one call. The arrays of all layers' column blocks are
    packed (see ``blocks``); a block belongs to the layer its first flag opens and its last closes."""
    h = x_t
    out = h
    for b in range(blocks.shape[0]):
        if blocks[b, _EDGES] & _FIRST:
            out = np.empty((blocks[b, _IP_HI] - blocks[b, _IP_LO] - 1, h.shape[1]), dtype=np.float32)
        rows = out.shape[0]
        _block_rows(blocks, b, indptr, indices, values, h, out, 0, rows)
        if blocks[b, _EDGES] & _LAST:
            h = out
    return h


@njit(**JIT)
def layer_rows(h, out, blocks, indptr, indices, values, first_block, last_block, lo, hi):
    """Rows [lo, hi) of one layer (column blocks first_block..last_block): one thread's share."""
    for b in range(first_block, last_block + 1):
        _block_rows(blocks, b, indptr, indices, values, h, out, lo, hi)


@njit(parallel=True, **JIT)
def layer_rows_parallel(h, out, blocks, indptr, indices, values, first_block, last_block, bounds):
    """``layer_rows`` for every share of rows at once, on numba's (TBB) pool."""
    for p in prange(bounds.shape[0] - 1):
        layer_rows(h, out, blocks, indptr, indices, values, first_block, last_block, bounds[p], bounds[p + 1])


_POOL: list = []  # one ThreadPoolExecutor, grown on demand


def run_split(fn, shares: list[tuple]) -> None:
    """``fn(*share)`` for every share at once: the first in this thread, the others on a
    persistent pool. The kernels release the GIL (``nogil``), so the shares really run in parallel.

    The fallback where TBB is missing (see ``timing.use_numba_threading_layer``): a Python worker
    woken through a futex costs ~60 us a split here, numba's workqueue pool 0.1-0.3 ms, and its
    OpenMP pool would be a second OpenMP runtime beside torch's."""
    from concurrent.futures import ThreadPoolExecutor

    if len(shares) == 1:
        fn(*shares[0])
        return
    if not _POOL or _POOL[0]._max_workers < len(shares) - 1:
        if _POOL:
            _POOL.pop().shutdown(wait=False)
        _POOL.append(ThreadPoolExecutor(max_workers=len(shares) - 1, thread_name_prefix="dnsconvert-kernel"))
    futures = [_POOL[0].submit(fn, *share) for share in shares[1:]]
    try:
        fn(*shares[0])
    finally:
        for future in futures:
            future.result()


def split_bounds(weights: np.ndarray, parts: int) -> np.ndarray:
    """``parts`` + 1 boundaries cutting rows 0..len(weights) into runs of about equal total weight."""
    cumulative = np.concatenate([[0], np.cumsum(weights)])
    bounds = np.searchsorted(cumulative, np.linspace(0, cumulative[-1], parts + 1)).astype(np.int64)
    bounds[0], bounds[-1] = 0, len(weights)
    return np.minimum(bounds, len(weights))


@dataclass(frozen=True)
class CsrLayer:
    """One sparse Linear layer y = act(W x + b) in CSR form."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    bias: np.ndarray
    activation: str
    in_features: int

    @classmethod
    def from_dense(cls, weight: np.ndarray, bias: np.ndarray | None, activation: str = "identity") -> CsrLayer:
        rows, cols = np.nonzero(weight)  # row-major order: CSR order
        b = bias if bias is not None else np.zeros(weight.shape[0], dtype=np.float32)
        return cls(_indptr_of(rows, weight.shape[0]), cols, weight[rows, cols], np.asarray(b).reshape(-1), activation, int(weight.shape[1]))

    @property
    def out_features(self) -> int:
        return int(self.indptr.size - 1)


def _indptr_of(row_of: np.ndarray, rows: int) -> np.ndarray:
    """CSR row pointers of nonzeros listed in row order, given the row of each."""
    return _indptr_of_lengths(np.bincount(row_of, minlength=rows))


def _indptr_of_lengths(lengths: np.ndarray) -> np.ndarray:
    """CSR row pointers of rows with these numbers of nonzeros."""
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _row_of(indptr: np.ndarray) -> np.ndarray:
    """The row of each nonzero of a CSR matrix."""
    return np.repeat(np.arange(indptr.size - 1), np.diff(indptr))


COLUMN_BLOCK = 1024  # input features per pass: at 128 tokens a block of activations is 512 KiB, inside L2


def _column_blocks(layer: CsrLayer) -> list[tuple]:
    """A layer's CSR split by input-feature blocks of ``COLUMN_BLOCK``: (indptr, indices, data, first, last).

    Rows read random input rows; when the whole input ([features, tokens]) is larger than L2
    every nonzero misses (FFN 3072 -> 768 on 128 tokens: 1.5 MiB of input, 19 GMAC/s against 30
    for the 768 -> 3072 layer). Blocks keep each pass's inputs in L2."""
    starts = list(range(0, max(layer.in_features, 1), COLUMN_BLOCK))
    if len(starts) == 1:
        return [(layer.indptr.astype(np.int64), layer.indices, layer.data, True, True)]
    row_of = _row_of(layer.indptr)
    out = []
    for n, lo in enumerate(starts):
        keep = (layer.indices >= lo) & (layer.indices < lo + COLUMN_BLOCK)
        out.append((_indptr_of(row_of[keep], layer.out_features), layer.indices[keep], layer.data[keep], n == 0, n == len(starts) - 1))
    return out


def fold_constant_rows(layers: list[CsrLayer]) -> list[CsrLayer]:
    """Drop the rows without a nonzero from every layer but the last, folding their outputs into
    the next layer's bias.

    A row with no nonzero is a neuron whose inputs were all pruned: it outputs act(bias) whatever
    the input, so its share of the next layer is a constant. DNS leaves many: the LeNet-300-100
    checkpoint's first layer has 210 such rows of 300, its second 68 of 100, and each still cost
    a pass (at one token about a third of the chain's time). The last layer keeps every row:
    its rows are the chain's output. The constants are what the kernel computed for those rows
    (its own activation, in float32); the folded bias is summed in float64 (it differs from the
    dense sum only in rounding)."""
    out = list(layers)
    for i in range(len(out) - 1):
        layer, nxt = out[i], out[i + 1]
        lengths = np.diff(layer.indptr)
        dead = lengths == 0
        if not dead.any():
            continue
        outputs = np.ascontiguousarray(layer.bias[dead], dtype=np.float32)
        activate_row(outputs, ACTIVATIONS[layer.activation])
        constant = np.zeros(layer.out_features, dtype=np.float64)
        constant[dead] = outputs
        alive = ~dead
        # the next layer: the nonzeros reading a dead row go into its bias, the others are renumbered
        row_of = _row_of(nxt.indptr)
        from_dead = dead[nxt.indices]
        bias = nxt.bias.astype(np.float64)
        np.add.at(bias, row_of[from_dead], nxt.data[from_dead].astype(np.float64) * constant[nxt.indices[from_dead]])
        keep = ~from_dead
        renumber = np.cumsum(alive) - 1
        out[i + 1] = CsrLayer(_indptr_of(row_of[keep], nxt.out_features), renumber[nxt.indices[keep]], nxt.data[keep], bias.astype(np.float32), nxt.activation, int(alive.sum()))
        out[i] = CsrLayer(_indptr_of_lengths(lengths[alive]), layer.indices, layer.data, layer.bias[alive], layer.activation, layer.in_features)
    return out


class CsrChain:
    """Consecutive sparse Linear layers (each with its activation) compiled as one kernel call."""

    def __init__(self, layers: list[CsrLayer], parts: int = 1):
        for prev, nxt in zip(layers, layers[1:]):
            if prev.out_features != nxt.in_features:
                raise ValueError(f"chained layers do not fit: {prev.out_features} outputs feed {nxt.in_features} inputs")
        self.in_features, self.out_features = layers[0].in_features, layers[-1].out_features
        folded = fold_constant_rows(layers)
        self.folded_rows = sum(a.out_features - b.out_features for a, b in zip(layers, folded))
        layers = folded
        # the input features the first layer reads (None: all of them); see rows_major
        used = np.unique(layers[0].indices)
        self.read_features = used.astype(np.int64) if used.size < 0.9 * self.in_features else None
        per_layer = [_column_blocks(layer) for layer in layers]
        blocks = [block for layer_blocks in per_layer for block in layer_blocks]
        # 32-bit column indices halve the index traffic; unsigned, so indexing needs no wrap-around
        self.indptr = np.concatenate([ip for ip, *_ in blocks]).astype(np.int64)
        self.indices = np.concatenate([ix.astype(np.uint32) for _, ix, *_ in blocks])
        data = [d.astype(np.float32) for _, _, d, *_ in blocks]
        biases = [layer.bias.astype(np.float32) for layer, layer_blocks in zip(layers, per_layer) for _ in layer_blocks]
        self.values = np.concatenate(data + biases)  # every block's nonzeros, then every block's bias
        table = np.zeros((len(blocks), 7), dtype=np.int64)
        ip_at = nz_at = 0
        bias_at = sum(d.size for d in data)
        acts = [ACTIVATIONS[layer.activation] for layer, layer_blocks in zip(layers, per_layer) for _ in layer_blocks]
        for i, ((ip, ix, _, first, last), bias, act) in enumerate(zip(blocks, biases, acts, strict=True)):
            table[i] = (ip_at, ip_at + ip.size, nz_at, nz_at + ix.size, bias_at, act, (_FIRST if first else 0) | (_LAST if last else 0))
            ip_at, nz_at, bias_at = ip_at + ip.size, nz_at + ix.size, bias_at + bias.size
        self.blocks = table
        self._arrays = (self.blocks, self.indptr, self.indices, self.values)
        # per layer: its column blocks and, for ``parts`` threads, row ranges of about equal nonzeros
        self.groups = []
        start = 0
        for layer, layer_blocks in zip(layers, per_layer):
            stop = start + len(layer_blocks) - 1
            self.groups.append((start, stop, layer.out_features, split_bounds(np.diff(layer.indptr), parts)))
            start = stop + 1
        self.parts = parts

    def __call__(self, x_t: np.ndarray) -> np.ndarray:
        """x_t: [in_features, tokens] float32, C-contiguous -> [out_features, tokens]."""
        if x_t.ndim != 2 or x_t.shape[0] != self.in_features or x_t.dtype != np.float32 or not x_t.flags.c_contiguous:
            raise ValueError(f"expected a C-contiguous float32 [{self.in_features}, tokens] array, got {x_t.dtype} {list(x_t.shape)}")  # the kernels do not bounds-check
        if self.parts == 1 or x_t.shape[1] == 1:
            return chain_serial(x_t, *self._arrays)
        h = x_t
        arrays = self._arrays
        fork_join = fast_fork_join()
        for first, last, rows, bounds in self.groups:
            out = np.empty((rows, h.shape[1]), dtype=np.float32)
            if fork_join:
                layer_rows_parallel(h, out, *arrays, first, last, bounds)
            else:
                run_split(layer_rows, [(h, out, *arrays, first, last, bounds[p], bounds[p + 1]) for p in range(self.parts)])
            h = out
        return h

    def rows_major(self, x: np.ndarray) -> np.ndarray:
        """x: [tokens, in_features] -> [tokens, out_features] (transposes around the chain: faster
        than running token blocks through the chain one at a time, which measured 1.4-5x slower on
        the FFN at 8-64 tokens per block)."""
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"expected [tokens, {self.in_features}] input, got {list(x.shape)}")
        if x.shape[0] == 1:  # one token: [1, F] is [F, 1] in memory; straight to the kernel (LeNet's 7 us path)
            x_t = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 1)
            return chain_serial(x_t, *self._arrays).reshape(1, -1)
        if self.read_features is None:
            x_t = np.ascontiguousarray(x.T, dtype=np.float32)
        else:
            # Only the features the first layer reads are transposed (LeNet-300-100: 442 of 784
            # pixels; 64 tokens: 16 -> 9 us, the transpose being half the call); the other rows
            # of x_t are left unset, as no nonzero refers to them.
            x_t = np.empty((self.in_features, x.shape[0]), dtype=np.float32)
            transpose_rows_of(np.ascontiguousarray(x, dtype=np.float32), self.read_features, x_t)
        return np.ascontiguousarray(self(x_t).T)


@njit(**JIT)
def transpose_rows_of(x, features, x_t):
    """x_t[f, t] = x[t, f] for the listed features f."""
    for j in range(features.shape[0]):
        f = features[j]
        row = x_t[f]
        for t in range(x.shape[0]):
            row[t] = x[t, f]
