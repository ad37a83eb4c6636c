"""Atomic, periodic, resumable checkpoints of a peer.

A checkpoint is one ``torch.save`` file ``ckpt-{round:08d}.pt`` holding only tensors, numbers,
strings and containers, so it loads with ``torch.load(weights_only=True)``. It is written under a
temporary name in the same directory, flushed, fsynced and renamed, then the directory is fsynced:
after a crash a checkpoint name holds a complete file or nothing. Every file carries a BLAKE2b
digest of its contents (torch does not check tensor data on load), and
:meth:`CheckpointStore.load_latest` falls back to the previous good file when the newest fails to
validate. The store assumes a single writer per directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import torch

from lioncub.optim.strategies import OuterState

__all__ = [
    "LATEST",
    "Checkpoint",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointStore",
    "WriteHook",
]

logger = logging.getLogger(__name__)

_FORMAT = "lioncub-checkpoint"
_VERSION = 1
_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")
_TEMP = re.compile(r"^\.(?:ckpt-\d{8,}\.pt|latest)\.[0-9a-f]+\.tmp$")
LATEST = "latest"

WriteHook = Callable[[Path, Path], None]
"""Called with (temporary path, final path) after the temporary file is fsynced, before the rename."""


class CheckpointError(Exception):
    """Base class of checkpoint failures."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is unreadable, truncated, tampered with or inconsistent."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint belongs to another run than the one asked for."""


@dataclass(eq=False)
class Checkpoint:
    """Everything a peer needs to resume. Tensors are flat; validated on construction.

    Attributes:
        round: outer rounds applied so far.
        anchor: θ_anchor, flat float32.
        momentum: the outer momentum buffer, flat float32 of the anchor's length.
        params: the local parameters θ, flat floating point of the anchor's length.
        optimizer_state: the inner optimizer's ``state_dict()``.
        config: the run config document (``peer.config.to_dict``), JSON-able.
        run_id: the run this peer trains.
        peer_id: the peer that wrote it.
        samples_seen: training samples this peer has consumed.
        wall_time: Unix time of the snapshot.
        extras: other outer buffers of the strategy, by name.
    """

    round: int
    anchor: torch.Tensor
    momentum: torch.Tensor
    params: torch.Tensor
    optimizer_state: dict[str, Any]
    config: dict[str, Any]
    run_id: str
    peer_id: str
    samples_seen: int = 0
    wall_time: float = field(default_factory=time.time)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_outer_state(
        cls,
        state: OuterState,
        *,
        params: torch.Tensor,
        optimizer_state: dict[str, Any],
        config: dict[str, Any],
        run_id: str,
        peer_id: str,
        samples_seen: int = 0,
    ) -> Checkpoint:
        """A checkpoint of ``state`` plus the peer's local state."""
        return cls(
            round=state.round,
            anchor=state.anchor,
            momentum=state.momentum,
            params=params,
            optimizer_state=optimizer_state,
            config=config,
            run_id=run_id,
            peer_id=peer_id,
            samples_seen=samples_seen,
            extras=dict(state.extras),
        )

    def outer_state(self, device: torch.device | str | None = None) -> OuterState:
        """The outer state to resume with, on ``device`` (default: where the tensors are)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t if device is None else t.to(device)

        extras = {k: move(v) for k, v in self.extras.items()}
        return OuterState(
            anchor=move(self.anchor), momentum=move(self.momentum), round=self.round, extras=extras
        )


def _validate(c: Checkpoint) -> None:
    _require_int(c.round, "checkpoint round")
    _require_int(c.samples_seen, "checkpoint samples_seen")
    if (
        isinstance(c.wall_time, bool)
        or not isinstance(c.wall_time, int | float)
        or not math.isfinite(c.wall_time)
    ):
        raise ValueError(f"checkpoint wall_time must be a finite number, got {c.wall_time!r}")
    for name in ("run_id", "peer_id"):
        value = getattr(c, name)
        if not isinstance(value, str) or not 0 < len(value) <= 256:
            raise ValueError(f"checkpoint {name} must be a string of 1-256 characters, got {value!r:.80}")
    for name in ("anchor", "momentum", "params"):
        t = getattr(c, name)
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or not t.is_floating_point():
            raise ValueError(f"checkpoint {name} must be a flat floating-point tensor, got {_describe(t)}")
        if name != "params" and t.dtype != torch.float32:
            raise ValueError(f"checkpoint {name} must be float32, got {t.dtype}")
        if t.numel() != c.anchor.numel():
            raise ValueError(f"checkpoint {name} has {t.numel()} elements, the anchor {c.anchor.numel()}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"checkpoint {name} holds NaN or infinite values")
    if not isinstance(c.extras, dict):
        raise ValueError(f"checkpoint extras must be a dict of tensors, got {_describe(c.extras)}")
    for key, t in c.extras.items():
        if not isinstance(key, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"checkpoint extras must map names to tensors, got {key!r}: {_describe(t)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"checkpoint extra buffer {key!r} holds NaN or infinite values")
    if not isinstance(c.optimizer_state, dict):
        raise ValueError(f"optimizer_state must be a state_dict, got {_describe(c.optimizer_state)}")
    if not isinstance(c.config, dict):
        raise ValueError(f"config must be the run config document (a dict), got {_describe(c.config)}")
    try:
        json.dumps(c.config, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config must be JSON-able data: {e}") from None


def _require_int(value: object, what: str, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")


def _describe(obj: object) -> str:
    if isinstance(obj, torch.Tensor):
        return f"tensor of shape {tuple(obj.shape)} and dtype {obj.dtype}"
    return type(obj).__name__


def _walk(obj: Any, h: Any, where: str) -> Any:
    """Feed ``obj`` to the hash ``h`` and return a copy with tensors on the CPU; plain data only."""
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided:
            raise ValueError(f"{where}: only dense tensors can be checkpointed, got {obj.layout}")
        t = obj.detach().cpu()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        return t
    if isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        return {_walk(k, h, where): _walk(v, h, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}:".encode())
        items = [_walk(v, h, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, str):
        h.update(f"S{len(obj.encode())}:{obj}".encode())
    elif obj is None or isinstance(obj, bool):
        h.update(f"C{obj}:".encode())
    elif isinstance(obj, int):
        h.update(f"I{obj}:".encode())
    elif isinstance(obj, float):
        h.update(f"F{obj.hex()}:".encode())
    else:
        raise ValueError(f"{where}: cannot checkpoint a {type(obj).__name__}; use tensors, numbers, strings")
    return obj


def _seal(body: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(a CPU copy of ``body``, its BLAKE2b digest)."""
    h = hashlib.blake2b(digest_size=32)
    return _walk(body, h, "checkpoint"), h.hexdigest()


_FIELDS = tuple(f.name for f in fields(Checkpoint))


def _to_doc(c: Checkpoint) -> dict[str, Any]:
    body = {"format": _FORMAT, "version": _VERSION, **{name: getattr(c, name) for name in _FIELDS}}
    body["config"] = json.dumps(c.config, allow_nan=False)
    body["wall_time"] = float(c.wall_time)
    doc, digest = _seal(body)
    return {**doc, "digest": digest}


def _from_doc(doc: object) -> Checkpoint:
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise CheckpointCorruptError("not a lioncub checkpoint")
    if doc.get("version") != _VERSION:
        raise CheckpointCorruptError(f"unsupported checkpoint version {doc.get('version')!r}")
    missing = {*_FIELDS, "digest"} - doc.keys()
    if missing:
        raise CheckpointCorruptError(f"missing fields: {', '.join(sorted(missing))}")
    try:
        if _seal({k: v for k, v in doc.items() if k != "digest"})[1] != doc["digest"]:
            raise CheckpointCorruptError("content digest mismatch (the file is damaged)")
        values = {name: doc[name] for name in _FIELDS}
        if isinstance(values["config"], str):
            values["config"] = json.loads(values["config"])
        return Checkpoint(**values)
    except (ValueError, TypeError) as e:
        raise CheckpointCorruptError(f"invalid contents: {e}") from None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(final: Path, write: Callable[[IO[bytes]], object], hook: WriteHook | None) -> None:
    tmp = final.with_name(f".{final.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if hook is not None:
            hook(tmp, final)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(final.parent)


class CheckpointStore:
    """Checkpoints of one peer in one directory: save atomically, keep the newest, resume.

    Args:
        directory: created if missing; one writer at a time.
        keep: how many checkpoints to keep (the newest by round, plus the one just saved).
        every_rounds: :meth:`due` after this many rounds since the last save (0 = never by rounds).
        every_seconds: :meth:`due` after this many seconds since the last save (0 = never by time).
        write_hook: fault injection for tests, see :data:`WriteHook`.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        keep: int = 3,
        *,
        every_rounds: int = 1,
        every_seconds: float = 0.0,
        write_hook: WriteHook | None = None,
    ) -> None:
        _require_int(keep, "keep", 1)
        _require_int(every_rounds, "every_rounds")
        if not (0 <= every_seconds < math.inf):
            raise ValueError(f"every_seconds must be a finite number >= 0, got {every_seconds!r}")
        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.every_rounds = every_rounds
        self.every_seconds = float(every_seconds)
        self._write_hook = write_hook
        paths = self.paths()
        self._last_round = _round_of(paths[-1]) if paths else 0
        self._last_time = time.monotonic()

    @property
    def directory(self) -> Path:
        return self._dir

    def paths(self) -> list[Path]:
        """Checkpoint files present, oldest round first (temporary files excluded)."""
        found = [p for p in self._dir.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=_round_of)

    def due(self, round_: int) -> bool:
        """Whether a checkpoint at ``round_`` is due under the store's period."""
        by_rounds = self.every_rounds > 0 and round_ - self._last_round >= self.every_rounds
        by_time = self.every_seconds > 0 and time.monotonic() - self._last_time >= self.every_seconds
        return by_rounds or by_time

    def save(self, ckpt: Checkpoint) -> Path:
        """Write ``ckpt`` atomically, point ``latest`` at it, prune old files; return its path."""
        if not isinstance(ckpt, Checkpoint):
            raise TypeError(f"expected a Checkpoint, got {type(ckpt).__name__}")
        doc = _to_doc(ckpt)
        self._remove_stale_temps()
        final = self._dir / f"ckpt-{ckpt.round:08d}.pt"
        _atomic_write(final, lambda f: torch.save(doc, f), self._write_hook)
        pointer = {"file": final.name, "round": ckpt.round, "run_id": ckpt.run_id, "digest": doc["digest"]}
        data = (json.dumps(pointer) + "\n").encode()
        _atomic_write(self._dir / LATEST, lambda f: f.write(data), self._write_hook)
        self._prune(final)
        self._last_round, self._last_time = ckpt.round, time.monotonic()
        logger.debug("saved checkpoint %s", final)
        return final

    def load(self, path: str | os.PathLike[str], *, run_id: str | None = None) -> Checkpoint:
        """Load and validate one checkpoint file (CPU tensors, ``weights_only``)."""
        path = Path(path)
        try:
            doc = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointCorruptError(f"{path.name}: unreadable ({type(e).__name__}: {e})") from e
        try:
            ckpt = _from_doc(doc)
        except CheckpointCorruptError as e:
            raise CheckpointCorruptError(f"{path.name}: {e}") from None
        if _NAME.match(path.name) and _round_of(path) != ckpt.round:
            raise CheckpointCorruptError(f"{path.name}: holds round {ckpt.round}")
        if run_id is not None and ckpt.run_id != run_id:
            raise CheckpointMismatchError(
                f"{path} belongs to run {ckpt.run_id!r}, not {run_id!r}: "
                "use another checkpoint directory or remove it"
            )
        return ckpt

    def load_latest(self, *, run_id: str | None = None) -> Checkpoint | None:
        """The newest checkpoint that validates, or None; damaged files are skipped with a warning.

        Raises:
            CheckpointMismatchError: the newest valid checkpoint belongs to another run.
        """
        for path in reversed(self.paths()):
            try:
                return self.load(path, run_id=run_id)
            except CheckpointCorruptError as e:
                logger.warning("skipping damaged checkpoint: %s", e)
        return None

    def _prune(self, just_saved: Path) -> None:
        others = [p for p in reversed(self.paths()) if p != just_saved]
        for old in others[self.keep - 1 :]:
            old.unlink(missing_ok=True)
            logger.debug("pruned checkpoint %s", old)

    def _remove_stale_temps(self) -> None:
        for p in self._dir.iterdir():
            if _TEMP.match(p.name):
                logger.info("removing temporary file %s left by an interrupted save", p)
                p.unlink(missing_ok=True)


def _round_of(path: Path) -> int:
    """The round in a name that matches ``_NAME``."""
    return int(path.name[len("ckpt-") : -len(".pt")])
