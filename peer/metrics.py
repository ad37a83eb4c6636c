"""Prometheus metrics of one peer, on its own registry, with an optional HTTP exporter.

Every series carries ``peer_id`` and ``run_id`` labels, so several peers can share a process (and a
scrape target pool) without colliding. :meth:`PeerMetrics.snapshot` gives the same numbers as plain
data for ``--summary`` JSON and the status table.
"""

from __future__ import annotations

import math
import re
import socket
import threading
from socketserver import ThreadingMixIn
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

__all__ = ["PeerMetrics"]

_PREFIX = "lioncub_"
_LABELS = ("peer_id", "run_id")
_REASON = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_ROUND_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, math.inf)
_EXCHANGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, math.inf)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a line each."""


def _count(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}")
    return value


def _seconds(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
        raise ValueError(f"{what} must be a finite number of seconds >= 0, got {value!r}")
    return float(value)


class PeerMetrics:
    """The counters, gauges and histograms of one peer of one run.

    Args:
        peer_id: this peer's id (a label on every series).
        run_id: the run it trains (a label on every series).
    """

    def __init__(self, peer_id: str, run_id: str) -> None:
        for name, value in (("peer_id", peer_id), ("run_id", run_id)):
            if not isinstance(value, str) or not 0 < len(value) <= 256:
                raise ValueError(f"{name} must be a string of 1-256 characters, got {value!r:.80}")
        self.peer_id, self.run_id = peer_id, run_id
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        reg, labels = self.registry, (peer_id, run_id)

        def counter(name: str, doc: str) -> Counter:
            return Counter(_PREFIX + name, doc, _LABELS, registry=reg).labels(*labels)

        def gauge(name: str, doc: str, initial: float = 0.0) -> Gauge:
            g = Gauge(_PREFIX + name, doc, _LABELS, registry=reg).labels(*labels)
            g.set(initial)
            return g

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(_PREFIX + name, doc, _LABELS, registry=reg, buckets=buckets).labels(*labels)

        self._bytes_sent = counter("bytes_sent", "Payload bytes sent to other peers.")
        self._bytes_received = counter("bytes_received", "Payload bytes received from other peers.")
        self._rounds = counter("rounds", "Outer rounds completed.")
        self._failures = Counter(
            _PREFIX + "round_failures", "Rounds that fell back to the local update, by reason.",
            (*_LABELS, "reason"), registry=reg,
        )  # fmt: skip
        self._momentum_syncs = counter("momentum_syncs", "Outer momentum synchronisations done.")
        self._averagings = counter("averagings", "Parameter averagings done.")
        self._samples = counter("samples", "Training samples consumed.")
        self._round = gauge("round", "The current outer round.")
        self._loss = gauge("loss", "The latest training loss.", math.nan)
        self._val_loss = gauge("val_loss", "The latest validation loss.", math.nan)
        self._group_size = gauge("group_size", "Members of the latest exchange group.")
        self._peers_seen = gauge("peers_seen", "Live peers of the run known from the DHT.")
        self._consensus = gauge(
            "consensus_distance", "Distance of the local anchor from the group mean.", math.nan
        )
        self._utilization = gauge("compute_utilization", "Fraction of wall time spent computing.")
        self._throughput = gauge("samples_per_second", "Training samples per second.")
        self._round_seconds = histogram("round_seconds", "Wall time of an outer round.", _ROUND_BUCKETS)
        self._exchange_seconds = histogram(
            "exchange_seconds", "Wall time of one exchange.", _EXCHANGE_BUCKETS
        )

    def add_bytes(self, sent: int = 0, received: int = 0) -> None:
        """Count payload bytes sent to and received from other peers."""
        self._bytes_sent.inc(_count(sent, "sent"))
        self._bytes_received.inc(_count(received, "received"))

    def add_samples(self, n: int) -> None:
        """Count ``n`` training samples consumed."""
        self._samples.inc(_count(n, "samples"))

    def record_round(self, round_: int, *, seconds: float, loss: float | None = None) -> None:
        """A round finished: it is now ``round_`` and the round took ``seconds``."""
        self._round.set(_count(round_, "round"))
        self._round_seconds.observe(_seconds(seconds, "round seconds"))
        self._rounds.inc()
        if loss is not None:
            self.set_loss(loss)

    def record_failure(self, reason: str) -> None:
        """A round fell back to the local update; ``reason`` is a short snake_case word."""
        if not isinstance(reason, str) or not _REASON.match(reason):
            raise ValueError(f"reason must be 1-32 characters of snake_case, got {reason!r:.80}")
        self._failures.labels(self.peer_id, self.run_id, reason).inc()

    def record_exchange(self, seconds: float, *, group_size: int) -> None:
        """An exchange inside a group of ``group_size`` members took ``seconds``."""
        self._exchange_seconds.observe(_seconds(seconds, "exchange seconds"))
        self._group_size.set(_count(group_size, "group_size"))

    def record_momentum_sync(self) -> None:
        self._momentum_syncs.inc()

    def record_averaging(self) -> None:
        self._averagings.inc()

    def set_loss(self, loss: float) -> None:
        """The latest training loss (NaN and infinity are recorded as they are)."""
        self._loss.set(float(loss))

    def set_val_loss(self, loss: float) -> None:
        self._val_loss.set(float(loss))

    def set_peers_seen(self, n: int) -> None:
        self._peers_seen.set(_count(n, "peers_seen"))

    def set_consensus_distance(self, distance: float) -> None:
        """Distance of the local anchor from the group's; NaN means unknown."""
        if not (math.isnan(distance) or 0.0 <= distance < math.inf):
            raise ValueError(f"consensus distance must be a finite number >= 0 or NaN, got {distance!r}")
        self._consensus.set(float(distance))

    def set_compute_utilization(self, fraction: float) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"compute utilization must be a fraction in [0, 1], got {fraction!r}")
        self._utilization.set(float(fraction))

    def set_samples_per_second(self, rate: float) -> None:
        if not 0.0 <= rate < math.inf:
            raise ValueError(f"samples per second must be a finite number >= 0, got {rate!r}")
        self._throughput.set(float(rate))

    def snapshot(self) -> dict[str, Any]:
        """Current values as JSON-able data, keyed by metric name without the ``lioncub_`` prefix.

        Counters are ints; unset gauges (NaN) are None; histograms give ``{"count", "sum"}``;
        ``round_failures_total`` maps reason to count.
        """
        out: dict[str, Any] = {"peer_id": self.peer_id, "run_id": self.run_id, "round_failures_total": {}}
        for family in self.registry.collect():
            for s in family.samples:
                key = s.name.removeprefix(_PREFIX)
                if family.type == "counter" and s.name.endswith("_total"):
                    if "reason" in s.labels:
                        out[key][s.labels["reason"]] = int(s.value)
                    else:
                        out[key] = int(s.value)
                elif family.type == "gauge":
                    out[key] = None if math.isnan(s.value) else s.value
                elif family.type == "histogram" and s.name.endswith(("_count", "_sum")):
                    base, _, part = key.rpartition("_")
                    out.setdefault(base, {})[part] = int(s.value) if part == "count" else s.value
        return out

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Start the ``/metrics`` HTTP exporter on a daemon thread; return the port it bound."""
        with self._lock:
            if self._server is not None:
                raise RuntimeError(f"metrics of peer {self.peer_id} are already served")
            server_class = _Server6 if ":" in host else _Server
            server = make_server(host, port, make_wsgi_app(self.registry), server_class, _QuietHandler)
            thread = threading.Thread(
                target=server.serve_forever, args=(0.05,), name=f"metrics-{self.peer_id[-6:]}", daemon=True
            )
            thread.start()
            self._server, self._thread = server, thread
            return int(server.server_port)

    def close(self) -> None:
        """Stop the exporter if it runs; idempotent."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is not None and thread is not None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5.0)

    def __enter__(self) -> PeerMetrics:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
