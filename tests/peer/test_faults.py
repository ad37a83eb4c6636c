"""Faults on real processes: crashes mid-round, a partition that heals, a straggler, the bootstrap
node dying, a restart from a checkpoint, a crash inside a checkpoint write.

Faults are injected deterministically: a peer started with ``--fault SPEC``
(:mod:`lioncub.peer.faults`) hurts itself at a named point of its own rounds and reports it as a
jsonl ``fault`` event; the harness only ever waits on events (never sleeps). Every wait is bounded.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lioncub.peer.checkpoint import LATEST, CheckpointStore
from tests.peer._swarm import FAST, START_TIMEOUT, PeerProc, Swarm, stop_all

pytestmark = [pytest.mark.network, pytest.mark.slow]

#: Bound on waits for rounds once every peer is up (a ``tiny`` round takes ~0.1 s).
ROUND_TIMEOUT = 240.0
#: Bound on a graceful exit after SIGTERM (finish the round, deregister, stop the DHT).
EXIT_TIMEOUT = 90.0


def _assert_trained(p: PeerProc, summary: dict[str, object]) -> None:
    initial, final = summary["initial_loss"], summary["final_loss"]
    assert isinstance(initial, float) and isinstance(final, float), p.describe()
    assert final < initial, f"{p.name}: loss did not fall: {initial} -> {final}"


def test_sigkill_of_a_third_of_the_peers_mid_round(tmp_path: Path) -> None:
    """Two of six peers die in the middle of round 5, after their group was agreed: the other four
    fall back for the dead members' shards in that round, then go on as a group of four."""
    rounds, at = 24, 5
    fault = ["--fault", f"kill@round={at}:at=group"]
    with Swarm(tmp_path) as swarm:
        peers = swarm.launch(6, *FAST, max_rounds=rounds, per_peer={4: fault, 5: fault})
        victims, survivors = peers[4:], peers[:4]
        ids = {p.name: p.peer_id for p in peers}
        faults = [v.killed(ROUND_TIMEOUT) for v in victims]
        t_kill = time.monotonic()
        summaries = [p.exit_ok(ROUND_TIMEOUT + EXIT_TIMEOUT) for p in survivors]

    dead = {ids[v.name] for v in victims}
    for v, ev in zip(victims, faults, strict=True):
        assert ev["round"] == at and ev["kind"] == "kill", ev
        assert [e["round"] for e in v.rounds()] == list(range(1, at)), f"{v.name} did not die in round {at}"
    for p, s in zip(survivors, summaries, strict=True):
        assert p.rounds()[-1]["round"] == rounds, p.describe()
        assert s["rounds_completed"] >= rounds - 4, p.describe()  # catch-up may skip a round or two
        # Round 5 was formed with the victims in it: their shards fell back to the local vote.
        hit = next(e for e in p.rounds() if e["round"] == at)
        assert dead <= set(hit["group"]), f"{p.name}: the victims were not in round {at}'s group: {hit}"
        assert dead <= set(hit["missing"]), f"{p.name}: round {at} did not miss the victims' shards: {hit}"
        after = p.rounds_after(t_kill)
        assert len(after) >= 8, f"{p.name}: only {len(after)} rounds after the kill"
        assert not dead & set(after[-1]["group"]), f"{p.name}: still grouped with the dead: {after[-1]}"
        assert after[-1]["group_size"] == 4, f"{p.name}: survivors do not group: {after[-1]}"
        _assert_trained(p, s)


def test_partition_that_heals(tmp_path: Path) -> None:
    """Peer 2's link is cut for 8 s after round 4 (every RPC in and out refused): the other two
    train on as a pair, peer 2 trains alone, and once the link heals all three group again."""
    with Swarm(tmp_path) as swarm:
        peers = swarm.launch(3, *FAST, per_peer={2: ["--fault", "partition@round=4:seconds=8"]})
        cut_off, others = peers[2], peers[:2]
        cut = cut_off.wait_fault(ROUND_TIMEOUT, phase="cut")
        t_cut = cut["_t"]
        healed = cut_off.wait_fault(ROUND_TIMEOUT, phase="healed")
        t_heal = healed["_t"]
        during = {p.name: [e for e in p.rounds_after(t_cut) if e["_t"] < t_heal] for p in others}
        # After the heal: the three group again (bounded waits, the isolated peer's events first).
        back, *others_back = [
            p.wait_for(
                lambda e: e["event"] == "round" and e["_t"] > t_heal and e["group_size"] == 3,
                ROUND_TIMEOUT,
                "a round with all three peers after the heal",
            )
            for p in [cut_off, *others]
        ]
        summaries = stop_all(peers, EXIT_TIMEOUT)

    alone = [e for e in cut_off.rounds_after(t_cut) if e["_t"] < t_heal]
    assert alone, "the cut-off peer did no round during the partition"
    assert all(e["group_size"] == 1 for e in alone), f"grouped through a cut link: {alone}"
    for p in others:
        assert during[p.name], f"{p.name} did no round while peer 2 was cut off"
        assert cut_off.peer_id not in during[p.name][-1]["group"], during[p.name][-1]
        assert during[p.name][-1]["group_size"] == 2, f"{p.name} did not train on in a pair: {during[p.name]}"
    assert cut_off.peer_id in others_back[0]["group"] and back["group_size"] == 3
    for p, s in zip(peers, summaries, strict=True):
        _assert_trained(p, s)


def test_a_straggler_does_not_hold_the_swarm_back(tmp_path: Path) -> None:
    """Peer 2 computes at 10 % of its speed. Rounds are time-bounded (``rounds.max_seconds``), so it
    takes a tenth of the steps in the same time: it stays in the groups with a smaller vote weight,
    the others do not wait for it, and nobody crashes."""
    rounds = 16
    timed = ["--set", "rounds.max_seconds=0.4", "--set", "strategy.local_steps=10000"]
    with Swarm(tmp_path) as swarm:
        peers = swarm.launch(
            3, *FAST, *timed, max_rounds=rounds, per_peer={2: ["--fault", "slow@factor=0.1"]}
        )
        summaries = [p.exit_ok(ROUND_TIMEOUT + EXIT_TIMEOUT) for p in peers]

    slow = peers[2]
    for p, s in zip(peers, summaries, strict=True):
        assert p.rounds()[-1]["round"] == rounds, p.describe()
        _assert_trained(p, s)
    together = [e for e in slow.rounds() if e["group_size"] == 3]
    assert len(together) >= rounds // 2, (
        f"the straggler was left out: {[e['group_size'] for e in slow.rounds()]}"
    )
    # Its weight is its samples: a tenth of the others' (3x margin for a loaded machine's jitter).
    slow_samples = summaries[2]["samples"]
    assert isinstance(slow_samples, int)
    for p, s in zip(peers[:2], summaries[:2], strict=True):
        assert isinstance(s["samples"], int) and 3 * slow_samples < s["samples"], (
            f"{p.name} took {s['samples']} samples, the straggler {slow_samples}"
        )


def test_peers_train_on_after_the_bootstrap_node_dies(tmp_path: Path) -> None:
    """Three peers meet through a bootstrap DHT node, which then dies (with its DHT and p2pd):
    they keep forming groups through each other's DHT nodes, and a newcomer joins through a peer."""
    with Swarm(tmp_path) as swarm:
        addr = swarm.bootstrap()
        wait = ["--min-peers", "3", "--start-timeout", str(int(START_TIMEOUT))]
        first = swarm.join("p0", "--task", "tiny", "--run-id", "no-bootstrap", *FAST, *wait, dht=[addr])
        first.started()
        # The others take the run and its config from the DHT (no --task, no --set).
        peers = [first, *(swarm.join(f"p{i}", *wait, dht=[addr]) for i in (1, 2))]
        for p in peers:
            p.wait_for(
                lambda e: e["event"] == "round" and e["group_size"] == 3, ROUND_TIMEOUT, "a group of three"
            )
        boot = next(p for p in swarm.procs if p.name == "bootstrap")
        swarm.kill_tree(boot)
        t_dead = time.monotonic()
        mark = {p.name: p.rounds()[-1]["round"] for p in peers}
        for p in peers:
            p.wait_for(
                lambda e, n=mark[p.name]: (
                    e["event"] == "round" and e["round"] >= n + 8 and e["group_size"] == 3
                ),
                ROUND_TIMEOUT,
                "8 more rounds and a group of three without the bootstrap node",
            )
        # A newcomer finds the run through a surviving peer's DHT node.
        late = swarm.join("late", dht=[swarm.first_maddr(peers[1])])
        late.wait_for(
            lambda e: e["event"] == "round" and e["group_size"] == 4, ROUND_TIMEOUT, "a group of four"
        )
        summaries = stop_all([*peers, late], EXIT_TIMEOUT)

    for p, s in zip(peers, summaries[:3], strict=True):
        after = p.rounds_after(t_dead)
        assert len(after) >= 8, f"{p.name}: {len(after)} rounds after the bootstrap node died"
        _assert_trained(p, s)
    assert summaries[-1]["joined_from"] in {p.peer_id for p in peers}


def _crash_and_resume(
    swarm: Swarm, fault: str, every: int, expect_round: int, key: Path, ckpt: Path
) -> tuple[list[PeerProc], PeerProc, PeerProc]:
    """Three peers; peer 2 checkpoints every ``every`` rounds and crashes on ``fault``; the test
    checks its checkpoint directory (newest = ``expect_round``) and restarts it with ``--resume``."""
    flags = ["--identity", str(key), "--checkpoint-dir", str(ckpt), "--checkpoint-every", str(every)]
    peers = swarm.launch(3, *FAST, per_peer={2: [*flags, "--fault", fault]})
    victim = peers[2]
    victim.killed(ROUND_TIMEOUT)
    newest = CheckpointStore(ckpt).load_latest()
    assert newest is not None and newest.round == expect_round, (
        f"after {fault} the newest loadable checkpoint is {newest and newest.round}, not {expect_round}"
    )
    assert newest.peer_id == victim.peer_id
    # The survivors go on without it.
    t = time.monotonic()
    for p in peers[:2]:
        p.wait_for(
            lambda e: e["event"] == "round" and e["_t"] > t and e["group_size"] == 2,
            ROUND_TIMEOUT,
            "a round as a pair after the crash",
        )
    again = swarm.join(
        "p2-resumed", "--min-peers", "3", *flags, "--resume", dht=[swarm.first_maddr(peers[0])]
    )
    return peers, victim, again


def _assert_went_on(peers: list[PeerProc], summaries: list[dict[str, object]]) -> None:
    """The survivors trained; the restarted peer (last summary) went on from trained state."""
    for p, s in zip(peers[:2], summaries[:2], strict=True):
        _assert_trained(p, s)
    fresh, resumed = summaries[0]["initial_loss"], summaries[2]["initial_loss"]
    assert isinstance(fresh, float) and isinstance(resumed, float)
    assert resumed < fresh, f"the restarted peer began at loss {resumed}, a fresh model's is {fresh}"


def test_a_crashed_peer_restarts_from_its_checkpoint(tmp_path: Path) -> None:
    """Peer 2 (checkpoints every 3 rounds) is SIGKILLed after round 7; restarted with ``--resume``
    it loads its round-6 checkpoint under the same identity and rejoins the swarm's groups."""
    with Swarm(tmp_path) as swarm:
        peers, victim, again = _crash_and_resume(
            swarm, "kill@round=7", 3, 6, tmp_path / "p2.key", tmp_path / "ckpt"
        )
        started = again.started()
        again.wait_for(
            lambda e: e["event"] == "round" and e["group_size"] == 3, ROUND_TIMEOUT, "a group of three"
        )
        summaries = stop_all([peers[0], peers[1], again], EXIT_TIMEOUT)

    assert started["round"] == 6, f"resumed at round {started['round']}, not its checkpoint's"
    resumed = summaries[2]
    assert resumed["resumed_round"] == 6 and resumed["peer_id"] == victim.peer_id
    # The swarm went on meanwhile: it caught up from a live peer instead of replaying the rounds.
    assert resumed["joined_from"] in {peers[0].peer_id, peers[1].peer_id}
    _assert_went_on(peers, summaries)


def test_crash_inside_a_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    """Peer 2 dies inside the write of its round-6 checkpoint (temp file written and fsynced, not
    renamed): round 4's stays the newest loadable one, ``--resume`` continues from it, and the next
    save clears the half-done temp file."""
    ckpt = tmp_path / "ckpt"
    with Swarm(tmp_path) as swarm:
        peers, victim, again = _crash_and_resume(
            swarm, "crash-in-checkpoint@round=6", 2, 4, tmp_path / "p2.key", ckpt
        )
        fault = victim.wait_fault(0)
        temp = Path(str(fault["temp"]))
        left_behind = temp.exists()
        pointer = (ckpt / LATEST).read_text()
        started = again.started()
        again.wait_for(
            lambda e: e["event"] == "round" and e["group_size"] == 3, ROUND_TIMEOUT, "a group of three"
        )
        summaries = stop_all([peers[0], peers[1], again], EXIT_TIMEOUT)

    assert fault["round"] == 6 and Path(str(fault["final"])).name == "ckpt-00000006.pt"
    assert left_behind, "the crash left no temporary file: it did not die inside the write"
    assert '"round": 4' in pointer, f"the latest pointer moved: {pointer}"
    assert started["round"] == 4, f"resumed at round {started['round']}, not from the round-4 checkpoint"
    assert summaries[2]["resumed_round"] == 4
    assert not temp.exists(), "the next checkpoint save left the stale temporary file"
    assert CheckpointStore(ckpt).load_latest() is not None
    _assert_went_on(peers, summaries)
