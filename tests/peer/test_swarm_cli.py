"""The command line on real processes: a plain ``hivemind-dht`` bootstrap, error exits, Ctrl-C, and
``--progress jsonl`` output."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.peer._swarm import FAST, START_TIMEOUT, PeerProc, Swarm, descendants, live

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROUND_TIMEOUT = 150.0
EXIT_TIMEOUT = 60.0
#: A syntactically valid libp2p peer id that no node on this machine has.
NOBODY = "12D3KooWLJF7JUftbfiyv31Kt9f42gGz9Z38Bb9oVx2YidsNg8oW"


def test_plain_hivemind_dht_node_bootstraps_a_swarm(tmp_path: Path) -> None:
    rounds = 5
    with Swarm(tmp_path) as swarm:
        addr = swarm.hivemind_bootstrap()
        args = ["--task", "tiny", *FAST, "--min-peers", "2", "--max-rounds", str(rounds)]
        peers = [swarm.join(name, *args, dht=[addr]) for name in ("a", "b")]
        summaries = [p.exit_ok(START_TIMEOUT + ROUND_TIMEOUT) for p in peers]
    a, b = summaries
    assert a["rounds_completed"] == b["rounds_completed"] == rounds
    assert a["peers_seen"] == [b["peer_id"]] and b["peers_seen"] == [a["peer_id"]]
    assert a["groups_formed"] == b["groups_formed"] == rounds
    assert a["anchor_sha256"] == b["anchor_sha256"]


def _exited_with(p: PeerProc, code: int, timeout: float, *phrases: str) -> str:
    got = p.wait_exit(timeout)
    out = p.output()
    assert got == code, f"{p.name}: exit code {got}, expected {code}\n{p.describe()}"
    for phrase in phrases:
        assert phrase in out, f"{p.name}: {phrase!r} not in the output:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    return out


def test_errors_exit_with_clear_messages(tmp_path: Path) -> None:
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[run\nseed = 1\n")
    unreachable = f"/ip4/127.0.0.1/tcp/1/p2p/{NOBODY}"
    with Swarm(tmp_path) as swarm:
        # Everything that needs no swarm starts at once; two cores are enough for imports in parallel.
        checks = {
            "lr": swarm.cli("lr", "join", "--task", "tiny", "--set", "strategy.outer_lr=-1"),
            "section": swarm.cli("section", "join", "--task", "tiny", "--set", "nope.x=1"),
            "toml": swarm.cli("toml", "join", "--task", "tiny", "--config", str(bad_toml)),
            "unreachable": swarm.cli("unreachable", "join", "--dht", unreachable, "--progress", "none"),
        }
        addr = swarm.bootstrap()
        no_run = swarm.cli("no-run", "join", "--dht", addr, "--progress", "none")

        _exited_with(checks["lr"], 2, START_TIMEOUT, "outer_lr")
        _exited_with(checks["section"], 2, START_TIMEOUT, "nope")
        _exited_with(checks["toml"], 2, START_TIMEOUT, str(bad_toml), "TOML")
        _exited_with(checks["unreachable"], 1, START_TIMEOUT, "could not join the DHT", unreachable)
        # Quickly: the config errors started at the same moment and exit right after the imports.
        joined, imported = checks["unreachable"].eof_at, checks["toml"].eof_at
        assert joined is not None and imported is not None
        assert joined - imported < 30, f"an unreachable DHT took {joined - imported:.0f} s more to fail"
        out = _exited_with(no_run, 1, START_TIMEOUT, "--task")
        assert "no run" in out


def test_second_ctrl_c_exits_at_once_and_leaves_no_orphans(tmp_path: Path) -> None:
    # From round 2 on a round takes seconds (the test-only straggler fault), so the graceful stop the
    # first Ctrl-C asks for is still finishing its round when the second one comes (a lone peer's
    # normal round takes milliseconds: the stop could end before the second signal is sent).
    slow = ["--fault", "slow@factor=0.002:round=2"]
    with Swarm(tmp_path) as swarm:
        peer = swarm.join("peer", "--task", "tiny", *FAST, *slow)
        peer.wait_round(2, ROUND_TIMEOUT)
        children = descendants(peer.pid)
        names = {c.name() for c in children}
        assert "p2pd" in names, f"expected the DHT's p2pd among {names}"
        peer.signal(signal.SIGINT)

        # The first Ctrl-C asks for a graceful stop; wait until the peer said so (its jsonl event).
        peer.wait_for(lambda e: e["event"] == "stopping", ROUND_TIMEOUT, "the 'stopping' event")
        t_second = time.monotonic()
        peer.signal(signal.SIGINT)
        code = peer.wait_exit(EXIT_TIMEOUT)
        took = time.monotonic() - t_second
        assert code == 130, f"exit code {code} after a second Ctrl-C\n{peer.describe()}"
        assert took < 5.0, f"took {took:.1f} s to exit after the second Ctrl-C"
        _, alive = psutil.wait_procs(children, timeout=5.0)
        left = [f"{c.name()}({c.pid})" for c in alive if live(c.pid)]
        assert not left, f"children of the interrupted peer survive: {left}"


def test_jsonl_progress_stays_json_through_a_graceful_stop(tmp_path: Path) -> None:
    with Swarm(tmp_path) as swarm:
        peer = swarm.join("peer", "--task", "tiny", *FAST)
        peer.wait_round(2, ROUND_TIMEOUT)
        peer.signal(signal.SIGTERM)
        summary = peer.exit_ok(EXIT_TIMEOUT)
    events = [e["event"] for e in peer.events]
    assert events[0] == "started" and events[-1] == "finished"
    assert peer.events[-1]["rounds_completed"] == summary["rounds_completed"]
    assert peer.non_json_lines() == [], "--progress jsonl printed lines that are not JSON on stdout"
