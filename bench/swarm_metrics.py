"""Pure analysis for ``bench/swarm.py``: swarm loss curves, time/samples/bytes to a target, ratios.

No processes, no namespaces: plain data in, plain data out, so it is unit-tested without root.

The swarm's loss at a moment is the sample-weighted mean *training* loss of the most recent rounds,
of any peer, that cover the swarm's last ``window`` samples. The peers' round events carry
the mean training loss of the round's local steps on the peer's own shard (a batch not trained on
yet); they carry no validation loss, so validation loss is only known at the start and the end.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CurvePoint",
    "Ratio",
    "RoundPoint",
    "at_time",
    "ratio",
    "swarm_curve",
    "time_to_target",
]

Bound = Literal["exact", "lower", "upper"]


@dataclass(frozen=True)
class RoundPoint:
    """One peer's round event, on the bench's clock.

    Attributes:
        peer: peer index.
        t: seconds since the swarm's training began.
        samples: the peer's cumulative samples.
        loss: the round's mean training loss.
        bytes_sent, bytes_received: the peer's cumulative payload bytes.
    """

    peer: int
    t: float
    samples: int
    loss: float
    bytes_sent: int
    bytes_received: int


@dataclass(frozen=True)
class CurvePoint:
    """The swarm at one moment (only once every peer has reported a round).

    Attributes:
        t: seconds since training began.
        samples: samples summed over peers.
        loss: the smoothed training loss (see :func:`swarm_curve`).
        bytes_sent, bytes_received: mean over peers of cumulative payload bytes.
    """

    t: float
    samples: int
    loss: float
    bytes_sent: float
    bytes_received: float


class _Window:
    """The most recent rounds (of any peer) covering the last ``window`` samples."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.rounds: deque[tuple[int, float]] = deque()
        self.held = 0

    def add(self, samples: int, loss: float) -> None:
        if samples <= 0:
            return
        self.rounds.append((samples, loss))
        self.held += samples
        while len(self.rounds) > 1 and self.held - self.rounds[0][0] >= self.window:
            self.held -= self.rounds.popleft()[0]

    def mean(self) -> float:
        return sum(n * loss for n, loss in self.rounds) / max(1, self.held)


def swarm_curve(points: Iterable[RoundPoint], n_peers: int, window: int) -> list[CurvePoint]:
    """The swarm's smoothed loss, samples and mean bytes after each round event (in time order).

    The loss is the sample-weighted mean of the most recent rounds, of any peer, that cover the
    swarm's last ``window`` samples: the same number of samples whatever a strategy's round size,
    so the lag of the estimate is the same in samples for every strategy.
    """
    if n_peers < 1 or window < 1:
        raise ValueError(f"n_peers and window must be >= 1, got {n_peers}, {window}")
    pooled = _Window(window)
    samples = [0] * n_peers
    sent = [0] * n_peers
    received = [0] * n_peers
    seen: set[int] = set()
    out: list[CurvePoint] = []
    for p in sorted(points, key=lambda q: q.t):
        if not 0 <= p.peer < n_peers:
            raise ValueError(f"peer index {p.peer} out of range for {n_peers} peers")
        new = p.samples - samples[p.peer]
        if new <= 0:
            continue
        samples[p.peer] = p.samples
        pooled.add(new, p.loss)
        sent[p.peer] = max(sent[p.peer], p.bytes_sent)
        received[p.peer] = max(received[p.peer], p.bytes_received)
        seen.add(p.peer)
        if len(seen) < n_peers:
            continue
        out.append(
            CurvePoint(
                t=p.t,
                samples=sum(samples),
                loss=pooled.mean(),
                bytes_sent=sum(sent) / n_peers,
                bytes_received=sum(received) / n_peers,
            )
        )
    return out


def time_to_target(curve: Sequence[CurvePoint], target: float) -> CurvePoint | None:
    """The first point of ``curve`` at or below ``target``, or None."""
    return next((c for c in curve if c.loss <= target), None)


def at_time(series: Sequence[tuple[float, float]], t: float) -> float | None:
    """Linear interpolation of a ``(time, value)`` series (sorted by time) at ``t``; None if empty."""
    if not series:
        return None
    if t <= series[0][0]:
        return series[0][1]
    for (t0, v0), (t1, v1) in itertools.pairwise(series):
        if t0 <= t <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    return series[-1][1]


@dataclass(frozen=True)
class Ratio:
    """``baseline / ours`` of a cost to reach the target (time, bytes), with what it is.

    Attributes:
        value: the ratio, or None when neither side reached the target.
        bound: ``exact`` (both reached it), ``lower`` (only we did: the baseline's cost is at
            least what it spent), ``upper`` (only the baseline did).
    """

    value: float | None
    bound: Bound | None


def ratio(
    baseline_to_target: float | None,
    baseline_spent: float,
    ours_to_target: float | None,
    ours_spent: float,
) -> Ratio:
    """How many times less we needed than the baseline to reach the target.

    ``*_to_target`` is the cost when the target was reached (None when not); ``*_spent`` the cost
    of the whole run, a lower bound on the cost to the target when it was missed.
    """
    if ours_to_target is not None and ours_to_target <= 0:
        return Ratio(None, None)  # free to reach: no finite ratio
    if baseline_to_target is not None and ours_to_target is not None:
        return Ratio(baseline_to_target / ours_to_target, "exact")
    if ours_to_target is not None and baseline_spent > 0:
        return Ratio(baseline_spent / ours_to_target, "lower")
    if baseline_to_target is not None and ours_spent > 0:
        return Ratio(baseline_to_target / ours_spent, "upper")
    return Ratio(None, None)
