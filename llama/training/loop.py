"""The training loop, shared by ``train.py`` (the bundled model, from scratch) and ``python -m
llama.finetune``: batches -> forward -> masked loss -> backward -> step, one page. What a step minimises is
an ``Objective``: the masked loss of supervised fine-tuning (``Supervised``, here), or post-training's
(``llama.training.dpo``, ``llama.training.grpo``).

The supervised loss of a step is the mean over every scored label of the step, over its micro-batches and ranks
alike: each micro-batch's summed loss is divided by the step's total count of scored labels (known
before the first forward), not averaged per micro-batch (a mean of means weighs a short micro-batch
as much as a long one). Data-parallel ranks average their gradients, so each rank's loss is scaled by
the number of ranks to make that average the step's sum. The ranks that split each layer (tensor
parallelism) see the same examples: the sums are over the data-parallel group only.
"""

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup

from llama.training.data import Batch
from llama.training.log import MetricsLog

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each step: a linear warmup over ``warmup_steps`` to ``lr``, then constant,
    or a cosine decay to ``min_lr`` at the last of ``max_steps``."""

    lr: float
    max_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    min_lr: float = 0.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"--lr_schedule must be one of {SCHEDULES}, got {self.kind!r}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"the number of steps must be a positive integer, got {self.max_steps!r}")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(
                f"--warmup_steps must be in [0, {self.max_steps}) for {self.max_steps} steps, got {self.warmup_steps}"
            )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.max_steps - 1 - self.warmup_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))


def make_optimizer(
    parameters: Iterable[nn.Parameter], lr: float, weight_decay: float, betas=(0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW over ``parameters``: matrices are decayed, vectors (norm weights) are not."""
    parameters = list(parameters)
    groups = [
        {"params": [p for p in parameters if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=lr, betas=betas)


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """Sums of many losses in float64, where the device has it (MPS has not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def sum_over_ranks(value: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """``value`` summed over the data-parallel ranks of ``group`` (None: this process alone), in place."""
    if group is not None:
        dist.all_reduce(value, group=group)
    return value


def clip_grad_norm(parameters: List[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for gradients laid out on several device meshes (FSDP's
    shards of a replicated weight, tensor parallelism's slices): the norm of each mesh's gradients, whole,
    then of them all, which every rank computes alike."""
    by_mesh = {}
    for parameter in parameters:
        if parameter.grad is not None:
            by_mesh.setdefault(getattr(parameter.grad, "device_mesh", None), []).append(parameter)
    norms = [torch.nn.utils.get_total_norm([p.grad for p in group]) for group in by_mesh.values()]
    total = torch.linalg.vector_norm(torch.stack([n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]))
    for group in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def summed_loss(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """The loss summed over the batch's scored labels, chunk by chunk of tokens (``Transformer.forward_loss``)."""
    tokens, labels = batch.tokens.to(device), batch.labels.to(device)
    return model.forward_loss(tokens, labels, None if batch.positions is None else batch.positions.to(device))


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: List[Batch], device: torch.device, autocast, data_group: Optional[ProcessGroup] = None
) -> dict:
    """Mean loss and perplexity over every scored label of ``batches`` (this rank's share), over the
    ranks of ``data_group``."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=accumulator_dtype(device), device=device)  # summed loss, scored labels
    for batch in batches:
        with autocast:
            total[0] += summed_loss(model, batch, device).to(total.dtype)
        total[1] += batch.scored_tokens
    model.train(was_training)
    loss = (sum_over_ranks(total, data_group)[0] / total[1]).item()
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 700))}


class Objective(Protocol):
    """What a step minimises, and what it says: ``losses(step)`` yields each of this rank's forward passes'
    share of the step's loss, to be differentiated one after the other (their sum over the passes and the
    data-parallel ranks is the step's loss); ``record()`` then gives the step's metrics (its ``loss`` and
    ``tokens`` among them), the same on every rank. Supervised fine-tuning is ``Supervised``;
    ``llama.training.dpo`` and ``llama.training.grpo`` are the post-training ones."""

    def losses(self, step: int) -> Iterator[torch.Tensor]: ...

    def record(self) -> dict: ...


class Supervised:
    """The masked language-modelling loss of the step's examples (the module docstring), from
    ``step_batches`` (step -> this rank's micro-batches), on the ranks of ``data_group``."""

    def __init__(
        self,
        model: nn.Module,
        step_batches: Callable[[int], List[Batch]],
        device: torch.device,
        autocast,
        data_group: Optional[ProcessGroup] = None,
    ):
        self.model, self.step_batches, self.device, self.autocast = model, step_batches, device, autocast
        self.data_group = data_group
        self.ranks = dist.get_world_size(data_group) if data_group is not None else 1

    def losses(self, step: int) -> Iterator[torch.Tensor]:
        batches = self.step_batches(step)
        scored = torch.tensor(float(sum(batch.scored_tokens for batch in batches)), device=self.device)
        self.scored = sum_over_ranks(scored, self.data_group)
        self.summed = torch.zeros((), dtype=accumulator_dtype(self.device), device=self.device)
        self.tokens = torch.tensor(float(sum(batch.tokens.numel() for batch in batches)), device=self.device)
        for batch in batches:
            with self.autocast:
                loss = summed_loss(self.model, batch, self.device)
            yield loss * self.ranks / self.scored
            self.summed += loss.detach().to(self.summed.dtype)

    def record(self) -> dict:
        loss = (sum_over_ranks(self.summed, self.data_group) / self.scored).item()
        return {"loss": loss, "tokens": int(sum_over_ranks(self.tokens, self.data_group).item())}


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    schedule: Schedule,
    log: MetricsLog,
    grad_clip: Optional[float] = 1.0,
    start_step: int = 0,
    evaluate_every: int = 0,
    evaluate_at: Optional[Callable[[], dict]] = None,
    save_every: int = 0,
    save_at: Optional[Callable[[int], None]] = None,
) -> None:
    """Train ``model`` from ``start_step`` to ``schedule.max_steps``.

    Args:
        model: the model as wrapped for training (``llama.training.parallelize``).
        optimizer: over its trainable parameters.
        objective: each step's losses and metrics (``Objective``: ``Supervised``, DPO's, GRPO's).
        schedule: the learning rate of each step.
        log: receives each step's metrics (``step``, the objective's, ``lr``, ``tokens_per_s``, and
            ``val_loss`` / ``val_perplexity`` or the objective's evaluation when evaluated).
        grad_clip: the largest norm of the gradient; None: not clipped.
        evaluate_every, evaluate_at: every so many steps (and after the last), the metrics ``evaluate_at()`` returns.
        save_every, save_at: every so many steps (and after the last), ``save_at(steps done)``.
    """
    model.train()
    for step in range(start_step, schedule.max_steps):
        started = time.perf_counter()
        lr = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for loss in objective.losses(step):
            loss.backward()
        if grad_clip is not None:
            clip_grad_norm([p for p in model.parameters() if p.requires_grad], grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        metrics = objective.record()
        record = {"step": done, "loss": metrics.pop("loss"), "lr": lr, "tokens": metrics.pop("tokens")}
        record.update(tokens_per_s=record["tokens"] / (time.perf_counter() - started), **metrics)
        last = done == schedule.max_steps
        if evaluate_at is not None and ((evaluate_every and done % evaluate_every == 0) or last):
            record.update(evaluate_at())
        log.step(record)
        if save_at is not None and ((save_every and done % save_every == 0) or last):
            save_at(done)
