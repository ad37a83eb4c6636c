"""Real gRPC servers on 127.0.0.1 (port 0): statuses, streaming chunks, TLS."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
import torch

from lioncub.optim.codec import Codec, Encoded
from lioncub.protocol import (
    MAX_CHUNK_BYTES,
    PROTOCOL_VERSION,
    Identity,
    ProtocolError,
    ShardExpectation,
    ShardKey,
    TlsMaterial,
    abort_rpc,
    channel_credentials,
    channel_options,
    chunk_payload,
    generate_self_signed,
    grpc_message_options,
    receive_payload,
    server_credentials,
    sign_chunk,
)
from lioncub.protocol import lioncub_pb2 as pb
from lioncub.protocol import lioncub_pb2_grpc as pb_grpc

pytestmark = pytest.mark.network

Lookup = Callable[[str], Codec]
PUSH = ShardKey("run-a", 7, "g-1", pb.PURPOSE_PUSH, "update", 0)
RESULT = ShardKey("run-a", 7, "g-1", pb.PURPOSE_RESULT, "update", 0)
NUMEL = 3 * MAX_CHUNK_BYTES * 8 // 2  # 1.5 MiB of sign bits: two chunks


class _Owner(pb_grpc.LioncubPeerServicer):
    """A thin servicer as peer/ would write one: decode, call protocol code, map errors once."""

    def __init__(self, owner: Identity, member: Identity, result: Encoded) -> None:
        self.owner = owner
        self.push_expect = ShardExpectation(PUSH, {member.peer_id: member.public_key}, numel=NUMEL)
        self.result = result
        self.received: list[Encoded] = []

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthReply:
        return pb.HealthReply(
            alive=True, protocol_version=PROTOCOL_VERSION, peer_id=self.owner.peer_id, round=7
        )

    async def PushShard(
        self, request_iterator: AsyncIterator[pb.Chunk], context: grpc.aio.ServicerContext
    ) -> pb.PushAck:
        try:
            enc, header = await receive_payload(request_iterator, self.push_expect)  # default registry
        except ProtocolError as exc:
            await abort_rpc(context, exc)
        self.received.append(enc)
        return pb.PushAck(received_bytes=enc.nbytes, received_chunks=header.chunk_total)

    async def PullResult(
        self, request: pb.PullResultRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Chunk]:
        for chunk in chunk_payload(RESULT, self.result, self.owner, contributors=2):
            yield chunk


async def _serve(
    servicer: _Owner, tls: TlsMaterial | None, body: Callable[[int], Awaitable[None]], mutual: bool = False
) -> None:
    server = grpc.aio.server(options=grpc_message_options())
    pb_grpc.add_LioncubPeerServicer_to_server(servicer, server)
    if tls is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", server_credentials(tls, mutual=mutual))
    assert port > 0
    await server.start()
    try:
        await body(port)
    finally:
        await server.stop(grace=None)


def _sign_bits(lookup: Lookup, seed: int) -> Encoded:
    return lookup("sign1").encode(torch.randn(NUMEL, generator=torch.Generator().manual_seed(seed)))


async def _stream(chunks: list[pb.Chunk]) -> AsyncIterator[pb.Chunk]:
    for chunk in chunks:
        yield chunk


def test_push_pull_and_error_statuses(alice: Identity, bob: Identity, codec_lookup: Lookup) -> None:
    servicer = _Owner(alice, bob, _sign_bits(codec_lookup, 2))
    contribution = _sign_bits(codec_lookup, 1)
    statuses: dict[str, Any] = {}

    async def body(port: int) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=grpc_message_options()) as channel:
            stub = pb_grpc.LioncubPeerStub(channel)
            health = await stub.Health(pb.HealthRequest(), timeout=5)
            assert health.alive and health.peer_id == alice.peer_id

            chunks = chunk_payload(PUSH, contribution, bob)
            ack = await stub.PushShard(_stream(chunks), timeout=10)
            assert (ack.received_bytes, ack.received_chunks) == (contribution.nbytes, 2)

            pulled, header = await receive_payload(
                stub.PullResult(pb.PullResultRequest(), timeout=10),
                ShardExpectation(RESULT, {alice.peer_id: alice.public_key}, numel=NUMEL),
                codec_lookup=codec_lookup,
            )
            assert torch.equal(pulled.data, servicer.result.data) and header.contributors == 2

            async def status_of(items: list[pb.Chunk]) -> grpc.StatusCode:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.PushShard(_stream(items), timeout=10)
                return info.value.code()

            tampered = [pb.Chunk(), chunks[1]]
            tampered[0].CopyFrom(chunks[0])
            tampered[0].header.numel += 1
            statuses["tampered"] = await status_of(tampered)
            stale = chunk_payload(
                ShardKey("run-a", 6, "g-1", pb.PURPOSE_PUSH, "update", 0), contribution, bob
            )
            statuses["stale"] = await status_of(stale)
            statuses["outsider"] = await status_of(chunk_payload(PUSH, contribution, alice))
            statuses["missing"] = await status_of(chunks[:1])
            statuses["reordered"] = await status_of(chunks[::-1])
            huge = pb.Chunk()
            huge.CopyFrom(chunks[0])
            huge.data = b"\x00" * (2 * MAX_CHUNK_BYTES)
            sign_chunk(huge, bob)
            statuses["huge"] = await status_of([huge])

    asyncio.run(_serve(servicer, None, body))
    S = grpc.StatusCode
    assert statuses == {
        "tampered": S.UNAUTHENTICATED,
        "stale": S.FAILED_PRECONDITION,
        "outsider": S.PERMISSION_DENIED,
        "missing": S.INVALID_ARGUMENT,
        "reordered": S.INVALID_ARGUMENT,
        "huge": S.RESOURCE_EXHAUSTED,
    }
    assert len(servicer.received) == 1 and torch.equal(servicer.received[0].data, contribution.data)


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_health_call(alice: Identity, bob: Identity, codec_lookup: Lookup, mutual: bool) -> None:
    tls = generate_self_signed()
    servicer = _Owner(alice, bob, _sign_bits(codec_lookup, 0))

    async def body(port: int) -> None:
        target = f"127.0.0.1:{port}"
        creds = channel_credentials(tls, mutual=mutual)
        async with grpc.aio.secure_channel(target, creds, options=channel_options()) as channel:
            reply = await pb_grpc.LioncubPeerStub(channel).Health(pb.HealthRequest(), timeout=5)
            assert reply.alive and reply.peer_id == alice.peer_id
        other = generate_self_signed()  # a different swarm's certificate is not trusted
        async with grpc.aio.secure_channel(
            target, channel_credentials(other, mutual=mutual), options=channel_options()
        ) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.LioncubPeerStub(channel).Health(pb.HealthRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        if mutual:  # the server demands the swarm certificate from the client
            async with grpc.aio.secure_channel(
                target, channel_credentials(tls, mutual=False), options=channel_options()
            ) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await pb_grpc.LioncubPeerStub(channel).Health(pb.HealthRequest(), timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(_serve(servicer, tls, body, mutual=mutual))


def test_tls_material_files(tmp_path: Any) -> None:
    tls = generate_self_signed()
    tls.save(tmp_path / "swarm.crt", tmp_path / "swarm.key")
    assert (tmp_path / "swarm.key").stat().st_mode & 0o777 == 0o600
    assert TlsMaterial.load(tmp_path / "swarm.crt", tmp_path / "swarm.key") == tls
