"""lioncub.peer.matchmaking with real hivemind DHT nodes and real gRPC servers on 127.0.0.1 (port 0)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

import grpc
import grpc.aio
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from lioncub.peer._match_plan import ReadyPeer, parse_ready_info, ready_info
from lioncub.peer.dht import (
    PeerRecord,
    SwarmRegistry,
    get_groups_async,
    post_ready_async,
    shutdown_dht,
    start_dht,
    visible_maddrs,
)
from lioncub.peer.groups import announce_group, peer_info
from lioncub.peer.matchmaking import Matchmaker, MatchmakingConfig, Phase, plan_groups
from lioncub.peer.server import CallInfo, PeerServer
from lioncub.protocol import (
    PROTOCOL_VERSION,
    AdmissionPolicy,
    GroupPlan,
    Identity,
    grpc_message_options,
    make_admission,
    sign_message,
)
from lioncub.protocol import lioncub_pb2 as pb
from lioncub.protocol import lioncub_pb2_grpc as pb_grpc

pytestmark = pytest.mark.network

logger = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT = 4.0
TOTAL_NUMEL = 10_000
CONFIG = MatchmakingConfig(timeout=TIMEOUT, exchange_timeout=10.0)


@pytest.fixture(scope="module")
def dhts() -> Iterator[list[DHT]]:
    """Four DHT nodes; peers share them round-robin (calls are serialised per node)."""
    nodes: list[DHT] = []
    try:
        nodes.append(start_dht())
        first = visible_maddrs(nodes[0])
        nodes.extend(start_dht(first) for _ in range(3))
        yield nodes
    finally:
        for node in reversed(nodes):
            shutdown_dht(node)


def identity(name: str) -> Identity:
    """A fixed identity per name, so that hash orders (and thus leaders) are the same every run."""
    seed = hashlib.sha256(f"lioncub-matchmaking-test/{name}".encode()).digest()
    return Identity(Ed25519PrivateKey.from_private_bytes(seed))


@dataclass
class Peer:
    identity: Identity
    matchmaker: Matchmaker
    server: PeerServer | None

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


async def register(dht: DHT, run_id: str, info: pb.PeerInfo, round: int = 0) -> None:
    record = PeerRecord(
        peer_id=info.peer_id,
        endpoint=info.endpoint,
        public_key=info.public_key.hex(),
        version="test",
        throughput=1.0,
        bandwidth_mbps=info.bandwidth_mbps,
        round=round,
        client_mode=info.client_mode,
    )
    assert await SwarmRegistry(dht, run_id).announce_async(record)


@asynccontextmanager
async def swarm(
    dhts: Sequence[DHT],
    run_id: str,
    names: Sequence[str],
    *,
    config: MatchmakingConfig = CONFIG,
    client: frozenset[str] = frozenset(),
    policy: AdmissionPolicy | None = None,
    at_round: dict[str, int] | None = None,
) -> AsyncIterator[list[Peer]]:
    """Registered peers with servers (none for client-mode ones) whose matchmakers serve JoinGroup.

    ``at_round``: the round some peers (by name) say they are at when they reject a join request.
    """
    peers: list[Peer] = []
    try:
        for i, name in enumerate(names):
            ident = identity(name)
            dht = dhts[i % len(dhts)]
            server = None
            if name in client:
                info = peer_info(ident, client_mode=True, bandwidth_mbps=50.0)
            else:
                server = await PeerServer.start("127.0.0.1:0", identity=ident)
                info = peer_info(ident, endpoint=server.endpoint, bandwidth_mbps=100.0 + i)
            said = (at_round or {}).get(name)
            matchmaker = Matchmaker(
                dht,
                ident,
                run_id,
                info,
                total_numel=TOTAL_NUMEL,
                config=config,
                policy=policy,
                current_round=None if said is None else (lambda said=said: said),
            )
            if server is not None:
                server.groups = matchmaker
            peers.append(Peer(ident, matchmaker, server))
            await register(dht, run_id, info)
        yield peers
    finally:
        for peer in peers:
            await peer.matchmaker.close()
            if peer.server is not None:
                await peer.server.stop(None)


async def form_all(peers: Sequence[Peer], round: int) -> list[GroupPlan | None]:
    return list(await asyncio.gather(*(p.matchmaker.form_group(round, weight=10.0) for p in peers)))


async def eventually(read: Callable[[], Awaitable[T]], timeout: float = 5.0, what: str = "a condition") -> T:
    """Await ``read()`` until it gives something truthy (bounded poll with a growing interval)."""
    deadline = time.monotonic() + timeout
    interval = 0.01
    while not (value := await read()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}; last: {value!r}"
        await asyncio.sleep(interval)
        interval = min(2 * interval, 0.2)
    return value


def same_plan(a: GroupPlan, b: GroupPlan) -> bool:
    return (
        a.group_id == b.group_id
        and a.leader_id == b.leader_id
        and list(a.members) == list(b.members)
        and [s.SerializeToString() for s in a.shards] == [s.SerializeToString() for s in b.shards]
        and a.total_numel == b.total_numel
    )


def leader_of(run_id: str, round: int, peers: Sequence[Peer], client: frozenset[str] = frozenset()) -> str:
    modes = {p.peer_id: p.peer_id in client for p in peers}
    (group,) = plan_groups(run_id, round, modes, 0)
    assert group.leader is not None
    return group.leader


# --- pure planning -------------------------------------------------------------------------


def test_plan_groups_cuts_and_leaders() -> None:
    ids = [identity(f"p{i}").peer_id for i in range(7)]
    everyone = plan_groups("run", 3, dict.fromkeys(ids, False), 0)
    assert len(everyone) == 1 and sorted(everyone[0].members) == sorted(ids)
    assert everyone[0].leader == everyone[0].members[0]
    assert plan_groups("run", 3, dict.fromkeys(ids, False), 10) == everyone
    pairs = plan_groups("run", 3, dict.fromkeys(ids, False), 2)
    assert [len(g.members) for g in pairs] == [2, 2, 3]  # a remainder of 1 joins the last group
    triples = plan_groups("run", 3, dict.fromkeys(ids[:5], False), 3)
    assert [len(g.members) for g in triples] == [3, 2]
    assert plan_groups("run", 4, dict.fromkeys(ids, False), 0)[0].members != everyone[0].members
    modes = dict.fromkeys(ids, False) | {everyone[0].members[0]: True}
    assert plan_groups("run", 3, modes, 0)[0].leader == everyone[0].members[1]
    assert plan_groups("run", 3, dict.fromkeys(ids[:2], True), 0)[0].leader is None
    with pytest.raises(ValueError):
        plan_groups("run", 3, dict.fromkeys(ids, False), 1)


def test_ready_info_round_trip_and_rejects() -> None:
    me, other = identity("a"), identity("b")
    info = peer_info(me, endpoint="127.0.0.1:5000")
    value = ready_info(info, 12.5)
    assert parse_ready_info(me.peer_id, value) == ReadyPeer(info, 12.5)
    bad = [
        (other.peer_id, value),  # the key does not belong to the claimed peer id
        (me.peer_id, {**value, "weight": float("nan")}),
        (me.peer_id, {**value, "weight": -1}),
        (me.peer_id, {**value, "endpoint": ""}),  # reachable peer without endpoint
        (me.peer_id, {**value, "public_key": "zz"}),
        (me.peer_id, {**value, "client_mode": 1}),
        (me.peer_id, {**value, "format": 99}),
        (me.peer_id, {k: v for k, v in value.items() if k != "bandwidth_mbps"}),
    ]
    for peer_id, entry in bad:
        with pytest.raises(ValueError):
            parse_ready_info(peer_id, entry)


def test_config_and_argument_checks(dhts: list[DHT]) -> None:
    for bad in ({"group_size": 1}, {"timeout": 0.0}, {"gather_fraction": 1.0}, {"max_group_size": 1}):
        with pytest.raises(ValueError):
            MatchmakingConfig(**bad)  # type: ignore[arg-type]
    assert MatchmakingConfig(group_size=3).member_cap == 6
    me = identity("args")
    info = peer_info(me, client_mode=True)
    with pytest.raises(ValueError):
        Matchmaker(dhts[0], me, "run", peer_info(identity("other"), client_mode=True), total_numel=1)
    with pytest.raises(ValueError):
        Matchmaker(dhts[0], me, "bad run id!", info, total_numel=1)
    matchmaker = Matchmaker(dhts[0], me, "mm-args", info, total_numel=1, config=CONFIG)

    async def main() -> None:
        with pytest.raises(ValueError):
            await matchmaker.form_group(-1, weight=1.0)
        with pytest.raises(ValueError):
            await matchmaker.form_group(0, weight=float("inf"))
        started = time.monotonic()
        assert await matchmaker.form_group(0, weight=1.0, deadline=started - 1.0) is None
        assert time.monotonic() - started < 0.5 and matchmaker.stats.fallbacks == 1
        await matchmaker.close()

    asyncio.run(main())


# --- whole groups over the DHT and gRPC ----------------------------------------------------


def test_four_peers_agree_on_one_group_two_rounds(dhts: list[DHT]) -> None:
    run_id = "mm-four"

    async def main() -> None:
        async with swarm(dhts, run_id, ["a", "b", "c", "d"]) as peers:
            # A malformed ready entry from someone else is ignored.
            intruder = identity("intruder").peer_id
            junk = {"format": 1, "endpoint": "x", "public_key": "00"}
            assert await post_ready_async(dhts[0], run_id, 7, intruder, junk, get_dht_time() + 30)
            for round in (7, 8):
                started = time.monotonic()
                plans = await form_all(peers, round)
                elapsed = time.monotonic() - started
                logger.info("4 peers formed a group for round %d in %.3f s", round, elapsed)
                first = plans[0]
                assert first is not None
                assert all(p is not None and same_plan(p, first) for p in plans)
                assert set(first.members) == {p.peer_id for p in peers}
                assert first.leader_id == leader_of(run_id, round, peers)
                assert first.round == round and first.total_numel == TOTAL_NUMEL
                assert sum(s.numel for s in first.shards) == TOTAL_NUMEL and len(first.shards) == 4
                assert elapsed < TIMEOUT
            leader = next(p for p in peers if p.peer_id == first.leader_id)
            published = await eventually(lambda: get_groups_async(dhts[1], run_id, 8), what="published group")
            assert published[leader.peer_id]["group_id"] == first.group_id
            stats = [p.matchmaker.stats for p in peers]
            assert sum(s.led for s in stats) == 2 and sum(s.joined for s in stats) == 6
            assert sum(s.fallbacks for s in stats) == 0 and stats[0].bad_ready_entries >= 1

    asyncio.run(main())


def test_six_peers_in_pairs_regroup_every_round(dhts: list[DHT]) -> None:
    run_id = "mm-pairs"
    config = MatchmakingConfig(group_size=2, timeout=TIMEOUT)
    names = [f"s{i}" for i in range(6)]
    ids = {identity(n).peer_id: False for n in names}

    def pairs(round: int) -> set[frozenset[str]]:
        return {frozenset(g.members) for g in plan_groups(run_id, round, ids, 2)}

    first_round = 0
    second_round = next(r for r in itertools.count(1) if pairs(r) != pairs(first_round))

    async def main() -> None:
        async with swarm(dhts, run_id, names, config=config) as peers:
            formed: list[set[frozenset[str]]] = []
            for round in (first_round, second_round):
                plans = await form_all(peers, round)
                assert all(p is not None and len(p.members) == 2 for p in plans), plans
                groups = {frozenset(p.members) for p in plans if p is not None}
                assert len(groups) == 3 and set().union(*groups) == set(ids)  # each peer in exactly one
                for peer, plan in zip(peers, plans, strict=True):
                    assert plan is not None and peer.peer_id in plan.members
                    partner = next(
                        q for q in plans if q is not plan and q and set(q.members) == set(plan.members)
                    )
                    assert same_plan(plan, partner)
                assert groups == pairs(round)
                formed.append(groups)
            assert formed[0] != formed[1]

    asyncio.run(main())


def test_client_mode_member_joins_and_owns_no_shard(dhts: list[DHT]) -> None:
    run_id = "mm-client"
    names = ["c0", "c1", "nat"]
    client = frozenset({"nat"})
    nat_id = identity("nat").peer_id
    modes = {identity(n).peer_id: n in client for n in names}
    # A round in which the client-mode peer comes first in the hash order: it must not lead.
    round = next(r for r in itertools.count() if plan_groups(run_id, r, modes, 0)[0].members[0] == nat_id)

    async def main() -> None:
        async with swarm(dhts, run_id, names, client=client) as peers:
            plans = await form_all(peers, round)
            first = plans[0]
            assert first is not None and all(p is not None and same_plan(p, first) for p in plans)
            assert nat_id in first.members and first.members[nat_id].client_mode
            assert first.leader_id != nat_id
            assert nat_id not in {s.owner_id for s in first.shards} and len(first.shards) == 2

    asyncio.run(main())


def test_dead_leader_is_replaced(dhts: list[DHT]) -> None:
    """The leader posted ready, then its server went away: the others group without it."""
    run_id = "mm-dead"
    names = ["d0", "d1", "d2", "d3"]
    modes = {identity(n).peer_id: False for n in names}
    round = 11
    dead_id = plan_groups(run_id, round, modes, 0)[0].leader

    async def main() -> None:
        async with swarm(dhts, run_id, names) as peers:
            dead = next(p for p in peers if p.peer_id == dead_id)
            alive = [p for p in peers if p is not dead]
            ready = ready_info(dead.matchmaker.peer_info, 10.0)
            assert await post_ready_async(dhts[0], run_id, round, dead_id, ready, get_dht_time() + 30)
            assert dead.server is not None
            await dead.server.stop(None)
            started = time.monotonic()
            plans = await form_all(alive, round)
            elapsed = time.monotonic() - started
            first = plans[0]
            assert first is not None and all(p is not None and same_plan(p, first) for p in plans)
            assert set(first.members) == {p.peer_id for p in alive}
            assert elapsed < TIMEOUT + 1.0
            assert sum(p.matchmaker.stats.leader_failures for p in alive) >= 3

    asyncio.run(main())


def test_a_leader_that_moved_on_says_which_round_it_is_at(dhts: list[DHT]) -> None:
    """A stale ready entry names a leader that is rounds ahead: its rejection tells the caller where.

    (A peer resumed after a pause reads a stale DHT; the rejection is fresher evidence that it fell
    behind than the registry, and the runtime jumps on it.)
    """
    run_id = "mm-ahead"
    names = ["a0", "a1"]
    round = 7
    modes = {identity(n).peer_id: False for n in names}
    leader_id = plan_groups(run_id, round, modes, 0)[0].leader
    leader_name = next(n for n in names if identity(n).peer_id == leader_id)

    async def main() -> None:
        async with swarm(dhts, run_id, names, at_round={leader_name: 42}) as peers:
            leader = next(p for p in peers if p.peer_id == leader_id)
            behind = next(p for p in peers if p is not leader)
            ready = ready_info(leader.matchmaker.peer_info, 10.0)
            assert await post_ready_async(dhts[0], run_id, round, leader_id, ready, get_dht_time() + 30)
            assert await behind.matchmaker.form_group(round, weight=10.0) is None
            assert behind.matchmaker.stats.leader_failures == 1
            assert behind.matchmaker.peers_ahead(round) == {leader_id: 42}
            assert behind.matchmaker.peers_ahead(42) == {}, "hints at or below a round are dropped"
            # A leader that does not say (0) leaves no hint.
            assert leader.matchmaker.peers_ahead(0) == {}

    asyncio.run(main())


def test_leader_dies_while_assembling(dhts: list[DHT]) -> None:
    """The leader accepted its followers, then died before announcing: nobody hangs."""
    run_id = "mm-dies"
    names = ["e0", "e1", "e2"]
    silent = identity("e-silent")  # ready and registered, in client mode, but never joins
    modes = {identity(n).peer_id: False for n in names} | {silent.peer_id: True}
    round = next(r for r in itertools.count() if plan_groups(run_id, r, modes, 0)[0].leader != silent.peer_id)
    leader_id = plan_groups(run_id, round, modes, 0)[0].leader

    async def main() -> None:
        async with swarm(dhts, run_id, names) as peers:
            silent_info = peer_info(silent, client_mode=True)
            await register(dhts[3], run_id, silent_info)
            ready = ready_info(silent_info, 1.0)
            assert await post_ready_async(dhts[3], run_id, round, silent.peer_id, ready, get_dht_time() + 30)
            leader = next(p for p in peers if p.peer_id == leader_id)
            others = [p for p in peers if p is not leader]
            started = time.monotonic()
            leading = asyncio.create_task(leader.matchmaker.form_group(round, weight=1.0))
            following = asyncio.gather(*(p.matchmaker.form_group(round, weight=1.0) for p in others))
            want = {p.peer_id for p in others}

            async def holds_both() -> bool:
                status = leader.matchmaker.round_status(round)
                return status is not None and status.phase is Phase.LEADING and status.joined == want

            await eventually(holds_both, TIMEOUT, "the leader to accept both followers")
            leading.cancel()
            assert leader.server is not None
            await leader.server.stop(None)
            plans = await following
            elapsed = time.monotonic() - started
            assert elapsed < TIMEOUT + 1.0
            with pytest.raises(asyncio.CancelledError):
                await leading
            for plan in plans:  # a new group without the dead leader, or a fallback; never a hang
                assert plan is None or leader_id not in plan.members
            if all(plans):
                assert plans[0] is not None and plans[1] is not None and same_plan(plans[0], plans[1])
                assert set(plans[0].members) == want

    asyncio.run(main())


class LyingLeader:
    """A hostile peer's JoinGroup handler (on a real PeerServer): accepts, then misbehaves."""

    def __init__(self, me: Identity, info: pb.PeerInfo, run_id: str, lie: str) -> None:
        self.me, self.info, self.run_id, self.lie = me, info, run_id, lie

    async def join_group(
        self, request: pb.JoinGroupRequest, call: CallInfo
    ) -> AsyncIterator[pb.JoinGroupReply]:
        accepted = pb.JoinGroupReply(status=pb.JoinGroupReply.STATUS_ACCEPTED)
        yield accepted
        if self.lie == "endless":
            while True:
                yield accepted
        members = [self.info] if self.lie == "not a member" else [self.info, request.peer]
        group = announce_group(
            self.me, run_id=self.run_id, round=request.round, members=members, total_numel=10, deadline_ms=0
        )
        if self.lie == "forged signature":
            sign_message(group, identity("mallory"))
        yield pb.JoinGroupReply(status=pb.JoinGroupReply.STATUS_GROUP_READY, group=group)


@pytest.mark.parametrize("lie", ["forged signature", "not a member", "endless"])
def test_lying_leader_is_replaced(dhts: list[DHT], lie: str) -> None:
    run_id = "mm-liar-" + lie.replace(" ", "-")
    liar = identity("liar")
    names = ["h0", "h1"]
    modes = {identity(n).peer_id: False for n in names} | {liar.peer_id: False}
    round = next(r for r in itertools.count() if plan_groups(run_id, r, modes, 0)[0].leader == liar.peer_id)

    async def main() -> None:
        async with swarm(dhts, run_id, names) as peers, await PeerServer.start(identity=liar) as server:
            info = peer_info(liar, endpoint=server.endpoint)
            server.groups = LyingLeader(liar, info, run_id, lie)
            await register(dhts[2], run_id, info)
            ready = ready_info(info, 1.0)
            assert await post_ready_async(dhts[2], run_id, round, liar.peer_id, ready, get_dht_time() + 30)
            plans = await form_all(peers, round)
            assert plans[0] is not None and plans[1] is not None and same_plan(plans[0], plans[1])
            assert set(plans[0].members) == {p.peer_id for p in peers}
            assert all(p.matchmaker.stats.leader_failures == 1 for p in peers)

    asyncio.run(main())


def test_lone_peer_falls_back_quickly(dhts: list[DHT]) -> None:
    async def main() -> None:
        async with swarm(dhts, "mm-lone", ["alone"]) as (peer,):
            started = time.monotonic()
            assert await peer.matchmaker.form_group(0, weight=5.0) is None
            elapsed = time.monotonic() - started
            assert elapsed < CONFIG.gather_fraction * TIMEOUT  # it did not wait for the window
            assert peer.matchmaker.stats.fallbacks == 1

    asyncio.run(main())


def test_forged_join_requests_are_refused_and_leader_stays_up(dhts: list[DHT]) -> None:
    run_id = "mm-forged"
    policy = AdmissionPolicy(swarm_key=b"k" * 32)
    mallory = identity("mallory")

    def request(
        who: Identity,
        *,
        key: bytes | None = policy.swarm_key,
        run: str = run_id,
        version: int = PROTOCOL_VERSION,
    ) -> pb.JoinGroupRequest:
        req = pb.JoinGroupRequest(
            protocol_version=version,
            run_id=run,
            round=3,
            matchmaking_key=f"{run}.round3.ready",
            peer=peer_info(who, client_mode=True),
            admission=make_admission(key, who, run_id=run),
            weight=1.0,
        )
        sign_message(req, who)
        return req

    def tampered(req: pb.JoinGroupRequest, **changes: object) -> pb.JoinGroupRequest:
        for name, value in changes.items():
            setattr(req, name, value)
        return req

    async def outcome(endpoint: str, req: pb.JoinGroupRequest) -> object:
        async with grpc.aio.insecure_channel(endpoint, options=grpc_message_options()) as channel:
            try:
                replies = [r async for r in pb_grpc.LioncubPeerStub(channel).JoinGroup(req, timeout=5)]
            except grpc.aio.AioRpcError as e:
                return e.code()
            return [pb.JoinGroupReply.Status.Name(r.status) for r in replies]

    async def main() -> None:
        async with swarm(dhts, run_id, ["f0", "f1"], policy=policy) as peers:
            target = peers[0]
            assert target.server is not None
            endpoint = target.server.endpoint
            impostor = request(mallory)
            impostor.peer.CopyFrom(peer_info(peers[1].identity, client_mode=True))  # claims f1's identity
            S = grpc.StatusCode
            cases = {
                "unsigned": (tampered(request(mallory), signature=b""), S.UNAUTHENTICATED),
                "bad signature": (tampered(request(mallory), signature=b"\x01" * 64), S.UNAUTHENTICATED),
                "tampered weight": (tampered(request(mallory), weight=1e6), S.UNAUTHENTICATED),
                "impostor": (impostor, S.UNAUTHENTICATED),
                "no swarm key": (request(mallory, key=None), S.UNAUTHENTICATED),
                "wrong swarm key": (request(mallory, key=b"x" * 32), S.UNAUTHENTICATED),
                "other run": (request(mallory, run="other-run"), S.FAILED_PRECONDITION),
                "old version": (request(mallory, version=0), S.INVALID_ARGUMENT),
            }
            for name, (req, want) in cases.items():
                assert await outcome(endpoint, req) == want, name
            # A genuine request for a round the peer is not forming: a REJECTED reply, not an error.
            assert await outcome(endpoint, request(peers[1].identity)) == ["STATUS_REJECTED"]
            assert target.matchmaker.stats.requests_invalid == len(cases)
            # The peer is still up and forms groups.
            plans = await form_all(peers, 3)
            assert plans[0] is not None and plans[1] is not None and same_plan(plans[0], plans[1])

    asyncio.run(main())
