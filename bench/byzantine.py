"""One Byzantine peer of eight, every adversary mode, defences on and off, in the in-process simulator.

    python bench/byzantine.py [--task tiny] [--rounds 60] [--json OUT.json] [--plot OUT.png]

For each adversary mode of :mod:`lioncub.peer.adversary`, one of ``--peers`` peers is Byzantine and
the final validation loss of an honest peer is compared with the clean run (no Byzantine peer) of
the same settings: ``ratio = loss / clean loss`` (target: ≤ 1.05 with the defences on). "off" turns
every owner-side defence off (identity checks as modelled by ``adversary.admit``, trust scoring,
dropping non-finite contributions) and uses the plain mean for momentum syncs and parameter
averaging. Prints one JSON object (also written to ``--json``) and draws a bar chart to ``--plot``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from lioncub.optim.schedules import SyncSchedule
from lioncub.optim.strategies import StrategyConfig
from lioncub.peer.adversary import ADVERSARY_MODES
from lioncub.peer.simulate import Defences, SimConfig, simulate

SETTINGS: dict[str, tuple[Defences, str]] = {
    "on": (Defences(), "clipped"),
    "off": (Defences(verify_identity=False, trust=None, reject_non_finite=False), "mean"),
}


def run_one(mode: str | None, setting: str, args: argparse.Namespace) -> dict[str, Any]:
    defences, reduction = SETTINGS[setting]
    cfg = SimConfig(
        peers=args.peers,
        rounds=args.rounds,
        task=args.task,
        strategy=StrategyConfig(local_steps=args.local_steps, outer_lr=args.outer_lr),
        inner_lr=args.inner_lr,
        batch_size=args.batch_size,
        group_size=args.group_size,
        momentum_sync=SyncSchedule(every=args.momentum_every, reduction=reduction),
        averaging=SyncSchedule(every=args.averaging_every, reduction=reduction),
        eval_every=args.rounds,
        eval_batches=args.eval_batches,
        seed=args.seed,
        adversaries={} if mode is None else {args.peers - 1: mode},
        defences=defences,
    )
    start = time.perf_counter()
    res = simulate(cfg)
    return {
        "mode": mode or "clean",
        "defences": setting,
        "initial_val_loss": res.initial_val_loss,
        "final_val_loss": res.final_val_loss,
        "evicted_by_peer0": res.evicted.get(0, []),
        "rejected_non_finite": res.rejected_non_finite,
        "seconds": time.perf_counter() - start,
    }


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(ADVERSARY_MODES)
    cap = 10.0
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.4
    for k, setting in enumerate(SETTINGS):
        ratios = [doc["ratios"][setting][m] for m in modes]
        shown = [cap if not math.isfinite(r) or r > cap else r for r in ratios]
        xs = [i + (k - 0.5) * width for i in range(len(modes))]
        ax.bar(xs, shown, width, label=f"defences {setting}")
        for x, r, h in zip(xs, ratios, shown, strict=True):
            label = "NaN" if not math.isfinite(r) else (f"{r:.3g}" if r > cap else f"{r:.3f}")
            ax.text(x, h, label, ha="center", va="bottom", fontsize=7, rotation=90)
    ax.axhline(1.05, color="k", linestyle="--", linewidth=0.8, label="target 1.05")
    ax.set_yscale("log")
    ax.set_ylim(0.5, cap * 3)
    ax.set_xticks(range(len(modes)), modes, rotation=20, ha="right")
    ax.set_ylabel("final val loss / clean run (capped at 10)")
    ax.set_title(
        f"1 Byzantine peer of {doc['args']['peers']}, task {doc['args']['task']}, {doc['args']['rounds']} rounds"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="tiny")
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--outer-lr", type=float, default=1e-3)
    ap.add_argument("--inner-lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=0)
    ap.add_argument("--momentum-every", type=int, default=5)
    ap.add_argument("--averaging-every", type=int, default=10)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs="*", default=list(ADVERSARY_MODES), choices=ADVERSARY_MODES)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    runs: list[dict[str, Any]] = []
    for setting in SETTINGS:
        for mode in [None, *args.modes]:
            run = run_one(mode, setting, args)
            runs.append(run)
            print(
                f"{setting:>3} {run['mode']:<22} val {run['final_val_loss']:.4f} ({run['seconds']:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    clean = {
        s: next(r["final_val_loss"] for r in runs if r["defences"] == s and r["mode"] == "clean")
        for s in SETTINGS
    }
    ratios = {
        s: {
            r["mode"]: r["final_val_loss"] / clean[s]
            for r in runs
            if r["defences"] == s and r["mode"] != "clean"
        }
        for s in SETTINGS
    }
    doc = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "clean_val_loss": clean,
        "ratios": ratios,
        "within_5pct_with_defences": all(r <= 1.05 for r in ratios["on"].values()),
        "runs": runs,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.plot:
        plot(doc, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
