"""The task interface and the helpers every bundled task shares.

A *task* is a model family plus its data: it builds a model deterministically from a seed, streams
each peer's disjoint shard of training batches, computes the loss of a batch, and evaluates a model
on a fixed validation split. Its hyperparameters live in a frozen dataclass (``task.config``) so a
run document can name the task and override fields as plain data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "Batch",
    "Task",
    "check_float",
    "check_int",
    "check_shard_args",
    "config_with_overrides",
    "mean_loss",
    "seeded_model",
    "shard_generator",
]

Batch = tuple[Tensor, Tensor]
"""``(inputs, targets)``, both on the task's device; the first dimension is the batch."""


@runtime_checkable
class Task(Protocol):
    """What the simulator and the network runtime need from a training task.

    Implementations keep their data on ``device`` and return models moved there.
    """

    @property
    def name(self) -> str:
        """The registry name, e.g. ``"tiny"``."""
        ...

    @property
    def config(self) -> DataclassInstance:
        """The task's frozen hyperparameter dataclass (``dataclasses.asdict`` gives plain data)."""
        ...

    @property
    def device(self) -> torch.device:
        """Where models and batches live."""
        ...

    def make_model(self, seed: int) -> nn.Module:
        """A freshly initialised model on ``device``; equal seeds give bitwise-equal weights."""
        ...

    def batches(self, shard: int, num_shards: int, batch_size: int, seed: int) -> Iterator[Batch]:
        """An infinite, deterministic stream of training batches from shard ``shard`` of ``num_shards``.

        Shards draw from disjoint parts of the training split; equal arguments give equal streams.
        """
        ...

    def loss(self, model: nn.Module, batch: Batch) -> Tensor:
        """The scalar mean training loss of ``model`` on ``batch`` (with autograd on, for backward)."""
        ...

    def evaluate(self, model: nn.Module, max_batches: int | None = None) -> float:
        """Mean loss on the fixed validation split: deterministic, under ``torch.no_grad``, in eval mode.

        ``max_batches`` caps the number of validation batches (``None``: the task's default).
        The train/eval mode of every submodule is restored afterwards.
        """
        ...


def check_int(owner: str, name: str, value: object, *, minimum: int) -> None:
    """Raise unless ``value`` is an ``int`` (not a ``bool``) that is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}.{name} must be >= {minimum}, got {value}")


def check_float(
    owner: str,
    name: str,
    value: object,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise unless ``value`` is a real number in the interval ``low .. high`` (ends as flagged)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{owner}.{name} must be a number, got {type(value).__name__} {value!r}")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below and math.isfinite(value)):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{owner}.{name} must be a finite number in {interval}, got {value!r}")


def check_shard_args(shard: int, num_shards: int, batch_size: int, seed: int) -> None:
    """Validate the arguments of :meth:`Task.batches`."""
    check_int("batches", "num_shards", num_shards, minimum=1)
    check_int("batches", "shard", shard, minimum=0)
    if shard >= num_shards:
        raise ValueError(f"batches: shard must be in [0, {num_shards}), got {shard}")
    check_int("batches", "batch_size", batch_size, minimum=1)
    check_int("batches", "seed", seed, minimum=0)


_C = TypeVar("_C", bound="DataclassInstance")


def config_with_overrides(default: _C, overrides: Mapping[str, Any]) -> _C:
    """``default`` with ``overrides`` applied; unknown field names raise a ``ValueError`` listing valid ones."""
    fields = sorted(f.name for f in dataclasses.fields(default))
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for {type(default).__name__}; valid options: {', '.join(fields)}"
        )
    return dataclasses.replace(default, **overrides)


def shard_generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *stream)``: independent streams for distinct tuples.

    Uses numpy's ``SeedSequence`` to mix the integers, so nearby seeds and shards do not produce
    correlated streams. CPU generators keep batch order identical on every device.
    """
    state = np.random.SeedSequence([seed, *stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device="cpu").manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def seeded_model(seed: int, build: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """Build a model on CPU under a private RNG seeded with ``seed``, then move it to ``device``.

    The global RNG state is left untouched, and weights are identical whatever the device.
    """
    check_int("make_model", "seed", seed, minimum=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    return model.to(device)


def mean_loss(
    loss: Callable[[nn.Module, Batch], Tensor], model: nn.Module, batches: Iterable[Batch]
) -> float:
    """Sample-weighted mean of ``loss`` over ``batches`` under ``no_grad`` and eval mode.

    Every submodule's ``training`` flag is restored afterwards, even on error.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                n = int(batch[0].shape[0])
                total += float(loss(model, batch)) * n
                count += n
    finally:
        for module, training in modes:
            module.training = training
    if count == 0:
        raise ValueError("mean_loss: no validation batches")
    return total / count
