"""Memory bound under a flood of oversized, stalled and trickling pushes (``bench/_fuzz_flood.py``).

Plus the byte budget itself: the bound holds exactly, a lone oversized hold is admitted, waiters are
woken by releases (events, never sleeps).
"""

from __future__ import annotations

import asyncio

import pytest

from bench._fuzz_flood import run_flood
from lioncub.peer._exchange_budget import BufferFull, BufferHold, ByteBudget


@pytest.mark.network
@pytest.mark.slow
def test_flood_stays_within_the_bound_and_the_peer_still_exchanges() -> None:
    report = run_flood(seed=7, members=6, chunk_timeout_s=0.5, oversized=12, outsiders=12)
    refused = {"RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_ARGUMENT"}
    for kind, statuses in report["statuses"].items():
        assert set(statuses) <= refused, (kind, statuses)
    assert report["statuses"]["oversized"] == {"RESOURCE_EXHAUSTED": 12}  # refused by gRPC, unread
    assert sum(report["statuses"]["stalled"].values()) + sum(report["statuses"]["trickle"].values()) == 12
    assert report["hub_peak_buffered_bytes_flood"] <= report["buffer_bound_bytes"]
    assert report["hub_peak_buffered_bytes_total"] <= report["buffer_bound_bytes"]
    assert report["hub_buffered_bytes_after_flood"] == 0
    assert report["legit_pushes"] == {"OK": 12}  # 12 MiB through a 4 MiB budget: flow control
    assert report["exchange_after_exact"] == {"update": True, "momentum": True}
    assert report["passed"]


def test_budget_admits_within_limit_and_refuses_beyond() -> None:
    async def main() -> None:
        budget = ByteBudget(100)
        a, b, c = BufferHold(budget), BufferHold(budget), BufferHold(budget)
        a.resize_now(60, "a")
        with pytest.raises(BufferFull):
            b.resize_now(41, "b")
        b.resize_now(40, "b")
        assert budget.used == 100
        a.release()
        b.release()
        c.resize_now(500, "c")  # alone: admitted although over the limit, so it can never starve
        with pytest.raises(BufferFull):
            a.resize_now(1, "a")
        c.release()
        assert budget.used == 0 and budget.peak == 500

    asyncio.run(main())


def test_waiting_hold_is_woken_by_a_release_and_times_out_otherwise() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        budget = ByteBudget(100)
        first, second = BufferHold(budget), BufferHold(budget)
        first.resize_now(80, "first")
        waiter = asyncio.create_task(second.resize(50, loop.time() + 60, "second"))
        for _ in range(100):  # bounded: a few loop turns until the waiter is parked on the budget
            if budget.waiting:
                break
            await asyncio.sleep(0)
        assert budget.waiting == 1 and not waiter.done()
        first.release()
        await waiter  # woken by the release
        assert budget.used == 50
        with pytest.raises(BufferFull):
            await first.resize(60, loop.time(), "first")  # no time left to wait
        second.release()
        assert budget.used == 0 and budget.peak == 80

    asyncio.run(main())
