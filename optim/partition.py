"""Shard plans: which contiguous slice of the flat parameter vector each group member owns."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["SHARD_ALIGN", "shard_bounds"]

#: Shard boundaries fall on multiples of this many elements, so packed sign bytes (and the
#: uint64 words the vote works on) never straddle two shards.
SHARD_ALIGN = 64


def shard_bounds(numel: int, capacities: Sequence[float], align: int = SHARD_ALIGN) -> list[tuple[int, int]]:
    """Split ``[0, numel)`` into one contiguous range per member, sized by ``capacities``.

    Members with capacity 0 (client-mode peers) get an empty range. Sizes are proportional to
    capacity (e.g. upload bandwidth), rounded to multiples of ``align`` except the last non-empty
    range, which absorbs the remainder. Deterministic: every member computes the same plan.
    """
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    if align < 1:
        raise ValueError(f"align must be >= 1, got {align}")
    if not capacities:
        raise ValueError("a shard plan needs at least one member")
    if any(c < 0 or c != c or c == float("inf") for c in capacities):
        raise ValueError(f"capacities must be finite and >= 0, got {list(capacities)}")
    total = float(sum(capacities))
    if total <= 0:
        raise ValueError("at least one member must own a shard (all capacities are 0)")
    owners = [i for i, c in enumerate(capacities) if c > 0]
    last_owner = owners[-1]
    bounds: list[tuple[int, int]] = []
    start = 0
    acc = 0.0
    for i, cap in enumerate(capacities):
        if cap <= 0:
            bounds.append((start, start))
            continue
        if i == last_owner:
            end = numel
        else:
            acc += cap
            end = min(numel, round(numel * acc / total / align) * align)
            end = max(end, start)
        bounds.append((start, end))
        start = end
    return bounds
