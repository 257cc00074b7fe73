"""Time per training step with DNS surgery vs without (same model, batch, optimizer, data).

    python benchmarks/surgery_overhead.py [--threads 2] [--steps 400]

Plain step: forward, backward, SGD step. DNS step: the same plus ``DynamicNetworkSurgery.step()``
in three regimes: masks fixed (after iter_stop, most of a run), the reference schedule early in
training (an update with probability ~1 per layer), and an update at every step (gamma=0).
Reports the median of 5 repeats of ``--steps`` steps each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from dnsconvert.models import build_model, builtin_spec
from dnsconvert.surgery import DNSConfig, DynamicNetworkSurgery


def run(name: str, surgery: bool, steps: int, batch: int, gamma: float, iter_stop: int) -> float:
    torch.manual_seed(0)
    model = build_model(builtin_spec(name))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dns = DynamicNetworkSurgery(model, DNSConfig(c=1.0, gamma=gamma, iter_stop=iter_stop)) if surgery else None
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    def train_step() -> None:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if dns:
            dns.step()

    for _ in range(20):  # warm-up
        train_step()
    started = time.perf_counter()
    for _ in range(steps):
        train_step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in ("lenet300100", "lenet5"):
        cases = (
            (0.0, 0, "masks fixed (after iter_stop)"),
            (1e-4, 10**9, "reference schedule gamma=1e-4, steps 20-420"),
            (0.0, 10**9, "mask update at every step (worst case)"),
        )
        for gamma, iter_stop, label in cases:
            plain, dns = [], []
            for _ in range(5):
                plain.append(run(name, False, args.steps, args.batch, gamma, iter_stop))
                dns.append(run(name, True, args.steps, args.batch, gamma, iter_stop))
            p, d = statistics.median(plain), statistics.median(dns)
            rows.append({"model": name, "mask_updates": label, "plain_ms": 1e3 * p, "dns_ms": 1e3 * d, "ratio": d / p})
            print(f"{name:12s} {label:48s} plain {1e3 * p:7.3f} ms  dns {1e3 * d:7.3f} ms  ratio {d / p:.3f}", flush=True)
    # A whole run as in benchmarks/mnist_table.py (20 epochs = 18,740 steps, iter_stop 13,118,
    # gamma 1e-4): the expected share of layer-steps with a mask update, and the implied ratio.
    share = sum((1 + 1e-4 * i) ** -1 for i in range(13_118)) / 18_740
    for name in ("lenet300100", "lenet5"):
        fixed = next(r for r in rows if r["model"] == name and r["mask_updates"].startswith("masks fixed"))
        every = next(r for r in rows if r["model"] == name and r["mask_updates"].startswith("mask update at every"))
        whole = fixed["ratio"] + share * (every["ratio"] - fixed["ratio"])
        rows.append({"model": name, "mask_updates": f"whole 20-epoch run (update share {share:.2f})", "ratio": whole})
        print(f"{name:12s} whole 20-epoch run: mask updates on {share:.0%} of steps -> expected ratio {whole:.3f}")
    print(json.dumps({"threads": args.threads, "batch": args.batch, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
