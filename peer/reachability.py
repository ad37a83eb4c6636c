"""NAT detection by dial-back: can the rest of the swarm open a connection to this peer's server?

A peer behind NAT (a home router, a cloud VM without an open port) can dial out but accepts no
connections, so it must take part in *client mode*: it owns no shard, leads no group and serves
nobody's state download. Before going live a peer asks up to :data:`PROBES` reachable peers from
the registry to dial it back (``CheckReachable``):

* the checker dials the caller's **observed** address (the source address of the call, never a
  host named in the request) on the port the caller gave, and calls ``Health`` there;
* it answers ``reachable`` only when that Health reply names the caller's peer id.

The verdict (:func:`probe_reachability`) is *reachable* as soon as one checker succeeds, *not
reachable* when every checker that answered failed, and *unknown* when nobody answered (the first
peer of a swarm; checkers too old to serve the RPC) — unknown keeps the peer in server mode.

The checker's side (:class:`DialBack`) bounds the work one caller can cause: at most
:data:`MAX_CONCURRENT` dial-backs at a time (more are refused with ``UNAVAILABLE``), each bounded
by :data:`DIAL_TIMEOUT_S`, to the caller's own address only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import grpc.aio

from lioncub.protocol import InvalidMessage, Unavailable, grpc_message_options
from lioncub.protocol import lioncub_pb2 as pb
from lioncub.protocol import lioncub_pb2_grpc as pb_grpc
from lioncub.protocol.validate import check_id

from .server import CallInfo

__all__ = [
    "DIAL_TIMEOUT_S",
    "MAX_CONCURRENT",
    "PROBES",
    "Busy",
    "DialBack",
    "Reachability",
    "observed_host",
    "probe_reachability",
]

log = logging.getLogger(__name__)

#: Seconds a checker waits for the dialled Health answer.
DIAL_TIMEOUT_S = 3.0
#: Dial-backs one checker runs at once.
MAX_CONCURRENT = 4
#: Checkers a peer asks.
PROBES = 3


class Busy(Unavailable):
    """Too many dial-backs are running; try another peer (``UNAVAILABLE``)."""


def observed_host(transport_peer: str) -> str | None:
    """The dialable host in a gRPC transport address, or None (``"ipv4:1.2.3.4:5"`` -> ``"1.2.3.4"``).

    IPv6 hosts come back bracketed (``"[::1]"``) so that ``f"{host}:{port}"`` is a valid target.
    """
    kind, _, rest = transport_peer.partition(":")
    host = rest.rpartition(":")[0]
    if kind == "ipv6":
        host = host.strip("[]")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    if kind not in ("ipv4", "ipv6") or (kind == "ipv4") != (addr.version == 4):
        return None
    return f"[{addr}]" if addr.version == 6 else str(addr)


class DialBack:
    """The checker's side of ``CheckReachable`` (set as ``PeerServer.reachability``)."""

    def __init__(self, *, timeout: float = DIAL_TIMEOUT_S, max_concurrent: int = MAX_CONCURRENT) -> None:
        if timeout <= 0 or max_concurrent < 1:
            raise ValueError("DialBack needs timeout > 0 and max_concurrent >= 1")
        self.timeout = timeout
        self._slots = asyncio.Semaphore(max_concurrent)

    async def check_reachable(self, request: pb.ReachabilityRequest, call: CallInfo) -> pb.ReachabilityReply:
        """Dial ``observed host:request.port``; answer whether the caller's own server replied."""
        if not 1 <= request.port <= 65535:
            raise InvalidMessage(f"port must be in 1..65535, got {request.port}")
        check_id("peer_id", request.peer_id)
        host = observed_host(call.peer)
        if host is None:
            raise InvalidMessage(f"cannot dial back a caller at {call.peer!r:.80}")
        if self._slots.locked():
            raise Busy("too many reachability checks running; ask another peer")
        async with self._slots:
            detail = await self._dial(f"{host}:{request.port}", request.peer_id, call)
        return pb.ReachabilityReply(reachable=not detail, observed_host=host, detail=detail)

    async def _dial(self, target: str, peer_id: str, call: CallInfo) -> str:
        """``""`` when Health at ``target`` names ``peer_id``; else why not."""
        async with grpc.aio.insecure_channel(target, options=grpc_message_options()) as channel:
            try:
                reply = await pb_grpc.LioncubPeerStub(channel).Health(
                    pb.HealthRequest(), timeout=call.bound(self.timeout)
                )
            except grpc.aio.AioRpcError as exc:
                return f"dialling {target} failed: {exc.code().name}"
        if reply.peer_id != peer_id:
            return f"{target} answers as another peer"
        return ""


@dataclass(frozen=True)
class Reachability:
    """The verdict of :func:`probe_reachability`.

    Attributes:
        reachable: True (a checker reached us), False (every checker that answered failed to),
            None (no checker answered: keep serving).
        observed_host: our address as the first answering checker saw it ("" if none answered).
        answers: ``(checker endpoint, reachable, detail)`` per checker that answered.
    """

    reachable: bool | None
    observed_host: str
    answers: tuple[tuple[str, bool, str], ...]


async def probe_reachability(
    checkers: Sequence[str], *, port: int, peer_id: str, timeout: float = 2 * DIAL_TIMEOUT_S
) -> Reachability:
    """Ask up to :data:`PROBES` of ``checkers`` (``host:port``) at once to dial us back at ``port``."""

    async def ask(endpoint: str) -> tuple[str, pb.ReachabilityReply | None]:
        async with grpc.aio.insecure_channel(endpoint, options=grpc_message_options()) as channel:
            try:
                reply = await pb_grpc.LioncubPeerStub(channel).CheckReachable(
                    pb.ReachabilityRequest(port=port, peer_id=peer_id), timeout=timeout
                )
            except grpc.aio.AioRpcError as exc:
                log.info("reachability check by %s gave no answer: %s", endpoint, exc.code().name)
                return endpoint, None
        return endpoint, reply

    results = await asyncio.gather(*(ask(e) for e in list(checkers)[:PROBES]))
    answers = tuple((e, r.reachable, r.detail) for e, r in results if r is not None)
    observed = next((r.observed_host for _, r in results if r is not None), "")
    if not answers:
        return Reachability(None, "", ())
    return Reachability(any(ok for _, ok, _ in answers), observed, answers)
