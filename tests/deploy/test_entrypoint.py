"""docker/entrypoint.sh: run-time arguments, slots, waits, traffic shaping, privilege drop.

The script runs for real; ``lioncub-peer``, ``tc``, ``ip``, ``id``, ``setpriv`` and ``hostname`` are
stubs on ``PATH`` (see ``_deploy.py``) except in :func:`test_shaping_in_a_network_namespace`, which
shapes a veth in a private network namespace with the real ``tc`` (root only).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.deploy._deploy import (
    ENTRYPOINT,
    FAKE_BOOTSTRAP,
    FAKE_CONTAINER_IP,
    check_command,
    run_entrypoint,
    stub_env,
)
from tests.peer._util import wait_until

JOIN = ["lioncub-peer", "join", "--task", "tiny", "--host", "0.0.0.0", "--port", "31338"]


def test_plain_command_is_exec_unchanged(tmp_path: Path) -> None:
    run = run_entrypoint([*JOIN, "--progress", "jsonl"], {}, tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.argv == [*JOIN[1:], "--progress", "jsonl"]
    assert run.net_log == []


def test_join_gets_bootstrap_address_advertise_host_and_a_slot(tmp_path: Path) -> None:
    addr_file = tmp_path / "swarm" / "bootstrap.addr"
    addr_file.parent.mkdir()
    addr_file.write_text(FAKE_BOOTSTRAP + "\n")
    slots = tmp_path / "peers"
    env = {
        "LIONCUB_BOOTSTRAP_ADDR_FILE": str(addr_file),
        "LIONCUB_ADVERTISE_HOST": "auto",
        "LIONCUB_SLOTS_DIR": str(slots),
    }
    run = run_entrypoint(JOIN, env, tmp_path)
    assert run.returncode == 0, run.stderr
    slot = slots / "slot-0"
    assert run.argv == [
        *JOIN[1:],
        "--dht",
        FAKE_BOOTSTRAP,
        "--advertise-host",
        FAKE_CONTAINER_IP,
        "--checkpoint-dir",
        str(slot / "checkpoints"),
        "--identity",
        str(slot / "peer.key"),
        "--resume",
    ]
    assert (slot / "checkpoints").is_dir()
    doc = check_command(run.argv)
    assert doc["peer"]["initial_peers"] == str((FAKE_BOOTSTRAP,))
    assert doc["peer"]["advertise_host"] == FAKE_CONTAINER_IP
    assert doc["peer"]["resume"] == "True"


def test_explicit_advertise_host(tmp_path: Path) -> None:
    run = run_entrypoint(JOIN, {"LIONCUB_ADVERTISE_HOST": "10.1.2.3"}, tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.argv is not None and run.argv[-2:] == ["--advertise-host", "10.1.2.3"]


def test_replicas_get_different_slots_and_a_freed_slot_is_reused(tmp_path: Path) -> None:
    slots = tmp_path / "peers"
    env = {"LIONCUB_SLOTS_DIR": str(slots)}
    holder_dir = tmp_path / "holder"
    holder_dir.mkdir()
    # A first replica that keeps running (and so keeps slot-0 locked).
    holder = subprocess.Popen(
        [str(ENTRYPOINT), *JOIN],
        env=stub_env(holder_dir, {**env, "STUB_HOLD": "1"}),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        argv = wait_until(lambda: (holder_dir / "argv").exists(), timeout=30, what="the first replica")
        assert argv
        assert str(slots / "slot-0" / "checkpoints") in (holder_dir / "argv").read_text().split("\0")
        second = run_entrypoint(JOIN, env, tmp_path / "second")
        assert second.returncode == 0, second.stderr
        assert second.argv is not None and str(slots / "slot-1" / "checkpoints") in second.argv
    finally:
        holder.kill()
        holder.wait(timeout=10)
    third = run_entrypoint(JOIN, env, tmp_path / "third")
    assert third.argv is not None and str(slots / "slot-0" / "checkpoints") in third.argv


def test_dht_removes_a_stale_address_file(tmp_path: Path) -> None:
    stale = tmp_path / "bootstrap.addr"
    stale.write_text("/ip4/10.9.9.9/tcp/31337/p2p/QmOld\n")
    argv = ["lioncub-peer", "dht", "--identity", str(tmp_path / "b.id"), "--addr-file", str(stale)]
    run = run_entrypoint(argv, {}, tmp_path)
    assert run.returncode == 0, run.stderr
    assert not stale.exists()
    assert run.argv == argv[1:]


def test_missing_bootstrap_address_fails_clearly(tmp_path: Path) -> None:
    env = {"LIONCUB_BOOTSTRAP_ADDR_FILE": str(tmp_path / "never"), "LIONCUB_WAIT_TIMEOUT": "1"}
    run = run_entrypoint(JOIN, env, tmp_path)
    assert run.returncode == 1
    assert run.argv is None
    assert "no bootstrap address" in run.stderr


def test_bad_bootstrap_address_fails_clearly(tmp_path: Path) -> None:
    addr_file = tmp_path / "bootstrap.addr"
    addr_file.write_text("not a multiaddr\n")
    run = run_entrypoint(JOIN, {"LIONCUB_BOOTSTRAP_ADDR_FILE": str(addr_file)}, tmp_path)
    assert run.returncode == 1 and run.argv is None
    assert "does not hold a multiaddr" in run.stderr


def test_waits_for_a_listening_port_and_gives_up_on_a_closed_one(tmp_path: Path) -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        run = run_entrypoint(JOIN, {"LIONCUB_WAIT_FOR": f"127.0.0.1:{port}"}, tmp_path)
        assert run.returncode == 0, run.stderr
        assert run.argv == JOIN[1:]
    # The port is closed now (nothing listens on it any more).
    run = run_entrypoint(
        JOIN, {"LIONCUB_WAIT_FOR": f"127.0.0.1:{port}", "LIONCUB_WAIT_TIMEOUT": "1"}, tmp_path
    )
    assert run.returncode == 1 and run.argv is None
    assert "nothing accepts connections" in run.stderr


def test_shaping_commands_then_privilege_drop(tmp_path: Path) -> None:
    env = {"LIONCUB_SHAPE_UP_MBIT": "10", "LIONCUB_SHAPE_DOWN_MBIT": "50"}
    run = run_entrypoint(JOIN, env, tmp_path, uid=0)
    assert run.returncode == 0, run.stderr
    assert run.net_log == [
        "tc qdisc replace dev eth0 root tbf rate 10mbit burst 15000 latency 50ms",
        "ip link show ifb0",
        "ip link add ifb0 type ifb",
        "ip link set ifb0 up",
        "tc qdisc del dev eth0 ingress",
        "tc qdisc add dev eth0 handle ffff: ingress",
        "tc filter add dev eth0 parent ffff: protocol all u32 match u32 0 0 action mirred egress redirect dev ifb0",
        "tc qdisc replace dev ifb0 root tbf rate 50mbit burst 62500 latency 50ms",
        f"setpriv --reuid=lioncub --regid=lioncub --init-groups --inh-caps=-all -- {ENTRYPOINT} {' '.join(JOIN)}",
    ]
    # The peer reports the shaped upload rate.
    assert run.argv == [*JOIN[1:], "--bandwidth", "10"]


def test_without_ifb_only_upload_is_shaped(tmp_path: Path) -> None:
    env = {
        "LIONCUB_SHAPE_UP_MBIT": "5",
        "LIONCUB_SHAPE_DOWN_MBIT": "20",
        "STUB_IFB": "0",
        "LIONCUB_RUN_AS": "",
    }
    run = run_entrypoint(JOIN, env, tmp_path, uid=0)
    assert run.returncode == 0, run.stderr
    assert [c for c in run.net_log if c.startswith("tc")] == [
        "tc qdisc replace dev eth0 root tbf rate 5mbit burst 15000 latency 50ms"
    ]
    assert "modprobe ifb" in run.stderr
    assert run.argv == [*JOIN[1:], "--bandwidth", "5"]


def test_shaping_needs_root(tmp_path: Path) -> None:
    run = run_entrypoint(JOIN, {"LIONCUB_SHAPE_UP_MBIT": "10"}, tmp_path, uid=10001)
    assert run.returncode == 1 and run.argv is None
    assert "needs root and CAP_NET_ADMIN" in run.stderr


@pytest.mark.parametrize("rate", ["0", "1.5", "fast", "-3"])
def test_bad_rates_are_refused(tmp_path: Path, rate: str) -> None:
    run = run_entrypoint(JOIN, {"LIONCUB_SHAPE_UP_MBIT": rate}, tmp_path, uid=0)
    assert run.returncode == 1 and run.argv is None
    assert "LIONCUB_SHAPE_UP_MBIT must be a whole number" in run.stderr


def test_unknown_run_as_user_is_refused(tmp_path: Path) -> None:
    run = run_entrypoint(JOIN, {"LIONCUB_RUN_AS": "no-such-user"}, tmp_path, uid=0)
    assert run.returncode == 1 and run.argv is None
    assert "no-such-user" in run.stderr


def _can_unshare_net() -> bool:
    if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("tc") and shutil.which("ip")):
        return False
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_unshare_net(), reason="needs root, unshare, tc and ip (network namespaces)")
def test_shaping_in_a_network_namespace(tmp_path: Path) -> None:
    """The real tc commands on a veth named eth0 in a private network namespace (gone on exit)."""
    script = (
        "set -e; ip link add eth0 type veth peer name peer0; ip link set eth0 up; ip link set peer0 up; "
        f'exec "{ENTRYPOINT}" sh -c "tc qdisc show dev eth0; tc qdisc show dev ifb0 2>/dev/null || true"'
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LIONCUB_")},
        "LIONCUB_SHAPE_UP_MBIT": "50",
        "LIONCUB_SHAPE_DOWN_MBIT": "200",
        "LIONCUB_RUN_AS": "",
    }
    proc = subprocess.run(
        ["unshare", "--net", "bash", "-c", script], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert "tbf" in proc.stdout and "rate 50Mbit" in proc.stdout
    if "download shaped" in proc.stderr:  # the ifb module is there
        assert "rate 200Mbit" in proc.stdout
    else:
        assert "modprobe ifb" in proc.stderr
