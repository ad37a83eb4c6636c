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

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from .codec import Codec, Encoded
from .codecs import get_codec
from .strategies import SyncStrategy, weighted_mean

__all__ = ["MeanReducer", "Reducer"]


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
    """Weighted mean of float payloads, re-encoded with the same codec (``"fp16"``, ``"int8"``, ...).

    The result of one part is that part itself, so :meth:`local_fallback` returns the peer's own
    payload unchanged.
    """

    def __init__(self, codec_name: str) -> None:
        codec = get_codec(codec_name)
        if codec.name != codec_name:
            raise ValueError(f"codec {codec_name!r} resolves to {codec.name!r}; use the canonical name")
        self.codec: Codec = codec

    def __repr__(self) -> str:
        return f"MeanReducer({self.codec.name!r})"

    def encode(self, vec: torch.Tensor) -> Encoded:
        return self.codec.encode(vec)

    def reduce(self, parts: Sequence[Encoded], weights: Sequence[int] | None = None) -> Encoded:
        return self.codec.encode(weighted_mean(self.codec, parts, weights))

    def decode(self, result: Encoded) -> torch.Tensor:
        return self.codec.decode(result, torch.float32)

    def local_fallback(self, own_part: Encoded, weight: int = 1) -> Encoded:
        self.codec.check(own_part)
        return own_part


def _is_reducer(strategy: SyncStrategy, mean: MeanReducer) -> tuple[Reducer, Reducer]:
    return strategy, mean  # mypy checks that both satisfy the Reducer protocol
