from __future__ import annotations

from typing import Any

import pytest

from lioncub.protocol import (
    AdmissionDenied,
    AdmissionPolicy,
    BadSignature,
    Identity,
    InvalidMessage,
    NotAMember,
    StaleRound,
    UnknownGroup,
    check_group_announcement,
    check_join_request,
    check_pull_request,
    make_admission,
    sign_message,
)
from lioncub.protocol import lioncub_pb2 as pb

RUN, ROUND = "run-a", 12


def info(identity: Identity, client_mode: bool = False) -> pb.PeerInfo:
    endpoint = "" if client_mode else "10.0.0.1:7000"
    return pb.PeerInfo(
        peer_id=identity.peer_id, public_key=identity.public_key, endpoint=endpoint, client_mode=client_mode
    )


def announcement(leader: Identity, members: list[pb.PeerInfo], **kw: Any) -> pb.GroupAnnouncement:
    members = sorted(members, key=lambda m: m.peer_id)
    owners = [m for m in members if not m.client_mode]
    ann = pb.GroupAnnouncement(
        protocol_version=1, run_id=RUN, round=ROUND, group_id="g-1", leader_id=leader.peer_id,
        members=members, total_numel=1000, deadline_ms=123,
    )  # fmt: skip
    sizes = [1000 // len(owners)] * len(owners)
    sizes[-1] += 1000 - sum(sizes)
    offset = 0
    for i, (owner, size) in enumerate(zip(owners, sizes, strict=True)):
        ann.shards.add(index=i, owner_id=owner.peer_id, offset=offset, numel=size)
        offset += size
    for name, value in kw.items():
        setattr(ann, name, value)
    sign_message(ann, leader)
    return ann


def test_announcement_round_trip_and_expectations(alice: Identity, bob: Identity, mallory: Identity) -> None:
    client = Identity.generate()
    ann = announcement(alice, [info(alice), info(bob), info(client, client_mode=True)])
    plan = check_group_announcement(
        ann, run_id=RUN, round=ROUND, self_id=client.peer_id, leader_id=alice.peer_id
    )
    assert set(plan.members) == {alice.peer_id, bob.peer_id, client.peer_id}
    assert sum(s.numel for s in plan.shards) == 1000
    owner = plan.shards[0].owner_id
    push = plan.push_expectation("update", 0)
    assert owner not in push.senders and set(push.senders) == set(plan.members) - {owner}
    assert push.numel == plan.shards[0].numel and push.key.purpose == pb.PURPOSE_PUSH
    result = plan.result_expectation("update", 0)
    assert list(result.senders) == [owner] and result.key.purpose == pb.PURPOSE_RESULT
    with pytest.raises(InvalidMessage):
        plan.shard(5)


def test_announcement_rejections(alice: Identity, bob: Identity, mallory: Identity) -> None:
    members = [info(alice), info(bob)]

    def check(ann: pb.GroupAnnouncement, **kw: Any) -> None:
        args: dict[str, Any] = {"run_id": RUN, "round": ROUND, "self_id": bob.peer_id, **kw}
        check_group_announcement(ann, **args)

    tampered = announcement(alice, members)
    tampered.total_numel = 999
    tampered.shards[-1].numel -= 1
    with pytest.raises(BadSignature):
        check(tampered)
    with pytest.raises(NotAMember):  # a group without us
        check(announcement(alice, members), self_id=mallory.peer_id)
    with pytest.raises(NotAMember):
        check(announcement(alice, members), leader_id=mallory.peer_id)
    with pytest.raises(StaleRound):
        check(announcement(alice, members), round=ROUND + 1)
    gap = announcement(alice, members)
    gap.shards[1].offset += 1
    sign_message(gap, alice)
    with pytest.raises(InvalidMessage, match="gap or overlap"):
        check(gap)
    unsorted = announcement(alice, members)
    unsorted.members.reverse()
    sign_message(unsorted, alice)
    with pytest.raises(InvalidMessage, match="sorted"):
        check(unsorted)
    client_owner = announcement(alice, [info(alice), info(bob, client_mode=True)])
    client_owner.shards.add(index=1, owner_id=bob.peer_id, offset=1000, numel=0)
    sign_message(client_owner, alice)
    with pytest.raises(InvalidMessage, match="reachable member"):
        check(client_owner)
    outsider = announcement(mallory, members)  # signed by someone outside the group
    outsider.leader_id = mallory.peer_id
    sign_message(outsider, mallory)
    with pytest.raises(InvalidMessage, match="leader"):
        check(outsider)


def test_join_request(alice: Identity, bob: Identity) -> None:
    swarm_key = b"k" * 32
    req = pb.JoinGroupRequest(
        protocol_version=1, run_id=RUN, round=ROUND, matchmaking_key="lioncub/run-a/12", peer=info(bob),
        admission=make_admission(swarm_key, bob, run_id=RUN), weight=64.0,
    )  # fmt: skip
    sign_message(req, bob)
    check_join_request(req, run_id=RUN, round=ROUND, policy=AdmissionPolicy(swarm_key=swarm_key))
    with pytest.raises(AdmissionDenied):
        check_join_request(req, run_id=RUN, round=ROUND, policy=AdmissionPolicy(swarm_key=b"x" * 32))
    req.weight = 65.0
    with pytest.raises(BadSignature):
        check_join_request(req, run_id=RUN, round=ROUND, policy=AdmissionPolicy())


def test_pull_request(alice: Identity, bob: Identity, mallory: Identity) -> None:
    plan = check_group_announcement(
        announcement(alice, [info(alice), info(bob)]), run_id=RUN, round=ROUND, self_id=alice.peer_id
    )

    def pull(identity: Identity, **kw: Any) -> pb.PullResultRequest:
        fields: dict[str, Any] = {
            "protocol_version": 1, "run_id": RUN, "round": ROUND, "group_id": "g-1", "exchange": "update",
            "shard_index": 1, "requester_id": identity.peer_id, "wait_ms": 500, **kw,
        }  # fmt: skip
        req = pb.PullResultRequest(**fields)
        sign_message(req, identity)
        return req

    check_pull_request(pull(bob), plan)
    with pytest.raises(NotAMember):
        check_pull_request(pull(mallory), plan)
    with pytest.raises(UnknownGroup):
        check_pull_request(pull(bob, group_id="g-2"), plan)
    with pytest.raises(StaleRound):
        check_pull_request(pull(bob, round=ROUND - 1), plan)
    with pytest.raises(InvalidMessage):
        check_pull_request(pull(bob, shard_index=9), plan)
    forged = pull(bob)
    forged.requester_id = alice.peer_id
    with pytest.raises(BadSignature):
        check_pull_request(forged, plan)
