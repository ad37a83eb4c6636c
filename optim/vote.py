"""Group reductions on packed payloads: weighted majority vote, vote tallies, p-bit sum-then-sign.

The fast paths count sign bits bit-sliced over 64-bit words (see :mod:`._bitslice`) and never unpack
to floats; ``*_reference`` are plain numpy versions of the same functions, kept for tests and
benchmarks. Weights are the non-negative integer sample counts of the voters; they are divided by
their gcd first, so equal weights behave exactly like an unweighted vote.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch

from . import _bitpack as bp
from ._bitslice import Plane, compare_double, weighted_count
from .codec import CodecError, Encoded
from .codecs import CountsCodec, PBitCodec, SignCodec, TernaryCodec, get_codec

__all__ = [
    "break_ties",
    "majority_vote",
    "majority_vote_reference",
    "pbit_sum_sign",
    "vote_counts",
    "vote_counts_reference",
]

_SIGN = SignCodec()
_TERN = TernaryCodec()


def _reduced_weights(weights: Sequence[int] | None, count: int) -> list[int]:
    if weights is None:
        return [1] * count
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} payloads")
    try:
        values = [operator.index(w) for w in weights]
    except TypeError:
        raise ValueError(f"weights must be integers (samples processed), got {list(weights)!r}") from None
    if any(w < 0 for w in values):
        raise ValueError(f"weights must be >= 0, got {values}")
    divisor = math.gcd(*values)
    if divisor == 0:
        raise ValueError("at least one weight must be positive")
    return [w // divisor for w in values]


def _check_parts(parts: Sequence[Encoded], codec: str | None) -> int:
    """Validate a group of payloads of one codec and size; returns their element count."""
    if len(parts) == 0:
        raise ValueError("a vote needs at least one payload")
    first = parts[0]
    for i, part in enumerate(parts):
        if not isinstance(part, Encoded):
            raise TypeError(f"payload {i} is a {type(part).__name__}, not an Encoded")
        if part.codec != (codec or first.codec):
            raise CodecError(f"payload {i} uses codec {part.codec!r}, expected {codec or first.codec!r}")
        if part.numel != first.numel:
            raise CodecError(f"payload {i} has {part.numel} elements, payload 0 has {first.numel}")
        if part.data.device != first.data.device:
            raise ValueError(f"payload {i} is on {part.data.device}, payload 0 on {first.data.device}")
    return first.numel


def _sign_words(
    parts: Sequence[Encoded], weights: Sequence[int] | None
) -> tuple[list[torch.Tensor], list[int]]:
    """Checked sign1 payloads as int64 word planes, with their reduced (positive) weights."""
    numel = _check_parts(parts, _SIGN.name)
    reduced = _reduced_weights(weights, len(parts))
    for part in parts:
        _SIGN.check(part)
    used = numel % 8
    if used:
        last = torch.stack([part.data[-1] for part in parts])
        if bool((last >> used).any()):
            raise CodecError("a sign1 payload has nonzero padding bits")
    kept = [(bp.words_of(p.data), w) for p, w in zip(parts, reduced, strict=True) if w > 0]
    return [words for words, _ in kept], [w for _, w in kept]


def _plane_bytes(plane: Plane, nbytes: int, like: torch.Tensor) -> torch.Tensor:
    if plane is None:
        return torch.zeros(nbytes, dtype=torch.uint8, device=like.device)
    return plane.view(torch.uint8)[:nbytes]


def majority_vote(parts: Sequence[Encoded], weights: Sequence[int] | None = None) -> Encoded:
    """Weighted majority of ``sign1`` payloads as a ``tern`` payload.

    Per element: +1 where the weight of +1 votes is more than half the total, -1 where it is less,
    0 on an exact tie. ``weights`` are non-negative integers (default: all 1), not all zero.
    """
    voters, reduced = _sign_words(parts, weights)
    numel, nbytes = parts[0].numel, bp.nbytes_for(parts[0].numel)
    total = sum(reduced)
    greater, equal = compare_double(weighted_count(voters, reduced), total, voters[0])
    sign = _plane_bytes(greater, nbytes, voters[0])
    if equal is None or not bool(equal.any()):  # padding lanes count 0 < total: never equal
        return _TERN.from_planes(sign, None, numel)
    nonzero = _plane_bytes(~equal, nbytes, voters[0]).clone()
    if numel % 8:
        nonzero[-1] &= (1 << numel % 8) - 1
    return _TERN.from_planes(sign, nonzero, numel)


def break_ties(result: Encoded, seed: int) -> Encoded:
    """A ``tern`` vote result as ``sign1``: each 0 (a tie) becomes +1 or -1 with probability 1/2.

    The result costs 1 bit per element on the wire instead of 2 wherever a vote tied (an even group
    with equal weights ties on about a third of the elements), and the update it gives is still 0
    at a tie *in expectation*. The coin flips come from ``seed`` (a non-negative integer), so the
    same inputs give the same result; non-tied elements keep their sign.
    """
    _TERN.check(result)
    numel, width = result.numel, bp.nbytes_for(result.numel)
    sign = result.data[1 : 1 + width]
    if result.nbytes == 1 + width:  # no element is 0
        return Encoded(_SIGN.name, numel, sign.clone())
    nonzero = result.data[1 + width : 1 + 2 * width]
    gen = torch.Generator().manual_seed(seed)
    coins = torch.randint(0, 256, (width,), dtype=torch.uint8, generator=gen).to(sign.device)
    out = sign | (coins & ~nonzero)
    if numel % 8:
        out[-1] &= (1 << numel % 8) - 1
    return Encoded(_SIGN.name, numel, out)


def vote_counts(parts: Sequence[Encoded], weights: Sequence[int] | None = None) -> Encoded:
    """Weighted count of +1 votes of ``sign1`` payloads as a ``counts{b}`` payload.

    ``b`` is the bit length of the total weight after gcd reduction, which must stay below 2**32.
    """
    voters, reduced = _sign_words(parts, weights)
    numel, nbytes = parts[0].numel, bp.nbytes_for(parts[0].numel)
    total = sum(reduced)
    if total >= 1 << 32:
        raise ValueError(f"total weight {total} (after gcd reduction) does not fit the uint32 header")
    planes = weighted_count(voters, reduced)
    data = torch.cat([_plane_bytes(plane, nbytes, voters[0]) for plane in planes])
    return CountsCodec(total.bit_length()).from_planes(data, numel, total)


def pbit_sum_sign(parts: Sequence[Encoded], weights: Sequence[int] | None = None) -> Encoded:
    """Sign of the weighted sum of the integer levels of ``pbit{s}`` payloads, as ``tern``."""
    numel = _check_parts(parts, None)
    codec = get_codec(parts[0].codec)
    if not isinstance(codec, PBitCodec):
        raise CodecError(f"pbit_sum_sign needs pbit payloads, got codec {parts[0].codec!r}")
    reduced = _reduced_weights(weights, len(parts))
    acc = torch.zeros(numel, dtype=torch.int64, device=parts[0].data.device)
    for part, weight in zip(parts, reduced, strict=True):
        levels = codec.decode_levels(part)
        if weight:
            acc.add_(levels.to(torch.int64), alpha=weight)
    zero = acc == 0
    nonzero = bp.pack_bool(~zero) if bool(zero.any()) else None
    return _TERN.from_planes(bp.pack_bool(acc > 0), nonzero, numel)


def _reference_counts(parts: Sequence[Encoded], weights: Sequence[int] | None) -> tuple[np.ndarray, int]:
    numel = _check_parts(parts, _SIGN.name)
    reduced = _reduced_weights(weights, len(parts))
    counts = np.zeros(numel, dtype=np.int64)
    for part, weight in zip(parts, reduced, strict=True):
        _SIGN.check(part)
        if not bp.padding_is_zero(part.data, numel):
            raise CodecError("a sign1 payload has nonzero padding bits")
        raw = part.data.cpu().numpy()
        counts += weight * np.unpackbits(raw, count=numel, bitorder="little").astype(np.int64)
    return counts, sum(reduced)


def majority_vote_reference(parts: Sequence[Encoded], weights: Sequence[int] | None = None) -> Encoded:
    """:func:`majority_vote` by unpacking with numpy and summing (CPU result)."""
    counts, total = _reference_counts(parts, weights)
    return _TERN.encode(torch.from_numpy(np.sign(2 * counts - total).astype(np.float32)))


def vote_counts_reference(parts: Sequence[Encoded], weights: Sequence[int] | None = None) -> Encoded:
    """:func:`vote_counts` by unpacking with numpy and summing (CPU result)."""
    counts, total = _reference_counts(parts, weights)
    if total >= 1 << 32:
        raise ValueError(f"total weight {total} (after gcd reduction) does not fit the uint32 header")
    return CountsCodec(total.bit_length()).encode_counts(torch.from_numpy(counts), total)
