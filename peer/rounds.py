"""The network side of a round: find a group, exchange, apply; plus the scheduled float syncs.

:class:`RoundEngine` is what turns a peer's local result (Δ and its sample count) into the agreed
update, whoever drives the local steps (the CLI runtime or a user's own loop through the Python
API). A failed matchmaking or exchange is data: the peer applies its own contribution for the
missing part and goes on (DESIGN.md section 4).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import torch

from lioncub.optim.reducers import MeanReducer, Reducer, TrustedVoteReducer
from lioncub.optim.robust import AgreementTracker, TrustConfig
from lioncub.optim.schedules import SyncSchedule
from lioncub.optim.strategies import OuterState, SyncStrategy
from lioncub.protocol import GroupPlan

from .adversary import Adversary, push_forgeries
from .exchange import ExchangeHub, run_exchange
from .matchmaking import Matchmaker

__all__ = ["RoundEngine", "RoundReport"]

log = logging.getLogger(__name__)


@dataclass
class RoundReport:
    """What one round did, for progress bars, metrics and summaries."""

    round: int
    group_size: int
    group_members: tuple[str, ...]
    missing_owners: tuple[str, ...] = ()
    bytes_sent: int = 0
    bytes_received: int = 0
    matchmaking_s: float = 0.0
    exchange_s: float = 0.0
    momentum_synced: bool = False
    averaged: bool = False
    consensus_distance: float | None = None
    failures: list[str] = field(default_factory=list)
    #: This peer's trust (< 1 only) in the voters of the shard it owned this round.
    distrusted: dict[str, float] = field(default_factory=dict)


class RoundEngine:
    """Drives ``strategy`` over the network for one peer.

    ``trust`` (default on): as a shard owner, weigh sign votes by each voter's agreement with the
    majority and evict persistent dissenters (:class:`~lioncub.optim.robust.AgreementTracker`).
    ``adversary`` makes this peer Byzantine: for resilience tests only.
    """

    def __init__(
        self,
        strategy: SyncStrategy,
        state: OuterState,
        hub: ExchangeHub,
        matchmaker: Matchmaker,
        *,
        matchmaking_timeout: float,
        exchange_timeout: float,
        momentum_sync: SyncSchedule,
        averaging: SyncSchedule,
        trust: TrustConfig | None = None,
        adversary: Adversary | None = None,
    ) -> None:
        self.strategy = strategy
        self.state = state
        self.hub = hub
        self.matchmaker = matchmaker
        self.matchmaking_timeout = matchmaking_timeout
        self.exchange_timeout = exchange_timeout
        self.momentum_sync = momentum_sync
        self.averaging = averaging
        self.tracker = AgreementTracker(trust or TrustConfig())
        self.adversary = adversary
        self._scored = self.tracker.config.enabled and strategy.uplink.name == "sign1"
        self._momentum_reducer = MeanReducer(momentum_sync.codec, momentum_sync.reduction)
        self._averaging_reducer = MeanReducer(averaging.codec, averaging.reduction)

    async def sync(self, delta: torch.Tensor, samples: int) -> RoundReport:
        """Run round ``state.round`` with this peer's Δ and apply the agreed update to the anchor."""
        rnd = self.state.round
        self.hub.enter_round(rnd)
        vec = self.strategy.prepare(self.state, delta)
        t0 = time.monotonic()
        plan = await self.matchmaker.form_group(
            round=rnd, weight=float(samples), deadline=t0 + self.matchmaking_timeout
        )
        report = RoundReport(rnd, 1, (), matchmaking_s=time.monotonic() - t0)
        if plan is None:
            report.failures.append("no_group")
            update = self.strategy.decode(self.strategy.local_fallback(self.strategy.encode(vec), samples))
        else:
            update = await self._exchange(plan, "update", vec, self.strategy, samples, report)
        self.strategy.apply(self.state, update, delta)
        if plan is not None:
            # Sync points are decided by the round number alone, so the whole group agrees.
            done = self.state.round
            if self.momentum_sync.is_due(done):
                reducer = self._momentum_reducer
                mean = await self._exchange(plan, "momentum", self.state.momentum, reducer, 1, report)
                self.state.momentum.copy_(mean)
                report.momentum_synced = True
                log.info("round %d: momentum synced with %d peers", rnd, len(plan.members))
            if self.averaging.is_due(done):
                reducer = self._averaging_reducer
                mean = await self._exchange(plan, "params", self.state.anchor, reducer, 1, report)
                # This peer's distance to its group's mean anchor, before adopting it.
                norm = float(mean.norm())
                report.consensus_distance = float((self.state.anchor - mean).norm()) / norm if norm else 0.0
                self.state.anchor.copy_(mean)
                report.averaged = True
                log.info("round %d: anchors averaged with %d peers", rnd, len(plan.members))
        return report

    async def _exchange(
        self,
        plan: GroupPlan,
        name: str,
        vec: torch.Tensor,
        reducer: Reducer,
        weight: int,
        report: RoundReport,
    ) -> torch.Tensor:
        t0 = time.monotonic()
        trusted = None
        if name == "update" and self._scored and isinstance(reducer, SyncStrategy):
            reducer = trusted = TrustedVoteReducer(reducer, self.tracker, self.hub.identity.peer_id)
        deadline = time.time() + self.exchange_timeout
        if self.adversary is None:
            outcome = await run_exchange(self.hub, plan, name, vec, reducer, int(weight), deadline=deadline)
        else:
            sent, lying = self.adversary.corrupt(name, vec), self.adversary.wrap(name, reducer)
            outcome, _ = await asyncio.gather(
                run_exchange(self.hub, plan, name, sent, lying, int(weight), deadline=deadline),
                push_forgeries(
                    self.adversary,
                    self.hub,
                    plan,
                    name,
                    sent,
                    reducer,
                    int(weight),
                    timeout=self.exchange_timeout,
                ),
            )
        if trusted is not None:
            distrusted = {p: t for p, t in trusted.last_trust.items() if t < 1.0}
            report.distrusted = distrusted
            if distrusted:
                log.warning(
                    "round %d: voters down-weighted for disagreeing with the majority: %s",
                    plan.round,
                    ", ".join(f"{p[:8]}={t:.2f}" for p, t in sorted(distrusted.items())),
                )
        report.exchange_s += time.monotonic() - t0
        report.group_size = len(plan.members)
        report.group_members = tuple(plan.members)
        report.bytes_sent += outcome.bytes_sent
        report.bytes_received += outcome.bytes_received
        if outcome.missing_owners:
            report.missing_owners = tuple(sorted(set(report.missing_owners) | set(outcome.missing_owners)))
            report.failures.append(f"{name}_fallback")
            log.warning(
                "round %d %s: %d shard(s) fell back to the local value (owners %s)",
                plan.round,
                name,
                len(outcome.missing_owners),
                ", ".join(o[:8] for o in outcome.missing_owners),
            )
        return outcome.update
