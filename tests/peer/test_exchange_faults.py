"""Faults in the group exchange: dead, silent and late members, and every kind of bad message.

Each bad message must get its gRPC status, leave the owner's slot as it was, and leave the server
healthy: the honest round that follows still produces the reference result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence

import grpc
import grpc.aio
import pytest
import torch

from lioncub.optim.codecs import get_codec
from lioncub.peer.exchange import HubConfig, SlotKey, SlotState, run_exchange
from lioncub.peer.server import CallInfo
from lioncub.protocol import (
    MAX_CHUNK_BYTES,
    PROTOCOL_VERSION,
    GroupPlan,
    Identity,
    ShardKey,
    chunk_payload,
    grpc_message_options,
    receive_payload,
    sign_chunk,
    sign_message,
)
from lioncub.protocol import lioncub_pb2 as pb
from lioncub.protocol import lioncub_pb2_grpc as pb_grpc
from tests.peer.test_exchange import NUMEL, REDUCERS, Swarm, reference

pytestmark = pytest.mark.network

S = grpc.StatusCode
REDUCER = REDUCERS["lioncub-mavo"]


async def _aiter(chunks: Sequence[pb.Chunk]) -> AsyncIterator[pb.Chunk]:
    for chunk in chunks:
        yield chunk


async def _status(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return S.OK


async def _pull_status(call: AsyncIterator[pb.Chunk]) -> grpc.StatusCode:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return S.OK


def _fallback(plan: GroupPlan, owner: str, vec: torch.Tensor, weight: int) -> tuple[slice, torch.Tensor]:
    s = next(s for s in plan.shards if s.owner_id == owner)
    lo, hi = s.offset, s.offset + s.numel
    return slice(lo, hi), REDUCER.decode(REDUCER.local_fallback(REDUCER.encode(vec[lo:hi]), weight))


def test_member_dies_mid_stream() -> None:
    """The victim pushes half its chunks to one owner, then its call and its server die."""

    async def body() -> None:
        config = HubConfig(chunk_bytes=64, push_grace_s=0.2)
        async with await Swarm.start(4, config=config) as swarm:
            honest, victim = swarm.members[:3], swarm.members[3]
            assert victim.server is not None and honest[0].server is not None
            plans = swarm.plans(1, NUMEL, deadline_s=2.0)
            plan = plans[victim.peer_id]
            gen = torch.Generator().manual_seed(1)
            vecs = {m: torch.randn(NUMEL, generator=gen) for m in plan.members}
            weights = dict.fromkeys(plan.members, 1)

            target = next(s for s in plan.shards if s.owner_id == honest[0].peer_id)
            lo, hi = target.offset, target.offset + target.numel
            chunks = chunk_payload(
                plan.key(pb.PURPOSE_PUSH, "update", target.index),
                REDUCER.encode(vecs[victim.peer_id][lo:hi]),
                victim.identity,
                chunk_bytes=16,
            )
            assert len(chunks) >= 4
            half_sent = asyncio.Event()

            async def half_then_stall() -> AsyncIterator[pb.Chunk]:
                for chunk in chunks[: len(chunks) // 2]:
                    yield chunk
                half_sent.set()
                await asyncio.Event().wait()  # the victim never sends the rest
                raise AssertionError("unreachable")

            started = time.monotonic()
            async with grpc.aio.insecure_channel(
                honest[0].server.endpoint, options=grpc_message_options()
            ) as channel:
                call = pb_grpc.LioncubPeerStub(channel).PushShard(half_then_stall(), timeout=10)
                round_task = asyncio.create_task(
                    swarm.exchange(
                        {m.peer_id: plans[m.peer_id] for m in honest}, "update", vecs, REDUCER, weights
                    )
                )
                await half_sent.wait()
                call.cancel()
                await victim.server.stop(None)  # the victim is gone
                outcomes = await round_task
            assert time.monotonic() - started < 10

            honest_ids = [m.peer_id for m in honest]
            expected = reference(REDUCER, plan, vecs, weights, contributors=honest_ids)
            for peer_id, out in outcomes.items():
                assert out.missing_owners == (victim.peer_id,), out.failures
                assert out.left_out == (victim.peer_id,)
                mine = expected.clone()
                where, values = _fallback(plan, victim.peer_id, vecs[peer_id], 1)
                mine[where] = values
                assert torch.equal(out.update, mine), peer_id
            slot = honest[0].hub.slot(SlotKey(1, plan.group_id, "update", target.index))
            assert slot is not None and victim.peer_id not in slot.contributors

    asyncio.run(body())


class _Silent:
    """An exchange handler that accepts calls and never answers (until cancelled)."""

    def __init__(self) -> None:
        self.calls = 0

    async def push_shard(self, chunks: AsyncIterator[pb.Chunk], call: CallInfo) -> pb.PushAck:
        self.calls += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def pull_result(self, request: pb.PullResultRequest, call: CallInfo) -> AsyncIterator[pb.Chunk]:
        self.calls += 1
        await asyncio.Event().wait()
        yield pb.Chunk()


def test_member_that_never_answers_gives_bounded_completion() -> None:
    async def body() -> None:
        async with await Swarm.start(4, config=HubConfig(push_grace_s=0.2)) as swarm:
            honest, silent = swarm.members[:3], swarm.members[3]
            assert silent.server is not None
            handler = _Silent()
            silent.server.exchange = handler
            plans = swarm.plans(1, NUMEL, deadline_s=1.5)
            plan = plans[silent.peer_id]
            vecs = {m: torch.randn(NUMEL) for m in plan.members}
            weights = {m: 2 + i for i, m in enumerate(plan.members)}
            started = time.monotonic()
            outcomes = await swarm.exchange(
                {m.peer_id: plans[m.peer_id] for m in honest}, "update", vecs, REDUCER, weights, timeout=30
            )
            elapsed = time.monotonic() - started
            assert elapsed < 10, f"bounded by the group deadline (1.5 s + grace), took {elapsed:.2f} s"
            assert handler.calls == 3  # every honest member tried to push to it
            expected = reference(REDUCER, plan, vecs, weights, contributors=[m.peer_id for m in honest])
            for peer_id, out in outcomes.items():
                assert out.missing_owners == (silent.peer_id,)
                assert "DEADLINE_EXCEEDED" in out.failures[silent.peer_id]
                assert out.left_out == (silent.peer_id,)
                mine = expected.clone()
                where, values = _fallback(plan, silent.peer_id, vecs[peer_id], weights[peer_id])
                mine[where] = values
                assert torch.equal(out.update, mine)

    asyncio.run(body())


def test_late_sender_is_left_out_and_falls_back() -> None:
    async def body() -> None:
        async with await Swarm.start(3, client=(2,)) as swarm:
            a, b, late = swarm.members
            plans = swarm.plans(1, 500, deadline_s=1.5)
            plan = plans[a.peer_id]
            vecs = {m: torch.randn(500) for m in plan.members}
            weights = dict.fromkeys(plan.members, 1)
            on_time = await swarm.exchange(
                {p: plans[p] for p in (a.peer_id, b.peer_id)}, "update", vecs, REDUCER, weights
            )
            expected = reference(REDUCER, plan, vecs, weights, contributors=[a.peer_id, b.peer_id])
            for out in on_time.values():
                assert out.complete and out.left_out == (late.peer_id,)
                assert torch.equal(out.update, expected)
            out = await run_exchange(
                late.hub,
                plans[late.peer_id],
                "update",
                vecs[late.peer_id],
                REDUCER,
                1,
                deadline=time.time() + 5,
            )
            assert set(out.missing_owners) == {a.peer_id, b.peer_id}
            assert all("FAILED_PRECONDITION" in why for why in out.failures.values())
            own = REDUCER.decode(REDUCER.local_fallback(REDUCER.encode(vecs[late.peer_id]), 1))
            assert torch.equal(out.update, own)

    asyncio.run(body())


def _copies(chunks: list[pb.Chunk]) -> list[pb.Chunk]:
    out = [pb.Chunk() for _ in chunks]
    for copy, chunk in zip(out, chunks, strict=True):
        copy.CopyFrom(chunk)
    return out


def test_bad_messages_get_their_status_and_leave_the_slot_untouched() -> None:
    async def body() -> None:
        config = HubConfig(open_wait_s=0.3, chunk_bytes=64)
        async with await Swarm.start(4, client=(1, 2, 3), config=config) as swarm:
            owner, m, c, d = swarm.members
            outsider = Identity.generate()
            assert owner.server is not None
            plans = swarm.plans(2, NUMEL, deadline_s=30)
            plan = plans[owner.peer_id]
            assert len(plan.shards) == 1
            gen = torch.Generator().manual_seed(5)
            vecs = {p: torch.randn(NUMEL, generator=gen) for p in plan.members}
            weights = {p: 3 for p in plan.members}
            slot = owner.hub.open_slot(
                plan, "update", 0, REDUCER, REDUCER.encode(vecs[owner.peer_id]), weights[owner.peer_id]
            )
            key = plan.key(pb.PURPOSE_PUSH, "update", 0)
            d_part = REDUCER.encode(vecs[d.peer_id])
            genuine = chunk_payload(key, d_part, d.identity, weight=3, chunk_bytes=64)
            assert len(genuine) >= 3

            def by(identity: Identity, shard_key: ShardKey = key, **kw: object) -> list[pb.Chunk]:
                return chunk_payload(shard_key, d_part, identity, chunk_bytes=64, **kw)  # type: ignore[arg-type]

            forged = _copies(genuine)
            for chunk in forged:
                chunk.signature = outsider.sign(b"not the right bytes" * 3)[:64]
            corrupted = _copies(genuine)
            corrupted[1].data = bytes([corrupted[1].data[0] ^ 0xFF]) + corrupted[1].data[1:]
            resigned = _copies(corrupted)
            for chunk in resigned:
                sign_chunk(chunk, d.identity)  # a buggy sender: signed, but the digest is wrong
            oversized = _copies(genuine[:1])
            oversized[0].data = b"\x00" * (MAX_CHUNK_BYTES + 1)
            sign_chunk(oversized[0], d.identity)
            fp16 = chunk_payload(key, get_codec("fp16").encode(vecs[d.peer_id]), d.identity)
            result_purpose = by(d.identity, plan.key(pb.PURPOSE_RESULT, "update", 0))

            def shifted(**changes: object) -> ShardKey:
                return dataclasses.replace(key, **changes)  # type: ignore[arg-type]

            pushes: dict[str, tuple[list[pb.Chunk], grpc.StatusCode]] = {
                "forged signature": (forged, S.UNAUTHENTICATED),
                "corrupted chunk": (corrupted, S.UNAUTHENTICATED),
                "corrupted, re-signed": (resigned, S.INVALID_ARGUMENT),
                "sender not in group": (by(outsider), S.PERMISSION_DENIED),
                "replay of round 1": (by(d.identity, shifted(round=1)), S.FAILED_PRECONDITION),
                "future round": (by(d.identity, shifted(round=3)), S.FAILED_PRECONDITION),
                "other run": (by(d.identity, shifted(run_id="other-run")), S.FAILED_PRECONDITION),
                "unknown group": (by(d.identity, shifted(group_id="g-unknown")), S.FAILED_PRECONDITION),
                "shard not owned": (by(d.identity, shifted(shard_index=1)), S.INVALID_ARGUMENT),
                "truncated": (genuine[:-1], S.INVALID_ARGUMENT),
                "reordered": (genuine[::-1], S.INVALID_ARGUMENT),
                "chunk after the last": ([*genuine, genuine[-1]], S.INVALID_ARGUMENT),
                "oversized chunk": (oversized, S.RESOURCE_EXHAUSTED),
                "wrong codec": (fp16, S.INVALID_ARGUMENT),
                "fractional weight": (by(d.identity, weight=2.5), S.INVALID_ARGUMENT),
                "result purpose": (result_purpose, S.INVALID_ARGUMENT),
                "empty stream": ([], S.INVALID_ARGUMENT),
            }

            def pull(signer: Identity, requester: str, round: int = 2) -> pb.PullResultRequest:
                request = pb.PullResultRequest(
                    protocol_version=PROTOCOL_VERSION,
                    run_id=plan.run_id,
                    round=round,
                    group_id=plan.group_id,
                    exchange="update",
                    shard_index=0,
                    requester_id=requester,
                    wait_ms=100,
                )
                sign_message(request, signer)
                return request

            pulls = {
                "pull by outsider": (pull(outsider, outsider.peer_id), S.PERMISSION_DENIED),
                "pull with forged signature": (pull(outsider, d.peer_id), S.UNAUTHENTICATED),
                "pull of round 1": (pull(d.identity, d.peer_id, round=1), S.FAILED_PRECONDITION),
                "pull before the result": (pull(d.identity, d.peer_id), S.UNAVAILABLE),
            }

            async with grpc.aio.insecure_channel(owner.server.endpoint, options=grpc_message_options()) as ch:
                stub = pb_grpc.LioncubPeerStub(ch)
                got = {
                    name: await _status(stub.PushShard(_aiter(chunks), timeout=5))
                    for name, (chunks, _) in pushes.items()
                }
                got |= {
                    name: await _pull_status(stub.PullResult(req, timeout=5))
                    for name, (req, _) in pulls.items()
                }
                assert got == {name: want for name, (_, want) in (pushes | pulls).items()}
                assert slot.state is SlotState.OPEN and slot.received == {owner.peer_id}

                # d contributes for real, exactly once: a second copy is refused and not counted
                assert await _status(stub.PushShard(_aiter(genuine), timeout=5)) == S.OK
                assert await _status(stub.PushShard(_aiter(genuine), timeout=5)) == S.INVALID_ARGUMENT
                assert slot.state is SlotState.OPEN and slot.received == {owner.peer_id, d.peer_id}

                # the honest members complete the round; the result is the reference of all four
                deadline = time.time() + 20
                outs = await asyncio.gather(
                    *(
                        run_exchange(
                            x.hub, plans[x.peer_id], "update", vecs[x.peer_id], REDUCER, 3, deadline=deadline
                        )
                        for x in (m, c)
                    )
                )
                expected = reference(REDUCER, plan, vecs, weights)
                assert all(o.complete and torch.equal(o.update, expected) for o in outs)
                assert await slot.wait_done(5) and slot.result is not None
                assert torch.equal(REDUCER.decode(slot.result), expected)
                pulled, _ = await receive_payload(
                    stub.PullResult(pull(d.identity, d.peer_id), timeout=5),
                    plan.result_expectation("update", 0),
                )
                assert torch.equal(pulled.data, slot.result.data)

                # after the reduction: d's copy is still a duplicate, the result unchanged
                assert await _status(stub.PushShard(_aiter(genuine), timeout=5)) == S.INVALID_ARGUMENT
                assert slot.contributors == tuple(plan.members)
                health = await stub.Health(pb.HealthRequest(), timeout=5)
                assert health.alive and health.peer_id == owner.peer_id and health.round == 2

    asyncio.run(body())
