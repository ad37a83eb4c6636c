"""End-to-end swarm bench: real peers in network namespaces on shaped links, one strategy at a time.

    python bench/swarm.py --quick --json bench/out/swarm-quick.json
    python bench/swarm.py --profile uniform-100 --strategies allreduce lioncub diloco \\
        --peers 4 --target-loss 2.6 --budget-s 180 --json bench/out/swarm-uniform-100.json

For each strategy: a fresh :class:`~bench.netem.NetemSwarm` (one namespace per peer plus one for
the bootstrap DHT node, links shaped by ``--profile``), a ``lioncub-peer dht`` node, and one
``lioncub-peer join`` (or ``bench/hivemind_peer.py`` for the ``hivemind`` anchor) per peer, all on
the same task, seed and batch size, each on its own data shard. The bench reads their JSONL
events and records, per strategy: wall time and samples until the swarm's smoothed *training*
loss first reaches ``--target-loss`` (see ``bench/swarm_metrics.py``), payload bytes sent and
received per peer (and the bytes on the wire, from the veth counters), compute utilization, the
final *validation* loss, and speed-ups against ``allreduce`` and ``diloco`` from the same run.
Writes one JSON document and a PNG (loss vs wall time, vs bytes sent, vs samples).

Each strategy runs until ``--max-rounds`` (rounds of the strategies with local steps; those with
``local_steps=0`` get ``local_steps`` times as many, i.e. equal samples), or ``--budget-s`` seconds
of training, or (``--stop-at-target``) the target is reached, whichever comes first; then the peers
are asked to stop after their current round (SIGINT) and report their summaries.

Needs root and ``ip netns`` (exits 1 saying so otherwise; it never falls back to loopback).
``--quick``: ``allreduce``, ``lioncub`` and ``diloco`` on ``uniform-20`` with 4 peers, stopping
at the target, in under 5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `bench.*` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.netem import NetemError, unavailable_reason
from bench.profiles import PROFILES, get_profile
from bench.swarm_report import add_ratios, markdown_table, plot, summarize
from bench.swarm_run import VARIANTS, BenchConfig, run_strategy
from lioncub.peer.cli import STRATEGY_DEFAULTS

__all__ = ["main"]

_REPO = Path(__file__).resolve().parents[1]
_DEFAULTS = STRATEGY_DEFAULTS["lioncub"]  # the project's lioncub defaults (from its convergence sweep)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default=None, help="default uniform-100")
    p.add_argument("--strategies", nargs="+", choices=list(VARIANTS), default=None)
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--task", choices=("shakespeare-char", "tiny"), default="shakespeare-char")
    p.add_argument("--target-loss", type=float, default=None, help="smoothed training loss (default 2.6)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: next to --json)")
    p.add_argument(
        "--out", type=Path, default=None, help="logs and summaries (default bench/out/swarm-<profile>)"
    )
    p.add_argument("--quick", action="store_true", help="allreduce, lioncub, diloco; uniform-20; 4 peers")
    p.add_argument("--max-rounds", type=int, default=None, help="rounds of the local-step strategies")
    p.add_argument("--budget-s", type=float, default=None, help="training seconds per strategy")
    p.add_argument("--stop-at-target", action="store_true", help="stop a strategy once it reaches the target")
    p.add_argument(
        "--local-steps",
        type=int,
        default=None,
        help=f"local steps per round of lioncub* and diloco* (default: the project's, {_DEFAULTS['local_steps']})",
    )
    p.add_argument(
        "--lioncub-outer-lr",
        type=float,
        default=None,
        help=f"outer lr of lioncub, lioncub-avg, lioncub-l1 (default: the project's, {_DEFAULTS['outer_lr']})",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=None, help="smoothing window, samples (default 16 batches)")
    p.add_argument(
        "--val-every",
        type=int,
        default=None,
        help="peer 0 checkpoints every N rounds (x local steps for local_steps=0 strategies), evaluated "
        "on the validation split after each strategy (default 2; 0 = none; --quick: 0)",
    )
    p.add_argument(
        "--keep-checkpoints", action="store_true", help="keep peer 0's checkpoints after evaluation"
    )
    p.add_argument("--table", type=Path, default=None, help="print a results JSON as a Markdown table, exit")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra run setting")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.table is not None:  # reporting only: no namespaces, no root
        print(markdown_table(json.loads(args.table.read_text())), end="")
        return 0
    reason = unavailable_reason()
    if reason is not None:
        print(f"error: the swarm bench needs network namespaces with shaped links: {reason}", file=sys.stderr)
        return 1
    if args.quick:
        args.profile = args.profile or "uniform-20"
        args.strategies = args.strategies or ["allreduce", "lioncub", "diloco"]
        args.budget_s = args.budget_s if args.budget_s is not None else 40.0
        args.stop_at_target = True
        args.val_every = args.val_every if args.val_every is not None else 0
    profile = get_profile(args.profile or "uniform-100")
    strategies = args.strategies or list(VARIANTS)
    if not 2 <= args.peers <= 32:
        print("error: --peers must be in [2, 32]", file=sys.stderr)
        return 2
    out_dir = args.out or _REPO / "bench" / "out" / ("swarm-quick" if args.quick else f"swarm-{profile.name}")
    json_path = args.json or out_dir / "results.json"
    plot_path = args.plot or json_path.with_suffix(".png")
    cfg = BenchConfig(
        profile=profile,
        peers=args.peers,
        task=args.task,
        seed=args.seed,
        batch_size=args.batch_size,
        local_steps=args.local_steps if args.local_steps is not None else int(_DEFAULTS["local_steps"]),
        max_rounds=args.max_rounds,
        budget_s=args.budget_s if args.budget_s is not None else 180.0,
        target_loss=args.target_loss if args.target_loss is not None else 2.6,
        stop_at_target=args.stop_at_target,
        window=args.window or 16 * args.batch_size,
        out_dir=out_dir,
        extra_sets=tuple(args.set),
        val_every=args.val_every if args.val_every is not None else 2,
        lioncub_outer_lr=args.lioncub_outer_lr or float(_DEFAULTS["outer_lr"]),
    )
    if min(cfg.local_steps, cfg.batch_size) < 1 or cfg.budget_s <= 0 or cfg.val_every < 0:
        print(
            "error: --local-steps/--batch-size must be >= 1, --budget-s > 0, --val-every >= 0",
            file=sys.stderr,
        )
        return 2
    results: dict[str, dict[str, Any]] = {}
    doc: dict[str, Any] = {}
    began = time.monotonic()
    for name in strategies:
        sys.stderr.write(f"[swarm] {name} on {profile.name} with {cfg.peers} peers\n")
        try:
            run = run_strategy(VARIANTS[name], cfg, sys.stderr)
        except (NetemError, RuntimeError, OSError) as exc:
            print(f"error: {name}: {exc}", file=sys.stderr)
            return 1
        results[name] = summarize(run, cfg)
        if not args.keep_checkpoints:
            for sub in ("ckpt", "val"):
                shutil.rmtree(cfg.out_dir / name / sub, ignore_errors=True)
        r = results[name]
        sys.stderr.write(
            f"[swarm] {name}: target at {r['time_to_target_s']} s / {r['samples_to_target']} samples, "
            f"train {r['train_s']} s, util {r['compute_utilization']}, val {r['final_loss']}, "
            f"sent/peer {r['total_bytes_sent_per_peer']} B, stopped by {r['stopped_by']}\n"
        )
        doc = _document(cfg, results, argv, began, json_path, plot_path)  # after each strategy: partial
    plot(results, cfg.target_loss, f"{cfg.task}, {cfg.peers} peers, {profile.name}", plot_path)
    brief = {
        n: {k: v for k, v in r.items() if k not in ("curve", "val_curve", "per_peer")}
        for n, r in results.items()
    }
    print(json.dumps({**doc, "strategies": brief}, indent=2))
    return 0 if all(r["completed"] for r in results.values()) else 1


def _document(
    cfg: BenchConfig,
    results: dict[str, dict[str, Any]],
    argv: list[str] | None,
    began: float,
    json_path: Path,
    plot_path: Path,
) -> dict[str, Any]:
    """The results document (ratios recomputed), also written to ``json_path``."""
    add_ratios(results)
    profile = cfg.profile
    doc = {
        "bench": "swarm",
        "profile": {"name": profile.name, "description": profile.description},
        "peers": cfg.peers,
        "task": cfg.task,
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "local_steps": cfg.local_steps,
        "lioncub_outer_lr": cfg.lioncub_outer_lr,
        "max_rounds": cfg.max_rounds,
        "budget_s": cfg.budget_s,
        "target_loss": cfg.target_loss,
        "target_kind": f"training loss, sample-weighted over the swarm's last {cfg.window} samples "
        "(rounds of any peer)",
        "stop_at_target": cfg.stop_at_target,
        "val_every": cfg.val_every,
        "machine": _machine(),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "bench_s": round(time.monotonic() - began, 1),
        "plot": str(plot_path),
        "strategies": results,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2))
    return doc


def _machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


if __name__ == "__main__":
    sys.exit(main())
