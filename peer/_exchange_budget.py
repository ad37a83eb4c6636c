"""Memory and time bounds of the push streams an :class:`~lioncub.peer.exchange.ExchangeHub` receives.

:class:`ByteBudget` caps the push payload bytes that all of a hub's streams buffer at once (flow
control: a stream that does not fit waits, without reading further chunks, so gRPC's HTTP/2 window
stops its sender). :class:`BufferHold` is one stream's share of it. :func:`next_chunk` reads the
next chunk of a stream within a deadline, so that a stream that stalls or trickles (slowloris) is cut
off with :class:`SlowStream` instead of holding its buffer and its RPC forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from lioncub.protocol import TooLarge
from lioncub.protocol import lioncub_pb2 as pb

__all__ = ["BufferFull", "BufferHold", "ByteBudget", "SlowStream", "next_chunk"]


class SlowStream(TooLarge):
    """A push stream sent its chunks too slowly and was cut off (``RESOURCE_EXHAUSTED``)."""


class BufferFull(TooLarge):
    """The hub's push buffer stayed full for as long as the stream could wait (``RESOURCE_EXHAUSTED``)."""


class ByteBudget:
    """A byte count shared by concurrent streams: ``used <= limit``, except for one lone holder.

    A request for more than ``limit`` bytes is granted only while nothing else is held, so that a
    payload larger than the budget can still be received (alone) and no request waits forever.
    Hence ``used <= max(limit, largest single hold)`` at all times; :attr:`peak` records the maximum.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the byte budget must be >= 1, got {limit}")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self.waiting = 0  # holds waiting for room right now
        self._freed = asyncio.Event()

    def __repr__(self) -> str:
        return f"ByteBudget(used={self.used}, limit={self.limit}, peak={self.peak}, waiting={self.waiting})"

    def _try_set(self, hold: BufferHold, nbytes: int) -> bool:
        others = self.used - hold.nbytes
        if others and others + nbytes > self.limit:
            return False
        self.used = others + nbytes
        self.peak = max(self.peak, self.used)
        if nbytes < hold.nbytes:
            self._wake()
        hold.nbytes = nbytes
        return True

    def _wake(self) -> None:
        self._freed.set()
        self._freed = asyncio.Event()

    async def _wait_freed(self, timeout: float) -> bool:
        freed = self._freed
        self.waiting += 1
        try:
            await asyncio.wait_for(freed.wait(), timeout)
        except TimeoutError:
            return False
        finally:
            self.waiting -= 1
        return True


class BufferHold:
    """One stream's bytes in a :class:`ByteBudget`; :meth:`release` it in a ``finally``."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.nbytes = 0

    def resize_now(self, nbytes: int, what: str) -> None:
        """Hold ``nbytes`` now or raise :class:`BufferFull` (for unverified data: it never waits)."""
        if not self.budget._try_set(self, nbytes):
            raise BufferFull(
                f"{what}: this peer already buffers {self.budget.used} bytes of pushes"
                f" (limit {self.budget.limit}); retry later"
            )

    async def resize(self, nbytes: int, deadline: float, what: str) -> None:
        """Hold ``nbytes``, waiting until ``deadline`` (event-loop time) for others to release."""
        loop = asyncio.get_running_loop()
        while not self.budget._try_set(self, nbytes):
            remaining = deadline - loop.time()
            if remaining <= 0 or not await self.budget._wait_freed(remaining):
                raise BufferFull(
                    f"{what}: the push buffer of this peer stayed full ({self.budget.used} of"
                    f" {self.budget.limit} bytes) while the stream could wait; retry later"
                )

    def release(self) -> None:
        self.budget._try_set(self, 0)


async def next_chunk(
    items: AsyncIterator[pb.Chunk], stream_end: float, chunk_timeout: float, what: str
) -> pb.Chunk | None:
    """The stream's next chunk, None at its end; :class:`SlowStream` if none came within
    ``chunk_timeout`` seconds or by ``stream_end`` (loop time)."""
    now = asyncio.get_running_loop().time()
    remaining = min(stream_end, now + chunk_timeout) - now
    try:
        if remaining <= 0:
            raise TimeoutError
        async with asyncio.timeout(remaining):
            return await anext(items)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise SlowStream(f"{what}: no chunk arrived in time; stream cut off") from None
