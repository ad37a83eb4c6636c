"""The swarm bench's pure analysis (``bench/swarm_metrics.py``): curves, targets, ratios. No root needed."""

from __future__ import annotations

import pytest

from bench.swarm_metrics import Ratio, RoundPoint, at_time, ratio, swarm_curve, time_to_target


def _pt(peer: int, t: float, samples: int, loss: float, sent: int = 0) -> RoundPoint:
    return RoundPoint(peer=peer, t=t, samples=samples, loss=loss, bytes_sent=sent, bytes_received=sent)


def test_curve_starts_once_every_peer_reported_and_pools_the_last_window_samples() -> None:
    points = [
        _pt(0, 1.0, 10, 4.0, 100),
        _pt(0, 2.0, 20, 3.0, 200),
        _pt(1, 2.5, 10, 3.0, 50),  # now both peers have reported
        _pt(1, 3.0, 20, 1.0, 150),
    ]
    curve = swarm_curve(points, n_peers=2, window=20)
    assert [c.t for c in curve] == [2.5, 3.0]
    # At 2.5 the last 20 samples are peer 0's second round and peer 1's first: (3 + 3) / 2.
    assert curve[0].loss == pytest.approx(3.0)
    assert curve[0].samples == 30
    assert curve[0].bytes_sent == pytest.approx(125.0)  # mean over peers of the cumulative counts
    # At 3.0: peer 1's rounds (3.0 and 1.0) cover the newest 20 samples.
    assert curve[1].loss == pytest.approx(2.0)
    assert curve[1].samples == 40


def test_curve_is_sample_weighted_and_ignores_repeated_events() -> None:
    points = [_pt(0, 1.0, 30, 3.0), _pt(0, 1.5, 30, 9.0), _pt(0, 2.0, 40, 1.0)]
    curve = swarm_curve(points, n_peers=1, window=40)
    assert len(curve) == 2  # the event that added no samples is skipped
    assert curve[-1].loss == pytest.approx((30 * 3.0 + 10 * 1.0) / 40)


def test_time_to_target_is_the_first_point_at_or_below() -> None:
    curve = swarm_curve(
        [_pt(0, t, 10 * (i + 1), loss) for i, (t, loss) in enumerate([(1, 3), (2, 2), (3, 1)])], 1, 1
    )
    hit = time_to_target(curve, 2.0)
    assert hit is not None and hit.t == 2 and hit.samples == 20
    assert time_to_target(curve, 0.5) is None


def test_at_time_interpolates_and_clamps() -> None:
    series = [(0.0, 0.0), (10.0, 100.0)]
    assert at_time(series, 5.0) == pytest.approx(50.0)
    assert at_time(series, -1.0) == 0.0
    assert at_time(series, 99.0) == 100.0
    assert at_time([], 1.0) is None


def test_ratio_bounds() -> None:
    assert ratio(100.0, 120.0, 20.0, 30.0) == Ratio(5.0, "exact")
    # The baseline missed the target in its 120 s: it needs more than that, so we are > 6x faster.
    r = ratio(None, 120.0, 20.0, 30.0)
    assert r.value == pytest.approx(6.0) and r.bound == "lower"
    # We missed it in 50 s, the baseline took 100 s: we are < 2x faster.
    r = ratio(100.0, 120.0, None, 50.0)
    assert r.value == pytest.approx(2.0) and r.bound == "upper"
    assert ratio(None, 1.0, None, 1.0).value is None
    assert ratio(10.0, 1.0, 0.0, 1.0).value is None  # free to reach: no finite ratio


def test_curve_validates_its_arguments() -> None:
    with pytest.raises(ValueError):
        swarm_curve([], n_peers=0, window=1)
    with pytest.raises(ValueError):
        swarm_curve([_pt(3, 1.0, 1, 1.0)], n_peers=2, window=1)
