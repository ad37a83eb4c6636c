"""Bit-sliced integer arithmetic on packed words (torch int64 tensors used as 64 lanes of one bit).

A vector of small unsigned integers is a list of bit planes, least significant first; ``None`` stands
for a plane known to be all zeros, which saves both memory and work. Every operation is bitwise, so
the lane order inside a word does not matter and the code runs unchanged on any device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Plane", "compare_double", "weighted_count"]

Plane = torch.Tensor | None


def _and(a: Plane, b: Plane) -> Plane:
    return None if a is None or b is None else a & b


def _xor(a: Plane, b: Plane) -> Plane:
    if a is None:
        return b
    return a if b is None else a ^ b


def _or(a: Plane, b: Plane) -> Plane:
    if a is None:
        return b
    return a if b is None else a | b


def _count_unit(voters: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Planes of ``sum(voters)`` (each a 0/1 plane) by a ripple-carry increment per voter."""
    counter: list[torch.Tensor] = []
    for i, vote in enumerate(voters):
        needed = (i + 1).bit_length()  # the count after this voter is at most i + 1
        carry = vote
        for j, plane in enumerate(counter):
            if j == needed - 1:  # top plane: the carry out of it is zero
                plane ^= carry
                break
            next_carry = plane & carry
            plane ^= carry
            carry = next_carry
        else:
            counter.append(carry.clone() if carry is vote else carry)
    return counter


def _add_shifted(total: list[Plane], addend: Sequence[Plane], shift: int, width: int) -> list[Plane]:
    """``total + addend * 2**shift`` as ``width`` planes (the caller guarantees it fits)."""
    out = list(total) + [None] * (width - len(total))
    carry: Plane = None
    for j in range(shift, width):
        a, b = out[j], addend[j - shift] if j - shift < len(addend) else None
        if b is None and carry is None:
            break
        half = _xor(a, b)
        out[j] = _xor(half, carry)
        carry = _or(_and(a, b), _and(half, carry))
    return out


def weighted_count(voters: Sequence[torch.Tensor], weights: Sequence[int]) -> list[Plane]:
    """Planes of ``sum_i weights[i] * voters[i]`` for 0/1 word planes and positive integer weights.

    Voters are grouped by the bits of their weights: each group is counted with unit weights, then
    added at the group's bit position. Returns ``sum(weights).bit_length()`` planes. The voter
    tensors are never modified.
    """
    groups: dict[int, list[torch.Tensor]] = {}
    for vote, weight in zip(voters, weights, strict=True):
        assert weight > 0, "weights must be positive here"
        for bit in range(weight.bit_length()):
            if weight >> bit & 1:
                groups.setdefault(bit, []).append(vote)
    total: list[Plane] = []
    bound = 0
    for bit in sorted(groups):
        members = groups[bit]
        bound += len(members) << bit
        total = _add_shifted(total, _count_unit(members), bit, bound.bit_length())
    return total


def compare_double(planes: Sequence[Plane], total: int, like: torch.Tensor) -> tuple[Plane, Plane]:
    """Lanes where ``2 * count > total`` and where ``2 * count == total`` (``count`` given as planes).

    A most-significant-first comparison against the constant: ``equal`` holds the lanes whose prefix
    of ``2 * count`` still matches ``total``; a lane becomes ``greater`` where ``total`` has a 0 bit and
    the lane a 1 while equal so far. ``like`` supplies the shape and device of the all-ones start.
    """
    assert total >= 0 and len(planes) <= total.bit_length() + 1, "count planes exceed the total"
    greater: Plane = None
    equal: Plane = torch.full_like(like, -1)
    for j in range(max(len(planes), total.bit_length()), -1, -1):
        lane = planes[j - 1] if 1 <= j <= len(planes) else None  # bit j of 2 * count
        if total >> j & 1:
            equal = _and(equal, lane)
        else:
            hit = _and(equal, lane)
            greater = _or(greater, hit)
            equal = _xor(equal, hit)
    return greater, equal
