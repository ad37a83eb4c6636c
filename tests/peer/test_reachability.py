"""Dial-back NAT detection between real PeerServers on loopback.

A server bound to 127.0.0.2 only stands in for a peer behind NAT: its calls leave from 127.0.0.1,
so a checker that dials the caller's observed address cannot reach it.
"""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest

from lioncub.peer.reachability import (
    DIAL_TIMEOUT_S,
    MAX_CONCURRENT,
    DialBack,
    observed_host,
    probe_reachability,
)
from lioncub.peer.server import PeerServer
from lioncub.protocol import Identity, grpc_message_options
from lioncub.protocol import lioncub_pb2 as pb
from lioncub.protocol import lioncub_pb2_grpc as pb_grpc

pytestmark = pytest.mark.network


@pytest.mark.parametrize(
    ("transport", "host"),
    [
        ("ipv4:127.0.0.1:50412", "127.0.0.1"),
        ("ipv4:10.1.2.3:1", "10.1.2.3"),
        ("ipv6:[::1]:50412", "[::1]"),
        ("ipv6:[2001:db8::7]:9", "[2001:db8::7]"),
        ("unix:/tmp/sock", None),
        ("ipv4:not-an-ip:5", None),
        ("ipv4:[::1]:5", None),
        ("ipv6:127.0.0.1:5", None),
        ("", None),
    ],
)
def test_observed_host(transport: str, host: str | None) -> None:
    assert observed_host(transport) == host


async def _checker(timeout: float = DIAL_TIMEOUT_S, max_concurrent: int = MAX_CONCURRENT) -> PeerServer:
    server = await PeerServer.start("127.0.0.1:0", identity=Identity.generate())
    server.reachability = DialBack(timeout=timeout, max_concurrent=max_concurrent)
    return server


def test_a_peer_on_the_observed_address_is_reachable_and_one_elsewhere_is_not() -> None:
    async def body() -> None:
        checkers = [await _checker(), await _checker()]
        me = Identity.generate()
        open_peer = await PeerServer.start("127.0.0.1:0", identity=me)
        natted = await PeerServer.start("127.0.0.2:0", identity=me)
        try:
            endpoints = [c.endpoint for c in checkers]
            ok = await probe_reachability(endpoints, port=open_peer.port, peer_id=me.peer_id)
            assert ok.reachable is True and ok.observed_host == "127.0.0.1"
            assert [a[1] for a in ok.answers] == [True, True]

            behind = await probe_reachability(endpoints, port=natted.port, peer_id=me.peer_id)
            assert behind.reachable is False, behind
            assert all("UNAVAILABLE" in detail for _, _, detail in behind.answers), behind

            # A server at that address that speaks for someone else is not "us".
            other = await probe_reachability(
                endpoints, port=open_peer.port, peer_id=Identity.generate().peer_id
            )
            assert other.reachable is False
            assert all("another peer" in detail for _, _, detail in other.answers)
        finally:
            for s in (*checkers, open_peer, natted):
                await s.stop(None)

    asyncio.run(body())


def test_no_answer_is_unknown_not_unreachable() -> None:
    async def body() -> None:
        me = Identity.generate()
        mine = await PeerServer.start("127.0.0.1:0", identity=me)
        no_handler = await PeerServer.start("127.0.0.1:0", identity=Identity.generate())  # an old peer
        try:
            assert (await probe_reachability([], port=mine.port, peer_id=me.peer_id)).reachable is None
            verdict = await probe_reachability([no_handler.endpoint], port=mine.port, peer_id=me.peer_id)
            assert verdict.reachable is None and verdict.answers == ()
        finally:
            await mine.stop(None)
            await no_handler.stop(None)

    asyncio.run(body())


def test_bad_requests_get_invalid_argument_and_the_checker_stays_up() -> None:
    async def body() -> None:
        checker = await _checker()
        try:
            async with grpc.aio.insecure_channel(checker.endpoint, options=grpc_message_options()) as ch:
                stub = pb_grpc.LioncubPeerStub(ch)
                for request in (
                    pb.ReachabilityRequest(port=0, peer_id="x"),
                    pb.ReachabilityRequest(port=70000, peer_id="x"),
                    pb.ReachabilityRequest(port=80, peer_id=""),
                    pb.ReachabilityRequest(port=80, peer_id="x" * 500),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.CheckReachable(request, timeout=10)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                raw = ch.unary_unary("/lioncub.v1.LioncubPeer/CheckReachable")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await raw(b"\xff\xff\xff", timeout=10)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert (await stub.Health(pb.HealthRequest(), timeout=10)).alive
        finally:
            await checker.stop(None)

    asyncio.run(body())


def test_dial_backs_beyond_the_limit_are_refused() -> None:
    """A caller whose port accepts TCP but never answers holds the one slot until its timeout."""

    async def body() -> None:
        accepted = asyncio.Event()

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set()
            await reader.read()  # until the checker gives up and closes
            writer.close()

        silent = await asyncio.start_server(hold, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        checker = await _checker(timeout=30.0, max_concurrent=1)
        me = Identity.generate().peer_id
        try:
            async with grpc.aio.insecure_channel(checker.endpoint, options=grpc_message_options()) as ch:
                stub = pb_grpc.LioncubPeerStub(ch)
                first = asyncio.ensure_future(
                    stub.CheckReachable(pb.ReachabilityRequest(port=port, peer_id=me), timeout=60)
                )
                await asyncio.wait_for(accepted.wait(), 30)
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.CheckReachable(pb.ReachabilityRequest(port=port, peer_id=me), timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                first.cancel()
        finally:
            await checker.stop(None)
            silent.close()

    asyncio.run(body())
