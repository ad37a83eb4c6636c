"""The DHT side of matchmaking: posting ready, gathering the ready set, publishing groups.

All calls go through :mod:`lioncub.peer.dht`, are bounded by the round's deadline, and turn
failures into counted, logged data: a failed read yields what is known (at least this peer).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from lioncub.peer._match_config import MatchmakingStats
from lioncub.peer._match_plan import ReadyPeer, parse_ready_info, ready_info
from lioncub.peer.dht import (
    DEFAULT_CALL_TIMEOUT,
    DHTError,
    SwarmRegistry,
    get_ready_async,
    post_group_async,
    post_ready_async,
)
from lioncub.protocol import GroupPlan

__all__ = ["ReadyBoard"]

logger = logging.getLogger(__name__)

#: Seconds between registry reads while gathering (the ready set is read on every poll).
_REGISTRY_REFRESH_S = 0.3
_MAX_POLL_INTERVAL = 0.25
_READY_SLACK_S = 2.0  # a ready entry outlives the round's deadline by this much
_MIN_CALL_TIMEOUT = 0.05


def _call_timeout(end: float) -> float:
    return max(_MIN_CALL_TIMEOUT, min(DEFAULT_CALL_TIMEOUT, end - time.monotonic()))


class ReadyBoard:
    """One peer's view of a run's per-round ready sets (see the module docstring)."""

    def __init__(
        self, dht: DHT, run_id: str, me: str, registry: SwarmRegistry, stats: MatchmakingStats
    ) -> None:
        self.dht, self.run_id, self.me, self.registry, self.stats = dht, run_id, me, registry, stats

    def _log(self, level: int, round: int, msg: str, *args: object) -> None:
        logger.log(level, "[%s r%d] " + msg, self.me[:8], round, *args)

    async def post(self, round: int, me: ReadyPeer, end: float) -> None:
        """Post this peer as ready for ``round`` until shortly after ``end`` (monotonic)."""
        expiration = get_dht_time() + max(0.0, end - time.monotonic()) + _READY_SLACK_S
        try:
            info = ready_info(me.info, me.weight)
            stored = await post_ready_async(
                self.dht, self.run_id, round, self.me, info, expiration, timeout=_call_timeout(end)
            )
        except DHTError as e:
            stored = False
            self._log(logging.WARNING, round, "could not post ready: %s", e)
        if not stored:
            self.stats.dht_errors += 1

    async def gather(
        self, round: int, me: ReadyPeer, gather_end: float, end: float, poll_interval: float
    ) -> dict[str, ReadyPeer]:
        """Read the ready set until it holds every active peer or ``gather_end`` passes."""
        interval = poll_interval
        active: set[str] | None = None
        active_read = -math.inf
        while True:
            if time.monotonic() - active_read >= _REGISTRY_REFRESH_S:
                # The registry changes slowly (entries refresh every few seconds): reading it on
                # every poll of the ready set would double this peer's DHT traffic for nothing.
                active_read = time.monotonic()
                active, ready = await asyncio.gather(self.active_peers(round, end), self.read(round, me, end))
            else:
                ready = await self.read(round, me, end)
            now = time.monotonic()
            complete = active is not None and active <= ready.keys()
            if complete or now >= gather_end:
                if active is not None and not complete:
                    missing = len(active - ready.keys())
                    self._log(logging.DEBUG, round, "gather window over; %d active peers not ready", missing)
                return ready
            await asyncio.sleep(min(interval, gather_end - now))
            interval = min(interval * 1.5, _MAX_POLL_INTERVAL)

    async def active_peers(self, round: int, end: float) -> set[str] | None:
        """Registered peers of the run, except those already past ``round``; None if unknown."""
        try:
            records = await asyncio.wait_for(self.registry.peers_async(), _call_timeout(end))
        except (DHTError, TimeoutError) as e:
            self.stats.dht_errors += 1
            self._log(logging.DEBUG, round, "could not read the registry: %r", e)
            return None
        return {rec.peer_id for rec in records if rec.round <= round} | {self.me}

    async def read(
        self, round: int, me: ReadyPeer, end: float, *, quiet: bool = False
    ) -> dict[str, ReadyPeer]:
        """Peer id -> checked ready entry, this peer included; malformed entries are skipped."""
        ready = {self.me: me}
        if end <= time.monotonic():
            return ready
        try:
            entries = await get_ready_async(self.dht, self.run_id, round, timeout=_call_timeout(end))
        except DHTError as e:
            self.stats.dht_errors += 1
            self._log(logging.DEBUG if quiet else logging.WARNING, round, "could not read ready peers: %s", e)
            return ready
        for peer_id, value in entries.items():
            if peer_id == self.me:
                continue
            try:
                ready[peer_id] = parse_ready_info(peer_id, value)
            except ValueError as e:
                self.stats.bad_ready_entries += 1
                self._log(logging.DEBUG, round, "ignoring the ready entry of %.40r: %s", peer_id, e)
        return ready

    async def publish(self, plan: GroupPlan, lifetime: float, timeout: float) -> None:
        """Publish an agreed group under ``<run_id>.round<r>.groups`` (for observability only)."""
        value = {
            "group_id": plan.group_id,
            "leader": plan.leader_id,
            "members": list(plan.members),
            "shards": [[s.owner_id, s.offset, s.numel] for s in plan.shards],
            "total_numel": plan.total_numel,
        }
        expiration = get_dht_time() + lifetime
        try:
            await post_group_async(
                self.dht, self.run_id, plan.round, self.me, value, expiration, timeout=timeout
            )
        except (DHTError, ValueError) as e:  # ValueError: a huge group over the DHT's size limit
            self.stats.dht_errors += 1
            self._log(logging.DEBUG, plan.round, "could not publish the group: %s", e)
