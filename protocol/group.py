"""Group assembly messages: checking join requests, announcements and pull requests.

A follower sends a signed ``JoinGroupRequest`` (with its admission proof) to a leader; the
leader answers on the same server stream with a signed ``GroupAnnouncement``: the sorted member
list and a shard plan that covers the flat parameter vector in order. Every member checks the
announcement with :func:`check_group_announcement` and gets a :class:`GroupPlan`, which then
says which peers may send which payloads (:meth:`GroupPlan.push_expectation`,
:meth:`GroupPlan.result_expectation`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from . import lioncub_pb2 as pb
from .admission import AdmissionPolicy, check_admission
from .errors import InvalidMessage, NotAMember, SizeError, UnknownGroup
from .framing import ShardKey
from .limits import MAX_GROUP_SIZE, MAX_NUMEL
from .reassembly import ShardExpectation
from .signing import verify_message
from .validate import check_id, check_peer_info, check_round, check_run, check_version, check_weight, show

__all__ = ["GroupPlan", "check_group_announcement", "check_join_request", "check_pull_request"]


@dataclass(frozen=True)
class GroupPlan:
    """A checked group announcement: who is in the group and who owns which shard."""

    run_id: str
    round: int
    group_id: str
    leader_id: str
    members: Mapping[str, pb.PeerInfo]
    shards: tuple[pb.ShardAssignment, ...]
    total_numel: int
    deadline_ms: int

    @property
    def public_keys(self) -> dict[str, bytes]:
        return {peer_id: info.public_key for peer_id, info in self.members.items()}

    def shard(self, index: int) -> pb.ShardAssignment:
        if not 0 <= index < len(self.shards):
            raise InvalidMessage(
                f"shard {index} does not exist: group {self.group_id} has {len(self.shards)}"
            )
        return self.shards[index]

    def key(self, purpose: pb.Purpose, exchange: str, shard_index: int) -> ShardKey:
        return ShardKey(self.run_id, self.round, self.group_id, purpose, exchange, shard_index)

    def push_expectation(
        self, exchange: str, shard_index: int, *, codecs: frozenset[str] | None = None
    ) -> ShardExpectation:
        """What the owner of ``shard_index`` accepts from the other members."""
        shard = self.shard(shard_index)
        keys = self.public_keys
        del keys[shard.owner_id]
        return ShardExpectation(
            key=self.key(pb.PURPOSE_PUSH, exchange, shard_index),
            senders=keys,
            numel=shard.numel,
            codecs=codecs,
        )

    def result_expectation(
        self, exchange: str, shard_index: int, *, codecs: frozenset[str] | None = None
    ) -> ShardExpectation:
        """What a member accepts as the reduced ``shard_index`` from its owner."""
        shard = self.shard(shard_index)
        return ShardExpectation(
            key=self.key(pb.PURPOSE_RESULT, exchange, shard_index),
            senders={shard.owner_id: self.members[shard.owner_id].public_key},
            numel=shard.numel,
            codecs=codecs,
        )


def check_join_request(
    request: pb.JoinGroupRequest,
    *,
    run_id: str,
    round: int,
    policy: AdmissionPolicy,
    now_ms: int | None = None,
) -> None:
    """A leader's checks on a follower's request: identity, signature, run, round, admission."""
    check_version(request.protocol_version, "join request")
    check_peer_info(request.peer, "joining peer")
    verify_message(request, request.peer.public_key)
    check_run(request.run_id, run_id, "join request")
    check_round(request.round, round, "join request")
    check_id("matchmaking_key", request.matchmaking_key)
    check_weight("weight", request.weight)
    check_admission(policy, request.peer, request.admission, run_id=run_id, now_ms=now_ms)


def check_group_announcement(
    announcement: pb.GroupAnnouncement,
    *,
    run_id: str,
    round: int,
    self_id: str,
    leader_id: str | None = None,
) -> GroupPlan:
    """A member's checks on the leader's announcement; returns the plan it describes."""
    a = announcement
    check_version(a.protocol_version, "group announcement")
    check_id("group_id", a.group_id)
    if not 0 < len(a.members) <= MAX_GROUP_SIZE:
        raise SizeError(f"a group has 1..{MAX_GROUP_SIZE} members, the announcement lists {len(a.members)}")
    members: dict[str, pb.PeerInfo] = {}
    for info in a.members:
        check_peer_info(info, "member")
        if members and info.peer_id <= next(reversed(members)):
            raise InvalidMessage(f"members are not sorted by peer id without duplicates at {info.peer_id}")
        members[info.peer_id] = info
    if a.leader_id not in members:
        raise InvalidMessage(f"leader {show(a.leader_id)} is not among the announced members")
    if leader_id is not None and a.leader_id != leader_id:
        raise NotAMember(
            f"announcement comes from {show(a.leader_id)}, the leader asked was {show(leader_id)}"
        )
    verify_message(a, members[a.leader_id].public_key)
    check_run(a.run_id, run_id, "group announcement")
    check_round(a.round, round, "group announcement")
    if self_id not in members:
        raise NotAMember(f"this peer ({self_id}) is not a member of the announced group {a.group_id}")
    if a.total_numel > MAX_NUMEL:
        raise SizeError(f"total_numel {a.total_numel} exceeds the limit {MAX_NUMEL}")
    if not 0 < len(a.shards) <= len(members):
        raise SizeError(f"a plan has 1..{len(members)} shards for this group, got {len(a.shards)}")
    offset = 0
    owners: set[str] = set()
    for position, shard in enumerate(a.shards):
        if shard.index != position:
            raise InvalidMessage(f"shard at position {position} has index {shard.index}")
        owner = members.get(shard.owner_id)
        if owner is None or owner.client_mode or shard.owner_id in owners:
            raise InvalidMessage(
                f"shard {position} owner {show(shard.owner_id)} is not a reachable member owning one shard"
            )
        owners.add(shard.owner_id)
        if shard.offset != offset:
            raise InvalidMessage(
                f"shard {position} starts at {shard.offset}, expected {offset} (gap or overlap)"
            )
        offset += shard.numel
    if offset != a.total_numel:
        raise InvalidMessage(f"shards cover {offset} elements, total_numel is {a.total_numel}")
    return GroupPlan(
        run_id=a.run_id,
        round=a.round,
        group_id=a.group_id,
        leader_id=a.leader_id,
        members=members,
        shards=tuple(a.shards),
        total_numel=a.total_numel,
        deadline_ms=a.deadline_ms,
    )


def check_pull_request(request: pb.PullResultRequest, plan: GroupPlan) -> None:
    """A shard owner's checks on a member's pull: same run, round and group; signed by a member."""
    check_version(request.protocol_version, "pull request")
    check_run(request.run_id, plan.run_id, "pull request")
    if request.group_id != plan.group_id:
        raise UnknownGroup(f"pull request names group {show(request.group_id)}, not {plan.group_id}")
    check_round(request.round, plan.round, "pull request")
    requester = plan.members.get(request.requester_id)
    if requester is None:
        raise NotAMember(f"requester {show(request.requester_id)} is not a member of group {plan.group_id}")
    verify_message(request, requester.public_key)
    check_id("exchange", request.exchange)
    plan.shard(request.shard_index)
