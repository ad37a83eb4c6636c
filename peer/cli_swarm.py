"""CLI commands that talk to a swarm: ``dht`` (bootstrap node) and ``status`` (the swarm as a table)."""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .dht import DHTError, PeerRecord, SwarmRegistry, list_runs, run_bootstrap, shutdown_dht, start_dht

__all__ = ["add_dht_parser", "add_status_parser", "cmd_dht", "cmd_status", "swarm_rows"]


def add_dht_parser(sub: Any) -> None:
    p = sub.add_parser("dht", help="run a bootstrap DHT node and print its multiaddr")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default 0 = any free port)")
    p.add_argument(
        "--identity", type=Path, default=Path("bootstrap.id"), help="identity file; created if missing"
    )
    p.add_argument("--addr-file", type=Path, default=None, help="also write the multiaddr to this file")
    p.add_argument("--initial-peers", nargs="*", default=[], metavar="MADDR", help="other bootstrap nodes")


def add_status_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="show the peers of a swarm as a table")
    p.add_argument("--dht", nargs="+", required=True, metavar="MADDR", help="multiaddr(s) of any DHT node")
    p.add_argument("--run-id", default=None, help="which run (default: every run found)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds to reach the DHT")


def cmd_dht(args: argparse.Namespace, console: Console) -> int:
    if not 0 <= args.port <= 65535:
        console.print(f"[red]error:[/] --port must be in 0..65535, got {args.port}")
        return 2
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)

    def on_ready(maddrs: list[str]) -> None:
        console.print("[bold]lioncub bootstrap DHT node is up.[/] Peers join with:")
        console.print(f"  lioncub-peer join --dht {maddrs[0]}", soft_wrap=True)
        # The full multiaddr on its own line, for scripts.
        print(maddrs[0], flush=True)
        for extra in maddrs[1:]:
            console.print(f"  also reachable at {extra}", soft_wrap=True)

    try:
        run_bootstrap(
            args.host,
            args.port,
            args.identity,
            args.addr_file,
            on_ready,
            stop=stop,
            initial_peers=args.initial_peers,
        )
    except DHTError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    return 0


def swarm_rows(records: list[PeerRecord], run_id: str, now: float) -> list[dict[str, Any]]:
    """The status table's rows as plain data (also the ``--json`` output)."""
    return [
        {
            "run_id": run_id,
            "peer_id": r.peer_id,
            "round": r.round,
            "loss": r.loss,
            "samples_per_s": r.throughput,
            "bytes_sent": r.bytes_sent,
            "bytes_received": r.bytes_received,
            "bytes_per_s": r.bytes_per_s,
            "endpoint": r.endpoint,
            "client_mode": r.client_mode,
            "version": r.version,
            "last_seen_s_ago": round(max(0.0, now - r.last_seen), 1),
        }
        for r in records
    ]


def cmd_status(args: argparse.Namespace, console: Console) -> int:
    try:
        dht = start_dht(args.dht, client_mode=True, startup_timeout=args.timeout)
    except DHTError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    try:
        runs = [args.run_id] if args.run_id else list_runs(dht)
        rows: list[dict[str, Any]] = []
        for run_id in runs:
            rows += swarm_rows(SwarmRegistry(dht, run_id).peers(), run_id, _dht_now())
    except DHTError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
    finally:
        shutdown_dht(dht)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        console.print("no live peers found" + (f" in run {args.run_id!r}" if args.run_id else ""))
        return 0
    table = Table(title=f"lioncub swarm: {len(rows)} live peer(s)")
    for col in (
        "run",
        "peer",
        "round",
        "loss",
        "samples/s",
        "MB sent",
        "MB recv",
        "endpoint",
        "client",
        "seen",
    ):
        table.add_column(col)
    for row in rows:
        loss = "-" if row["loss"] is None else f"{row['loss']:.3f}"
        table.add_row(
            row["run_id"],
            row["peer_id"][:12],
            str(row["round"]),
            loss,
            f"{row['samples_per_s']:.1f}",
            f"{row['bytes_per_s'] / 1e3:.1f}",
            f"{row['bytes_sent'] / 1e6:.2f}",
            f"{row['bytes_received'] / 1e6:.2f}",
            row["endpoint"] or "-",
            "yes" if row["client_mode"] else "no",
            f"{row['last_seen_s_ago']:.0f}s ago",
        )
    console.print(table)
    return 0


def _dht_now() -> float:
    try:
        from hivemind.utils import get_dht_time

        return float(get_dht_time())
    except ImportError:  # pragma: no cover - hivemind is a dependency
        return time.time()
