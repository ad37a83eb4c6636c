"""Owner side of one shard of one exchange: collect the members' parts, reduce once, serve the result.

A :class:`ShardSlot` lives from the moment its owner enters the round until the hub discards old
rounds. It holds the owner's own part from the start (the owner's part always counts), takes at most
one contribution per member (reserved when the first chunk's signature verified, so a forger cannot
block an honest member), and reduces exactly once: when every other member's part arrived, at the
group's deadline, or when its owner stops waiting. Later pushes are refused (:class:`LatePush`); the
result is chunked and signed once and streamed to every puller.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass

from google.protobuf.message import Message

from lioncub.optim.codec import Encoded
from lioncub.optim.reducers import Reducer
from lioncub.protocol import (
    GroupPlan,
    Identity,
    InvalidMessage,
    PreconditionFailed,
    ShardExpectation,
    chunk_payload,
)
from lioncub.protocol import lioncub_pb2 as pb

__all__ = [
    "GRPC_PREFIX_BYTES",
    "DuplicateContribution",
    "LatePush",
    "ShardSlot",
    "SlotKey",
    "SlotState",
    "Traffic",
    "wire_size",
]

log = logging.getLogger(__name__)

#: Every gRPC message travels behind a 5-byte prefix (compressed flag + 32-bit length).
GRPC_PREFIX_BYTES = 5


def wire_size(msg: Message) -> int:
    """Bytes ``msg`` occupies as one gRPC message: its serialized size plus the gRPC prefix."""
    return msg.ByteSize() + GRPC_PREFIX_BYTES


@dataclass
class Traffic:
    """gRPC message bytes moved by one side of an exchange (see :func:`wire_size`)."""

    sent: int = 0
    received: int = 0


class DuplicateContribution(InvalidMessage):
    """A member sent a second contribution to the same shard (``INVALID_ARGUMENT``); not counted."""


class LatePush(PreconditionFailed):
    """The shard was already reduced when the contribution completed (``FAILED_PRECONDITION``)."""


@dataclass(frozen=True)
class SlotKey:
    """One shard of one exchange of one group in one round (the run is the hub's)."""

    round: int
    group_id: str
    exchange: str
    shard_index: int

    def describe(self) -> str:
        return f"shard {self.shard_index} of {self.exchange!r}, group {self.group_id} round {self.round}"


class SlotState(enum.Enum):
    OPEN = "open"  # accepting contributions
    REDUCING = "reducing"  # closed; the reduction runs
    DONE = "done"  # result (or error) available to pullers
    DISCARDED = "discarded"  # dropped with its round; nothing is served any more


class ShardSlot:
    """Everything the owner keeps about one shard it owns (see the module docstring)."""

    def __init__(
        self,
        key: SlotKey,
        plan: GroupPlan,
        identity: Identity,
        reducer: Reducer,
        own_part: Encoded,
        own_weight: int,
        *,
        chunk_bytes: int,
    ) -> None:
        shard = plan.shard(key.shard_index)
        if shard.owner_id != identity.peer_id:
            raise ValueError(f"{key.describe()} is owned by {shard.owner_id}, not {identity.peer_id}")
        if own_part.numel != shard.numel:
            raise ValueError(f"own part has {own_part.numel} elements, {key.describe()} has {shard.numel}")
        self.key = key
        self.plan = plan
        self.owner_id = identity.peer_id
        self.expectation: ShardExpectation = plan.push_expectation(
            key.exchange, key.shard_index, codecs=frozenset({own_part.codec})
        )
        self.senders = frozenset(self.expectation.senders)  # every member but the owner
        self.state = SlotState.OPEN
        self.traffic = Traffic()
        self.result: Encoded | None = None
        self.chunks: tuple[pb.Chunk, ...] = ()
        self.error: str | None = None
        self.contributors: tuple[str, ...] = ()
        self.opened_at = time.monotonic()
        self.done_at: float | None = None
        self._identity = identity
        self._reducer = reducer
        self._chunk_bytes = chunk_bytes
        self._parts: dict[str, tuple[Encoded, int]] = {self.owner_id: (own_part, own_weight)}
        self._contributed: set[str] = {self.owner_id}  # ids only: kept after the parts are freed
        self._receiving: set[str] = set()
        self._pulled: set[str] = set()
        self._done = asyncio.Event()
        self._served = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        delay = max(0.0, plan.deadline_ms / 1000.0 - time.time())
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(delay, self.close)
        if not self.senders:
            self.close()

    def __repr__(self) -> str:
        return f"ShardSlot({self.key.describe()}, {self.state.value}, {len(self._parts)} part(s))"

    @property
    def received(self) -> frozenset[str]:
        """Peer ids whose contribution was counted so far (the owner's own included)."""
        return frozenset(self._contributed)

    # --- contributions ---------------------------------------------------------------------------

    def reserve(self, sender: str) -> None:
        """Claim the one contribution ``sender`` may make (its first chunk verified already)."""
        if sender in self._contributed:
            raise DuplicateContribution(f"{sender} already contributed to {self.key.describe()}")
        if sender in self._receiving:
            raise DuplicateContribution(
                f"{sender} is already sending its contribution to {self.key.describe()}"
            )
        self.check_open()
        self._receiving.add(sender)

    def release(self, sender: str) -> None:
        """Give up a reservation whose stream failed; the sender may try again."""
        self._receiving.discard(sender)

    def accept(self, sender: str, part: Encoded, weight: int) -> None:
        """Count a complete, verified contribution; reduce when it was the last one missing."""
        self._receiving.discard(sender)
        if sender in self._contributed:
            raise DuplicateContribution(f"{sender} already contributed to {self.key.describe()}")
        self.check_open()
        self._parts[sender] = (part, weight)
        self._contributed.add(sender)
        if self.senders <= self._parts.keys():
            self.close()

    def check_open(self) -> None:
        """Raise :class:`LatePush` unless the slot still takes contributions."""
        if self.state is SlotState.DISCARDED:
            raise LatePush(f"{self.key.describe()} was discarded with its round")
        if self.state is not SlotState.OPEN:
            raise LatePush(
                f"{self.key.describe()} was already reduced (deadline passed): contribution left out"
            )

    # --- reduction -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop taking contributions and reduce what arrived (idempotent)."""
        if self.state is not SlotState.OPEN:
            return
        self.state = SlotState.REDUCING
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._task = asyncio.get_running_loop().create_task(
            self._reduce(), name=f"reduce {self.key.describe()}"
        )

    async def _reduce(self) -> None:
        order = [peer_id for peer_id in self.plan.members if peer_id in self._parts]  # sorted ids
        parts = [self._parts[p][0] for p in order]
        weights = [self._parts[p][1] for p in order]
        if not any(weights):
            weights = [1] * len(weights)
        # A reducer that weighs voters by identity (TrustedVoteReducer) is told whose parts these are.
        reduce_from = getattr(self._reducer, "reduce_from", None)
        try:
            if reduce_from is not None:
                result = await asyncio.to_thread(reduce_from, order, parts, weights)
            else:
                result = await asyncio.to_thread(self._reducer.reduce, parts, weights)
            chunks = await asyncio.to_thread(
                chunk_payload,
                self.plan.key(pb.PURPOSE_RESULT, self.key.exchange, self.key.shard_index),
                result,
                self._identity,
                weight=float(sum(weights)),
                contributors=len(order),
                chunk_bytes=self._chunk_bytes,
            )
        except Exception as exc:  # a failed reduction is data: pullers fall back to their own part
            log.error("round %d: reducing %s failed", self.key.round, self.key.describe(), exc_info=exc)
            self.error = f"the owner could not reduce {self.key.describe()}: {type(exc).__name__}: {exc}"
        else:
            self.result, self.chunks = result, tuple(chunks)
        if self.state is SlotState.DISCARDED:
            return
        self._parts = {}  # the result replaces the parts: bounded memory
        self.contributors = tuple(order)
        self.state = SlotState.DONE
        self.done_at = time.monotonic()
        self._done.set()
        self._check_served()
        log.debug(
            "round %d: reduced %s from %d of %d member(s)",
            self.key.round,
            self.key.describe(),
            len(order),
            len(self.plan.members),
        )

    async def wait_done(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` s for the result (or error); True once it exists or was discarded."""
        if not self._done.is_set():
            try:
                await asyncio.wait_for(self._done.wait(), timeout)
            except TimeoutError:
                return False
        return True

    # --- serving ---------------------------------------------------------------------------------

    def mark_pulled(self, member: str) -> None:
        """``member`` received the whole result."""
        self._pulled.add(member)
        self._check_served()

    def _check_served(self) -> None:
        if self.state is not SlotState.DONE:
            return
        waiting = set(self.contributors) - {self.owner_id} - self._pulled
        if self.error is not None or not waiting:
            self._served.set()

    async def wait_served(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` s until every contributor pulled the result; True if they did."""
        if not self._served.is_set():
            try:
                await asyncio.wait_for(self._served.wait(), timeout)
            except TimeoutError:
                return False
        return self.state is not SlotState.DISCARDED

    def discard(self) -> None:
        """Drop the slot with its round: free the parts and result, wake every waiter."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self.state = SlotState.DISCARDED
        self._parts, self.chunks, self.result = {}, (), None
        self._done.set()
        self._served.set()
