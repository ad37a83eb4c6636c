"""Byzantine peers, for resilience tests only: corrupt what one peer sends, in eight ways.

A peer with an :class:`Adversary` (``PeerSettings.adversary``, ``lioncub-peer join --adversary``,
``SimConfig.adversaries``) still trains and applies the group's results like everyone else, but
lies in what it contributes. The mode is a per-peer setting, never part of the shared run config.

=========================  ==============================================================================
mode                       what the peer sends
=========================  ==============================================================================
``sign-flip``              the negation of its update vector (every vote flipped)
``all-ones``               +1 everywhere
``random``                 fresh Gaussian noise every round (random votes)
``stale-replay``           the update vector of ``stale_lag`` rounds ago, re-signed for this round;
                           on the wire it also replays last round's signed chunks (refused: stale)
``wrong-group``            flipped votes, plus copies addressed to another group (refused: not
                           this group / not a member)
``momentum-poison-huge``   ±60000 (near the fp16 maximum) in every momentum sync and parameter average
``momentum-poison-nan``    NaN payloads in every momentum sync and parameter average (crafted bytes:
                           the codecs refuse to encode NaN)
``impersonate``            flipped votes, plus copies that claim another member's peer id, signed with
                           its own key (refused: bad signature)
=========================  ==============================================================================

The defences (docs/RELIABILITY.md, "Byzantine peers"): votes counted once per verified identity
(``protocol.Reassembler`` and ``ShardSlot``; :func:`admit` models them for the simulator), trust
from agreement with the majority (:class:`~lioncub.optim.reducers.TrustedVoteReducer`), robust
float syncs and dropping non-finite contributions (:class:`~lioncub.optim.reducers.MeanReducer`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
import grpc.aio
import torch

from lioncub.optim.codec import Encoded
from lioncub.optim.reducers import Reducer
from lioncub.protocol import GroupPlan, chunk_payload
from lioncub.protocol import lioncub_pb2 as pb
from lioncub.protocol.signing import sign_chunk

from ._exchange_hub import ExchangeHub

__all__ = [
    "ADVERSARY_MODES",
    "FLOAT_EXCHANGES",
    "Adversary",
    "Envelope",
    "PoisonedReducer",
    "admit",
    "make_adversary",
    "push_forgeries",
]

log = logging.getLogger(__name__)

ADVERSARY_MODES: tuple[str, ...] = (
    "sign-flip",
    "all-ones",
    "random",
    "stale-replay",
    "wrong-group",
    "momentum-poison-huge",
    "momentum-poison-nan",
    "impersonate",
)
#: Exchanges that carry float vectors (momentum sync, parameter averaging).
FLOAT_EXCHANGES: frozenset[str] = frozenset({"momentum", "params"})
#: Modes that add forged envelopes next to the peer's own contribution.
ENVELOPE_MODES: frozenset[str] = frozenset({"stale-replay", "wrong-group", "impersonate"})

_HUGE = 6.0e4  # representable in fp16 (max 65504), so it passes every codec's encoder


class Adversary:
    """What one Byzantine peer does to the vectors it contributes (see the module docstring)."""

    def __init__(self, mode: str, *, seed: int = 0, stale_lag: int = 8) -> None:
        if mode not in ADVERSARY_MODES:
            raise ValueError(f"unknown adversary mode {mode!r}; choose one of {', '.join(ADVERSARY_MODES)}")
        if stale_lag < 1:
            raise ValueError(f"stale_lag must be >= 1, got {stale_lag}")
        self.mode = mode
        self.stale_lag = stale_lag
        self._gen = torch.Generator().manual_seed(seed)
        self._history: collections.deque[torch.Tensor] = collections.deque(maxlen=stale_lag + 1)
        #: The chunks last pushed per (exchange, owner), for wire replays (``stale-replay``).
        self.replays: dict[tuple[str, str], list[pb.Chunk]] = {}
        #: gRPC status name -> forged pushes answered with it (``OK`` would be a hole).
        self.refused: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        return f"Adversary({self.mode!r})"

    @property
    def forges(self) -> bool:
        """Whether this mode also sends forged envelopes (stale, wrong group, impersonation)."""
        return self.mode in ENVELOPE_MODES

    def corrupt(self, exchange: str, vec: torch.Tensor) -> torch.Tensor:
        """The full-length vector this peer sends in ``exchange`` instead of ``vec`` (once per exchange)."""
        mode = self.mode
        if exchange in FLOAT_EXCHANGES:
            if mode == "momentum-poison-huge":
                signs = torch.randint(0, 2, vec.shape, generator=self._gen).to(vec.device, vec.dtype)
                return signs.mul_(2 * _HUGE).sub_(_HUGE)
            return vec
        if mode in ("sign-flip", "wrong-group", "impersonate"):
            return -vec
        if mode == "all-ones":
            return torch.ones_like(vec)
        if mode == "random":
            return torch.randn(vec.shape, generator=self._gen).to(vec.device, vec.dtype)
        if mode == "stale-replay":
            self._history.append(vec.detach().clone())
            return self._history[0]  # stale_lag rounds ago (the first vector until then)
        return vec

    def wrap(self, exchange: str, reducer: Reducer) -> Reducer:
        """``reducer`` with this peer's encoder poisoned where the mode crafts payload bytes."""
        if self.mode == "momentum-poison-nan" and exchange in FLOAT_EXCHANGES:
            return PoisonedReducer(reducer)
        return reducer


class PoisonedReducer:
    """A reducer whose ``encode`` sends NaN in the codec's own layout; the rest is delegated."""

    def __init__(self, inner: Reducer) -> None:
        self.inner = inner

    def encode(self, vec: torch.Tensor) -> Encoded:
        honest = self.inner.encode(vec)
        return nan_payload(honest)

    def reduce(self, parts: Sequence[Encoded], weights: Sequence[int] | None = None) -> Encoded:
        return self.inner.reduce(parts, weights)

    def decode(self, result: Encoded) -> torch.Tensor:
        return self.inner.decode(result)

    def local_fallback(self, own_part: Encoded, weight: int = 1) -> Encoded:
        return self.inner.local_fallback(own_part, weight)


def nan_payload(like: Encoded) -> Encoded:
    """A payload of ``like``'s codec and size whose values decode to NaN (fp16, fp32, int8)."""
    data = like.data.clone()
    if like.codec == "fp16":
        data.view(torch.float16).fill_(float("nan"))
    elif like.codec == "fp32":
        data.view(torch.float32).fill_(float("nan"))
    elif like.codec.startswith("int8"):
        blocks = data.numel() - like.numel  # the float32 block scales lead the payload
        data[:blocks].view(torch.float32).fill_(float("nan"))
    else:
        raise ValueError(f"cannot craft a NaN payload for codec {like.codec!r}")
    return Encoded(like.codec, like.numel, data)


def make_adversary(mode: str | None, *, seed: int = 0) -> Adversary | None:
    """The adversary for a per-peer setting (None: an honest peer); logs a loud warning."""
    if not mode:
        return None
    adversary = Adversary(mode, seed=seed)
    log.warning(
        "THIS PEER IS BYZANTINE (adversary mode %r): it corrupts what it sends. "
        "For resilience testing only; never use it in a real run.",
        mode,
    )
    return adversary


# --- the envelope rules, as a model for the in-process simulator ------------------------------------


@dataclass(frozen=True)
class Envelope:
    """One contribution as an owner sees it: who it claims to be from and who actually signed it."""

    claimed: str
    signer: str
    round: int
    group: str
    part: Encoded


def forged_envelopes(
    adversary: Adversary,
    self_id: str,
    members: Sequence[str],
    round: int,
    group: str,
    part: Encoded,
    previous: Encoded | None,
) -> list[Envelope]:
    """The extra envelopes a Byzantine member sends to one owner next to its own (simulator model)."""
    if adversary.mode == "impersonate":
        return [Envelope(m, self_id, round, group, part) for m in members if m != self_id]
    if adversary.mode == "wrong-group":
        return [Envelope(self_id, self_id, round, f"{group}-other", part)]
    if adversary.mode == "stale-replay" and previous is not None:
        return [Envelope(self_id, self_id, round - 1, group, previous)]
    return []


def admit(
    envelopes: Sequence[Envelope], *, members: Sequence[str], round: int, group: str, verify: bool
) -> list[tuple[str, Encoded]]:
    """The (sender, part) pairs an owner counts, in arrival order.

    With ``verify`` this is what the wire enforces (``protocol.Reassembler``, ``ShardSlot.reserve``):
    the signer must be the claimed sender, a member of this group, for this round and group, and
    is counted once. Without it every envelope counts, under its claimed id.
    """
    if not verify:
        return [(e.claimed, e.part) for e in envelopes]
    allowed, counted = set(members), set()
    out: list[tuple[str, Encoded]] = []
    for e in envelopes:
        if e.signer != e.claimed or e.claimed not in allowed or e.round != round or e.group != group:
            continue
        if e.claimed in counted:
            continue
        counted.add(e.claimed)
        out.append((e.claimed, e.part))
    return out


# --- forged envelopes on the wire (real peers) ---------------------------------------------------------


async def push_forgeries(
    adversary: Adversary,
    hub: ExchangeHub,
    plan: GroupPlan,
    exchange: str,
    vec: torch.Tensor,
    reducer: Reducer,
    weight: int,
    *,
    timeout: float,
) -> collections.Counter[str]:
    """Push this mode's forged envelopes to every other owner; the gRPC status of each (never raises).

    ``impersonate``: this peer's part claims the first other non-owner member's id (signed with
    this peer's own key); ``wrong-group``: its part addressed to a group id that is not the plan's;
    ``stale-replay``: the chunks it pushed to the same owner in its previous exchange of this name.
    """
    me = hub.identity.peer_id
    outcomes: collections.Counter[str] = collections.Counter()
    if not adversary.forges:
        return outcomes
    for shard in plan.shards:
        if shard.owner_id == me:
            continue
        part = reducer.encode(vec[shard.offset : shard.offset + shard.numel])
        key = plan.key(pb.PURPOSE_PUSH, exchange, shard.index)
        chunks = chunk_payload(key, part, hub.identity, weight=float(weight))
        forged: list[pb.Chunk] = []
        if adversary.mode == "impersonate":
            victim = next((m for m in plan.members if m not in (me, shard.owner_id)), None)
            if victim is not None:
                for chunk in chunks:
                    chunk.header.sender_id = victim
                    sign_chunk(chunk, hub.identity)
                forged = chunks
        elif adversary.mode == "wrong-group":
            forged = chunk_payload(
                dataclasses.replace(key, group_id=f"{plan.group_id[:48]}-x"), part, hub.identity
            )
        else:
            forged = adversary.replays.get((exchange, shard.owner_id), [])
            adversary.replays[(exchange, shard.owner_id)] = chunks
        if not forged:
            continue
        try:
            stub = hub.channels.stub(plan.members[shard.owner_id].endpoint)
            await stub.PushShard(_stream(forged), timeout=timeout)
            outcomes["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            outcomes[exc.code().name] += 1
    adversary.refused.update(outcomes)
    log.info("round %d %s: forged pushes answered %s", plan.round, exchange, dict(outcomes))
    return outcomes


async def _stream(chunks: Sequence[pb.Chunk]) -> AsyncIterator[pb.Chunk]:
    for chunk in chunks:
        yield chunk
