"""A live swarm with client-mode peers, and ``lioncub-peer status`` listing them.

The tests share one module-scoped swarm that trains until the module is done: three peers, ``p2``
in client mode by flag, and ``p3``, started later, whose server listens on 127.0.0.2 only. The
others dial it back at the address its calls come from (127.0.0.1) and cannot reach it: the way a
peer behind NAT looks to the swarm, so ``p3`` must detect that and switch to client mode by itself.
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
    """Peers training until the module's tests are done; ``p2`` and ``p3`` are in client mode."""
    with Swarm(tmp_path_factory.mktemp("live")) as swarm:
        peers = swarm.launch(3, *FAST, per_peer={2: ["--client-mode"]})
        for p in peers:
            p.wait_round(3, ROUND_TIMEOUT)
        # Started once the others are registered, so that there is someone to dial it back.
        peers.append(swarm.join("p3", "--host", "127.0.0.2", dht=[swarm.first_maddr(peers[0])]))
        peers[3].wait_round(peers[0].rounds()[-1]["round"] + 1, ROUND_TIMEOUT)
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
    in_groups = [e for e in client.rounds() if e["group_size"] >= 3]
    assert len(in_groups) >= len(client.rounds()) // 2, [e["group_size"] for e in client.rounds()]


def test_unreachable_peer_detects_it_and_takes_part_as_a_client(
    live_swarm: tuple[Swarm, list[PeerProc]],
) -> None:
    _, peers = live_swarm
    natted = peers[3]
    started = natted.started()
    assert started["client_mode"] is True and started["endpoint"] == "", started
    assert "switching to client mode" in natted.stderr(), natted.describe()
    assert all(p.started()["client_mode"] is False for p in peers[:2])
    grouped = natted.wait_for(
        lambda e: e["event"] == "round" and e["group_size"] >= 2 and e["bytes_sent"] > 0,
        ROUND_TIMEOUT,
        "a round in a group with bytes sent",
    )
    assert grouped["bytes_received"] > 0


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
    assert by_id[peers[3].peer_id]["client_mode"] is True and by_id[peers[3].peer_id]["endpoint"] == ""
    assert by_id[peers[0].peer_id]["endpoint"] == peers[0].started()["endpoint"]
