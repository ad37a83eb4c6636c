"""Byzantine members over real grpc.aio servers on 127.0.0.1:0: forged pushes change nothing.

A Byzantine member takes part in the exchange and, next to its own push, pushes forged envelopes
(:func:`lioncub.peer.adversary.push_forgeries`): its part under another member's id, addressed to
another group, or last round's chunks again. The owners refuse every one, and every member still
gets exactly the reduction of the four genuine contributions. Owners score voters by verified id.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from lioncub.optim.reducers import TrustedVoteReducer
from lioncub.optim.robust import AgreementTracker, sign_agreement
from lioncub.optim.strategies import StrategyConfig, make_strategy
from lioncub.optim.vote import majority_vote
from lioncub.peer.adversary import Adversary, push_forgeries
from lioncub.peer.exchange import HubConfig, run_exchange
from tests.peer.test_exchange import Swarm, reference

pytestmark = pytest.mark.network

STRATEGY = make_strategy(StrategyConfig(name="lioncub"))
NUMEL = 5000


def _vecs(ids: list[str], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {p: torch.randn(NUMEL, generator=gen) for p in ids}


@pytest.mark.parametrize("mode", ["impersonate", "wrong-group", "stale-replay"])
def test_forged_pushes_are_refused_and_change_nothing(mode: str) -> None:
    async def main() -> None:
        async with await Swarm.start(4, config=HubConfig(open_wait_s=0.5)) as swarm:
            liar = swarm.members[3]
            adversary = Adversary(mode)
            for rnd in (1, 2):  # the replay needs a round to replay
                plans = swarm.plans(rnd, NUMEL)
                ids = list(plans)
                vecs = _vecs(ids, rnd)
                deadline = time.time() + 20
                weights = dict.fromkeys(ids, 1)
                outcomes = await asyncio.gather(
                    *(
                        run_exchange(
                            swarm.by_id(p).hub, plans[p], "update", vecs[p], STRATEGY, 1, deadline=deadline
                        )
                        for p in ids
                    ),
                    push_forgeries(
                        adversary,
                        liar.hub,
                        plans[liar.peer_id],
                        "update",
                        vecs[liar.peer_id],
                        STRATEGY,
                        1,
                        timeout=10,
                    ),
                )
                want = reference(STRATEGY, plans[ids[0]], vecs, weights)
                for outcome in outcomes[:-1]:
                    assert outcome.complete and not outcome.left_out  # nobody's genuine push was lost
                    assert torch.equal(outcome.update, want)
            assert adversary.refused, "no forged push was sent"
            assert "OK" not in adversary.refused, adversary.refused

    asyncio.run(main())


def test_owners_score_each_voter_by_its_verified_id() -> None:
    async def main() -> None:
        async with await Swarm.start(4) as swarm:
            plans = swarm.plans(1, NUMEL)
            ids = list(plans)
            common = torch.randn(NUMEL, generator=torch.Generator().manual_seed(7))
            vecs = {p: common + noise for p, noise in _vecs(ids, 8).items()}  # honest votes agree ~75%
            liar = ids[2]
            vecs[liar] = -common  # every vote flipped
            trackers = {p: AgreementTracker() for p in ids}
            deadline = time.time() + 20
            outcomes = await asyncio.gather(
                *(
                    run_exchange(
                        swarm.by_id(p).hub,
                        plans[p],
                        "update",
                        vecs[p],
                        TrustedVoteReducer(STRATEGY, trackers[p], p),
                        1,
                        deadline=deadline,
                    )
                    for p in ids
                )
            )
            assert all(o.complete for o in outcomes)
            for s in plans[ids[0]].shards:
                lo, hi = s.offset, s.offset + s.numel
                parts = {p: STRATEGY.encode(vecs[p][lo:hi]) for p in ids}
                majority = majority_vote([parts[p] for p in ids])
                scores = trackers[s.owner_id].scores
                assert set(scores) == set(ids) - {s.owner_id}
                for p, score in scores.items():
                    assert score == pytest.approx(sign_agreement(parts[p], majority))
                if s.owner_id != liar:
                    assert scores[liar] < min(v for p, v in scores.items() if p != liar)

    asyncio.run(main())
