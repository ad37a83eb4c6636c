"""The follower's side of group assembly: one bounded ``JoinGroup`` call to one leader."""

from __future__ import annotations

import asyncio
import time

import grpc
import grpc.aio

from lioncub.peer._match_plan import ReadyPeer
from lioncub.peer.exchange import ChannelPool
from lioncub.protocol import GroupPlan, ProtocolError, check_group_announcement
from lioncub.protocol import lioncub_pb2 as pb
from lioncub.protocol.validate import show

__all__ = ["JoinFailed", "join_leader"]

_Status = pb.JoinGroupReply.Status
_MAX_REPLIES = 16  # ACCEPTED then one final reply; anything longer is a misbehaving leader


class JoinFailed(Exception):
    """Joining one leader failed; the message says why (unreachable, rejected, bad announcement...).

    ``leader_round`` is the round a rejecting leader said it is at (0: it did not say).
    """

    def __init__(self, message: str, leader_round: int = 0) -> None:
        super().__init__(message)
        self.leader_round = leader_round


async def join_leader(
    channels: ChannelPool,
    leader: ReadyPeer,
    request: pb.JoinGroupRequest,
    *,
    self_id: str,
    accept_deadline: float,
    deadline: float,
) -> GroupPlan:
    """Ask ``leader`` to join its group; return the checked plan or raise :class:`JoinFailed`.

    The leader must answer (ACCEPTED or a final reply) by ``accept_deadline`` and announce the
    group by ``deadline`` (both ``time.monotonic()``); the announcement must be signed by the
    leader, be for this run and round, and list this peer.
    """
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise JoinFailed("no time left")
    try:
        call = channels.stub(leader.info.endpoint).JoinGroup(request, timeout=remaining)
    except Exception as e:  # an endpoint grpc cannot parse must not crash matchmaking
        raise JoinFailed(f"cannot call {show(leader.info.endpoint)}: {e!r}") from e
    try:
        until = min(accept_deadline, deadline)
        for _ in range(_MAX_REPLIES):
            reply = await _read(call, until)
            if reply.status == _Status.STATUS_ACCEPTED:
                until = deadline
                continue
            if reply.status == _Status.STATUS_GROUP_READY:
                try:
                    return check_group_announcement(
                        reply.group,
                        run_id=request.run_id,
                        round=request.round,
                        self_id=self_id,
                        leader_id=leader.peer_id,
                    )
                except ProtocolError as e:
                    raise JoinFailed(f"invalid group announcement: {e}") from e
            name = _Status.Name(reply.status) if reply.status in _Status.values() else str(reply.status)
            leader_round = (
                reply.round if reply.status == _Status.STATUS_REJECTED and reply.round < 2**63 else 0
            )
            raise JoinFailed(
                f"{name.removeprefix('STATUS_').lower()}: {show(reply.reason, 200)}", leader_round
            )
        raise JoinFailed(f"sent more than {_MAX_REPLIES} replies without announcing a group")
    finally:
        call.cancel()


async def _read(call: grpc.aio.UnaryStreamCall, until: float) -> pb.JoinGroupReply:
    remaining = until - time.monotonic()
    if remaining <= 0:
        raise JoinFailed("timed out waiting for the leader")
    try:
        reply = await asyncio.wait_for(call.read(), remaining)
    except TimeoutError:
        raise JoinFailed(f"no answer within {remaining:.2f} s") from None
    except grpc.RpcError as e:
        raise JoinFailed(f"{_code_name(e)}: {show(_details(e), 200)}") from None
    if reply is grpc.aio.EOF:
        raise JoinFailed("the stream ended without a group")
    if not isinstance(reply, pb.JoinGroupReply):
        raise JoinFailed(f"unexpected reply type {type(reply).__name__}")
    return reply


def _code_name(error: grpc.RpcError) -> str:
    code = error.code() if isinstance(error, grpc.aio.AioRpcError) else None
    return code.name if code is not None else type(error).__name__


def _details(error: grpc.RpcError) -> str | None:
    return error.details() if isinstance(error, grpc.aio.AioRpcError) else str(error)
