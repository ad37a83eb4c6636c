"""The pure parts of the exchange: group announcements (peer/groups.py) and reducers (optim/reducers.py)."""

from __future__ import annotations

import pytest
import torch

from lioncub.optim.codecs import get_codec
from lioncub.optim.partition import SHARD_ALIGN
from lioncub.optim.reducers import MeanReducer, Reducer
from lioncub.optim.strategies import STRATEGY_NAMES, StrategyConfig, make_strategy, weighted_mean
from lioncub.peer.groups import announce_group, deadline_ms_after, group_id_for, peer_info, plan_shards
from lioncub.protocol import BadSignature, Identity, check_group_announcement
from lioncub.protocol import lioncub_pb2 as pb

RUN = "run-plan"


def _members(
    bandwidths: list[float], client: tuple[int, ...] = ()
) -> tuple[list[Identity], list[pb.PeerInfo]]:
    ids = [Identity.generate() for _ in bandwidths]
    infos = [
        peer_info(i, client_mode=True, bandwidth_mbps=bw)
        if k in client
        else peer_info(i, endpoint=f"127.0.0.1:{5000 + k}", bandwidth_mbps=bw)
        for k, (i, bw) in enumerate(zip(ids, bandwidths, strict=True))
    ]
    return ids, infos


def test_announcement_is_sorted_signed_and_agreed_by_every_member() -> None:
    ids, infos = _members([10.0, 30.0, 20.0, 40.0], client=(3,))
    leader = ids[2]
    announcement = announce_group(
        leader, run_id=RUN, round=7, members=infos, total_numel=100_003, deadline_ms=deadline_ms_after(5)
    )
    assert [m.peer_id for m in announcement.members] == sorted(i.peer_id for i in ids)
    assert announcement.group_id == group_id_for(RUN, 7, [i.peer_id for i in reversed(ids)])
    plans = [
        check_group_announcement(
            announcement, run_id=RUN, round=7, self_id=i.peer_id, leader_id=leader.peer_id
        )
        for i in ids
    ]
    assert all(p == plans[0] for p in plans)
    plan = plans[0]
    owners = {s.owner_id for s in plan.shards}
    assert ids[3].peer_id not in owners and len(plan.shards) == 3  # client mode owns nothing
    assert sum(s.numel for s in plan.shards) == 100_003
    assert all(s.offset % SHARD_ALIGN == 0 for s in plan.shards)
    by_owner = {s.owner_id: s.numel for s in plan.shards}
    bandwidth = {i.peer_id: bw for i, bw in zip(ids, [10.0, 30.0, 20.0], strict=False)}
    ranked = sorted(by_owner, key=by_owner.__getitem__)
    assert ranked == sorted(by_owner, key=bandwidth.__getitem__)  # bigger uplink, bigger shard

    announcement.deadline_ms += 1  # any change breaks the leader's signature
    with pytest.raises(BadSignature):
        check_group_announcement(announcement, run_id=RUN, round=7, self_id=ids[0].peer_id)


def test_plan_shards_edge_cases() -> None:
    _, infos = _members([0.0, 0.0, 0.0])
    assert [s.numel for s in plan_shards(infos, 192)] == [64, 64, 64]  # unknown bandwidth: equal shares
    assert [s.numel for s in plan_shards(infos, 100)] == [64, 36]  # empty ranges own no shard
    empty = plan_shards(infos, 0)
    assert len(empty) == 1 and empty[0].numel == 0
    _, clients = _members([1.0, 1.0], client=(0, 1))
    with pytest.raises(ValueError, match="client mode"):
        plan_shards(clients, 10)


def test_announce_group_rejects_impossible_groups() -> None:
    ids, infos = _members([1.0, 1.0])
    kwargs = {"run_id": RUN, "round": 1, "total_numel": 10, "deadline_ms": 0}
    with pytest.raises(ValueError, match="leader"):
        announce_group(Identity.generate(), members=infos, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="twice"):
        announce_group(ids[0], members=[infos[0], infos[0]], **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        announce_group(ids[0], members=[], **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        peer_info(ids[0])  # reachable peers need an endpoint
    with pytest.raises(ValueError):
        peer_info(ids[0], endpoint="127.0.0.1:1", client_mode=True)
    with pytest.raises(ValueError):
        peer_info(ids[0], endpoint="127.0.0.1:1", bandwidth_mbps=float("nan"))
    assert deadline_ms_after(1.5, now=100.0) == 101_500


@pytest.mark.parametrize("codec", ["fp16", "fp32", "int8", "int8b64"])
def test_mean_reducer(codec: str) -> None:
    reducer = MeanReducer(codec)
    assert isinstance(reducer, Reducer)
    gen = torch.Generator().manual_seed(0)
    vecs = [torch.randn(1000, generator=gen) for _ in range(3)]
    parts = [reducer.encode(v) for v in vecs]
    result = reducer.reduce(parts, [1, 2, 3])
    assert result.codec == codec
    mean = weighted_mean(get_codec(codec), parts, [1, 2, 3])
    assert torch.equal(reducer.decode(result), get_codec(codec).decode(get_codec(codec).encode(mean)))
    assert reducer.local_fallback(parts[0], 5) is parts[0]
    assert reducer.decode(result).dtype == torch.float32


def test_mean_reducer_needs_a_canonical_codec_name() -> None:
    with pytest.raises(ValueError):
        MeanReducer("int8b256")  # spelled "int8"
    with pytest.raises(ValueError):
        MeanReducer("nope")


def test_every_sync_strategy_is_a_reducer() -> None:
    for name in STRATEGY_NAMES:
        local_steps = {"diloco": 1, "allreduce": 0}.get(name, 8)
        config = StrategyConfig(name=name, local_steps=local_steps)
        assert isinstance(make_strategy(config), Reducer)
