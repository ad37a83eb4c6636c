"""Per-peer Prometheus metrics: values, labels, the HTTP exporter on port 0, snapshots."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lioncub.peer.metrics import PeerMetrics

COUNTERS = [
    "bytes_sent",
    "bytes_received",
    "rounds",
    "round_failures",
    "momentum_syncs",
    "averagings",
    "samples",
]
GAUGES = ["round", "loss", "val_loss", "group_size", "peers_seen", "consensus_distance",
          "compute_utilization", "samples_per_second"]  # fmt: skip
HISTOGRAMS = ["round_seconds", "exchange_seconds"]


@pytest.fixture
def metrics() -> Iterator[PeerMetrics]:
    m = PeerMetrics("12D3KooWalice", "run-a")
    yield m
    m.close()


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """``/metrics`` as {sample name: [(labels, value)]}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def fill(m: PeerMetrics) -> None:
    m.add_bytes(sent=1000, received=400)
    m.add_bytes(sent=24)
    m.add_samples(64)
    m.record_round(3, seconds=1.5, loss=2.25)
    m.record_round(4, seconds=0.5)
    m.record_failure("matchmaking_timeout")
    m.record_failure("matchmaking_timeout")
    m.record_failure("peer_left")
    m.record_exchange(0.2, group_size=4)
    m.record_momentum_sync()
    m.record_averaging()
    m.set_val_loss(2.5)
    m.set_peers_seen(7)
    m.set_consensus_distance(0.125)
    m.set_compute_utilization(0.75)
    m.set_samples_per_second(320.0)


def test_scrape_over_http(metrics: PeerMetrics) -> None:
    fill(metrics)
    port = metrics.serve(port=0)
    assert port > 0
    got = scrape(port)
    labels = {"peer_id": "12D3KooWalice", "run_id": "run-a"}

    def value(name: str, **extra: str) -> float:
        (v,) = [v for lab, v in got[name] if lab == {**labels, **extra}]
        return v

    assert value("lioncub_bytes_sent_total") == 1024
    assert value("lioncub_bytes_received_total") == 400
    assert value("lioncub_rounds_total") == 2
    assert value("lioncub_round_failures_total", reason="matchmaking_timeout") == 2
    assert value("lioncub_round_failures_total", reason="peer_left") == 1
    assert value("lioncub_momentum_syncs_total") == 1
    assert value("lioncub_averagings_total") == 1
    assert value("lioncub_samples_total") == 64
    assert value("lioncub_round") == 4
    assert value("lioncub_loss") == 2.25
    assert value("lioncub_val_loss") == 2.5
    assert value("lioncub_group_size") == 4
    assert value("lioncub_peers_seen") == 7
    assert value("lioncub_consensus_distance") == 0.125
    assert value("lioncub_compute_utilization") == 0.75
    assert value("lioncub_samples_per_second") == 320
    assert value("lioncub_round_seconds_count") == 2
    assert value("lioncub_round_seconds_sum") == 2.0
    assert value("lioncub_round_seconds_bucket", le="1.0") == 1
    assert value("lioncub_exchange_seconds_count") == 1
    # Every lioncub series carries both identity labels.
    for name, samples in got.items():
        if name.startswith("lioncub_"):
            assert all(lab.items() >= labels.items() for lab, _ in samples), name


def test_two_peers_in_one_process_do_not_collide() -> None:
    with PeerMetrics("peer-a", "run") as a, PeerMetrics("peer-b", "run") as b:
        a.add_bytes(sent=10)
        b.add_bytes(sent=99)
        b.record_round(1, seconds=0.1)
        port_a, port_b = a.serve(), b.serve()
        assert port_a != port_b
        got_a, got_b = scrape(port_a), scrape(port_b)
    assert got_a["lioncub_bytes_sent_total"] == [({"peer_id": "peer-a", "run_id": "run"}, 10.0)]
    assert got_b["lioncub_bytes_sent_total"] == [({"peer_id": "peer-b", "run_id": "run"}, 99.0)]
    assert got_a["lioncub_rounds_total"][0][1] == 0 and got_b["lioncub_rounds_total"][0][1] == 1


def test_close_stops_the_exporter_and_is_idempotent() -> None:
    m = PeerMetrics("p", "r")
    port = m.serve()
    with pytest.raises(RuntimeError, match="already served"):
        m.serve()
    m.close()
    m.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)
    # It can be served again after closing.
    assert m.serve() > 0
    m.close()


def test_snapshot(metrics: PeerMetrics) -> None:
    fresh = metrics.snapshot()
    assert fresh["loss"] is None and fresh["val_loss"] is None and fresh["consensus_distance"] is None
    assert fresh["round_failures_total"] == {} and fresh["rounds_total"] == 0
    fill(metrics)
    snap = metrics.snapshot()
    json.dumps(snap, allow_nan=False)
    assert snap["peer_id"] == "12D3KooWalice" and snap["run_id"] == "run-a"
    assert snap["bytes_sent_total"] == 1024 and isinstance(snap["bytes_sent_total"], int)
    assert snap["round_failures_total"] == {"matchmaking_timeout": 2, "peer_left": 1}
    assert snap["round"] == 4 and snap["loss"] == 2.25 and snap["samples_per_second"] == 320
    assert snap["round_seconds"] == {"count": 2, "sum": 2.0}
    assert snap["exchange_seconds"]["count"] == 1
    expected = {f"{c}_total" for c in COUNTERS} | set(GAUGES) | set(HISTOGRAMS) | {"peer_id", "run_id"}
    assert set(snap) == expected


def test_a_diverged_loss_is_recorded() -> None:
    m = PeerMetrics("p", "r")
    m.set_loss(math.inf)
    assert m.snapshot()["loss"] == math.inf


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.add_bytes(sent=-1), "sent must be an integer >= 0"),
        (lambda m: m.add_samples(1.5), "samples must be an integer"),
        (lambda m: m.record_round(1, seconds=math.nan), "round seconds"),
        (lambda m: m.record_failure("Bad Reason!"), "snake_case"),
        (lambda m: m.record_exchange(0.1, group_size=-2), "group_size"),
        (lambda m: m.set_compute_utilization(1.5), r"\[0, 1\]"),
        (lambda m: m.set_consensus_distance(-1.0), "consensus distance"),
        (lambda m: m.set_samples_per_second(math.inf), "samples per second"),
    ],
)
def test_bad_values_are_refused(call: object, message: str) -> None:
    m = PeerMetrics("p", "r")
    with pytest.raises(ValueError, match=message):
        call(m)  # type: ignore[operator]


def test_identity_is_validated() -> None:
    with pytest.raises(ValueError, match="peer_id"):
        PeerMetrics("", "r")
    with pytest.raises(ValueError, match="run_id"):
        PeerMetrics("p", 3)  # type: ignore[arg-type]
