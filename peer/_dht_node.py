"""Starting, stopping and bootstrapping hivemind DHT nodes with bounded waits and clear errors."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import stat
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
from hivemind.dht import DHT
from hivemind.p2p import P2P, PeerID
from hivemind.utils.multiaddr import Multiaddr

from lioncub.peer._dht_calls import (
    DEFAULT_CALL_TIMEOUT,
    TIMEOUT_ERRORS,
    DHTError,
    Pending,
    submit_coroutine,
)

logger = logging.getLogger(__name__)

DEFAULT_STARTUP_TIMEOUT = 20.0
"""Seconds :func:`start_dht` waits for the node to start and reach its initial peers."""

_CHECKLIST = (
    "check that the address and port are right and the node there is running (its multiaddr ends in "
    "/p2p/<peer id>, printed when it starts), that no firewall or NAT blocks that TCP port, and that "
    "this machine's clock is within 3 s of the swarm's (hivemind rejects larger clock skew; run NTP)"
)


def _listen_maddr(host: str, port: int) -> str:
    if not 0 <= port <= 65535:
        raise DHTError(f"port must be in 0..65535 (0 = any free port); got {port}")
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        raise DHTError(f"host must be an IPv4 or IPv6 address of this machine; got {host!r}") from None
    return f"/ip{version}/{host}/tcp/{port}"


def _check_initial_peers(initial_peers: Sequence[str]) -> list[str]:
    if isinstance(initial_peers, str):
        initial_peers = [initial_peers]
    checked = []
    for addr in initial_peers:
        try:
            has_peer_id = "p2p" in Multiaddr(addr)
        except ValueError as e:
            raise DHTError(
                f"invalid initial peer multiaddr {addr!r}: {e}; expected /ip4/<host>/tcp/<port>/p2p/<peer id>"
            ) from None
        if not has_peer_id:
            raise DHTError(
                f"initial peer multiaddr {addr!r} lacks the /p2p/<peer id> part; copy the full address "
                "that the bootstrap node printed (/ip4/<host>/tcp/<port>/p2p/<peer id>)"
            )
        checked.append(str(addr))
    return checked


def ensure_identity(identity_path: str | os.PathLike[str]) -> str:
    """Create a libp2p identity (private key) file if missing and return its peer id (base58).

    A new file is written with mode 0600 via a private temporary directory and a hard link, so the
    key is never readable by others, even briefly, and a concurrent creator cannot be overwritten.
    An existing file that others can read is used as is, with a warning.
    """
    path = Path(identity_path)
    if not path.exists():
        if not path.parent.is_dir():
            raise DHTError(f"cannot create identity file {path}: directory {path.parent} does not exist")
        try:
            with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lioncub-identity-") as tmp:
                tmp_key = Path(tmp) / "identity.key"
                P2P.generate_identity(str(tmp_key))  # hivemind's own key format (RSA), created 0400
                os.chmod(tmp_key, 0o600)
                os.link(tmp_key, path)
            logger.info("created new DHT identity file %s", path)
        except FileExistsError:
            pass  # someone else created it meanwhile: theirs wins
        except OSError as e:
            raise DHTError(f"cannot create identity file {path}: {e}") from e
    elif path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("identity file %s is accessible by other users; run: chmod 600 %s", path, path)
    try:
        return str(PeerID.from_identity(path.read_bytes()).to_base58())
    except Exception as e:
        raise DHTError(
            f"identity file {path} is not a libp2p RSA private key as written by hivemind ({e!r}); "
            "move it away to let a new one be created"
        ) from e


def start_dht(
    initial_peers: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    identity_path: str | os.PathLike[str] | None = None,
    client_mode: bool = False,
    announce_maddrs: Sequence[str] = (),
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
) -> DHT:
    """Start a hivemind DHT node in its own process and return it once it has joined the swarm.

    :param initial_peers: full multiaddrs (``/ip4/<host>/tcp/<port>/p2p/<peer id>``) of live nodes;
        empty to start a new swarm.
    :param host: address to listen on (``0.0.0.0`` for all IPv4 interfaces); ``port`` 0 = any free port.
    :param identity_path: private key file for a stable peer id; created (mode 0600) if missing.
    :param client_mode: do not serve DHT requests (for peers that cannot accept connections).
    :param announce_maddrs: addresses to advertise instead of the local ones (explicit ports only).
    :param startup_timeout: bound on the whole start, joining included.
    :raises DHTError: with what was tried and what to check, within about ``startup_timeout`` + 5 s.

    Stop it with :func:`shutdown_dht`. Blocks for ~0.5 s on loopback: from asyncio use
    :func:`start_dht_async`.
    """
    peers = _check_initial_peers(initial_peers)
    listen = _listen_maddr(host, port)
    kwargs: dict[str, Any] = {"host_maddrs": [listen], "client_mode": client_mode}
    if identity_path is not None:
        ensure_identity(identity_path)
        kwargs["identity_path"] = os.fspath(identity_path)
    if announce_maddrs:
        kwargs["announce_maddrs"] = list(announce_maddrs)
    dht = DHT(initial_peers=peers or None, start=False, startup_timeout=startup_timeout, **kwargs)
    try:
        dht.run_in_background(await_ready=True, timeout=startup_timeout)
    except BaseException as e:
        shutdown_dht(dht)
        if isinstance(e, Exception):
            raise _start_error(peers, listen, startup_timeout, e) from e
        raise
    _make_request_pipe_blocking(dht)
    # Keep the future alive with the node: dropping it could cancel the watchdog in the child.
    dht._lioncub_watchdog = submit_coroutine(dht, _exit_with_parent)  # type: ignore[attr-defined]
    logger.info("DHT node %s started (listen address %s)", dht.peer_id, listen)
    return dht


async def _exit_with_parent(_dht: DHT, node: Any) -> None:
    """Runs inside the DHT process: leave (and take p2pd along) when the process that forked it dies.

    hivemind's DHT process never notices its parent's death (it inherited the write end of its own
    request pipe), so a SIGKILLed peer would leave its DHT process and p2pd running forever.
    """
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(node.shutdown(), timeout=5.0)
    os._exit(0)


def _make_request_pipe_blocking(dht: DHT) -> None:
    """Work around a hivemind 1.1.12 crash on requests larger than ~16 KiB.

    The DHT process watches the read end of its request pipe with uvloop's ``add_reader``, which
    switches the descriptor to non-blocking mode; a request written in two parts (multiprocessing
    does so above 16 KiB) can then be read half-way, raise ``BlockingIOError`` and desynchronise the
    pipe, and the DHT process dies. The flag lives on the open file shared by both processes, so
    setting the read end back to blocking here (after the DHT process registered its reader) fixes
    it: the DHT process only reads once data is there, and the rest of a message follows at once.
    """
    pipe = getattr(dht, "_inner_pipe", None)
    if pipe is None:
        logger.warning("hivemind DHT has no _inner_pipe; requests over 16 KiB may crash it")
        return
    os.set_blocking(pipe.fileno(), True)


def _start_error(peers: list[str], listen: str, timeout: float, cause: Exception) -> DHTError:
    if isinstance(cause, TIMEOUT_ERRORS):
        reason = f"no success within {timeout:.1f} s"
    else:
        reason = f"{type(cause).__name__}: {cause}"
    if peers:
        return DHTError(f"could not join the DHT through initial peers {peers} ({reason}); " + _CHECKLIST)
    return DHTError(
        f"could not start a DHT node listening on {listen} ({reason}); check that the host is an "
        "address of this machine and that the port is free"
    )


async def start_dht_async(
    initial_peers: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    identity_path: str | os.PathLike[str] | None = None,
    client_mode: bool = False,
    announce_maddrs: Sequence[str] = (),
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
) -> DHT:
    """:func:`start_dht` in a worker thread, so the event loop keeps running meanwhile."""
    return await asyncio.to_thread(
        start_dht,
        initial_peers,
        host=host,
        port=port,
        identity_path=identity_path,
        client_mode=client_mode,
        announce_maddrs=announce_maddrs,
        startup_timeout=startup_timeout,
    )


def shutdown_dht(dht: DHT, timeout: float = 5.0) -> None:
    """Stop a DHT node and make sure its process and its ``p2pd`` daemon are gone. Idempotent."""
    try:
        children = psutil.Process(dht.pid).children(recursive=True) if dht.pid else []
    except psutil.Error:
        children = []
    try:
        if dht.is_alive():
            dht.shutdown()
            dht.join(timeout)
            if dht.is_alive():
                dht.kill()
                dht.join(timeout)
    except (AssertionError, ValueError):  # never started, or asked from another process
        pass
    for child in children:
        try:
            child.kill()
            logger.debug("killed leftover DHT child process %d", child.pid)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=timeout)


async def _visible_maddrs(_dht: DHT, node: Any) -> list[str]:
    # Runs inside the DHT process; a module-level function so that it pickles by name.
    return [str(m) for m in await node.get_visible_maddrs()]


def _preference(maddr: str) -> tuple[int, str]:
    parts = maddr.split("/")
    try:
        ip = ipaddress.ip_address(parts[2])
    except (ValueError, IndexError):
        return (1, maddr)  # a DNS name: keep it, after concrete global addresses
    return (3 if ip.is_loopback else 2 if ip.version == 6 else 0, maddr)


def visible_maddrs(dht: DHT, timeout: float = DEFAULT_CALL_TIMEOUT) -> list[str]:
    """Full multiaddrs (``.../p2p/<peer id>``) other nodes can use to join through ``dht``.

    Ordered best first: IPv4 addresses before DNS names and IPv6, loopback last.
    """
    peer_id = str(dht.peer_id)

    def parse(answers: list[Any]) -> list[str]:
        full = [m if "/p2p/" in m else f"{m}/p2p/{peer_id}" for m in answers[0]]
        return sorted(dict.fromkeys(full), key=_preference)

    return Pending(
        [submit_coroutine(dht, _visible_maddrs)], parse, timeout, "reading visible multiaddrs"
    ).wait()


async def _heartbeat(_dht: DHT, node: Any) -> int:
    # Runs inside the DHT process: look up a random key, which refreshes the routing table and drops
    # dead peers, and report how many peers are known.
    await node.get(f"lioncub.heartbeat.{secrets.token_hex(8)}", latest=True)
    return len(node.protocol.routing_table.uid_to_peer_id)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def run_bootstrap(
    host: str,
    port: int,
    identity_path: str | os.PathLike[str],
    addr_file: Path | None,
    on_ready: Callable[[list[str]], None],
    *,
    stop: threading.Event,
    initial_peers: Sequence[str] = (),
    refresh_period: float = 30.0,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
) -> None:
    """Run a bootstrap DHT node with a stable identity until ``stop`` is set.

    The identity file is created (0600) if missing; the same file gives the same peer id on every
    start. Once the node is up, its full multiaddrs (best first) go to ``on_ready`` and the first one
    is written atomically, with a trailing newline, to ``addr_file`` if given. Every
    ``refresh_period`` seconds the node looks up a random key to keep its routing table fresh and
    logs how many peers it knows. The caller wires signals: ``signal.signal(SIGTERM, lambda *_:
    stop.set())``. The node is always shut down on return.
    """
    peer_id = ensure_identity(identity_path)
    logger.info("bootstrap node identity %s (peer id %s)", identity_path, peer_id)
    dht = start_dht(
        initial_peers, host=host, port=port, identity_path=identity_path, startup_timeout=startup_timeout
    )
    try:
        maddrs = visible_maddrs(dht)
        if addr_file is not None:
            _write_atomically(addr_file, maddrs[0] + "\n")
        on_ready(maddrs)
        while not stop.wait(refresh_period):
            if not dht.is_alive():
                raise DHTError("the bootstrap DHT process died unexpectedly; see the log above")
            try:
                known = Pending(
                    [submit_coroutine(dht, _heartbeat)], lambda a: int(a[0]), refresh_period, "heartbeat"
                )
                logger.info("bootstrap node %s knows %d other DHT peers", peer_id, known.wait())
            except DHTError as e:
                logger.warning("bootstrap heartbeat failed: %s", e)
    finally:
        shutdown_dht(dht)
        logger.info("bootstrap node %s stopped", peer_id)
