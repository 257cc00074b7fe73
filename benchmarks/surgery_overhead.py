"""Time per training step with DNS surgery vs without, over a whole run's schedule.

    python benchmarks/surgery_overhead.py [--data ../shared/data/mnist] [--preset tuned] [--threads 1]
        [--segments 8] [--steps 200] [--repeats 3] [--models lenet300100 lenet5]

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
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def load_presets() -> dict:
    spec = importlib.util.spec_from_file_location("mnist_table", Path(__file__).with_name("mnist_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PRESETS


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
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu", help="thread CPU time (default; robust to other processes) or wall time")
    parser.add_argument("--step", choices=["bare", "trainer"], default="bare", help="bare: forward, backward, SGD on a ready batch; trainer: also draw and normalise the batch and read loss/accuracy, as dnsconvert prune does")
    args = parser.parse_args()
    global CLOCK, TRAINER_STEP
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    TRAINER_STEP = args.step == "trainer"
    torch.set_num_threads(args.threads)
    presets = load_presets()
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
