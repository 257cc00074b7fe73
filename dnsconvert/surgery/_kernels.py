"""Compiled (numba) passes for the sparsifier's per-step fold and DNS's magnitude mask update.

Why: on LeNet-300-100 a whole training step takes ~1 ms on one thread, while the torch
version of a mask update of its 235k-weight layer took ~1 ms (the dense weight, |W|, a boolean
gather, ~10 elementwise passes) plus 5.8 ms for ``torch.kthvalue`` — more than six training
steps. These kernels do the same arithmetic in one pass over the layer (the fold, which also
flags the update's candidates) plus work proportional to the kept and near-threshold weights,
and give bitwise-identical masks: every value they produce is either copied, negated to its
absolute value, compared, a float32 sum whose other operand is an exact product by 0 or 1, or
one of torch's own reductions reproduced operation for operation (``torch_mean_f32``,
``torch_std_f32``, checked against torch before use). ``tests/test_surgery.py`` checks the
masks against a frozen copy of the torch version.

All arrays are flat views of contiguous CPU tensors: ``p`` the parameter (W⊙T), ``shadow`` the
dense weights W, ``keep``/``cut`` the float masks T and 1−T, ``mask`` the boolean T, ``flags``
the fold's marks of weights near the threshold (one byte each, zero-padded to a multiple of 8).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Single-threaded on purpose, like csr_kernels: numba's thread pool would fight PyTorch's for
# the same cores, and these passes take tens of microseconds.


@njit(cache=True, nogil=True)
def fold_(p, shadow, mask):  # pragma: no cover - compiled
    """W ← p + W·(1−T) (where cut: W + Δ; where kept: p), then p ← p·T.

    The torch version is ``shadow.addcmul_(p, cut); p.mul_(keep)``: the same sums (W + Δ where
    cut), and the kept entries of the shadow, never read through a cut mask there, are W here.
    Nothing is counted: this is the pass of every layer at every step, and it vectorises fully.
    """
    for i in range(p.shape[0]):
        k = np.float32(mask[i])  # T read from the 1-byte mask: a quarter of the float mask's traffic
        w = p[i]
        shadow[i] = w + shadow[i] * (np.float32(1.0) - k)
        p[i] = w * k


@njit(cache=True, nogil=True)
def fold_flag_(p, shadow, mask, bound, flags):  # pragma: no cover - compiled
    """``fold_`` for a layer whose mask is updated at this step: also flags the cut entries with
    |W| >= bound (``flags[i]`` = 1, the cut candidates of the update; the kept ones are visited
    from their own list, so flagging them too only lengthens the compaction). Returns whether W
    holds a NaN (the caller then runs the torch update). Nothing is counted: a count kept in the loop
    stops it vectorising and doubled its cost (43 µs vs 23 µs for 235k weights); the NaN test
    is a running max of bytes, which does vectorise."""
    nan_seen = np.uint8(0)
    for i in range(p.shape[0]):
        k = np.float32(mask[i])  # T read from the 1-byte mask: a quarter of the float mask's traffic
        w = p[i]
        folded = w + shadow[i] * (np.float32(1.0) - k)
        shadow[i] = folded
        p[i] = w * k
        a = abs(folded)
        flags[i] = (a >= bound) & (mask[i] == 0)
        nan_seen = max(nan_seen, np.uint8(not a <= np.float32(np.inf)))
    return nan_seen != 0


@njit(cache=True, nogil=True)
def flag_(shadow, mask, bound, flags):  # pragma: no cover - compiled
    """Flags the cut entries with |W| >= bound again (after the fold, the shadow holds W
    everywhere): for an update whose bound proved too high."""
    for i in range(shadow.shape[0]):
        flags[i] = (abs(shadow[i]) >= bound) & (mask[i] == 0)


@njit(cache=True, nogil=True)
def mask_(p, mask):  # pragma: no cover - compiled
    """p ← p·T for fixed masks (``p.mul_(keep)``), reading the boolean mask."""
    for i in range(p.shape[0]):
        p[i] = p[i] * np.float32(mask[i])


@njit(cache=True, nogil=True)
def collect(shadow, flags, candidates, kept, n_kept, scores, bound):  # pragma: no cover - compiled
    """The scores |W| of the kept entries listed in ``kept`` (``scores[:n_kept]``, in that
    order), then the cut entries ``fold_flag_`` flagged (``candidates[:n]``, in index order, their
    scores at ``scores[n_kept:n_kept + n]``). ``flags`` is zero past the layer's end up to a
    multiple of 8. Returns (n, how many kept scores are >= ``bound``); n is −1 when
    ``candidates`` or ``scores`` (of the same length) cannot hold them: a group stores 8 entries
    before it advances, so up to 7 past the last candidate are written.

    The flags are read 8 at a time, and a group with any flag is compacted without branches
    (store, advance by the flag): ~1% of a trained layer's cut weights are candidates, so most
    groups are skipped with one test. About half the time of one branch-free pass.
    """
    kept_above = 0
    for j in range(n_kept):
        s = abs(shadow[kept[j]])
        scores[j] = s
        kept_above += s >= bound
    groups = flags.view(np.uint64)
    last_start = candidates.shape[0] - 8 - n_kept  # a group may start storing at or before this
    n = 0
    for g in range((shadow.shape[0] + 7) // 8):
        if groups[g] != 0:
            if n > last_start:
                return -1, kept_above
            base = g * 8
            for j in range(8):
                candidates[n] = base + j
                n += flags[base + j]
    for j in range(n):
        scores[n_kept + j] = abs(shadow[candidates[j]])
    return n, kept_above


@njit(cache=True, nogil=True)
def kth_largest(values, n, m, guess):  # pragma: no cover - compiled
    """The m-th largest (1-based) of ``values[:n]``, or NaN when it is not within 64 ranks of
    ``guess`` (then the caller selects the usual way).

    The previous update's quantile is a good guess: count the values at or above it
    (vectorised), then keep the few values nearest to it on the side where the answer lies.
    """
    if guess != guess:  # no previous quantile
        return np.float32(np.nan)
    above = 0
    for j in range(n):
        above += values[j] >= guess
    if above >= m:  # the answer is the (above − m + 1)-th smallest of the values >= guess
        d = above - m + 1
        if d > 64:
            return np.float32(np.nan)
        smallest = np.full(d, np.inf, dtype=values.dtype)
        for j in range(n):
            v = values[j]
            if (v >= guess) & (v < smallest[d - 1]):  # rarely true: no short-circuit branch
                k = d - 1
                while k > 0 and smallest[k - 1] > v:
                    smallest[k] = smallest[k - 1]
                    k -= 1
                smallest[k] = v
        return smallest[d - 1]
    d = m - above  # the d-th largest of the values < guess
    if d > 64:
        return np.float32(np.nan)
    largest = np.full(d, -np.inf, dtype=values.dtype)
    for j in range(n):
        v = values[j]
        if (v < guess) & (v > largest[d - 1]):
            k = d - 1
            while k > 0 and largest[k - 1] < v:
                largest[k] = largest[k - 1]
                k -= 1
            largest[k] = v
    return largest[d - 1]


@njit(cache=True, nogil=True)
def kth_largest_select(values, n, m):  # pragma: no cover - compiled
    """The m-th largest (1-based) of ``values[:n]`` (numpy's introselect, on a copy)."""
    return np.partition(values[:n], n - m)[n - m]


@njit(cache=True, nogil=True)
def kth_largest_near(values, n, m, guess):  # pragma: no cover - compiled
    """The m-th largest (1-based) of ``values[:n]``: ``kth_largest`` near ``guess``, or by
    selection when it is not within 64 ranks of it (or there is no guess)."""
    found = kth_largest(values, n, m, guess)
    if found != found:
        found = kth_largest_select(values, n, m)
    return found


@njit(cache=True, nogil=True)
def apply_thresholds(p, shadow, keep, cut, mask, candidates, n_candidates, kept, scores, n_kept, cut_at, splice_at):  # pragma: no cover - compiled
    """DNS's rule where it can change anything: a kept weight stays if |W| > a, a cut one comes
    back if |W| > b; cut weights that are not candidates are below the bound ≤ b and stay cut.
    ``scores`` is laid out as ``collect`` leaves it (kept, then candidates).

    Cut candidates are decided first, on the masks as they were (the spliced ones are listed,
    in index order, at the front of ``candidates``), kept ones then from their own list, so no
    entry is decided twice; the kept list is updated in place (room for n_kept + splices).
    Returns (cuts, splices, new n_kept).
    """
    splices = 0
    for j in range(n_candidates):
        r = candidates[j]
        candidates[splices] = r
        splices += scores[n_kept + j] > splice_at
    for j in range(splices):
        r = candidates[j]
        mask[r] = True
        keep[r] = 1.0
        cut[r] = 0.0
        p[r] = shadow[r]
    survivors = 0
    for j in range(n_kept):
        i = kept[j]
        kept[survivors] = i
        stays = scores[j] > cut_at
        survivors += stays
        if not stays:
            mask[i] = False
            keep[i] = 0.0
            cut[i] = 1.0
            p[i] = p[i] * np.float32(0.0)
    # merge the spliced entries into the survivors from the back, in place
    a = survivors - 1
    b = splices - 1
    for k in range(survivors + splices - 1, -1, -1):
        if b < 0:
            break
        if a >= 0 and kept[a] > candidates[b]:
            kept[k] = kept[a]
            a -= 1
        else:
            kept[k] = candidates[b]
            b -= 1
    return n_kept - survivors, splices, survivors + splices


# -- the calibrated magnitude update in one call ----------------------------------------------
# The torch update takes the mean and std of the kept scores from ``values.mean()`` and
# ``values.std()``; the thresholds depend on their last bits (t = μ + c·σ with c from the
# quantile), so the one-call update reproduces those two torch reductions exactly:
# ``torch_mean_f32`` is ATen's cascade sum of a contiguous float32 row (SumKernel.cpp:
# ``vectorized_inner_sum`` with ``lanes`` floats per vector, 4-way ILP, 4 cascade levels) divided
# by n in float32; ``torch_std_f32`` is ATen's ``std_var_all_cpu`` (two passes, float64). Both
# hold for one thread's reduction (n below ATen's grain size of 32768, or one thread);
# ``exact_stats_lanes`` checks them against torch on this machine before they are used.


@njit(cache=True, nogil=True)
def _ceil_log2(x):  # pragma: no cover - compiled
    if x <= 2:
        return 1
    v = x - 1
    r = 0
    while v > 0:
        v >>= 1
        r += 1
    return r


@njit(cache=True, nogil=True)
def torch_mean_f32(x, n, lanes):  # pragma: no cover - compiled
    """``float(torch.from_numpy(x[:n]).mean())`` for n >= lanes, bit for bit (see above)."""
    vec_numel = n // lanes
    size_ilp = vec_numel // 4
    level_power = max(4, _ceil_log2(size_ilp) // 4)
    level_step = 1 << level_power
    level_mask = level_step - 1
    acc = np.zeros((4, 4, lanes), dtype=np.float32)
    i = 0
    while i + level_step <= size_ilp:
        for _ in range(level_step):
            base = i * 4 * lanes
            for k in range(4):
                for lane in range(lanes):
                    acc[0, k, lane] += x[base + k * lanes + lane]
            i += 1
        for j in range(1, 4):
            for k in range(4):
                for lane in range(lanes):
                    acc[j, k, lane] += acc[j - 1, k, lane]
                    acc[j - 1, k, lane] = np.float32(0.0)
            if (i & (level_mask << (j * level_power))) != 0:
                break
    while i < size_ilp:
        base = i * 4 * lanes
        for k in range(4):
            for lane in range(lanes):
                acc[0, k, lane] += x[base + k * lanes + lane]
        i += 1
    for j in range(1, 4):
        for k in range(4):
            for lane in range(lanes):
                acc[0, k, lane] += acc[j, k, lane]
    partial = acc[0, 0].copy()
    for v in range(size_ilp * 4, vec_numel):
        for lane in range(lanes):
            partial[lane] += x[v * lanes + lane]
    for k in range(1, 4):
        for lane in range(lanes):
            partial[lane] += acc[0, k, lane]
    total = np.float32(0.0)
    for t in range(vec_numel * lanes, n):
        total += x[t]
    for lane in range(lanes):
        total += partial[lane]
    return np.float32(total / np.float32(n))


@njit(cache=True, nogil=True)
def torch_std_f32(x, n, mean):  # pragma: no cover - compiled
    """``float(torch.from_numpy(x[:n]).std())`` (n >= 2) given its float32 ``mean``, bit for bit:
    ATen's ``std_var_all_cpu`` (a full reduction on CPU): the squared deviations from the
    float32 mean summed in float64 in index order, divided by n − 1, square root, to float32."""
    centre = np.float64(mean)
    total = 0.0
    for i in range(n):
        deviation = np.float64(x[i]) - centre
        total += deviation * deviation
    return np.float32(np.sqrt(total / max(0.0, np.float64(n) - 1.0)))


# calibrated_update's outcomes
APPLIED = 0
RUN_TORCH = 1  # the caller must run the torch update (the bound is above the new b)
TOO_FEW = 2  # fewer candidates than weights to keep: flag again with a lower bound, or run torch
NEED_ROOM = 3  # ``candidates`` (n_candidates < 0) or ``kept`` (room for n_kept + n_candidates) too small


@njit(cache=True, nogil=True)
def calibrated_update(p, shadow, keep, cut, mask, bound, flags, candidates, kept, n_kept, scores, to_keep, guess, lanes, cut_factor, splice_factor, band_below, band_above, nonnegative):  # pragma: no cover - compiled
    """DNS's calibrated magnitude update of one layer in one call: ``collect``, the kept scores'
    mean and std (as torch computes them), c from the ``to_keep``-th largest score, the
    thresholds (the same float64 operations as ``DynamicNetworkSurgery.thresholds``), then
    ``apply_thresholds``. Returns (outcome, cuts, splices, new n_kept, mean, std, c, quantile,
    n_reaching): n_reaching counts the scores >= ``bound`` (−1 when ``candidates`` is too small);
    nothing has changed unless the outcome is APPLIED.

    The quantile is taken over every kept score and the cut candidates: when at least
    ``to_keep`` scores reach the bound, the ``to_keep``-th largest of the layer reaches it too,
    and the cut weights left out all lie below it, so it is the layer's own.
    """
    nan = np.float32(np.nan)
    n_candidates, kept_above = collect(shadow, flags, candidates, kept, n_kept, scores, bound)
    if n_candidates < 0:
        return NEED_ROOM, 0, 0, n_kept, 0.0, 0.0, 0.0, nan, -1
    n_reaching = kept_above + n_candidates
    if kept.shape[0] < n_kept + n_candidates:
        return NEED_ROOM, 0, 0, n_kept, 0.0, 0.0, 0.0, nan, n_reaching
    if n_reaching < to_keep:
        return TOO_FEW, 0, 0, n_kept, 0.0, 0.0, 0.0, nan, n_reaching
    mean32 = torch_mean_f32(scores, n_kept, lanes)
    mean = np.float64(mean32)
    std = np.float64(torch_std_f32(scores, n_kept, mean32)) if n_kept > 1 else 0.0
    quantile = kth_largest_near(scores, n_kept + n_candidates, to_keep, guess)
    cut_value = np.float64(quantile)  # c_for_cut
    t = cut_value / cut_factor if cut_value >= 0 else cut_value / splice_factor
    c = (t - mean) / std if std > 0 else 0.0
    t = mean + c * std  # thresholds
    if nonnegative:
        t = max(t, 0.0)
    cut_at = np.float32(t - band_below * abs(t))
    splice_at = np.float32(t + band_above * abs(t))
    if not bound <= splice_at:
        return RUN_TORCH, 0, 0, n_kept, mean, std, c, quantile, n_reaching
    cuts, splices, count = apply_thresholds(p, shadow, keep, cut, mask, candidates, n_candidates, kept, scores, n_kept, cut_at, splice_at)
    return APPLIED, cuts, splices, count, mean, std, c, quantile, n_reaching


# -- the update draws, many iterations at a time ---------------------------------------------
# DNS draws ``torch.rand(layers, generator=torch.Generator().manual_seed(seed))`` with a fresh
# seed per iteration (see ``DynamicNetworkSurgery._fold_bounds``); doing that through torch costs
# 5–30 µs per training step. ATen's CPU generator is MT19937 seeded with the seed's low 32 bits
# (``at::mt19937::init_with_uint32``) and a float32 uniform is the output's low 24 bits · 2^−24
# (``uniform_real_distribution<float>``), so a block of iterations is drawn here at once; the
# caller compares one row per block with torch and uses torch alone if they ever differ.

_MT_N = 624
_MT_M = 397


@njit(cache=True, nogil=True)
def mt19937_uniform(seeds, out):  # pragma: no cover - compiled
    """out[r, k] = the k-th value of torch.rand(out.shape[1]) after manual_seed(seeds[r]);
    out.shape[1] <= 624 - 397 = 227: output k reads state[k + 397], so no second twist of the
    state is needed (dns._MT_MAX_DRAWS)."""
    state = np.empty(_MT_N, dtype=np.uint64)
    mask32 = np.uint64(0xFFFFFFFF)
    for r in range(seeds.shape[0]):
        state[0] = np.uint64(seeds[r]) & mask32
        for j in range(1, _MT_N):
            previous = state[j - 1]
            state[j] = (np.uint64(1812433253) * (previous ^ (previous >> np.uint64(30))) + np.uint64(j)) & mask32
        for k in range(out.shape[1]):
            y = (state[k] & np.uint64(0x80000000)) | (state[k + 1] & np.uint64(0x7FFFFFFF))
            value = state[k + _MT_M] ^ (y >> np.uint64(1))
            if state[k + 1] & np.uint64(1):
                value ^= np.uint64(0x9908B0DF)
            value ^= value >> np.uint64(11)
            value ^= (value << np.uint64(7)) & np.uint64(0x9D2C5680)
            value ^= (value << np.uint64(15)) & np.uint64(0xEFC60000)
            value ^= value >> np.uint64(18)
            out[r, k] = np.float32(value & np.uint64(0xFFFFFF)) * np.float32(1.0 / 16777216.0)
