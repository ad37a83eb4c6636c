"""Convergence of every sync strategy at equal samples, in the in-process simulator.

    python bench/convergence.py [--peers 4 8] [--rounds 40] [--task shakespeare-char] [--json PATH]

Each strategy trains the same task from the same seed with the same number of samples per peer
(``allreduce`` takes one step per round, so it gets ``local_steps`` times more rounds). Prints one
JSON object (also written to ``--json``) and draws validation loss vs samples and vs bytes sent to
``--plot``. The comparison the issue asks for: ``lioncub`` final validation loss within 3% of
``allreduce`` at ≥ 32x fewer bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lioncub.optim.strategies import StrategyConfig
from lioncub.peer.cli import STRATEGY_DEFAULTS
from lioncub.peer.simulate import SimConfig, SimResult, simulate
from lioncub.peer.tasks import fetch_shakespeare

VARIANTS: dict[str, dict[str, Any]] = {
    "allreduce": {"name": "allreduce"},
    "lioncub": {"name": "lioncub"},
    "lioncub-coin-ties": {"name": "lioncub", "ties": "random"},
    "lioncub-avg": {"name": "lioncub", "reduction": "avg", "outer_lr": 1e-2},
    "lioncub-l1": {"name": "lioncub-l1"},
    "distributed-lion": {"name": "lioncub", "local_steps": 0, "outer_lr": 1e-3},
    "diloco": {"name": "diloco"},
}


def strategy_for(variant: str, local_steps: int, outer_lr: float | None) -> StrategyConfig:
    spec = dict(VARIANTS[variant])
    name = spec.pop("name")
    base = dict(STRATEGY_DEFAULTS[name])
    base.update(spec)
    if "local_steps" not in spec and name != "allreduce":
        base["local_steps"] = local_steps
    if outer_lr is not None and name in ("lioncub", "lioncub-l1") and "outer_lr" not in spec:
        base["outer_lr"] = outer_lr
    return StrategyConfig(name=name, **base)


def run_one(variant: str, peers: int, args: argparse.Namespace) -> dict[str, Any]:
    strategy = strategy_for(variant, args.local_steps, args.outer_lr)
    steps_per_round = max(1, strategy.local_steps)
    rounds = args.rounds * args.local_steps // steps_per_round
    cfg = SimConfig(
        peers=peers,
        rounds=rounds,
        task=args.task,
        strategy=strategy,
        inner_lr=args.inner_lr,
        batch_size=args.batch_size,
        eval_every=max(1, rounds // args.evals),
        eval_batches=args.eval_batches,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    res: SimResult = simulate(cfg)
    out = res.to_json()
    out["variant"] = variant
    out["wall_s"] = time.perf_counter() - t0
    print(
        f"[convergence] {variant:>16} peers={peers} rounds={rounds} val {res.initial_val_loss:.3f} -> "
        f"{res.final_val_loss:.3f} sent/peer {res.records[-1].bytes_sent_per_peer / 1e6:.2f} MB "
        f"({out['wall_s']:.0f}s)",
        file=sys.stderr,
        flush=True,
    )
    return out


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for peers in sorted({r["config"]["peers"] for r in runs}):
        group = {r["variant"]: r for r in runs if r["config"]["peers"] == peers}
        base = group.get("allreduce")
        for variant, r in group.items():
            row = {
                "variant": variant,
                "peers": peers,
                "samples": r["samples"],
                "final_val_loss": round(r["final_val_loss"], 4),
                "bytes_sent_per_peer": r["bytes_sent_per_peer"],
            }
            if base is not None:
                row["loss_vs_allreduce"] = round(r["final_val_loss"] / base["final_val_loss"], 4)
                row["bytes_reduction_vs_allreduce"] = round(
                    base["bytes_sent_per_peer"] / max(1.0, r["bytes_sent_per_peer"]), 1
                )
            rows.append(row)
    return rows


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peer_counts = sorted({r["config"]["peers"] for r in runs})
    fig, axes = plt.subplots(len(peer_counts), 2, figsize=(12, 4.2 * len(peer_counts)), squeeze=False)
    for row, peers in enumerate(peer_counts):
        for r in (r for r in runs if r["config"]["peers"] == peers):
            recs = [x for x in r["records"] if x["val_loss"] is not None]
            xs = [0] + [x["samples"] for x in recs]
            bs = [1.0] + [max(1.0, x["bytes_sent_per_peer"]) for x in recs]
            ys = [r["initial_val_loss"]] + [x["val_loss"] for x in recs]
            axes[row][0].plot(xs, ys, marker="o", ms=3, label=r["variant"])
            axes[row][1].plot(bs, ys, marker="o", ms=3, label=r["variant"])
        axes[row][0].set(
            xlabel="samples (all peers)", ylabel="validation loss", title=f"{peers} peers: loss vs samples"
        )
        axes[row][1].set(
            xlabel="bytes sent per peer",
            ylabel="validation loss",
            xscale="log",
            title=f"{peers} peers: loss vs bytes",
        )
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="shakespeare-char")
    p.add_argument("--peers", type=int, nargs="+", default=[4, 8])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=20, help="rounds of local_steps steps each")
    p.add_argument("--local-steps", type=int, default=16)
    p.add_argument("--outer-lr", type=float, default=None, help="override lioncub's outer lr")
    p.add_argument("--inner-lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--evals", type=int, default=8, help="evaluations per run")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("bench/out/convergence.json"))
    p.add_argument("--plot", type=Path, default=Path("bench/out/convergence.png"))
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.task == "shakespeare-char":
        fetch_shakespeare()
    runs = [run_one(v, n, args) for n in args.peers for v in args.variants]
    doc = {
        "task": args.task,
        "rounds": args.rounds,
        "local_steps": args.local_steps,
        "batch_size": args.batch_size,
        "inner_lr": args.inner_lr,
        "torch": torch.__version__,
        "summary": summarize(runs),
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1, default=str))
    plot(runs, args.plot)
    print(json.dumps({"summary": doc["summary"], "json": str(args.json), "plot": str(args.plot)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
