"""Peers that come and go, on real processes: a late joiner, a crashed peer, a stop and a resume."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest

from lioncub.peer.checkpoint import CheckpointStore
from tests.peer._swarm import FAST, START_TIMEOUT, Swarm, descendants, live, stop_all

pytestmark = [pytest.mark.network, pytest.mark.slow]

#: Bound on waits for rounds once every peer is up (a ``tiny`` round takes ~0.1 s).
ROUND_TIMEOUT = 150.0
#: Bound on a graceful exit after SIGTERM (finish the round, deregister, stop the DHT).
EXIT_TIMEOUT = 60.0


def test_late_joiner_takes_config_and_state_from_the_swarm(tmp_path: Path) -> None:
    run = ["--run-id", "late-join", *FAST, "--set", "strategy.local_steps=4", "--set", "inner.batch_size=16"]
    with Swarm(tmp_path) as swarm:
        a, b = swarm.launch(2, *run)
        for p in (a, b):
            p.wait_round(5, ROUND_TIMEOUT)
        # No --task, --set or --run-id: the joiner finds the run and its config in the DHT.
        c = swarm.join("joiner", dht=[swarm.first_maddr(a)])
        started = c.started()
        assert started["run_id"] == "late-join"
        assert started["round"] >= 5, f"the joiner starts at round {started['round']}, not the swarm's"
        first_rounds = c.wait_rounds(8, ROUND_TIMEOUT)
        for p in (c, a, b):
            p.signal(signal.SIGTERM)
        first = a.exit_ok(EXIT_TIMEOUT)
        b.exit_ok(EXIT_TIMEOUT)
        joined = c.exit_ok(EXIT_TIMEOUT)

    assert joined["joined_from"] in {a.peer_id, b.peer_id}
    assert joined["first_round"] >= 5 and joined["first_round"] == started["round"]
    assert c.rounds()[0]["round"] == started["round"] + 1
    # It downloaded a trained anchor: its starting loss is the swarm's, not a fresh model's.
    assert joined["initial_loss"] < first["initial_loss"]
    # It trains with the published config: 4 local steps of 16 samples per round.
    samples = [e["samples"] for e in c.rounds()]
    assert samples == [64 * (i + 1) for i in range(len(samples))], samples
    assert {a.peer_id, b.peer_id} <= set(joined["peers_seen"]), "the joiner never met the swarm"
    # It enters the swarm's rounds at once: grouped with both others within its first 3 rounds and
    # from then on (a swarm that is a round or two ahead of a joiner must not keep it out).
    sizes = [e["group_size"] for e in first_rounds]
    assert 3 in sizes[:3], f"the joiner's first group sizes: {sizes}"
    after = sizes[sizes.index(3) :]
    assert after.count(3) >= len(after) - 1, f"the joiner's first group sizes: {sizes}"


def test_survivors_go_on_after_a_peer_is_killed(tmp_path: Path) -> None:
    rounds = 40
    with Swarm(tmp_path) as swarm:
        peers = swarm.launch(3, *FAST, max_rounds=rounds)
        victim, survivors = peers[2], peers[:2]
        killed_at = victim.wait_round(5, ROUND_TIMEOUT)["round"]
        assert killed_at < rounds - 10, "the run went too fast to kill a peer in the middle"
        children = descendants(victim.pid)
        victim.proc.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        assert victim.wait_exit(10, drain=0) == -signal.SIGKILL
        summaries = [p.exit_ok(ROUND_TIMEOUT + EXIT_TIMEOUT) for p in survivors]
        _, alive = psutil.wait_procs(children, timeout=15)
        orphans = [f"{c.name()}({c.pid})" for c in alive if live(c.pid)]

    for p, s in zip(survivors, summaries, strict=True):
        assert s["rounds_completed"] == rounds, p.describe()
        after = [e for e in p.rounds() if e["_t"] > t_kill]
        assert len(after) >= 8, f"{p.name}: only {len(after)} rounds after the kill"
        assert after[-1]["group_size"] == 2, f"{p.name}: survivors do not group: {after[-1]}"
        assert victim.peer_id in s["peers_seen"]
        assert s["final_loss"] < s["initial_loss"]
    # The killed peer's DHT process and p2pd must not outlive it (ports, memory, a stale DHT node).
    assert not orphans, f"still running {time.monotonic() - t_kill:.0f} s after the kill: {orphans}"


def test_checkpoint_stop_and_resume(tmp_path: Path) -> None:
    ckpt_dir = tmp_path / "ckpt"
    peer = ["--task", "tiny", *FAST, "--identity", str(tmp_path / "peer.key")]
    peer += ["--checkpoint-dir", str(ckpt_dir), "--checkpoint-every", "2"]
    with Swarm(tmp_path) as swarm:
        first = swarm.join("first", *peer)
        first.wait_round(5, ROUND_TIMEOUT)
        first.signal(signal.SIGTERM)
        stopped = first.exit_ok(EXIT_TIMEOUT)
        stopped_at = first.rounds()[-1]["round"]
        assert stopped["rounds_completed"] == stopped_at >= 5
        newest = CheckpointStore(ckpt_dir).load_latest()
        # Periodic checkpoints every 2 rounds, plus a final one written by the graceful stop.
        assert newest is not None and newest.round == stopped_at

        target = stopped_at + 4
        again = swarm.join("resumed", *peer, "--resume", "--max-rounds", str(target))
        resumed = again.exit_ok(ROUND_TIMEOUT + EXIT_TIMEOUT)

    start = resumed["resumed_round"]
    assert start is not None and start > 0
    assert start == newest.round or start == stopped_at
    assert again.started()["round"] == start and resumed["first_round"] == start
    assert [e["round"] for e in again.rounds()] == list(range(start + 1, target + 1))
    assert resumed["rounds_completed"] == target - start
    assert resumed["peer_id"] == stopped["peer_id"]
    # It went on from the checkpoint, not from a fresh model.
    assert resumed["initial_loss"] < stopped["initial_loss"]
    # A graceful stop should not lose the rounds since the last periodic checkpoint.
    assert start == stopped_at, (
        f"stopped (SIGTERM) after round {stopped_at} but resumed from round {start}: "
        "the graceful stop saved no final checkpoint"
    )


def test_a_peer_that_fell_behind_catches_up(tmp_path: Path) -> None:
    lag = 6
    with Swarm(tmp_path) as swarm:
        peers = swarm.launch(3, *FAST)
        for p in peers:
            p.wait_round(3, ROUND_TIMEOUT)
        leader, slow = peers[0], peers[2]
        slow.proc.send_signal(signal.SIGSTOP)  # a laptop lid closed, a long GC pause...
        try:
            slow.drained()  # every round it logged before the stop has been read
            stopped_at = slow.rounds()[-1]["round"]
            target = leader.wait_round(stopped_at + lag, ROUND_TIMEOUT)["round"]
        finally:
            slow.proc.send_signal(signal.SIGCONT)
        reached = slow.wait_round(target, ROUND_TIMEOUT)
        behind = [e["round"] for e in slow.rounds() if stopped_at < e["round"] <= reached["round"]]
        summaries = stop_all(peers, EXIT_TIMEOUT)

    # It was `lag` rounds behind: it should download the swarm's state instead of replaying them.
    assert len(behind) <= 3, (
        f"{slow.name} stopped at round {stopped_at}, the swarm went on to {target}; it took the rounds "
        f"{behind} to get there instead of jumping (no catch-up)"
    )
    assert summaries[2]["joined_from"] in {peers[0].peer_id, peers[1].peer_id}


def test_joining_a_run_that_no_live_peer_serves_warns_that_it_starts_over(tmp_path: Path) -> None:
    """The run's config outlives its peers in the DHT: a late peer then starts it over from round 0,
    and says so (it cannot know the model the dead run had trained)."""
    with Swarm(tmp_path) as swarm:
        boot = swarm.bootstrap()
        first = swarm.join(
            "first", "--task", "tiny", "--run-id", "orphan", *FAST, "--max-rounds", "3", dht=[boot]
        )
        done = first.exit_ok(START_TIMEOUT + EXIT_TIMEOUT)
        late = swarm.join("late", "--run-id", "orphan", "--max-rounds", "2", dht=[boot])
        again = late.exit_ok(START_TIMEOUT + EXIT_TIMEOUT)

    assert done["rounds_completed"] == 3 and not done["restarted_run"]
    assert again["run_id"] == "orphan"
    assert again["restarted_run"] and again["first_round"] == 0 and again["joined_from"] is None
    assert "no live peer serves its state" in late.output(), late.describe()
