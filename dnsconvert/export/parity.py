"""Parity: the same fixed inputs through the PyTorch model and an exported artifact's runner,
every output compared."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import numpy as np

from ..artifact.manifest import OutputParity, ParityReport

RunFn = Callable[[Mapping[str, np.ndarray]], Sequence[np.ndarray]]


def compare(
    reference: RunFn,
    candidate: RunFn,
    feeds: Sequence[Mapping[str, np.ndarray]],
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    output_names: Sequence[str] | None = None,
) -> ParityReport:
    """Per output, max |Δ| and max |Δ|/max|ref| over all feeds; passes when every output is
    allclose(candidate, ref, rtol, atol) for every feed."""
    batches = tuple(int(next(iter(f.values())).shape[0]) if f and next(iter(f.values())).ndim else 1 for f in feeds)
    stats: dict[int, list[float]] = {}  # output index -> [max_abs, max_rel, passed]
    for x in feeds:
        refs, gots = list(reference(x)), list(candidate(x))
        if len(refs) != len(gots):
            return _failed(atol, rtol, batches, f"{len(gots)} output(s), the reference has {len(refs)}")
        for k, (ref, got) in enumerate(zip(refs, gots)):
            ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
            if ref.shape != got.shape:
                return _failed(atol, rtol, batches, f"output {k} has shape {got.shape}, the reference {ref.shape}")
            diff = np.abs(got - ref)
            worst = float(diff.max(initial=0.0))
            rel = worst / max(float(np.abs(ref).max(initial=0.0)), 1e-12)
            ok = bool(np.all(diff <= atol + rtol * np.abs(ref))) and not bool(np.isnan(got).any() != np.isnan(ref).any())
            entry = stats.setdefault(k, [0.0, 0.0, 1.0])
            entry[0], entry[1], entry[2] = max(entry[0], worst), max(entry[1], rel), float(entry[2] and ok)
    names = list(output_names) if output_names else [f"output_{k}" for k in range(len(stats))]
    outputs = tuple(
        OutputParity(name=names[k] if k < len(names) else f"output_{k}", max_abs=v[0], max_rel=v[1], passed=bool(v[2])) for k, v in sorted(stats.items())
    )
    return ParityReport(
        max_abs=max((o.max_abs for o in outputs), default=0.0),
        max_rel=max((o.max_rel for o in outputs), default=0.0),
        atol=atol,
        rtol=rtol,
        batches=batches,
        passed=all(o.passed for o in outputs),
        outputs=outputs,
    )


def _failed(atol: float, rtol: float, batches: tuple[int, ...], problem: str) -> ParityReport:
    return ParityReport(max_abs=float("inf"), max_rel=float("inf"), atol=atol, rtol=rtol, batches=batches, passed=False, problem=problem)
