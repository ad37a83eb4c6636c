"""Building the signed ``GroupAnnouncement`` a leader sends to the members of a group.

Pure functions: no I/O, no clock unless asked. A leader (the matchmaker, or a test) collects the
members' :class:`~lioncub.protocol.lioncub_pb2.PeerInfo`, then calls :func:`announce_group`, which

* sorts the members by peer id (every member must see the same order),
* plans the shards with :func:`~lioncub.optim.partition.shard_bounds` over the members' bandwidth
  (client-mode members get capacity 0 and own nothing; members with empty ranges own no shard),
* and signs the announcement with the leader's key.

Every member then checks it with :func:`lioncub.protocol.check_group_announcement`, which returns the
:class:`~lioncub.protocol.GroupPlan` that the exchange runs on.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lioncub import __version__
from lioncub.optim.partition import SHARD_ALIGN, shard_bounds
from lioncub.protocol import (
    MAX_GROUP_SIZE,
    MAX_NUMEL,
    PROTOCOL_VERSION,
    Identity,
    sign_message,
)
from lioncub.protocol import lioncub_pb2 as pb

__all__ = [
    "ShardRange",
    "announce_group",
    "deadline_ms_after",
    "group_id_for",
    "peer_info",
    "plan_shards",
]


@dataclass(frozen=True)
class ShardRange:
    """One planned shard: ``[offset, offset + numel)`` of the flat vector, owned by ``owner_id``."""

    index: int
    owner_id: str
    offset: int
    numel: int

    def to_proto(self) -> pb.ShardAssignment:
        return pb.ShardAssignment(
            index=self.index, owner_id=self.owner_id, offset=self.offset, numel=self.numel
        )


def peer_info(
    identity: Identity,
    *,
    endpoint: str = "",
    client_mode: bool = False,
    bandwidth_mbps: float = 100.0,
    software_version: str = __version__,
) -> pb.PeerInfo:
    """The ``PeerInfo`` a peer reports about itself (client-mode peers have no endpoint)."""
    if client_mode and endpoint:
        raise ValueError("a client-mode peer accepts no connections: pass endpoint='' with client_mode=True")
    if not client_mode and not endpoint:
        raise ValueError("a reachable peer needs its endpoint ('host:port'); or set client_mode=True")
    if not (math.isfinite(bandwidth_mbps) and bandwidth_mbps >= 0):
        raise ValueError(f"bandwidth_mbps must be finite and >= 0, got {bandwidth_mbps}")
    return pb.PeerInfo(
        peer_id=identity.peer_id,
        public_key=identity.public_key,
        endpoint=endpoint,
        client_mode=client_mode,
        bandwidth_mbps=bandwidth_mbps,
        software_version=software_version,
    )


def _capacities(members: Sequence[pb.PeerInfo]) -> list[float]:
    """Bandwidth of reachable members; 0 for client mode. All reachable at 0 (unknown): equal shares."""
    caps = [0.0 if m.client_mode else max(0.0, float(m.bandwidth_mbps)) for m in members]
    if not any(caps):
        caps = [0.0 if m.client_mode else 1.0 for m in members]
    return caps


def plan_shards(
    members: Sequence[pb.PeerInfo], total_numel: int, *, align: int = SHARD_ALIGN
) -> list[ShardRange]:
    """Shards over ``[0, total_numel)`` for ``members`` in the given order (sort them first).

    Sizes follow the members' bandwidth (rounded to multiples of ``align``); members whose range
    is empty own no shard, so the plan may have fewer shards than members (at least one).
    """
    if not members:
        raise ValueError("a group needs at least one member")
    if all(m.client_mode for m in members):
        raise ValueError("every member is in client mode: nobody can own a shard")
    if not 0 <= total_numel <= MAX_NUMEL:
        raise ValueError(f"total_numel must be in [0, {MAX_NUMEL}], got {total_numel}")
    bounds = shard_bounds(total_numel, _capacities(members), align)
    shards: list[ShardRange] = []
    for member, (lo, hi) in zip(members, bounds, strict=True):
        if hi > lo:
            shards.append(ShardRange(len(shards), member.peer_id, lo, hi - lo))
    if not shards:  # total_numel == 0: one empty shard, so that the plan is never empty
        owner = next(m for m in members if not m.client_mode)
        shards.append(ShardRange(0, owner.peer_id, 0, 0))
    return shards


def group_id_for(run_id: str, round: int, member_ids: Iterable[str]) -> str:
    """A deterministic group id for these members in this round (``"g-"`` + 24 hex digits)."""
    h = hashlib.sha256()
    for part in (run_id, str(round), *sorted(member_ids)):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return "g-" + h.hexdigest()[:24]


def deadline_ms_after(seconds: float, *, now: float | None = None) -> int:
    """The unix-millisecond deadline ``seconds`` from ``now`` (default: the wall clock)."""
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"seconds must be finite and >= 0, got {seconds}")
    start = time.time() if now is None else now
    return math.ceil((start + seconds) * 1000.0)


def announce_group(
    leader: Identity,
    *,
    run_id: str,
    round: int,
    members: Sequence[pb.PeerInfo],
    total_numel: int,
    deadline_ms: int,
    group_id: str | None = None,
    align: int = SHARD_ALIGN,
) -> pb.GroupAnnouncement:
    """The signed announcement of a group: sorted members, bandwidth-sized shard plan, deadline.

    ``group_id`` defaults to :func:`group_id_for`. Raises ``ValueError`` for an impossible group
    (no members, duplicates, the leader missing, nobody reachable, too many members).
    """
    if not 0 < len(members) <= MAX_GROUP_SIZE:
        raise ValueError(f"a group has 1..{MAX_GROUP_SIZE} members, got {len(members)}")
    ordered = sorted(members, key=lambda m: m.peer_id)
    ids = [m.peer_id for m in ordered]
    if len(set(ids)) != len(ids):
        raise ValueError("a peer appears twice in the member list")
    if leader.peer_id not in ids:
        raise ValueError(f"the leader {leader.peer_id} must be one of the members")
    if round < 0 or deadline_ms < 0:
        raise ValueError("round and deadline_ms must be >= 0")
    shards = plan_shards(ordered, total_numel, align=align)
    announcement = pb.GroupAnnouncement(
        protocol_version=PROTOCOL_VERSION,
        run_id=run_id,
        round=round,
        group_id=group_id if group_id is not None else group_id_for(run_id, round, ids),
        leader_id=leader.peer_id,
        members=ordered,
        shards=[s.to_proto() for s in shards],
        total_numel=total_numel,
        deadline_ms=deadline_ms,
    )
    sign_message(announcement, leader)
    return announcement
