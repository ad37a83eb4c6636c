"""The task registry: task names → factories, so a run document can name its task as data."""

from __future__ import annotations

import re
from typing import Any, Protocol

import torch

from .base import Task, config_with_overrides
from .shakespeare import ShakespeareCharConfig, ShakespeareCharTask
from .tiny import TinyConfig, TinyTask

__all__ = ["TASK_NAMES", "TaskFactory", "UnknownTaskError", "get_task", "register_task", "registered_tasks"]

TASK_NAMES: tuple[str, ...] = ("shakespeare-char", "tiny")
"""The bundled tasks (always registered)."""

_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")


class UnknownTaskError(ValueError):
    """Raised by :func:`get_task` for a name that is not registered."""


class TaskFactory(Protocol):
    """Builds a task on ``device`` from field overrides of its config dataclass."""

    def __call__(self, *, device: torch.device, **overrides: Any) -> Task: ...


def _tiny(*, device: torch.device, **overrides: Any) -> Task:
    return TinyTask(config_with_overrides(TinyConfig(), overrides), device=device)


def _shakespeare_char(*, device: torch.device, **overrides: Any) -> Task:
    return ShakespeareCharTask(config_with_overrides(ShakespeareCharConfig(), overrides), device=device)


_REGISTRY: dict[str, TaskFactory] = {"shakespeare-char": _shakespeare_char, "tiny": _tiny}


def register_task(name: str, factory: TaskFactory, *, replace: bool = False) -> None:
    """Register ``factory`` under ``name`` (lower-case letters, digits, ``.``, ``_``, ``-``).

    Raises:
        ValueError: the name is malformed, or taken and ``replace`` is false. Bundled tasks can
            never be replaced.
    """
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise ValueError(f"task name {name!r} must match {_NAME_PATTERN.pattern}")
    if not callable(factory):
        raise TypeError(f"factory for task {name!r} must be callable, got {type(factory).__name__}")
    if name in TASK_NAMES:
        raise ValueError(f"{name!r} is a bundled task and cannot be replaced")
    if name in _REGISTRY and not replace:
        raise ValueError(f"task {name!r} is already registered; pass replace=True to override it")
    _REGISTRY[name] = factory


def registered_tasks() -> tuple[str, ...]:
    """Every registered task name, bundled and user-defined, sorted."""
    return tuple(sorted(_REGISTRY))


def get_task(name: str, *, device: torch.device | None = None, **overrides: Any) -> Task:
    """Build the task ``name`` on ``device`` (default CPU) with config fields ``overrides``.

    Example: ``get_task("shakespeare-char", device=select_device("auto"), n_layer=4)``.

    Raises:
        UnknownTaskError: no such task; the message lists the known ones.
        ValueError / TypeError: an override names no config field or has a bad value.
    """
    factory = _REGISTRY.get(name)
    if factory is None:
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {', '.join(registered_tasks())}")
    return factory(device=device if device is not None else torch.device("cpu"), **overrides)
