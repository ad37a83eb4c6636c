"""Deterministic fault injection for resilience tests: "kill this peer at round 3", "cut its link".

**Test-only.** A peer started with ``lioncub-peer join --fault SPEC`` (or ``PeerSettings.faults``)
hurts itself on purpose at well-defined points of its own life, so that tests and the churn soak
can replay a failure exactly ("kill peer 2 at round 3") instead of racing signals against timers.
The peer logs a loud warning when any fault is set. Never use it in a real swarm.

Spec language, one fault per ``--fault`` (``KIND@KEY=VALUE:KEY=VALUE``):

=========================================  =========================================================
spec                                       what the peer does
=========================================  =========================================================
``kill@round=R``                           SIGKILL itself once round R was applied (the boundary
                                           after round R; its round event is out first)
``kill@round=R:at=group``                  SIGKILL itself in the middle of round R: as soon as the
                                           group whose exchange completes round R was agreed
                                           (members and shards fixed), before any data moved; the
                                           other members count on it and its shard
``partition@round=R:seconds=S``            from the end of round R, for S seconds, every RPC to or
                                           from this peer fails with ``UNAVAILABLE`` (its server
                                           refuses, its own calls go to a refusing endpoint); then
                                           the link heals. The DHT is not cut.
``slow@factor=F``                          each local round takes 1/F times as long (F in (0, 1];
``slow@factor=F:round=R``                  from round R on): a straggler at F of its speed; with
                                           ``rounds.max_seconds`` it takes F as many steps instead
``crash-in-checkpoint@round=R``            SIGKILL itself inside the first checkpoint write of a
                                           round >= R, after the temporary file was written and
                                           fsynced, before it is renamed into place
=========================================  =========================================================

The peer reports each fault it fires through :attr:`FaultInjector.on_event` (``lioncub-peer
join --progress jsonl`` prints them as ``{"event": "fault", ...}`` lines, flushed before a kill).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lioncub.protocol import GroupPlan, Unavailable
from lioncub.protocol import lioncub_pb2 as pb

from ._exchange_channels import ChannelPool
from .matchmaking import Matchmaker

if TYPE_CHECKING:
    from .server import CallInfo, PeerServer

__all__ = ["KINDS", "Fault", "FaultError", "FaultInjector", "FaultyMatchmaker", "parse_fault"]

log = logging.getLogger(__name__)

KINDS = ("kill", "partition", "slow", "crash-in-checkpoint")

_KEYS: dict[str, dict[str, bool]] = {  # kind -> key -> required
    "kill": {"round": True, "at": False},
    "partition": {"round": True, "seconds": True},
    "slow": {"factor": True, "round": False},
    "crash-in-checkpoint": {"round": True},
}
_KILL_POINTS = ("boundary", "group")


class FaultError(ValueError):
    """A fault spec that does not parse; the message shows the accepted forms."""


@dataclass(frozen=True)
class Fault:
    """One planned fault (see the module docstring for the meaning of each kind).

    Attributes:
        kind: one of :data:`KINDS`.
        round: the round it fires at (``slow``: from which round on; 0 = from the start).
        at: where ``kill`` fires: ``boundary`` (after round ``round``) or ``group`` (mid-round).
        seconds: how long a ``partition`` lasts.
        factor: a ``slow`` peer's speed, as a fraction of its own.
    """

    kind: str
    round: int = 0
    at: str = "boundary"
    seconds: float = 0.0
    factor: float = 1.0

    def __str__(self) -> str:
        if self.kind == "kill":
            return f"kill@round={self.round}" + (f":at={self.at}" if self.at != "boundary" else "")
        if self.kind == "partition":
            return f"partition@round={self.round}:seconds={self.seconds:g}"
        if self.kind == "slow":
            return f"slow@factor={self.factor:g}" + (f":round={self.round}" if self.round else "")
        return f"{self.kind}@round={self.round}"


_USAGE = (
    "expected kill@round=R[:at=boundary|group], partition@round=R:seconds=S, "
    "slow@factor=F[:round=R] or crash-in-checkpoint@round=R"
)


def parse_fault(spec: str) -> Fault:
    """Parse one ``KIND@KEY=VALUE:...`` spec; :class:`FaultError` says what is wrong."""
    kind, _, rest = spec.strip().partition("@")
    if kind not in _KEYS:
        raise FaultError(f"unknown fault {kind!r} in {spec!r}: {_USAGE}")
    values: dict[str, str] = {}
    for item in filter(None, rest.split(":")):
        key, sep, value = item.partition("=")
        if not sep or key not in _KEYS[kind] or key in values:
            raise FaultError(f"bad or repeated setting {item!r} in {spec!r}: {_USAGE}")
        values[key] = value
    missing = [k for k, required in _KEYS[kind].items() if required and k not in values]
    if missing:
        raise FaultError(f"{spec!r} needs {', '.join(missing)}: {_USAGE}")
    try:
        fault = Fault(
            kind,
            round=int(values.get("round", "0")),
            at=values.get("at", "boundary"),
            seconds=float(values.get("seconds", "0")),
            factor=float(values.get("factor", "1")),
        )
    except ValueError:
        raise FaultError(f"a number in {spec!r} does not parse: {_USAGE}") from None
    if fault.round < 0 or fault.at not in _KILL_POINTS:
        raise FaultError(f"round must be >= 0 and at one of {_KILL_POINTS} in {spec!r}")
    if kind == "partition" and not 0 < fault.seconds <= 3600:
        raise FaultError(f"partition seconds must be in (0, 3600], got {fault.seconds:g}")
    if kind == "slow" and not 0 < fault.factor <= 1:
        raise FaultError(f"slow factor must be in (0, 1], got {fault.factor:g}")
    return fault


def _die(why: str) -> None:
    """SIGKILL this process now: no cleanup, no deregistration, as in a real crash."""
    log.critical("FAULT INJECTION: SIGKILL now (%s)", why)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class _Refusing:
    """Server handlers of a cut link: every call fails with ``UNAVAILABLE``."""

    @staticmethod
    def _refuse() -> Unavailable:
        return Unavailable("link down (fault injection)")

    async def push_shard(self, chunks: AsyncIterator[pb.Chunk], call: CallInfo) -> pb.PushAck:
        raise self._refuse()

    def pull_result(self, request: pb.PullResultRequest, call: CallInfo) -> AsyncIterator[pb.Chunk]:
        raise self._refuse()

    def join_group(self, request: pb.JoinGroupRequest, call: CallInfo) -> AsyncIterator[pb.JoinGroupReply]:
        raise self._refuse()

    def download_state(self, request: pb.StateRequest, call: CallInfo) -> AsyncIterator[pb.StateReply]:
        raise self._refuse()

    async def check_reachable(self, request: pb.ReachabilityRequest, call: CallInfo) -> pb.ReachabilityReply:
        raise self._refuse()


class _FaultyChannels(ChannelPool):
    """The peer's outgoing channels; while its link is cut, every stub dials a refusing endpoint.

    The refusing endpoint is a loopback port bound (so no one else takes it) but never listening:
    a connection attempt is reset at once and the call fails with ``UNAVAILABLE``, as for a
    peer whose link is down.
    """

    def __init__(self, injector: FaultInjector) -> None:
        super().__init__()
        self._injector = injector
        self._hole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._hole.bind(("127.0.0.1", 0))
        self._hole_endpoint = f"127.0.0.1:{self._hole.getsockname()[1]}"

    def stub(self, endpoint: str) -> Any:
        return super().stub(self._hole_endpoint if self._injector.partitioned else endpoint)

    async def close(self) -> None:
        await super().close()
        self._hole.close()


class FaultyMatchmaker(Matchmaker):
    """A :class:`Matchmaker` that tells the injector when a group was agreed (for ``kill@...:at=group``).

    A group is agreed for a leader once its followers have the announcement: a leader that died
    the moment it announced would leave them without a group (a dead leader, not a dead member).
    """

    def __init__(self, *args: Any, injector: FaultInjector, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.injector = injector
        self._announced: dict[int, set[str]] = {}  # round -> followers whose JoinGroup got the group
        self._announced_changed = asyncio.Event()

    async def join_group(
        self, request: pb.JoinGroupRequest, call: CallInfo
    ) -> AsyncIterator[pb.JoinGroupReply]:
        async for reply in super().join_group(request, call):
            yield reply  # resumes once gRPC wrote the reply
            if reply.status == pb.JoinGroupReply.STATUS_GROUP_READY:
                self._announced.setdefault(request.round, set()).add(request.peer.peer_id)
                self._announced_changed.set()

    async def form_group(self, round: int, weight: float, deadline: float | None = None) -> GroupPlan | None:
        plan = await super().form_group(round, weight, deadline)
        if plan is not None:
            if plan.leader_id == self.peer_id and self.injector.kills_at_group(round):
                await self._delivered(round, set(plan.members) - {self.peer_id})
            self.injector.group_formed(round)
        self._announced.pop(round, None)
        return plan

    async def _delivered(self, round: int, followers: set[str]) -> None:
        """Until every follower's JoinGroup call got the announcement (bounded by the exchange timeout)."""
        end = time.monotonic() + self.config.exchange_timeout
        while not followers <= self._announced.get(round, set()) and time.monotonic() < end:
            self._announced_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._announced_changed.wait(), end - time.monotonic())


class FaultInjector:
    """Fires a peer's planned faults at its round boundaries, group agreements and checkpoint writes.

    The runtime calls :meth:`round_applied`, :meth:`slow_down` and passes :meth:`checkpoint_hook`
    to its :class:`~lioncub.peer.checkpoint.CheckpointStore`; the node builds its outgoing channels
    with :meth:`channels`, its matchmaker as a :class:`FaultyMatchmaker` and gives the injector
    its server with :meth:`attach`.
    """

    def __init__(self, faults: Sequence[Fault]) -> None:
        self.faults = tuple(faults)
        self.partitioned = False
        self.on_event: Callable[[dict[str, Any]], None] = lambda _event: None
        self._server: PeerServer | None = None
        self._saved: tuple[Any, ...] | None = None
        self._fired: set[Fault] = set()
        self._heal: asyncio.TimerHandle | None = None

    @classmethod
    def from_specs(cls, specs: Sequence[str]) -> FaultInjector:
        injector = cls([parse_fault(s) for s in specs])
        log.warning(
            "FAULT INJECTION IS ON (test-only, never in a real swarm): %s",
            ", ".join(str(f) for f in injector.faults),
        )
        return injector

    def _of(self, kind: str) -> list[Fault]:
        return [f for f in self.faults if f.kind == kind and f not in self._fired]

    def _report(self, fault: Fault, **fields: Any) -> None:
        self.on_event({"event": "fault", "fault": str(fault), "kind": fault.kind, **fields})

    # -- wiring -----------------------------------------------------------------------------------

    def channels(self) -> ChannelPool:
        """The outgoing channel pool to use (refuses while partitioned)."""
        return _FaultyChannels(self)

    def attach(self, server: PeerServer | None) -> None:
        """The server whose handlers a partition swaps out (None in client mode)."""
        self._server = server

    # -- the points where faults fire ---------------------------------------------------------------

    def round_applied(self, round: int) -> None:
        """Round ``round`` was applied (its round event is out): kills and partitions due fire."""
        for fault in self._of("kill"):
            if fault.at == "boundary" and round >= fault.round:
                self._fired.add(fault)
                self._report(fault, round=round)
                _die(f"{fault} after round {round}")
        for fault in self._of("partition"):
            if round >= fault.round:
                self._fired.add(fault)
                self._cut(fault, round)

    def _group_kills(self, round: int) -> list[Fault]:
        return [f for f in self._of("kill") if f.at == "group" and round + 1 >= f.round]

    def kills_at_group(self, round: int) -> bool:
        """Whether :meth:`group_formed` for matchmaking round ``round`` will kill this peer."""
        return bool(self._group_kills(round))

    def group_formed(self, round: int) -> None:
        """The group of matchmaking round ``round`` (whose exchange completes round ``round + 1``,
        the number round events show) was agreed: ``kill@...:at=group`` fires before data moves."""
        for fault in self._group_kills(round):
            self._fired.add(fault)
            self._report(fault, round=round + 1)
            _die(f"{fault} with its group for round {round + 1} agreed")

    def slow_factor(self, round: int) -> float:
        """This peer's speed at ``round`` as a fraction of its own (1.0 when not slowed)."""
        return min((f.factor for f in self.faults if f.kind == "slow" and round >= f.round), default=1.0)

    def slow_delay(self, round: int, compute_s: float) -> float:
        """Seconds to add to a local round of ``compute_s`` seconds so it takes ``compute_s / factor``.

        With time-bounded rounds (``rounds.max_seconds``) the runtime also gives the slow peer only
        ``factor`` of the round's compute budget: it then takes ``factor`` as many steps in the same
        wall time, as a machine that slow would.
        """
        return compute_s * (1.0 / self.slow_factor(round) - 1.0)

    async def slow_down(self, round: int, compute_s: float) -> None:
        """Stretch a local round (a straggler): wait :meth:`slow_delay` seconds."""
        delay = self.slow_delay(round, compute_s)
        if delay > 0:
            await asyncio.sleep(delay)

    def checkpoint_hook(self, tmp: Path, final: Path) -> None:
        """:data:`~lioncub.peer.checkpoint.WriteHook`: ``crash-in-checkpoint`` dies between write and rename."""
        if not final.name.startswith("ckpt-"):
            return  # the ``latest`` pointer
        round = int(final.name[len("ckpt-") : -len(".pt")])
        for fault in self._of("crash-in-checkpoint"):
            if round >= fault.round:
                self._fired.add(fault)
                self._report(fault, round=round, temp=str(tmp), final=str(final))
                _die(f"{fault} while writing {final.name} ({tmp.name} written, not renamed)")

    # -- partitions -------------------------------------------------------------------------------

    def _cut(self, fault: Fault, round: int) -> None:
        self.partitioned = True
        server = self._server
        if server is not None and self._saved is None:
            self._saved = (server.exchange, server.groups, server.state, server.reachability)
            refusing = _Refusing()
            server.exchange, server.groups, server.state, server.reachability = (refusing,) * 4
        log.warning("FAULT INJECTION: link cut after round %d for %gs (%s)", round, fault.seconds, fault)
        self._report(fault, round=round, phase="cut", at=time.time())
        self._heal = asyncio.get_running_loop().call_later(fault.seconds, self._restore, fault)

    def _restore(self, fault: Fault) -> None:
        self.partitioned = False
        server = self._server
        if server is not None and self._saved is not None:
            server.exchange, server.groups, server.state, server.reachability = self._saved
            self._saved = None
        log.warning("FAULT INJECTION: link healed (%s)", fault)
        self._report(fault, phase="healed", at=time.time())

    def close(self) -> None:
        if self._heal is not None:
            self._heal.cancel()
