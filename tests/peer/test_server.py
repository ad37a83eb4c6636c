"""PeerServer on 127.0.0.1:0: binding, Health, pluggable handlers, one error mapping, TLS, limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
import torch

from lioncub import __version__
from lioncub.optim.codecs import get_codec
from lioncub.peer.server import CallInfo, HealthInfo, PeerServer
from lioncub.protocol import (
    PROTOCOL_VERSION,
    BadSignature,
    FutureRound,
    Identity,
    InvalidMessage,
    NotAMember,
    TooLarge,
    Unavailable,
    channel_credentials,
    channel_options,
    generate_self_signed,
    grpc_message_options,
    receive_state,
    state_replies,
)
from lioncub.protocol import lioncub_pb2 as pb
from lioncub.protocol import lioncub_pb2_grpc as pb_grpc

pytestmark = pytest.mark.network

S = grpc.StatusCode


def _channel(endpoint: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(endpoint, options=grpc_message_options())


async def _code(awaitable: object) -> grpc.StatusCode:
    try:
        await awaitable  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return S.OK


async def _stream_code(call: AsyncIterator[object]) -> tuple[grpc.StatusCode, str]:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return S.OK, ""


async def _no_chunks() -> AsyncIterator[pb.Chunk]:
    return
    yield pb.Chunk()


def test_start_binds_port_zero_and_serves_health() -> None:
    me = Identity.generate()

    async def body() -> None:
        server = await PeerServer.start(identity=me, health=lambda: HealthInfo(run_id="run-h", round=42))
        assert server.port > 0 and server.endpoint == f"127.0.0.1:{server.port}"
        async with _channel(server.endpoint) as ch:
            reply = await pb_grpc.LioncubPeerStub(ch).Health(pb.HealthRequest(), timeout=5)
        assert (reply.alive, reply.protocol_version, reply.software_version) == (
            True,
            PROTOCOL_VERSION,
            __version__,
        )
        assert (reply.peer_id, reply.run_id, reply.round) == (me.peer_id, "run-h", 42)
        with pytest.raises(OSError):  # the port is taken (no SO_REUSEPORT)
            await PeerServer.start(f"127.0.0.1:{server.port}", identity=me)
        await server.stop(None)
        await server.stop(None)  # idempotent
        async with _channel(server.endpoint) as ch:
            assert (
                await _code(pb_grpc.LioncubPeerStub(ch).Health(pb.HealthRequest(), timeout=2))
                == S.UNAVAILABLE
            )

    asyncio.run(body())


def test_unset_handlers_answer_unimplemented() -> None:
    async def body() -> None:
        async with (
            await PeerServer.start(identity=Identity.generate()) as server,
            _channel(server.endpoint) as ch,
        ):
            stub = pb_grpc.LioncubPeerStub(ch)
            assert await _code(stub.PushShard(_no_chunks(), timeout=5)) == S.UNIMPLEMENTED
            for call, handler in (
                (stub.PullResult(pb.PullResultRequest(), timeout=5), "exchange"),
                (stub.JoinGroup(pb.JoinGroupRequest(), timeout=5), "group"),
                (stub.DownloadState(pb.StateRequest(), timeout=5), "state"),
            ):
                code, details = await _stream_code(call)
                assert code == S.UNIMPLEMENTED and f"no {handler} handler" in details

    asyncio.run(body())


class _Groups:
    """A group handler that raises what it is told to, or accepts and announces."""

    def __init__(self) -> None:
        self.raise_: Exception | None = None
        self.calls: list[CallInfo] = []

    async def join_group(
        self, request: pb.JoinGroupRequest, call: CallInfo
    ) -> AsyncIterator[pb.JoinGroupReply]:
        self.calls.append(call)
        yield pb.JoinGroupReply(status=pb.JoinGroupReply.STATUS_ACCEPTED)
        if self.raise_ is not None:
            raise self.raise_
        yield pb.JoinGroupReply(status=pb.JoinGroupReply.STATUS_GROUP_READY, reason=request.run_id)


class _State:
    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.tensor = get_codec("fp16").encode(torch.arange(10, dtype=torch.float32))

    async def download_state(self, request: pb.StateRequest, call: CallInfo) -> AsyncIterator[pb.StateReply]:
        info = pb.PeerInfo(
            peer_id=self.identity.peer_id, public_key=self.identity.public_key, endpoint="127.0.0.1:1"
        )
        for reply in state_replies(
            self.identity,
            info,
            run_id=request.run_id,
            round=3,
            config_json="{}",
            tensors=[("anchor", self.tensor)],
        ):
            yield reply


def test_handlers_are_pluggable_and_errors_map_to_statuses_in_one_place() -> None:
    me = Identity.generate()

    async def body() -> None:
        async with await PeerServer.start(identity=me) as server, _channel(server.endpoint) as ch:
            stub = pb_grpc.LioncubPeerStub(ch)
            groups, state = _Groups(), _State(me)
            server.groups, server.state = groups, state

            replies = [r async for r in stub.JoinGroup(pb.JoinGroupRequest(run_id="run-j"), timeout=5)]
            assert [r.status for r in replies] == [
                pb.JoinGroupReply.STATUS_ACCEPTED,
                pb.JoinGroupReply.STATUS_GROUP_READY,
            ]
            remaining = groups.calls[0].time_remaining  # the caller set a 5 s deadline
            assert remaining is not None and 0 < remaining < 6
            assert groups.calls[0].peer.startswith("ipv4:127.0.0.1:")

            received = await receive_state(
                stub.DownloadState(pb.StateRequest(run_id="run-s"), timeout=5),
                run_id="run-s",
                sender_id=me.peer_id,
            )
            assert received.round == 3 and torch.equal(received.tensors["anchor"].data, state.tensor.data)

            cases = {
                InvalidMessage("bad"): S.INVALID_ARGUMENT,
                BadSignature("forged"): S.UNAUTHENTICATED,
                NotAMember("outsider"): S.PERMISSION_DENIED,
                FutureRound("later"): S.FAILED_PRECONDITION,
                TooLarge("huge"): S.RESOURCE_EXHAUSTED,
                Unavailable("not yet"): S.UNAVAILABLE,
                RuntimeError("secret internal detail"): S.INTERNAL,
            }
            for exc, want in cases.items():
                groups.raise_ = exc
                code, details = await _stream_code(stub.JoinGroup(pb.JoinGroupRequest(), timeout=5))
                assert code == want, exc
                if want == S.INTERNAL:
                    assert "secret" not in details  # internal details never leak to the caller
                else:
                    assert details == str(exc)
            assert (await stub.Health(pb.HealthRequest(), timeout=5)).alive

            server.groups = None  # handlers can be unset again
            assert (await _stream_code(stub.JoinGroup(pb.JoinGroupRequest(), timeout=5)))[
                0
            ] == S.UNIMPLEMENTED

    asyncio.run(body())


@pytest.mark.parametrize("mutual", [False, True])
def test_tls(mutual: bool) -> None:
    tls = generate_self_signed()

    async def body() -> None:
        async with await PeerServer.start(identity=Identity.generate(), tls=tls, mutual_tls=mutual) as server:
            creds = channel_credentials(tls, mutual=mutual)
            options = [*grpc_message_options(), *channel_options()]
            async with grpc.aio.secure_channel(server.endpoint, creds, options=options) as ch:
                assert (await pb_grpc.LioncubPeerStub(ch).Health(pb.HealthRequest(), timeout=5)).alive
            async with _channel(server.endpoint) as ch:  # plaintext to a TLS server fails
                assert (
                    await _code(pb_grpc.LioncubPeerStub(ch).Health(pb.HealthRequest(), timeout=5))
                    == S.UNAVAILABLE
                )

    asyncio.run(body())


class _Blocking:
    """Join handler that holds every call until released, counting those inside."""

    def __init__(self, inside: int) -> None:
        self.entered = 0
        self.all_inside = asyncio.Event()
        self.release = asyncio.Event()
        self._inside = inside

    async def join_group(
        self, request: pb.JoinGroupRequest, call: CallInfo
    ) -> AsyncIterator[pb.JoinGroupReply]:
        self.entered += 1
        if self.entered == self._inside:
            self.all_inside.set()
        await self.release.wait()
        yield pb.JoinGroupReply(status=pb.JoinGroupReply.STATUS_DISBANDED)


def test_concurrent_calls_are_limited() -> None:
    async def body() -> None:
        async with await PeerServer.start(identity=Identity.generate(), max_concurrent_rpcs=2) as server:
            handler = _Blocking(inside=2)
            server.groups = handler
            async with _channel(server.endpoint) as ch:
                stub = pb_grpc.LioncubPeerStub(ch)
                held = [
                    asyncio.ensure_future(_stream_code(stub.JoinGroup(pb.JoinGroupRequest(), timeout=10)))
                    for _ in range(2)
                ]
                await handler.all_inside.wait()
                code, _ = await _stream_code(stub.JoinGroup(pb.JoinGroupRequest(), timeout=5))
                assert code == S.RESOURCE_EXHAUSTED
                handler.release.set()
                assert [c for c, _ in await asyncio.gather(*held)] == [S.OK, S.OK]
                assert (await stub.Health(pb.HealthRequest(), timeout=5)).alive

    asyncio.run(body())


def test_start_validates_arguments() -> None:
    async def body() -> None:
        with pytest.raises(ValueError):
            await PeerServer.start(identity=Identity.generate(), max_concurrent_rpcs=0)
        with pytest.raises(ValueError):
            await PeerServer.start(identity=Identity.generate(), mutual_tls=True)

    asyncio.run(body())
