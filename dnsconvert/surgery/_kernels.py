"""Compiled (numba) passes for the sparsifier's per-step fold and DNS's magnitude mask update.

Why: on LeNet-300-100 a whole training step takes ~0.9 ms on one thread, while the torch
version of a mask update of its 235k-weight layer took ~1 ms (the dense weight, |W|, a boolean
gather, ~10 elementwise passes) plus 5.8 ms for ``torch.kthvalue`` — more than six training
steps. These kernels do the same arithmetic in one pass over the layer plus work proportional
to the kept and near-threshold weights, and give bitwise-identical masks: every value they
produce is either copied, negated to its absolute value, compared, or a float32 sum whose
other operand is an exact product by 0 or 1 (``tests/test_surgery.py`` checks it against a
frozen copy of the torch version).

All arrays are flat views of contiguous CPU tensors: ``p`` the parameter (W⊙T), ``shadow`` the
dense weights W, ``keep``/``cut`` the float masks T and 1−T, ``mask`` the boolean T.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Single-threaded on purpose, like csr_kernels: numba's thread pool would fight PyTorch's for
# the same cores, and these passes take tens of microseconds.


@njit(cache=True, nogil=True)
def fold_(p, shadow, keep, bound):  # pragma: no cover - compiled
    """W ← p + W·(1−T) (where cut: W + Δ; where kept: p), then p ← p·T.

    The torch version is ``shadow.addcmul_(p, cut); p.mul_(keep)``: the same sums (W + Δ where
    cut), and the kept entries of the shadow, never read through a cut mask there, are W here.
    Returns (NaNs in W, entries with |W| >= bound): counting in the same vectorised pass is free.
    """
    n_nan = 0
    n_over = 0
    for i in range(p.shape[0]):
        k = keep[i]
        w = p[i]
        folded = w + shadow[i] * (np.float32(1.0) - k)
        shadow[i] = folded
        p[i] = w * k
        n_nan += folded != folded
        n_over += abs(folded) >= bound
    return n_nan, n_over


@njit(cache=True, nogil=True)
def mask_(p, mask):  # pragma: no cover - compiled
    """p ← p·T for fixed masks (``p.mul_(keep)``), reading the boolean mask."""
    for i in range(p.shape[0]):
        p[i] = p[i] * np.float32(mask[i])


@njit(cache=True, nogil=True)
def collect(shadow, bound, candidates, candidate_scores, kept, n_kept, kept_scores):  # pragma: no cover - compiled
    """The entries with |W| >= ``bound`` (candidates, in index order) and their scores, and the
    scores of the kept entries listed in ``kept``. ``candidates`` must hold one more entry than
    there are candidates (``fold_`` counted them). Returns the number of candidates.

    A branch-free compaction (store, advance by the condition) that never writes past index
    ``count``: ~0.05 ms for 235k weights.
    """
    n = 0
    for i in range(shadow.shape[0]):
        candidates[n] = i
        n += abs(shadow[i]) >= bound
    for j in range(n):
        candidate_scores[j] = abs(shadow[candidates[j]])
    for j in range(n_kept):
        kept_scores[j] = abs(shadow[kept[j]])
    return n


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
def apply_thresholds(p, shadow, keep, cut, mask, candidates, candidate_scores, n_candidates, kept, kept_scores, n_kept, cut_at, splice_at):  # pragma: no cover - compiled
    """DNS's rule where it can change anything: a kept weight stays if |W| > a, a cut one comes
    back if |W| > b; cut weights that are not candidates are below the bound ≤ b and stay cut.

    Cut candidates are decided first, on the masks as they were (the spliced ones are listed,
    in index order, at the front of ``candidates``), kept ones then from their own list, so no
    entry is decided twice; the kept list is updated in place (room for n_kept + splices).
    Returns (cuts, splices, new n_kept).
    """
    splices = 0
    for j in range(n_candidates):
        r = candidates[j]
        if (candidate_scores[j] > splice_at) & (not mask[r]):  # rarely true: no short-circuit branch
            candidates[splices] = r
            splices += 1
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
        stays = kept_scores[j] > cut_at
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
