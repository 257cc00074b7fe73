"""Time per training step with DNS surgery vs without, over a whole run's schedule.

    python benchmarks/surgery_overhead.py [--data ../shared/data/mnist] [--preset tuned] [--threads 1]
        [--segments 8] [--steps 200] [--repeats 3] [--models lenet300100 lenet5]
    python benchmarks/surgery_overhead.py --whole-run 4 [--side-by-side] [--null] [--models lenet300100] [--data ...]

Two copies of a model train on the same batches, drawn as the trainer draws them (one
permutation per epoch, uint8 images normalised per batch): one plain (forward, backward, SGD
with momentum and weight decay), one with ``DynamicNetworkSurgery.step()`` after each step,
with the preset's DNS settings from ``mnist_table.py`` (per-layer targets, thresholds
re-estimated at every update, gamma, iter_stop). The run's DNS phase is cut into
``--segments`` equal parts; in each, ``--steps`` steps are timed for both models in turn, the
DNS iteration set to the segment's start, so that the update probability (1 + γ·iter)^−1 and
iter_stop are those of the run. DNS-phase ratio = Σ DNS time / Σ plain time (each segment
stands for an equal share of the phase). Whole run = the same weighted by step counts, with
the dense warm-up (no surgery) and the masked fine-tuning (``FixedMaskSparsifier.step()``,
timed too) included. Everything is repeated ``--repeats`` times, interleaved, in one process;
prints the median and the range of each ratio, and JSON. ``--step bare`` (default) times
forward, backward and SGD on a ready batch; ``--step trainer`` times the step as ``dnsconvert
prune`` runs it (the batch drawn and normalised, running loss and accuracy read) — the
denominator of a whole run's wall time. Times are the thread's CPU time by
default (``--clock wall`` for wall time): on a machine shared with other processes, wall time
also counts the time the process waits for a core.

``--whole-run PAIRS`` measures the goal's quantity literally instead: whole ``prune()`` runs
(what ``dnsconvert prune`` calls: data, trainer, evaluation, checkpoint), the preset's DNS run
against the same trainer training densely for as many steps (``--dense-epochs`` = warm-up + DNS
+ fine-tuning epochs, no surgery), each run in a fresh process on one thread, one run at a
time, in the order dense, DNS, DNS, dense, ... (so that a drift of the machine falls on both;
an even number of pairs balances it), after an untimed short run of each arm (a cold numba cache
would otherwise put ~10 s of compiling into the first DNS run); prints each pair's ratio of
process CPU time (and wall time), their median and range, and JSON. A pair takes ~100 s for
LeNet-300-100 and ~20 min for LeNet-5. ``--side-by-side`` runs each pair's two runs at once
instead, pinned to the first two CPUs and swapped every pair, so that both meet the same spells
of the machine, at the price of sharing it; the dense run ends a few seconds earlier, so the DNS
run's last seconds have the machine to themselves (a small bias in its favour).

The whole-run estimate is the geometric mean of the pairs' ratios with a 95% bootstrap interval
over pairs (from 5 pairs; fewer give the range only): the same run, bitwise the same result,
takes 3-4 s (7-8%) longer or shorter from one quarter of an hour to the next, and the DNS run's
memory-bound share moves with the machine's state more than the dense run does, so a single
pair's ratio is the overhead times noise, and the overhead is what the pairs agree on.
``--null`` checks the method for bias: both arms dense (an A/A test), whose pairs should centre
on 1.0 (their spread is the noise between two processes of the same work, narrower than the
DNS pairs' scatter).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def load_table() -> Any:
    """benchmarks/mnist_table.py: its presets and its one-run worker."""
    spec = importlib.util.spec_from_file_location("mnist_table", Path(__file__).with_name("mnist_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_presets() -> dict:
    return load_table().PRESETS


def dense_settings(s: dict) -> dict:
    """The dense arm: every epoch of the DNS run (warm-up, DNS phase, fine-tuning) trained
    densely; the trainer's DNS phase then has zero steps (its sparsifier is built and
    all-ones masks are saved: milliseconds) and no step touches a mask."""
    return {**s, "dense_epochs": s["dense_epochs"] + s["epochs"] + s["finetune_epochs"], "epochs": 0, "finetune_epochs": 0}


def steps_of(s: dict) -> tuple[int, int]:
    """(DNS run's steps, dense run's steps) as the trainer plans them (``plan_phases``)."""
    from dnsconvert.models import builtin_spec
    from dnsconvert.surgery.train import PruneConfig, plan_phases

    per_epoch = load_table().STEPS_PER_EPOCH  # MNIST's 60,000 training images at the presets' batch of 64

    def planned(x: dict) -> int:
        # the plan reads only the epochs (any model will do)
        config = PruneConfig(model=builtin_spec("lenet300100"), method="dns", dense_epochs=x["dense_epochs"], epochs=x["epochs"], finetune_epochs=x["finetune_epochs"])
        return sum(phase.steps for phase in plan_phases(config, per_epoch))

    return planned(s), planned(dense_settings(s))


def short_settings(s: dict) -> dict:
    """The preset cut to 85 steps (19 dense, 47 DNS, 19 fine-tuning): the untimed warm-up."""
    return {**s, "dense_epochs": 0.02, "epochs": 0.05, "finetune_epochs": 0.02, "iter_stop": 40}


def whole_run(model: str, kind: str, s: dict, data_dir: str, out: str, cpu: int | None = None) -> dict:
    """One whole ``prune()`` run in this process (fresh, one thread, pinned to ``cpu`` if given):
    ``kind`` "dns" is the preset's run as mnist_table.py makes it (seed 0); "dense" the same
    trainer for as many steps with no surgery (``dense_settings``); "dense-b" another dense run,
    the A/A arm of ``--null``."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    if kind in ("dense", "dense-b"):
        s = dense_settings(s)
    out_dir = Path(out) / kind  # side by side, the two runs write their checkpoints apart
    out_dir.mkdir(parents=True, exist_ok=True)
    row = load_table().run(model, "dns", 0, s, s["layers"], data_dir, str(out_dir))
    return {"kind": kind, "cpu": cpu, **{k: row[k] for k in ("steps", "wall_seconds", "cpu_seconds", "sparsity", "test_error")}}


def _whole_run_worker(connection, *args) -> None:
    """A fresh process's whole run, its row (or its error) sent back through ``connection``."""
    try:
        connection.send(("row", whole_run(*args)))
    except BaseException as error:  # noqa: BLE001 - reported by the parent, which stops the benchmark
        connection.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        connection.close()


def run_at_once(jobs: list[tuple], data_dir: str, out: str) -> list[dict]:
    """Run each job (model, kind, settings, cpu) in its own fresh spawned process, all at once,
    and return their rows in order. Plain processes, not a pool: a pool that recycles its
    workers starts a replacement (importing torch) as soon as one run ends, beside the other."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    started = []
    for model, kind, s, cpu in jobs:
        receive, send = spawn.Pipe(duplex=False)
        process = spawn.Process(target=_whole_run_worker, args=(send, model, kind, s, data_dir, out, cpu))
        process.start()
        send.close()  # the child holds the only sending end: its death without a row is an EOF here
        started.append((process, receive))
    rows = []
    for process, receive in started:
        try:
            tag, value = receive.recv()
        except EOFError:
            process.join()
            tag, value = "error", f"the worker died (exit code {process.exitcode})"
        process.join()
        if tag == "error":
            raise SystemExit(f"a whole run failed: {value}")
        rows.append(value)
    return rows


MIN_PAIRS_FOR_INTERVAL = 5  # below this a percentile bootstrap's 95% ends are just the extreme pairs


def pairs_estimate(ratios: list[float], resamples: int = 10_000, seed: int = 0) -> dict:
    """The geometric mean of per-pair ratios and its 95% percentile bootstrap interval over pairs
    (resampled with replacement; the seed fixes the interval for given ratios). With fewer than
    ``MIN_PAIRS_FOR_INTERVAL`` pairs there is no interval (low, high None): a resample that draws
    one pair n times has probability n^(1-n) (1/27 for 3 pairs, above 2.5%), so the percentiles
    would land on the lowest and highest ratio and call a range an interval."""
    import numpy as np

    logs = np.log(np.asarray(ratios, dtype=np.float64))
    estimate = float(np.exp(logs.mean()))
    if len(logs) < MIN_PAIRS_FOR_INTERVAL:
        return {"geomean": estimate, "low": None, "high": None}
    picks = np.random.default_rng(seed).integers(0, len(logs), size=(resamples, len(logs)))
    means = logs[picks].mean(axis=1)
    low, high = np.exp(np.percentile(means, [2.5, 97.5]))
    return {"geomean": estimate, "low": float(low), "high": float(high)}


def measure_whole_runs(name: str, s: dict, pairs: int, data_dir: str, side_by_side: bool = False, runner=None, cpus: tuple[int, int] = (0, 1), null: bool = False) -> dict:
    """``pairs`` pairs of whole runs, after an untimed short run of each arm (numba's on-disk
    cache of the surgery kernels may be cold, after a fresh clone or an edit: compiling them,
    ~10 s, would land in the first DNS run). One run at a time, dense and DNS alternating ABBA;
    or, ``side_by_side``, each pair's two runs at once on ``cpus``, swapped every pair. ``null``:
    the second arm is another dense run (A/A), so the ratios show the noise between processes.
    ``runner(jobs, data_dir, out)`` runs jobs at once (``run_at_once``; a test passes its own)."""
    import tempfile

    runner = runner or run_at_once
    other = "dense-b" if null else "dns"
    dns_steps, dense_steps = steps_of(s)
    if dns_steps != dense_steps:  # fractional epochs round per phase: say so before an hour of runs
        raise SystemExit(f"{name}: the DNS run would train {dns_steps} steps and the dense run {dense_steps}; use epochs that are whole multiples of 1/{load_table().STEPS_PER_EPOCH}")
    runs: dict[str, list[dict]] = {"dense": [], other: []}

    def report(row: dict) -> None:
        runs[row["kind"]].append(row)
        where = f" on CPU {row['cpu']}" if row["cpu"] is not None else ""
        print(f"{name:12s} {row['kind']:5s} run{where}: {row['cpu_seconds']:.2f} s CPU, {row['wall_seconds']:.2f} s wall, {row['steps']} steps, sparsity {row['sparsity']:.1%}, error {row['test_error']:.2%}", flush=True)

    with tempfile.TemporaryDirectory() as out:
        for kind in (other, "dense"):  # the warm-up: compiled kernels cached, files read once
            runner([(name, kind, short_settings(s), None)], data_dir, out)
        for i in range(pairs):
            if side_by_side:
                first, second = cpus if i % 2 == 0 else cpus[::-1]
                for row in runner([(name, "dense", s, first), (name, other, s, second)], data_dir, out):
                    report(row)
            else:
                for kind in ("dense", other) if i % 2 == 0 else (other, "dense"):
                    report(runner([(name, kind, s, None)], data_dir, out)[0])
    if any(d["steps"] != r["steps"] for d, r in zip(runs["dense"], runs[other], strict=True)):
        raise SystemExit("the two arms trained for different numbers of steps")
    summary: dict[str, Any] = {"model": name, "side_by_side": side_by_side, "null": null, "pairs": [{"dense": d, other: r} for d, r in zip(runs["dense"], runs[other], strict=True)]}
    for clock in ("cpu", "wall"):
        ratios = [r[f"{clock}_seconds"] / d[f"{clock}_seconds"] for d, r in zip(runs["dense"], runs[other], strict=True)]
        summary[f"whole_run_{clock}"] = {"ratios": ratios, "median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), **pairs_estimate(ratios)}
    return summary


class Batches:
    """The trainer's batches: one permutation per epoch, MNIST (or random digits if absent)."""

    def __init__(self, data_dir: str, batch: int = 64):
        from dnsconvert.data import load_mnist

        try:
            self.train = load_mnist(data_dir).train
        except Exception:  # noqa: BLE001 - a benchmark may run without the data
            from dnsconvert.data import synthetic_digits

            self.train = synthetic_digits().train
        self.batch = batch
        self.step = 0
        self.permutation = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(0))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        per_epoch = len(self.train) // self.batch
        epoch, offset = divmod(self.step, per_epoch)
        if offset == 0:
            self.permutation = torch.randperm(len(self.train), generator=torch.Generator().manual_seed(epoch))
        self.step += 1
        return self.train.batch(self.permutation[offset * self.batch : (offset + 1) * self.batch])


CLOCK = time.thread_time  # CPU time of this thread: what the surgery costs, not time spent descheduled


TRAINER_STEP = False  # --step trainer: the batch is drawn and normalised, and loss/accuracy read, inside the step


def timed_steps(model, optimizer, sparsifier, batches: list, lr_at) -> float:
    """CPU time of len(batches) training steps. ``batches`` holds (x, y) pairs, or Batches
    iterators when the step includes drawing the batch (as ``dnsconvert prune``'s does)."""
    started = CLOCK()
    running_loss = running_acc = 0.0
    for i, item in enumerate(batches):
        x, y = item.next() if TRAINER_STEP else item
        for group in optimizer.param_groups:
            group["lr"] = lr_at(i)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if sparsifier is not None:
            sparsifier.step()
        if TRAINER_STEP:  # the trainer's running loss and accuracy
            running_loss = 0.98 * running_loss + 0.02 * float(loss.detach())
            running_acc = 0.98 * running_acc + 0.02 * float((logits.detach().argmax(1) == y).float().mean())
    return CLOCK() - started


def measure(name: str, s: dict, args) -> dict:
    from dnsconvert.models import build_model, builtin_spec
    from dnsconvert.surgery import DNSConfig, DynamicNetworkSurgery, FixedMaskSparsifier

    steps_per_epoch = 937
    dense_steps = int(s["dense_epochs"] * steps_per_epoch)
    dns_steps = int(s["epochs"] * steps_per_epoch)
    finetune_steps = int(s.get("finetune_epochs", 0) * steps_per_epoch)
    torch.manual_seed(0)
    plain = build_model(builtin_spec(name))
    surgery = build_model(builtin_spec(name))
    surgery.load_state_dict(plain.state_dict())
    make_opt = lambda m: torch.optim.SGD(m.parameters(), lr=s["lr"], momentum=0.9, weight_decay=s["weight_decay"])  # noqa: E731
    plain_opt, surgery_opt = make_opt(plain), make_opt(surgery)
    config = DNSConfig(layer_sparsity=s["layers"], reestimate=True, iter_stop=s["iter_stop"], gamma=s["gamma"], power=1.0, seed=0)
    dns = DynamicNetworkSurgery(surgery, config)
    data = Batches(args.data)
    plain_data, surgery_data = Batches(args.data), Batches(args.data)  # trainer step: each model draws its own (same) batches
    lr_at = lambda i: s["lr"]  # noqa: E731 - the same for both models; setting it is part of the step
    # warm both up (allocator, caches, numba's compiled kernels)
    warm = [data.next() for _ in range(30)]
    timed_steps(plain, plain_opt, None, [plain_data] * 30 if TRAINER_STEP else warm, lr_at)
    timed_steps(surgery, surgery_opt, dns, [surgery_data] * 30 if TRAINER_STEP else warm, lr_at)
    starts = [round(k * dns_steps / args.segments) for k in range(args.segments)]
    rounds = []
    for _ in range(args.repeats):
        plain_t = dns_t = 0.0
        for start in starts:
            dns.iteration = start
            batches = [data.next() for _ in range(args.steps)]
            plain_t += timed_steps(plain, plain_opt, None, [plain_data] * args.steps if TRAINER_STEP else batches, lr_at)
            dns_t += timed_steps(surgery, surgery_opt, dns, [surgery_data] * args.steps if TRAINER_STEP else batches, lr_at)
        # masked fine-tuning: the masks DNS ended with, fixed
        fixed = FixedMaskSparsifier(surgery, dns.masks())
        batches = [data.next() for _ in range(args.steps)]
        ft_plain = timed_steps(plain, plain_opt, None, [plain_data] * args.steps if TRAINER_STEP else batches, lr_at) / args.steps
        ft_fixed = timed_steps(surgery, surgery_opt, fixed, [surgery_data] * args.steps if TRAINER_STEP else batches, lr_at) / args.steps
        per_plain = plain_t / (args.segments * args.steps)
        per_dns = dns_t / (args.segments * args.steps)
        dns_ratio = dns_t / plain_t
        ft_ratio = ft_fixed / ft_plain
        total = dense_steps + dns_steps + finetune_steps
        whole = (dense_steps + dns_steps * dns_ratio + finetune_steps * ft_ratio) / total
        rounds.append({"plain_ms": 1e3 * per_plain, "dns_ms": 1e3 * per_dns, "dns_phase": dns_ratio, "masked_finetune": ft_ratio, "whole_run": whole})
    summary = {"model": name, "dense_steps": dense_steps, "dns_steps": dns_steps, "finetune_steps": finetune_steps, "rounds": rounds}
    for key in ("plain_ms", "dns_ms", "dns_phase", "masked_finetune", "whole_run"):
        values = [r[key] for r in rounds]
        summary[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/mnist")
    parser.add_argument("--preset", default="tuned")
    parser.add_argument("--models", nargs="+", default=["lenet300100", "lenet5"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--segments", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="thread CPU time (default; robust to other processes) or wall time (sampled steps only)")
    parser.add_argument("--step", choices=["bare", "trainer"], default="bare", help="bare: forward, backward, SGD on a ready batch; trainer: also draw and normalise the batch and read loss/accuracy, as dnsconvert prune does")
    parser.add_argument("--whole-run", type=int, default=0, metavar="PAIRS", help="time PAIRS pairs of whole prune() runs (dense and DNS, alternating; an even number balances the order) instead of sampled steps; one thread, process CPU and wall time: --threads, --clock, --step, --segments, --steps and --repeats do not apply")
    parser.add_argument("--side-by-side", action="store_true", help="with --whole-run: each pair's dense and DNS runs at once, one on each of the first two CPUs (swapped every pair)")
    parser.add_argument("--null", action="store_true", help="with --whole-run: an A/A test, both arms dense, to measure the noise between processes")
    args = parser.parse_args()
    if args.whole_run < 0:
        parser.error("--whole-run takes a number of pairs >= 1 (0: sampled steps)")
    if args.side_by_side and (args.whole_run == 0 or len(os.sched_getaffinity(0)) < 2):
        parser.error("--side-by-side needs --whole-run PAIRS and two CPUs to run on")
    if args.null and args.whole_run == 0:
        parser.error("--null needs --whole-run PAIRS")
    presets = load_presets()
    unknown = [name for name in args.models if name not in presets.get(args.preset, {})]
    if args.preset not in presets or unknown:
        parser.error(f"--preset must be one of {sorted(presets)} and --models of {sorted(presets['tuned'])}")
    if args.whole_run > 0:
        from dnsconvert.data import load_mnist

        try:  # the whole runs train on real MNIST: a missing directory is one line here, not a worker's traceback
            load_mnist(args.data)
        except Exception as error:  # noqa: BLE001
            parser.error(f"--whole-run needs the MNIST files in --data {args.data}: {error}")
        cpus = tuple(sorted(os.sched_getaffinity(0))[:2]) if args.side_by_side else (0, 1)
        results = []
        for name in args.models:
            r = measure_whole_runs(name, presets[args.preset][name], args.whole_run, args.data, args.side_by_side, cpus=cpus, null=args.null)
            results.append(r)
            print(f"{name:12s} whole prune() run, {'dense / dense (A/A)' if args.null else 'DNS / dense'}, {args.whole_run} pair(s){' side by side' if args.side_by_side else ''}:", flush=True)
            for clock in ("cpu", "wall"):
                e = r[f"whole_run_{clock}"]
                interval = f" [{e['low']:.3f}, {e['high']:.3f}]" if e["low"] is not None else f" (fewer than {MIN_PAIRS_FOR_INTERVAL} pairs: no interval)"
                print(f"{'':12s}   {clock:4s} time: geometric mean {e['geomean']:.3f}x{interval}; median {e['median']:.3f}x, pairs {e['min']:.3f}-{e['max']:.3f}", flush=True)
        print(json.dumps({"preset": args.preset, "whole_run_pairs": args.whole_run, "side_by_side": args.side_by_side, "null": args.null, "threads": 1, "results": results}, indent=2))
        return
    global CLOCK, TRAINER_STEP
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    TRAINER_STEP = args.step == "trainer"
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        r = measure(name, presets[args.preset][name], args)
        results.append(r)
        print(
            f"{name:12s} step {r['plain_ms']['median']:.3f} ms plain, {r['dns_ms']['median']:.3f} ms with DNS; "
            f"DNS phase {r['dns_phase']['median']:.3f}x ({r['dns_phase']['min']:.3f}-{r['dns_phase']['max']:.3f}), "
            f"masked fine-tune {r['masked_finetune']['median']:.3f}x, "
            f"whole run {r['whole_run']['median']:.3f}x ({r['whole_run']['min']:.3f}-{r['whole_run']['max']:.3f})",
            flush=True,
        )
    print(json.dumps({"preset": args.preset, "clock": args.clock, "step": args.step, "threads": args.threads, "segments": args.segments, "steps": args.steps, "repeats": args.repeats, "results": results}, indent=2))


if __name__ == "__main__":
    main()
