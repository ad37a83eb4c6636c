"""A peer's local work: inner optimizer steps on its own data shard, as one plain object.

Pure torch and no asyncio, so the runtime can run :meth:`LocalTrainer.run_round` in a worker thread
while the event loop keeps talking to the network, and the simulator can call it directly.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from lioncub.optim import Lion

from .tasks import Batch, Task

__all__ = ["LocalResult", "LocalTrainer", "copy_into_params", "make_inner_optimizer"]


def copy_into_params(flat: torch.Tensor, params: list[nn.Parameter]) -> None:
    """Write a flat vector into ``params`` in place, in ``parameters()`` order."""
    numel = sum(p.numel() for p in params)
    if flat.numel() != numel:
        raise ValueError(f"flat vector has {flat.numel()} elements, the parameters have {numel}")
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n


def make_inner_optimizer(
    name: str, params: list[nn.Parameter], lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    """``lion`` (lioncub's own) or ``adamw`` (torch's)."""
    if name == "lion":
        return Lion(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"inner optimizer must be 'lion' or 'adamw', got {name!r}")


@dataclass(frozen=True)
class LocalResult:
    """What one round of local work produced.

    Attributes:
        delta: Δ = anchor − params after the steps, or the gradient at the anchor when
            ``local_steps == 0`` (flat float32).
        samples: samples processed (the peer's vote weight).
        steps: inner steps taken.
        loss: mean training loss over the steps.
        compute_s: seconds spent computing.
    """

    delta: torch.Tensor
    samples: int
    steps: int
    loss: float
    compute_s: float


class LocalTrainer:
    """Model replica + inner optimizer + data iterator of one peer."""

    def __init__(
        self,
        task: Task,
        model: nn.Module,
        data: Iterator[Batch],
        *,
        local_steps: int,
        inner: str = "lion",
        inner_lr: float = 1e-3,
        inner_weight_decay: float = 0.0,
        batch_size: int = 32,
    ) -> None:
        self.task = task
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.data = data
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.optimizer = (
            make_inner_optimizer(inner, self.params, inner_lr, inner_weight_decay)
            if local_steps > 0
            else None
        )

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def get_flat(self) -> torch.Tensor:
        return parameters_to_vector(self.params).detach().to(torch.float32)

    def set_flat(self, flat: torch.Tensor) -> None:
        """Copy ``flat`` into the parameters (never aliasing it, unlike ``vector_to_parameters``)."""
        copy_into_params(flat, self.params)

    def run_round(self, anchor: torch.Tensor, *, max_seconds: float = 0.0) -> LocalResult:
        """Take this round's steps from the current parameters; return Δ relative to ``anchor``.

        With ``max_seconds > 0`` the round ends after ``local_steps`` steps or that many seconds,
        whichever comes first (at least one step), so slow peers contribute fewer samples.
        """
        start = time.perf_counter()
        self.model.train()
        if self.optimizer is None:
            self.model.zero_grad(set_to_none=True)
            loss = self.task.loss(self.model, next(self.data))
            loss.backward()  # type: ignore[no-untyped-call]
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            delta = torch.cat([g.reshape(-1) for g in grads]).to(torch.float32)
            return LocalResult(delta, self.batch_size, 1, float(loss.detach()), time.perf_counter() - start)
        total, steps = 0.0, 0
        while steps < self.local_steps:
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.task.loss(self.model, next(self.data))
            loss.backward()  # type: ignore[no-untyped-call]
            self.optimizer.step()
            total += float(loss.detach())
            steps += 1
            if max_seconds > 0 and time.perf_counter() - start >= max_seconds:
                break
        delta = anchor - self.get_flat()
        return LocalResult(delta, steps * self.batch_size, steps, total / steps, time.perf_counter() - start)
