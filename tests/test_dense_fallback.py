"""The dense fallback that follows the faster of ONNX Runtime's two worker settings as it runs."""

import numpy as np
import pytest

from dnsconvert.targets import dense_fallback
from dnsconvert.targets.dense_fallback import FollowFaster, can_follow, clearly_slower, follow_faster, other_is_faster
from dnsconvert.targets.torch_sparse_cpu import follows_faster


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Input:
    name = "x"


class MadeUpSession:
    """A session whose calls take ``ms(call index, clock)`` on the made-up clock; it answers its name."""

    def __init__(self, name, clock, ms):
        self.name, self.clock, self.ms, self.calls = name, clock, ms, 0

    def get_inputs(self):
        return [Input()]

    def run(self, output_names, feeds):
        assert output_names is None and list(feeds) == ["x"]
        scale = getattr(feeds["x"], "shape", (1,))[0]  # a batch of n costs n times one of 1
        self.clock.now += scale * self.ms(self.clock.now) / 1000.0
        self.calls += 1
        return [self.name]


def follower(spinning_ms, quiet_ms, first="spinning"):
    clock = Clock()
    sessions = {"spinning": MadeUpSession("spinning", clock, spinning_ms), "not spinning": MadeUpSession("not spinning", clock, quiet_ms)}
    return FollowFaster(sessions, first, clock=clock), sessions, clock


def run_for(runner, clock, seconds):
    answered = []
    end = clock.now + seconds
    while clock.now < end:
        answered.append(runner.run_feeds({"x": 0, "unused": 1})[0])
    return answered


def test_follows_the_faster_setting_both_ways_as_the_machine_changes():
    """Measured on this VM (BERT, batch 64): outside a slow spell spinning 0.90 ms and not
    spinning 1.13; inside one 1.58 and 1.45. The follower switches into and out of the spell."""
    spell = (5.0, 10.0)  # seconds

    def in_spell(t):
        return spell[0] <= t < spell[1]

    runner, sessions, clock = follower(lambda t: 1.58 if in_spell(t) else 0.90, lambda t: 1.45 if in_spell(t) else 1.13)
    before = run_for(runner, clock, 5.0)
    assert runner.current == "spinning" and runner.switches == 0
    # probes of twelve calls on the other setting, backing off while it is clearly slower (25%):
    # at 1 s, then 2 s later, the next due 4 s after that
    assert runner.probes == 2 and runner.backoff == 4
    assert before.count("not spinning") == runner.probes * dense_fallback.PROBE_CALLS
    # the change is seen (three calls off the recent median): a probe within CHANGE_GAP_S, not 4 s later
    first = run_for(runner, clock, dense_fallback.CHANGE_GAP_S + 0.1)
    assert runner.current == "not spinning" and runner.switches == 1 and runner.backoff == 1, first
    during = run_for(runner, clock, spell[1] - clock.now)
    assert runner.current == "not spinning" and runner.switches == 1
    assert during.count("spinning") <= 2 * dense_fallback.PROBE_CALLS * (len(during) / dense_fallback.PROBE_EVERY_CALLS + 1)
    after = run_for(runner, clock, dense_fallback.CHANGE_GAP_S + 0.1)
    assert runner.current == "spinning" and runner.switches == 2, after
    run_for(runner, clock, 5.0)
    assert runner.switches == 2


def test_stays_when_the_other_setting_is_within_the_switch_gain():
    runner, _, clock = follower(lambda t: 1.00, lambda t: 0.97)
    run_for(runner, clock, 20.0)
    assert runner.current == "spinning" and runner.switches == 0


def test_the_first_call_after_a_change_of_session_is_not_counted():
    """The previous session's workers (ONNX Runtime's spin after a call) slow the first call of
    the other: a probe must not read that call, and coming back must not either."""
    clock = Clock()
    last = {"name": None}

    def timed(name, ms, after_change_ms):
        def cost(t):
            changed = last["name"] not in (None, name)
            last["name"] = name
            return after_change_ms if changed else ms

        return cost

    # counting the first calls, either setting would look 3x slower than it is, and the follower would flap
    sessions = {"spinning": MadeUpSession("spinning", clock, timed("spinning", 1.0, 3.0)), "not spinning": MadeUpSession("not spinning", clock, timed("not spinning", 1.2, 3.0))}
    runner = FollowFaster(sessions, "not spinning", clock=clock)
    run_for(runner, clock, 10.0)
    assert runner.current == "spinning" and runner.switches == 1
    assert runner.probes >= 3 and max(runner.recent) == pytest.approx(0.001)
    counted = dense_fallback.PROBE_CALLS - 1
    assert runner.last_probe["other"] == [pytest.approx(0.0012)] * counted and runner.last_probe["back"] == [pytest.approx(0.001)] * counted


@pytest.mark.parametrize(
    "probe, faster",
    [
        ({"before": [1.0, 1.0], "other": [0.9, 0.9], "back": [1.0, 1.0]}, True),
        ({"before": [1.0, 1.0], "other": [0.97, 0.97], "back": [1.0, 1.0]}, False),  # within SWITCH_GAIN
        # slowed just before the probe by something that then passed: the other (10% slower) is not faster
        ({"before": [1.5, 1.5], "other": [1.1, 1.1], "back": [1.0, 1.0]}, False),
        ({"before": [], "other": [0.9, 0.9], "back": [1.0, 1.0]}, True),  # a side without calls does not vote
        ({"before": [1.0], "other": [], "back": [1.0]}, False),
    ],
)
def test_a_probe_switches_only_when_the_other_is_faster_than_both_sides(probe, faster):
    assert other_is_faster(probe) is faster


def test_calls_after_a_pause_are_not_counted():
    """Another runtime may have held the cores in a pause (a bench's other runners, whose
    workers spin on ~30-40 ms): for SETTLE_S after a pause calls are not read, so they start
    no probe and no switch."""
    clock = Clock()
    resumed = {"at": -1.0}

    def slowed_after_pause(fast_ms):
        return lambda t: 3 * fast_ms if t - resumed["at"] < 0.04 else fast_ms

    sessions = {"spinning": MadeUpSession("spinning", clock, slowed_after_pause(0.9)), "not spinning": MadeUpSession("not spinning", clock, slowed_after_pause(1.13))}
    runner = FollowFaster(sessions, "spinning", clock=clock)
    for _ in range(40):  # blocks of 0.1 s after pauses of 0.3 s
        clock.now += 0.3
        resumed["at"] = clock.now
        run_for(runner, clock, 0.1)
    assert runner.switches == 0 and runner.backoff == 8  # no change seen: probes backed off
    assert max(runner.recent) == pytest.approx(0.0009)


def test_only_calls_of_one_shape_are_compared():
    """A regime serves every batch size in its range: a batch of 64 must not be timed against a
    batch of 1. Spinning is 20% faster at every size; batches alternate at random."""
    import numpy as np

    runner, sessions, clock = follower(lambda t: 1.0, lambda t: 1.2)
    rng = np.random.default_rng(0)
    batches = {n: np.zeros((n, 4), np.float32) for n in (1, 64)}
    answered = [runner.run_feeds({"x": batches[int(rng.choice([1, 64]))]})[0] for _ in range(20_000)]
    # a probe only after a full side of one size, cut short by the next size: almost never
    assert runner.switches == 0 and answered.count("not spinning") < 0.002 * len(answered)
    for _ in range(5_000):  # one size: probes, and spinning stays
        answered.append(runner.run_feeds({"x": batches[64]})[0])
    assert runner.switches == 0 and runner.probes >= 1


def test_a_call_that_raises_leaves_the_probe_where_it_was():
    clock = Clock()
    failing = {"on": False}

    def quiet_ms(t):
        if failing["on"]:
            failing["on"] = False
            raise RuntimeError("refused")
        return 1.2

    runner = FollowFaster({"spinning": MadeUpSession("spinning", clock, lambda t: 1.0), "not spinning": MadeUpSession("not spinning", clock, quiet_ms)}, "spinning", clock=clock)
    while runner.probes == 0:
        runner.run_feeds({"x": 0})
    for _ in range(dense_fallback.PROBE_CALLS - 1):
        runner.run_feeds({"x": 0})
    failing["on"] = True  # the probe's last call on the other session raises
    with pytest.raises(RuntimeError):
        runner.run_feeds({"x": 0})
    for _ in range(dense_fallback.PROBE_CALLS + 1):  # the failed call again, then the calls back
        runner.run_feeds({"x": 0})
    assert len(runner.last_probe["other"]) == dense_fallback.PROBE_CALLS - 1 and len(runner.last_probe["back"]) == dense_fallback.PROBE_CALLS - 1
    probes = runner.probes
    for _ in range(dense_fallback.PROBE_EVERY_CALLS // 2):
        runner.run_feeds({"x": 0})
    assert runner.probes == probes  # decided, and the next probe waits its interval


def test_concurrent_callers_are_served_and_one_is_timed():
    import threading

    runner, _, clock = follower(lambda t: 1.0, lambda t: 1.2)
    errors = []

    def caller():
        try:
            for _ in range(2_000):
                assert runner.run_feeds({"x": 0})[0] in ("spinning", "not spinning")
        except Exception as exc:  # pragma: no cover - what the test is for
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and runner.current == "spinning"


@pytest.mark.parametrize(
    "version, follows",
    [("1.32.0", True), ("1.26.0", True), ("1.25.1", False), ("1.18.0", False), ("2.0.0", True), ("nightly", False)],
)
def test_follows_only_where_onnxruntime_bounds_spinning(monkeypatch, version, follows):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "__version__", version)
    assert can_follow() is follows


@pytest.mark.parametrize(
    "probe, clear",
    [
        ({"before": [1.0], "other": [1.2], "back": [1.0]}, True),
        ({"before": [1.0], "other": [1.2], "back": [1.1]}, False),  # not clearly slower than the back side
        ({"before": [1.1], "other": [1.2], "back": [1.0]}, False),
        ({"before": [1.0], "other": [], "back": [1.0]}, False),
    ],
)
def test_clearly_slower_on_every_side(probe, clear):
    assert clearly_slower(probe) is clear


def test_refuses_anything_but_two_sessions():
    clock = Clock()
    one = MadeUpSession("a", clock, lambda t: 1.0)
    with pytest.raises(ValueError):
        FollowFaster({"a": one}, "a")
    with pytest.raises(ValueError):
        FollowFaster({"a": one, "b": one}, "c")


def test_real_sessions_answer_as_the_dense_model_and_spin_briefly(monkeypatch):
    """With real ONNX Runtime sessions: the spinning one bounded (its config entry), the other
    not spinning, both timed as the follower runs, and every answer the dense model's."""
    import onnxruntime as ort

    from dnsconvert.export import export_checkpoint
    from dnsconvert.model_io import sample_feeds
    from helpers import masked_checkpoint

    monkeypatch.setattr(dense_fallback, "PROBE_EVERY_S", 0.0)
    ckpt = masked_checkpoint("lenet300100", 0.5)
    model = export_checkpoint(ckpt).model.SerializeToString()
    runner = follow_faster(model, 2)
    spinning = runner.sessions["spinning"].get_session_options()
    assert spinning.get_session_config_entry("session.intra_op.spin_duration_us") == str(dense_fallback.SPIN_US)
    assert runner.sessions["not spinning"].get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    feeds = sample_feeds(ckpt.model.inputs, batch=4, seed=0)
    reference = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    monkeypatch.setattr(dense_fallback, "PROBE_EVERY_CALLS", 16)
    for _ in range(10_000):  # calls until a second probe of the other session begins ...
        if runner.probes >= 2:
            break
        np.testing.assert_allclose(runner.run_feeds(feeds)[0], reference, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(dense_fallback, "PROBE_EVERY_CALLS", 10**6)
    for _ in range(2 * dense_fallback.PROBE_CALLS + 1):  # ... and ends
        np.testing.assert_allclose(runner.run_feeds(feeds)[0], reference, rtol=1e-6, atol=1e-6)
    assert runner.probes >= 2 and len(runner.last_probe["other"]) == len(runner.last_probe["back"]) == dense_fallback.PROBE_CALLS - 1 and runner.last_probe["before"]


@pytest.mark.parametrize(
    "decision, threads, follows",
    [
        ({"follow": True, "onnxruntime_dense_p50_ms": 0.9}, 2, True),
        ({"follow": True, "onnxruntime_dense_p50_ms": 0.9}, 0, True),  # ONNX Runtime's default threads
        ({"follow": False, "onnxruntime_dense_p50_ms": 0.9}, 2, False),  # built with fallback=fixed, the default
        ({"onnxruntime_dense_p50_ms": 0.9}, 2, False),  # a plan from before the option
        ({"follow": True, "onnxruntime_dense_p50_ms": 0.9}, 1, False),  # no workers to spin
        ({"follow": True, "onnxruntime_dense_p50_ms": 0.2}, 2, True),  # FOLLOW_MIN_MS itself
        ({"follow": True, "onnxruntime_dense_p50_ms": 0.02}, 2, False),  # too short to time every call
        ({"follow": True}, 2, False),  # no p50 recorded
    ],
)
def test_which_dense_regimes_follow(decision, threads, follows):
    assert follows_faster(decision, threads) is follows
