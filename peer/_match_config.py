"""Matchmaking settings, counters and status views (plain dataclasses)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lioncub.peer._match_assembly import Phase
from lioncub.protocol import MAX_GROUP_SIZE

__all__ = ["MatchmakingConfig", "MatchmakingStats", "RoundStatus"]


@dataclass(frozen=True)
class MatchmakingConfig:
    """How groups are formed. Times in seconds; fractions are of ``timeout``.

    Attributes:
        group_size: target members per group; 0 = everyone ready in one group.
        timeout: longest a ``form_group`` call takes.
        gather_fraction: longest wait for every active peer to post ready before grouping.
        accept_fraction: longest a follower waits for a leader's first reply before replacing it.
        announce_margin_fraction: the leader announces this long before the deadline at the latest,
            so that the announcement reaches followers in time.
        exchange_timeout: the group's data exchange deadline, written into the announcement.
        max_group_size: most members a leader accepts; None = ``MAX_GROUP_SIZE`` when
            ``group_size`` is 0, else ``2 * group_size`` (room for peers whose snapshot differed).
        poll_interval: first interval between ready-set reads (it grows 1.5x up to 0.25 s).
        publish_groups: leaders publish their group under ``<run_id>.round<r>.groups``.
    """

    group_size: int = 0
    timeout: float = 5.0
    gather_fraction: float = 0.4
    accept_fraction: float = 0.4
    announce_margin_fraction: float = 0.1
    exchange_timeout: float = 30.0
    max_group_size: int | None = None
    poll_interval: float = 0.02
    publish_groups: bool = True

    def __post_init__(self) -> None:
        if self.group_size < 0 or self.group_size == 1:
            raise ValueError(f"group_size must be 0 (everyone) or >= 2, got {self.group_size}")
        for name in ("timeout", "exchange_timeout", "poll_interval"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        for name in ("gather_fraction", "accept_fraction", "announce_margin_fraction"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ValueError(f"{name} must be in (0, 1), got {value}")
        if self.max_group_size is not None and not 2 <= self.max_group_size <= MAX_GROUP_SIZE:
            raise ValueError(f"max_group_size must be in [2, {MAX_GROUP_SIZE}], got {self.max_group_size}")

    @property
    def member_cap(self) -> int:
        """Most members (leader included) a leader accepts into its group."""
        if self.max_group_size is not None:
            return self.max_group_size
        return MAX_GROUP_SIZE if self.group_size == 0 else min(MAX_GROUP_SIZE, 2 * self.group_size)


@dataclass
class MatchmakingStats:
    """Counters of one matchmaker (read a copy through ``Matchmaker.stats``)."""

    rounds: int = 0  # form_group calls
    led: int = 0  # groups announced as leader
    joined: int = 0  # groups joined as follower
    fallbacks: int = 0  # form_group calls that returned None
    leader_failures: int = 0  # leaders that could not be joined and were replaced
    requests_accepted: int = 0
    requests_rejected: int = 0  # REJECTED replies (not leading this round, full, too late)
    requests_invalid: int = 0  # requests that failed validation (answered with a gRPC error)
    dht_errors: int = 0
    bad_ready_entries: int = 0
    last_latency_s: float = 0.0  # duration of the last form_group call


@dataclass(frozen=True)
class RoundStatus:
    """A view of one round's assembly at this peer (for metrics, logs and tests)."""

    round: int
    phase: Phase
    expected: frozenset[str]
    joined: frozenset[str]
