"""``lioncub-peer health``: exit 0 against a live peer, 1 against a dead or non-answering one, fast.

In-process: a real :class:`PeerServer` on 127.0.0.1:0 (its Health reply is controlled by the test).
End to end: a real ``lioncub-peer join`` process and the real ``lioncub-peer health`` command.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from rich.console import Console

from lioncub.peer.cli_health import (
    DEFAULT_PORT,
    EndpointError,
    PeerUnreachable,
    check_health,
    cmd_health,
    default_endpoint,
    parse_endpoint,
)
from lioncub.peer.server import HealthInfo, PeerServer
from lioncub.protocol import Identity
from tests.deploy._deploy import parse_cli

pytestmark = pytest.mark.network

PEER_CLI = str(Path(sys.executable).parent / "lioncub-peer")


class FakePeer:
    """A PeerServer on 127.0.0.1:0 in a background event loop; ``alive`` and ``round`` are settable."""

    def __init__(self) -> None:
        self.alive = True
        self.round = 7
        self.identity = Identity.generate()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-peer", daemon=True)
        self._thread.start()
        self.server = self._call(
            PeerServer.start(
                "127.0.0.1:0",
                identity=self.identity,
                health=lambda: HealthInfo(run_id="health-test", round=self.round, alive=self.alive),
            )
        )

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    def close(self) -> None:
        self._call(self.server.stop(None))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def peer() -> Iterator[FakePeer]:
    fake = FakePeer()
    try:
        yield fake
    finally:
        fake.close()


def health(*argv: str) -> tuple[int, str]:
    """Run the ``health`` command in-process through the real parser; return (exit code, output)."""
    args = parse_cli(["health", *argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cmd_health(args, Console(file=out, width=400))
    return rc, out.getvalue()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_alive_peer_exits_0(peer: FakePeer) -> None:
    rc, out = health("--endpoint", peer.server.endpoint)
    assert rc == 0, out
    assert out.startswith("alive: ")
    assert f"peer {peer.identity.peer_id} run health-test round 7" in out


def test_json_output(peer: FakePeer) -> None:
    rc, out = health("--endpoint", peer.server.endpoint, "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["alive"] is True and doc["round"] == 7 and doc["peer_id"] == peer.identity.peer_id
    assert doc["endpoint"] == peer.server.endpoint and doc["protocol_version"] >= 1


def test_not_alive_peer_exits_1(peer: FakePeer) -> None:
    peer.alive = False
    rc, out = health("--endpoint", peer.server.endpoint)
    assert rc == 1
    assert out.startswith("NOT alive: ")


def test_default_endpoint_uses_lioncub_port(peer: FakePeer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIONCUB_PORT", str(peer.server.port))
    rc, out = health()
    assert rc == 0, out
    assert f"at 127.0.0.1:{peer.server.port}" in out


def test_dead_port_exits_1_quickly() -> None:
    port = closed_port()
    start = time.monotonic()
    rc, out = health("--endpoint", f"127.0.0.1:{port}", "--timeout", "10")
    assert rc == 1
    assert time.monotonic() - start < 5, "a refused connection must not wait for the timeout"
    assert out.startswith("unreachable: ") and "UNAVAILABLE" in out
    rc, out = health("--endpoint", f"127.0.0.1:{port}", "--json")
    assert rc == 1 and json.loads(out)["alive"] is False


def test_silent_listener_times_out() -> None:
    """Something accepts TCP but never speaks gRPC: the check gives up after --timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        start = time.monotonic()
        rc, out = health("--endpoint", f"127.0.0.1:{listener.getsockname()[1]}", "--timeout", "1")
    assert rc == 1, out
    assert time.monotonic() - start < 5
    assert "within 1 s" in out


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("10.0.0.1:5", "10.0.0.1:5"),
        ("peer-0.lioncub-peer", f"peer-0.lioncub-peer:{DEFAULT_PORT}"),
        ("[::1]:8", "[::1]:8"),
        ("[::1]", f"[::1]:{DEFAULT_PORT}"),
    ],
)
def test_parse_endpoint(text: str, want: str) -> None:
    assert parse_endpoint(text) == want


@pytest.mark.parametrize(
    "text", ["127.0.0.1:0", "127.0.0.1:65536", "h:x", "::1", "[::1]x", "[nope]:1", ":5", ""]
)
def test_malformed_endpoints_exit_2(text: str) -> None:
    with pytest.raises(EndpointError):
        parse_endpoint(text)
    rc, out = health("--endpoint", text)
    assert rc == 2 and out.startswith("error: ")


def test_default_endpoint() -> None:
    assert default_endpoint({}) == f"127.0.0.1:{DEFAULT_PORT}"
    assert default_endpoint({"LIONCUB_PORT": "4000"}) == "127.0.0.1:4000"
    with pytest.raises(EndpointError, match="LIONCUB_PORT"):
        default_endpoint({"LIONCUB_PORT": "http"})


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "4000"])
def test_bad_timeouts_are_refused(timeout: str) -> None:
    with pytest.raises(AssertionError, match="rejects"):
        parse_cli(["health", "--timeout", timeout])


def test_check_health_raises_unreachable() -> None:
    with pytest.raises(PeerUnreachable, match="no lioncub peer answered"):
        check_health(f"127.0.0.1:{closed_port()}", timeout=2)


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.kill()
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_real_peer_process(tmp_path: Path) -> None:
    """``lioncub-peer join`` (a one-peer swarm) answers ``lioncub-peer health``; once killed, it fails."""
    env = {k: v for k, v in os.environ.items() if not (k.startswith("LIONCUB_") and "__" in k)}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", NO_COLOR="1")
    join = subprocess.Popen(
        # --min-peers 2: the peer serves (and answers Health) but idles until a second peer comes,
        # which never happens; the CPU stays free for the health command.
        [PEER_CLI, "join", "--task", "tiny", "--port", "0", "--progress", "jsonl", "--min-peers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    events: queue.Queue[dict[str, Any]] = queue.Queue()

    def read() -> None:
        assert join.stdout is not None
        for line in join.stdout:
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):
                    events.put(json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        started = None
        while started is None:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and join.poll() is None, "the peer did not start"
            with contextlib.suppress(queue.Empty):
                event = events.get(timeout=remaining)
                if event.get("event") == "started":
                    started = event
        endpoint = started["endpoint"]
        check = subprocess.run(
            [PEER_CLI, "health", "--endpoint", endpoint, "--json"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        reply = json.loads(check.stdout)
        assert reply["alive"] is True and reply["peer_id"] == started["peer_id"]
        assert reply["run_id"] == started["run_id"]
        _kill_tree(join)  # the peer and its DHT processes are gone: nothing answers any more
        rc, out = health("--endpoint", endpoint, "--timeout", "3")
        assert rc == 1, out
        assert out.startswith("unreachable: ")
    finally:
        _kill_tree(join)
