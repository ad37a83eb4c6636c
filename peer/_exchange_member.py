"""Member side of one remote shard: push this peer's part to the owner, then pull the reduced shard.

Both calls go from the member to the owner, so a client-mode member (which accepts no
connections) takes part unchanged. Every call has a deadline; every failure is returned as data
(:class:`RemoteShard.failure`), never raised, so that one bad owner cannot break a round.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import torch

from lioncub.optim.codec import Encoded
from lioncub.optim.reducers import Reducer
from lioncub.protocol import (
    PROTOCOL_VERSION,
    GroupPlan,
    ProtocolError,
    chunk_payload,
    receive_payload,
    sign_message,
)
from lioncub.protocol import lioncub_pb2 as pb

from ._exchange_hub import ExchangeHub
from ._exchange_slots import Traffic, wire_size

__all__ = ["RemoteShard", "exchange_with_owner"]

log = logging.getLogger(__name__)

_QUICK_FAILURE_S = 0.05  # an UNAVAILABLE this fast is a connection problem, not a long-poll timeout
_MAX_BACKOFF_S = 0.5


@dataclass
class RemoteShard:
    """What became of one shard owned by another member.

    Attributes:
        values: the decoded float32 result, or None when the shard must fall back locally.
        failure: why there is no result (None when there is one).
        pushed_at, pulled_at: ``time.monotonic()`` when the push was acknowledged / the result
            decoded (None if that did not happen).
    """

    values: torch.Tensor | None = None
    failure: str | None = None
    pushed_at: float | None = None
    pulled_at: float | None = None


class _Failed(Exception):
    """Internal: this shard has no result; the message says why."""


def _rpc_failure(what: str, exc: grpc.aio.AioRpcError) -> _Failed:
    return _Failed(f"{what}: {exc.code().name}: {exc.details()}")


async def _counted_out(chunks: Iterable[pb.Chunk], traffic: Traffic) -> AsyncIterator[pb.Chunk]:
    for chunk in chunks:
        traffic.sent += wire_size(chunk)
        yield chunk


async def _counted_in(call: AsyncIterator[pb.Chunk], traffic: Traffic) -> AsyncIterator[pb.Chunk]:
    async for chunk in call:
        traffic.received += wire_size(chunk)
        yield chunk


async def _push(stub: Any, chunks: list[pb.Chunk], until: float, traffic: Traffic) -> None:
    timeout = until - time.monotonic()
    if timeout <= 0:
        raise _Failed("no time left to push before the group's deadline")
    try:
        ack = await stub.PushShard(_counted_out(chunks, traffic), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise _rpc_failure("push failed", exc) from None
    traffic.received += wire_size(ack)


async def _pull(
    hub: ExchangeHub, stub: Any, plan: GroupPlan, exchange: str, index: int, until: float, traffic: Traffic
) -> Encoded:
    """Ask the owner for the result until it comes, the owner refuses, or ``until`` passes."""
    expectation = plan.result_expectation(exchange, index)
    backoff = 0.02
    while True:
        remaining = until - time.monotonic()
        if remaining <= 0:
            raise _Failed("no result before the deadline")
        request = pb.PullResultRequest(
            protocol_version=PROTOCOL_VERSION,
            run_id=plan.run_id,
            round=plan.round,
            group_id=plan.group_id,
            exchange=exchange,
            shard_index=index,
            requester_id=hub.identity.peer_id,
            wait_ms=int(min(remaining, hub.config.max_pull_wait_s) * 1000),
        )
        sign_message(request, hub.identity)
        traffic.sent += wire_size(request)
        started = time.monotonic()
        call = stub.PullResult(request, timeout=remaining)
        try:
            result, _ = await receive_payload(
                _counted_in(call, traffic), expectation, codec_lookup=hub.codec_lookup
            )
            return result
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise _rpc_failure("pull failed", exc) from None
            if time.monotonic() - started < _QUICK_FAILURE_S:  # owner unreachable: back off
                await asyncio.sleep(min(backoff, max(0.0, until - time.monotonic())))
                backoff = min(2 * backoff, _MAX_BACKOFF_S)
        except ProtocolError as exc:
            raise _Failed(f"owner sent an invalid result: {exc}") from None
        finally:
            call.cancel()


def _decode(reducer: Reducer, result: Encoded, numel: int) -> torch.Tensor:
    try:
        values = reducer.decode(result)
    except ValueError as exc:
        raise _Failed(f"result does not decode: {exc}") from None
    if values.dim() != 1 or values.numel() != numel:
        raise _Failed(f"result decodes to {tuple(values.shape)}, the shard has {numel} elements")
    return values.to(torch.float32)


async def exchange_with_owner(
    hub: ExchangeHub,
    plan: GroupPlan,
    exchange: str,
    index: int,
    part: Encoded,
    weight: int,
    reducer: Reducer,
    *,
    push_until: float,
    until: float,
    traffic: Traffic,
) -> RemoteShard:
    """Push ``part`` to the owner of shard ``index``, pull and decode the result (never raises)."""
    shard = plan.shard(index)
    outcome = RemoteShard()
    try:
        endpoint = plan.members[shard.owner_id].endpoint
        stub = hub.channels.stub(endpoint)
        key = plan.key(pb.PURPOSE_PUSH, exchange, index)
        chunks = await asyncio.to_thread(
            chunk_payload,
            key,
            part,
            hub.identity,
            weight=float(weight),
            contributors=1,
            chunk_bytes=hub.config.chunk_bytes,
        )
        await _push(stub, chunks, push_until, traffic)
        outcome.pushed_at = time.monotonic()
        result = await _pull(hub, stub, plan, exchange, index, until, traffic)
        outcome.values = await asyncio.to_thread(_decode, reducer, result, shard.numel)
        outcome.pulled_at = time.monotonic()
    except _Failed as exc:
        outcome.failure = str(exc)
    except Exception as exc:  # a failed shard is data: fall back, report, go on
        log.warning("round %d: shard %d of %r failed unexpectedly", plan.round, index, exchange, exc_info=exc)
        outcome.failure = f"unexpected {type(exc).__name__}: {exc}"
    if outcome.failure is not None:
        log.info(
            "round %d: shard %d of %r (owner %s) falls back locally: %s",
            plan.round,
            index,
            exchange,
            shard.owner_id,
            outcome.failure,
        )
    return outcome
