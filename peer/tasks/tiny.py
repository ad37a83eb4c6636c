"""``tiny``: a seconds-fast synthetic regression task for tests and smoke runs.

A fixed random *teacher* (a 2-layer tanh MLP drawn from ``data_seed``) maps Gaussian inputs to
targets, which are standardised to unit variance per output and given Gaussian noise. The student is
a 2-layer GELU MLP (about 2.7k parameters with the defaults) trained with mean squared error, so an
untrained model scores about 1.0 and the noise floor is ``noise_std ** 2``.

The dataset depends only on the config (never on a peer's seed), so every peer sees the same
problem. The first ``train_size`` samples are the training split, the next ``val_size`` the
validation split. Shard ``k`` of ``n`` owns the training samples whose index is ``k`` modulo ``n``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import (
    Batch,
    check_float,
    check_int,
    check_shard_args,
    mean_loss,
    seeded_model,
    shard_generator,
)

__all__ = ["TinyConfig", "TinyTask"]


@dataclass(frozen=True)
class TinyConfig:
    """Hyperparameters of the ``tiny`` task.

    Attributes:
        in_dim: input features.
        hidden: hidden width of the student MLP.
        out_dim: regression outputs.
        teacher_hidden: hidden width of the random teacher.
        train_size: training samples (shared out among shards).
        val_size: validation samples.
        noise_std: standard deviation of the target noise (the loss floor is its square).
        data_seed: seed of the teacher and the samples; equal on every peer of a run.
        eval_batch_size: samples per validation batch.
    """

    in_dim: int = 16
    hidden: int = 128
    out_dim: int = 4
    teacher_hidden: int = 32
    train_size: int = 8192
    val_size: int = 1024
    noise_std: float = 0.05
    data_seed: int = 0
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        for name in (
            "in_dim",
            "hidden",
            "out_dim",
            "teacher_hidden",
            "train_size",
            "val_size",
            "eval_batch_size",
        ):
            check_int("TinyConfig", name, getattr(self, name), minimum=1)
        check_int("TinyConfig", "data_seed", self.data_seed, minimum=0)
        check_float("TinyConfig", "noise_std", self.noise_std, low=0.0)


class TinyTask:
    """The ``tiny`` task (see the module docstring); implements :class:`~.base.Task`."""

    def __init__(self, config: TinyConfig | None = None, *, device: torch.device | None = None) -> None:
        self._config = config or TinyConfig()
        self._device = device or torch.device("cpu")
        x, y = _make_dataset(self._config)
        n = self._config.train_size
        self._train_x, self._train_y = x[:n].to(self._device), y[:n].to(self._device)
        self._val_x, self._val_y = x[n:].to(self._device), y[n:].to(self._device)

    @property
    def name(self) -> str:
        return "tiny"

    @property
    def config(self) -> TinyConfig:
        return self._config

    @property
    def device(self) -> torch.device:
        return self._device

    def make_model(self, seed: int) -> nn.Module:
        c = self._config

        def build() -> nn.Module:
            return nn.Sequential(nn.Linear(c.in_dim, c.hidden), nn.GELU(), nn.Linear(c.hidden, c.out_dim))

        return seeded_model(seed, build, self._device)

    def batches(self, shard: int, num_shards: int, batch_size: int, seed: int) -> Iterator[Batch]:
        check_shard_args(shard, num_shards, batch_size, seed)
        if shard >= self._config.train_size:
            raise ValueError(
                f"tiny: {num_shards} shards leave shard {shard} no samples (train_size={self._config.train_size})"
            )
        owned = torch.arange(shard, self._config.train_size, num_shards)
        return self._stream(owned, batch_size, shard_generator(seed, 0x7117, shard))

    def _stream(self, owned: Tensor, batch_size: int, gen: torch.Generator) -> Iterator[Batch]:
        while True:
            pick = owned[torch.randint(owned.numel(), (batch_size,), generator=gen)].to(self._device)
            yield self._train_x[pick], self._train_y[pick]

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        inputs, targets = batch
        return nn.functional.mse_loss(model(inputs), targets)

    def evaluate(self, model: nn.Module, max_batches: int | None = None) -> float:
        size = self._config.eval_batch_size
        starts = range(0, self._config.val_size, size)
        if max_batches is not None:
            check_int("evaluate", "max_batches", max_batches, minimum=1)
            starts = starts[:max_batches]
        batches = ((self._val_x[s : s + size], self._val_y[s : s + size]) for s in starts)
        return mean_loss(self.loss, model, batches)


def _make_dataset(c: TinyConfig) -> tuple[Tensor, Tensor]:
    """Inputs and noisy standardised teacher targets for train + validation, from ``c.data_seed``."""
    gen = torch.Generator(device="cpu").manual_seed(c.data_seed)
    w1 = torch.randn(c.in_dim, c.teacher_hidden, generator=gen) / c.in_dim**0.5
    b1 = 0.5 * torch.randn(c.teacher_hidden, generator=gen)
    w2 = torch.randn(c.teacher_hidden, c.out_dim, generator=gen) / c.teacher_hidden**0.5
    x = torch.randn(c.train_size + c.val_size, c.in_dim, generator=gen)
    y = torch.tanh(x @ w1 + b1) @ w2
    y = (y - y.mean(dim=0)) / y.std(dim=0).clamp_min(1e-6)
    y = y + c.noise_std * torch.randn(y.shape, generator=gen)
    return x, y
