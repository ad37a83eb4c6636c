"""A Byzantine peer in a real-process swarm: ``lioncub-peer join --adversary`` on 127.0.0.1.

Four ``tiny`` peers sync momentum and average anchors every two rounds; one of them poisons both
with ±60000. With the default clipped reduction the honest peers train as usual; with the plain
mean (the defence off) their anchors are ruined. Both swarms run side by side (process start-up
dominates the time).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.peer._swarm import FAST, Swarm

pytestmark = [pytest.mark.network, pytest.mark.slow]

RUN_TIMEOUT = 300.0  # an upper bound for a loaded 2-core machine, not a synchronisation
ROUNDS = 8


def _settings(reduction: str) -> list[str]:
    out = [*FAST]
    for sync in ("momentum_sync", "averaging"):
        out += ["--set", f"{sync}.every=2", "--set", f"{sync}.reduction={reduction}"]
    return out


def test_clipped_syncs_shrug_off_a_poisoning_peer(tmp_path: Path) -> None:
    byzantine = {3: ["--adversary", "momentum-poison-huge"]}
    with Swarm(tmp_path / "clipped") as robust, Swarm(tmp_path / "mean") as plain:
        swarms = {"clipped": robust, "mean": plain}
        launches = {
            label: swarm.launch_first(4, *_settings(label), max_rounds=ROUNDS, per_peer=byzantine)
            for label, swarm in swarms.items()
        }
        peers = {label: swarms[label].launch_rest(launch) for label, launch in launches.items()}
        summaries = {label: {p.name: p.exit_ok(RUN_TIMEOUT) for p in ps} for label, ps in peers.items()}

    liar = peers["clipped"][3]
    assert "THIS PEER IS BYZANTINE" in liar.output(), liar.describe()
    for label, by_name in summaries.items():
        honest = [by_name[f"p{i}"] for i in range(3)]
        for s in honest:
            assert s["rounds_completed"] >= ROUNDS // 2, s
        if label == "clipped":
            assert all(s["final_loss"] < s["initial_loss"] for s in honest), honest
        else:  # the defence off: one peer of four owns the average (NaN counts as ruined)
            assert all(not s["final_loss"] < 100 * s["initial_loss"] for s in honest), honest
