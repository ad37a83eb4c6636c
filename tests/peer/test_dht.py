"""lioncub.peer.dht against real hivemind DHT nodes on 127.0.0.1 (port 0)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import queue
import re
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from lioncub.peer._dht_calls import Pending
from lioncub.peer.dht import (
    DHTError,
    PeerRecord,
    SwarmRegistry,
    ensure_identity,
    fetch_run_config,
    fetch_run_config_async,
    get_group,
    get_group_async,
    get_groups,
    get_ready,
    get_ready_async,
    list_runs,
    list_runs_async,
    post_group,
    post_group_async,
    post_ready,
    post_ready_async,
    publish_run_config,
    publish_run_config_async,
    run_bootstrap,
    shutdown_dht,
    start_dht,
    start_dht_async,
    visible_maddrs,
)
from tests.peer._reap import become_subreaper, child_pids, reap_new_children
from tests.peer._util import wait_until

pytestmark = pytest.mark.network

FAKE_PEER = "12D3KooWPnLFZxtjTfUgcAzqeRjsE5ZLDG32PVcGxMFju7HKpSN3"


@pytest.fixture(scope="module", autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    become_subreaper()
    before = child_pids()
    yield
    leftovers = reap_new_children(before)
    assert not leftovers, f"processes left running by DHT tests (now killed): {leftovers}"


@pytest.fixture(scope="module")
def swarm() -> Iterator[list[DHT]]:
    """A bootstrap node, a node that joined through it, and a client-mode node."""
    nodes: list[DHT] = []
    try:
        nodes.append(start_dht())
        first = visible_maddrs(nodes[0])
        nodes.append(start_dht(first))
        nodes.append(start_dht(first, client_mode=True))
        yield nodes
    finally:
        for node in reversed(nodes):
            shutdown_dht(node)


def make_record(peer_id: str = "peerA", **changes: Any) -> PeerRecord:
    fields: dict[str, Any] = dict(
        peer_id=peer_id,
        endpoint="127.0.0.1:50051",
        public_key="ab" * 32,
        version="0.1.0",
        throughput=120.5,
        bandwidth_mbps=100.0,
        round=3,
        client_mode=False,
        loss=2.5,
        bytes_sent=10,
        bytes_received=20,
    )
    fields.update(changes)
    return PeerRecord(**fields)


def peer_ids(registry: SwarmRegistry) -> set[str]:
    return {r.peer_id for r in registry.peers()}


# --- PeerRecord without a DHT ---------------------------------------------------------------


def test_peer_record_round_trip() -> None:
    record = make_record("peerA", loss=None)
    assert PeerRecord.from_value(record.to_value()) == record
    client = make_record("peerB", endpoint="", client_mode=True, throughput=3)
    assert PeerRecord.from_value({**client.to_value(), "future_field": [1, 2]}) == client
    assert isinstance(client.throughput, float)


@pytest.mark.parametrize(
    "changes",
    [
        {"peer_id": ""},
        {"peer_id": "x" * 129},
        {"peer_id": "bad id\n"},
        {"endpoint": "no-port"},
        {"endpoint": "host:99999"},
        {"endpoint": "::1:80"},
        {"endpoint": ""},  # a server-mode peer needs an endpoint
        {"endpoint": "127.0.0.1:80", "client_mode": True},
        {"public_key": "XYZ"},
        {"public_key": "abc"},
        {"public_key": "ab" * 1025},
        {"version": ""},
        {"version": "v" * 65},
        {"throughput": -1.0},
        {"throughput": math.nan},
        {"bandwidth_mbps": math.inf},
        {"bandwidth_mbps": "100"},
        {"round": -1},
        {"round": True},
        {"round": 1.5},
        {"client_mode": 1},
        {"loss": math.nan},
        {"loss": "low"},
        {"bytes_sent": -5},
        {"last_seen": -1.0},
    ],
)
def test_peer_record_rejects(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make_record(**{"peer_id": "peerA", **changes})


@pytest.mark.parametrize(
    "value",
    [None, "text", [1, 2], {"peer_id": "peerA"}, {str(i): i for i in range(100)}],
)
def test_peer_record_from_value_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        PeerRecord.from_value(value)


# --- registry --------------------------------------------------------------------------------


def test_registry_announce_peers_withdraw(swarm: list[DHT]) -> None:
    reg_a, reg_b, reg_c = (SwarmRegistry(node, "regrun", ttl=30) for node in swarm)
    assert reg_a.announce(make_record("peerA"))
    assert reg_c.announce(make_record("peerC", endpoint="", client_mode=True))
    wait_until(lambda: peer_ids(reg_b) == {"peerA", "peerC"}, what="both peers visible from node b")
    seen = {r.peer_id: r for r in reg_b.peers()}
    assert seen["peerC"].client_mode and seen["peerC"].endpoint == ""
    assert abs(seen["peerA"].last_seen - get_dht_time()) < 30
    assert dataclasses.replace(seen["peerA"], last_seen=0.0) == make_record("peerA")

    assert reg_a.withdraw("peerA")
    wait_until(lambda: peer_ids(reg_c) == {"peerC"}, what="withdrawn peer gone")
    # the same peer can come back after a withdraw (its new entry outlives the tombstone)
    assert reg_a.announce(make_record("peerA", round=4))
    wait_until(lambda: peer_ids(reg_b) == {"peerA", "peerC"}, what="peer back after withdraw")


def test_registry_entries_expire(swarm: list[DHT]) -> None:
    registry = SwarmRegistry(swarm[0], "expiring", ttl=1.0)
    assert registry.announce(make_record("peerE"))
    assert peer_ids(SwarmRegistry(swarm[1], "expiring")) == {"peerE"}
    wait_until(lambda: not registry.peers(), timeout=10, what="record expiry")


def test_registry_ignores_malformed_entries(swarm: list[DHT], caplog: pytest.LogCaptureFixture) -> None:
    a, b, _ = swarm
    key, expiration = "hostile.peers", get_dht_time() + 30
    good = make_record("good").to_value()
    bad: dict[str, Any] = {
        "str": "not a record",
        "list": [1, 2, 3],
        "missing": {"peer_id": "missing"},
        "negative": {**good, "peer_id": "negative", "throughput": -3.0},
        "huge": {**good, "peer_id": "huge", "version": "x" * 10_000},
        "typed": {**good, "peer_id": "typed", "round": "3"},
        "boolround": {**good, "peer_id": "boolround", "round": True},
        "mismatch": {**good, "peer_id": "someone-else"},
        "bad subkey\n": good,
    }
    for subkey, value in [("good", good), *bad.items()]:
        assert a.store(key, value, expiration_time=expiration, subkey=subkey)
    # a non-str subkey (with another expiration: see test_mixed_subkey_types_give_dht_error)
    assert a.store(key, b"\x00" * 10, expiration_time=expiration + 1, subkey=7)
    with caplog.at_level(logging.WARNING, logger="lioncub.peer._dht_calls"):
        records = SwarmRegistry(b, "hostile").peers()
    assert [r.peer_id for r in records] == ["good"]
    assert "ignoring DHT entry" in caplog.text

    # a plain value where a subkey dictionary belongs is skipped as a whole
    assert a.store("plainvalue.peers", {"peer_id": "x"}, expiration_time=expiration)
    assert SwarmRegistry(b, "plainvalue").peers() == []


def test_mixed_subkey_types_give_dht_error(swarm: list[DHT]) -> None:
    """hivemind quirk: an int and a str subkey with the *same* expiration break its expiry heap.

    A store or get of that key then fails inside the DHT process, and a get never answers; our
    calls turn that into a DHTError after their timeout instead of hanging.
    """
    a, b, _ = swarm
    expiration = get_dht_time() + 2
    assert a.store("poison.peers", None, expiration_time=expiration, subkey="peerP")
    with pytest.raises(TypeError):
        a.store("poison.peers", None, expiration_time=expiration, subkey=7)
    started = time.monotonic()
    try:
        assert SwarmRegistry(b, "poison", timeout=2).peers() == []
    except DHTError as e:
        assert "no answer within" in str(e) or "TypeError" in str(e)
    assert time.monotonic() - started < 3


def test_registry_argument_checks(swarm: list[DHT]) -> None:
    with pytest.raises(ValueError):
        SwarmRegistry(swarm[0], "bad.run")
    with pytest.raises(ValueError):
        SwarmRegistry(swarm[0], "run", ttl=0)
    with pytest.raises(ValueError):
        SwarmRegistry(swarm[0], "run").withdraw("bad id")


# --- run config --------------------------------------------------------------------------------


def test_run_config_publish_fetch_list(swarm: list[DHT], caplog: pytest.LogCaptureFixture) -> None:
    a, b, c = swarm
    doc = {"task": "tiny", "hparams": {"lr": 3e-4, "steps": [1, 2, 3], "warmup": None, "amp": True}}
    assert publish_run_config(a, "cfgrun", doc, ttl=60)
    assert publish_run_config(b, "cfgrun2", {"task": "other"}, ttl=60)
    assert wait_until(lambda: fetch_run_config(c, "cfgrun"), what="config visible") == doc

    def both_listed() -> list[str] | None:
        runs = list_runs(c)
        return runs if {"cfgrun", "cfgrun2"} <= set(runs) else None

    runs = wait_until(both_listed, what="both runs listed")
    assert runs.index("cfgrun2") < runs.index("cfgrun")  # most recently published first
    assert fetch_run_config(c, "nosuchrun") is None

    for bad_doc in [{"t": (1, 2)}, {"t": math.nan}, {"t": b"raw"}, {1: "int key"}, ["not", "a", "dict"]]:
        with pytest.raises(ValueError):
            publish_run_config(a, "cfgrun", bad_doc, ttl=60)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="limit"):
        publish_run_config(a, "cfgrun", {"blob": "x" * 70_000}, ttl=60)
    with pytest.raises(ValueError):
        publish_run_config(a, "bad run id", doc, ttl=60)

    # malformed documents and run list entries stored by a hostile peer are ignored
    expiration = get_dht_time() + 30
    assert a.store("evilcfg.config", ["not", "a", "dict"], expiration_time=expiration)
    assert a.store("lioncub.runs", "junk", expiration_time=expiration, subkey="bad run id")
    assert a.store("lioncub.runs", {"published": "yesterday"}, expiration_time=expiration, subkey="evil")
    with caplog.at_level(logging.WARNING, logger="lioncub.peer._dht_calls"):
        assert fetch_run_config(b, "evilcfg") is None
        assert not {"evil", "bad run id"} & set(list_runs(b))


# --- matchmaking primitives -------------------------------------------------------------------


def test_ready_and_group_primitives(swarm: list[DHT]) -> None:
    expiration = get_dht_time() + 30
    for i, node in enumerate(swarm):
        assert post_ready(node, "mm", 7, f"peer{i}", {"bandwidth": 100 + i, "client": i == 2}, expiration)

    def all_ready() -> dict[str, dict[str, Any]] | None:
        ready = get_ready(swarm[1], "mm", 7)
        return ready if len(ready) == 3 else None

    ready = wait_until(all_ready, what="3 ready peers")
    assert ready["peer2"] == {"bandwidth": 102, "client": True}
    assert get_ready(swarm[0], "mm", 8) == {}

    group = {"members": ["peer0", "peer1", "peer2"], "shards": [[0, 500], [500, 1000], []], "round": 7}
    assert post_group(swarm[0], "mm", 7, "peer0", group, expiration)
    assert wait_until(lambda: get_group(swarm[2], "mm", 7, "peer0"), what="group visible") == group
    assert get_group(swarm[2], "mm", 7, "peer1") is None
    assert get_groups(swarm[1], "mm", 7) == {"peer0": group}

    with pytest.raises(ValueError, match="future"):
        post_ready(swarm[0], "mm", 7, "peer0", {}, get_dht_time() - 1)
    with pytest.raises(ValueError, match="limit"):
        post_ready(swarm[0], "mm", 7, "peer0", {"pad": "x" * 5000}, expiration)
    with pytest.raises(ValueError):
        post_ready(swarm[0], "mm", -1, "peer0", {}, expiration)
    with pytest.raises(ValueError):
        post_group(swarm[0], "mm", 7, "peer0", {"members": {1, 2}}, expiration)

    # a hostile entry next to good ones is skipped
    swarm[0].store("mm.round7.ready", ["x"], expiration_time=expiration, subkey="peer9")
    assert set(get_ready(swarm[1], "mm", 7)) == {"peer0", "peer1", "peer2"}


def test_async_variants(swarm: list[DHT]) -> None:
    a, b, c = swarm

    async def main() -> None:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        tick_task = asyncio.create_task(ticker())
        expiration = get_dht_time() + 30
        registry = SwarmRegistry(a, "asyncrun")
        stored = await asyncio.gather(
            registry.announce_async(make_record("peerX")),
            publish_run_config_async(b, "asyncrun", {"task": "tiny"}, ttl=30),
            post_ready_async(c, "asyncrun", 1, "peerX", {"ok": 1}, expiration),
            post_group_async(a, "asyncrun", 1, "peerX", {"members": ["peerX"]}, expiration),
        )
        assert all(stored)
        peers, config, runs, ready, group = await asyncio.gather(
            SwarmRegistry(b, "asyncrun").peers_async(),
            fetch_run_config_async(c, "asyncrun"),
            list_runs_async(a),
            get_ready_async(a, "asyncrun", 1),
            get_group_async(b, "asyncrun", 1, "peerX"),
        )
        assert [p.peer_id for p in peers] == ["peerX"]
        assert config == {"task": "tiny"} and "asyncrun" in runs
        assert ready == {"peerX": {"ok": 1}} and group == {"members": ["peerX"]}
        assert await registry.withdraw_async("peerX")
        tick_task.cancel()
        assert ticks > 1  # the loop kept running while DHT requests were in flight

    asyncio.run(main())


def test_large_requests_do_not_crash_the_dht_process() -> None:
    """Regression for hivemind's non-blocking request pipe (see _make_request_pipe_blocking)."""
    node = start_dht()
    try:
        expiration = get_dht_time() + 30
        futures = [node.store(f"big{i}", "x" * 60_000, expiration, return_future=True) for i in range(100)]
        assert all(f.result(timeout=30) for f in futures)
        assert node.is_alive()
        assert publish_run_config(node, "bigrun", {"blob": "y" * 60_000}, ttl=30)
    finally:
        shutdown_dht(node)


def test_pending_timeout_is_a_dht_error() -> None:
    never: Future[Any] = Future()
    with pytest.raises(DHTError, match="no answer within"):
        Pending([never], lambda a: a, 0.05, "test call").wait()
    assert never.cancelled()

    async def main() -> None:
        with pytest.raises(DHTError, match="no answer within"):
            await Pending([Future()], lambda a: a, 0.05, "test call").wait_async()

    asyncio.run(main())


# --- identity, bootstrap, hivemind-dht --------------------------------------------------------


def test_ensure_identity_creates_private_stable_key(tmp_path: Path) -> None:
    path = tmp_path / "id.key"
    peer_id = ensure_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_identity(path) == peer_id
    assert sorted(os.listdir(tmp_path)) == ["id.key"]  # no temporary left behind
    (tmp_path / "junk.key").write_bytes(b"not a key")
    with pytest.raises(DHTError, match="not a libp2p"):
        ensure_identity(tmp_path / "junk.key")
    with pytest.raises(DHTError, match="does not exist"):
        ensure_identity(tmp_path / "missing-dir" / "id.key")


def _bootstrap_in_thread(
    identity: Path, addr_file: Path | None, refresh_period: float = 30.0
) -> tuple[threading.Thread, threading.Event, Future[list[str]], list[BaseException]]:
    stop, ready, errors = threading.Event(), Future[list[str]](), []

    def target() -> None:
        try:
            run_bootstrap(
                "127.0.0.1",
                0,
                identity,
                addr_file,
                ready.set_result,
                stop=stop,
                refresh_period=refresh_period,
            )
        except BaseException as e:
            errors.append(e)
            if not ready.done():
                ready.set_exception(e)

    thread = threading.Thread(target=target, name="bootstrap", daemon=True)
    thread.start()
    return thread, stop, ready, errors


def test_run_bootstrap_stable_identity(tmp_path: Path) -> None:
    identity, addr_file = tmp_path / "bootstrap.key", tmp_path / "bootstrap.addr"
    peer_ids = []
    for attempt in range(2):
        thread, stop, ready, errors = _bootstrap_in_thread(identity, addr_file, refresh_period=0.2)
        try:
            maddrs = ready.result(timeout=30)
            assert addr_file.read_text() == maddrs[0] + "\n"
            assert all(re.fullmatch(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+", m) for m in maddrs)
            peer_ids.append(maddrs[0].rsplit("/", 1)[1])
            if attempt == 0:  # a node joins through the address in the file and uses the DHT
                node = start_dht([addr_file.read_text().strip()])
                try:
                    registry = SwarmRegistry(node, "bootrun")
                    assert registry.announce(make_record("peerJ"))
                    assert peer_ids_of(registry) == {"peerJ"}
                finally:
                    shutdown_dht(node)
        finally:
            stop.set()
            thread.join(timeout=30)
        assert not thread.is_alive() and not errors
    assert peer_ids[0] == peer_ids[1] == ensure_identity(identity)
    assert stat.S_IMODE(identity.stat().st_mode) == 0o600


def peer_ids_of(registry: SwarmRegistry) -> set[str]:
    return {r.peer_id for r in registry.peers()}


def _read_initial_peer(proc: subprocess.Popen[str], timeout: float) -> str:
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout

    def pump() -> None:
        for line in stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline, seen = time.monotonic() + timeout, list[str]()
    while time.monotonic() < deadline:
        try:
            line = re.sub(r"\x1b\[[0-9;]*m", "", lines.get(timeout=0.2))
        except queue.Empty:
            assert proc.poll() is None, f"hivemind-dht exited early: {seen}"
            continue
        seen.append(line)
        match = re.search(r"--initial_peers (/ip4/\S+/p2p/\w+)", line)
        if match:
            return match.group(1)
    raise AssertionError(f"hivemind-dht printed no multiaddr within {timeout} s: {seen}")


def test_hivemind_dht_console_script_as_bootstrap(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "hivemind-dht"
    command = [
        str(script),
        "--host_maddrs",
        "/ip4/127.0.0.1/tcp/0",
        "--identity_path",
        str(tmp_path / "hm.key"),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    nodes: list[DHT] = []
    try:
        bootstrap = _read_initial_peer(proc, timeout=30)
        nodes.append(start_dht([bootstrap]))
        nodes.append(start_dht([bootstrap], client_mode=True))
        assert SwarmRegistry(nodes[0], "hmrun").announce(make_record("peerH"))
        assert wait_until(
            lambda: peer_ids_of(SwarmRegistry(nodes[1], "hmrun")), what="record via hivemind-dht"
        )
    finally:
        for node in nodes:
            shutdown_dht(node)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# --- failures are quick and say what to check -------------------------------------------------


@pytest.mark.parametrize("addr", ["garbage", "/ip4/127.0.0.1/tcp/4001", "/ip4/1.2.3.4/tcp/1/p2p/xyz"])
def test_invalid_initial_peer_is_rejected_up_front(addr: str) -> None:
    started = time.monotonic()
    with pytest.raises(DHTError, match="/ip4/<host>/tcp/<port>/p2p/<peer id>"):
        start_dht([addr])
    assert time.monotonic() - started < 1.0


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_initial_peer_fails_fast() -> None:
    addr = f"/ip4/127.0.0.1/tcp/{_closed_port()}/p2p/{FAKE_PEER}"
    started = time.monotonic()
    with pytest.raises(DHTError) as info:
        start_dht([addr], startup_timeout=10)
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert addr in message
    for hint in ("port", "firewall", "clock", "3 s"):
        assert hint in message


def test_silent_initial_peer_times_out() -> None:
    """A peer that accepts TCP connections but never speaks must not hang start_dht."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        addr = f"/ip4/127.0.0.1/tcp/{server.getsockname()[1]}/p2p/{FAKE_PEER}"
        started = time.monotonic()
        with pytest.raises(DHTError, match="could not join"):
            start_dht([addr], startup_timeout=2)
        assert time.monotonic() - started < 2 + 6


def test_clock_skew_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import hivemind.dht.protocol as protocol

    real_time = protocol.get_dht_time
    monkeypatch.setattr(protocol, "get_dht_time", lambda: real_time() + 10)
    skewed = start_dht()  # the forked DHT process keeps the skewed clock
    monkeypatch.undo()
    try:
        with pytest.raises(DHTError, match="local time must be within 3 seconds"):
            start_dht(visible_maddrs(skewed))
    finally:
        shutdown_dht(skewed)


def test_dead_dht_is_a_dht_error() -> None:
    node = asyncio.run(start_dht_async(host="127.0.0.1"))
    shutdown_dht(node)
    shutdown_dht(node)  # idempotent
    with pytest.raises(DHTError, match="not running"):
        SwarmRegistry(node, "deadrun").peers()
    with pytest.raises(DHTError):
        start_dht(host="not-an-ip")
