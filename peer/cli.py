"""``lioncub-peer``: the command line. Logging and console output are configured here only."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lioncub.optim.schedules import SyncSchedule
from lioncub.optim.strategies import STRATEGY_NAMES, StrategyConfig

from .cli_health import add_health_parser, cmd_health
from .cli_join import add_join_parser, cmd_join
from .cli_launch import add_swarm_parser, cmd_swarm
from .cli_swarm import add_dht_parser, add_status_parser, cmd_dht, cmd_status
from .logs import configure_logging
from .progress import RoundProgress
from .simulate import SimConfig, SimResult, simulate
from .tasks import TASK_NAMES, fetch_shakespeare

__all__ = ["build_parser", "main"]

log = logging.getLogger("lioncub.peer.cli")

#: Defaults that reached the convergence targets in bench/convergence.py (see bench/RESULTS.md).
#: Measured on shakespeare-char, 4 peers, 320 steps per peer: lioncub H=16 / η_out=8e-3 ends 0.96%
#: above data-parallel Lion's validation loss with 341x fewer bytes.
STRATEGY_DEFAULTS: dict[str, dict[str, Any]] = {
    "lioncub": {"local_steps": 16, "outer_lr": 8e-3},
    "lioncub-l1": {"local_steps": 16, "outer_lr": 8e-3, "levels": 2},
    "diloco": {"local_steps": 16, "outer_lr": 0.7, "outer_momentum": 0.9},
    "allreduce": {"local_steps": 0, "outer_lr": 1e-3},
}


class CliError(Exception):
    """A user error: printed without a traceback, exit code 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _add_sim_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--peers", type=_positive_int, default=4, help="virtual peers (default 4)")
    p.add_argument("--strategy", choices=STRATEGY_NAMES, default="lioncub")
    p.add_argument("--task", choices=TASK_NAMES, default="tiny")
    p.add_argument("--rounds", type=_positive_int, default=20, help="sync rounds (allreduce: steps)")
    p.add_argument("--local-steps", type=_nonneg_int, default=None, help="inner steps per round (H)")
    p.add_argument("--outer-lr", type=_positive_float, default=None)
    p.add_argument("--inner-lr", type=_positive_float, default=None)
    p.add_argument("--inner", choices=("lion", "adamw"), default="lion")
    p.add_argument("--reduction", choices=("mavo", "avg"), default="mavo", help="lioncub vote reduction")
    p.add_argument("--levels", type=_positive_int, default=2, help="lioncub-l1 positive levels s")
    p.add_argument("--delta-codec", choices=("fp16", "int8"), default="fp16", help="diloco codec")
    p.add_argument("--weight-decay", type=float, default=0.0, help="outer decoupled weight decay")
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--group-size", type=_nonneg_int, default=0, help="gossip group size; 0 = everyone")
    p.add_argument("--momentum-sync-every", type=_nonneg_int, default=0)
    p.add_argument("--momentum-sync-geometric", type=float, default=0.0, metavar="K")
    p.add_argument("--average-every", type=_nonneg_int, default=0)
    p.add_argument("--eval-every", type=_positive_int, default=5)
    p.add_argument("--eval-batches", type=_positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the run as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


_TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "tiny": {"inner_lr": 1e-3, "batch_size": 32},
    "shakespeare-char": {"inner_lr": 1e-3, "batch_size": 16},
}


def sim_config_from_args(args: argparse.Namespace) -> SimConfig:
    """Build a validated :class:`SimConfig` from parsed flags (raises CliError on bad values)."""
    base = dict(STRATEGY_DEFAULTS[args.strategy])
    if args.local_steps is not None:
        base["local_steps"] = args.local_steps
    if args.outer_lr is not None:
        base["outer_lr"] = args.outer_lr
    task_defaults = _TASK_DEFAULTS.get(args.task, {"inner_lr": 1e-3, "batch_size": 32})
    try:
        strategy = StrategyConfig(
            name=args.strategy,
            reduction=args.reduction,
            levels=args.levels,
            delta_codec=args.delta_codec,
            weight_decay=args.weight_decay,
            **base,
        )
        return SimConfig(
            peers=args.peers,
            rounds=args.rounds,
            task=args.task,
            strategy=strategy,
            inner=args.inner,
            inner_lr=args.inner_lr or task_defaults["inner_lr"],
            batch_size=args.batch_size or task_defaults["batch_size"],
            group_size=args.group_size,
            momentum_sync=SyncSchedule(
                every=args.momentum_sync_every, geometric_k=args.momentum_sync_geometric
            ),
            averaging=SyncSchedule(every=args.average_every),
            eval_every=args.eval_every,
            eval_batches=args.eval_batches,
            seed=args.seed,
        )
    except ValueError as exc:
        raise CliError(str(exc)) from exc


def _run_sim(cfg: SimConfig, console: Console, quiet: bool, label: str) -> SimResult:
    with RoundProgress(console, total=cfg.rounds, label=label, enabled=not quiet) as progress:
        return simulate(cfg, on_round=progress.update)


def results_table(results: Sequence[tuple[str, SimResult]]) -> Table:
    table = Table(title="lioncub simulation results")
    for col in ("strategy", "peers", "rounds", "samples", "val loss (start → end)", "MB sent/peer", "time s"):
        table.add_column(col, justify="right" if col != "strategy" else "left")
    for label, res in results:
        last = res.records[-1]
        table.add_row(
            label,
            str(res.config.peers),
            str(res.config.rounds),
            f"{last.samples:,}",
            f"{res.initial_val_loss:.3f} → {res.final_val_loss:.3f}",
            f"{last.bytes_sent_per_peer / 1e6:.3f}",
            f"{last.elapsed_s:.1f}",
        )
    return table


def cmd_simulate(args: argparse.Namespace, console: Console) -> int:
    cfg = sim_config_from_args(args)
    if cfg.task == "shakespeare-char":
        fetch_shakespeare()
    result = _run_sim(cfg, console, args.quiet, cfg.strategy.name)
    console.print(results_table([(cfg.strategy.name, result)]))
    if args.json is not None:
        _write_json(args.json, result.to_json())
        console.print(f"wrote {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace, console: Console) -> int:
    """The README's first command: lioncub vs the data-parallel baseline on Shakespeare."""
    console.print("[bold]lioncub demo[/]: 4 simulated peers train a char-level GPT on Shakespeare.")
    fetch_shakespeare()
    results: list[tuple[str, SimResult]] = []
    local = STRATEGY_DEFAULTS["lioncub"]["local_steps"]
    for name, rounds in (
        ("lioncub", args.rounds),
        ("diloco", args.rounds),
        ("allreduce", args.rounds * local),
    ):
        argv = ["simulate", "--task", "shakespeare-char", "--strategy", name, "--peers", "4"]
        argv += ["--rounds", str(rounds), "--eval-every", str(max(1, rounds // 5)), "--seed", str(args.seed)]
        ns = build_parser().parse_args(argv)
        cfg = sim_config_from_args(ns)
        results.append((name, _run_sim(cfg, console, args.quiet, name)))
    console.print(results_table(results))
    base = results[-1][1].records[-1].bytes_sent_per_peer
    ours = results[0][1].records[-1].bytes_sent_per_peer
    console.print(f"lioncub sent {base / max(ours, 1):.0f}x fewer bytes per peer than data-parallel Lion.")
    if args.json is not None:
        _write_json(args.json, {name: res.to_json() for name, res in results})
    return 0


def cmd_fetch_data(args: argparse.Namespace, console: Console) -> int:
    path = fetch_shakespeare(args.cache_dir)
    console.print(f"Shakespeare corpus ready: {path}")
    return 0


def _write_json(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lioncub-peer", description="Decentralized gossip training with packed 1-bit Lion updates."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="N virtual peers in one process (no network)")
    _add_sim_args(sim)
    demo = sub.add_parser("demo", help="the README demo: lioncub vs baselines on Shakespeare")
    demo.add_argument("--rounds", type=_positive_int, default=30)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", type=Path, default=None)
    demo.add_argument("--quiet", action="store_true")
    fetch = sub.add_parser("fetch-data", help="download and cache the Shakespeare corpus")
    fetch.add_argument("--cache-dir", type=Path, default=None)
    add_join_parser(sub)
    add_swarm_parser(sub)
    add_dht_parser(sub)
    add_status_parser(sub)
    add_health_parser(sub)
    return parser


_COMMANDS = {
    "simulate": cmd_simulate,
    "demo": cmd_demo,
    "fetch-data": cmd_fetch_data,
    "join": cmd_join,
    "swarm": cmd_swarm,
    "dht": cmd_dht,
    "status": cmd_status,
    "health": cmd_health,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    configure_logging(level, stream=sys.stderr)
    console = Console(stderr=False)
    try:
        return _COMMANDS[args.command](args, console)
    except CliError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
