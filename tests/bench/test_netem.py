"""The namespace swarm builder of ``bench/netem.py``: shaped links shape, teardown leaves nothing.

Needs root and ``ip netns``; skipped with the reason otherwise. A functional check of the shaper
(a bounded TCP transfer between two namespaces runs near the configured rate), not a speed
threshold on lioncub's code.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.netem import NetemError, NetemSwarm, cleanup, list_namespaces, unavailable_reason
from bench.profiles import Link, Profile, get_profile

_REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"netem unavailable: {_REASON}")

RATE_MBIT = 20.0
PAYLOAD = 3_000_000  # bytes: ~1.2 s at 20 Mbit/s

# Receiver: accept one connection, read until EOF or PAYLOAD bytes or 30 s, report JSON.
_SERVER = """
import json, socket, sys, time
want = int(sys.argv[2])
srv = socket.create_server((sys.argv[1], 0))
srv.settimeout(30)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.settimeout(30)
got, first, deadline = 0, None, time.monotonic() + 30
while got < want and time.monotonic() < deadline:
    chunk = conn.recv(1 << 16)
    if not chunk:
        break
    if first is None:
        first = time.monotonic()
    got += len(chunk)
print(json.dumps({"bytes": got, "seconds": time.monotonic() - (first or time.monotonic())}), flush=True)
"""

# Sender: connect and send PAYLOAD bytes (bounded by the socket timeout), then close.
_CLIENT = """
import socket, sys
want = int(sys.argv[3])
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
block = b"x" * (1 << 16)
sent = 0
while sent < want:
    sent += sock.send(block[: min(len(block), want - sent)])
sock.close()
"""


def _ours(prefix: str) -> list[str]:
    return [ns for ns in list_namespaces() if ns.startswith(prefix)]


def test_shaped_transfer_runs_near_the_rate_and_teardown_removes_everything() -> None:
    profile = Profile("test-20", "20/20 Mbit/s", (Link(RATE_MBIT, RATE_MBIT),))
    with NetemSwarm(profile, n_peers=2, dht_node=False) as net:
        prefix = net.prefix
        a, b = net.peer_ns(0), net.peer_ns(1)
        assert len(_ours(prefix)) == 3  # two peers and the switch
        server = net.run_in(
            b,
            [sys.executable, "-c", _SERVER, net.address(b), str(PAYLOAD)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        client = net.run_in(a, [sys.executable, "-c", _CLIENT, net.address(b), port, str(PAYLOAD)])
        assert client.wait(timeout=40) == 0
        result = json.loads(server.stdout.readline())
        assert server.wait(timeout=10) == 0
        sent = net.counters(a)
        assert sent.tx_bytes >= PAYLOAD  # payload + headers went out on a's shaped link
    assert result["bytes"] == PAYLOAD
    mbit = result["bytes"] * 8 / result["seconds"] / 1e6
    assert 0.5 * RATE_MBIT <= mbit <= 1.3 * RATE_MBIT, f"measured {mbit:.1f} Mbit/s on a {RATE_MBIT} link"
    assert _ours(prefix) == []
    assert server.poll() is not None and client.poll() is not None


def test_teardown_on_exception_kills_processes_in_the_namespaces() -> None:
    sleeper: subprocess.Popen[bytes] | None = None
    with pytest.raises(RuntimeError, match="boom"), NetemSwarm(get_profile("uniform-100"), n_peers=1) as net:
        prefix = net.prefix
        sleeper = net.run_in(net.peer_ns(0), [sys.executable, "-c", "import time; time.sleep(60)"])
        raise RuntimeError("boom")
    assert sleeper is not None
    sleeper.wait(timeout=10)  # teardown killed it: returns at once, raises if it is still alive
    assert _ours(prefix) == []


def test_cleanup_by_prefix_removes_leftovers() -> None:
    net = NetemSwarm(get_profile("volunteer"), n_peers=2)
    net.start()
    try:
        # Simulate a crash: forget the swarm without closing it, then clean up by prefix.
        assert len(_ours(net.prefix)) == 4
        assert net.link(net.peer_ns(1)) == Link(50, 10)
        removed = cleanup(net.prefix)
        assert sorted(removed) == sorted([*net.nodes, net.switch_ns])
        assert _ours(net.prefix) == []
    finally:
        net.close()  # idempotent on already-deleted namespaces


def test_run_in_refuses_unknown_or_closed_namespaces() -> None:
    net = NetemSwarm(get_profile("uniform-20"), n_peers=1, dht_node=False)
    with pytest.raises(KeyError):
        net.address("nope")
    with pytest.raises(NetemError):
        net.run_in(net.peer_ns(0), ["true"])  # not started
