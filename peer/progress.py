"""A rich progress bar for rounds: loss, round, bytes — used by the simulator and the runtime CLI."""

from __future__ import annotations

from types import TracebackType
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

__all__ = ["RoundProgress", "RoundStats"]


class RoundStats(Protocol):
    @property
    def round(self) -> int: ...
    @property
    def train_loss(self) -> float: ...
    @property
    def val_loss(self) -> float | None: ...
    @property
    def bytes_sent_per_peer(self) -> float: ...
    @property
    def elapsed_s(self) -> float: ...


class RoundProgress:
    """Context manager around one rich progress bar; ``update`` takes a round record."""

    def __init__(self, console: Console, *, total: int, label: str, enabled: bool = True) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  val {task.fields[val]}  {task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self._total = total
        self._label = label
        self._task: TaskID | None = None
        self._val = "-"

    def __enter__(self) -> RoundProgress:
        self._progress.start()
        self._task = self._progress.add_task(self._label, total=self._total, loss="-", val="-", rate="")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def update(self, rec: RoundStats) -> None:
        if self._task is None:
            return
        if rec.val_loss is not None:
            self._val = f"{rec.val_loss:.3f}"
        rate = rec.bytes_sent_per_peer / max(rec.elapsed_s, 1e-9)
        self._progress.update(
            self._task,
            completed=rec.round,
            loss=f"{rec.train_loss:.3f}",
            val=self._val,
            rate=f"{rate / 1e3:.1f} kB/s/peer",
        )


class PeerProgress:
    """The ``join`` command's bar: round, loss, group size and upload rate of one peer."""

    def __init__(self, console: Console, *, total: int | None, label: str, enabled: bool = True) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("round {task.completed:.0f}{task.fields[of]}"),
            TextColumn("loss {task.fields[loss]}  group {task.fields[group]}  {task.fields[rate]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
        )
        self._task = self._progress.add_task(
            label, total=total, of=f"/{total}" if total else "", loss="-", group="-", rate=""
        )

    def __enter__(self) -> PeerProgress:
        self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._progress.stop()

    def update(
        self, *, round: int, loss: float | None, group_size: int, bytes_sent: int, wall_s: float
    ) -> None:
        self._progress.update(
            self._task,
            completed=round,
            loss="-" if loss is None else f"{loss:.4f}",
            group=str(group_size),
            rate=f"{bytes_sent / max(wall_s, 1e-9) / 1e3:.1f} kB/s up",
        )
