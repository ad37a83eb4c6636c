"""``lioncub-peer join``: run one peer of a swarm until ``--max-rounds`` or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console

from .adversary import ADVERSARY_MODES
from .config import ConfigError, RunConfig, load_run_config, to_dict
from .dht import visible_maddrs
from .faults import FaultError, parse_fault
from .logs import configure_logging, peer_logger
from .progress import PeerProgress
from .rounds import RoundReport
from .runtime import PeerRuntime, PeerSettings, RunSummary, SetupError
from .tasks import TASK_NAMES

__all__ = ["add_join_parser", "cmd_join", "run_config_from_args", "settings_from_args"]

log = logging.getLogger(__name__)


def add_join_parser(sub: Any) -> None:
    p = sub.add_parser("join", help="run a peer: join the run in the DHT (or start one with --task)")
    p.add_argument(
        "--dht", nargs="*", default=[], metavar="MADDR", help="multiaddr(s) of DHT nodes; none = new swarm"
    )
    p.add_argument("--run-id", default=None, help="run to join (default: the newest run in the DHT)")
    p.add_argument("--task", choices=TASK_NAMES, default=None, help="start a run of this task if none exists")
    p.add_argument(
        "--config", type=Path, default=None, help="TOML run config (its [run] table or the whole file)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run setting, e.g. strategy.outer_lr=3e-3",
    )
    p.add_argument("--max-rounds", type=int, default=None, help="stop after this many rounds of the run")
    p.add_argument("--summary", type=Path, default=None, help="write a JSON summary here at the end")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics (0 = any port)")
    p.add_argument(
        "--metrics-host", default="127.0.0.1", help="metrics listen address (0.0.0.0 in containers)"
    )
    p.add_argument(
        "--client-mode",
        action="store_true",
        help="behind NAT: accept no connections (detected by itself unless --no-reachability-check)",
    )
    p.add_argument(
        "--no-reachability-check",
        dest="reachability_check",
        action="store_false",
        help="do not ask other peers to dial this one back before going live (never switch to client mode)",
    )
    p.add_argument(
        "--resume", action="store_true", help="resume from the newest checkpoint in --checkpoint-dir"
    )
    p.add_argument("--checkpoint-dir", type=Path, default=None)
    p.add_argument("--checkpoint-every", type=int, default=10, help="rounds between checkpoints")
    p.add_argument("--identity", type=Path, default=None, help="Ed25519 key file (created if missing)")
    p.add_argument("--host", default="127.0.0.1", help="gRPC bind address")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0 = any free port)")
    p.add_argument("--advertise-host", default=None, help="address other peers dial (default: --host)")
    p.add_argument("--dht-host", default="127.0.0.1", help="DHT listen address")
    p.add_argument("--dht-port", type=int, default=0, help="DHT listen port (0 = any free port)")
    p.add_argument("--bandwidth", type=float, default=100.0, help="upload Mbit/s to report")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--data-shard", type=int, default=None, help="data shard index (default: from the peer id)"
    )
    p.add_argument("--num-data-shards", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--min-peers", type=int, default=1, help="wait for this many peers before round 0")
    p.add_argument("--start-timeout", type=float, default=120.0, help="longest wait for --min-peers (s)")
    p.add_argument("--swarm-key", type=Path, default=None, help="file with the swarm's shared secret")
    p.add_argument(
        "--progress",
        choices=("bar", "jsonl", "none"),
        default="bar",
        help="how to show progress (jsonl: one JSON event per line on stdout: started, round, stopping, "
        "fault, finished)",
    )
    p.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    p.add_argument("--check-config", action="store_true", help="validate flags and config, print them, exit")
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="TEST-ONLY resilience testing: hurt this peer on purpose, e.g. kill@round=3, "
        "partition@round=4:seconds=10, slow@factor=0.1, crash-in-checkpoint@round=6 "
        "(see lioncub.peer.faults); never in a real swarm",
    )
    p.add_argument(
        "--adversary",
        choices=ADVERSARY_MODES,
        default=None,
        metavar="MODE",
        help="TEST-ONLY resilience testing: make this peer Byzantine, corrupting what it sends "
        f"({', '.join(ADVERSARY_MODES)}; see lioncub.peer.adversary); never in a real swarm",
    )


def run_config_from_args(args: argparse.Namespace) -> RunConfig | None:
    """The local run config, or None when the peer should take whatever the DHT has."""
    overrides: dict[str, str] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key.strip()] = value.strip()
    if args.task:
        overrides["task.name"] = args.task
    if args.run_id:
        overrides["run_id"] = args.run_id
    if args.config is None and not overrides.keys() - {"run_id"}:
        return None
    return load_run_config(args.config, overrides=overrides)


def settings_from_args(args: argparse.Namespace) -> PeerSettings:
    for name, value, low, high in (
        ("--port", args.port, 0, 65535),
        ("--dht-port", args.dht_port, 0, 65535),
        ("--checkpoint-every", args.checkpoint_every, 1, 10**9),
        ("--num-data-shards", args.num_data_shards, 1, 1 << 20),
        ("--eval-every", args.eval_every, 0, 10**9),
    ):
        if not low <= value <= high:
            raise ConfigError(f"{name} must be in [{low}, {high}], got {value}")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ConfigError(f"--metrics-port must be in [0, 65535], got {args.metrics_port}")
    if args.max_rounds is not None and args.max_rounds < 0:
        raise ConfigError(f"--max-rounds must be >= 0, got {args.max_rounds}")
    if args.data_shard is not None and not 0 <= args.data_shard < args.num_data_shards:
        raise ConfigError(f"--data-shard must be in [0, {args.num_data_shards}), got {args.data_shard}")
    if args.resume and args.checkpoint_dir is None:
        raise ConfigError("--resume needs --checkpoint-dir")
    if not 1 <= args.min_peers <= 4096 or not 0 < args.start_timeout <= 86400:
        raise ConfigError("--min-peers must be in [1, 4096] and --start-timeout in (0, 86400]")
    if not args.bandwidth > 0:
        raise ConfigError(f"--bandwidth must be > 0, got {args.bandwidth}")
    for spec in args.fault:
        try:
            parse_fault(spec)
        except FaultError as exc:
            raise ConfigError(f"--fault: {exc}") from None
    swarm_key = None
    if args.swarm_key is not None:
        from lioncub.protocol import load_swarm_key

        swarm_key = load_swarm_key(args.swarm_key)
    return PeerSettings(
        initial_peers=tuple(args.dht),
        run_id=args.run_id,
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        dht_host=args.dht_host,
        dht_port=args.dht_port,
        client_mode=args.client_mode,
        reachability_check=args.reachability_check,
        identity_path=args.identity,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        bandwidth_mbps=args.bandwidth,
        device=args.device,
        data_shard=args.data_shard,
        num_data_shards=args.num_data_shards,
        eval_every=args.eval_every,
        swarm_key=swarm_key,
        min_peers=args.min_peers,
        start_timeout=args.start_timeout,
        faults=tuple(args.fault),
        adversary=args.adversary,
    )


def _hard_exit() -> None:
    """Second Ctrl-C: kill our children (the DHT and its p2pd) and leave at once."""
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()
    os._exit(130)


async def _run(
    args: argparse.Namespace, settings: PeerSettings, config: RunConfig | None, console: Console
) -> int:
    runtime = await PeerRuntime.create(settings, config)
    if args.progress == "jsonl":
        console = Console(stderr=True)  # stdout carries only JSON events
    if runtime.node.faults is not None:
        console.print(f"[bold red]FAULT INJECTION ON (test-only): {', '.join(settings.faults)}[/]")
        runtime.node.faults.on_event = lambda event: _emit(args, event)
    loop = asyncio.get_running_loop()
    hits = 0

    def on_signal() -> None:
        nonlocal hits
        hits += 1
        if hits > 1:
            _hard_exit()
        console.print("[yellow]stopping after this round (Ctrl-C again to quit at once)[/]")
        _emit(args, {"event": "stopping", "peer_id": runtime.peer_id, "round": runtime.node.state.round})
        runtime.stop_event.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        maddrs = visible_maddrs(runtime.dht) if not runtime.node.client_mode else []
        if runtime.node.client_mode and not settings.client_mode and args.progress != "jsonl":
            console.print("[yellow]no peer could dial this one back: taking part in client mode[/]")
        if maddrs and args.progress != "jsonl":
            console.print(
                f"peer {runtime.peer_id[:8]} in run [bold]{runtime.config.run_id}[/]; others join with:"
            )
            console.print(f"  lioncub-peer join --dht {maddrs[0]}", soft_wrap=True)
        if runtime.metrics_port is not None:
            console.print(f"metrics on http://127.0.0.1:{runtime.metrics_port}/metrics")
        _emit(
            args,
            {
                "event": "started",
                "peer_id": runtime.peer_id,
                "run_id": runtime.config.run_id,
                "maddrs": maddrs,
                "round": runtime.state.round,
                "endpoint": runtime.info.endpoint,
                "client_mode": runtime.node.client_mode,
            },
        )
        bar = PeerProgress(
            console,
            total=args.max_rounds,
            label=f"peer {runtime.peer_id[:8]}",
            enabled=args.progress == "bar",
        )
        plog = peer_logger("lioncub.peer", runtime.peer_id)
        plog.set_round(runtime.state.round)

        def on_round(rep: RoundReport, s: RunSummary) -> None:
            plog.set_round(runtime.state.round)
            _on_round(args, bar, rep, s, runtime)

        with bar, plog.bind():
            summary = await runtime.run(args.max_rounds, on_round=on_round)
    finally:
        await runtime.close()
    doc = summary.to_json()
    _emit(args, {"event": "finished", **doc})
    if args.summary is not None:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.summary.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(args.summary)
    if args.progress == "bar":
        console.print(_summary_line(summary))
    return 0


def _emit(args: argparse.Namespace, event: dict[str, Any]) -> None:
    if args.progress == "jsonl":
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()


def _on_round(
    args: argparse.Namespace, bar: PeerProgress, rep: RoundReport, s: RunSummary, rt: PeerRuntime
) -> None:
    if args.progress == "jsonl":
        _emit(
            args,
            {
                "event": "round",
                "peer_id": s.peer_id,
                "round": rt.state.round,
                "loss": rt._last_loss,
                "group_size": rep.group_size,
                "group": list(rep.group_members),
                "bytes_sent": s.bytes_sent,
                "bytes_received": s.bytes_received,
                "wall_s": s.wall_s,
                "samples": s.samples,
                "compute_utilization": s.compute_utilization,
                "missing": list(rep.missing_owners),
                "synced": rep.momentum_synced,
                "averaged": rep.averaged,
                "consensus_distance": rep.consensus_distance,
            },
        )
    elif args.progress == "bar":
        bar.update(
            round=rt.state.round,
            loss=rt._last_loss,
            group_size=rep.group_size,
            bytes_sent=s.bytes_sent,
            wall_s=s.wall_s,
        )


def _summary_line(s: RunSummary) -> str:
    return (
        f"done: {s.rounds_completed} rounds, val loss {s.initial_loss or float('nan'):.4f} -> "
        f"{s.final_loss or float('nan'):.4f}, sent {s.bytes_sent / 1e6:.2f} MB, received "
        f"{s.bytes_received / 1e6:.2f} MB, {len(s.peers_seen)} peers seen"
    )


def cmd_join(args: argparse.Namespace, console: Console) -> int:
    try:
        config = run_config_from_args(args)
        settings = settings_from_args(args)
    except (ConfigError, OSError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    if args.check_config:
        doc = {
            "run": to_dict(config) if config else None,
            "peer": {k: str(v) for k, v in settings.__dict__.items() if k != "swarm_key"},
        }
        print(json.dumps(doc, indent=2, default=str))
        return 0
    configure_logging(
        logging.INFO if args.progress != "none" else logging.WARNING, json=args.log_json, stream=sys.stderr
    )
    try:
        return asyncio.run(_run(args, settings, config, console))
    except SetupError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 1
