"""Multi-peer training on real processes: ``lioncub-peer join`` peers on 127.0.0.1 train ``tiny``.

Each test starts its own swarm (see ``tests/peer/_swarm.py``): the first peer creates the run, the
others join through its multiaddr and take the run config from the DHT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lioncub.optim.schedules import consensus_distance
from lioncub.peer.checkpoint import CheckpointStore
from tests.peer._swarm import FAST, PeerProc, Swarm

pytestmark = [pytest.mark.network, pytest.mark.slow]

#: Seconds a whole run may take once every peer started (rounds of ``tiny`` take ~0.1 s).
RUN_TIMEOUT = 300.0  # an upper bound for a loaded 2-core machine, not a synchronisation


def _round_numbers(peer: PeerProc) -> list[int]:
    return [e["round"] for e in peer.rounds()]


def test_four_peers_train_tiny_to_one_anchor(tmp_path: Path) -> None:
    rounds = 10
    with Swarm(tmp_path) as swarm:
        peers = swarm.launch(4, *FAST, max_rounds=rounds)
        ids = {p.name: p.peer_id for p in peers}
        summaries = {p.name: p.exit_ok(RUN_TIMEOUT) for p in peers}

    assert len(set(ids.values())) == 4
    for p in peers:
        s = summaries[p.name]
        assert s["rounds_completed"] == rounds, p.describe()
        assert _round_numbers(p) == list(range(1, rounds + 1))
        sizes = [e["group_size"] for e in p.rounds()]
        assert sizes == [4] * rounds, f"{p.name}: group sizes {sizes}, expected everyone every round"
        assert s["groups_formed"] == rounds and s["rounds_alone"] == 0
        assert s["final_loss"] < s["initial_loss"], f"{p.name}: loss did not fall: {s}"
        assert set(s["peers_seen"]) == set(ids.values()) - {ids[p.name]}
        assert s["bytes_sent"] > 0 and s["bytes_received"] > 0
    digests = {name: s["anchor_sha256"] for name, s in summaries.items()}
    assert len(set(digests.values())) == 1, f"the peers' anchors differ: {digests}"
    # Every peer applied the same updates from the same start, so they agree on the loss too.
    assert len({s["final_loss"] for s in summaries.values()}) == 1


def _gossip_args(workdir: Path, rounds: int, averaging_every: int) -> tuple[list[str], dict[int, list[str]]]:
    """Run settings for six peers in groups of two, and per-peer checkpoint flags.

    A checkpoint at the last round holds each peer's final anchor (the summary has only its digest).
    """
    # A longer matchmaking window than FAST's: on a loaded machine a partner may be seconds late.
    settings = [*FAST, "--set", "rounds.group_size=2", "--set", "rounds.matchmaking_timeout=6"]
    if averaging_every:
        settings += ["--set", f"averaging.every={averaging_every}"]
    ckpt = {
        i: ["--checkpoint-dir", str(workdir / f"ckpt{i}"), "--checkpoint-every", str(rounds)]
        for i in range(6)
    }
    return settings, ckpt


def _final_anchors(workdir: Path, rounds: int) -> list[Any]:
    anchors = []
    for i in range(6):
        ckpt = CheckpointStore(workdir / f"ckpt{i}").load_latest()
        assert ckpt is not None and ckpt.round == rounds, f"peer {i} left no checkpoint of round {rounds}"
        anchors.append(ckpt.anchor)
    return anchors


def test_gossip_groups_of_two_and_averaging_keeps_anchors_together(tmp_path: Path) -> None:
    rounds, every = 12, 2
    runs = {"plain": 0, "averaged": every}
    # Both swarms run side by side (each in its own DHT): process start-up dominates the time.
    with Swarm(tmp_path / "plain") as plain, Swarm(tmp_path / "averaged") as averaged:
        swarms = {"plain": plain, "averaged": averaged}
        launches = {}
        for label, swarm in swarms.items():
            settings, ckpt = _gossip_args(swarm.workdir, rounds, runs[label])
            launches[label] = swarm.launch_first(6, *settings, max_rounds=rounds, per_peer=ckpt)
        peers = {label: swarms[label].launch_rest(launch) for label, launch in launches.items()}
        summaries = {label: {p.name: p.exit_ok(RUN_TIMEOUT) for p in ps} for label, ps in peers.items()}

    distance = {}
    paired = dict.fromkeys(runs, 0)
    for label, avg in runs.items():
        for p in peers[label]:
            s = summaries[label][p.name]
            # A peer that fell behind may skip rounds by downloading the state (catch-up).
            assert p.rounds()[-1]["round"] == rounds, p.describe()
            assert rounds // 2 <= s["rounds_completed"] <= rounds, p.describe()
            sizes = [e["group_size"] for e in p.rounds()]
            # Groups of 2 (a peer whose partner was late may be alone; a late straggler may make a 3;
            # on a loaded machine a peer that fell behind skips rounds by downloading the state).
            assert sizes.count(2) >= 2, f"{label} {p.name}: group sizes {sizes}"
            assert max(sizes) <= 3, f"{label} {p.name}: group sizes {sizes}"
            paired[label] += sizes.count(2)
            # Gossip: the partner changes from round to round.
            assert len(s["peers_seen"]) >= 2, f"{label} {p.name} always met the same peers: {s['peers_seen']}"
            averaged_after = [e["round"] for e in p.rounds() if e["averaged"]]
            if avg:
                assert averaged_after, f"{p.name} never averaged its anchor"
                assert all(r % every == 0 for r in averaged_after), (
                    f"{p.name} averaged after {averaged_after}"
                )
            else:
                assert averaged_after == []
        distance[label] = consensus_distance(_final_anchors(tmp_path / label, rounds))
        if not avg:
            continue
        digest = {p.peer_id: summaries[label][p.name]["anchor_sha256"] for p in peers[label]}
        # Every group that averaged in the last round left its members on one bit-identical anchor.
        finals = [p.rounds()[-1] for p in peers[label]]
        assert any(e["averaged"] for e in finals), "no group averaged in the last round"
        for p, last in zip(peers[label], finals, strict=True):
            if last["averaged"] and not last["missing"]:
                together = {digest[m] for m in last["group"]}
                assert together == {digest[p.peer_id]}, f"{p.name}: group {last['group']} averaged apart"
    # Across the swarm, most peer-rounds are spent in pairs.
    assert all(n >= 6 * rounds // 3 for n in paired.values()), f"peer-rounds in pairs: {paired}"
    assert distance["plain"] > 0, "gossip groups of two without averaging should leave the anchors apart"
    # The size of the gap varies from run to run (who met whom); its direction does not.
    assert distance["averaged"] < distance["plain"], f"consensus distance by run: {distance}"
