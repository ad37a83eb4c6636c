"""Shard plans, sync schedules and the consensus distance."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lioncub.optim.partition import SHARD_ALIGN, shard_bounds
from lioncub.optim.schedules import SyncSchedule, consensus_distance


@given(
    numel=st.integers(0, 10_000_000),
    caps=st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0, 100.0]), min_size=1, max_size=12).filter(any),
)
def test_shard_bounds_cover_everything_once(numel: int, caps: list[float]) -> None:
    bounds = shard_bounds(numel, caps)
    assert len(bounds) == len(caps)
    pos = 0
    for (lo, hi), cap in zip(bounds, caps, strict=True):
        assert lo == pos and hi >= lo
        if cap == 0:
            assert hi == lo
        pos = hi
    assert pos == numel
    for lo, hi in bounds:
        if hi > lo:
            assert lo % SHARD_ALIGN == 0


def test_shard_bounds_follow_capacity() -> None:
    bounds = shard_bounds(64 * 100, [1.0, 3.0])
    assert bounds == [(0, 1600), (1600, 6400)]


@pytest.mark.parametrize("caps", [[], [0.0, 0.0], [-1.0], [float("nan")]])
def test_shard_bounds_reject_bad_plans(caps: list[float]) -> None:
    with pytest.raises(ValueError):
        shard_bounds(100, caps)


def test_every_k_schedule() -> None:
    assert SyncSchedule(every=3).due_rounds(10) == [3, 6, 9]
    assert SyncSchedule().due_rounds(10) == []


def test_geometric_schedule_gaps_grow() -> None:
    # T1 = 1, T_{j+1} = T_j + ceil(2^{j/k})
    assert SyncSchedule(geometric_k=1).due_rounds(40) == [1, 3, 7, 15, 31]
    assert SyncSchedule(geometric_k=2).due_rounds(20) == [1, 3, 5, 8, 12, 18]


def test_schedule_validation() -> None:
    with pytest.raises(ValueError):
        SyncSchedule(every=-1)
    with pytest.raises(ValueError):
        SyncSchedule(codec="fp8")


def test_consensus_distance() -> None:
    a = torch.tensor([1.0, 0.0])
    assert consensus_distance([a, a.clone()]) == 0.0
    b, c = torch.tensor([1.0, 1.0]), torch.tensor([1.0, -1.0])
    # mean = [1, 0]; each is distance 1 away; ‖mean‖ = 1.
    assert consensus_distance([b, c]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        consensus_distance([])
