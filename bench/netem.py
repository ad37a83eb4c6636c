"""A swarm of Linux network namespaces with shaped links, for benchmarks on one machine.

Layout (DESIGN.md section 5): one namespace per node (the bootstrap DHT node and each peer), and
a switch namespace holding a Linux bridge. Each node is joined to the bridge by a veth pair
(``veth0`` inside the node, ``nK`` on the bridge). ``tc qdisc ... tbf`` shapes both ends: the
node side's egress is the node's upload, the bridge side's egress its download. Addresses
(``10.213.0.0/24`` by default) exist only inside these namespaces; no route leads anywhere else,
and nothing is ever created in the host's namespace.

    with NetemSwarm(get_profile("uniform-20"), n_peers=4) as net:
        proc = net.run_in(net.peer_ns(0), ["python", "-c", "..."], stdout=subprocess.PIPE)
        net.address(net.peer_ns(0))          # '10.213.0.3'

Teardown (``close()``, also run by ``__exit__``, at interpreter exit, and on SIGINT/SIGTERM
before the previous handler runs) kills what :meth:`run_in` started and every process left in
the namespaces, then deletes the namespaces (which removes their veths and the bridge).

Names carry the creating process id, ``lcb-<pid>-<hex>-<node>``, so parallel runs never collide
and ``python bench/netem.py cleanup`` can remove what a crashed run left behind (only namespaces
whose creator is dead, unless ``--prefix`` names them). Needs root and ``ip netns``; when they are
missing, :func:`unavailable_reason` says why and the CLI exits non-zero: nothing here ever falls
back to unshaped loopback.

CLI::

    python bench/netem.py check                       # can this machine build namespaces? (exit 0/1)
    python bench/netem.py up --profile volunteer --peers 4 --seconds 60   # hold a swarm, print it
    python bench/netem.py list                        # namespaces with our naming scheme
    python bench/netem.py cleanup [--prefix lcb-123-ab12]   # remove leftovers after a crash
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench.*` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from bench.profiles import INFRA_LINK, PROFILES, Link, Profile, get_profile

__all__ = [
    "BASE_PREFIX",
    "LinkCounters",
    "NetemError",
    "NetemSwarm",
    "cleanup",
    "list_namespaces",
    "new_prefix",
    "unavailable_reason",
]

BASE_PREFIX = "lcb"
_NAME = re.compile(r"^lcb-(\d+)-[0-9a-f]+-")
_IP_TIMEOUT_S = 20.0
_KILL_GRACE_S = 5.0


class NetemError(RuntimeError):
    """A namespace, link or shaper could not be set up (the message carries ip/tc's error)."""


@dataclass(frozen=True)
class LinkCounters:
    """Bytes a node's veth moved since it was created (IP + TCP headers included).

    Attributes:
        tx_bytes: bytes the node sent (its upload).
        rx_bytes: bytes the node received (its download).
    """

    tx_bytes: int
    rx_bytes: int


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS`` (bounded in time); raise :class:`NetemError` with its stderr on failure."""
    return _cmd(["ip", *args], check=check)


def _cmd(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=_IP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetemError(f"{' '.join(argv)}: {exc}") from exc
    if check and out.returncode != 0:
        raise NetemError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


def new_prefix() -> str:
    """A fresh, unique name prefix: ``lcb-<our pid>-<4 hex digits>``."""
    return f"{BASE_PREFIX}-{os.getpid()}-{secrets.token_hex(2)}"


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = _ip("netns", "list", check=False)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def unavailable_reason() -> str | None:
    """Why namespaces with shaped links cannot be built here, or None when they can.

    Checks root, the ``ip`` and ``tc`` tools, and really creates (then deletes) a probe namespace
    with a tbf qdisc on a veth, so a kernel without netns or tbf support is caught too.
    """
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc); run as root or skip the bench"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the {tool!r} tool (iproute2) is not installed"
    probe = f"{new_prefix()}-probe"
    try:
        _ip("netns", "add", probe)
    except NetemError as exc:
        return f"cannot create a network namespace: {exc}"
    try:
        _ip("-n", probe, "link", "add", "name", "a", "type", "veth", "peer", "name", "b")
        _cmd(
            [
                "tc",
                "-n",
                probe,
                "qdisc",
                "add",
                "dev",
                "a",
                "root",
                "tbf",
                "rate",
                "10mbit",
                "burst",
                "16kb",
                "latency",
                "50ms",
            ]
        )
    except NetemError as exc:
        return f"cannot shape a veth with tbf: {exc}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _namespace_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False)
    return [int(tok) for tok in out.stdout.split() if tok.isdigit()]


def _kill_pids(pids: Sequence[int], grace: float) -> None:
    """SIGTERM these processes, wait up to ``grace`` seconds, SIGKILL the rest."""
    procs: list[psutil.Process] = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            proc.terminate()
            procs.append(proc)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(alive, timeout=grace)


def _delete_namespace(ns: str, grace: float = _KILL_GRACE_S) -> None:
    _kill_pids(_namespace_pids(ns), grace)
    _ip("netns", "del", ns, check=False)


def cleanup(prefix: str | None = None) -> list[str]:
    """Delete leftover namespaces; return their names.

    With ``prefix``: every namespace whose name starts with ``prefix`` followed by ``-``. Without:
    every namespace of our naming scheme (``lcb-<pid>-<hex>-...``) whose creating process is gone,
    so a cleanup never breaks a run that is still going.
    """
    doomed: list[str] = []
    for ns in list_namespaces():
        if prefix is not None:
            if ns.startswith(f"{prefix}-"):
                doomed.append(ns)
            continue
        match = _NAME.match(ns)
        if match and not psutil.pid_exists(int(match.group(1))):
            doomed.append(ns)
    # Nodes first, the switch (which holds the bridge) last.
    for ns in sorted(doomed, key=lambda n: n.endswith("-sw")):
        _delete_namespace(ns)
    return doomed


class NetemSwarm:
    """Namespaces + veths + a bridge + tbf shapers for ``n_peers`` peers (and a DHT node).

    Args:
        profile: peer ``i``'s link is ``profile.link(i)``.
        n_peers: number of peer namespaces (1..250).
        prefix: name prefix (default: :func:`new_prefix`, unique per run).
        subnet: an IPv4 /24 used only inside these namespaces.
        dht_node: also make a namespace for the bootstrap DHT node (on :data:`INFRA_LINK`).
    """

    def __init__(
        self,
        profile: Profile,
        n_peers: int,
        *,
        prefix: str | None = None,
        subnet: str = "10.213.0.0/24",
        dht_node: bool = True,
    ) -> None:
        if not 1 <= n_peers <= 250:
            raise ValueError(f"n_peers must be in [1, 250], got {n_peers}")
        net = ipaddress.ip_network(subnet)
        if net.version != 4 or net.prefixlen != 24 or not net.is_private:
            raise ValueError(f"subnet must be a private IPv4 /24, got {subnet}")
        self.profile = profile
        self.n_peers = n_peers
        self.prefix = prefix or new_prefix()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]{0,40}", self.prefix):
            raise ValueError(f"prefix must be 1-41 letters, digits or '-', got {self.prefix!r}")
        self.switch_ns = f"{self.prefix}-sw"
        self._hosts = list(net.hosts())
        self._nodes: dict[str, tuple[int, Link]] = {}
        if dht_node:
            self._nodes[f"{self.prefix}-dht"] = (len(self._nodes), INFRA_LINK)
        for i in range(n_peers):
            self._nodes[f"{self.prefix}-p{i}"] = (len(self._nodes), profile.link(i))
        self._procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self._prev_handlers: dict[int, Any] = {}
        self._lock = threading.RLock()
        self._closed = False

    # ----------------------------------------------------------------------------------- naming
    @property
    def nodes(self) -> list[str]:
        """Every node namespace (the DHT node first, when there is one)."""
        return list(self._nodes)

    @property
    def dht_ns(self) -> str:
        name = f"{self.prefix}-dht"
        if name not in self._nodes:
            raise KeyError("this swarm was built with dht_node=False")
        return name

    def peer_ns(self, i: int) -> str:
        name = f"{self.prefix}-p{i}"
        if name not in self._nodes:
            raise KeyError(f"no peer {i}: this swarm has {self.n_peers} peers")
        return name

    def address(self, ns: str) -> str:
        """The IPv4 address of node ``ns`` (reachable from every other node of this swarm)."""
        index, _ = self._node(ns)
        return str(self._hosts[index + 1])  # .1 stays unused

    def link(self, ns: str) -> Link:
        """The shaped link of node ``ns``."""
        return self._node(ns)[1]

    def _node(self, ns: str) -> tuple[int, Link]:
        try:
            return self._nodes[ns]
        except KeyError:
            raise KeyError(f"{ns!r} is not a node of this swarm; nodes: {', '.join(self._nodes)}") from None

    # ---------------------------------------------------------------------------------- life cycle
    def __enter__(self) -> NetemSwarm:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> None:
        """Build the namespaces, the bridge and the shaped links (tears down on any failure)."""
        reason = unavailable_reason()
        if reason is not None:
            raise NetemError(f"cannot build network namespaces: {reason}")
        self._install_signal_handlers()
        atexit.register(self.close)
        try:
            self._add_namespace(self.switch_ns)
            _ip("-n", self.switch_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch_ns, "link", "set", "br0", "up")
            for ns, (index, link) in self._nodes.items():
                self._add_node(ns, index, link)
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._created.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _add_node(self, ns: str, index: int, link: Link) -> None:
        self._add_namespace(ns)
        port = f"n{index}"
        # Created directly inside the two namespaces: the host's namespace never sees either end.
        veth = ["veth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.switch_ns]
        _ip("link", "add", "name", *veth)
        _ip("-n", ns, "addr", "add", f"{self.address(ns)}/24", "dev", "veth0")
        _ip("-n", ns, "link", "set", "veth0", "up")
        _ip("-n", self.switch_ns, "link", "set", port, "master", "br0")
        _ip("-n", self.switch_ns, "link", "set", port, "up")
        self._shape(ns, "veth0", link.up_mbit)
        self._shape(self.switch_ns, port, link.down_mbit)

    def _shape(self, ns: str, dev: str, mbit: float) -> None:
        rate_bytes = mbit * 1e6 / 8
        # The bucket must hold a few full-size packets and about 2 ms at the rate (kernel timer grain).
        burst = max(16 * 1024, int(rate_bytes * 0.002))
        _cmd(
            [
                "tc",
                "-n",
                ns,
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                f"{mbit}mbit",
                "burst",
                str(burst),
                "latency",
                f"{self.profile.queue_ms}ms",
            ]
        )

    def run_in(self, ns: str, argv: Sequence[str], **popen_kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside node ``ns`` (``ip netns exec``); it is killed at teardown at the latest."""
        self._node(ns)
        if self._closed or ns not in self._created:
            raise NetemError(f"namespace {ns} is not up (start() the swarm first)")
        proc: subprocess.Popen[Any] = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **popen_kwargs)
        self._procs.append(proc)
        return proc

    def counters(self, ns: str) -> LinkCounters:
        """Bytes node ``ns`` has sent and received on its link so far."""
        self._node(ns)
        out = _ip("-n", ns, "-j", "-s", "link", "show", "dev", "veth0")
        stats = json.loads(out.stdout)[0]["stats64"]
        return LinkCounters(tx_bytes=int(stats["tx"]["bytes"]), rx_bytes=int(stats["rx"]["bytes"]))

    def close(self) -> None:
        """Kill every process in the swarm, delete every namespace it made. Safe to call twice.

        SIGINT/SIGTERM are held back while this runs (a few seconds at most) and delivered after,
        so a second Ctrl-C cannot cut the teardown short.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        masked = _block_signals()
        try:
            pids = [pid for p in self._procs if p.poll() is None for pid in (p.pid, *_descendants(p.pid))]
            _kill_pids(pids, _KILL_GRACE_S)
            for proc in self._procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=_KILL_GRACE_S)
            for ns in reversed(self._created):  # nodes first, the switch last
                _delete_namespace(ns)
            self._created.clear()
        finally:
            self._restore_signal_handlers()
            atexit.unregister(self.close)
            if masked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, masked)

    # ------------------------------------------------------------------------------------- signals
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; __exit__/atexit still run
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._prev_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, prev in self._prev_handlers.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, prev)
        self._prev_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Tear down, then behave as the previous handler would (re-raise)."""
        prev = self._prev_handlers.get(signum, signal.SIG_DFL)
        self.close()
        signal.signal(signum, prev if prev is not None else signal.SIG_DFL)
        if callable(prev):
            prev(signum, frame)  # e.g. SIGINT's default handler raises KeyboardInterrupt
        elif prev != signal.SIG_IGN:
            os.kill(os.getpid(), signum)


def _block_signals() -> set[signal.Signals]:
    """Block SIGINT/SIGTERM in the main thread; return what to unblock (nothing elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return set()
    wanted = {signal.SIGINT, signal.SIGTERM}
    already = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    return wanted - set(already)


def _descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


# ------------------------------------------------------------------------------------------- CLI
def _cmd_up(args: argparse.Namespace) -> int:
    profile = get_profile(args.profile)
    with NetemSwarm(profile, args.peers) as net:
        rows = [
            {
                "ns": ns,
                "address": net.address(ns),
                "down_mbit": net.link(ns).down_mbit,
                "up_mbit": net.link(ns).up_mbit,
            }
            for ns in net.nodes
        ]
        print(
            json.dumps({"prefix": net.prefix, "profile": profile.name, "nodes": rows}, indent=2), flush=True
        )
        print(f"run commands with: ip netns exec {net.peer_ns(0)} CMD; Ctrl-C tears down", file=sys.stderr)
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="exit 0 if namespaces with shaped links can be built here")
    sub.add_parser("list", help="print the namespaces of our naming scheme")
    clean = sub.add_parser("cleanup", help="remove namespaces a crashed run left behind")
    clean.add_argument("--prefix", default=None, help="remove everything with this prefix (default: orphans)")
    up = sub.add_parser("up", help="build a swarm, print it, hold it for --seconds (Ctrl-C ends it)")
    up.add_argument("--profile", choices=sorted(PROFILES), default="uniform-20")
    up.add_argument("--peers", type=int, default=4)
    up.add_argument("--seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    if args.cmd == "check":
        reason = unavailable_reason()
        print(
            "ok: network namespaces and tbf shaping are available"
            if reason is None
            else f"unavailable: {reason}"
        )
        return 0 if reason is None else 1
    if os.geteuid() != 0:
        print("error: needs root (network namespaces and tc)", file=sys.stderr)
        return 1
    if args.cmd == "list":
        for ns in list_namespaces():
            if ns.startswith(f"{BASE_PREFIX}-"):
                print(ns)
        return 0
    if args.cmd == "cleanup":
        removed = cleanup(args.prefix)
        print(f"removed {len(removed)} namespace(s)" + (": " + ", ".join(removed) if removed else ""))
        return 0
    try:
        return _cmd_up(args)
    except NetemError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
