"""A dense fallback that runs ONNX Runtime's dense model in whichever worker setting is faster now.

Why (measured on this 2-core VM, 2 threads, a BERT built by ``transformers`` from a config at
60% DNS, batch 64, which no sparse plan beats): outside this VM's slow spells a session whose
idle workers spin-wait runs a call in 0.90 ms and one whose workers sleep in 1.13; inside a
spell (they last 2-80 s and come every 10-30 s; ``/proc/stat`` shows no steal) 1.58 and 1.45.
The order flips, so a setting fixed when the artifact was built loses 12-25% in one state or the
other, and the benchmark's fastest dense runtime is the other setting then. So the fallback holds
both sessions, now and then runs a few calls on the one it is not using, and switches when that
one's calls are faster by ``SWITCH_GAIN``. Every call's outputs come from the same dense model.

The spinning session spins at most ``SPIN_US`` after a call (``session.intra_op.spin_duration_us``,
ONNX Runtime 1.26 and later: microsoft/onnxruntime#27916): with ONNX Runtime's default its idle
worker spins ~30-40 ms, and a call of the other session right after shares the cores with it
(measured: a non-spinning call after a spinning one 1.81 ms, after one bounded to 200 us 1.13,
the same as after itself). Bounded, a spinning call costs what the default costs within our
noise (0.909 against 0.901 ms). An older ONNX Runtime stores the key without using it, and every
probe would then lean towards spinning: there the fallback keeps the plan's one setting
(:func:`can_follow`). Both sessions keep their own copy of the weights: twice the dense model's
memory (the regimes of one runner share them).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

SPIN_US = 200  # how long the spinning session's idle workers spin after a call
FOLLOW_MIN_MS = 0.2  # below this a call is too short for spinning to matter, and timing each one would show
PROBE_CALLS = 12  # calls per side of a probe; the first of each is not counted (the previous session's workers)
PROBE_EVERY_S, PROBE_EVERY_CALLS = 1.0, 8 * PROBE_CALLS  # probes at most this often (both must have passed) ...
BACKOFF_MAX, CLEAR_GAP = 8, 1.15  # ... doubled, up to 8x, while probes find the other slower by this
CHANGE, CHANGED_CALLS = 0.15, 3  # back to the shortest, and a probe within CHANGE_GAP_S, when this many
CHANGE_GAP_S = 0.25  # calls in a row are off the recent median by CHANGE (the machine changed)
IDLE_S, SETTLE_S = 0.005, 0.05  # after a pause this long, calls are not counted for this long (see run_feeds)
KEPT, WATCH_MIN = 16, 8  # the current session's recent calls kept, and how many before watching them
SWITCH_GAIN = 1.05  # switch when the other session's calls are faster by this
FIRST_VERSION = (1, 26)  # the first ONNX Runtime that bounds spinning (SPIN_US)


def can_follow() -> bool:
    """Whether this ONNX Runtime bounds a session's spinning (see the module docstring)."""
    import onnxruntime

    try:
        return tuple(int(part) for part in onnxruntime.__version__.split(".")[:2]) >= FIRST_VERSION
    except ValueError:  # a version string we cannot read: not known to bound it
        return False


def _medians(probe: Mapping[str, list[float]]) -> tuple[float, list[float]] | None:
    """The other session's median and the current session's on each side that has calls (None
    when either is missing)."""
    theirs = probe.get("other") or []
    mine = [statistics.median(side) for side in (probe.get("before"), probe.get("back")) if side]
    return (statistics.median(theirs), mine) if theirs and mine else None


def other_is_faster(probe: Mapping[str, list[float]]) -> bool:
    """A probe's verdict: the other session's counted calls (median) are faster by ``SWITCH_GAIN``
    than the current session's on *each* side of them (``before``, ``back``) that has calls. Each
    side, not their pool: the calls just before a probe can be slowed by something that has
    passed by the time the probe ends (another session's spinning workers, the start of a
    spell ending), and pooled they made a slower session look faster."""
    medians = _medians(probe)
    return medians is not None and all(medians[0] * SWITCH_GAIN < side for side in medians[1])


def clearly_slower(probe: Mapping[str, list[float]]) -> bool:
    """The other session's counted calls (median) slower than the current's on every side by
    ``CLEAR_GAP``: no need to look again soon (outside this VM's spells the non-spinning session
    is ~25% slower)."""
    medians = _medians(probe)
    return medians is not None and all(side * CLEAR_GAP < medians[0] for side in medians[1])


class FollowFaster:
    """Runs each call on one of two ONNX Runtime sessions of the same model (``sessions``: setting
    name -> session, ``first`` the one to begin with) and follows the faster (module docstring).

    A probe runs ``PROBE_CALLS`` calls on the other session and as many back on the current one,
    and the other must be faster than the current's counted calls on each side of them (a machine
    that slows down or speeds up through the probe then keeps the current session). Probes come
    now and then, less often while the other is clearly slower, and soon after the current
    session's calls change: in a spell of this VM the spinning session's calls grow by ~75%.
    Only calls of one input shape are compared: a shape that differs from the previous call's
    restarts the bookkeeping (a regime serves every batch size in its range). Concurrent callers
    are served, but only one at a time is timed: the others run the current session untimed."""

    def __init__(self, sessions: Mapping[str, Any], first: str, *, clock=time.perf_counter):
        if len(sessions) != 2 or first not in sessions:
            raise ValueError("two sessions, and the first one among them")
        self.sessions = dict(sessions)
        self.current = self.first = first
        self.other = next(name for name in self.sessions if name != first)
        self.input_names = [i.name for i in self.sessions[first].get_inputs()]
        self.recent: deque[float] = deque(maxlen=KEPT)  # the current session's counted calls since the last probe
        self.switches = self.probes = 0
        self.backoff = 1  # the probe interval's multiple of PROBE_EVERY_S / PROBE_EVERY_CALLS
        self.last_probe: dict[str, list[float]] = {}
        self._clock = clock
        self._last: str | None = None
        self._steps: list[str] = []  # the probe's calls still to run: "other", then "back"
        self._off = self._calls_since_probe = 0
        self._probe_due = clock() + PROBE_EVERY_S
        self._end = self._settled_at = -float("inf")
        self._shape: tuple | None = None
        self._lock = threading.Lock()

    def run_feeds(self, feeds: Mapping[str, Any]) -> list:
        inputs = {n: feeds[n] for n in self.input_names}
        if not self._lock.acquire(blocking=False):  # another caller's call is being timed
            return self.sessions[self.current].run(None, inputs)
        try:
            return self._timed(inputs)
        finally:
            self._lock.release()

    def _timed(self, inputs: Mapping[str, Any]) -> list:
        shape = getattr(inputs[self.input_names[0]], "shape", None)
        if shape != self._shape:  # another batch size (or sequence length): not comparable
            if self._steps:  # a probe cut short waits its interval like one that ended
                self._calls_since_probe, self._probe_due = 0, self._clock() + PROBE_EVERY_S * self.backoff
            self._shape, self._last = shape, None
            self.recent.clear()
            self._steps, self._off = [], 0
        step = self._steps[0] if self._steps else None
        name = self.other if step == "other" else self.current
        start = self._clock()
        outputs = self.sessions[name].run(None, inputs)
        end = self._clock()
        if self._steps:
            self._steps.pop(0)  # only after the call ran: a call that raised leaves the probe where it was
        if start - self._end > IDLE_S:
            # something else had the cores in the pause: another runtime's workers may spin on
            # (ONNX Runtime's default: ~30-40 ms), which read as a change of the machine and
            # probed at the start of every block of a bench (~1 probe a second, 1% slower)
            self._settled_at = start + SETTLE_S
        # nor the first call after a change of session: it pays for the previous one's workers
        counted = name == self._last and start >= self._settled_at
        self._last, self._end = name, end
        if step is None:
            if counted:
                self._watch(end - start, end)
        else:
            if counted:
                self.last_probe[step].append(end - start)
            if not self._steps:
                self._decide(end)
        return outputs

    def _watch(self, elapsed: float, now: float) -> None:
        typical = statistics.median(self.recent) if len(self.recent) >= WATCH_MIN else 0.0
        if typical > 0 and abs(elapsed / typical - 1) > CHANGE:
            self._off += 1
        else:
            self._off = 0
        self.recent.append(elapsed)
        self._calls_since_probe += 1
        if self._off >= CHANGED_CALLS:  # a change: probe soon, once the window holds calls since it
            self.backoff, self._off = 1, 0
            self._probe_due = min(self._probe_due, now + CHANGE_GAP_S)
            self._calls_since_probe = PROBE_EVERY_CALLS - PROBE_CALLS  # the window fills with the new state's calls first
            self.recent = deque(list(self.recent)[-CHANGED_CALLS:], maxlen=KEPT)
        # a probe needs a full side before it: PROBE_CALLS - 1 counted calls of this shape
        if now >= self._probe_due and self._calls_since_probe >= PROBE_EVERY_CALLS * self.backoff and len(self.recent) >= PROBE_CALLS - 1:
            self.last_probe = {"before": list(self.recent)[-(PROBE_CALLS - 1) :], "other": [], "back": []}
            self._steps = ["other"] * PROBE_CALLS + ["back"] * PROBE_CALLS
            self.probes += 1

    def _decide(self, now: float) -> None:
        if other_is_faster(self.last_probe):
            self.current, self.other = self.other, self.current
            self.switches += 1
            self.backoff = 1
        elif clearly_slower(self.last_probe):
            self.backoff = min(2 * self.backoff, BACKOFF_MAX)
        else:
            self.backoff = 1
        # the watch starts afresh: seeded with the probe's calls, it saw a change as soon as
        # whatever slowed them passed (a bench's block begins while the previous runner's
        # workers still spin) and probed again
        self.recent.clear()
        self._off = self._calls_since_probe = 0
        self._probe_due = now + PROBE_EVERY_S * self.backoff

    def describe(self) -> list[dict[str, Any]]:
        return [{"step": "onnxruntime", "nodes": "all", "settings": list(self.sessions), "follows": "the faster, re-timed as it runs", "first": self.first}]


def follower_sessions(model: bytes, threads: int) -> dict[str, Any]:
    """The two sessions of ``model`` a follower chooses between: spinning bounded to ``SPIN_US``,
    and not spinning (one pair can serve several followers: see FollowFaster)."""
    from .sparse_graph import ort_session

    return {
        "spinning": ort_session(model, threads, config={"session.intra_op.spin_duration_us": str(SPIN_US)}),
        "not spinning": ort_session(model, threads, spinning=False),
    }


def follow_faster(model: bytes, threads: int, *, first_spinning: bool = True, clock=time.perf_counter) -> FollowFaster:
    """A follower of ``model``'s two sessions (:func:`follower_sessions`)."""
    return FollowFaster(follower_sessions(model, threads), "spinning" if first_spinning else "not spinning", clock=clock)
