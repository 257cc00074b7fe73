"""Saliency criteria for the prune/splice machinery: magnitude, Taylor, movement.

A criterion turns a layer's dense weights W (and the loss gradient g at the current step)
into a score; DNS cuts low scores and splices high ones.

- ``magnitude``: |W| (the paper).
- ``taylor``: running average of |W·g| (first-order Taylor estimate of the loss change).
- ``movement``: accumulated −W·g (movement pruning, Sanh et al. 2020): weights moving away
  from zero score high. Signed, so its thresholds are not clamped at zero.
"""

from __future__ import annotations

import torch

from ..errors import UserError

CRITERIA = ("magnitude", "taylor", "movement")


class Criterion:
    name = "base"
    needs_grad = False
    nonnegative = True

    def observe(self, name: str, weight: torch.Tensor, grad: torch.Tensor | None) -> None:
        """Called once per step for every layer, before masks may be updated."""

    def score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Magnitude(Criterion):
    name = "magnitude"

    def score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight.abs()


class _Accumulating(Criterion):
    needs_grad = True

    def __init__(self) -> None:
        self.scores: dict[str, torch.Tensor] = {}

    def _grad(self, name: str, grad: torch.Tensor | None) -> torch.Tensor:
        if grad is None:
            raise UserError(
                f"criterion {self.name!r} needs the gradient of {name!r}, which is None",
                hint="call sparsifier.step() after optimizer.step() and before optimizer.zero_grad()",
            )
        return grad

    def score(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self.scores[name] if name in self.scores else weight.abs()

    def state_dict(self) -> dict:
        return {"scores": {k: v.detach().cpu().clone() for k, v in self.scores.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.scores = {k: v.clone() for k, v in (state.get("scores") or {}).items()}


class Taylor(_Accumulating):
    name = "taylor"

    def __init__(self, beta: float = 0.9) -> None:
        super().__init__()
        self.beta = beta

    def observe(self, name: str, weight: torch.Tensor, grad: torch.Tensor | None) -> None:
        value = (weight * self._grad(name, grad)).abs()
        if name not in self.scores:
            self.scores[name] = value.clone()
        else:
            self.scores[name].mul_(self.beta).add_(value, alpha=1.0 - self.beta)


class Movement(_Accumulating):
    name = "movement"
    nonnegative = False

    def observe(self, name: str, weight: torch.Tensor, grad: torch.Tensor | None) -> None:
        value = -(weight * self._grad(name, grad))
        if name not in self.scores:
            self.scores[name] = value.clone()
        else:
            self.scores[name].add_(value)


def make_criterion(name: str) -> Criterion:
    if name == "magnitude":
        return Magnitude()
    if name == "taylor":
        return Taylor()
    if name == "movement":
        return Movement()
    raise UserError(f"unknown saliency criterion {name!r}", hint=f"choose one of {', '.join(CRITERIA)}")
