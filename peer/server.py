"""The peer's one gRPC server: a thin servicer in front of pluggable handler objects.

:class:`PeerServer` binds one ``grpc.aio`` server (insecure or TLS) and serves the
``lioncub.v1.LioncubPeer`` service. The servicer (:class:`LioncubPeerServicer`) only

1. parses the request bytes itself (so that garbage is ``INVALID_ARGUMENT``, never ``INTERNAL``),
2. calls the handler object registered for the method (:class:`ExchangeHandler`,
   :class:`GroupHandler`, :class:`StateHandler`; ``UNIMPLEMENTED`` while none is set),
3. maps every :class:`~lioncub.protocol.ProtocolError` to its status with
   :func:`~lioncub.protocol.abort_rpc`, in one place (:meth:`LioncubPeerServicer._fail`).

Handlers are plain objects, set as attributes after :meth:`PeerServer.start`::

    server = await PeerServer.start("127.0.0.1:0", identity=me)
    server.exchange = ExchangeHub(me, run_id)          # PushShard, PullResult
    server.groups = my_matchmaker                       # JoinGroup
    server.state = my_state_server                      # DownloadState
    server.reachability = DialBack()                    # CheckReachable

Health is always served; it reports what ``health()`` returns (:class:`HealthInfo`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message

from lioncub import __version__
from lioncub.protocol import (
    PROTOCOL_VERSION,
    Identity,
    InvalidMessage,
    ProtocolError,
    TlsMaterial,
    abort_rpc,
    grpc_message_options,
    server_credentials,
)
from lioncub.protocol import lioncub_pb2 as pb

__all__ = [
    "DEFAULT_MAX_CONCURRENT_RPCS",
    "CallInfo",
    "ExchangeHandler",
    "GroupHandler",
    "HealthInfo",
    "LioncubPeerServicer",
    "PeerServer",
    "ReachabilityHandler",
    "StateHandler",
]

log = logging.getLogger(__name__)

#: Calls served at once; more are refused with ``RESOURCE_EXHAUSTED`` by gRPC itself.
DEFAULT_MAX_CONCURRENT_RPCS = 256

_SERVICE = pb.DESCRIPTOR.services_by_name["LioncubPeer"].full_name
_M = TypeVar("_M", bound=Message)


@dataclass(frozen=True)
class CallInfo:
    """What a handler may know about the call it serves.

    Attributes:
        peer: the transport address of the caller (``"ipv4:127.0.0.1:50412"``); not an identity:
            identities come only from verified signatures.
        deadline: the caller's deadline on the ``time.monotonic()`` clock, or None when it set none.
    """

    peer: str
    deadline: float | None

    @classmethod
    def after(cls, peer: str, time_remaining: float | None) -> CallInfo:
        """A call whose caller waits ``time_remaining`` more seconds (None: no deadline)."""
        return cls(peer, None if time_remaining is None else time.monotonic() + time_remaining)

    @property
    def time_remaining(self) -> float | None:
        """Seconds until the caller's deadline now, or None."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def bound(self, seconds: float, margin: float = 0.05) -> float:
        """``seconds``, shortened so that an answer still reaches the caller before its deadline."""
        remaining = self.time_remaining
        if remaining is None:
            return max(0.0, seconds)
        return max(0.0, min(seconds, remaining - margin))


@dataclass(frozen=True)
class HealthInfo:
    """The changing part of a Health reply (identity and versions are filled in by the server)."""

    run_id: str = ""
    round: int = 0
    alive: bool = True


class ExchangeHandler(Protocol):
    """Owner side of the group exchange (:class:`lioncub.peer.exchange.ExchangeHub`).

    Both methods raise :class:`~lioncub.protocol.ProtocolError` for anything they refuse.
    """

    async def push_shard(self, chunks: AsyncIterator[pb.Chunk], call: CallInfo) -> pb.PushAck:
        """Consume one member's contribution (all chunks of one payload) and acknowledge it."""
        ...

    def pull_result(self, request: pb.PullResultRequest, call: CallInfo) -> AsyncIterator[pb.Chunk]:
        """The signed chunks of a reduced shard, once it exists (``Unavailable`` if not in time)."""
        ...


class GroupHandler(Protocol):
    """Leader side of group assembly (the matchmaker)."""

    def join_group(self, request: pb.JoinGroupRequest, call: CallInfo) -> AsyncIterator[pb.JoinGroupReply]:
        """Replies to a follower: ``ACCEPTED`` while waiting, then ``GROUP_READY`` / ``REJECTED`` / ...

        Check the request with :func:`lioncub.protocol.check_join_request` first.
        """
        ...


class StateHandler(Protocol):
    """Serves joiners the current state (see :func:`lioncub.protocol.state_replies`)."""

    def download_state(self, request: pb.StateRequest, call: CallInfo) -> AsyncIterator[pb.StateReply]:
        """Manifest first, then every tensor's chunks; check with :func:`check_state_request`."""
        ...


class ReachabilityHandler(Protocol):
    """Dials a caller back (:class:`lioncub.peer.reachability.DialBack`)."""

    async def check_reachable(self, request: pb.ReachabilityRequest, call: CallInfo) -> pb.ReachabilityReply:
        """Whether the caller's server answers at the caller's observed address."""
        ...


def _parse(cls: type[_M], raw: bytes) -> _M:
    try:
        return cls.FromString(raw)
    except DecodeError as exc:
        raise InvalidMessage(f"request is not a valid {cls.DESCRIPTOR.full_name} message: {exc}") from None


async def _parse_stream(raw_items: AsyncIterator[bytes], cls: type[_M]) -> AsyncIterator[_M]:
    async for raw in raw_items:
        yield _parse(cls, raw)


def _serialize(msg: Message) -> bytes:
    return msg.SerializeToString()


async def _close(items: object) -> None:
    """Close a handler's async generator so that its ``finally`` blocks run now, not at GC."""
    aclose = getattr(items, "aclose", None)
    if aclose is not None:
        await aclose()


class LioncubPeerServicer:
    """Parses requests, calls the server's handlers, maps errors to statuses. Nothing else."""

    def __init__(self, server: PeerServer) -> None:
        self._server = server

    @staticmethod
    def _call(context: grpc.aio.ServicerContext) -> CallInfo:
        return CallInfo.after(str(context.peer()), context.time_remaining())

    async def _fail(self, context: grpc.aio.ServicerContext, method: str, exc: Exception) -> NoReturn:
        """The one place where a failed call becomes a status (via ``abort_rpc``)."""
        me = self._server.identity.peer_id
        if isinstance(exc, ProtocolError):
            log.info("peer %s: %s from %s refused: %s", me, method, context.peer(), exc)
        else:
            log.error("peer %s: %s from %s failed", me, method, context.peer(), exc_info=exc)
        await abort_rpc(context, exc)

    @staticmethod
    async def _unimplemented(context: grpc.aio.ServicerContext, method: str, what: str) -> NoReturn:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED, f"this peer does not serve {method} (no {what} handler is set)"
        )
        raise AssertionError("context.abort returned")

    async def Health(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.HealthReply:
        try:
            _parse(pb.HealthRequest, raw)
            info = self._server.health()
        except Exception as exc:
            await self._fail(context, "Health", exc)
        return pb.HealthReply(
            alive=info.alive,
            protocol_version=PROTOCOL_VERSION,
            software_version=__version__,
            peer_id=self._server.identity.peer_id,
            run_id=info.run_id,
            round=info.round,
        )

    async def PushShard(
        self, raw_chunks: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> pb.PushAck:
        handler = self._server.exchange
        if handler is None:
            await self._unimplemented(context, "PushShard", "exchange")
        try:
            return await handler.push_shard(_parse_stream(raw_chunks, pb.Chunk), self._call(context))
        except Exception as exc:
            await self._fail(context, "PushShard", exc)

    async def PullResult(self, raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.Chunk]:
        handler = self._server.exchange
        if handler is None:
            await self._unimplemented(context, "PullResult", "exchange")
        replies: AsyncIterator[pb.Chunk] | None = None
        try:
            replies = handler.pull_result(_parse(pb.PullResultRequest, raw), self._call(context))
            async for chunk in replies:
                yield chunk
        except Exception as exc:
            await self._fail(context, "PullResult", exc)
        finally:
            await _close(replies)

    async def JoinGroup(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.JoinGroupReply]:
        handler = self._server.groups
        if handler is None:
            await self._unimplemented(context, "JoinGroup", "group")
        replies: AsyncIterator[pb.JoinGroupReply] | None = None
        try:
            replies = handler.join_group(_parse(pb.JoinGroupRequest, raw), self._call(context))
            async for reply in replies:
                yield reply
        except Exception as exc:
            await self._fail(context, "JoinGroup", exc)
        finally:
            await _close(replies)

    async def DownloadState(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StateReply]:
        handler = self._server.state
        if handler is None:
            await self._unimplemented(context, "DownloadState", "state")
        replies: AsyncIterator[pb.StateReply] | None = None
        try:
            replies = handler.download_state(_parse(pb.StateRequest, raw), self._call(context))
            async for reply in replies:
                yield reply
        except Exception as exc:
            await self._fail(context, "DownloadState", exc)
        finally:
            await _close(replies)

    async def CheckReachable(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ReachabilityReply:
        handler = self._server.reachability
        if handler is None:
            await self._unimplemented(context, "CheckReachable", "reachability")
        try:
            return await handler.check_reachable(_parse(pb.ReachabilityRequest, raw), self._call(context))
        except Exception as exc:
            await self._fail(context, "CheckReachable", exc)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """The service's method table; requests arrive as raw bytes and are parsed by the servicer."""
        return grpc.method_handlers_generic_handler(
            _SERVICE,
            {
                "Health": grpc.unary_unary_rpc_method_handler(self.Health, response_serializer=_serialize),
                "JoinGroup": grpc.unary_stream_rpc_method_handler(
                    self.JoinGroup, response_serializer=_serialize
                ),
                "PushShard": grpc.stream_unary_rpc_method_handler(
                    self.PushShard, response_serializer=_serialize
                ),
                "PullResult": grpc.unary_stream_rpc_method_handler(
                    self.PullResult, response_serializer=_serialize
                ),
                "DownloadState": grpc.unary_stream_rpc_method_handler(
                    self.DownloadState, response_serializer=_serialize
                ),
                "CheckReachable": grpc.unary_unary_rpc_method_handler(
                    self.CheckReachable, response_serializer=_serialize
                ),
            },
        )


def _endpoint(bind: str, port: int) -> str:
    """``host:port`` to dial this server on this machine (a wildcard bind is dialled on 127.0.0.1)."""
    host = bind.rpartition(":")[0]
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


class PeerServer:
    """One running gRPC server. Create with :meth:`start`; stop with :meth:`stop`.

    Attributes:
        port: the port actually bound (bind port 0 to let the OS choose).
        endpoint: ``"host:port"`` to dial it on this machine.
        identity: the peer this server speaks for (its id is in every Health reply).
        exchange, groups, state, reachability: the handlers; ``None`` answers ``UNIMPLEMENTED``.
    """

    def __init__(
        self,
        server: grpc.aio.Server,
        *,
        port: int,
        endpoint: str,
        identity: Identity,
        health: Callable[[], HealthInfo],
    ) -> None:
        self._server = server
        self.port = port
        self.endpoint = endpoint
        self.identity = identity
        self.health = health
        self.exchange: ExchangeHandler | None = None
        self.groups: GroupHandler | None = None
        self.state: StateHandler | None = None
        self.reachability: ReachabilityHandler | None = None
        self._stopped = False

    def __repr__(self) -> str:
        return f"PeerServer(endpoint={self.endpoint!r}, peer_id={self.identity.peer_id!r})"

    @classmethod
    async def start(
        cls,
        bind: str = "127.0.0.1:0",
        *,
        identity: Identity,
        tls: TlsMaterial | None = None,
        mutual_tls: bool = False,
        health: Callable[[], HealthInfo] | None = None,
        max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
    ) -> PeerServer:
        """Bind ``bind`` (``"host:port"``, port 0 for any), start serving, return the server.

        ``tls`` serves with the swarm certificate; ``mutual_tls`` also demands it from callers.
        Raises ``OSError`` when the address cannot be bound.
        """
        if max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be >= 1, got {max_concurrent_rpcs}")
        if mutual_tls and tls is None:
            raise ValueError("mutual_tls needs the swarm TLS material (tls=...)")
        options: list[tuple[str, Any]] = [*grpc_message_options(), ("grpc.so_reuseport", 0)]
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_concurrent_rpcs)
        try:
            if tls is None:
                port = server.add_insecure_port(bind)
            else:
                port = server.add_secure_port(bind, server_credentials(tls, mutual=mutual_tls))
        except RuntimeError as exc:  # grpc reports a failed bind as RuntimeError
            await server.stop(None)
            raise OSError(f"could not bind the gRPC server to {bind!r} (address in use or invalid)") from exc
        if not port:
            await server.stop(None)
            raise OSError(f"could not bind the gRPC server to {bind!r}")
        self = cls(
            server,
            port=port,
            endpoint=_endpoint(bind, port),
            identity=identity,
            health=health or HealthInfo,
        )
        server.add_generic_rpc_handlers((LioncubPeerServicer(self).generic_handler(),))
        await server.start()
        log.info("peer %s serving on %s (%s)", identity.peer_id, self.endpoint, "tls" if tls else "insecure")
        return self

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop accepting calls; give running ones ``grace`` seconds (None: cancel them now)."""
        if self._stopped:
            return
        self._stopped = True
        await self._server.stop(grace)
        log.info("peer %s stopped serving on %s", self.identity.peer_id, self.endpoint)

    async def __aenter__(self) -> PeerServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop(None)
