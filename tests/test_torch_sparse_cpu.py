import json

import numba
import numpy as np
import onnx
import pytest
import torch

from dnsconvert.errors import TargetError
from dnsconvert.model_io import sample_feeds
from dnsconvert.models import BUILTIN_MODELS
from dnsconvert.targets import BuildOptions, get_target, load_artifact
from dnsconvert.targets.csr_kernels import CsrChain, CsrLayer
from dnsconvert.targets.dense_fallback import FollowFaster
from dnsconvert.targets.sparse_conv import SparseConv2d
from dnsconvert.targets.torch_sparse_cpu import KERNELS, PLAN_KEY, SparseCpuDetails, SparseCpuRunner, read_plan
from helpers import masked_checkpoint

SPARSITY_PLAN = {"plan": "sparsity", "min_sparsity": "0.5"}


def build(tmp_path, ckpt, name="m", **extra):
    options = BuildOptions(atol=1e-5, rtol=1e-5, extra={k: str(v) for k, v in extra.items()})
    return get_target("torch-sparse-cpu").build(ckpt, tmp_path / name, options)


def load(artifact, variant="sparse", **options):
    return get_target("torch-sparse-cpu").load(load_artifact(artifact.root), variant, {k: str(v) for k, v in options.items()})


def details(artifact) -> SparseCpuDetails:
    return artifact.manifest.details_as(SparseCpuDetails)


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_matches_dense_model_within_1e5(tmp_path, name):
    ckpt = masked_checkpoint(name, 0.95)
    artifact = build(tmp_path, ckpt, **SPARSITY_PLAN)
    assert artifact.manifest.parity.passed and artifact.manifest.parity.max_abs <= 1e-5
    plan = details(artifact).plan
    assert plan.ops and all(decision.mode == "sparse" for decision in plan.regimes.values())
    assert set(plan.regimes["small"].kernels.values()) == {"serial"}
    sparse, dense = load(artifact), load(artifact, "dense")
    assert sparse.modes == {"small": "planned", "large": "planned"}
    for batch in (5, 12):  # both regimes
        feeds = sample_feeds(ckpt.model.inputs, batch=batch, seed=batch)
        got, want = sparse.run(feeds), dense.run(feeds)
        assert len(got) == len(want) == 1
        np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-5)


def test_fully_sparse_lenets_never_call_onnxruntime(tmp_path):
    # (the Flatten before the first Linear is absorbed by the chain: one Python step less per call)
    for name, kinds in (("lenet300100", {"sparse linear chain"}), ("lenet5", {"sparse conv", "sparse linear chain"})):
        artifact = build(tmp_path, masked_checkpoint(name, 0.95), name, **SPARSITY_PLAN)
        steps = details(artifact).steps["small"]
        assert {s["step"] for s in steps} == kinds, steps
    # a transformer FFN keeps LayerNorm and the residual Add in ONNX Runtime, the Linear pair is one chain with GELU fused
    artifact = build(tmp_path, masked_checkpoint("transformer_mlp", 0.95), "ffn", **SPARSITY_PLAN)
    steps = details(artifact).steps["small"]
    assert [s["step"] for s in steps] == ["onnxruntime", "sparse linear chain", "onnxruntime", "sparse linear chain", "onnxruntime"]
    assert {op.activation for op in details(artifact).plan.ops.values()} == {"gelu", "identity"}


def test_auto_plan_records_its_evidence(tmp_path):
    ckpt = masked_checkpoint("lenet300100", 0.99)
    artifact = build(tmp_path, ckpt, batches="1,64", plan_budget=0.05, threads=1)
    plan = details(artifact).plan
    for regime, batch in (("small", 1), ("large", 64)):
        decision = plan.regimes[regime]
        assert decision.batch == batch and decision.mode in ("sparse", "dense")
        assert set(decision.kernels) == set(plan.ops) and set(decision.kernels.values()) <= set(KERNELS)
        assert set(decision.timings_ms) == set(plan.ops)
        for timing in decision.timings_ms.values():
            assert set(timing) == {"dense", "serial"}  # one thread: no parallel kernel
        assert decision.candidates and decision.onnxruntime_dense_p50_ms > 0
        if decision.mode == "dense":
            assert set(decision.kernels.values()) == {"dense"}
        if decision.mode == "sparse":  # faster in the quietest rounds and over all of them
            assert any(r["verdict"] == "faster" for r in decision.candidates.values()) and decision.all_rounds["verdict"] == "faster"
        assert 3 <= decision.quiet_rounds < decision.check_rounds == 12


def test_whole_model_check_settles_and_spreads_its_rounds_by_default(tmp_path, monkeypatch):
    """The planner's whole-model check hands measure_interleaved its PLAN_SETTLE_S and
    PLAN_ROUND_GAP_S (the suite sets both to 0 for speed): no plan is timed while the spinning
    dense session's idle worker still holds a core, and the rounds are spread over time."""
    import dnsconvert.targets.torch_sparse_cpu as planner
    import dnsconvert.timing

    monkeypatch.setattr(planner, "PLAN_SETTLE_S", 0.02)
    monkeypatch.setattr(planner, "PLAN_ROUND_GAP_S", 0.01)
    seen = []
    real = dnsconvert.timing.measure_interleaved
    monkeypatch.setattr(dnsconvert.timing, "measure_interleaved", lambda *a, **k: seen.append((k.get("settle_s"), k.get("gap_s"))) or real(*a, **k))
    build(tmp_path, masked_checkpoint("lenet300100", 0.99), batches="1", plan_budget=0.05, threads=1)
    assert seen.count((0.02, 0.01)) == 1  # the one regime's check; the op timings run unsettled (their dense side never spins)


def made_up_check_clock(monkeypatch, block_ms):
    """The planner's measure_interleaved replaced: every variant runs once (the runners are
    real), only the clock is made up: round i of ``label`` is the calls ``block_ms(label, i)`` (ms)."""
    import dnsconvert.timing
    from dnsconvert.timing import Interleaved

    def fake_measure(calls, *, batch, rounds, **kwargs):
        result = Interleaved(batch=batch, warmup=0)
        for label, call in calls.items():
            call()
            result.samples[label] = [[ms / 1000.0 for ms in block_ms(label, i)] for i in range(rounds)]
        return result

    monkeypatch.setattr(dnsconvert.timing, "measure_interleaved", fake_measure)


@pytest.mark.parametrize("quiet_ms, spinning", [((0.96, 0.99, 1.04), True), ((0.70, 0.71, 0.72), False)])  # calls of every round
def test_dense_fallback_turns_spinning_off_only_when_shown_faster(tmp_path, monkeypatch, quiet_ms, spinning):
    """When no plan wins, the fallback keeps ONNX Runtime's default spinning session unless the
    non-spinning one was faster beyond noise: a lower p50 within noise is not enough (a noisy
    build chose non-spinning for GPT-2 at batch 64, which then ran at 0.80x of spinning)."""
    # not spinning: p50 below spinning either way; every plan loses
    made_up_check_clock(monkeypatch, lambda label, i: {"onnxruntime dense": [1.0] * 3, "onnxruntime dense, not spinning": list(quiet_ms)}.get(label, [2.0] * 3))
    fixed = build(tmp_path, masked_checkpoint("lenet300100", 0.99), "fixed", batches="1", plan_budget=0.05, threads=1)
    assert details(fixed).plan.regimes["small"].follow is False  # the default, fallback=fixed
    assert not isinstance(load(fixed, threads=2).runners["small"], FollowFaster)
    artifact = build(tmp_path, masked_checkpoint("lenet300100", 0.99), batches="1", plan_budget=0.05, threads=1, fallback="follow")
    decision = details(artifact).plan.regimes["small"]
    assert decision.mode == "dense" and decision.spinning is spinning and decision.follow is True
    runner = load(artifact, threads=1)  # one session in the chosen setting (one thread: nothing to follow)
    assert runner.modes["small"] == "onnxruntime dense"
    options = runner.runners["small"].session.get_session_options()
    try:
        turned_off = options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    except RuntimeError:  # not set: ONNX Runtime's default, spinning
        turned_off = False
    assert turned_off is not spinning
    # with two threads and calls of 0.2 ms or more (the made-up 1 ms), it begins with the chosen setting and follows the faster
    runner = load(artifact, threads=2)
    follower = runner.runners["small"]
    assert isinstance(follower, FollowFaster) and follower.current == ("spinning" if spinning else "not spinning")
    # a follower per regime (batch sizes of one regime are not timed against the other's), one pair of sessions
    assert runner.runners["large"] is not follower and runner.runners["large"].sessions == follower.sessions
    import dnsconvert.targets.dense_fallback as dense_fallback

    monkeypatch.setattr(dense_fallback, "FIRST_VERSION", (99, 0))  # an ONNX Runtime that cannot bound spinning
    assert not isinstance(load(artifact, threads=2).runners["small"], FollowFaster)
    monkeypatch.undo()
    assert details(artifact).steps["small"] == [{"step": "onnxruntime", "nodes": "all"}]  # built with one thread
    assert load(artifact, threads=2).describe()["small"][0]["follows"]


def test_a_plan_that_wins_only_in_a_slow_spell_is_not_chosen(tmp_path, monkeypatch):
    """The whole-model check decides on its quietest rounds: BERT at batch 64 ran its plan at
    1.35 ms against dense ONNX Runtime's 1.55 in one of this VM's slow spells, and at 1.09
    against 0.90 outside them; a check that fell mostly in a spell chose the plan."""
    import dnsconvert.targets.torch_sparse_cpu as planner

    quiet_and_spell_ms = {"onnxruntime dense": (0.90, 1.55), "onnxruntime dense, not spinning": (1.13, 1.45)}  # any plan: (1.09, 1.35)
    made_up_check_clock(monkeypatch, lambda label, i: [quiet_and_spell_ms.get(label, (1.09, 1.35))[i % 3 != 2]] * 3)  # two rounds in three in a spell
    monkeypatch.setattr(planner, "PLAN_ROUNDS", 36)  # enough rounds that all of them say "faster" beyond noise
    artifact = build(tmp_path, masked_checkpoint("lenet300100", 0.99), batches="1", plan_budget=0.05, threads=1)
    decision = details(artifact).plan.regimes["small"]
    assert decision.all_rounds["verdict"] == "faster"  # all rounds: the plan against the spell's faster dense, not spinning
    assert decision.all_rounds["value"] == pytest.approx(1.45 / 1.35)
    assert decision.mode == "dense" and decision.spinning is True  # both as on a quiet machine
    assert (decision.quiet_rounds, decision.check_rounds) == (12, 36) and decision.onnxruntime_dense_p50_ms == pytest.approx(0.90)


def test_planning_waits_while_two_threads_are_no_faster_than_one():
    """parallel_probe re-measures, a second apart, while the split is not faster than serial,
    up to its limit, and reports what it saw; the real probe measures both variants."""
    from dnsconvert.targets.torch_sparse_cpu import parallel_probe

    readings = iter([(1.0, 1.4), (1.0, 1.3), (1.0, 0.6), (1.0, 0.6)])
    slept: list[float] = []
    probe = parallel_probe(2, measure=lambda threads: next(readings), sleep=slept.append)
    assert probe == {"serial_ms": 1.0, "split_ms": 0.6, "waited_s": 2.0} and slept == [1.0, 1.0]
    stuck = parallel_probe(2, wait_s=3.0, measure=lambda threads: (1.0, 1.4), sleep=lambda s: None)
    assert stuck["waited_s"] == 3.0 and stuck["split_ms"] == 1.4  # gives up and says so
    real = parallel_probe(2, wait_s=0.0)
    assert real["serial_ms"] > 0 and real["split_ms"] > 0


def test_op_timings_take_each_variants_faster_pass():
    """A hiccup during one op's first timing (its split 2.2 ms where it runs in 1.0) must not flip
    its kernel: every op is timed in two passes at half the budget, and each variant, dense
    included, keeps its faster p50."""
    from types import SimpleNamespace

    from dnsconvert.targets.torch_sparse_cpu import time_ops

    ops = [SimpleNamespace(name="a"), SimpleNamespace(name="b")]
    readings = {
        ("a", 0): {"dense": 1.2, "serial": 1.5, "parallel": 2.2},  # a's first window: a hiccup
        ("b", 0): {"dense": 1.2, "serial": 1.5, "parallel": 1.0},
        ("a", 1): {"dense": 1.1, "serial": 1.6, "parallel": 1.0},
        ("b", 1): {"dense": 1.3, "serial": 1.4, "parallel": 1.1},
    }
    calls: list[tuple[str, float]] = []

    def timer(graph, op, values, threads, budget_s):
        calls.append((op.name, budget_s))
        return readings[(op.name, sum(name == op.name for name, _ in calls) - 1)]

    timings = time_ops(None, ops, {}, 2, 0.3, timer=timer)
    assert calls == [("a", 0.15), ("b", 0.15), ("a", 0.15), ("b", 0.15)]  # whole passes, half the budget each
    assert timings == {"a": {"dense": 1.1, "serial": 1.5, "parallel": 1.0}, "b": {"dense": 1.2, "serial": 1.4, "parallel": 1.0}}
    assert {name: min(t, key=t.get) for name, t in timings.items()} == {"a": "parallel", "b": "parallel"}
    assert time_ops(None, ops, {}, 2, 0.3, passes=1, timer=lambda *a: readings[(a[1].name, 0)])["a"]["parallel"] == 2.2
    # the planner's wait for parallel threads comes before every pass, not once
    order: list[str] = []
    time_ops(None, ops, {}, 2, 0.3, timer=lambda *a: order.append(a[1].name) or readings[(a[1].name, 0)], before_pass=lambda: order.append("probe"))
    assert order == ["probe", "a", "b", "probe", "a", "b"]


def test_a_two_thread_plan_probes_its_threads_before_every_pass(tmp_path, monkeypatch):
    """A ResNet's pass over its layers takes seconds, the spells in which two threads run no
    faster than one come every 10-30 s: the planner waits for parallel threads before each pass
    of the op timings and records the first probe with the wait of all of them."""
    import dnsconvert.targets.torch_sparse_cpu as planner

    seen = []
    monkeypatch.setattr(planner, "parallel_probe", lambda threads: seen.append(threads) or {"serial_ms": 1.0, "split_ms": 0.6, "waited_s": 2.0})
    artifact = build(tmp_path, masked_checkpoint("lenet300100", 0.99), batches="1", plan_budget=0.05, threads=2)
    probe = details(artifact).plan.regimes["small"].parallel_probe
    assert seen == [2] * planner.TIMING_PASSES
    assert probe == {"serial_ms": 1.0, "split_ms": 0.6, "waited_s": 2.0 * planner.TIMING_PASSES, "probes": planner.TIMING_PASSES}


def test_candidates_include_the_plan_of_clear_wins_only():
    """Besides the per-layer choice, the whole model is tried with only the layers whose kernel beat
    dense alone by CLEAR_WIN (a hair's win alone can lose inside the model), and with slack."""
    from types import SimpleNamespace

    from dnsconvert.targets.torch_sparse_cpu import CLEAR_WIN, candidate_plans

    ops = [SimpleNamespace(name=n, kind="conv", x=f"{n}.in", y=f"{n}.out") for n in "abcd"]
    timings = {"a": {"dense": 1.0, "serial": 0.99, "parallel": 1.2}, "b": {"dense": 1.0, "serial": 0.8, "parallel_packed": 0.7}, "c": {"dense": 1.0, "parallel": 0.5}, "d": {"dense": 1.0, "serial": 1.7}}
    kernels = {n: min(t, key=t.get) for n, t in timings.items()}
    assert kernels == {"a": "serial", "b": "parallel_packed", "c": "parallel", "d": "dense"} and CLEAR_WIN == (1.15, 1.3)
    candidates = candidate_plans(ops, kernels, timings)
    assert candidates["per-layer"] == {"a": "serial", "b": "parallel_packed", "c": "parallel"}
    assert candidates["layers 1.15x faster than dense sparse"] == {"b": "parallel_packed", "c": "parallel"}  # a: 1.01x
    assert "layers 1.3x faster than dense sparse" not in candidates  # b (1.43x) is in: the same plan, timed once
    assert candidates["all sparse"] == {"a": "serial", "b": "parallel_packed", "c": "parallel", "d": "serial"}
    timings["b"]["parallel_packed"] = 0.8  # b: 1.25x, out at 1.3
    plans = candidate_plans(ops, kernels, timings)
    assert plans["layers 1.3x faster than dense sparse"] == {"c": "parallel"} and len(set(map(str, plans.values()))) == len(plans)
    assert "layers 1.15x faster than dense sparse" not in candidate_plans(ops, kernels, None)  # no timings, no margins


def test_auto_plan_falls_back_to_dense_when_sparse_loses(tmp_path):
    """Unpruned layers: a CSR kernel does the dense work with index overhead; the plan must keep ONNX Runtime."""
    ckpt = masked_checkpoint("mlp", 0.0, hidden=[256, 256])
    artifact = build(tmp_path, ckpt, batches="2,64", plan_budget=0.05, threads=1)
    for decision in details(artifact).plan.regimes.values():
        assert decision.mode == "dense", decision.reason
    runner = load(artifact)
    assert runner.modes == {"small": "onnxruntime dense", "large": "onnxruntime dense"}
    feeds = sample_feeds(ckpt.model.inputs, batch=3)
    np.testing.assert_allclose(runner.run(feeds)[0], load(artifact, "dense").run(feeds)[0], atol=1e-6)


def test_loading_without_threads_splits_kernels_over_the_plans_threads(tmp_path):
    """threads 0 (``dnsconvert bench`` without --threads) splits a plan's parallel kernels over the
    threads it was timed with (bounded by the CPUs this process may use), not serially, while
    ONNX Runtime's sessions keep their default, as the dense baseline's do; a negative thread
    count in a plan or in the build options is refused."""
    import os

    artifact = build(tmp_path, masked_checkpoint("lenet5", 0.95), **SPARSITY_PLAN)
    model = onnx.load_from_string(artifact.read("sparse"))
    plan = read_plan(model)
    for regime in plan["regimes"].values():
        regime["kernels"] = {name: "parallel" for name in regime["kernels"]}
    cpus = len(os.sched_getaffinity(0))

    def parts(threads, planned):
        runner = SparseCpuRunner(model, {**plan, "threads": planned}, threads)
        return sorted({step["threads"] for step in runner.describe()["small"] if "threads" in step})

    assert parts(0, 2) == [min(2, cpus)]
    assert parts(1, 2) == [1]
    assert parts(0, 1) == [1]
    assert parts(0, 10**6) == [cpus]
    feeds = sample_feeds(masked_checkpoint("lenet5", 0.95).model.inputs, batch=3, seed=0)
    np.testing.assert_allclose(SparseCpuRunner(model, {**plan, "threads": 2}).run(feeds)[0], load(artifact, "dense").run(feeds)[0], atol=1e-5, rtol=1e-5)
    # a dense regime is ONNX Runtime's own session at its default thread count, whatever the plan says
    dense_plan = {**plan, "threads": 1, "regimes": {r: {**d, "mode": "dense"} for r, d in plan["regimes"].items()}}
    session = SparseCpuRunner(model, dense_plan).runners["small"].session
    assert session.get_session_options().intra_op_num_threads == 0
    with pytest.raises(TargetError, match="plan"):
        SparseCpuRunner(model, {**plan, "threads": -1})
    with pytest.raises(TargetError, match="threads=-1"):
        build(tmp_path, masked_checkpoint("lenet5", 0.95), "negative", threads=-1, **SPARSITY_PLAN)
    with pytest.raises(TargetError, match="fallback='sometimes' is not fixed or follow"):
        build(tmp_path, masked_checkpoint("lenet5", 0.95), "fallback", fallback="sometimes", **SPARSITY_PLAN)


def test_hostile_or_tampered_models_are_rejected(tmp_path):
    """What the hash check cannot catch (a file written by someone else with valid hashes):
    sparse indices outside their tensor, and plans that do not fit, are TargetErrors."""
    artifact = build(tmp_path, masked_checkpoint("lenet300100", 0.95), **SPARSITY_PLAN)
    model = onnx.load_from_string(artifact.read("sparse"))
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    index = bad.graph.sparse_initializer[0].indices
    values = onnx.numpy_helper.to_array(index).copy()
    values[0] = 10**9  # points far outside the tensor
    index.CopyFrom(onnx.numpy_helper.from_array(values, index.name))
    with pytest.raises(TargetError, match="outside"):
        SparseCpuRunner(bad, read_plan(bad))
    for tamper in ("kernel", "mode", "layer", "version", "packed linear"):
        bad = onnx.ModelProto()
        bad.CopyFrom(model)
        prop = next(p for p in bad.metadata_props if p.key == PLAN_KEY)
        plan = json.loads(prop.value)
        regime = plan["regimes"]["small"]
        if tamper == "kernel":
            regime["kernels"] = {k: "gpu" for k in regime["kernels"]}
        elif tamper == "mode":
            regime["mode"] = "fast"
        elif tamper == "layer":
            regime["kernels"]["no.such.layer"] = "serial"
        elif tamper == "packed linear":  # the packed layout is a convolution's; these are Linear layers
            regime["kernels"] = {k: "parallel_packed" for k in regime["kernels"]}
        else:
            plan["version"] = 99
        prop.value = json.dumps(plan)
        with pytest.raises(TargetError, match="plan"):
            SparseCpuRunner(bad, read_plan(bad))
    # and the artifact's own hash check refuses an edited file before any of this
    artifact.path.write_bytes(bad.SerializeToString())
    with pytest.raises(Exception, match="sha256|hash|changed|size"):
        load(artifact)


@pytest.mark.parametrize("stride,pads,kernel,batch", [(1, (1, 1, 1, 1), 3, 1), (2, (1, 1, 1, 1), 3, 3), (2, (0, 0, 0, 0), 1, 2), (2, (3, 3, 3, 3), 7, 1), (1, (0, 0, 0, 0), 5, 4), (3, (2, 1, 0, 2), 4, 2)])
@pytest.mark.parametrize("activation,residual", [(0, False), (1, True)])
def test_sparse_conv_matches_torch(stride, pads, kernel, batch, activation, residual):
    torch.manual_seed(stride * 100 + kernel)
    weight = torch.randn(6, 5, kernel, kernel) * (torch.rand(6, 5, kernel, kernel) > 0.7)
    bias = torch.randn(6)
    x = torch.randn(batch, 5, 11, 13)
    padded = torch.nn.functional.pad(x, (pads[1], pads[3], pads[0], pads[2]))
    expected = torch.nn.functional.conv2d(padded, weight, bias, stride=stride)
    res = torch.randn_like(expected) if residual else None
    if residual:
        expected = expected + res
    if activation == 1:
        expected = torch.relu(expected)
    for parts in (1, 2):
        conv = SparseConv2d(weight.numpy(), bias.numpy(), stride=stride, pads=pads, activation=activation, parts=parts)
        got = conv(x.numpy(), res.numpy() if residual else None)
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "height,width,batch,kernel,stride,aligned",
    [(7, 7, 1, 3, 1, False), (14, 14, 1, 3, 1, True), (30, 30, 1, 3, 1, True), (7, 7, 8, 3, 1, True), (60, 58, 1, 3, 2, True), (64, 61, 2, 7, 2, True), (100, 90, 1, 4, 3, True), (40, 33, 1, 4, 3, False)],
)  # fmt: skip
def test_sparse_conv_matches_torch_on_short_and_long_planes(height, width, batch, kernel, stride, aligned):
    """Planes longer than TILE_MAX floats, and short ones whose rows are nearly whole vectors
    (14x14 padded: 16), take the aligned layout (rows of whole vectors, a copy of the input per
    column shift, input channels in blocks); the others accumulate in registers one output
    channel at a time. "packed" (never "auto"'s choice) blocks the rows as they are, in one copy.
    Strides 1-3, kernels 3-7, one and two threads, against torch."""

    torch.manual_seed(height * 10 + batch + kernel)
    weight = torch.randn(9, 20, kernel, kernel) * (torch.rand(9, 20, kernel, kernel) > 0.5)
    bias = torch.randn(9)
    x = torch.randn(batch, 20, height, width)
    pad = kernel // 2
    expected = torch.relu(torch.nn.functional.conv2d(x, weight, bias, padding=pad, stride=stride))
    x2 = torch.randn_like(x)  # a second call: nothing of the first input may linger in the copies
    expected2 = torch.relu(torch.nn.functional.conv2d(x2, weight, bias, padding=pad, stride=stride))
    for parts in (1, 2):
        for forced in ("auto", "rows", "aligned", "packed"):
            conv = SparseConv2d(weight.numpy(), bias.numpy(), stride=stride, pads=(pad, pad, pad, pad), activation=1, parts=parts, layout=forced)
            np.testing.assert_allclose(conv(x.numpy()), expected.numpy(), atol=1e-4, rtol=1e-5)
            np.testing.assert_allclose(conv(x2.numpy()), expected2.numpy(), atol=1e-4, rtol=1e-5)
            layout = conv._layout(batch, height, width)
            assert (layout.copies > 0) == {"auto": aligned, "rows": False, "aligned": True, "packed": True}[forced]
            if forced == "packed":  # one copy, rows not widened, each nonzero at its own column
                assert layout.copies == 1 and layout.ws == -(-(width + 2 * pad) // stride) and layout.bptr.shape[0] == 9
            elif layout.copies:
                assert layout.buf.ctypes.data % 64 == 0 and layout.ws % 16 == 0 and not (layout.offsets % 16).any()
    very_sparse = weight * (torch.rand_like(weight) > 0.97)  # ~3-15 nonzeros per output channel
    assert SparseConv2d(very_sparse.numpy(), None, stride=stride, pads=(pad, pad, pad, pad))._layout(batch, height, width).copies == 0


@pytest.mark.parametrize("consumer_stride,consumer_kernel,layout", [(1, 3, "aligned"), (1, 3, "rows"), (2, 3, "aligned"), (2, 1, "rows"), (1, 5, "aligned"), (1, 3, "packed"), (2, 3, "packed")])
def test_a_convolution_feeds_the_next_ones_buffer(consumer_stride, consumer_kernel, layout):
    """``feeds``: each share of the producer writes its output channels straight into the next
    convolution's input buffer; that one then skips its own fill for exactly that array, and
    fills itself for any other. Results bitwise those of the unfed pair, and torch's."""
    torch.manual_seed(consumer_stride * 10 + consumer_kernel)
    w1 = torch.randn(12, 6, 3, 3) * (torch.rand(12, 6, 3, 3) > 0.4)
    w2 = torch.randn(10, 12, consumer_kernel, consumer_kernel) * (torch.rand(10, 12, consumer_kernel, consumer_kernel) > 0.4)
    pad = consumer_kernel // 2
    x, other = torch.randn(2, 6, 33, 35), torch.randn(2, 6, 33, 35)

    def expected(image):
        y = torch.relu(torch.nn.functional.conv2d(image, w1, padding=1))
        return torch.nn.functional.conv2d(y, w2, stride=consumer_stride, padding=pad).numpy()

    for parts in (1, 2):
        producer = SparseConv2d(w1.numpy(), None, stride=1, pads=(1, 1, 1, 1), activation=1, parts=parts, layout=layout)
        consumer = SparseConv2d(w2.numpy(), None, stride=consumer_stride, pads=(pad,) * 4, parts=parts, layout=layout)
        plain = SparseConv2d(w2.numpy(), None, stride=consumer_stride, pads=(pad,) * 4, parts=parts, layout=layout)
        producer.feeds = consumer
        for image in (x, other, x):
            y = producer(image.numpy())
            assert consumer._filled_from is y
            saved = y.copy()
            y[...] = np.nan  # (never done in a graph) the consumer must read the fed buffer, not y
            fed = consumer(y)
            assert consumer._filled_from is None
            np.testing.assert_array_equal(fed, plain(saved))
            np.testing.assert_allclose(fed, expected(image), atol=1e-4, rtol=1e-5)
        assert (consumer._layout(2, 33, 35).copies > 0) == (layout != "rows")
        # another array than the one the producer wrote last: the consumer fills itself
        y_other = producer(other.numpy()).copy()
        producer(x.numpy())
        np.testing.assert_allclose(consumer(y_other), expected(other), atol=1e-4, rtol=1e-5)
        # a batch of another size in between: each size has its own buffer, fed alike
        for image in (x[:1], x):
            y = producer(image.numpy())
            np.testing.assert_allclose(consumer(y), expected(image), atol=1e-4, rtol=1e-5)
        empty = producer(np.zeros((0, 6, 33, 35), np.float32))  # an empty batch: an empty output, nothing fed
        assert empty.shape == (0, 12, 33, 35) and consumer(empty).shape == (0, 10, *consumer.output_hw(33, 35))
    assert numba.get_parallel_chunksize() == 0  # the split calls put numba's chunk size back
    with pytest.raises(ValueError, match="cannot feed itself"):
        producer.feeds = producer
    with pytest.raises(ValueError, match="cannot feed one with 6 input"):
        consumer.feeds = producer


THREADS_CHECK = """
import numba, numpy as np
import dnsconvert.targets.sparse_conv as sparse_conv
from dnsconvert.timing import fast_fork_join
assert fast_fork_join() and numba.get_num_threads() == 4
seen, real = [], sparse_conv.conv_parallel
def spy(*args):
    seen.append((numba.get_num_threads(), numba.get_parallel_chunksize()))
    return real(*args)
sparse_conv.conv_parallel = spy
weight = np.random.default_rng(0).standard_normal((8, 4, 3, 3)).astype(np.float32)
sparse_conv.SparseConv2d(weight, None, stride=1, pads=(1, 1, 1, 1), parts=2)(np.ones((1, 4, 9, 9), np.float32))
assert seen == [(2, 1)], seen
assert numba.get_num_threads() == 4 and numba.get_parallel_chunksize() == 0
print("threads ok")
"""


def test_a_split_convolution_runs_on_no_more_threads_than_planned():
    """Its chunks are handed out one at a time, to at most ``parts`` threads where numba may use
    more (four here), and numba's thread count and chunk size are put back after the call."""
    from dnsconvert.timing import fast_fork_join

    if not fast_fork_join():
        pytest.skip("numba's TBB pool is not available (the split runs on the Python worker)")
    _run_check(THREADS_CHECK, "threads ok", NUMBA_NUM_THREADS="4")


def _run_check(script: str, marker: str, **env: str) -> None:
    """``script`` in a fresh interpreter with ``env`` added: it must exit 0 and print ``marker``."""
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", script], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and marker in result.stdout, result.stderr[-2000:]


def test_pooling_and_residual_producers_feed_too():
    """A producer with a fused max pool (LeNet's conv -> pool) and one with a residual both feed
    the next convolution: the consumer's result matches torch with the producer's output blanked."""
    torch.manual_seed(7)
    w1 = torch.randn(8, 3, 5, 5) * (torch.rand(8, 3, 5, 5) > 0.3)
    w2 = torch.randn(6, 8, 3, 3) * (torch.rand(6, 8, 3, 3) > 0.3)
    x = torch.randn(2, 3, 20, 20)
    for parts in (1, 2):
        pooled = SparseConv2d(w1.numpy(), None, stride=1, pads=(2, 2, 2, 2), activation=1, parts=parts, pool=2)
        residual = torch.randn(2, 8, 20, 20)
        added = SparseConv2d(w1.numpy(), None, stride=1, pads=(2, 2, 2, 2), activation=1, parts=parts)
        for producer, first, size in ((pooled, torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(x, w1, padding=2)), 2), 10), (added, torch.relu(torch.nn.functional.conv2d(x, w1, padding=2) + residual), 20)):
            consumer = SparseConv2d(w2.numpy(), None, stride=1, pads=(1, 1, 1, 1), parts=parts, layout="aligned")
            producer.feeds = consumer
            y = producer(x.numpy(), None if producer is pooled else residual.numpy())
            assert y.shape == (2, 8, size, size) and consumer._filled_from is y
            y[...] = np.nan
            np.testing.assert_allclose(consumer(y), torch.nn.functional.conv2d(first, w2, padding=1).numpy(), atol=1e-4, rtol=1e-5)


def test_split_convolutions_are_also_timed_packed():
    """Which layout splits a convolution fastest depends on the CPU (``SparseConv2d``), so with two
    threads the planner times every convolution packed as well, and Linear layers without it."""
    from dnsconvert.export.onnx_export import torch_to_onnx
    from dnsconvert.targets.sparse_graph import find_sparse_ops, load_graph
    from dnsconvert.targets.torch_sparse_cpu import activations, time_op

    torch.manual_seed(2)
    model = torch.nn.Sequential(_Block(), torch.nn.Flatten(), torch.nn.Linear(8 * 10 * 10, 5)).eval()
    graph = load_graph(torch_to_onnx(model, torch.randn(1, 4, 20, 20)))
    weights = [init.name for init in graph.model.graph.initializer if graph.arrays[init.name].ndim in (2, 4)]
    ops = find_sparse_ops(graph, weights)
    feeds = {graph.input_names[0]: np.random.default_rng(0).standard_normal((1, 4, 20, 20)).astype(np.float32)}
    values = activations(graph, feeds, sorted({op.x for op in ops} | {op.residual for op in ops if op.residual}), 2)
    assert {op.kind for op in ops} == {"conv", "linear"}
    for op in ops:
        for threads, expected in ((1, {"dense", "serial"}), (2, {"dense", "serial", "parallel"} | ({"parallel_packed"} if op.kind == "conv" else set()))):
            timed = time_op(graph, op, values, threads, 0.02)
            assert set(timed) == expected and all(ms > 0 for ms in timed.values())


@pytest.mark.parametrize("kernel", ["parallel", "parallel_packed"])
def test_graph_steps_link_each_convolution_to_the_reader_with_the_largest_kernel(kernel):
    """Two residual blocks: the first block's output is read by the second's 3x3 convolution and
    by its 1x1 downsample; the 3x3 one (the costlier buffer) is fed. The run matches torch, with
    the split convolutions in their default layouts and in the packed one."""
    from dnsconvert.export.onnx_export import torch_to_onnx
    from dnsconvert.targets.sparse_graph import ConvStep, GraphRunner, build_steps, find_sparse_ops, load_graph

    torch.manual_seed(1)
    model = torch.nn.Sequential(_Block(), _Block(8)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight *= torch.rand_like(module.weight) > 0.5
    graph = load_graph(torch_to_onnx(model, torch.randn(1, 4, 20, 20)))
    weights = [init.name for init in graph.model.graph.initializer if graph.arrays[init.name].ndim == 4]
    ops = find_sparse_ops(graph, weights)
    for threads in (1, 2):
        steps = build_steps(graph, ops, {op.name: kernel for op in ops}, threads)
        convs = [step.conv for step in steps if isinstance(step, ConvStep)]
        assert len(convs) == 6 and {conv.parts for conv in convs} == {threads}
        # packed only where split: one thread runs the serial kernel and its own layout
        assert {conv.layout for conv in convs} == {"packed" if kernel == "parallel_packed" and threads > 1 else "auto"}
        described = [s for s in GraphRunner(graph, steps, "planned").describe() if s["step"] == "sparse conv"]
        assert [s.get("layout", "auto") for s in described] == [conv.layout for conv in convs]
        block1_out = next(step for step in steps if isinstance(step, ConvStep) and step.residual).outputs[0]
        readers = [step.conv for step in steps if isinstance(step, ConvStep) and step.inputs[0] == block1_out]
        producer = next(step.conv for step in steps if isinstance(step, ConvStep) and step.outputs[0] == block1_out)
        assert sorted(r.kh for r in readers) == [1, 3] and producer.feeds is next(r for r in readers if r.kh == 3)
        assert sum(conv.feeds is not None for conv in convs) == 3  # conv1 -> conv2 in each block, block 1 -> block 2's conv1
        runner = GraphRunner(graph, steps, "planned")
        x = torch.randn(2, 4, 20, 20)
        with torch.no_grad():
            expected = model(x).numpy()
        for _ in range(2):
            np.testing.assert_allclose(runner.run_feeds({graph.input_names[0]: x.numpy()})[0], expected, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("index_type", [np.int32, np.int64])
def test_register_tiles_add_every_row_once(index_type):
    """tile_rows against numpy for every tail (lengths 16..512 in whole vectors), a stride and a
    shift, 32- and 64-bit indices, and a row with no nonzero."""
    from numba import njit

    from dnsconvert.targets.register_tiles import tile_rows

    @njit
    def run(acc, src, off, val, start, stop, stride, shift, length):
        tile_rows(acc, src, off, val, start, stop, stride, shift, length)

    rng = np.random.default_rng(0)
    src = rng.standard_normal(40 * 48 + 600).astype(np.float32)
    for length in (16, 32, 48, 64, 112, 128, 144, 240, 512):
        for start, stop in ((0, 0), (0, 1), (3, 40)):
            off = rng.integers(0, 40, size=40).astype(index_type)
            val = rng.standard_normal(40).astype(np.float32)
            acc = rng.standard_normal(length + 16).astype(np.float32)
            expected = acc.astype(np.float64)
            for k in range(start, stop):
                row = int(off[k]) * 48 + 5
                expected[:length] += float(val[k]) * src[row : row + length]
            run(acc, src, off, val, start, stop, 48, 5, length)
            np.testing.assert_allclose(acc, expected, atol=1e-4, rtol=1e-5)


ACTIVATIONS = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda v: v}


def _chain_and_reference(seed, shapes, activations, edit=lambda weights: None):
    """Random Linear layers (~40% of weights kept, then ``edit``ed in place) as CSR layers, and
    the dense torch forward of the same layers."""
    torch.manual_seed(seed)
    weights = [torch.randn(*s) * (torch.rand(*s) > 0.6) for s in shapes]
    edit(weights)
    biases = [torch.randn(s[0]) for s in shapes]
    layers = [CsrLayer.from_dense(w.numpy(), b.numpy(), a) for w, b, a in zip(weights, biases, activations)]

    def reference(x):
        for w, b, a in zip(weights, biases, activations):
            x = ACTIVATIONS[a](torch.nn.functional.linear(x, w, b))
        return x

    return layers, reference


@pytest.mark.parametrize("tokens", [1, 37, 64, 600])
def test_linear_chain_matches_torch(tokens):
    layers, reference = _chain_and_reference(tokens, [(40, 30), (20, 40), (25, 20), (10, 25), (7, 10)], ["relu", "gelu", "tanh", "sigmoid", "identity"])
    x = torch.randn(tokens, 30)
    for parts in (1, 2):
        np.testing.assert_allclose(CsrChain(layers, parts=parts).rows_major(x.numpy()), reference(x).numpy(), atol=1e-5, rtol=1e-5)


def _without_inputs(weights):
    weights[0][::3] = 0  # every third neuron of the first layer has no input
    weights[0][:, 1::2] = 0  # and half the inputs are read by none: only the others are transposed
    weights[1][:5] = 0
    weights[1][5] = 0
    weights[1][5][::3] = 1.0  # a row that reads only dead neurons: it empties once they are folded
    weights[2][:] = 0  # a whole layer without inputs: the rest of the chain is a constant
    weights[4][3] = 0  # the last layer keeps its empty row (it is an output)


@pytest.mark.parametrize("tokens", [1, 37])
def test_linear_chain_folds_neurons_without_inputs(tokens):
    """Rows without a nonzero (neurons DNS cut off) are folded into the next layer's bias; the
    output is the dense model's, whatever the activation, across column blocks (1100 inputs),
    when a whole layer dies, and when the folding empties rows of the next layer in turn."""
    shapes = [(40, 1100), (20, 40), (6, 20), (10, 6), (7, 10)]
    layers, reference = _chain_and_reference(tokens, shapes, ["gelu", "relu", "sigmoid", "tanh", "identity"], _without_inputs)
    x = torch.randn(tokens, 1100)
    for parts in (1, 2):
        chain = CsrChain(layers, parts=parts)
        assert chain.folded_rows == 14 + 6 + 6 + 10  # layer 1's dead third, 6 rows of layer 2, all of layers 3 and 4
        assert chain.out_features == 7
        assert chain.read_features.tolist() == list(range(0, 1100, 2))
        np.testing.assert_allclose(chain.rows_major(x.numpy()), reference(x).numpy(), atol=1e-5, rtol=1e-5)


def test_kernels_refuse_inputs_that_do_not_fit():
    chain = CsrChain([CsrLayer.from_dense(np.eye(4, 6, dtype=np.float32), None)])
    with pytest.raises(ValueError, match="6"):
        chain.rows_major(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError):
        chain(np.zeros((6, 2), np.float64))
    with pytest.raises(ValueError, match="shorter|chained"):
        CsrChain([CsrLayer.from_dense(np.ones((4, 6), np.float32), None), CsrLayer.from_dense(np.ones((3, 5), np.float32), None)])
    conv = SparseConv2d(np.ones((2, 3, 3, 3), np.float32), None, stride=1, pads=(0, 0, 0, 0))
    with pytest.raises(ValueError, match="3"):
        conv(np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(ValueError, match="smaller"):
        conv(np.zeros((1, 3, 2, 2), np.float32))


class _Block(torch.nn.Module):
    """A ResNet basic block with a strided 1x1 shortcut (conv-BN, BN folded by the exporter)."""

    def __init__(self, channels: int = 4):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, 8, 3, 2, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.down = torch.nn.Sequential(torch.nn.Conv2d(channels, 8, 1, 2, bias=False), torch.nn.BatchNorm2d(8))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


def test_residual_block_runs_with_fused_residual_and_relu():
    from dnsconvert.export.onnx_export import torch_to_onnx
    from dnsconvert.targets.sparse_graph import GraphRunner, build_steps, find_sparse_ops, load_graph

    torch.manual_seed(0)
    block = _Block().eval()
    for bn in (block.bn1, block.bn2, block.down[1]):  # non-trivial statistics so that folding matters
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
    with torch.no_grad():
        for conv in (block.conv1, block.conv2, block.down[0]):
            conv.weight *= torch.rand_like(conv.weight) > 0.6
    graph = load_graph(torch_to_onnx(block, torch.randn(2, 4, 10, 10)))
    weights = [init.name for init in graph.model.graph.initializer if graph.arrays[init.name].ndim == 4]
    ops = find_sparse_ops(graph, weights)
    assert len(ops) == 3 and sum(op.residual is not None for op in ops) == 1
    assert sorted(op.activation for op in ops) == ["identity", "relu", "relu"]
    runner = GraphRunner(graph, build_steps(graph, ops, {op.name: "serial" for op in ops}, 1), "planned")
    assert {s["step"] for s in runner.describe()} == {"sparse conv"}  # BN folded, Add+Relu fused: nothing left for ONNX Runtime
    x = torch.randn(3, 4, 10, 10)
    with torch.no_grad():
        expected = block(x).numpy()
    np.testing.assert_allclose(runner.run_feeds({graph.input_names[0]: x.numpy()})[0], expected, atol=1e-5, rtol=1e-5)


def test_one_openmp_runtime_with_parallel_kernels():
    """torch's bundled libgomp and numba's kernels in one process: numba must not load a second
    OpenMP runtime (that pairing made dense PyTorch runs 25-30x slower)."""
    import numba

    from dnsconvert.timing import openmp_runtimes, pin_threads

    torch.ones(64, 64) @ torch.ones(64, 64)  # torch's OpenMP pool is up
    chain = CsrChain([CsrLayer.from_dense(np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32), None, "relu")], parts=2)
    chain.rows_major(np.ones((16, 32), np.float32))  # a parallel kernel has run
    settings = pin_threads(2)
    assert numba.threading_layer() in ("tbb", "workqueue") and settings.numba_threading_layer == numba.threading_layer()
    assert len(openmp_runtimes()) <= 1, openmp_runtimes()


def test_parallel_kernels_run_on_tbb_when_it_is_installed():
    """The ``tbb`` wheel is a dependency: where it is installed its pool must actually load (the
    wheel's library sits outside the loader's path), else every parallel kernel silently pays a
    Python worker's ~60 us wake."""
    from importlib import metadata

    from dnsconvert.timing import fast_fork_join

    try:
        metadata.distribution("tbb")
    except metadata.PackageNotFoundError:
        pytest.skip("the tbb wheel is not installed (parallel kernels use the Python worker)")
    assert fast_fork_join()


FALLBACK_CHECK = """
import numpy as np
from dnsconvert.targets.csr_kernels import CsrChain, CsrLayer
from dnsconvert.targets.dense_fallback import FollowFaster
from dnsconvert.targets.sparse_conv import SparseConv2d
from dnsconvert.timing import fast_fork_join, pin_threads
pin_threads(2)
assert not fast_fork_join()
rng = np.random.default_rng(0)
w1 = rng.standard_normal((96, 80)).astype(np.float32) * (rng.random((96, 80)) < 0.2)
w2 = rng.standard_normal((40, 96)).astype(np.float32) * (rng.random((40, 96)) < 0.2)
layers = [CsrLayer.from_dense(w1, rng.standard_normal(96).astype(np.float32), "relu"), CsrLayer.from_dense(w2, None, "identity")]
x = rng.standard_normal((16, 80)).astype(np.float32)
np.testing.assert_array_equal(CsrChain(layers, parts=2).rows_major(x), CsrChain(layers, parts=1).rows_major(x))
w = rng.standard_normal((24, 8, 3, 3)).astype(np.float32) * (rng.random((24, 8, 3, 3)) < 0.3)
image = rng.standard_normal((2, 8, 9, 9)).astype(np.float32)
conv = lambda parts: SparseConv2d(w, None, stride=2, pads=(1, 1, 1, 1), activation=1, parts=parts)(image)
np.testing.assert_array_equal(conv(2), conv(1))
w2 = rng.standard_normal((16, 24, 3, 3)).astype(np.float32) * (rng.random((16, 24, 3, 3)) < 0.5)
def fed_pair(parts):
    first = SparseConv2d(w, None, stride=2, pads=(1, 1, 1, 1), activation=1, parts=parts)
    second = SparseConv2d(w2, None, stride=1, pads=(1, 1, 1, 1), parts=parts, layout="aligned")
    first.feeds = second
    y = first(image)
    y[...] = np.nan  # the second must read what the first's shares wrote into its buffer
    return second(y)
unfed = SparseConv2d(w2, None, stride=1, pads=(1, 1, 1, 1), parts=1, layout="aligned")(conv(1))
np.testing.assert_array_equal(fed_pair(2), unfed)
print("fallback ok")
"""


def test_parallel_kernels_without_tbb_split_over_a_python_worker():
    """With TBB refused (``DNSCONVERT_NO_TBB``, as where the wheel is missing) the parallel chain and
    convolution run on the Python worker, give the serial kernels' results, and numba stays off OpenMP."""
    _run_check(FALLBACK_CHECK, "fallback ok", DNSCONVERT_NO_TBB="1")


@pytest.mark.slow
def test_kernels_stay_in_bounds_under_numba_boundscheck(tmp_path):
    """The kernels index without bounds checks; rerun their tests with numba's checks on (a
    fresh cache, so everything is recompiled): an out-of-bounds read or write raises there."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    here = Path(__file__)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:logging", str(here), "-k", "conv or chain or residual or matches_dense or tiles"],
        env=env, cwd=here.parent.parent, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:]
