"""When the group syncs outer momentum or averages anchors, and how far apart the peers are.

Every member decides from the round number alone, so the whole group agrees without talking.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .robust import ROBUST_REDUCTIONS

__all__ = ["SyncSchedule", "consensus_distance"]


@dataclass(frozen=True)
class SyncSchedule:
    """A set of rounds after which the group runs an extra float sync.

    Attributes:
        every: sync after every ``every``-th round (``every=K`` → rounds K, 2K, ...). 0 disables.
        geometric_k: if > 0, use geometric gaps instead: T_1 = 1 and T_{j+1} = T_j + ⌈2^{j/k}⌉,
            so syncs thin out as training settles. Takes precedence over ``every``.
        codec: ``"fp16"`` or ``"int8"``, the codec the synced vector travels in.
        reduction: how a shard owner combines the members' vectors: ``"mean"``, ``"clipped"``
            (norm-clipped around the coordinate median, robust to a Byzantine member) or
            ``"median"`` (see :func:`lioncub.optim.robust.robust_mean`).
    """

    every: int = 0
    geometric_k: float = 0.0
    codec: str = "fp16"
    reduction: str = "clipped"

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"every must be >= 0, got {self.every}")
        if self.geometric_k < 0 or not math.isfinite(self.geometric_k):
            raise ValueError(f"geometric_k must be >= 0, got {self.geometric_k}")
        if self.codec not in ("fp16", "int8"):
            raise ValueError(f"codec must be 'fp16' or 'int8', got {self.codec!r}")
        if self.reduction not in ROBUST_REDUCTIONS:
            raise ValueError(
                f"reduction must be one of {', '.join(ROBUST_REDUCTIONS)}, got {self.reduction!r}"
            )

    @property
    def enabled(self) -> bool:
        return self.every > 0 or self.geometric_k > 0

    def is_due(self, rounds_done: int) -> bool:
        """Whether to sync after ``rounds_done`` rounds have been applied (1-based count)."""
        if rounds_done <= 0 or not self.enabled:
            return False
        if self.geometric_k > 0:
            t, j = 1, 0
            while t < rounds_done:
                j += 1
                t += math.ceil(2.0 ** (j / self.geometric_k))
            return t == rounds_done
        return rounds_done % self.every == 0

    def due_rounds(self, limit: int) -> list[int]:
        """All sync points in ``[1, limit]`` (for logs and tests)."""
        return [r for r in range(1, limit + 1) if self.is_due(r)]


def consensus_distance(vectors: Sequence[torch.Tensor]) -> float:
    """Mean relative distance of peers' parameters to their mean: mean_i ‖θ_i − θ̄‖ / ‖θ̄‖."""
    if not vectors:
        raise ValueError("consensus distance of no peers")
    stacked = torch.stack([v.detach().to(torch.float32).reshape(-1) for v in vectors])
    mean = stacked.mean(dim=0)
    denom = float(mean.norm())
    dists = (stacked - mean).norm(dim=1)
    if denom == 0.0:
        return float(dists.mean())
    return float(dists.mean()) / denom
