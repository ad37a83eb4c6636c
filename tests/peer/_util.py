"""Small test helpers: bounded polling instead of sleeps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> T:
    """Call ``predicate`` until it returns something truthy and return that; fail after ``timeout`` s.

    For state that propagates asynchronously (DHT replication, expiry): the poll interval grows
    from ``interval`` to 0.5 s, and the last falsy value is shown in the failure.
    """
    deadline = time.monotonic() + timeout
    last = predicate()
    while not last:
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout:.1f} s waiting for {what or predicate!r}; last: {last!r}"
            )
        time.sleep(interval)
        interval = min(interval * 1.5, 0.5)
        last = predicate()
    assert last is not None
    return last
