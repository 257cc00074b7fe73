"""Direct sparse 2-D convolution on CPU (numba), NCHW, any padding and stride, group 1.

Method: each output channel is a sum over its nonzero weights w(c, kh, kw) of the input plane
c shifted by (kh, kw). With the input zero-padded and flattened row by row (row length Wp), that
shift is a constant offset, so each nonzero is one long contiguous axpy over the whole output
plane (computed at the padded width, the Wp - OW extra columns are dropped in the epilogue).
A stride s is reduced to stride 1 by splitting the padded input into s*s phase planes
(space-to-depth): x[s*i + ph, s*j + pw] is plane (ph, pw) at (i, j), and weight (c, kh, kw)
reads phase (kh % s, kw % s) at offset (kh // s, kw // s). Nothing is gathered at run time and
no im2col matrix (K*K copies of the activation) is built; the cost is one padded copy of the
input (one per column shift in the aligned layout below) and one pass per nonzero over the
output plane.

The images of a batch sit one after another in each channel's buffer, so one axpy covers the
whole batch (an output near an image's bottom edge reads into the next image: those outputs
are among the dropped ones). Small planes (LeNet-5's 8x8 at batch 64) would otherwise pay the
per-nonzero overhead once per image.

Two layouts (``SparseConv2d._layout``), measured on this 2-core AMD EPYC (AVX-512), one core,
random weights at ResNet-18 ERK densities:
- short planes (up to ``register_tiles.TILE_MAX`` floats, rows far from whole vectors: 7x7 with
  its border is 9 floats wide) keep the rows as they are; one output channel at a time is
  accumulated in registers over all of its nonzeros (``register_tiles``). 7x7x512 at 95%:
  0.57 -> 0.36 ms against eight-way axpy passes.
- layers with many nonzeros per output channel (32 or more on average) on long planes, or on
  short ones whose rows are nearly whole vectors, take the aligned layout: rows padded to whole 16-float vectors, and one copy of
  the buffer per column shift (copy q is copy 0 moved left by q floats, made after the fill), so
  that every nonzero's source row starts on a vector boundary (a 64-byte load that straddles two
  cache lines costs two: register tiles ran at ~48 GMAC/s from aligned L1 rows, ~32 from
  unaligned ones). The output is then computed 256 positions at a time, and within those one
  block of input channels at a time for every output channel, so that the block's rows stay in
  L1 while all channels read them (without blocking, a 56x56 plane's rows for 64 channels come
  from L2). 56x56x64 at 58%: 1.95 -> 1.53 ms; 28x28x128 at 79%: 1.02 -> 0.87 ms; 14x14x256 at
  90%: 0.72 -> 0.48 ms. Split over two threads the gain is smaller (56x56: 1.02 -> 0.96 ms), and
  in the spells when this VM's two threads run at half speed together (see the README) the
  split layer takes 2.1 ms against 1.5 ms serial: the planner times both and keeps the faster.

A third layout, packed (the aligned layout's tiles and blocks over unpadded rows in one copy, read
unaligned), is never the automatic choice: the planner times it for every split convolution
(``SparseConv2d``'s docstring: on an Intel Xeon it split 14-24% faster than either layout above).

Epilogue: bias, an optional residual tensor added before the activation (ResNet's
``relu(bn(conv(x)) + identity)``), the activation, and an optional k x k / stride k max pool
(LeNet's conv -> pool) taken from the accumulator, so the unpooled output is never written.
BatchNorm is already folded into the weight by the ONNX exporter. Where the next step is a
convolution kernel reading this output (``SparseConv2d.feeds``), each thread then writes its
finished output channels into that convolution's input buffer (phase planes and shifted
copies) while they are still in its cache, and the next call skips its own fill: before, that
copy ran on one thread ahead of every split (1.0 of ResNet-18 ERK's 11.6 ms; fed, the whole
model ran 1.0-6.5% faster in alternating rounds, more in the slow spells).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import get_num_threads, njit, prange, set_num_threads, set_parallel_chunksize

from ..timing import fast_fork_join
from .csr_kernels import JIT, activate_row, axpy_rows, run_split
from .register_tiles import LANES, TILE_MAX, tile_rows

F32 = np.float32
CHUNK = 4096  # output positions per accumulation pass: 16 KiB of accumulator stays in L1
ALIGNED_MIN_NNZ = 32  # nonzeros per output channel (on average) below which a layer keeps its rows
ALIGN_WASTE = 1.15  # a short plane takes the aligned layout if that widens its rows by at most this
TILE = 256  # output positions per tile of the aligned layout (128-512 measured alike)
PACKED_BLOCK_BYTES = 32 * 1024  # the packed layout's block: the input rows a tile reads, at most this (or 4 channels)
PACKED_BLOCK_MAX = 64
# output-channel chunks per thread, handed out one at a time (numba's chunk size 1 over TBB) rather
# than one fixed half per thread: for seconds at a time one of this VM's two cores runs at about
# half speed (a fixed loop timed on each core in turn: 2.3-2.8 ms on one against 1.3 on the
# other in 3% of a minute's samples), and a fixed split waits for the slow half. ResNet-18 ERK,
# same process, alternating rounds: 12.7-13.0 ms with two chunks per thread against 12.9-13.6
# with one in slow spells, alike (11.2-11.5 ms) outside them; four chunks were slower (11.9 ms)
CHUNKS_PER_THREAD = 2
VECTOR = LANES  # float32 lanes of an AVX-512 register (lengths are whole vectors: register_tiles needs it)


@njit(inline="always", **JIT)
def _fill_channel(x, c, buf, geometry, phases):
    """Channel ``c`` of [N, C, H, W] into its zero-padded phase planes, laid out [C, s, s, N,
    plane]: only the phases some nonzero reads (``phases[ph * stride + pw]``), never the
    borders (they stay zero); then (aligned layout) the channel's stretch of copy 0 into each
    copy q, moved left by q floats (its first q floats go to the end of the previous channel's
    stretch there; copy q has no place for copy 0's very first q). Channels are independent, so
    threads may fill different channels at once. ``geometry``: pad_t, pad_l, stride, plane, ws,
    copies, copy_size."""
    pad_t, pad_l, stride, plane, ws, copies, copy_size = geometry[0], geometry[1], geometry[2], geometry[3], geometry[4], geometry[5], geometry[6]
    images, height, width = x.shape[0], x.shape[2], x.shape[3]
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
    stretch = stride * stride * images * plane
    start = c * stretch
    for q in range(1, copies):
        skip = max(0, q - start)
        dst = buf[q * copy_size + start - q + skip : q * copy_size + start + stretch - q]
        src = buf[start + skip : start + stretch]
        for t in range(stretch - skip):
            dst[t] = src[t]


@njit(inline="always", **JIT)
def _epilogue(acc, out, res, has_res, act, ws, plane, oh, ow, pool, oc):
    """Output channel ``oc`` of every image from its accumulator row: residual, activation, pool."""
    for n in range(out.shape[0]):
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


@njit(inline="always", **JIT)
def _finish(acc, out, res, has_res, act, ws, plane, oh, ow, pool, oc, feed, fbuf, fgeometry, fphases):
    """Channel ``oc``'s epilogue, then (``feed``) the same channel into the next convolution's
    input buffer while its rows are still in this core's cache (``SparseConv2d.feeds``)."""
    _epilogue(acc, out, res, has_res, act, ws, plane, oh, ow, pool, oc)
    if feed:
        _fill_channel(out, oc, fbuf, fgeometry, fphases)


@njit(**JIT)
def _conv_channels(buf, ptr, off, val, bias, out, res, has_res, act, ws, plane, oh, ow, pool, acc, oc_lo, oc_hi, feed, fbuf, fgeometry, fphases):
    """Output channels [oc_lo, oc_hi) of all images, one at a time in the row ``acc``."""
    length = acc.shape[0]
    for oc in range(oc_lo, oc_hi):
        b = bias[oc]
        for j in range(length):
            acc[j] = b
        if length <= TILE_MAX:  # a short plane: accumulated in registers (register_tiles)
            tile_rows(acc, buf, off, val, ptr[oc], ptr[oc + 1], 1, 0, length)
        else:
            for j0 in range(0, length, CHUNK):
                axpy_rows(acc[j0 : min(length, j0 + CHUNK)], buf, off, val, ptr[oc], ptr[oc + 1], 1, j0)
        _finish(acc, out, res, has_res, act, ws, plane, oh, ow, pool, oc, feed, fbuf, fgeometry, fphases)


@njit(**JIT)
def _conv_blocked(buf, bptr, off, val, bias, out, res, has_res, act, ws, plane, oh, ow, pool, accs, length, oc_lo, oc_hi, feed, fbuf, fgeometry, fphases):
    """Output channels [oc_lo, oc_hi) of a long plane (the aligned layout, see ``SparseConv2d``):
    TILE output positions at a time, and within them one block of input channels at a time for
    every output channel (``bptr[oc, b]``..``bptr[oc, b + 1]``: oc's nonzeros in block b), so
    that the block's input rows stay in L1 while all output channels read them; each channel
    accumulates in its own row of ``accs``."""
    for oc in range(oc_lo, oc_hi):
        b = bias[oc]
        row = accs[oc]
        for j in range(length):
            row[j] = b
    for j0 in range(0, length, TILE):
        n = min(TILE, length - j0)
        for block in range(bptr.shape[1] - 1):
            for oc in range(oc_lo, oc_hi):
                lo, hi = bptr[oc, block], bptr[oc, block + 1]
                if lo < hi:
                    tile_rows(accs[oc, j0:], buf, off, val, lo, hi, 1, j0, n)
    for oc in range(oc_lo, oc_hi):
        _finish(accs[oc], out, res, has_res, act, ws, plane, oh, ow, pool, oc, feed, fbuf, fgeometry, fphases)


@njit(**JIT)
def _fill(x, buf, geometry, phases):
    """Every channel of ``x`` into the buffer (``_fill_channel``)."""
    for c in range(x.shape[1]):
        _fill_channel(x, c, buf, geometry, phases)


@njit(**JIT)
def channels(buf, accs, geometry, ptr, bptr, off, val, bias, out, res, has_res, act, oh, ow, pool, part, oc_lo, oc_hi, feed, fbuf, fgeometry, fphases):
    """Output channels [oc_lo, oc_hi): all of a serial convolution, or one thread's share of a
    parallel one. ``geometry``: as ``_fill_channel``'s, then the accumulated length."""
    plane, ws, copies, length = geometry[3], geometry[4], geometry[5], geometry[7]
    if copies:
        _conv_blocked(buf, bptr, off, val, bias, out, res, has_res, act, ws, plane, oh, ow, pool, accs, length, oc_lo, oc_hi, feed, fbuf, fgeometry, fphases)
    else:
        _conv_channels(buf, ptr, off, val, bias, out, res, has_res, act, ws, plane, oh, ow, pool, accs[part, :length], oc_lo, oc_hi, feed, fbuf, fgeometry, fphases)


@njit(**JIT)
def conv_serial(x, own_fill, buf, accs, geometry, phases, ptr, bptr, off, val, bias, res, has_res, act, oh, ow, pool, out, feed, fbuf, fgeometry, fphases):
    """The whole convolution on this thread: the input into the buffer (unless ``own_fill`` is off:
    the previous convolution put it there), every output channel, and (``feed``) its output
    into the next convolution's buffer."""
    if own_fill:
        _fill(x, buf, geometry, phases)
    channels(buf, accs, geometry, ptr, bptr, off, val, bias, out, res, has_res, act, oh, ow, pool, 0, 0, out.shape[1], feed, fbuf, fgeometry, fphases)
    return out


@njit(**JIT)
def fill(x, buf, geometry, phases):
    _fill(x, buf, geometry, phases)


@njit(parallel=True, **JIT)
def conv_parallel(x, own_fill, buf, accs, geometry, phases, ptr, bptr, off, val, bias, res, has_res, act, oh, ow, pool, out, feed, fbuf, fgeometry, fphases, bounds):
    """``conv_serial`` with the output channels split at ``bounds`` over numba's (TBB) pool;
    share p accumulates in ``accs[p, :length]`` (short planes) or in its channels' rows, and
    feeds its own channels to the next convolution."""
    if own_fill:
        _fill(x, buf, geometry, phases)
    for p in prange(bounds.shape[0] - 1):
        channels(buf, accs, geometry, ptr, bptr, off, val, bias, out, res, has_res, act, oh, ow, pool, p, bounds[p], bounds[p + 1], feed, fbuf, fgeometry, fphases)
    return out


class _Layout(NamedTuple):
    """One input size's buffers. ``copies`` 0: the short-plane layout (one buffer, rows of the
    padded width, one accumulator row per thread); else the aligned layout: rows padded to whole
    vectors, ``copies`` copies of the buffer (``copy_size`` floats apart), copy q shifted left by
    q columns so that every nonzero reads aligned vectors, one accumulator row per output channel."""

    offsets: np.ndarray
    buf: np.ndarray
    accs: np.ndarray
    length: int
    plane: int
    ws: int
    oh: int
    ow: int
    copies: int
    copy_size: int
    bptr: np.ndarray
    geometry: np.ndarray  # what the kernels read: pad_t, pad_l, stride, plane, ws, copies, copy_size, length


def _whole_vectors(count: int) -> int:
    """``count`` floats rounded up to whole vectors."""
    return -(-count // VECTOR) * VECTOR


def _aligned_zeros(count: int) -> np.ndarray:
    """Zeros starting on a 64-byte boundary (numpy only promises 16)."""
    raw = np.zeros(count + VECTOR, dtype=np.float32)
    skip = (-raw.ctypes.data // 4) % VECTOR
    return raw[skip : skip + count]


class SparseConv2d:
    """One sparse convolution (+ bias, residual, activation, max pool) on float32 NCHW arrays.
    ``layout``: "auto" (rows or aligned, see ``_new_layout``), "rows" / "aligned" to force one, or
    "packed": the aligned layout's tiles and input-channel blocks over the rows as they are (no
    padding to whole vectors) in a single copy of the input, each nonzero reading its row at its
    column shift (unaligned loads), blocks as large as fit ``PACKED_BLOCK_BYTES``. Never chosen by
    "auto": the planner times it as the kernel "parallel_packed". Why: on an Intel Xeon (AVX-512,
    48 KiB L1; the machine this project's CI now runs on) the split aligned layout lost to it
    everywhere in ResNet-18 ERK (the other core fetches the copies from the one that wrote them:
    28x28x128 at 79% 0.47 against 0.58 ms, 56x56x64 at 58% 0.87 against 1.05), and so did the
    split rows layout on 7x7 planes (512 channels at 95%: 0.22 against 0.28 ms: one block's rows
    stay in L1 for every output channel), while on one core the aligned copies kept their lead at
    56x56 (1.38 against 1.57 ms)."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None, *, stride: int, pads: tuple[int, int, int, int], activation: int = 0, parts: int = 1, pool: int = 0, layout: str = "auto"):
        self.out_channels, self.in_channels, self.kh, self.kw = weight.shape
        self.layout = layout
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
        self.bounds = self._bounds(self.parts)
        self.chunk_bounds = self._bounds(self.parts * CHUNKS_PER_THREAD) if self.parts > 1 else self.bounds
        self._geometry: dict[tuple[int, int, int], _Layout] = {}
        self._no_res = np.zeros((1, 1, 1, 1), dtype=np.float32)
        self._no_feed, self._no_geometry = np.zeros(1, dtype=np.float32), np.zeros(8, dtype=np.int64)
        # ``feeds``: the convolution that reads this one's output next (set by the graph's steps):
        # each thread writes its output channels into that one's input buffer right after their
        # epilogue, while the rows are in its cache, instead of the next call copying the whole
        # input on one thread before it splits (ResNet-18 ERK: skipping that copy where a kernel
        # could feed it saved 1.0 of 11.6 ms; feeding it back costs part of that)
        # The fed array must not be changed in place before the next convolution reads it.
        self._feeds: SparseConv2d | None = None
        self._filled_from: np.ndarray | None = None  # the array whose contents ``feeds`` put in the buffer

    @property
    def feeds(self) -> SparseConv2d | None:
        return self._feeds

    @feeds.setter
    def feeds(self, consumer: SparseConv2d | None) -> None:
        # the kernels write the consumer's buffer without bounds checks, while other threads read this one's
        if consumer is not None and (consumer is self or consumer.in_channels != self.out_channels):
            raise ValueError(f"a convolution with {self.out_channels} output channels cannot feed {'itself' if consumer is self else f'one with {consumer.in_channels} input channels'}")
        self._feeds = consumer

    def _bounds(self, shares: int) -> np.ndarray:
        """Output channels cut into ``shares`` runs of about equal nonzeros."""
        bounds = np.searchsorted(self.ptr, np.linspace(0, self.nnz, shares + 1)).astype(np.int64)
        bounds[0], bounds[-1] = 0, self.out_channels
        return np.minimum(bounds, self.out_channels)

    def conv_hw(self, height: int, width: int) -> tuple[int, int]:
        top, left, bottom, right = self.pads
        return (height + top + bottom - self.kh) // self.stride + 1, (width + left + right - self.kw) // self.stride + 1

    def fits(self, height: int, width: int) -> bool:
        """Whether an input of this size leaves at least one output (and one pool window)."""
        return min(self.conv_hw(height, width)) >= max(1, self.pool)

    def output_hw(self, height: int, width: int) -> tuple[int, int]:
        oh, ow = self.conv_hw(height, width)
        return (oh // self.pool, ow // self.pool) if self.pool else (oh, ow)

    def _layout(self, images: int, height: int, width: int) -> _Layout:
        """Offsets and buffers for one input size (built once per size)."""
        key = (images, height, width)
        if key not in self._geometry:
            self._geometry[key] = self._new_layout(images, height, width)
        return self._geometry[key]

    def _new_layout(self, images: int, height: int, width: int) -> _Layout:
        s = self.stride
        top, left, bottom, right = self.pads
        hp, wp = height + top + bottom, width + left + right
        oh, ow = self.conv_hw(height, width)
        hs, ws = -(-hp // s), -(-wp // s)
        c, kh, kw = self._coords

        def length_at(ws: int) -> int:
            # a whole number of 16-float vectors: the compiled passes never run a scalar remainder
            # (a 7x7 plane at padded width 9 is 63 floats: 3 vectors + 15 scalars); the last
            # image's rows below oh are not needed
            return _whole_vectors((images - 1) * hs * ws + oh * ws)

        length = length_at(ws)
        # The aligned layout pays a copy of the input per column shift and, per tile, a load and
        # store of every output channel's accumulator: worth it where each output channel has
        # many nonzeros (ResNet-18 at 58-95%: 58-244; LeNet-5's DNS convolutions, 3 and 13,
        # ran 1.2-1.3x slower in it at batch 64), on long planes, and on short ones whose rows
        # are (nearly) whole vectors already (14x14 with its border: 16 floats; a 7x7 plane's
        # 9-float rows would nearly double, and stay with one channel at a time in registers).
        aligned = self.nnz >= ALIGNED_MIN_NNZ * self.out_channels and (length > TILE_MAX or _whole_vectors(ws) <= ALIGN_WASTE * ws)
        blocked = {"auto": aligned, "rows": False, "aligned": True, "packed": True}[self.layout]
        packed = self.layout == "packed"
        copies = (1 if packed else (self.kw - 1) // s + 1) if blocked else 0
        if copies and not packed:  # the aligned layout: rows of whole vectors, one copy per column shift
            ws = _whole_vectors(ws)
            length = length_at(ws)
        plane = hs * ws  # one image's phase plane; images follow one another
        offsets = ((c * s + kh % s) * s + kw % s) * (images * plane) + (kh // s) * ws
        slack = ((self.kh - 1) // s + 1) * ws + VECTOR  # dropped outputs read past the last plane
        size = self.in_channels * s * s * images * plane + slack
        if copies:
            size = _whole_vectors(size + VECTOR)  # copy q reads copy 0 up to q floats on
            offsets = offsets + (kw // s if packed else (kw // s) * size)
            buf = _aligned_zeros(copies * size)
            # each output channel's row, TILE positions at a time, reads one block of input
            # channels (rows of (TILE + 2 * ws) floats per channel, phase and copy) from L1:
            # blocks of 8 channels at 56x56 and of 16 at 28x28 and 14x14 were the fastest
            block = self._packed_block(length, ws) if packed else 8 if ws >= 48 else 16
            blocks = -(-self.in_channels // block)
            keys = np.repeat(np.arange(self.out_channels), np.diff(self.ptr)) * blocks + c // block
            bptr = np.searchsorted(keys, np.arange(self.out_channels * blocks + 1)).astype(np.int64)
            bptr = np.stack([bptr[o * blocks : o * blocks + blocks + 1] for o in range(self.out_channels)])
            accs = _aligned_zeros(self.out_channels * length).reshape(self.out_channels, length)
        else:
            offsets = offsets + kw // s
            buf = np.zeros(size, dtype=np.float32)
            bptr = np.zeros((1, 1), dtype=np.int64)
            # each thread's accumulator on cache lines of its own: rows packed end to end shared a
            # line at each boundary, rewritten by both cores at every pass (a 14x14 layer split
            # over two threads ran 0.90 ms against 0.72 ms on one)
            accs = np.empty((len(self.chunk_bounds) - 1, length + VECTOR), dtype=np.float32)  # length is whole vectors
        copy_size = size if copies else 0
        geometry = np.array([top, left, s, plane, ws, copies, copy_size, length], dtype=np.int64)
        return _Layout(offsets.astype(np.int64), buf, accs, length, plane, ws, oh, ow, copies, copy_size, bptr, geometry)

    def _packed_block(self, length: int, ws: int) -> int:
        """Input channels per block of the packed layout: the largest power of two (4 to
        ``PACKED_BLOCK_MAX``) whose rows for one tile (every phase read, the tile plus the kernel's
        reach below it, and a vector of slack) fit ``PACKED_BLOCK_BYTES``: 64 at 7x7 (98 floats a
        channel), 16 at 28x28 and 56x56 (332 and 388), the fastest in a sweep over 8-128 on an
        Intel Xeon; 4 for a 3x3 stride-2 convolution of a 56x56 plane (four phases read: 1.6k
        floats), there still 13-16% faster split than the aligned layout."""
        floats = int(self.phases.sum()) * (min(TILE, length) + ((self.kh - 1) // self.stride) * ws + VECTOR)
        block = 4
        while block * 2 <= PACKED_BLOCK_MAX and block * 2 * floats * 4 <= PACKED_BLOCK_BYTES:
            block *= 2
        return block

    def __call__(self, x: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected [batch, {self.in_channels}, height, width] input, got {list(x.shape)}")  # the kernels do not bounds-check
        if not self.fits(x.shape[2], x.shape[3]):
            raise ValueError(f"input {x.shape[2]}x{x.shape[3]} is smaller than the {self.kh}x{self.kw} kernel")
        # the previous convolution wrote this very array into the buffer already (``feeds``)
        filled, self._filled_from = self._filled_from is x, None
        if x.shape[0] == 0:  # an empty batch: an empty output, as ONNX Runtime gives (the layout needs an image)
            return np.empty((0, self.out_channels, *self.output_hw(x.shape[2], x.shape[3])), dtype=np.float32)
        x = np.ascontiguousarray(x, dtype=np.float32)
        has_res = residual is not None
        if has_res and (self.pool or residual.shape != (x.shape[0], self.out_channels, *self.conv_hw(x.shape[2], x.shape[3]))):
            raise ValueError(f"residual of shape {list(residual.shape)} does not match the convolution's output")
        g = self._layout(*x.shape[:1], *x.shape[2:])
        out = np.empty((x.shape[0], self.out_channels, *self.output_hw(x.shape[2], x.shape[3])), dtype=np.float32)
        res = np.ascontiguousarray(residual, dtype=np.float32) if has_res else self._no_res
        consumer = self._feeds
        if consumer is not None and not consumer.fits(out.shape[2], out.shape[3]):
            consumer = None  # too small for it: it will say so when called
        if consumer is not None:
            consumer._filled_from = None  # its buffer is about to change
            f = consumer._layout(out.shape[0], out.shape[2], out.shape[3])
            feed = (True, f.buf, f.geometry, consumer.phases)
        else:
            feed = (False, self._no_feed, self._no_geometry, self.phases)
        kernel = (g.buf, g.accs, g.geometry, self.phases, self.ptr, g.bptr, g.offsets, self.values, self.bias, res, has_res, self.activation, g.oh, g.ow, self.pool, out, *feed)
        if self.parts > 1 and fast_fork_join():  # output channels split over threads, in blocks of about equal nonzeros
            # chunks handed out one at a time (see CHUNKS_PER_THREAD), to no more threads than the
            # split was planned for (numba's own count may be every core: a runner loaded without one)
            threads = get_num_threads()
            wanted = min(self.parts, threads)
            previous = set_parallel_chunksize(1)
            if threads != wanted:
                set_num_threads(wanted)
            try:
                conv_parallel(x, not filled, *kernel, self.chunk_bounds)
            finally:
                set_parallel_chunksize(previous)
                if threads != wanted:
                    set_num_threads(threads)
        elif self.parts > 1:
            if not filled:
                fill(x, g.buf, g.geometry, self.phases)
            shared = (g.buf, g.accs, g.geometry, self.ptr, g.bptr, g.offsets, self.values, self.bias, out, res, has_res, self.activation, g.oh, g.ow, self.pool)
            run_split(channels, [(*shared, p, self.bounds[p], self.bounds[p + 1], *feed) for p in range(self.parts)])
        else:
            conv_serial(x, not filled, *kernel)
        if consumer is not None:
            consumer._filled_from = out
        return out
