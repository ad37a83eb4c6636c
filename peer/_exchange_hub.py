"""The owner side of every exchange a peer takes part in: routing pushes and pulls to shard slots.

:class:`ExchangeHub` is the :class:`~lioncub.peer.server.ExchangeHandler` a peer registers on its
server. It keeps a :class:`~lioncub.peer._exchange_slots.ShardSlot` per (round, group, exchange,
shard) this peer owns, opened by :func:`lioncub.peer.exchange.run_exchange` when the peer enters the
round, and discards the slots of rounds older than ``HubConfig.retain_rounds`` (bounded memory).

Routing of a push (by its first chunk's header, before anything is trusted):

* wrong version / run / purpose / malformed ids → refused at once;
* a slot exists → the chunks go through a :class:`~lioncub.protocol.Reassembler` built from the
  slot's expectation (signature, membership, sizes, digest: never a half-received shard);
* no slot, round older than the hub's round → ``StaleRound`` (late message or replay);
* no slot yet, current or later round → wait (bounded by ``HubConfig.open_wait_s`` and the
  caller's deadline) for this peer to enter that round, then ``FutureRound`` / ``UnknownGroup``.

Memory and time bounds of push streams (see ``docs/RELIABILITY.md``, "Malformed input and memory
bounds"): every message is at most ``MAX_MESSAGE_BYTES`` (gRPC refuses larger ones unread). A
stream's first chunk, until its signature is checked and the stream has room in the main budget, is
held against ``HubConfig.max_unverified_bytes`` (refused at once when full: unauthenticated data
never waits). Once verified, the stream holds its whole declared payload (exactly what the codec
produces for the shard: never attacker-sized) against ``HubConfig.max_buffered_bytes``, waiting for
room if needed (flow control: it reads no further chunks meanwhile). Both are
:class:`~lioncub.peer._exchange_budget.ByteBudget` s, so the push bytes all streams buffer at once stay
within ``max_unverified_bytes + max(max_buffered_bytes, one shard payload)`` (the last chunk's join
doubles one payload for an instant). A stream must deliver each chunk within
``HubConfig.chunk_timeout_s`` and finish within ``HubConfig.max_push_s`` and before its slot closes,
or it is cut off (``RESOURCE_EXHAUSTED``).

The hub also holds the peer's identity and its pool of outgoing channels, which the member side
of :func:`~lioncub.peer.exchange.run_exchange` uses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from lioncub.optim.codec import Encoded
from lioncub.optim.reducers import Reducer
from lioncub.protocol import (
    MAX_CHUNK_BYTES,
    ChunkOrderError,
    FutureRound,
    GroupPlan,
    Identity,
    InvalidMessage,
    PreconditionFailed,
    Reassembler,
    StaleRound,
    TlsMaterial,
    TooLarge,
    Unavailable,
    UnknownGroup,
    check_pull_request,
    check_run,
)
from lioncub.protocol import lioncub_pb2 as pb
from lioncub.protocol.validate import CodecLookup, check_id, check_version, show

from ._exchange_budget import BufferHold, ByteBudget, next_chunk
from ._exchange_channels import ChannelPool
from ._exchange_slots import ShardSlot, SlotKey, SlotState, wire_size
from .server import CallInfo, ExchangeHandler

__all__ = ["ExchangeHub", "HubConfig"]

log = logging.getLogger(__name__)

_MAX_WEIGHT = float(1 << 53)  # weights travel as doubles: integers up to 2**53 are exact


@dataclass(frozen=True)
class HubConfig:
    """Settings of one peer's exchanges.

    Attributes:
        retain_rounds: rounds whose slots are kept (the newest ones); older slots are discarded
            and pushes / pulls for them answer ``FAILED_PRECONDITION`` (stale).
        open_wait_s: how long a push or pull for a slot this peer has not opened yet may wait for
            it (this peer may enter the round a little later than its group mates).
        max_pull_wait_s: longest an owner holds a pull waiting for its result.
        chunk_bytes: payload bytes per chunk this peer sends (at most 1 MiB).
        push_grace_s: how long after the group's deadline a member keeps pushing (clock skew).
        pull_grace_s: how long after the group's deadline a member still waits for an owner's
            result: an owner missing a contribution (a member died after the group formed) reduces
            what it has at the deadline, and its result must still reach the others.
        serve_wait: whether an owner's :func:`run_exchange` waits (until its deadline) for every
            contributor to pull its shard before returning, so that the outcome's byte counts are
            complete. Serving goes on either way while the round's slots are retained.
        max_waiting: calls that may wait for a slot at once (each holds one unverified chunk of
            up to 1 MiB); more are refused with ``RESOURCE_EXHAUSTED``.
        max_buffered_bytes: push payload bytes all verified streams may buffer at once (see the
            module docstring); a stream that does not fit waits for room.
        max_unverified_bytes: first-chunk bytes held before their signature is checked (or while
            their stream waits for room); a chunk that does not fit is refused at once.
        chunk_timeout_s: longest wait for the next chunk of a push stream (the first included).
        max_push_s: longest a push stream may last; it is also cut off when its slot closes.
    """

    retain_rounds: int = 2
    open_wait_s: float = 10.0
    max_pull_wait_s: float = 30.0
    chunk_bytes: int = MAX_CHUNK_BYTES
    push_grace_s: float = 0.5
    pull_grace_s: float = 2.0
    serve_wait: bool = True
    max_waiting: int = 64
    max_buffered_bytes: int = 256 << 20
    max_unverified_bytes: int = 32 << 20
    chunk_timeout_s: float = 10.0
    max_push_s: float = 120.0

    def __post_init__(self) -> None:
        if self.retain_rounds < 1:
            raise ValueError(f"retain_rounds must be >= 1, got {self.retain_rounds}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if not 0 < self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in 1..{MAX_CHUNK_BYTES}, got {self.chunk_bytes}")
        if self.max_buffered_bytes < MAX_CHUNK_BYTES:
            raise ValueError(
                f"max_buffered_bytes must be >= {MAX_CHUNK_BYTES}, got {self.max_buffered_bytes}"
            )
        for name in ("open_wait_s", "max_pull_wait_s", "push_grace_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("chunk_timeout_s", "max_push_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def _push_weight(header: pb.ChunkHeader) -> int:
    """The integer sample count behind a push (finite and >= 0 was checked by the reassembler)."""
    if header.contributors != 1:
        raise InvalidMessage(f"a push carries one contribution, header says {header.contributors}")
    w = header.weight
    if w != int(w) or w > _MAX_WEIGHT:
        raise InvalidMessage(f"push weight must be a whole number of samples <= 2**53, got {w!r}")
    return int(w)


class ExchangeHub:
    """One peer's shard slots and channels; the exchange handler of its :class:`PeerServer`."""

    def __init__(
        self,
        identity: Identity,
        run_id: str,
        *,
        tls: TlsMaterial | None = None,
        mutual_tls: bool = False,
        config: HubConfig | None = None,
        codec_lookup: CodecLookup | None = None,
    ) -> None:
        check_id("run_id", run_id)
        self.identity = identity
        self.run_id = run_id
        self.config = config or HubConfig()
        self.codec_lookup = codec_lookup
        self.channels = ChannelPool(tls, mutual=mutual_tls)
        self._slots: dict[SlotKey, ShardSlot] = {}
        self._plans: dict[tuple[int, str], GroupPlan] = {}
        self._round: int | None = None
        self._changed = asyncio.Event()
        self._waiting = 0
        self._budget = ByteBudget(self.config.max_buffered_bytes)
        self._unverified = ByteBudget(self.config.max_unverified_bytes)

    def __repr__(self) -> str:
        return f"ExchangeHub(peer_id={self.identity.peer_id!r}, run_id={self.run_id!r}, round={self._round})"

    @property
    def round(self) -> int | None:
        """The newest round this peer entered (None before the first)."""
        return self._round

    @property
    def buffered_bytes(self) -> int:
        """Push bytes held by the streams being received now, verified or not (module docstring)."""
        return self._budget.used + self._unverified.used

    @property
    def peak_buffered_bytes(self) -> int:
        """The most push bytes held at once since the hub was made (verified peak + unverified peak)."""
        return self._budget.peak + self._unverified.peak

    def slot(self, key: SlotKey) -> ShardSlot | None:
        """The slot of a shard this peer owns, while its round is retained."""
        return self._slots.get(key)

    @property
    def slot_keys(self) -> frozenset[SlotKey]:
        """Every slot held now (at most ``retain_rounds`` rounds' worth)."""
        return frozenset(self._slots)

    # --- opening and discarding ------------------------------------------------------------------

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def enter_round(self, round: int) -> None:
        """Advance to ``round`` (no-op for an older one) and discard rounds no longer retained."""
        if self._round is not None and round <= self._round:
            return
        self._round = round
        oldest = round - self.config.retain_rounds + 1
        for key in [k for k in self._slots if k.round < oldest]:
            self._slots.pop(key).discard()
        for plan_key in [k for k in self._plans if k[0] < oldest]:
            del self._plans[plan_key]
        self._notify()

    def open_slot(
        self,
        plan: GroupPlan,
        exchange: str,
        shard_index: int,
        reducer: Reducer,
        own_part: Encoded,
        own_weight: int,
    ) -> ShardSlot:
        """Start collecting contributions for a shard this peer owns (entering ``plan.round``)."""
        check_run(plan.run_id, self.run_id, "group plan")
        if self._round is not None and plan.round <= self._round - self.config.retain_rounds:
            raise ValueError(
                f"round {plan.round} is no longer retained (this peer is at round {self._round})"
            )
        key = SlotKey(plan.round, plan.group_id, exchange, shard_index)
        if key in self._slots:
            raise ValueError(f"{key.describe()} is already open")
        self.enter_round(plan.round)
        slot = ShardSlot(
            key, plan, self.identity, reducer, own_part, own_weight, chunk_bytes=self.config.chunk_bytes
        )
        self._slots[key] = slot
        self._plans[(plan.round, plan.group_id)] = plan
        self._notify()
        return slot

    async def close(self) -> None:
        """Discard every slot and close every outgoing channel."""
        for slot in self._slots.values():
            slot.discard()
        self._slots.clear()
        self._plans.clear()
        self._notify()
        await self.channels.close()

    # --- routing ---------------------------------------------------------------------------------

    async def _find_slot(self, key: SlotKey, call: CallInfo) -> ShardSlot:
        slot = self._slots.get(key)
        if slot is not None:
            return slot
        if self._waiting >= self.config.max_waiting:
            raise TooLarge(
                f"{key.describe()}: {self._waiting} calls already wait for slots to open here; retry later"
            )
        self._waiting += 1
        try:
            return await self._wait_for_slot(key, call)
        finally:
            self._waiting -= 1

    async def _wait_for_slot(self, key: SlotKey, call: CallInfo) -> ShardSlot:
        until = time.monotonic() + call.bound(self.config.open_wait_s)
        while True:
            slot = self._slots.get(key)
            if slot is not None:
                return slot
            plan = self._plans.get((key.round, key.group_id))
            if plan is not None and not (
                key.shard_index < len(plan.shards)
                and plan.shards[key.shard_index].owner_id == self.identity.peer_id
            ):
                raise InvalidMessage(f"this peer does not own {key.describe()}")
            if self._round is not None and key.round < self._round:
                raise StaleRound(
                    f"{key.describe()}: round {key.round} is over here (this peer is at round"
                    f" {self._round}); stale or replayed"
                )
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                break
        if self._round is None or key.round > self._round:
            raise FutureRound(
                f"{key.describe()}: this peer has not reached round {key.round}"
                f" (it is at round {self._round}); retry later"
            )
        raise UnknownGroup(f"{key.describe()} is not open on this peer")

    def _route(self, version: int, run_id: str, group_id: str, exchange: str, what: str) -> None:
        check_version(version, what)
        check_run(run_id, self.run_id, what)
        check_id("group_id", group_id)
        check_id("exchange", exchange)

    # --- ExchangeHandler -------------------------------------------------------------------------

    async def push_shard(self, chunks: AsyncIterator[pb.Chunk], call: CallInfo) -> pb.PushAck:
        """Take one member's contribution to a shard this peer owns."""
        hold, first_hold = BufferHold(self._budget), BufferHold(self._unverified)
        try:
            return await self._receive_push(aiter(chunks), call, hold, first_hold)
        finally:
            hold.release()
            first_hold.release()

    async def _receive_push(
        self, items: AsyncIterator[pb.Chunk], call: CallInfo, hold: BufferHold, first_hold: BufferHold
    ) -> pb.PushAck:
        loop = asyncio.get_running_loop()
        cfg = self.config
        stream_end = loop.time() + cfg.max_push_s
        first = await next_chunk(items, stream_end, cfg.chunk_timeout_s, "push")
        if first is None:
            raise ChunkOrderError("push stream ended before its first chunk")
        first_hold.resize_now(len(first.data), "push")  # unverified: never waits for room
        if not first.HasField("header"):
            raise InvalidMessage("chunk has no header")
        h = first.header
        self._route(h.protocol_version, h.run_id, h.group_id, h.exchange, "chunk")
        if h.purpose != pb.PURPOSE_PUSH:
            raise InvalidMessage(f"PushShard carries push chunks, got purpose {show(h.purpose)}")
        slot = await self._find_slot(SlotKey(h.round, h.group_id, h.exchange, h.shard_index), call)
        slot.traffic.received += wire_size(first)
        reassembler = Reassembler(slot.expectation, codec_lookup=self.codec_lookup)
        payload = reassembler.feed(first)  # verifies the signature and the sender's membership
        sender = h.sender_id
        weight = _push_weight(h)
        slot.reserve(sender)
        # The slot stops taking contributions at the group's deadline: a stream cannot outlive it.
        slot_end = loop.time() + slot.plan.deadline_ms / 1000.0 - time.time()
        stream_end = min(stream_end, slot_end)
        what = f"push to {slot.key.describe()} from {sender}"
        try:
            # The declared size was checked against the shard: hold it all (or wait for room).
            await hold.resize(h.payload_nbytes, stream_end, what)
            first_hold.release()  # the first chunk is part of the payload now held
            while payload is None:
                chunk = await next_chunk(items, stream_end, cfg.chunk_timeout_s, what)
                if chunk is None:
                    payload = reassembler.finish()  # raises: the stream ended early
                    break
                slot.traffic.received += wire_size(chunk)
                slot.check_open()  # closed meanwhile: stop buffering a contribution that cannot count
                payload = reassembler.feed(chunk)
            if await next_chunk(items, stream_end, cfg.chunk_timeout_s, what) is not None:
                raise ChunkOrderError("chunk after the last one of the payload")
        except BaseException:
            slot.release(sender)
            raise
        slot.accept(sender, payload, weight)
        ack = pb.PushAck(received_bytes=payload.nbytes, received_chunks=reassembler.received_chunks)
        slot.traffic.sent += wire_size(ack)
        return ack

    async def pull_result(self, request: pb.PullResultRequest, call: CallInfo) -> AsyncIterator[pb.Chunk]:
        """Stream the reduced shard to a member, waiting up to ``wait_ms`` for it to exist."""
        r = request
        self._route(r.protocol_version, r.run_id, r.group_id, r.exchange, "pull request")
        slot = await self._find_slot(SlotKey(r.round, r.group_id, r.exchange, r.shard_index), call)
        slot.traffic.received += wire_size(r)
        check_pull_request(r, slot.plan)  # signature and membership
        wait = call.bound(min(r.wait_ms / 1000.0, self.config.max_pull_wait_s))
        if not await slot.wait_done(wait):
            raise Unavailable(f"{slot.key.describe()} is not reduced yet (waited {wait:.2f} s); retry")
        if slot.state is SlotState.DISCARDED:
            raise StaleRound(f"{slot.key.describe()} was discarded with its round")
        if slot.error is not None:
            raise PreconditionFailed(slot.error)
        for chunk in slot.chunks:
            slot.traffic.sent += wire_size(chunk)
            yield chunk
        slot.mark_pulled(r.requester_id)


def _is_exchange_handler(hub: ExchangeHub) -> ExchangeHandler:
    return hub  # mypy checks that ExchangeHub implements the server's ExchangeHandler
