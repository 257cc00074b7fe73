"""The ``prune`` stage: train a model under DNS (or a baseline) and return a SparseCheckpoint.

A run is a list of phases (dense warm-up, DNS; or dense, prune + fine-tune; or IMP rounds).
Everything that decides the next step is a function of (seed, phase, step) or lives in the
checkpoint — data order, update draws, learning rate, optimizer and sparsifier state — so a
run killed at any point and resumed from its last periodic checkpoint ends bitwise identical
to an uninterrupted one. Under ``torchrun`` it trains with DDP (gloo on CPU); each rank takes
its share of every global batch and masks are computed identically on all ranks (checked at
the end through a hash all-gather).
"""

from __future__ import annotations

import hashlib
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import PruningInfo, SparseCheckpoint
from ..modelspec import InputSpec, ModelSpec
from ..data import DataSplits, Examples, ImageDataset
from ..errors import InternalError, UserError
from ..models import build_model, load_weights_
from ..userdata import TASKS, Task, first_batch_check, forward, make_task, resolve_training_data, split_batch
from .baselines import magnitude_masks, sparsity_at
from .dns import DNSConfig, DynamicNetworkSurgery
from .sparsifier import FixedMaskSparsifier, MaskedSparsifier, kernels_loaded, prunable_layers, prunable_parameters

METHODS = ("dns", "magnitude", "imp")


@dataclass
class PruneConfig:
    """Everything that defines a pruning run (stored in the checkpoint for resume)."""

    model: ModelSpec
    method: str = "dns"
    dns: DNSConfig = field(default_factory=DNSConfig)
    epochs: float = 1.0  # of the sparse phase (DNS), of fine-tuning (magnitude), per round (IMP)
    dense_epochs: float = 0.0
    finetune_epochs: float = 0.0  # DNS: masked fine-tuning after the DNS phase (masks fixed, lr schedule restarted)
    finetune_lr: float | None = None  # its peak learning rate (default: lr)
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    target_sparsity: float = 0.9  # magnitude / IMP
    imp_rounds: int = 5
    seed: int = 0
    checkpoint_every: int = 500
    data: str = "auto"  # MNIST dir / mnist / synthetic / auto, or a data factory pkg.module:fn
    data_kwargs: dict[str, Any] = field(default_factory=dict)  # of the data factory
    task: str = "classification"  # or causal-lm; the loss and metric (see dnsconvert.userdata)
    loss: str | None = None  # a user loss function pkg.module:fn(output, target), replacing the task's

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown pruning method {self.method!r}", hint=f"choose one of {', '.join(METHODS)}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            raise UserError(f"unknown optimizer {self.optimizer!r}", hint="choose sgd, adam or adamw")
        if self.lr_schedule not in ("cosine", "constant"):
            raise UserError(f"unknown lr schedule {self.lr_schedule!r}", hint="choose cosine or constant")
        if self.batch_size <= 0 or self.epochs < 0 or self.dense_epochs < 0 or self.finetune_epochs < 0:
            raise UserError("batch size must be positive and epochs non-negative")
        if not 0.0 <= self.target_sparsity < 1.0:
            raise UserError(f"target sparsity must lie in [0, 1), got {self.target_sparsity}")
        if self.task not in TASKS:
            raise UserError(f"unknown task {self.task!r}", hint=f"choose one of {', '.join(TASKS)}, or pass --loss pkg.module:fn")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"] = self.model.to_json()
        data["dns"] = self.dns.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PruneConfig:
        data = dict(data)
        # Trust is the caller's decision, never a file's: older checkpoints stored it in the run.
        data.pop("trust_model_code", None)
        data["model"] = ModelSpec.from_json(data["model"])
        data["dns"] = DNSConfig(**data["dns"])
        return cls(**data)


@dataclass(frozen=True)
class Phase:
    kind: str  # dense | dns | masked (DNS's masks, fixed) | finetune (magnitude masks, fixed)
    steps: int
    progress: float | None = None  # magnitude / IMP: fraction of the way to the target, in keep-ratio exponent


@dataclass
class PruneResult:
    checkpoint: SparseCheckpoint
    test_accuracy: float | None  # None when a user loss has no accuracy
    test_loss: float
    sparsity: float
    compression: float
    wall_seconds: float
    steps: int
    data_source: str
    task: str = "classification"  # the task's name, or the user loss function's import path


LOADING_KERNELS = "loading compiled kernels…"  # compiled on the first run after an install: up to ~10 s


def plan_phases(config: PruneConfig, steps_per_epoch: int) -> list[Phase]:
    def steps(epochs: float) -> int:
        return max(0, math.ceil(epochs * steps_per_epoch))

    phases = [Phase("dense", steps(config.dense_epochs))] if config.dense_epochs > 0 else []
    if config.method == "dns":
        phases.append(Phase("dns", steps(config.epochs)))
        if config.finetune_epochs > 0:
            phases.append(Phase("masked", steps(config.finetune_epochs)))
    elif config.method == "magnitude":
        phases.append(Phase("finetune", steps(config.epochs), 1.0))
    else:
        phases += [Phase("finetune", steps(config.epochs), (r + 1) / config.imp_rounds) for r in range(config.imp_rounds)]
    return phases


# -- distributed ------------------------------------------------------------------------------
def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def maybe_init_distributed() -> bool:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); gloo works on CPU."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
        return True
    return False


def _mask_digest(masks: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(masks):
        digest.update(name.encode())
        digest.update(masks[name].to(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- the loop ---------------------------------------------------------------------------------
class Trainer:
    """Runs the phases of one pruning run; see the module docstring."""

    def __init__(
        self,
        config: PruneConfig,
        data: DataSplits,
        *,
        output: Path | None,
        progress: bool = True,
        init: SparseCheckpoint | None = None,
        trust_model_code: bool = False,
    ):
        self.config = config
        self.data = data
        self.output = output
        self.rank, self.world = _dist_info()
        self.progress = progress and self.rank == 0
        torch.manual_seed(config.seed)
        self.model = build_model(config.model, trust_code=trust_model_code)
        self.initial_masks: dict[str, torch.Tensor] | None = None
        if init is not None:
            load_weights_(self.model, init.masked_weights(), where=init.name)
            self.initial_masks = {k: v != 0 for k, v in init.masks.items()} or None
        self.inputs = config.model.inputs
        self.task: Task = make_task(config.task, config.loss, self.inputs, trust=trust_model_code)
        first_batch_check(self.model, config.model, data, self.task, batch_size=config.batch_size)
        self.steps_per_epoch = max(1, len(data.train) // config.batch_size)
        self.phases = plan_phases(config, self.steps_per_epoch)
        self.phase_index = 0
        self.phase_step = 0
        self.sparsifier: MaskedSparsifier | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.ddp_model: nn.Module = self.model
        if self.world > 1:
            self.ddp_model = nn.parallel.DistributedDataParallel(self.model)
        self.kill_at = int(os.environ.get("DNSCONVERT_TEST_SIGKILL_AT_STEP", "-1"))  # resume tests
        self._permutation_key: int | None = None
        self._permutation = torch.empty(0, dtype=torch.long)

    # phase set-up ----------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = self.model.parameters()
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        if c.optimizer == "adam":
            return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)

    def _start_phase(self, phase: Phase) -> None:
        c = self.config
        self.optimizer = self._make_optimizer()
        if phase.kind == "dense":
            self.sparsifier = None
        elif phase.kind == "dns":
            self.sparsifier = DynamicNetworkSurgery(self.ddp_model, c.dns, initial_masks=self.initial_masks)
        elif phase.kind == "masked":
            masks = self.sparsifier.masks() if self.sparsifier is not None else self.initial_masks
            if masks is None:
                raise InternalError("a masked fine-tuning phase needs the masks of the phase before it")
            # the same selection as the DNS phase, so that each layer keeps its kind and N:M axis
            selection = dict(layers=c.dns.layers, prune_tied=c.dns.prune_tied, prune_bias=c.dns.prune_bias)
            self.sparsifier = FixedMaskSparsifier(self.ddp_model, masks, **selection)
        else:
            previous = self.sparsifier.masks() if self.sparsifier is not None else self.initial_masks
            # finetune phases follow a dense phase or another finetune (fixed-mask) phase, never DNS
            selection = dict(layers=c.dns.layers, prune_tied=c.dns.prune_tied)
            weights = {n: p.detach() for n, p in prunable_parameters(self.model, **selection).items()}
            # Per layer: the DNS per-layer targets when given (a like-for-like comparison), else the
            # global target; IMP round r of R is at sparsity_at(target, r/R).
            targets = {n: sparsity_at(c.dns.layer_sparsity.get(n, c.target_sparsity), float(phase.progress)) for n in weights}
            masks = magnitude_masks(weights, targets, previous=previous)
            self.sparsifier = FixedMaskSparsifier(self.ddp_model, masks, **selection)

    def _lr(self, phase: Phase, step: int) -> float:
        peak = self.config.finetune_lr if phase.kind == "masked" and self.config.finetune_lr is not None else self.config.lr
        if self.config.lr_schedule == "constant" or phase.steps == 0:
            return peak
        return peak * 0.5 * (1.0 + math.cos(math.pi * step / phase.steps))

    def _batch_index(self, global_epoch_key: int, offset: int) -> torch.Tensor:
        if self._permutation_key != global_epoch_key:  # one permutation per epoch (randperm costs ~ a LeNet step)
            generator = torch.Generator().manual_seed(self.config.seed * 7919 + global_epoch_key)
            self._permutation = torch.randperm(len(self.data.train), generator=generator)
            self._permutation_key = global_epoch_key
        batch = self._permutation[offset * self.config.batch_size : (offset + 1) * self.config.batch_size]
        return batch[self.rank :: self.world]

    @property
    def global_step(self) -> int:
        """Steps done over all phases (what the resume test kills at and the checkpoint records)."""
        return sum(p.steps for p in self.phases[: self.phase_index]) + self.phase_step

    # state -----------------------------------------------------------------------------------
    def snapshot(self, final: bool = False) -> SparseCheckpoint:
        c = self.config
        selection = dict(layers=c.dns.layers, prune_tied=c.dns.prune_tied)
        masks = self.sparsifier.masks() if self.sparsifier is not None else {n: torch.ones_like(p, dtype=torch.bool) for n, p in prunable_parameters(self.model, **selection).items()}
        # what each masked tensor is (kind, N:M axis), so that later stages need not rebuild the model
        layers = dict(self.sparsifier.layer_info) if self.sparsifier is not None else prunable_layers(self.model, **selection)
        raw = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        state: dict[str, Any] = {
            "iteration": self.global_step,
            "run": self.config.to_json(),
            "phase_index": self.phase_index,
            "phase_step": self.phase_step,
            "model_raw": raw,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "sparsifier": self.sparsifier.state_dict() if self.sparsifier is not None else None,
            "initial_masks": self.initial_masks,
            "torch_rng": torch.get_rng_state(),
            "finished": final,
        }
        hyper = {k: v for k, v in c.to_json().items() if k not in ("model", "dns", "data")}
        if c.method == "dns":
            hyper["dns"] = c.dns.to_json()
        pruning = PruningInfo(method=c.method, criterion=c.dns.criterion if c.method == "dns" else "magnitude", nm=c.dns.nm if c.method == "dns" else None, hyperparameters=hyper)
        weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return SparseCheckpoint(weights, masks, model=c.model, pruning=pruning, state=state, layers=layers)

    def restore(self, ckpt: SparseCheckpoint) -> None:
        state = ckpt.state
        self.phase_index = int(state["phase_index"])
        self.phase_step = int(state["phase_step"])
        self.initial_masks = state.get("initial_masks")
        if self.phase_index < len(self.phases):
            self._start_phase(self.phases[self.phase_index])
        load_weights_(self.model, state["model_raw"], where=ckpt.name)
        if self.sparsifier is not None and state.get("sparsifier") is not None:
            self.sparsifier.load_state_dict(state["sparsifier"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])

    def _save(self, final: bool = False) -> None:
        if self.output is not None and self.rank == 0:
            self.snapshot(final).save(self.output)

    # run ---------------------------------------------------------------------------------------
    def run(self) -> None:
        total = sum(p.steps for p in self.phases)
        done = self.global_step
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, disable=not self.progress, transient=False) as bar:
            task = bar.add_task("prune", total=total, completed=done, info="")
            running_loss, running_acc = 0.0, 0.0
            while self.phase_index < len(self.phases):
                phase = self.phases[self.phase_index]
                if self.phase_step == 0 or self.optimizer is None:
                    self._start_phase(phase)
                    if self.progress and self.sparsifier is not None and not kernels_loaded():
                        # else the bar stands still at the phase's start while numba loads or compiles
                        bar.update(task, description=f"{phase.kind}: {LOADING_KERNELS}")
                self.ddp_model.train()
                while self.phase_step < phase.steps:
                    global_step = self.global_step
                    if global_step == self.kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    epoch, offset = divmod(self.phase_step, self.steps_per_epoch)
                    batch = self.data.train.batch(self._batch_index(self.phase_index * 100_003 + epoch, offset))
                    feeds, target = split_batch(batch, self.inputs, where=self.data.source)
                    for group in self.optimizer.param_groups:
                        group["lr"] = self._lr(phase, self.phase_step)
                    measured = self.task(forward(self.ddp_model, self.inputs, feeds), target, feeds)
                    loss = measured.loss
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    if self.sparsifier is not None:
                        self.sparsifier.step()
                    self.phase_step += 1
                    running_loss = 0.98 * running_loss + 0.02 * float(loss.detach()) if global_step else float(loss.detach())
                    if measured.correct is not None:
                        running_acc = 0.98 * running_acc + 0.02 * measured.correct / max(measured.count, 1)
                    if self.progress and (self.phase_step % 20 == 0 or self.phase_step == phase.steps):
                        sparsity = self.sparsifier.sparsity() if self.sparsifier is not None else 0.0
                        acc = f" acc {running_acc:.1%}" if measured.correct is not None else ""
                        bar.update(task, completed=global_step + 1, description=f"{phase.kind}", info=f"loss {running_loss:.3f}{acc} sparsity {sparsity:.1%}")
                    if self.config.checkpoint_every and (global_step + 1) % self.config.checkpoint_every == 0:
                        self._save()
                self.phase_index += 1
                self.phase_step = 0
                if self.phase_index < len(self.phases) and self.phases[self.phase_index].kind != "dense" and self.sparsifier is not None:
                    self.initial_masks = self.sparsifier.masks()
            bar.update(task, completed=total)
        self._check_ranks_agree()

    def _check_ranks_agree(self) -> None:
        if self.world == 1 or self.sparsifier is None:
            self.rank_digests = [_mask_digest(self.sparsifier.masks())] if self.sparsifier else []
            return
        import torch.distributed as dist

        digests: list[Any] = [None] * self.world
        dist.all_gather_object(digests, _mask_digest(self.sparsifier.masks()))
        self.rank_digests = list(digests)
        if len(set(digests)) != 1:
            raise InternalError(f"masks differ across ranks: {digests}")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Examples,
    batch_size: int = 1000,
    *,
    task: Task | None = None,
    inputs: tuple[InputSpec, ...] | None = None,
) -> tuple[float | None, float]:
    """(accuracy, mean loss) on a dataset: per example for classification, per predicted token
    for causal-lm; accuracy is None for a user loss. Defaults: classification of one input."""
    from ..modelspec import legacy_input
    from ..userdata import Classification

    task = task or Classification()
    inputs = inputs or (legacy_input((1,)),)
    model.eval()
    correct, loss, count, measured = 0, 0.0, 0, None
    for start in range(0, len(data), batch_size):
        feeds, target = split_batch(data.batch(torch.arange(start, min(start + batch_size, len(data)))), inputs)
        measured = task(forward(model, inputs, feeds), target, feeds, reduction="sum")
        loss += float(measured.loss)
        correct += measured.correct or 0
        count += measured.count
    accuracy = correct / count if measured is not None and measured.correct is not None and count else None
    return accuracy, loss / max(count, 1)


def prune(
    config: PruneConfig,
    *,
    output: str | Path | None = None,
    data: DataSplits | None = None,
    init: SparseCheckpoint | None = None,
    resume: SparseCheckpoint | None = None,
    progress: bool = True,
    trust_model_code: bool = False,
) -> PruneResult:
    """Train under ``config`` and return the sparse checkpoint (also written to ``output``).

    Args:
        config: the run; ignored in favour of the stored one when resuming.
        output: checkpoint file written every ``checkpoint_every`` steps and at the end.
        data: training/test data (default: resolved from ``config.data``: MNIST or synthetic
            digits for models taking MNIST images, a user data factory, or synthetic examples
            of the model's inputs; see :mod:`dnsconvert.userdata`).
        init: start from these (dense or sparse) weights instead of a fresh model.
        resume: a checkpoint written by an interrupted run of this function.
        trust_model_code: allow importing a model factory, data factory or loss function
            outside dnsconvert. Only the caller can give it: a resumed run's stored settings
            never enable it.
    """
    if resume is not None:
        if not resume.state or "run" not in resume.state:
            raise UserError("checkpoint holds no resumable run state", path=resume.source, hint="resume from a file written by dnsconvert prune")
        if resume.state.get("finished"):  # h11 (issue 11): resuming would reset the masks; change nothing
            raise UserError(
                "this run had finished; there is nothing to resume, and the file was left unchanged",
                path=resume.source,
                hint="to train further from it, use --init instead of --resume",
            )
        try:
            config = PruneConfig.from_json(resume.state["run"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # h11: a file's wrong types are exit 2
            raise UserError(f"resumable run state is malformed ({type(exc).__name__}: {str(exc)[:120]})", path=resume.source, hint="resume from an unmodified file written by dnsconvert prune") from None
    started = time.perf_counter()
    data = data or resolve_training_data(config.model, config.data, task=config.task, data_kwargs=config.data_kwargs, trust=trust_model_code)
    trainer = Trainer(config, data, output=Path(output) if output else None, progress=progress, init=init, trust_model_code=trust_model_code)
    if resume is not None:
        try:
            trainer.restore(resume)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:  # h11: see above
            raise UserError(f"resumable run state is malformed ({type(exc).__name__}: {str(exc).strip()[:120]})", path=resume.source, hint="resume from an unmodified file written by dnsconvert prune") from None
    trainer.run()
    final = trainer.snapshot(final=True)
    final.state["rank_mask_sha256"] = trainer.rank_digests
    final.state["world_size"] = trainer.world
    final.state["data"] = data.source
    accuracy, loss = evaluate(trainer.model, data.test, 1000 if isinstance(data.test, ImageDataset) else config.batch_size, task=trainer.task, inputs=trainer.inputs)
    final.state["test_accuracy"] = accuracy
    if output is not None and trainer.rank == 0:
        final.save(output)
        final.source = Path(output)
    from ..validate import validate

    report = validate(final)
    steps = sum(p.steps for p in trainer.phases)
    return PruneResult(final, accuracy, loss, report.sparsity, report.compression, time.perf_counter() - started, steps, data.source, trainer.task.name)
