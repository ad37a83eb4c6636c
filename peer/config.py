"""Run configuration: nested frozen dataclasses, loaded from TOML, ``LIONCUB_*`` env and flags.

The :class:`RunConfig` is what every peer of a run must agree on; the first peer publishes it in
the DHT as a JSON document and joiners validate it with :func:`from_dict` (data, never code).
Precedence, lowest first: dataclass defaults → TOML file → ``LIONCUB_SECTION__FIELD`` environment
variables → ``--set section.field=value`` flags.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lioncub.optim.schedules import SyncSchedule
from lioncub.optim.strategies import StrategyConfig

__all__ = [
    "ENV_PREFIX",
    "ConfigError",
    "InnerConfig",
    "RoundConfig",
    "RunConfig",
    "TaskConfig",
    "apply_overrides",
    "from_dict",
    "load_run_config",
    "to_dict",
]

ENV_PREFIX = "LIONCUB_"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_MAX_DEPTH = 4

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class TaskConfig:
    """Which bundled task to train.

    Attributes:
        name: a task from the registry (``tiny``, ``shakespeare-char``).
        overrides: task settings (e.g. ``n_layer``); plain numbers and strings only.
    """

    name: str = "tiny"
    overrides: dict[str, int | float | str | bool] = field(default_factory=dict)


@dataclass(frozen=True)
class InnerConfig:
    """The local optimizer.

    Attributes:
        optimizer: ``lion`` or ``adamw``.
        lr: its learning rate.
        weight_decay: its decoupled weight decay.
        batch_size: samples per local step.
    """

    optimizer: str = "lion"
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if self.optimizer not in ("lion", "adamw"):
            raise ConfigError(f"inner.optimizer must be 'lion' or 'adamw', got {self.optimizer!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"inner.lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"inner.weight_decay must be >= 0, got {self.weight_decay}")
        if not 1 <= self.batch_size <= 1 << 16:
            raise ConfigError(f"inner.batch_size must be in [1, 65536], got {self.batch_size}")


@dataclass(frozen=True)
class RoundConfig:
    """How rounds are timed and grouped.

    Attributes:
        max_seconds: a round ends after ``strategy.local_steps`` steps or this many seconds,
            whichever comes first (0 = steps only). Faster peers then take more steps and weigh more.
        group_size: target members per group; 0 = everyone (no gossip).
        matchmaking_timeout: seconds to find a group before applying the local update alone.
        exchange_timeout: seconds for the reduce-scatter + all-gather before late members are left out.
        overlap: communicate round r while computing round r + 1.
    """

    max_seconds: float = 0.0
    group_size: int = 0
    matchmaking_timeout: float = 5.0
    exchange_timeout: float = 30.0
    overlap: bool = True

    def __post_init__(self) -> None:
        if self.max_seconds < 0 or not math.isfinite(self.max_seconds):
            raise ConfigError(f"rounds.max_seconds must be >= 0, got {self.max_seconds}")
        if self.group_size < 0 or self.group_size == 1:
            raise ConfigError(f"rounds.group_size must be 0 (everyone) or >= 2, got {self.group_size}")
        for name in ("matchmaking_timeout", "exchange_timeout"):
            value = getattr(self, name)
            if not (0 < value <= 3600):
                raise ConfigError(f"rounds.{name} must be in (0, 3600] seconds, got {value}")


@dataclass(frozen=True)
class RunConfig:
    """Everything the peers of one run must agree on. Published in the DHT as JSON."""

    run_id: str = "lioncub"
    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    rounds: RoundConfig = field(default_factory=RoundConfig)
    momentum_sync: SyncSchedule = field(default_factory=SyncSchedule)
    averaging: SyncSchedule = field(default_factory=SyncSchedule)

    def __post_init__(self) -> None:
        if not _RUN_ID.match(self.run_id):
            raise ConfigError(
                f"run_id must be 1-64 characters of letters, digits, '_' and '-', got {self.run_id!r}"
            )


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as plain JSON-able data."""
    return dataclasses.asdict(obj)


def _coerce(value: Any, tp: Any, where: str, depth: int) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a table of settings, got {type(value).__name__}")
        return _build(tp, value, where, depth + 1)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(value, arm, where, depth)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} matches none of the allowed types")
    if origin is dict:
        if not isinstance(value, Mapping) or len(value) > 64:
            raise ConfigError(f"{where}: expected a table of at most 64 entries")
        _, vt = typing.get_args(tp)
        return {str(k)[:64]: _coerce(v, vt, f"{where}.{k}", depth) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, where, depth) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            out = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(out):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, str) or len(value) > 256:
            raise ConfigError(f"{where}: expected a string of at most 256 characters, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported setting type {tp!r}")


def _build(cls: type[T], data: Mapping[str, Any], where: str, depth: int) -> T:
    if depth > _MAX_DEPTH:
        raise ConfigError(f"{where}: configuration nested too deeply")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown setting(s) {unknown}; known: {sorted(known)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}".lstrip("."), depth) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
    """Build and validate a config dataclass from plain data (a TOML table or a JSON document)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a table of settings, got {type(data).__name__}")
    return _build(cls, data, "", 0)


def _set_path(doc: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = doc
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {key} is a value, not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(doc: dict[str, Any], overrides: Mapping[str, str]) -> dict[str, Any]:
    """Apply ``section.field -> text`` overrides to a config document (types checked on build)."""
    out = _deep_copy(doc)
    for dotted, text in overrides.items():
        if not re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+){0,3}", dotted):
            raise ConfigError(f"bad setting name {dotted!r}; use section.field, e.g. strategy.outer_lr")
        _set_path(out, dotted, text)
    return out


def _deep_copy(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in doc.items()}


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``LIONCUB_STRATEGY__OUTER_LR=3e-3`` → ``{"strategy.outer_lr": "3e-3"}`` (run settings only)."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for key, value in env.items():
        if key.startswith(ENV_PREFIX) and "__" in key:
            out[key[len(ENV_PREFIX) :].lower().replace("__", ".")] = value
    return out


def load_run_config(
    path: Path | None = None,
    *,
    overrides: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RunConfig:
    """Defaults → TOML file (its ``[run]`` table or the whole file) → env → explicit overrides."""
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        section = raw.get("run", raw)
        if not isinstance(section, dict):
            raise ConfigError(f"config file {path}: [run] must be a table")
        doc = section
    doc = apply_overrides(doc, env_overrides(environ))
    doc = apply_overrides(doc, overrides or {})
    return from_dict(RunConfig, doc)
