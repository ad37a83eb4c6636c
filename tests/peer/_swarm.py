"""A harness for multi-peer tests on real processes: ``lioncub-peer join`` / ``dht`` on 127.0.0.1.

Every child is a real ``lioncub-peer`` process (with its hivemind DHT process and ``p2pd`` daemon).
A :class:`Swarm` starts them, reads each peer's ``--progress jsonl`` events on a thread, lets the
test wait for events with bounded deadlines (never sleeps), and on exit terminates every process it
started and reaps every descendant they left (the test process is a child subreaper, see
``tests/conftest.py``, so orphaned DHT processes and ``p2pd`` daemons come back to it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import psutil

from tests.peer._reap import child_pids, reap_new_children
from tests.peer._util import wait_until

__all__ = [
    "FAST",
    "PEER_CLI",
    "Event",
    "Launch",
    "PeerProc",
    "Swarm",
    "descendants",
    "live",
    "stop_all",
]

Event = dict[str, Any]

_BIN = Path(sys.executable).parent
PEER_CLI = (
    str(_BIN / "lioncub-peer") if (_BIN / "lioncub-peer").exists() else shutil.which("lioncub-peer") or ""
)
HIVEMIND_DHT = (
    str(_BIN / "hivemind-dht") if (_BIN / "hivemind-dht").exists() else shutil.which("hivemind-dht") or ""
)

#: Run settings that keep failures quick (a dead peer costs a round at most a few seconds).
FAST: tuple[str, ...] = (
    "--set",
    "rounds.matchmaking_timeout=3",
    "--set",
    "rounds.exchange_timeout=5",
)

#: Seconds a process start may take on a loaded 2-core machine (torch + hivemind import, DHT start).
START_TIMEOUT = 180.0

_MADDR = re.compile(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        NO_COLOR="1",
        COLUMNS="200",  # rich: never wrap a multiaddr
    )
    for key in [k for k in env if k.startswith("LIONCUB_") and "__" in k]:
        del env[key]  # run settings come from the test's flags only
    return env


def stop_all(peers: Sequence[PeerProc], timeout: float) -> list[dict[str, Any]]:
    """SIGTERM every peer, then require a clean exit (code 0) of each and return their summaries."""
    for p in peers:
        p.signal(signal.SIGTERM)
    return [p.exit_ok(timeout) for p in peers]


def live(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def descendants(pid: int) -> list[psutil.Process]:
    """All live descendants of ``pid`` (its DHT process, ``p2pd``, ...)."""
    try:
        return [p for p in psutil.Process(pid).children(recursive=True) if live(p.pid)]
    except psutil.NoSuchProcess:
        return []


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _unread_bytes(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    (count,) = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))
    return int(count)


def _kill_tree(pid: int) -> None:
    procs = descendants(pid)
    with contextlib.suppress(psutil.NoSuchProcess):
        procs.insert(0, psutil.Process(pid))
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(procs, timeout=5.0)


class PeerProc:
    """One child process whose stdout lines are read on a thread (JSON lines become events)."""

    def __init__(self, name: str, argv: list[str], cwd: Path, summary: Path | None) -> None:
        self.name = name
        self.argv = argv
        self.summary_path = summary
        self.stderr_path = cwd / f"{name}.stderr"
        self._stderr: TextIO = open(self.stderr_path, "w", encoding="utf-8")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            bufsize=0,  # the reader thread does its own line splitting (see _read)
        )
        self.events: list[Event] = []
        self.spawned_at = time.monotonic()
        self.exited_at: float | None = None  # when wait_exit saw it gone
        self.eof_at: float | None = None  # when its stdout closed (it and its children exited)
        self.signalled = False  # SIGTERM or SIGINT sent
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reading = False  # the reader thread is in (or about to enter) a read of the pipe
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        # os.read on the raw pipe, not a buffered file: with nothing left in the pipe and this thread
        # back in a read, every line the child wrote so far is in ``lines`` (see :meth:`drained`).
        assert self.proc.stdout is not None
        fd, pending = self.proc.stdout.fileno(), b""
        while True:
            with self._cond:
                self._reading = True
                self._cond.notify_all()
            data = os.read(fd, 1 << 16)
            with self._cond:
                self._reading = False
            if not data:
                break
            *lines, pending = (pending + data).split(b"\n")
            for raw in lines:
                self._take(raw.decode("utf-8", errors="replace"))
        if pending:
            self._take(pending.decode("utf-8", errors="replace"))
        with self._cond:
            self._eof = True
            self.eof_at = time.monotonic()
            self._cond.notify_all()

    def _take(self, line: str) -> None:
        with self._cond:
            self.lines.append(line)
            try:
                doc = json.loads(line)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and "event" in doc:
                doc["_t"] = time.monotonic()  # when the harness read it
                self.events.append(doc)
            self._cond.notify_all()

    # -- waiting --------------------------------------------------------------------------------

    def drained(self, timeout: float = 10.0) -> None:
        """Wait until the harness has read everything the child wrote so far (nothing is left in the
        pipe and the reader is back in a read). Meant for a child that writes nothing more, e.g. one
        stopped with SIGSTOP: then :meth:`rounds` is exactly what it logged before."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self._eof or (self._reading and _unread_bytes(fd) == 0)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: stdout not drained after {timeout:.0f} s")
                self._cond.wait(min(left, 0.05))

    def wait_for(self, predicate: Callable[[Event], bool], timeout: float, what: str) -> Event:
        """The first event that satisfies ``predicate``; fails after ``timeout`` s or if stdout closed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events:
                    if predicate(ev):
                        return ev
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
        state = (
            f"stdout closed (exit code {self.proc.poll()})" if self._eof else f"none after {timeout:.0f} s"
        )
        raise AssertionError(f"{self.name}: waiting for {what}: {state}\n{self.describe()}")

    def started(self, timeout: float = START_TIMEOUT) -> Event:
        return self.wait_for(lambda e: e["event"] == "started", timeout, "the 'started' event")

    def wait_round(self, at_least: int, timeout: float) -> Event:
        """The first ``round`` event whose round number is ``>= at_least``."""
        return self.wait_for(
            lambda e: e["event"] == "round" and e["round"] >= at_least, timeout, f"round >= {at_least}"
        )

    def wait_rounds(self, count: int, timeout: float) -> list[Event]:
        """The first ``count`` ``round`` events, once there are that many."""
        self.wait_for(lambda _: len(self.rounds()) >= count, timeout, f"{count} round events")
        return self.rounds()[:count]

    def wait_fault(self, timeout: float, phase: str | None = None) -> Event:
        """The first ``fault`` event this peer's injector (``--fault``) reported (of ``phase``, if given)."""
        return self.wait_for(
            lambda e: e["event"] == "fault" and (phase is None or e.get("phase") == phase),
            timeout,
            f"a fault event{f' ({phase})' if phase else ''}",
        )

    def killed(self, timeout: float) -> Event:
        """Wait for this peer to SIGKILL itself on an injected fault; return the fault event."""
        fault = self.wait_fault(timeout)
        code = self.wait_exit(timeout, drain=0)
        assert code == -signal.SIGKILL, f"{self.name} exited with {code}, not SIGKILL\n{self.describe()}"
        return fault

    def rounds_after(self, t: float) -> list[Event]:
        """``round`` events the harness read after ``time.monotonic()`` was ``t``."""
        return [e for e in self.rounds() if e["_t"] > t]

    def finished(self, timeout: float) -> Event:
        return self.wait_for(lambda e: e["event"] == "finished", timeout, "the 'finished' event")

    def rounds(self) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e["event"] == "round"]

    def wait_exit(self, timeout: float, drain: float = 5.0) -> int:
        """Wait for the process to exit, then up to ``drain`` s for the rest of its stdout.

        (A descendant that outlives the process, e.g. an orphaned DHT process, keeps the pipe open.)
        """
        try:
            code = self.proc.wait(timeout)
            self.exited_at = time.monotonic()
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} still running after {timeout:.0f} s\n{self.describe()}"
            ) from None
        self._reader.join(drain)
        return code

    def exit_ok(self, timeout: float) -> dict[str, Any]:
        """Wait for a clean exit (code 0) and return the summary the peer wrote."""
        code = self.wait_exit(timeout)
        assert code == 0, f"{self.name} exited with {code}\n{self.describe()}"
        return self.summary()

    @property
    def peer_id(self) -> str:
        return str(self.started()["peer_id"])

    def summary(self) -> dict[str, Any]:
        assert self.summary_path is not None, f"{self.name} was started without --summary"
        assert self.summary_path.exists(), f"{self.name} wrote no summary\n{self.describe()}"
        doc: dict[str, Any] = json.loads(self.summary_path.read_text())
        return doc

    def non_json_lines(self) -> list[str]:
        """Stdout lines that are not JSON objects (``--progress jsonl`` should print none)."""
        with self._cond:
            return [line for line in self.lines if not _is_json_object(line)]

    def output(self) -> str:
        """Stdout and stderr with runs of whitespace squeezed (rich wraps long messages)."""
        with self._cond:
            out = "\n".join(self.lines)
        return " ".join(f"{out}\n{self.stderr()}".split())

    def stderr(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def describe(self, tail: int = 4000) -> str:
        with self._cond:
            out = "\n".join(self.lines[-15:])
        return f"--- {self.name} stdout (last lines):\n{out}\n--- {self.name} stderr (tail):\n{self.stderr()[-tail:]}"

    # -- stopping -------------------------------------------------------------------------------

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.signalled |= sig in (signal.SIGTERM, signal.SIGINT)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (graceful) unless already sent, then SIGKILL the whole tree after ``grace`` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test stopped it
            if not self.signalled:
                self.signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                _kill_tree(self.pid)
                self.proc.wait(5.0)

    def close(self) -> None:
        """Release the pipes; call once the process and every descendant holding them are gone.

        The stdout pipe is closed only once the reader thread saw its end: closing it under a
        blocked reader would deadlock on the buffer's lock.
        """
        self._reader.join(5.0)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()
        self._stderr.close()


@dataclass(frozen=True)
class Launch:
    """A run being started by :meth:`Swarm.launch_first`."""

    n: int
    first: PeerProc
    common: list[str]
    per_peer: dict[int, list[str]]


class Swarm:
    """Real peer processes in ``workdir``; use as a context manager so that everything is reaped.

    Example::

        with Swarm(tmp_path) as swarm:
            a = swarm.join("a", "--task", "tiny", "--min-peers", "2", "--max-rounds", "10")
            b = swarm.join("b", "--min-peers", "2", "--max-rounds", "10", dht=[swarm.first_maddr(a)])
            assert b.exit_ok(60)["rounds_completed"] == 10
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[PeerProc] = []
        self._before: set[int] = set()

    def __enter__(self) -> Swarm:
        self._before = child_pids()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Terminate every process (graceful first), then kill and reap whatever descendants remain."""
        for p in self.procs:
            if not p.signalled:
                p.signal(signal.SIGTERM)
        for p in self.procs:
            p.stop(grace=10.0)
        # Orphans (a DHT process whose peer was killed) would keep the peers' pipes open.
        reap_new_children(self._before, grace=5.0)
        for p in self.procs:
            p.close()

    # -- starting -------------------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], summary: Path | None = None) -> PeerProc:
        proc = PeerProc(name, argv, self.workdir, summary)
        self.procs.append(proc)
        return proc

    def cli(self, name: str, *args: str) -> PeerProc:
        """Start ``lioncub-peer ARGS`` (any command) without extra flags."""
        return self.spawn(name, [PEER_CLI, *args])

    def join(
        self,
        name: str,
        *args: str,
        dht: Sequence[str] = (),
        summary: bool = True,
        jsonl: bool = True,
    ) -> PeerProc:
        """Start ``lioncub-peer join`` with ``--progress jsonl``, ``--summary <name>.json`` and ``args``."""
        argv = [PEER_CLI, "join", *args]
        if dht:
            argv += ["--dht", *dht]
        path = self.workdir / f"{name}.json" if summary else None
        if path is not None:
            argv += ["--summary", str(path)]
        if jsonl:
            argv += ["--progress", "jsonl"]
        return self.spawn(name, argv, path)

    def bootstrap(self, name: str = "bootstrap", timeout: float = START_TIMEOUT) -> str:
        """Start ``lioncub-peer dht`` on 127.0.0.1 and return its multiaddr (from ``--addr-file``)."""
        addr_file = self.workdir / f"{name}.addr"
        argv = [
            PEER_CLI,
            "dht",
            "--host",
            "127.0.0.1",
            "--identity",
            str(self.workdir / f"{name}.id"),
            "--addr-file",
            str(addr_file),
        ]
        proc = self.spawn(name, argv)

        def ready() -> bool:
            if proc.proc.poll() is not None:
                raise AssertionError(f"the bootstrap node exited\n{proc.describe()}")
            return addr_file.exists() and addr_file.read_text().endswith("\n")

        wait_until(ready, timeout, what=f"{addr_file} from lioncub-peer dht")
        return addr_file.read_text().strip()

    def hivemind_bootstrap(self, name: str = "hivemind-dht", timeout: float = START_TIMEOUT) -> str:
        """Start a plain ``hivemind-dht`` node on 127.0.0.1 and return the multiaddr it prints."""
        argv = [
            HIVEMIND_DHT,
            "--host_maddrs",
            "/ip4/127.0.0.1/tcp/0",
            "--identity_path",
            str(self.workdir / f"{name}.id"),
        ]
        proc = self.spawn(name, argv)

        def maddr() -> str | None:
            # hivemind logs "... use --initial_peers /ip4/127.0.0.1/tcp/<port>/p2p/<id>" to stderr.
            match = _MADDR.search(proc.stderr() + "\n".join(proc.lines))
            if match is None and proc.proc.poll() is not None:
                raise AssertionError(f"hivemind-dht exited\n{proc.describe()}")
            return match.group(0) if match else None

        return wait_until(maddr, timeout, what="the multiaddr printed by hivemind-dht")

    def launch(
        self,
        n: int,
        *run_args: str,
        max_rounds: int | None = None,
        per_peer: Mapping[int, Sequence[str]] | None = None,
    ) -> list[PeerProc]:
        """Start a run of ``n`` peers ``p0`` .. ``p<n-1>`` that wait for each other (``--min-peers n``).

        ``p0`` creates the run (``--task tiny`` plus ``run_args``); the others join through its
        multiaddr with no ``--task`` or ``--set``, so they take the run config from the DHT.
        ``per_peer`` adds peer flags (``--client-mode``, ``--checkpoint-dir``...) by index.
        """
        return self.launch_rest(self.launch_first(n, *run_args, max_rounds=max_rounds, per_peer=per_peer))

    def launch_first(
        self,
        n: int,
        *run_args: str,
        max_rounds: int | None = None,
        per_peer: Mapping[int, Sequence[str]] | None = None,
    ) -> Launch:
        """The first half of :meth:`launch`: start ``p0`` only (to start several swarms side by side)."""
        extra = {i: list(args) for i, args in (per_peer or {}).items()}
        common = ["--min-peers", str(n), "--start-timeout", str(int(START_TIMEOUT))]
        if max_rounds is not None:
            common += ["--max-rounds", str(max_rounds)]
        first = self.join("p0", "--task", "tiny", *run_args, *common, *extra.get(0, ()))
        return Launch(n, first, common, extra)

    def launch_rest(self, launch: Launch) -> list[PeerProc]:
        """The second half of :meth:`launch`: once ``p0`` is up, start the others through it."""
        addr = self.first_maddr(launch.first)
        rest = [
            self.join(f"p{i}", *launch.common, *launch.per_peer.get(i, ()), dht=[addr])
            for i in range(1, launch.n)
        ]
        return [launch.first, *rest]

    def kill_tree(self, peer: PeerProc) -> None:
        """SIGKILL ``peer`` and every descendant (its DHT process, ``p2pd``); wait for it to exit."""
        _kill_tree(peer.pid)
        peer.wait_exit(10, drain=0)

    @staticmethod
    def first_maddr(peer: PeerProc, timeout: float = START_TIMEOUT) -> str:
        """The first multiaddr in ``peer``'s ``started`` event (others join through it)."""
        maddrs = peer.started(timeout)["maddrs"]
        assert maddrs, f"{peer.name} reported no multiaddr\n{peer.describe()}"
        return str(maddrs[0])
