"""Running one strategy of the swarm bench: a namespace swarm, a DHT node, N peers, their events.

:func:`run_strategy` builds a fresh :class:`~bench.netem.NetemSwarm`, starts the bootstrap DHT node
and one peer per namespace (``lioncub-peer join``, or ``bench/hivemind_peer.py``), reads their
JSONL events on threads, samples the veth byte counters every 2 s, keeps peer 0's checkpoints
(for validation curves), stops the peers (SIGINT: after their current round) on the budget or the
target, and returns everything observed as a :class:`StrategyRun` on the bench's clock (seconds
since the first peer began training). The swarm is always torn down.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.netem import NetemError, NetemSwarm
from bench.profiles import Profile
from bench.swarm_metrics import RoundPoint, swarm_curve, time_to_target
from lioncub.peer.cli import STRATEGY_DEFAULTS

__all__ = ["VARIANTS", "BenchConfig", "StrategyRun", "Variant", "run_strategy"]

_REPO = Path(__file__).resolve().parents[1]
_HIVEMIND_PEER = _REPO / "bench" / "hivemind_peer.py"
# What the peers log per round (peer/exchange.py, peer/matchmaking.py): the time profile's inputs.
_EXCHANGE_LINE = re.compile(r"round (\d+): (\w+) exchange in group \S+ done in ([0-9.]+) s")
_MATCH_LINE = re.compile(r"\[\w+ r(\d+)\] in group \S+ of \d+ led by \S+ \(([0-9.]+) s\)")
_CKPT = re.compile(r"^ckpt-\d{8,}\.pt$")  # lioncub-peer's checkpoints
_SNAP = re.compile(r"^snap-\d{8,}\.pt$")  # bench/hivemind_peer.py's parameter snapshots
Event = tuple[int, float, dict[str, Any]]


@dataclass(frozen=True)
class Variant:
    """A strategy as the bench runs it.

    Attributes:
        name: the bench's name for it.
        description: one line for the results.
        sets: ``--set`` overrides for ``lioncub-peer join`` (``{H}`` = the bench's local steps,
            ``{LR}`` = its lioncub outer learning rate).
        local_steps: whether it takes ``--local-steps`` steps per round (else one gradient per round).
        runner: ``lioncub`` (``lioncub-peer join``) or ``hivemind`` (``bench/hivemind_peer.py``).
    """

    name: str
    description: str
    sets: tuple[str, ...] = ()
    local_steps: bool = True
    runner: str = "lioncub"


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "allreduce",
            "data-parallel Lion: fp32 gradients averaged every step",
            ("strategy.name=allreduce", "strategy.local_steps=0", "strategy.outer_lr=1e-3"),
            local_steps=False,
        ),
        Variant(
            "lioncub",
            "1-bit signs, weighted majority vote (mavo)",
            ("strategy.name=lioncub", "strategy.local_steps={H}", "strategy.outer_lr={LR}"),
        ),
        Variant(
            "lioncub-coin",
            "1-bit signs, mavo, ties settled by a coin (1 bit down)",
            (
                "strategy.name=lioncub",
                "strategy.local_steps={H}",
                "strategy.outer_lr={LR}",
                "strategy.ties=random",
            ),
        ),
        Variant(
            "lioncub-avg",
            "1-bit signs, mean of votes (avg)",
            (
                "strategy.name=lioncub",
                "strategy.local_steps={H}",
                "strategy.outer_lr={LR}",
                "strategy.reduction=avg",
            ),
        ),
        Variant(
            "lioncub-l1",
            "Lion-Cub p-bit L1-scaled levels",
            ("strategy.name=lioncub-l1", "strategy.local_steps={H}", "strategy.outer_lr={LR}"),
        ),
        Variant(
            "distributed-lion",
            "lioncub with local_steps=0: 1-bit signs of the gradient every step",
            ("strategy.name=lioncub", "strategy.local_steps=0", "strategy.outer_lr=1e-3"),
            local_steps=False,
        ),
        Variant(
            "diloco",
            "DiLoCo: fp16 pseudo-gradients, outer Nesterov SGD",
            (
                "strategy.name=diloco",
                "strategy.local_steps={H}",
                "strategy.outer_lr=0.7",
                "strategy.delta_codec=fp16",
            ),
        ),
        Variant(
            "diloco-adamw",
            "DiLoCo as published: AdamW inner steps (lr 1e-3), fp16 pseudo-gradients, outer Nesterov",
            (
                "strategy.name=diloco",
                "strategy.local_steps={H}",
                "strategy.outer_lr=0.7",
                "strategy.delta_codec=fp16",
                "inner.optimizer=adamw",
                "inner.lr=1e-3",
            ),
        ),
        Variant(
            "hivemind",
            "hivemind.Optimizer, stock settings, fp16 gradient compression (external anchor)",
            local_steps=False,
            runner="hivemind",
        ),
    )
}


@dataclass(frozen=True)
class BenchConfig:
    """What every strategy of one bench run shares."""

    profile: Profile
    peers: int
    task: str
    seed: int
    batch_size: int
    local_steps: int
    max_rounds: int | None
    budget_s: float
    target_loss: float
    stop_at_target: bool
    window: int
    out_dir: Path
    start_timeout: float = 120.0
    stop_grace_s: float = 45.0
    extra_sets: tuple[str, ...] = ()
    val_every: int = 0
    lioncub_outer_lr: float = float(STRATEGY_DEFAULTS["lioncub"]["outer_lr"])

    def checkpoint_every(self, variant: Variant) -> int:
        """Rounds between peer 0's checkpoints (equal samples for every strategy); 0 = none."""
        return self.val_every * (1 if variant.local_steps else self.local_steps)


@dataclass
class StrategyRun:
    """Everything observed while one strategy ran (bench clock: seconds since training began)."""

    variant: str
    points: list[RoundPoint] = field(default_factory=list)
    summaries: dict[int, dict[str, Any]] = field(default_factory=dict)
    started: dict[int, dict[str, Any]] = field(default_factory=dict)
    wire: dict[int, list[tuple[float, int, int]]] = field(default_factory=dict)
    exchange_s: dict[int, list[tuple[int, str, float]]] = field(default_factory=dict)
    compute_s: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    exit_codes: list[int | None] = field(default_factory=list)
    elapsed_s: float = 0.0
    setup_s: float = 0.0
    stopped_by: str = "finished"
    errors: list[str] = field(default_factory=list)
    load_before: list[float] = field(default_factory=list)
    load_after: list[float] = field(default_factory=list)
    snapshots: list[Path] = field(default_factory=list)
    t0_unix: float = 0.0
    code_version: str = ""


# ----------------------------------------------------------------------------------- processes
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not (k.startswith("LIONCUB_") and "__" in k)}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NO_COLOR="1", COLUMNS="240")
    return env


def _reader(idx: int, stream: IO[str], events: queue.Queue[Event]) -> None:
    for line in stream:
        line = line.strip()
        if line.startswith("{"):
            try:
                events.put((idx, time.monotonic(), json.loads(line)))
            except json.JSONDecodeError:
                continue
    events.put((idx, time.monotonic(), {"event": "eof"}))


def _wait_for_addr(path: Path, proc: subprocess.Popen[Any], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"the bootstrap DHT node exited with code {proc.returncode}")
        time.sleep(0.1)
    raise RuntimeError(f"the bootstrap DHT node reported no address within {timeout:.0f}s")


def _peer_argv(variant: Variant, cfg: BenchConfig, i: int, addr: str, host: str, up_mbit: float) -> list[str]:
    rounds = cfg.max_rounds
    every = cfg.checkpoint_every(variant)
    if variant.runner == "hivemind":
        argv = [sys.executable, str(_HIVEMIND_PEER), "--dht", addr, "--host", host, "--task", cfg.task]
        argv += ["--seed", str(cfg.seed), "--batch-size", str(cfg.batch_size), "--peers", str(cfg.peers)]
        argv += ["--data-shard", str(i), "--num-data-shards", str(cfg.peers), "--progress", "jsonl"]
        argv += ["--start-timeout", str(cfg.start_timeout), "--verbose"]
        if rounds is not None:
            argv += ["--max-steps", str(rounds * cfg.local_steps)]
        if i == 0 and cfg.val_every:
            argv += ["--snapshot-dir", str(_ckpt_dir(cfg, variant)), "--snapshot-every", str(every)]
        return argv
    argv = [sys.executable, "-m", "lioncub.peer.cli", "join", "--dht", addr, "--task", cfg.task]
    sets = [f"seed={cfg.seed}", f"inner.batch_size={cfg.batch_size}"]
    sets += [
        s.replace("{H}", str(cfg.local_steps)).replace("{LR}", repr(cfg.lioncub_outer_lr))
        for s in variant.sets
    ]
    sets += list(cfg.extra_sets)
    for item in sets:
        argv += ["--set", item]
    if rounds is not None:
        argv += ["--max-rounds", str(rounds if variant.local_steps else rounds * cfg.local_steps)]
    argv += ["--min-peers", str(cfg.peers), "--start-timeout", str(cfg.start_timeout)]
    argv += ["--host", host, "--advertise-host", host, "--dht-host", host, "--bandwidth", str(up_mbit)]
    argv += ["--progress", "jsonl", "--summary", str(cfg.out_dir / variant.name / f"peer{i}.json")]
    argv += ["--data-shard", str(i), "--num-data-shards", str(cfg.peers), "--eval-every", "0"]
    if i == 0 and every:
        argv += ["--checkpoint-dir", str(_ckpt_dir(cfg, variant)), "--checkpoint-every", str(every)]
    return argv


def _code_version() -> str:
    """``git describe``-like id of the checkout the peers import (``+dirty`` with local changes)."""

    def _git(*args: str) -> str:
        argv = ["git", "-C", str(_REPO), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        head = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def _ckpt_dir(cfg: BenchConfig, variant: Variant) -> Path:
    return cfg.out_dir / variant.name / "ckpt"


def _harvest(src: Path, dst: Path, run: StrategyRun) -> None:
    """Hard-link peer 0's new checkpoints into ``dst`` before its store prunes them."""
    if not src.is_dir():
        return
    have = {p.name for p in run.snapshots}
    for path in src.iterdir():
        if path.name in have or not (_CKPT.match(path.name) or _SNAP.match(path.name)):
            continue
        with contextlib.suppress(FileNotFoundError, FileExistsError):
            os.link(path, dst / path.name)
            run.snapshots.append(dst / path.name)


def run_strategy(variant: Variant, cfg: BenchConfig, log: IO[str]) -> StrategyRun:
    """Run one strategy in a fresh namespace swarm; always tears the swarm down."""
    run = StrategyRun(
        variant.name, load_before=[round(x, 2) for x in os.getloadavg()], code_version=_code_version()
    )
    out = cfg.out_dir / variant.name
    for stale in (out / "ckpt", out / "val"):
        shutil.rmtree(stale, ignore_errors=True)
    (out / "val").mkdir(parents=True)
    env = _env()
    launched = time.monotonic()
    files: list[IO[str]] = []
    with NetemSwarm(cfg.profile, cfg.peers) as net:
        try:
            _drive(net, variant, cfg, run, out, env, files, launched, log)
        finally:
            for f in files:
                f.close()
    run.load_after = [round(x, 2) for x in os.getloadavg()]
    for i in range(cfg.peers):
        run.exchange_s[i] = _logged_times(out / f"peer{i}.log")
    return run


def _drive(
    net: NetemSwarm,
    variant: Variant,
    cfg: BenchConfig,
    run: StrategyRun,
    out: Path,
    env: dict[str, str],
    files: list[IO[str]],
    launched: float,
    log: IO[str],
) -> None:
    addr_file = out / "bootstrap.addr"
    addr_file.unlink(missing_ok=True)
    boot_log = open(out / "bootstrap.log", "w")  # noqa: SIM115 - closed by the caller
    files.append(boot_log)
    dht_argv = [sys.executable, "-m", "lioncub.peer.cli", "dht", "--host", net.address(net.dht_ns)]
    dht_argv += ["--identity", str(out / "bootstrap.id"), "--addr-file", str(addr_file)]
    dht = net.run_in(net.dht_ns, dht_argv, stdout=boot_log, stderr=subprocess.STDOUT, text=True, env=env)
    addr = _wait_for_addr(addr_file, dht, 60.0)
    events: queue.Queue[Event] = queue.Queue()
    peers: list[subprocess.Popen[str]] = []
    for i in range(cfg.peers):
        ns = net.peer_ns(i)
        argv = _peer_argv(variant, cfg, i, addr, net.address(ns), net.link(ns).up_mbit)
        err = open(out / f"peer{i}.log", "w")  # noqa: SIM115 - closed by the caller
        files.append(err)
        proc = net.run_in(ns, argv, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1, env=env)
        assert proc.stdout is not None
        threading.Thread(target=_reader, args=(i, proc.stdout, events), daemon=True).start()
        peers.append(proc)
    raw: list[Event] = []
    done: set[int] = set()
    t0: float | None = None  # bench clock when the first peer began training
    # hivemind's stock averaging_timeout is 60 s: a peer may sit in one last all-reduce that long.
    grace = cfg.stop_grace_s + (60.0 if variant.runner == "hivemind" else 0.0)
    hard_deadline = launched + cfg.start_timeout + cfg.budget_s + grace + 60.0
    stop_at: float | None = None
    next_wire = next_check = next_harvest = time.monotonic()
    ckpt_src, ckpt_dst = _ckpt_dir(cfg, variant), out / "val"
    all_finished: float | None = None
    while len(done) < cfg.peers and time.monotonic() < hard_deadline:
        now = time.monotonic()
        if all_finished is None and len(run.summaries) == cfg.peers:
            all_finished = now  # every summary is in: give the processes a moment to exit, no more
            hard_deadline = min(hard_deadline, now + 5.0)
        if now >= next_wire:
            next_wire = now + 2.0
            _sample_wire(net, run, cfg.peers, now)
        if now >= next_harvest:
            next_harvest = now + 0.5
            _harvest(ckpt_src, ckpt_dst, run)
        try:
            idx, at, ev = events.get(timeout=0.5)
        except queue.Empty:
            idx, at, ev = -1, now, {}
        kind = ev.get("event")
        if kind == "started":
            run.started[idx] = ev
        elif kind == "round":
            raw.append((idx, at, ev))
            began = at - float(ev.get("wall_s", 0.0))
            t0 = began if t0 is None else min(t0, began)
        elif kind == "finished":
            run.summaries[idx] = ev
        elif kind == "eof":
            done.add(idx)
        if stop_at is None and t0 is not None:
            if time.monotonic() - t0 >= cfg.budget_s:
                run.stopped_by = "budget"
            elif cfg.stop_at_target and time.monotonic() >= next_check:
                next_check = time.monotonic() + 1.0
                curve = swarm_curve(_points(raw, t0), cfg.peers, cfg.window)
                if time_to_target(curve, cfg.target_loss) is not None:
                    run.stopped_by = "target"
            if run.stopped_by != "finished":
                stop_at = time.monotonic()
                log.write(f"  [{variant.name}] stopping ({run.stopped_by}) at t={stop_at - t0:.1f}s\n")
                log.flush()
                for p in peers:
                    if p.poll() is None:
                        p.send_signal(signal.SIGINT)
                hard_deadline = min(hard_deadline, stop_at + grace)
    if len(run.summaries) < cfg.peers:
        run.stopped_by = "timeout" if stop_at is None else run.stopped_by
        run.errors.append(f"{cfg.peers - len(run.summaries)} peer(s) reported no summary in time; killed")
    _sample_wire(net, run, cfg.peers, time.monotonic())
    _harvest(ckpt_src, ckpt_dst, run)
    for p in peers:
        try:
            run.exit_codes.append(p.wait(timeout=1.0))
        except subprocess.TimeoutExpired:
            run.exit_codes.append(None)
    dht.send_signal(signal.SIGINT)
    base = t0 if t0 is not None else launched
    run.setup_s = base - launched
    run.t0_unix = base + (time.time() - time.monotonic())
    run.points = _points(raw, base)
    run.elapsed_s = max((p.t for p in run.points), default=0.0)
    run.wire = {i: [(t - base, tx, rx) for t, tx, rx in s] for i, s in run.wire.items()}
    for idx, at, ev in raw:
        wall = float(ev.get("wall_s", 0.0))
        util = float(ev.get("compute_utilization", 0.0))
        run.compute_s.setdefault(idx, []).append((at - base, util * wall))


def _sample_wire(net: NetemSwarm, run: StrategyRun, peers: int, now: float) -> None:
    for i in range(peers):
        try:
            c = net.counters(net.peer_ns(i))
        except NetemError:
            continue
        run.wire.setdefault(i, []).append((now, c.tx_bytes, c.rx_bytes))


def _points(raw: list[Event], t0: float) -> list[RoundPoint]:
    return [
        RoundPoint(
            peer=idx,
            t=at - t0,
            samples=int(ev.get("samples", 0)),
            loss=float(ev["loss"]),
            bytes_sent=int(ev.get("bytes_sent", 0)),
            bytes_received=int(ev.get("bytes_received", 0)),
        )
        for idx, at, ev in raw
        if ev.get("loss") is not None
    ]


def _logged_times(path: Path) -> list[tuple[int, str, float]]:
    """``(round, kind, seconds)`` of every exchange (``update``/``momentum``/``params``) and group
    formation (``matchmaking``) a peer logged."""
    if not path.exists():
        return []
    out: list[tuple[int, str, float]] = []
    with path.open(errors="replace") as f:
        for line in f:
            m = _EXCHANGE_LINE.search(line)
            if m:
                out.append((int(m.group(1)), m.group(2), float(m.group(3))))
            elif m := _MATCH_LINE.search(line):
                out.append((int(m.group(1)), "matchmaking", float(m.group(2))))
    return out
