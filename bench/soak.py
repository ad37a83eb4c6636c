"""Churn soak: real peers join and leave at random (seeded) for 50+ rounds; compare with no churn.

    python bench/soak.py --json bench/out/soak.json            # defaults: tiny, 4 peers, 60 rounds
    python bench/soak.py --task shakespeare-char --rounds 80 --budget-s 900 --json bench/out/soak-sc.json

Two runs of the same task, seed and settings, one after the other, each with its own bootstrap
DHT node (``lioncub-peer dht``) and ``--peers`` real ``lioncub-peer join`` processes on 127.0.0.1:

* ``clean``: the peers train ``--rounds`` rounds together; nobody leaves.
Every peer computes at ``--pace`` of its speed (the test-only ``slow`` fault of
:mod:`lioncub.peer.faults`): ``tiny`` rounds take ~0.05 s of compute, a peer ~10-25 s to start on a
loaded 2-core machine, and a soak where joiners arrive after the run ended measures nothing. At the
default pace a round lasts ~1.5-2 s, as with a real model a round lasts far longer than a start.

* ``churn``: the same start, then at random rounds (a schedule drawn from ``--seed`` before the run,
  about one event every ``--churn-every`` rounds between round 4 and ``--rounds - 15``) a peer
  **crashes** (SIGKILL of the peer, its DHT process and ``p2pd``: a machine that dies mid-round),
  **leaves** (SIGTERM: graceful), **joins** (a new peer, fresh identity, taking the run config and
  state from the swarm), or joins as a **flaky** peer whose link is later cut for a few seconds
  (``--fault partition@...``, see :mod:`lioncub.peer.faults`). The live count stays within
  ``[--min-live, --max-live]`` (an event that would leave it outside turns into its opposite; only
  peers past their start count towards the minimum).

Every peer stops by itself at round ``--rounds`` (``--max-rounds``); a run also ends after
``--budget-s`` seconds (the rest are asked to stop). The bench reads every peer's jsonl events and
reports, per run: rounds completed (the swarm's last round, and the sum over peers), crashed
survivors (peers nobody stopped that did not exit 0 with a summary: target 0), rounds lost (a peer's
rounds whose update lacked part of its group: applied alone, or a shard fallen back to the local
vote; and rounds skipped by downloading the state), the final validation loss of the peers that
finished (mean, min, max) and the churn run's loss relative to the clean one. Writes a JSON document
(``--json``) and a PNG: training loss against round for both runs with the churn events marked,
and the live peer count of the churn run.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

if __package__ in (None, ""):  # run as a script: make `bench.*` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from bench.swarm import _machine
from bench.swarm_run import _env, _wait_for_addr

__all__ = ["ChurnEvent", "SoakConfig", "main", "run_soak", "schedule"]

_REPO = Path(__file__).resolve().parents[1]
_PEER_CLI = [sys.executable, "-m", "lioncub.peer.cli"]  # lioncub-peer, as bench/swarm_run.py runs it
_START_TIMEOUT_S = 180.0
_EXIT_TIMEOUT_S = 60.0
#: Quick failures: a dead peer costs a round a few seconds at most.
_FAST = ("rounds.matchmaking_timeout=3", "rounds.exchange_timeout=5")
_ACTIONS = ("crash", "leave", "join", "flaky")

Event = dict[str, Any]


def _timed(seconds: float) -> tuple[str, ...]:
    """Run settings for rounds of ``seconds`` of local steps (none for 0)."""
    return (f"rounds.max_seconds={seconds:g}", "strategy.local_steps=100000") if seconds > 0 else ()


@dataclass(frozen=True)
class SoakConfig:
    """One soak: the run settings and the churn schedule's parameters."""

    task: str = "tiny"
    peers: int = 4
    rounds: int = 60
    budget_s: float = 420.0
    pace: float = 0.03
    round_seconds: float = 0.0
    churn_every: float = 4.0
    min_live: int = 2
    max_live: int = 6
    seed: int = 0
    settings: tuple[str, ...] = _FAST

    def run_settings(self) -> tuple[str, ...]:
        """The run's ``--set`` items (for its first peer): those of ``round_seconds``, then ``settings``."""
        return (*_timed(self.round_seconds), *self.settings)


@dataclass(frozen=True)
class ChurnEvent:
    """At swarm round ``round`` (the highest round any peer reported), do ``action``."""

    round: int
    action: str


def schedule(cfg: SoakConfig) -> list[ChurnEvent]:
    """The churn events of a run, drawn from ``cfg.seed`` before it starts (so runs repeat)."""
    rng = random.Random(cfg.seed)
    events: list[ChurnEvent] = []
    r = 4
    while True:
        r += max(1, round(rng.expovariate(1.0 / cfg.churn_every)))
        if r > cfg.rounds - 15:  # a joiner needs ~10 rounds to start; leave it time to take part
            return events
        events.append(ChurnEvent(r, rng.choices(_ACTIONS, weights=(3, 2, 4, 1))[0]))


# ----------------------------------------------------------------------------------- processes
def _kill_tree(pid: int) -> None:
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    # Only the direct child is ours to reap; killed grandchildren go to init (no wait on zombies).
    psutil.wait_procs(procs[:1], timeout=10.0)


@dataclass
class _Peer:
    """One ``lioncub-peer join`` process; its jsonl events go to the run's queue."""

    name: str
    popen: subprocess.Popen[str]
    summary_path: Path
    started_at: float
    events: list[Event] = field(default_factory=list)
    stopped: str | None = None  # "crash" / "leave" / "end": why the bench stopped it
    exit_code: int | None = None
    faults: tuple[str, ...] = ()

    def rounds(self) -> list[Event]:
        return [e for e in self.events if e["event"] == "round"]


class _Run:
    """Processes of one soak run in ``workdir``: a bootstrap node and the peers."""

    def __init__(self, label: str, cfg: SoakConfig, workdir: Path) -> None:
        self.label, self.cfg, self.workdir = label, cfg, workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.queue: queue.Queue[tuple[str, float, Event]] = queue.Queue()
        self.peers: dict[str, _Peer] = {}
        self.bootstrap: subprocess.Popen[str] | None = None
        self.addr = ""
        self.t0 = time.monotonic()
        self._files: list[IO[str]] = []

    def start_bootstrap(self) -> None:
        addr_file = self.workdir / "bootstrap.addr"
        addr_file.unlink(missing_ok=True)  # a reused work dir: never read the last run's address
        argv = [*_PEER_CLI, "dht", "--host", "127.0.0.1", "--identity", str(self.workdir / "bootstrap.id")]
        log = open(self.workdir / "bootstrap.log", "w")  # noqa: SIM115 - closed in close()
        self._files.append(log)
        self.bootstrap = subprocess.Popen(
            [*argv, "--addr-file", str(addr_file)], stdout=log, stderr=log, env=_env(), text=True
        )
        try:
            self.addr = _wait_for_addr(addr_file, self.bootstrap, _START_TIMEOUT_S)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; see {self.workdir / 'bootstrap.log'}") from None

    def start_peer(
        self, index: int, *, first: bool, min_peers: int = 1, faults: tuple[str, ...] = ()
    ) -> _Peer:
        cfg, name = self.cfg, f"p{index}"
        summary = self.workdir / f"{name}.json"
        argv = [*_PEER_CLI, "join", "--dht", self.addr, "--max-rounds", str(cfg.rounds)]
        argv += ["--data-shard", str(index), "--summary", str(summary), "--progress", "jsonl"]
        argv += ["--min-peers", str(min_peers), "--start-timeout", str(int(_START_TIMEOUT_S))]
        if first:
            argv += ["--task", cfg.task, "--run-id", f"soak-{self.label}", "--set", f"seed={cfg.seed}"]
            for item in cfg.run_settings():
                argv += ["--set", item]
        if cfg.pace < 1:
            faults = (f"slow@factor={cfg.pace:g}", *faults)
        for spec in faults:
            argv += ["--fault", spec]
        err = open(self.workdir / f"{name}.stderr", "w")  # noqa: SIM115 - closed in close()
        self._files.append(err)
        popen = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=_env(),
            text=True,
            bufsize=1,
        )
        peer = _Peer(name, popen, summary, time.monotonic() - self.t0, faults=faults)
        self.peers[name] = peer
        threading.Thread(target=self._read, args=(peer,), daemon=True, name=f"read-{name}").start()
        return peer

    def _read(self, peer: _Peer) -> None:
        assert peer.popen.stdout is not None
        with open(self.workdir / f"{peer.name}.stdout", "w") as log:
            for line in peer.popen.stdout:
                log.write(line)
                if line.startswith("{"):
                    with contextlib.suppress(json.JSONDecodeError):
                        self.queue.put((peer.name, time.monotonic() - self.t0, json.loads(line)))
        self.queue.put((peer.name, time.monotonic() - self.t0, {"event": "eof"}))

    def wait_started(self, name: str) -> None:
        """Block until peer ``name`` reported ``started`` (the run exists in the DHT), others queued."""
        deadline, held = time.monotonic() + _START_TIMEOUT_S, []
        try:
            while time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    item = self.queue.get(timeout=0.5)
                    held.append(item)
                    if item[0] == name and item[2].get("event") == "started":
                        return
                    if item[0] == name and item[2].get("event") == "eof":
                        break
            raise RuntimeError(f"{name} did not start; see {self.workdir / name}.stdout / .stderr")
        finally:
            for item in held:
                self.queue.put(item)

    def live(self) -> list[_Peer]:
        """Peers running that the bench has not stopped (those still starting included)."""
        return [p for p in self.peers.values() if p.popen.poll() is None and p.stopped is None]

    def up(self) -> list[_Peer]:
        """Live peers that are past their start (they reported a round): they hold the swarm's state."""
        return [p for p in self.live() if p.rounds()]

    def close(self) -> None:
        """Stop what still runs (SIGTERM, then SIGKILL of the whole tree), reap, close the logs."""
        for p in self.peers.values():
            if p.popen.poll() is None:
                p.stopped = p.stopped or "end"
                p.popen.send_signal(signal.SIGTERM)
        for p in self.peers.values():
            try:
                p.popen.wait(_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _kill_tree(p.popen.pid)
                p.popen.wait(10)
            p.exit_code = p.popen.returncode
        if self.bootstrap is not None:
            _kill_tree(self.bootstrap.pid)
            self.bootstrap.wait(10)
        for f in self._files:
            f.close()


def run_soak(label: str, cfg: SoakConfig, churn: list[ChurnEvent], workdir: Path) -> dict[str, Any]:
    """One run (``churn`` empty: the clean run); returns its results."""
    run = _Run(label, cfg, workdir)
    rng = random.Random(cfg.seed + 1)
    timeline: list[dict[str, Any]] = []
    pending = list(churn)
    swarm_round, next_index, out_of_time = 0, cfg.peers, False
    try:
        run.start_bootstrap()
        run.start_peer(0, first=True, min_peers=cfg.peers)
        run.wait_started("p0")  # the run must be in the DHT before the others look for it
        for i in range(1, cfg.peers):
            run.start_peer(i, first=False, min_peers=cfg.peers)
        deadline = time.monotonic() + cfg.budget_s
        while True:
            try:
                name, t, event = run.queue.get(timeout=0.5)
            except queue.Empty:
                name, t, event = "", 0.0, {}
            if event:
                event["_t"] = t
                run.peers[name].events.append(event)
                if event.get("event") == "round":
                    swarm_round = max(swarm_round, int(event["round"]))
            while pending and pending[0].round <= swarm_round:
                step = pending.pop(0)
                timeline.append(_churn(run, step, swarm_round, rng, next_index))
                next_index += timeline[-1]["action"] in ("join", "flaky")
            if all(p.popen.poll() is not None for p in run.peers.values()) and run.queue.empty():
                break
            if time.monotonic() > deadline:
                out_of_time = True
                break
    finally:
        run.close()
        while not run.queue.empty():
            name, t, event = run.queue.get()
            if event:
                event["_t"] = t
                run.peers[name].events.append(event)
    return _results(run, timeline, out_of_time, time.monotonic() - run.t0)


def _churn(run: _Run, step: ChurnEvent, at: int, rng: random.Random, index: int) -> dict[str, Any]:
    """Carry out one churn event (turned around when the live count would leave its bounds)."""
    cfg, up = run.cfg, sorted(run.up(), key=lambda p: p.name)
    action = step.action
    # Only peers past their start count towards the minimum: a swarm whose every trained peer
    # is gone has lost its state, whoever is still starting.
    if action in ("crash", "leave") and len(up) <= cfg.min_live:
        action = "join"
    elif action in ("join", "flaky") and len(run.live()) >= cfg.max_live:
        action = "crash"
    record: dict[str, Any] = {"round": at, "t": round(time.monotonic() - run.t0, 2), "action": action}
    if action in ("crash", "leave"):
        victim = rng.choice(up)
        victim.stopped = action
        if action == "crash":
            _kill_tree(victim.popen.pid)
        else:
            victim.popen.send_signal(signal.SIGTERM)
        record["peer"] = victim.name
    else:
        faults = (f"partition@round={at + 4}:seconds=6",) if action == "flaky" else ()
        record["peer"] = run.start_peer(index, first=False, faults=faults).name
    record["live_after"] = len(run.live())
    record["up_after"] = len(run.up())
    return record


# ----------------------------------------------------------------------------------- results
def _results(run: _Run, timeline: list[dict[str, Any]], out_of_time: bool, wall_s: float) -> dict[str, Any]:
    peers: dict[str, Any] = {}
    crashed: list[str] = []
    for p in run.peers.values():
        summary = json.loads(p.summary_path.read_text()) if p.summary_path.exists() else None
        rounds = p.rounds()
        numbers = [int(e["round"]) for e in rounds]
        skipped = sum(max(0, b - a - 1) for a, b in itertools.pairwise(numbers))
        alone = sum(1 for e in rounds if e["group_size"] <= 1)
        fallback = sum(1 for e in rounds if e["group_size"] > 1 and e["missing"])
        survivor = p.stopped in (None, "end")
        ok = p.exit_code == 0 and summary is not None
        if (survivor or p.stopped == "leave") and not ok:
            crashed.append(p.name)
        peers[p.name] = {
            "stopped": p.stopped,
            "faults": list(p.faults),
            "exit_code": p.exit_code,
            "joined_at_s": round(p.started_at, 2),
            "first_round": numbers[0] if numbers else None,
            "last_round": numbers[-1] if numbers else None,
            "rounds_completed": len(numbers),
            "rounds_alone": alone,
            "rounds_fallback": fallback,
            "rounds_skipped": skipped,
            "joined_from": summary["joined_from"] if summary else None,
            "forked": False,
            "final_loss": summary["final_loss"] if summary else None,
            "initial_loss": summary["initial_loss"] if summary else None,
        }
    for name, v in peers.items():
        # A joiner that found no live peer to download from started the run over from round 0.
        v["forked"] = int(name[1:]) >= run.cfg.peers and v["joined_from"] is None and v["first_round"] == 1
    finishers = [
        v
        for v in peers.values()
        if v["stopped"] in (None, "end") and v["last_round"] == run.cfg.rounds and not v["forked"]
    ]
    losses = [v["final_loss"] for v in finishers if v["final_loss"] is not None]
    return {
        "completed": bool(finishers) and not out_of_time,
        "out_of_time": out_of_time,
        "wall_s": round(wall_s, 1),
        "swarm_rounds": max((v["last_round"] or 0 for v in peers.values()), default=0),
        "rounds_completed_total": sum(v["rounds_completed"] for v in peers.values()),
        "crashed_survivors": crashed,
        "rounds_alone": sum(v["rounds_alone"] for v in peers.values()),
        "rounds_fallback": sum(v["rounds_fallback"] for v in peers.values()),
        "rounds_skipped": sum(v["rounds_skipped"] for v in peers.values()),
        "rounds_lost": sum(
            v["rounds_alone"] + v["rounds_fallback"] + v["rounds_skipped"] for v in peers.values()
        ),
        "finishers": len(finishers),
        "forked_joiners": [n for n, v in peers.items() if v["forked"]],
        "final_loss_mean": sum(losses) / len(losses) if losses else None,
        "final_loss_min": min(losses) if losses else None,
        "final_loss_max": max(losses) if losses else None,
        "churn": timeline,
        "peers": peers,
        "curve": _curve(run),
        "live_curve": _live_curve(run),
    }


def _curve(run: _Run) -> list[tuple[int, float]]:
    """Mean training loss over the peers that reported each round."""
    by_round: dict[int, list[float]] = {}
    for p in run.peers.values():
        for e in p.rounds():
            if e.get("loss") is not None:
                by_round.setdefault(int(e["round"]), []).append(float(e["loss"]))
    return [(r, sum(v) / len(v)) for r, v in sorted(by_round.items())]


def _live_curve(run: _Run) -> list[tuple[int, int]]:
    """How many peers reported each round."""
    count: dict[int, int] = {}
    for p in run.peers.values():
        for r in {int(e["round"]) for e in p.rounds()}:
            count[r] = count.get(r, 0) + 1
    return sorted(count.items())


def _plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = doc["runs"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True, height_ratios=(3, 1))
    for label, style in (("clean", "-"), ("churn", "-")):
        xs, ys = zip(*runs[label]["curve"], strict=True) if runs[label]["curve"] else ((), ())
        ax.plot(
            xs,
            ys,
            style,
            label=f"{label} (final val loss {runs[label]['final_loss_mean'] or float('nan'):.4f})",
        )
    colors = {"crash": "red", "leave": "orange", "join": "green", "flaky": "purple"}
    for ev in runs["churn"]["churn"]:
        ax.axvline(ev["round"], color=colors[ev["action"]], alpha=0.35, lw=1)
        ax2.axvline(ev["round"], color=colors[ev["action"]], alpha=0.35, lw=1)
    for action, color in colors.items():
        ax.plot([], [], color=color, alpha=0.6, label=action)
    ax.set_ylabel("training loss (mean over peers)")
    ax.set_title(
        f"churn soak: {doc['config']['task']}, {doc['config']['peers']} peers, seed {doc['config']['seed']}"
    )
    ax.legend(fontsize=8)
    xs2, ys2 = zip(*runs["churn"]["live_curve"], strict=True) if runs["churn"]["live_curve"] else ((), ())
    ax2.step(xs2, ys2, where="post", color="black")
    ax2.set_ylabel("peers reporting")
    ax2.set_xlabel("round")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SoakConfig()
    p.add_argument("--task", choices=("tiny", "shakespeare-char"), default=d.task)
    p.add_argument("--peers", type=int, default=d.peers, help="peers at the start")
    p.add_argument("--rounds", type=int, default=d.rounds, help="rounds of the run (>= 20)")
    p.add_argument("--budget-s", type=float, default=d.budget_s, help="seconds per run at most")
    p.add_argument(
        "--pace",
        type=float,
        default=d.pace,
        help="every peer computes at this fraction of its speed (the test-only slow fault), so that a "
        "round lasts about as long as a peer takes to start, as with real models (1 = full speed)",
    )
    p.add_argument(
        "--round-seconds",
        type=float,
        default=d.round_seconds,
        help="time-bounded rounds of this many seconds (rounds.max_seconds; 0 = the run's local steps); "
        "slow enough rounds let a joiner start within a few rounds",
    )
    p.add_argument(
        "--churn-every", type=float, default=d.churn_every, help="mean rounds between churn events"
    )
    p.add_argument("--min-live", type=int, default=d.min_live)
    p.add_argument("--max-live", type=int, default=d.max_live)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra run setting")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --json)")
    p.add_argument("--out", type=Path, default=None, help="logs and summaries (default bench/out/soak)")
    return p


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so that every run's processes are reaped


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if args.rounds < 20 or not 2 <= args.min_live <= args.peers <= args.max_live <= 16:
        print(
            "error: need --rounds >= 20 and 2 <= --min-live <= --peers <= --max-live <= 16", file=sys.stderr
        )
        return 2
    cfg = SoakConfig(
        task=args.task,
        peers=args.peers,
        rounds=args.rounds,
        budget_s=args.budget_s,
        pace=args.pace,
        round_seconds=args.round_seconds,
        churn_every=args.churn_every,
        min_live=args.min_live,
        max_live=args.max_live,
        seed=args.seed,
        settings=(*_FAST, *args.set),
    )
    out = args.out or _REPO / "bench" / "out" / "soak"
    json_path = args.json or out / "soak.json"
    plot_path = args.plot or json_path.with_suffix(".png")
    began = time.monotonic()
    churn = schedule(cfg)
    runs = {
        "clean": run_soak("clean", cfg, [], out / "clean"),
        "churn": run_soak("churn", cfg, churn, out / "churn"),
    }
    clean, churned = runs["clean"]["final_loss_mean"], runs["churn"]["final_loss_mean"]
    doc = {
        "bench": "soak",
        "config": {**cfg.__dict__, "settings": list(cfg.run_settings())},
        "schedule": [e.__dict__ for e in churn],
        "final_loss_churn_over_clean": churned / clean if clean and churned else None,
        "machine": _machine(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "bench_s": round(time.monotonic() - began, 1),
        "plot": str(plot_path),
        "runs": runs,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2))
    _plot(doc, plot_path)
    keys = (
        "completed",
        "wall_s",
        "swarm_rounds",
        "rounds_completed_total",
        "crashed_survivors",
        "rounds_lost",
    )
    brief = {label: {k: r[k] for k in (*keys, "final_loss_mean")} for label, r in runs.items()}
    print(json.dumps({"final_loss_churn_over_clean": doc["final_loss_churn_over_clean"], **brief}, indent=2))
    ok = all(r["completed"] and not r["crashed_survivors"] for r in runs.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
