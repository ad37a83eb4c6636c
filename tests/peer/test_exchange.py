"""The group exchange over real grpc.aio servers on 127.0.0.1:0: every member ends bit-identical.

Also home of :class:`Swarm`, the in-process group of peers the other ``test_exchange_*`` modules
use: one identity, hub and (unless in client mode) server per member, and agreed plans.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

import pytest
import torch

from lioncub.optim.reducers import MeanReducer, Reducer
from lioncub.optim.strategies import StrategyConfig, make_strategy
from lioncub.peer.exchange import ExchangeHub, ExchangeOutcome, HubConfig, run_exchange
from lioncub.peer.groups import announce_group, deadline_ms_after, peer_info
from lioncub.peer.server import HealthInfo, PeerServer
from lioncub.protocol import GroupPlan, Identity, TlsMaterial, check_group_announcement, generate_self_signed
from lioncub.protocol import lioncub_pb2 as pb

pytestmark = pytest.mark.network

RUN = "run-exchange"


@dataclass
class Member:
    identity: Identity
    hub: ExchangeHub
    server: PeerServer | None  # None: client mode
    info: pb.PeerInfo

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


def _health(hub: ExchangeHub) -> HealthInfo:
    return HealthInfo(run_id=hub.run_id, round=hub.round or 0)


class Swarm:
    """``n`` in-process peers; ``client`` lists the indices that run in client mode (no server)."""

    def __init__(self, members: list[Member]) -> None:
        self.members = members

    @classmethod
    async def start(
        cls,
        n: int,
        *,
        client: Sequence[int] = (),
        bandwidths: Sequence[float] | None = None,
        config: HubConfig | None = None,
        tls: TlsMaterial | None = None,
        run_id: str = RUN,
    ) -> Swarm:
        members: list[Member] = []
        for i in range(n):
            ident = Identity.generate()
            hub = ExchangeHub(ident, run_id, tls=tls, mutual_tls=tls is not None, config=config)
            bw = 100.0 if bandwidths is None else bandwidths[i]
            if i in client:
                members.append(
                    Member(ident, hub, None, peer_info(ident, client_mode=True, bandwidth_mbps=bw))
                )
                continue
            server = await PeerServer.start(
                identity=ident,
                tls=tls,
                mutual_tls=tls is not None,
                health=functools.partial(_health, hub),
            )
            server.exchange = hub
            members.append(
                Member(ident, hub, server, peer_info(ident, endpoint=server.endpoint, bandwidth_mbps=bw))
            )
        return cls(members)

    async def __aenter__(self) -> Swarm:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        for m in self.members:
            if m.server is not None:
                await m.server.stop(None)
            await m.hub.close()

    def by_id(self, peer_id: str) -> Member:
        return next(m for m in self.members if m.peer_id == peer_id)

    def plans(
        self,
        round: int,
        total_numel: int,
        *,
        deadline_s: float = 10.0,
        members: Sequence[Member] | None = None,
    ) -> dict[str, GroupPlan]:
        """Announce a group (leader: the first member) and have every member check it."""
        group = list(self.members if members is None else members)
        announcement = announce_group(
            group[0].identity,
            run_id=group[0].hub.run_id,
            round=round,
            members=[m.info for m in group],
            total_numel=total_numel,
            deadline_ms=deadline_ms_after(deadline_s),
        )
        return {
            m.peer_id: check_group_announcement(
                announcement, run_id=m.hub.run_id, round=round, self_id=m.peer_id, leader_id=group[0].peer_id
            )
            for m in group
        }

    async def exchange(
        self,
        plans: Mapping[str, GroupPlan],
        name: str,
        vecs: Mapping[str, torch.Tensor],
        reducer: Reducer,
        weights: Mapping[str, int],
        *,
        timeout: float = 20.0,
    ) -> dict[str, ExchangeOutcome]:
        """Every member in ``plans`` runs the exchange concurrently."""
        deadline = time.time() + timeout
        ids = list(plans)
        outcomes = await asyncio.gather(
            *(
                run_exchange(
                    self.by_id(p).hub, plans[p], name, vecs[p], reducer, weights[p], deadline=deadline
                )
                for p in ids
            )
        )
        return dict(zip(ids, outcomes, strict=True))


def reference(
    reducer: Reducer,
    plan: GroupPlan,
    vecs: Mapping[str, torch.Tensor],
    weights: Mapping[str, int],
    *,
    contributors: Sequence[str] | None = None,
) -> torch.Tensor:
    """The optim/ reduction of every shard, members in plan order (sorted ids), no network."""
    out = torch.empty(plan.total_numel, dtype=torch.float32)
    ids = [m for m in plan.members if contributors is None or m in contributors]
    for s in plan.shards:
        lo, hi = s.offset, s.offset + s.numel
        w = [weights[m] for m in ids]
        w = w if any(w) else [1] * len(w)
        out[lo:hi] = reducer.decode(reducer.reduce([reducer.encode(vecs[m][lo:hi]) for m in ids], w))
    return out


REDUCERS: dict[str, Reducer] = {
    "lioncub-mavo": make_strategy(StrategyConfig(name="lioncub", reduction="mavo")),
    "lioncub-avg": make_strategy(StrategyConfig(name="lioncub", reduction="avg")),
    "lioncub-l1": make_strategy(StrategyConfig(name="lioncub-l1", levels=2)),
    "diloco-fp16": make_strategy(StrategyConfig(name="diloco", delta_codec="fp16")),
    "diloco-int8": make_strategy(StrategyConfig(name="diloco", delta_codec="int8")),
    "mean-fp16": MeanReducer("fp16"),
    "mean-int8": MeanReducer("int8"),
    "mean-fp32": MeanReducer("fp32"),
}

#: Not a multiple of 64 (nor of 8): the last shard has a ragged tail.
NUMEL = 64 * 37 + 29


def _vectors(plan: GroupPlan, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.randn(plan.total_numel, generator=gen) for m in plan.members}


@pytest.mark.parametrize("n", [2, 3, 5, 8])
def test_every_member_gets_the_reference_reduction(n: int) -> None:
    """Each codec family in its own round; the last member is in client mode (for n >= 3)."""
    client = (n - 1,) if n >= 3 else ()
    bandwidths = [50.0 + 25.0 * i for i in range(n)]  # unequal shards

    async def body() -> None:
        async with await Swarm.start(
            n, client=client, bandwidths=bandwidths, config=HubConfig(chunk_bytes=96)
        ) as swarm:
            for round, (name, reducer) in enumerate(REDUCERS.items(), start=1):
                plans = swarm.plans(round, NUMEL)
                plan = next(iter(plans.values()))
                assert len(plan.shards) == n - len(client)
                vecs = _vectors(plan, seed=round)
                # equal weights in the majority vote (ties when n is even), samples otherwise
                weights = {m: 1 if name == "lioncub-mavo" else 3 + 2 * i for i, m in enumerate(plan.members)}
                outcomes = await swarm.exchange(plans, "update", vecs, reducer, weights)
                expected = reference(reducer, plan, vecs, weights)
                if name == "lioncub-mavo" and n % 2 == 0:
                    assert bool((expected == 0).any()), "an even vote should have ties (tern zero plane)"
                for peer_id, out in outcomes.items():
                    assert out.complete and not out.failures, (name, out.failures)
                    assert out.left_out == (), (name, out.left_out)
                    assert out.update.dtype == torch.float32
                    assert torch.equal(out.update, expected), f"{name}: member {peer_id} differs"
                    assert out.bytes_sent > 0 and out.bytes_received > 0
                    assert (out.round, out.group_id, out.exchange) == (round, plan.group_id, "update")
                    assert out.timings.total_s >= max(out.timings.push_s, out.timings.pull_s)
                # every byte one member sent, another received
                assert sum(o.bytes_sent for o in outcomes.values()) == sum(
                    o.bytes_received for o in outcomes.values()
                )

    asyncio.run(body())


def test_exchange_over_mutual_tls_with_several_exchanges_per_round() -> None:
    tls = generate_self_signed()
    reducer, mean = REDUCERS["lioncub-mavo"], REDUCERS["mean-fp16"]

    async def body() -> None:
        async with await Swarm.start(3, tls=tls) as swarm:
            plans = swarm.plans(4, 1000)
            plan = next(iter(plans.values()))
            weights = dict.fromkeys(plan.members, 5)
            vecs = _vectors(plan, seed=9)
            # two exchanges of the same round run at once, on the same pooled channels
            update, momentum = await asyncio.gather(
                swarm.exchange(plans, "update", vecs, reducer, weights),
                swarm.exchange(plans, "momentum", vecs, mean, weights),
            )
            for outcomes, red in ((update, reducer), (momentum, mean)):
                expected = reference(red, plan, vecs, weights)
                assert all(torch.equal(o.update, expected) and o.complete for o in outcomes.values())
            assert all(len(m.hub.channels) == 2 for m in swarm.members)  # one per other owner

    asyncio.run(body())


def test_single_member_group_and_bounded_slots() -> None:
    """A group of one reduces its own part; slots of rounds older than retain_rounds are dropped."""
    reducer = REDUCERS["lioncub-avg"]

    async def body() -> None:
        async with await Swarm.start(1, config=HubConfig(retain_rounds=2)) as swarm:
            me = swarm.members[0]
            for round in range(1, 6):
                plans = swarm.plans(round, 100)
                vec = torch.randn(100)
                out = (await swarm.exchange(plans, "params", {me.peer_id: vec}, reducer, {me.peer_id: 7}))[
                    me.peer_id
                ]
                assert torch.equal(out.update, reducer.decode(reducer.local_fallback(reducer.encode(vec), 7)))
                assert out.complete and out.bytes_sent == out.bytes_received == 0
            rounds = {key.round for key in me.hub.slot_keys}
            assert rounds == {4, 5} and me.hub.round == 5

    asyncio.run(body())


def test_run_exchange_rejects_arguments_that_do_not_fit_the_plan() -> None:
    reducer = REDUCERS["lioncub-mavo"]

    async def body() -> None:
        async with await Swarm.start(2) as swarm:
            plans = swarm.plans(1, 100)
            me = swarm.members[0]
            plan = plans[me.peer_id]
            deadline = time.time() + 5
            bad = [
                (plan, "update", torch.randn(99), 1),
                (plan, "update", torch.randn(100, 1), 1),
                (plan, "update", torch.zeros(100, dtype=torch.int64), 1),
                (plan, "update", torch.randn(100), -1),
                (plan, "update", torch.randn(100), 1.5),
                (plan, "bad name!", torch.randn(100), 1),
            ]
            for p, name, vec, w in bad:
                with pytest.raises(ValueError):
                    await run_exchange(me.hub, p, name, vec, reducer, w, deadline=deadline)  # type: ignore[arg-type]
            other = ExchangeHub(Identity.generate(), RUN)
            with pytest.raises(ValueError, match="not a member"):
                await run_exchange(other, plan, "update", torch.randn(100), reducer, 1, deadline=deadline)
            with pytest.raises(ValueError, match="run"):
                await run_exchange(
                    ExchangeHub(me.identity, "other-run"),
                    plan,
                    "update",
                    torch.randn(100),
                    reducer,
                    1,
                    deadline=deadline,
                )

    asyncio.run(body())
