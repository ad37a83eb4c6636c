"""Leader-based group assembly: the peers ready for a round agree on groups, members and shards.

A peer ready for round ``r`` calls ``await matchmaker.form_group(r, weight)``:

1. It posts itself as ready under ``<run_id>.round<r>.ready`` in the DHT (endpoint, client mode,
   bandwidth, weight, public key; expiring with the round's deadline).
2. It gathers: reads the ready set (polling with a growing interval) until it holds every active
   peer of the run's :class:`~lioncub.peer.dht.SwarmRegistry`, or a gather window passes.
3. From that snapshot every peer computes the same groups (:func:`plan_groups`): peers ordered by
   a hash of (run id, round, peer id), cut into groups of ``group_size``. A group's leader is its
   first member not in client mode.
4. The leader serves ``JoinGroup`` (this class is the server's group handler): it checks each
   request (signature, admission, run), accepts peers of the round up to a cap (also peers its own
   snapshot put elsewhere: snapshots can differ), and once its expected members joined or its
   assembly deadline passed, it signs a :class:`GroupAnnouncement` with the shard plan
   (:func:`lioncub.peer.groups.announce_group`) and streams it to every member. It announces
   at the latest a margin before its own deadline or an expected follower's call deadline.
5. A follower calls its leader's ``JoinGroup`` and checks the announcement. If the leader is
   unreachable, rejects, disbands or is too slow, the follower excludes it, re-reads the ready set
   and recomputes, so a dead leader is replaced while time remains.

``form_group`` returns the :class:`~lioncub.protocol.GroupPlan` or ``None`` (alone, no leader
reachable in time, the DHT failing...): the caller then applies its own update and goes on. Every
failure is logged and counted in :attr:`Matchmaker.stats`, never raised.

Example (one peer; ``channels`` is the :class:`~lioncub.peer.exchange.ChannelPool` the exchange uses)::

    server = await PeerServer.start("0.0.0.0:0", identity=me)
    info = peer_info(me, endpoint=server.endpoint, bandwidth_mbps=100.0)
    config = MatchmakingConfig(group_size=4, timeout=5.0)
    matchmaker = Matchmaker(dht, me, run_id, info, total_numel=n, config=config, channels=channels)
    server.groups = matchmaker
    plan = await matchmaker.form_group(round, weight=samples)  # None: apply the local update alone
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from hivemind.dht import DHT

from lioncub.peer._match_assembly import Phase, RoundAssembly
from lioncub.peer._match_board import ReadyBoard
from lioncub.peer._match_config import MatchmakingConfig, MatchmakingStats, RoundStatus
from lioncub.peer._match_follow import JoinFailed, join_leader
from lioncub.peer._match_plan import PlannedGroup, ReadyPeer, plan_groups
from lioncub.peer.dht import DHTError, SwarmRegistry
from lioncub.peer.exchange import ChannelPool
from lioncub.peer.groups import announce_group, deadline_ms_after
from lioncub.peer.server import CallInfo, GroupHandler
from lioncub.protocol import (
    PROTOCOL_VERSION,
    AdmissionPolicy,
    GroupPlan,
    Identity,
    InvalidMessage,
    ProtocolError,
    check_group_announcement,
    check_join_request,
    make_admission,
    sign_message,
)
from lioncub.protocol import lioncub_pb2 as pb
from lioncub.protocol.validate import check_peer_info

__all__ = [
    "Matchmaker",
    "MatchmakingConfig",
    "MatchmakingStats",
    "Phase",
    "PlannedGroup",
    "RoundStatus",
    "plan_groups",
]

logger = logging.getLogger(__name__)

_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_REPLY_MARGIN_S = 0.05


class Matchmaker:
    """Forms this peer's group for each round; also the handler of ``JoinGroup`` on its server.

    :param dht: this peer's DHT node (:func:`lioncub.peer.dht.start_dht`).
    :param identity: signs join requests and announcements.
    :param peer_info: how others reach this peer (:func:`lioncub.peer.groups.peer_info`); its
        ``peer_id`` and ``public_key`` must be ``identity``'s.
    :param total_numel: length of the flat vector that groups split into shards.
    :param config: :class:`MatchmakingConfig`.
    :param policy: who may join this peer's groups (open swarm by default); its swarm key, if
        any, is also what this peer proves when it joins others.
    :param channels: the peer's outgoing channels (share the exchange's :class:`ChannelPool`, which
        also carries the swarm's TLS settings); default: a private insecure pool, closed by
        :meth:`close`.
    :param registry: the run's peer registry, read to know whom to wait for; default: a
        :class:`SwarmRegistry` of ``run_id`` on ``dht``.
    :param current_round: the round this peer is at, told to callers whose join request it rejects
        because it is not forming their round (a peer far behind learns so at once).
    """

    def __init__(
        self,
        dht: DHT,
        identity: Identity,
        run_id: str,
        peer_info: pb.PeerInfo,
        *,
        total_numel: int,
        config: MatchmakingConfig | None = None,
        policy: AdmissionPolicy | None = None,
        channels: ChannelPool | None = None,
        registry: SwarmRegistry | None = None,
        current_round: Callable[[], int] | None = None,
    ) -> None:
        if peer_info.peer_id != identity.peer_id or peer_info.public_key != identity.public_key:
            raise ValueError("peer_info must describe this peer's identity (same peer id and public key)")
        try:
            check_peer_info(peer_info, "this peer")
        except ProtocolError as e:
            raise ValueError(f"invalid peer_info: {e}") from None
        if not isinstance(run_id, str) or _RUN_ID.fullmatch(run_id) is None:
            raise ValueError(f"run_id must be 1-64 characters of A-Z a-z 0-9 _ -, got {run_id!r:.80}")
        if total_numel < 0:
            raise ValueError(f"total_numel must be >= 0, got {total_numel}")
        self.dht = dht
        self.identity = identity
        self.run_id = run_id
        self.peer_info = peer_info
        self.total_numel = total_numel
        self.config = config if config is not None else MatchmakingConfig()
        self.policy = policy if policy is not None else AdmissionPolicy()
        self._own_channels = channels is None
        self._channels = ChannelPool() if channels is None else channels
        self._rounds: dict[int, RoundAssembly] = {}
        self._stats = MatchmakingStats()
        registry = registry if registry is not None else SwarmRegistry(dht, run_id)
        self._board = ReadyBoard(dht, run_id, identity.peer_id, registry, self._stats)
        self._background: set[asyncio.Task[None]] = set()
        self._current_round = current_round
        self._ahead: dict[str, int] = {}

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    def note_round(self, peer_id: str, round: int) -> None:
        """Remember that ``peer_id`` said it is at ``round`` (a rejected join request, a Health call)."""
        self._ahead[peer_id] = max(round, self._ahead.get(peer_id, 0))

    def peers_ahead(self, round: int) -> dict[str, int]:
        """Peers that said they are past ``round`` (see :meth:`note_round`): id → round."""
        self._ahead = {p: r for p, r in self._ahead.items() if r > round}
        return dict(self._ahead)

    @property
    def stats(self) -> MatchmakingStats:
        """A copy of the counters."""
        return dataclasses.replace(self._stats)

    def round_status(self, round: int) -> RoundStatus | None:
        """Where the assembly of ``round`` stands, or None when no ``form_group`` for it is running."""
        state = self._rounds.get(round)
        if state is None:
            return None
        return RoundStatus(round, state.phase, state.expected, frozenset(state.joined))

    async def close(self, grace: float = 1.0) -> None:
        """Finish background work (group publishing) within ``grace`` seconds, then cancel the rest;
        close the channel pool if the matchmaker made it. Running ``form_group`` calls are the caller's.
        """
        tasks = list(self._background)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._own_channels:
            await self._channels.close()

    def _log(self, level: int, round: int, msg: str, *args: object) -> None:
        logger.log(level, "[%s r%d] " + msg, self.peer_id[:8], round, *args)

    # --- the peer's own side -----------------------------------------------------------------

    async def form_group(self, round: int, weight: float, deadline: float | None = None) -> GroupPlan | None:
        """Find this peer's group for ``round``; None if none formed in time (see the module docstring).

        :param weight: samples this peer processed this round (posted for others to see).
        :param deadline: ``time.monotonic()`` by which to give up; at most ``config.timeout`` from now.
        :raises ValueError: bad arguments; :class:`RuntimeError` if ``round`` is already being formed.
        """
        if isinstance(round, bool) or not isinstance(round, int) or not 0 <= round < 2**63:
            raise ValueError(f"round must be an int in [0, 2**63), got {round!r}")
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight must be finite and >= 0, got {weight}")
        if round in self._rounds:
            raise RuntimeError(f"form_group for round {round} is already running")
        start = time.monotonic()
        end = start + self.config.timeout
        if deadline is not None:
            end = min(end, deadline)
        state = RoundAssembly(round, end, self.config.member_cap)
        self._rounds[round] = state
        self._stats.rounds += 1
        plan: GroupPlan | None = None
        try:
            plan = await self._form(state, ReadyPeer(self.peer_info, float(weight)), start, end)
        except (DHTError, ProtocolError, OSError) as e:  # failures are data, never a crash
            self._log(logging.WARNING, round, "matchmaking failed: %s", e)
        except Exception:  # a bug, but the round goes on without a group
            logger.exception("[%s r%d] matchmaking failed unexpectedly", self.peer_id[:8], round)
        finally:
            state.disband(f"the leader gave up on round {round}")
            del self._rounds[round]
            elapsed = time.monotonic() - start
            self._stats.last_latency_s = elapsed
            if plan is None:
                self._stats.fallbacks += 1
        if plan is None:
            self._log(logging.INFO, round, "no group this round (%.3f s); going on alone", elapsed)
        else:
            self._log(
                logging.INFO,
                round,
                "in group %s of %d led by %s (%.3f s)",
                plan.group_id,
                len(plan.members),
                plan.leader_id[:8],
                elapsed,
            )
        return plan

    async def _form(self, state: RoundAssembly, me: ReadyPeer, start: float, end: float) -> GroupPlan | None:
        r = state.round
        if end <= time.monotonic():
            return None
        await self._board.post(r, me, end)
        gather_end = min(end, start + self.config.gather_fraction * self.config.timeout)
        ready = await self._board.gather(r, me, gather_end, end, self.config.poll_interval)
        excluded: set[str] = set()
        while time.monotonic() < end:
            peers = {peer_id: p for peer_id, p in ready.items() if peer_id not in excluded}
            group = self._my_group(r, peers)
            if group is None:
                return None
            if group.leader == self.peer_id:
                return await self._lead(state, group, end)
            assert group.leader is not None
            state.follow()
            leader = peers[group.leader]
            try:
                plan = await self._join(r, me, leader, end)
            except JoinFailed as e:
                self._stats.leader_failures += 1
                self._log(logging.INFO, r, "leader %s failed (%s); choosing another", leader.peer_id[:8], e)
                excluded.add(leader.peer_id)
                if e.leader_round > r:
                    self.note_round(leader.peer_id, e.leader_round)
                ready.update(await self._board.read(r, me, end, quiet=True))
                continue
            state.disband(f"this peer joined the group of {leader.peer_id} in round {r}")
            self._stats.joined += 1
            return plan
        return None

    def _my_group(self, round: int, peers: dict[str, ReadyPeer]) -> PlannedGroup | None:
        groups = plan_groups(
            self.run_id,
            round,
            {p: ready.info.client_mode for p, ready in peers.items()},
            self.config.group_size,
        )
        group = next(g for g in groups if self.peer_id in g.members)
        if len(group.members) < 2:
            self._log(logging.DEBUG, round, "alone among %d ready peers", len(peers))
            return None
        if group.leader is None:
            self._log(logging.INFO, round, "group of %d has only client-mode peers", len(group.members))
            return None
        return group

    async def _join(self, round: int, me: ReadyPeer, leader: ReadyPeer, end: float) -> GroupPlan:
        request = pb.JoinGroupRequest(
            protocol_version=PROTOCOL_VERSION,
            run_id=self.run_id,
            round=round,
            matchmaking_key=f"{self.run_id}.round{round}.ready",
            peer=self.peer_info,
            admission=make_admission(self.policy.swarm_key, self.identity, run_id=self.run_id),
            weight=me.weight,
        )
        sign_message(request, self.identity)
        now = time.monotonic()
        return await join_leader(
            self._channels,
            leader,
            request,
            self_id=self.peer_id,
            accept_deadline=now + self.config.accept_fraction * self.config.timeout,
            deadline=end,
        )

    async def _lead(self, state: RoundAssembly, group: PlannedGroup, end: float) -> GroupPlan | None:
        r = state.round
        state.lead(frozenset(group.members) - {self.peer_id})
        self._log(logging.DEBUG, r, "leading; expecting %d members", len(state.expected))
        margin = self.config.announce_margin_fraction * self.config.timeout
        while not state.complete() and time.monotonic() < state.announce_by(end, margin):
            await state.wait_changed(state.announce_by(end, margin))
        if not state.joined:
            state.disband(f"no member joined the group of round {r}")
            return None

        def build(followers: list[ReadyPeer]) -> pb.GroupAnnouncement:
            return announce_group(
                self.identity,
                run_id=self.run_id,
                round=r,
                members=[self.peer_info, *(f.info for f in followers)],
                total_numel=self.total_numel,
                deadline_ms=deadline_ms_after(self.config.exchange_timeout),
            )

        try:
            announcement = state.announce(build)
        except ValueError as e:
            state.disband(f"the leader could not build the group: {e}")
            self._log(logging.WARNING, r, "could not announce the group: %s", e)
            return None
        plan = check_group_announcement(announcement, run_id=self.run_id, round=r, self_id=self.peer_id)
        self._stats.led += 1
        if self.config.publish_groups:
            lifetime = self.config.timeout + self.config.exchange_timeout
            self._spawn(self._board.publish(plan, lifetime, timeout=self.config.timeout))
        return plan

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- the leader's side: the server's JoinGroup handler -----------------------------------

    async def join_group(
        self, request: pb.JoinGroupRequest, call: CallInfo
    ) -> AsyncIterator[pb.JoinGroupReply]:
        """Answer one ``JoinGroup`` call (see the module docstring).

        Raises a :class:`~lioncub.protocol.ProtocolError` for an invalid request (bad signature or
        admission, wrong run, malformed): the server turns it into the matching gRPC status.
        Requests for a round this peer does not lead get a REJECTED reply.
        """
        try:
            check_join_request(request, run_id=self.run_id, round=request.round, policy=self.policy)
            if request.peer.peer_id == self.peer_id:
                raise InvalidMessage("a peer cannot join its own group")
        except ProtocolError:
            self._stats.requests_invalid += 1
            raise
        state = self._rounds.get(request.round)
        if state is None:
            self._stats.requests_rejected += 1
            yield pb.JoinGroupReply(
                status=pb.JoinGroupReply.STATUS_REJECTED,
                reason=f"this peer is not forming a group for round {request.round}",
                round=max(0, self._current_round()) if self._current_round is not None else 0,
            )
            return
        # Answer a held request while the caller still listens.
        caller_deadline = None if call.deadline is None else call.deadline - _REPLY_MARGIN_S
        async with aclosing(state.serve(ReadyPeer(request.peer, request.weight), caller_deadline)) as replies:
            async for reply in replies:
                if reply.status == pb.JoinGroupReply.STATUS_ACCEPTED:
                    self._stats.requests_accepted += 1
                elif reply.status == pb.JoinGroupReply.STATUS_REJECTED:
                    self._stats.requests_rejected += 1
                yield reply


if TYPE_CHECKING:

    def _is_group_handler(matchmaker: Matchmaker) -> GroupHandler:
        return matchmaker  # mypy checks that Matchmaker implements the server's GroupHandler
