"""``lioncub-peer swarm``: a bootstrap DHT node and N peer processes on 127.0.0.1, one live view.

Every peer is a real ``lioncub-peer join`` process reporting JSON events on stdout; this command
shows them as one table, then prints a final table and writes a summary JSON and a PNG of
validation/training loss vs time and vs bytes sent.
"""

from __future__ import annotations

import argparse
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from .tasks import TASK_NAMES

__all__ = ["add_swarm_parser", "cmd_swarm"]


def add_swarm_parser(sub: Any) -> None:
    p = sub.add_parser("swarm", help="run a local swarm: a bootstrap DHT node and N peer processes")
    p.add_argument("--peers", type=int, default=4, help="number of peer processes (default 4)")
    p.add_argument("--task", choices=TASK_NAMES, default="tiny")
    p.add_argument("--max-rounds", type=int, default=30)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="run setting for every peer"
    )
    p.add_argument(
        "--client-mode", type=int, default=0, metavar="K", help="run the last K peers in client mode"
    )
    p.add_argument("--out", type=Path, default=Path("swarm-out"), help="directory for logs, summaries, plot")
    p.add_argument(
        "--summary", type=Path, default=None, help="combined summary JSON (default OUT/summary.json)"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")


def _reader(idx: int, stream: IO[str], events: queue.Queue[tuple[int, dict[str, Any]]]) -> None:
    for line in stream:
        line = line.strip()
        if line.startswith("{"):
            try:
                events.put((idx, json.loads(line)))
            except json.JSONDecodeError:
                continue
    events.put((idx, {"event": "eof"}))


def _wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise RuntimeError(f"the bootstrap DHT node exited with code {proc.returncode}; see its log")
        time.sleep(0.1)
    raise RuntimeError(f"the bootstrap DHT node did not report its address within {timeout:.0f}s")


def _table(rows: dict[int, dict[str, Any]], total_rounds: int) -> Table:
    table = Table(title=f"lioncub swarm — {len(rows)} peers, {total_rounds} rounds")
    for col in ("peer", "id", "round", "loss", "group", "kB/s up", "MB sent", "util", "state"):
        table.add_column(col, justify="right")
    for idx in sorted(rows):
        r = rows[idx]
        rate = r.get("bytes_sent", 0) / max(r.get("wall_s", 0.0), 1e-9) / 1e3
        loss = r.get("loss")
        table.add_row(
            str(idx),
            r.get("peer_id", "?")[:8],
            str(r.get("round", "-")),
            "-" if loss is None else f"{loss:.4f}",
            str(r.get("group_size", "-")),
            f"{rate:.1f}",
            f"{r.get('bytes_sent', 0) / 1e6:.2f}",
            f"{r.get('compute_utilization', 0.0):.0%}",
            r.get("state", "starting"),
        )
    return table


def _plot(history: dict[int, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for idx, events in sorted(history.items()):
        pts = [e for e in events if e.get("loss") is not None]
        if not pts:
            continue
        ax_t.plot([e["wall_s"] for e in pts], [e["loss"] for e in pts], label=f"peer {idx}", lw=1)
        ax_b.plot([max(1, e["bytes_sent"]) for e in pts], [e["loss"] for e in pts], label=f"peer {idx}", lw=1)
    ax_t.set(xlabel="wall time (s)", ylabel="training loss", title="loss vs time")
    ax_b.set(xlabel="bytes sent by the peer", ylabel="training loss", title="loss vs bytes", xscale="log")
    for ax in (ax_t, ax_b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stop_all(procs: list[subprocess.Popen[str]], grace: float = 10.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cmd_swarm(args: argparse.Namespace, console: Console) -> int:
    if not 1 <= args.peers <= 64:
        console.print(f"[red]error:[/] --peers must be in [1, 64], got {args.peers}")
        return 2
    if not 0 <= args.client_mode < args.peers:
        console.print("[red]error:[/] --client-mode K must leave at least one reachable peer")
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "lioncub.peer.cli"]
    addr_file = out / "bootstrap.addr"
    addr_file.unlink(missing_ok=True)
    logs: list[IO[str]] = []
    procs: list[subprocess.Popen[str]] = []
    try:
        boot_log = open(out / "bootstrap.log", "w")  # noqa: SIM115 - closed in finally
        logs.append(boot_log)
        boot = subprocess.Popen(
            [
                *exe,
                "dht",
                "--host",
                "127.0.0.1",
                "--identity",
                str(out / "bootstrap.id"),
                "--addr-file",
                str(addr_file),
            ],
            stdout=boot_log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        procs.append(boot)
        addr = _wait_for_file(addr_file, boot, 60.0)
        console.print(f"bootstrap DHT node at [bold]{addr}[/]")
        events: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        peers: list[subprocess.Popen[str]] = []
        for i in range(args.peers):
            cmd = [
                *exe,
                "join",
                "--dht",
                addr,
                "--task",
                args.task,
                "--max-rounds",
                str(args.max_rounds),
                "--min-peers",
                str(args.peers),
                "--progress",
                "jsonl",
                "--summary",
                str(out / f"peer{i}.json"),
                "--data-shard",
                str(i),
                "--num-data-shards",
                str(args.peers),
                "--eval-every",
                "0",
            ]
            for item in args.set:
                cmd += ["--set", item]
            if i >= args.peers - args.client_mode:
                cmd.append("--client-mode")
            err = open(out / f"peer{i}.log", "w")  # noqa: SIM115 - closed in finally
            logs.append(err)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
            assert proc.stdout is not None
            threading.Thread(target=_reader, args=(i, proc.stdout, events), daemon=True).start()
            peers.append(proc)
            procs.append(proc)
        rows: dict[int, dict[str, Any]] = {i: {} for i in range(args.peers)}
        history: dict[int, list[dict[str, Any]]] = {i: [] for i in range(args.peers)}
        summaries: dict[int, dict[str, Any]] = {}
        done: set[int] = set()
        deadline = time.monotonic() + args.timeout
        with Live(_table(rows, args.max_rounds), console=console, refresh_per_second=4) as live:
            while len(done) < args.peers:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the swarm did not finish within {args.timeout:.0f}s")
                try:
                    idx, ev = events.get(timeout=0.5)
                except queue.Empty:
                    continue
                kind = ev.get("event")
                if kind == "started":
                    rows[idx].update(peer_id=ev["peer_id"], round=ev["round"], state="running")
                elif kind == "round":
                    rows[idx].update(ev, state="running")
                    history[idx].append(ev)
                elif kind == "finished":
                    summaries[idx] = ev
                    rows[idx].update(state="done")
                elif kind == "eof":
                    done.add(idx)
                    if idx not in summaries:
                        rows[idx]["state"] = f"exit {peers[idx].wait()}"
                live.update(_table(rows, args.max_rounds))
        codes = [p.wait() for p in peers]
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping the swarm[/]")
        return 130
    except (RuntimeError, TimeoutError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    finally:
        _stop_all(procs)
        for f in logs:
            f.close()
    _plot(history, out / "swarm.png")
    final = Table(title="lioncub swarm results")
    for col in ("peer", "rounds", "val loss (start → end)", "MB sent", "MB recv", "groups", "alone", "util"):
        final.add_column(col, justify="right")
    for idx in sorted(summaries):
        s = summaries[idx]
        final.add_row(
            str(idx),
            str(s["rounds_completed"]),
            f"{s['initial_loss']:.3f} → {s['final_loss']:.3f}",
            f"{s['bytes_sent'] / 1e6:.2f}",
            f"{s['bytes_received'] / 1e6:.2f}",
            str(s["groups_formed"]),
            str(s["rounds_alone"]),
            f"{s['compute_utilization']:.0%}",
        )
    console.print(final)
    anchors = {s["anchor_sha256"] for s in summaries.values()}
    doc = {
        "peers": args.peers,
        "task": args.task,
        "max_rounds": args.max_rounds,
        "exit_codes": codes,
        "identical_anchors": len(anchors) == 1,
        "summaries": [summaries[i] for i in sorted(summaries)],
    }
    summary_path = args.summary or out / "summary.json"
    summary_path.write_text(json.dumps(doc, indent=2))
    console.print(
        f"anchors identical on all peers: {doc['identical_anchors']}; plot {out / 'swarm.png'}; summary {summary_path}"
    )
    return 0 if all(c == 0 for c in codes) and len(summaries) == args.peers else 1
