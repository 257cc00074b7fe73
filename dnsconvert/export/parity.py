"""Parity: the same fixed inputs through the PyTorch model and an exported artifact's runner."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class ParityReport:
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    batches: tuple[int, ...]
    passed: bool

    def to_json(self) -> dict:
        data = asdict(self)
        data["batches"] = list(self.batches)
        return data


def parity_inputs(input_shape: Sequence[int], batches: Sequence[int], seed: int = 1234) -> list[np.ndarray]:
    from ..limits import check_input

    for batch in batches:  # h11 (issue 11): bounded before allocating
        check_input((batch, *input_shape[1:]), "a parity input")
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn((b, *input_shape[1:]), generator=generator).numpy() for b in batches]


def compare(
    reference: Callable[[np.ndarray], np.ndarray],
    candidate: Callable[[np.ndarray], np.ndarray],
    inputs: Sequence[np.ndarray],
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> ParityReport:
    """max |Δ| and max |Δ|/max|ref| over all inputs; passes when allclose(candidate, ref, rtol, atol)."""
    max_abs, max_rel, passed = 0.0, 0.0, True
    for x in inputs:
        ref = np.asarray(reference(x), dtype=np.float64)
        got = np.asarray(candidate(x), dtype=np.float64)
        if ref.shape != got.shape:
            return ParityReport(float("inf"), float("inf"), atol, rtol, tuple(len(i) for i in inputs), False)
        diff = np.abs(got - ref)
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        max_rel = max(max_rel, float(diff.max(initial=0.0) / max(np.abs(ref).max(initial=0.0), 1e-12)))
        passed &= bool(np.all(diff <= atol + rtol * np.abs(ref)))
    return ParityReport(max_abs, max_rel, atol, rtol, tuple(len(i) for i in inputs), passed)


def torch_runner(model: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    model.eval()

    @torch.no_grad()
    def run(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x)).numpy()

    return run
