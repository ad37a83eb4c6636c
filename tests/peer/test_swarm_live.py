"""A live swarm with a client-mode peer, and ``lioncub-peer status`` listing it.

Both tests share one module-scoped swarm of three peers that train until the module is done.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.peer._swarm import FAST, START_TIMEOUT, PeerProc, Swarm

pytestmark = [pytest.mark.network, pytest.mark.slow]

ROUND_TIMEOUT = 150.0


@pytest.fixture(scope="module")
def live_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Swarm, list[PeerProc]]]:
    """Three peers training until the module's tests are done; ``p2`` is in client mode."""
    with Swarm(tmp_path_factory.mktemp("live")) as swarm:
        peers = swarm.launch(3, *FAST, per_peer={2: ["--client-mode"]})
        for p in peers:
            p.wait_round(3, ROUND_TIMEOUT)
        yield swarm, peers


def test_client_mode_peer_takes_part_in_groups(live_swarm: tuple[Swarm, list[PeerProc]]) -> None:
    _, peers = live_swarm
    client = peers[2]
    started = client.started()
    assert started["maddrs"] == [] and started["endpoint"] == "", started
    grouped = client.wait_for(
        lambda e: e["event"] == "round" and e["group_size"] >= 2 and e["bytes_sent"] > 0,
        ROUND_TIMEOUT,
        "a round in a group with bytes sent",
    )
    assert grouped["bytes_received"] > 0
    in_groups = [e for e in client.rounds() if e["group_size"] == 3]
    assert len(in_groups) >= len(client.rounds()) // 2, [e["group_size"] for e in client.rounds()]


def test_status_lists_every_live_peer(live_swarm: tuple[Swarm, list[PeerProc]]) -> None:
    swarm, peers = live_swarm
    addr = swarm.first_maddr(peers[0])
    status = swarm.cli("status", "status", "--dht", addr, "--json")
    assert status.wait_exit(START_TIMEOUT) == 0, status.describe()
    rows = json.loads("\n".join(status.lines))
    by_id = {row["peer_id"]: row for row in rows}
    assert set(by_id) == {p.peer_id for p in peers}, rows
    for row in rows:
        assert row["run_id"] == peers[0].started()["run_id"]
        assert row["round"] >= 1
    assert by_id[peers[2].peer_id]["client_mode"] is True
    assert by_id[peers[0].peer_id]["endpoint"] == peers[0].started()["endpoint"]
