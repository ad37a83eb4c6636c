"""The group exchange: reduce-scatter + all-gather of one vector over gRPC, for one agreed group.

Every member of a :class:`~lioncub.protocol.GroupPlan` calls :func:`run_exchange` with its own
full-length vector. For every shard owned by another member it pushes its encoded slice
(``PushShard``, signed chunks) and then pulls the reduced shard (``PullResult``); shards go to
their owners concurrently. For the shard it owns, its :class:`ExchangeHub` (registered on its
:class:`~lioncub.peer.server.PeerServer`) collects the other members' slices, reduces them once
when all arrived or at the group's deadline, and serves the result. Every data transfer starts
at the non-owner, so client-mode members take part without accepting connections.

Failures are data: a shard whose owner is dead, refuses, or does not answer in time falls back to
this peer's own contribution (``reducer.local_fallback``) and is reported in
:attr:`ExchangeOutcome.missing_owners`; members that did not contribute to this peer's shard in
time are reported in :attr:`ExchangeOutcome.left_out`. A half-received shard is never used.

Example (one member; every member runs the same with its own vector)::

    hub = ExchangeHub(identity, run_id)
    server.exchange = hub
    plan = check_group_announcement(announcement, run_id=run_id, round=r, self_id=identity.peer_id)
    outcome = await run_exchange(hub, plan, "update", vec, strategy, samples, deadline=time.time() + 30)
    strategy.apply(state, outcome.update, delta)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lioncub.optim.codec import Encoded
from lioncub.optim.reducers import Reducer
from lioncub.protocol import GroupPlan, ProtocolError
from lioncub.protocol import lioncub_pb2 as pb
from lioncub.protocol.validate import check_id

from ._exchange_channels import ChannelPool
from ._exchange_hub import ExchangeHub, HubConfig
from ._exchange_member import RemoteShard, exchange_with_owner
from ._exchange_slots import (
    GRPC_PREFIX_BYTES,
    DuplicateContribution,
    LatePush,
    ShardSlot,
    SlotKey,
    SlotState,
    Traffic,
    wire_size,
)

__all__ = [
    "GRPC_PREFIX_BYTES",
    "ChannelPool",
    "DuplicateContribution",
    "ExchangeHub",
    "ExchangeOutcome",
    "ExchangeTimings",
    "HubConfig",
    "LatePush",
    "ShardSlot",
    "SlotKey",
    "SlotState",
    "run_exchange",
    "wire_size",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExchangeTimings:
    """Seconds from the start of :func:`run_exchange`.

    Attributes:
        encode_s: this peer's vector encoded (all shards).
        push_s: the last push acknowledged (0 when nothing was pushed).
        reduce_s: this peer's own shard reduced (None when it owns none).
        pull_s: the last remote result received and decoded (0 when none was).
        total_s: the outcome ready (after serving this peer's shard, see ``HubConfig.serve_wait``).
    """

    encode_s: float
    push_s: float
    reduce_s: float | None
    pull_s: float
    total_s: float


@dataclass(frozen=True)
class ExchangeOutcome:
    """What one member got out of one exchange.

    Attributes:
        exchange, round, group_id: which exchange this was.
        update: the agreed float32 vector (``plan.total_numel`` elements): the decoded results,
            shard by shard, and this peer's local fallback for shards in ``missing_owners``.
        missing_owners: owners (peer ids) whose shard fell back to the local value.
        failures: owner peer id -> why its shard fell back.
        left_out: members whose contribution this peer's own shard did not include (they
            were late, failed, or never sent); empty when this peer owns no shard.
        bytes_sent, bytes_received: gRPC message bytes this peer moved for this exchange (every
            chunk, request, ack and reply: serialized size plus the 5-byte gRPC prefix), as a member
            and as the owner of its shard.
        timings: when each phase finished.
    """

    exchange: str
    round: int
    group_id: str
    update: torch.Tensor
    missing_owners: tuple[str, ...]
    failures: Mapping[str, str]
    left_out: tuple[str, ...]
    bytes_sent: int
    bytes_received: int
    timings: ExchangeTimings

    @property
    def complete(self) -> bool:
        """Every shard came from its owner (no local fallback)."""
        return not self.missing_owners


def _encode_shards(
    reducer: Reducer, vec: torch.Tensor, shards: Sequence[pb.ShardAssignment]
) -> list[Encoded]:
    """This peer's part of every shard, on the CPU (where the wire and the other parts are)."""
    parts = [reducer.encode(vec[s.offset : s.offset + s.numel]) for s in shards]
    return [p if p.data.device.type == "cpu" else Encoded(p.codec, p.numel, p.data.cpu()) for p in parts]


def _check_args(hub: ExchangeHub, plan: GroupPlan, exchange: str, own_vec: torch.Tensor, weight: int) -> None:
    try:
        check_id("exchange", exchange)
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None
    if plan.run_id != hub.run_id:
        raise ValueError(f"the plan is for run {plan.run_id!r}, the hub for run {hub.run_id!r}")
    if hub.identity.peer_id not in plan.members:
        raise ValueError(f"this peer ({hub.identity.peer_id}) is not a member of group {plan.group_id}")
    if own_vec.dim() != 1 or own_vec.numel() != plan.total_numel:
        raise ValueError(
            f"own_vec must be a 1-D tensor of {plan.total_numel} elements, got shape {tuple(own_vec.shape)}"
        )
    if not own_vec.is_floating_point():
        raise ValueError(f"own_vec must be a float tensor, got {own_vec.dtype}")
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 0:
        raise ValueError(f"weight must be a whole number of samples >= 0, got {weight!r}")


def _assemble(
    plan: GroupPlan,
    reducer: Reducer,
    parts: Sequence[Encoded],
    weight: int,
    results: Mapping[int, tuple[torch.Tensor | None, str | None]],
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, str]]:
    """The full update: each shard's result, or this peer's local fallback where there is none."""
    update = torch.empty(plan.total_numel, dtype=torch.float32, device=device)
    failures: dict[str, str] = {}
    for s in plan.shards:
        values, failure = results[s.index]
        if values is None:
            failures[s.owner_id] = failure or "no result"
            values = reducer.decode(reducer.local_fallback(parts[s.index], weight))
        update[s.offset : s.offset + s.numel] = values.to(device=device, dtype=torch.float32)
    return update, failures


async def _own_shard(
    slot: ShardSlot, reducer: Reducer, until: float
) -> tuple[torch.Tensor | None, str | None]:
    """This peer's own shard: the result once reduced (forced at ``until`` at the latest)."""
    if not await slot.wait_done(max(0.0, until - time.monotonic())):
        slot.close()  # this peer stops waiting: reduce what arrived
        await slot.wait_done(None)  # local computation, finite
    if slot.state is SlotState.DISCARDED:
        return None, "the shard was discarded before it was reduced"
    if slot.error is not None or slot.result is None:
        return None, slot.error or "no result"
    values = await asyncio.to_thread(reducer.decode, slot.result)
    return values.to(torch.float32), None


async def run_exchange(
    hub: ExchangeHub,
    plan: GroupPlan,
    exchange: str,
    own_vec: torch.Tensor,
    reducer: Reducer,
    weight: int,
    *,
    deadline: float,
) -> ExchangeOutcome:
    """Run one exchange of ``own_vec`` in the group ``plan`` and return the agreed vector.

    Args:
        hub: this peer's hub (identity, channels, and the owner side on its server).
        plan: the checked group announcement every member agreed on.
        exchange: the exchange's name ("update", "momentum", "params", ...).
        own_vec: this peer's full 1-D float vector (``plan.total_numel`` elements).
        reducer: how to encode / reduce / decode (a ``SyncStrategy`` or a ``MeanReducer``).
        weight: samples behind this peer's contribution (an integer >= 0).
        deadline: wall-clock time (unix seconds, like ``plan.deadline_ms / 1000``) by which the
            exchange returns whatever happens; every call is bounded by it, but it is never earlier
            than the group's deadline plus ``HubConfig.pull_grace_s`` (owners that waited for a
            missing member reduce at the group's deadline). Pushes stop at the group's deadline
            (plus ``HubConfig.push_grace_s``).

    Raises ``ValueError`` for arguments that do not fit the plan; network failures never raise.
    """
    _check_args(hub, plan, exchange, own_vec, weight)
    me = hub.identity.peer_id
    start, wall = time.monotonic(), time.time()
    group_end = start + (plan.deadline_ms / 1000.0 - wall)
    until = max(start + (deadline - wall), group_end + hub.config.pull_grace_s)
    push_until = min(until, group_end + hub.config.push_grace_s)

    parts = await asyncio.to_thread(_encode_shards, reducer, own_vec.detach(), plan.shards)
    encoded_at = time.monotonic()
    own = next((s.index for s in plan.shards if s.owner_id == me), None)
    slot = None if own is None else hub.open_slot(plan, exchange, own, reducer, parts[own], weight)

    traffic = Traffic()
    remote: dict[int, asyncio.Task[RemoteShard]] = {}
    async with asyncio.TaskGroup() as tasks:
        for s in plan.shards:
            if s.index != own:
                remote[s.index] = tasks.create_task(
                    exchange_with_owner(
                        hub,
                        plan,
                        exchange,
                        s.index,
                        parts[s.index],
                        weight,
                        reducer,
                        push_until=push_until,
                        until=until,
                        traffic=traffic,
                    )
                )
        own_values, own_failure = (None, None) if slot is None else await _own_shard(slot, reducer, until)
        reduced_at = None if slot is None else time.monotonic()

    results: dict[int, tuple[torch.Tensor | None, str | None]] = {
        index: (task.result().values, task.result().failure) for index, task in remote.items()
    }
    if own is not None:
        results[own] = (own_values, own_failure)
    # off the event loop: filling a fresh full-length vector costs page faults on large models
    update, failures = await asyncio.to_thread(
        _assemble, plan, reducer, parts, weight, results, own_vec.device
    )

    left_out: tuple[str, ...] = ()
    if slot is not None:
        if hub.config.serve_wait:
            await slot.wait_served(max(0.0, until - time.monotonic()))
        if slot.state is SlotState.DONE:
            left_out = tuple(m for m in plan.members if m not in slot.contributors)
    shards = [r.result() for r in remote.values()]
    pushed = [r.pushed_at for r in shards if r.pushed_at is not None]
    pulled = [r.pulled_at for r in shards if r.pulled_at is not None]
    end = time.monotonic()
    outcome = ExchangeOutcome(
        exchange=exchange,
        round=plan.round,
        group_id=plan.group_id,
        update=update,
        missing_owners=tuple(o for o in (s.owner_id for s in plan.shards) if o in failures),
        failures=failures,
        left_out=left_out,
        bytes_sent=traffic.sent + (slot.traffic.sent if slot else 0),
        bytes_received=traffic.received + (slot.traffic.received if slot else 0),
        timings=ExchangeTimings(
            encode_s=encoded_at - start,
            push_s=max(pushed, default=start) - start,
            reduce_s=None if reduced_at is None else reduced_at - start,
            pull_s=max(pulled, default=start) - start,
            total_s=end - start,
        ),
    )
    log.info(
        "peer %s round %d: %s exchange in group %s done in %.3f s: %d/%d shard(s) from owners,"
        " %d left out, %d B sent, %d B received",
        me,
        plan.round,
        exchange,
        plan.group_id,
        outcome.timings.total_s,
        len(plan.shards) - len(failures),
        len(plan.shards),
        len(left_out),
        outcome.bytes_sent,
        outcome.bytes_received,
    )
    return outcome
