"""One round's group assembly at one peer: the state a leader keeps while followers join.

A :class:`RoundAssembly` exists from the moment a peer posts itself ready for a round until its
``form_group`` returns. Join requests that arrive meanwhile are held while the peer is still
gathering or following someone else (it may yet become the leader, e.g. when the peer ahead of it
died), accepted while it leads, and answered with the announcement or a disbanding at the end.
Everything runs on one event loop: no locks, state changes wake waiters through an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncGenerator, Callable

from lioncub.peer._match_plan import ReadyPeer
from lioncub.protocol import lioncub_pb2 as pb

__all__ = ["Phase", "RoundAssembly"]

_Status = pb.JoinGroupReply.Status


class Phase(enum.Enum):
    """Where a peer's matchmaking for one round stands."""

    GATHERING = "gathering"  # reading the ready set
    FOLLOWING = "following"  # joining another peer's group
    LEADING = "leading"  # accepting members
    ANNOUNCED = "announced"  # the group is fixed and announced
    DISBANDED = "disbanded"  # this peer leads nothing this round (gave up, or joined another group)


_UNDECIDED = (Phase.GATHERING, Phase.FOLLOWING)


def _reply(status: pb.JoinGroupReply.Status, reason: str = "") -> pb.JoinGroupReply:
    return pb.JoinGroupReply(status=status, reason=reason)


class RoundAssembly:
    """Leader-side state of one round; see the module docstring.

    :param deadline: ``time.monotonic()`` after which held requests are turned away.
    :param max_members: most members (the leader included) a group may reach.
    """

    def __init__(self, round: int, deadline: float, max_members: int) -> None:
        self.round = round
        self.deadline = deadline
        self.max_members = max_members
        self.phase = Phase.GATHERING
        self.expected: frozenset[str] = frozenset()
        self.joined: dict[str, ReadyPeer] = {}
        self.caller_deadlines: dict[str, float] = {}  # when each joined follower stops waiting
        self.announcement: pb.GroupAnnouncement | None = None
        self.reason = ""
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[], bool], deadline: float) -> bool:
        """Wait until ``predicate()`` holds (True) or ``deadline`` (monotonic) passes (its last value)."""
        while not predicate():
            if time.monotonic() >= deadline:
                return False
            await self.wait_changed(deadline)
        return True

    async def wait_changed(self, deadline: float) -> None:
        """Wait for the next state change (a join, a leave, a transition) or ``deadline``."""
        remaining = deadline - time.monotonic()
        if remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def announce_by(self, end: float, margin: float) -> float:
        """When the leader must announce: ``margin`` before its own end or an expected follower's.

        Only followers the leader's own plan expects count, so that an unexpected joiner with a
        short call deadline cannot hurry the announcement for everyone.
        """
        deadlines = [d for peer_id, d in self.caller_deadlines.items() if peer_id in self.expected]
        return min([end, *deadlines]) - margin

    # --- transitions, driven by the peer's own form_group -----------------------------------

    def follow(self) -> None:
        if self.phase in _UNDECIDED:
            self.phase = Phase.FOLLOWING
            self._notify()

    def lead(self, expected: frozenset[str]) -> None:
        """Start accepting members; ``expected`` are the followers this peer's plan put in its group."""
        if self.phase in _UNDECIDED:
            self.phase = Phase.LEADING
            self.expected = expected
            self._notify()

    def complete(self) -> bool:
        """All expected followers joined, or the group is full."""
        return self.expected <= self.joined.keys() or len(self.joined) + 1 >= self.max_members

    def announce(self, build: Callable[[list[ReadyPeer]], pb.GroupAnnouncement]) -> pb.GroupAnnouncement:
        """Fix the group as it is now: ``build`` gets the joined followers; held streams get the result.

        No request can join between the snapshot and the announcement (no await in between).
        """
        if self.phase is not Phase.LEADING:
            raise RuntimeError(f"cannot announce a group in phase {self.phase.value}")
        self.announcement = build(list(self.joined.values()))
        self.phase = Phase.ANNOUNCED
        self._notify()
        return self.announcement

    def disband(self, reason: str) -> None:
        """Lead nothing this round: held and accepted requests are told so with ``reason``."""
        if self.phase not in (Phase.ANNOUNCED, Phase.DISBANDED):
            self.phase = Phase.DISBANDED
            self.reason = reason
            self._notify()

    # --- the JoinGroup stream of one (already validated) follower ---------------------------

    async def serve(
        self, peer: ReadyPeer, caller_deadline: float | None = None
    ) -> AsyncGenerator[pb.JoinGroupReply, None]:
        """Replies for ``peer``: ACCEPTED then GROUP_READY, or one REJECTED / DISBANDED.

        ``caller_deadline`` (monotonic): when the caller stops listening; a request held while this
        peer is undecided is turned away before then.
        """
        r = self.round
        hold_until = self.deadline if caller_deadline is None else min(self.deadline, caller_deadline)
        decided = await self.wait_for(lambda: self.phase not in _UNDECIDED, hold_until)
        if not decided:
            yield _reply(_Status.STATUS_REJECTED, f"this peer did not come to lead a group in round {r}")
            return
        if self.phase is Phase.ANNOUNCED:
            yield _reply(_Status.STATUS_REJECTED, f"the group of round {r} was already announced")
            return
        if self.phase is not Phase.LEADING:
            reason = f"this peer leads no group in round {r}: {self.reason}"
            yield _reply(_Status.STATUS_REJECTED, reason)
            return
        if peer.peer_id not in self.joined and len(self.joined) + 1 >= self.max_members:
            yield _reply(_Status.STATUS_REJECTED, f"the group of round {r} is full ({self.max_members})")
            return
        self.joined[peer.peer_id] = peer
        self.caller_deadlines[peer.peer_id] = self.deadline if caller_deadline is None else caller_deadline
        self._notify()
        try:
            yield _reply(_Status.STATUS_ACCEPTED)
            # The leader always ends LEADING by its deadline (announce or disband, also when cancelled).
            await self.wait_for(lambda: self.phase is not Phase.LEADING, self.deadline + 1.0)
            announcement = self.announcement  # set only by announce()
            if announcement is not None and any(m.peer_id == peer.peer_id for m in announcement.members):
                yield pb.JoinGroupReply(status=_Status.STATUS_GROUP_READY, group=announcement)
            else:
                yield _reply(_Status.STATUS_DISBANDED, self.reason or f"the group of round {r} did not form")
        finally:
            if self.phase is Phase.LEADING and self.joined.get(peer.peer_id) is peer:
                del self.joined[peer.peer_id]  # it left before the group was fixed
                del self.caller_deadlines[peer.peer_id]
                self._notify()
