"""Reducers: what the members of a group send for one exchange, and how a shard owner combines it.

A group exchange (reduce-scatter + all-gather) needs four operations and nothing else, which is the
:class:`Reducer` protocol. Every :class:`~lioncub.optim.strategies.SyncStrategy` satisfies it (the
round's update: sign votes, p-bit sums, DiLoCo means); :class:`MeanReducer` is the one for plain
float vectors, used by momentum syncs and parameter averaging.

The owner of a shard calls ``reduce`` on the members' payloads in a fixed order (sorted by peer id),
encodes the result once, and every member decodes the same bytes, so the agreed vector is
bit-identical on every member.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from .codec import Codec, CodecError, Encoded
from .codecs import get_codec
from .robust import ROBUST_REDUCTIONS, AgreementTracker, robust_mean, sign_agreements, trust_weights
from .strategies import LionCubStrategy, SyncStrategy, _check_weights
from .vote import majority_vote

__all__ = ["MeanReducer", "Reducer", "TrustedVoteReducer"]

log = logging.getLogger(__name__)


@runtime_checkable
class Reducer(Protocol):
    """How one exchange encodes, reduces and decodes a vector (pure math, no I/O).

    ``weights`` are the non-negative integer sample counts behind each part (not all zero).
    """

    def encode(self, vec: torch.Tensor) -> Encoded:
        """Encode this peer's slice of the vector for one shard."""
        ...

    def reduce(self, parts: Sequence[Encoded], weights: Sequence[int] | None = None) -> Encoded:
        """Owner side: combine the members' payloads of one shard into the result payload."""
        ...

    def decode(self, result: Encoded) -> torch.Tensor:
        """Member side: the float32 values of one shard from the owner's result payload."""
        ...

    def local_fallback(self, own_part: Encoded, weight: int = 1) -> Encoded:
        """The result to use for a shard whose owner never answered: this peer's own contribution."""
        ...


class MeanReducer:
    """Robust weighted mean of float payloads, re-encoded with the same codec (``"fp16"``, ``"int8"``, ...).

    Args:
        codec_name: the canonical codec name of the payloads.
        reduction: ``"mean"``, ``"clipped"`` or ``"median"`` (:func:`~lioncub.optim.robust.robust_mean`).
        reject_non_finite: drop a contribution that does not decode or holds NaN/Inf (counted in
            :attr:`rejected`) and reduce the rest; off, such a contribution makes ``reduce`` raise,
            so the whole shard falls back to local values.
        clip_factor: the clipping radius of ``"clipped"`` in median deviation norms.

    The result of one part is that part itself, so :meth:`local_fallback` returns the peer's own
    payload unchanged.
    """

    def __init__(
        self,
        codec_name: str,
        reduction: str = "mean",
        *,
        reject_non_finite: bool = True,
        clip_factor: float = 2.0,
    ) -> None:
        codec = get_codec(codec_name)
        if codec.name != codec_name:
            raise ValueError(f"codec {codec_name!r} resolves to {codec.name!r}; use the canonical name")
        if reduction not in ROBUST_REDUCTIONS:
            raise ValueError(f"reduction must be one of {', '.join(ROBUST_REDUCTIONS)}, got {reduction!r}")
        self.codec: Codec = codec
        self.reduction = reduction
        self.reject_non_finite = reject_non_finite
        self.clip_factor = clip_factor
        #: Contributions dropped so far because they did not decode to finite values.
        self.rejected = 0

    def __repr__(self) -> str:
        return f"MeanReducer({self.codec.name!r}, {self.reduction!r})"

    def encode(self, vec: torch.Tensor) -> Encoded:
        return self.codec.encode(vec)

    def _decode_part(self, index: int, part: Encoded) -> torch.Tensor | None:
        try:
            values = self.codec.decode(part, torch.float32)
            if values.numel() and not bool(torch.isfinite(values).all()):
                raise CodecError(f"{part.codec} contribution has NaN/Inf values")
        except CodecError as exc:
            if not self.reject_non_finite:
                raise
            self.rejected += 1
            log.info("dropped contribution %d of a %s reduction: %s", index, self.codec.name, exc)
            return None
        return values

    def reduce(self, parts: Sequence[Encoded], weights: Sequence[int] | None = None) -> Encoded:
        if not parts:
            raise ValueError("nothing to reduce: no parts")
        w = _check_weights(weights, len(parts))
        numel = parts[0].numel
        if any(p.numel != numel for p in parts):
            raise ValueError(f"parts disagree on length: {[p.numel for p in parts]}")
        kept: list[tuple[torch.Tensor, int]] = []
        for i, (part, wi) in enumerate(zip(parts, w, strict=True)):
            values = self._decode_part(i, part)
            if values is not None and wi:
                kept.append((values, wi))
        if not kept:
            raise ValueError("no contribution with a positive weight decoded to finite values")
        mean = robust_mean(
            [v for v, _ in kept], [float(x) for _, x in kept], self.reduction, clip_factor=self.clip_factor
        )
        return self.codec.encode(mean)

    def decode(self, result: Encoded) -> torch.Tensor:
        return self.codec.decode(result, torch.float32)

    def local_fallback(self, own_part: Encoded, weight: int = 1) -> Encoded:
        self.codec.check(own_part)
        return own_part


class TrustedVoteReducer:
    """A sign-vote strategy whose owner weighs each voter by its agreement with the majority.

    ``reduce_from(senders, parts, weights)`` first takes the majority with the current trust of
    each sender (:class:`~lioncub.optim.robust.AgreementTracker`, the owner's own vote always at
    full weight), then scores every sender's agreement with it for the next rounds, then reduces
    with the strategy (``mavo`` or ``avg``) under the same trust weights. ``reduce`` without
    senders is the plain strategy. Everything else is delegated to ``strategy``, whose uplink must
    be ``sign1``.
    """

    def __init__(
        self, strategy: SyncStrategy, tracker: AgreementTracker, owner_id: str | None = None
    ) -> None:
        if strategy.uplink.name != "sign1":
            raise ValueError(
                f"trust scoring needs sign1 votes, strategy {strategy.name!r} sends {strategy.uplink.name}"
            )
        self.strategy = strategy
        self.tracker = tracker
        self.owner_id = owner_id
        #: The trust each sender had in the last ``reduce_from`` (for logs and reports).
        self.last_trust: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"TrustedVoteReducer({self.strategy.name!r}, {self.tracker!r})"

    def encode(self, vec: torch.Tensor) -> Encoded:
        return self.strategy.encode(vec)

    def reduce(self, parts: Sequence[Encoded], weights: Sequence[int] | None = None) -> Encoded:
        return self.strategy.reduce(parts, weights)

    def reduce_from(
        self, senders: Sequence[str], parts: Sequence[Encoded], weights: Sequence[int] | None = None
    ) -> Encoded:
        if len(senders) != len(parts) or len(set(senders)) != len(senders):
            raise ValueError(f"need one distinct sender per part, got {list(senders)} for {len(parts)} parts")
        samples = [1] * len(parts) if weights is None else [int(x) for x in weights]
        trust = self.tracker.weights(senders)
        if self.owner_id in trust:
            trust[self.owner_id] = 1.0
        self.last_trust = dict(trust)
        levels = self.tracker.config.levels
        w = trust_weights(samples, [trust[s] for s in senders], levels)
        if sum(w) == 0:  # nobody trusted (cannot happen with the owner's own vote): count everyone
            w = trust_weights(samples, [1.0] * len(senders), levels)
        majority = majority_vote(parts, w)
        scored = [(s, p) for s, p in zip(senders, parts, strict=True) if s != self.owner_id]
        agreements = sign_agreements([p for _, p in scored], majority)
        for (sender, _), agreement in zip(scored, agreements, strict=True):
            self.tracker.observe(sender, agreement)
        # The strategy's own reduction under the same weights (its tie rule included): for mavo
        # that is the majority just taken, so it is settled rather than voted a second time.
        if isinstance(self.strategy, LionCubStrategy) and self.strategy.config.reduction == "mavo":
            return self.strategy.settle_ties(majority, parts)
        return self.strategy.reduce(parts, w)

    def decode(self, result: Encoded) -> torch.Tensor:
        return self.strategy.decode(result)

    def local_fallback(self, own_part: Encoded, weight: int = 1) -> Encoded:
        return self.strategy.local_fallback(own_part, weight)


def _is_reducer(
    strategy: SyncStrategy, mean: MeanReducer, trusted: TrustedVoteReducer
) -> tuple[Reducer, Reducer, Reducer]:
    return strategy, mean, trusted  # mypy checks that all satisfy the Reducer protocol
