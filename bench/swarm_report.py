"""Reporting for the swarm bench: per-strategy numbers, cross-strategy ratios, validation curves, plots."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.swarm_metrics import CurvePoint, at_time, ratio, swarm_curve, time_to_target
from bench.swarm_run import VARIANTS, BenchConfig, StrategyRun

__all__ = ["add_ratios", "markdown_table", "plot", "summarize", "val_curve"]


# ------------------------------------------------------------------------------------- analysis
def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _time_profile(run: StrategyRun) -> dict[str, Any]:
    """Where a round's wall time goes (mean per round over peers), from the events and the peers' logs.

    ``round_s`` is the time between a peer's round events, ``compute_s`` its local steps in that
    time; ``not_computing_s`` the rest. ``matchmaking_s`` and ``*_exchange_s`` are what the peers
    logged per round (with ``rounds.overlap`` they run during the next round's local steps, so
    they only cost wall time where they exceed it). Momentum syncs and parameter averaging are
    spread over all rounds.
    """
    periods: list[float] = []
    computes: list[float] = []
    kinds: dict[str, list[float]] = {}
    for i, series in run.compute_s.items():
        if len(series) < 3:
            continue
        rounds = len(series) - 1
        periods.append((series[-1][0] - series[0][0]) / rounds)
        computes.append((series[-1][1] - series[0][1]) / rounds)
        logged = run.exchange_s.get(i, [])
        n_rounds = max(1, len({r for r, k, _ in logged if k == "matchmaking"}))
        for kind in ("matchmaking", "update", "momentum", "params"):
            total = sum(sec for _, k, sec in logged if k == kind)
            if total:
                kinds.setdefault(kind, []).append(total / n_rounds)
    period, compute = _mean(periods), _mean(computes)
    return {
        "round_s": _round(period, 3),
        "compute_s": _round(compute, 3),
        "not_computing_s": None if period is None or compute is None else _round(period - compute, 3),
        "matchmaking_s": _round(_mean(kinds.get("matchmaking", [])), 3),
        "update_exchange_s": _round(_mean(kinds.get("update", [])), 3),
        "momentum_exchange_s": _round(_mean(kinds.get("momentum", [])), 3),
        "params_exchange_s": _round(_mean(kinds.get("params", [])), 3),
    }


def _wire_at(series: dict[int, list[tuple[float, float]]], t: float) -> float | None:
    """Mean over peers of the bytes their veth moved between training start and ``t``."""
    vals: list[float] = []
    for s in series.values():
        start, now = at_time(s, 0.0), at_time(s, t)
        if start is not None and now is not None:
            vals.append(now - start)
    return statistics.fmean(vals) if vals else None


def val_curve(run: StrategyRun, cfg: BenchConfig) -> list[tuple[float, float]]:
    """``(t, validation loss)`` of the swarm's model at each of peer 0's snapshots, evaluated now.

    Snapshots are lioncub checkpoints (their *anchor*, the model every member agrees on) or the
    hivemind peer's parameters; they are evaluated after the run, with the peers gone, on the
    task's validation split with the same batches as the peers' own summaries (8).
    """
    if not run.snapshots:
        return []
    import torch

    from lioncub.peer.checkpoint import CheckpointError, CheckpointStore
    from lioncub.peer.local import copy_into_params
    from lioncub.peer.tasks import get_task

    task = get_task(cfg.task)
    model = task.make_model(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    out: list[tuple[float, float]] = []
    for path in sorted(run.snapshots, key=lambda p: p.name):
        try:
            if path.name.startswith("ckpt-"):
                ckpt = CheckpointStore(path.parent).load(path)
                flat, unix = ckpt.anchor, ckpt.wall_time
            else:
                doc = torch.load(path, map_location="cpu", weights_only=True)
                flat, unix = doc["params"], float(doc["wall_time"])
        except (OSError, RuntimeError, KeyError, CheckpointError):
            continue
        copy_into_params(flat, params)
        out.append((unix - run.t0_unix, float(task.evaluate(model, max_batches=8))))
    return sorted(out)


def summarize(run: StrategyRun, cfg: BenchConfig) -> dict[str, Any]:
    """One strategy's numbers (before the cross-strategy ratios)."""
    curve = swarm_curve(run.points, cfg.peers, cfg.window) if run.points else []
    hit = time_to_target(curve, cfg.target_loss)
    wire_tx = {i: [(t, float(tx)) for t, tx, _ in s] for i, s in run.wire.items()}
    wire_rx = {i: [(t, float(rx)) for t, _, rx in s] for i, s in run.wire.items()}

    end = curve[-1] if curve else None
    wire_only = VARIANTS[run.variant].runner == "hivemind"  # its events carry wire bytes, no payload count
    sums = run.summaries
    per_peer: list[dict[str, Any]] = [
        {
            "peer": i,
            "rounds": s.get("rounds_completed"),
            "samples": s.get("samples"),
            "bytes_sent": None if wire_only else s.get("bytes_sent"),
            "bytes_received": None if wire_only else s.get("bytes_received"),
            "wire_bytes_sent": run.wire[i][-1][1] if run.wire.get(i) else None,
            "wire_bytes_received": run.wire[i][-1][2] if run.wire.get(i) else None,
            "compute_utilization": s.get("compute_utilization"),
            "initial_val_loss": s.get("initial_loss"),
            "final_val_loss": s.get("final_loss"),
            "groups_formed": s.get("groups_formed"),
            "rounds_alone": s.get("rounds_alone"),
            "anchor_sha256": (s.get("anchor_sha256") or "")[:16],
        }
        for i, s in sorted(sums.items())
    ]

    def mean_of(key: str) -> float | None:
        vals = [float(p[key]) for p in per_peer if p.get(key) is not None]
        return statistics.fmean(vals) if vals else None

    return {
        "strategy": run.variant,
        "description": VARIANTS[run.variant].description,
        "completed": len(sums) == cfg.peers and not run.errors,
        "stopped_by": run.stopped_by,
        "errors": run.errors,
        "exit_codes": run.exit_codes,
        "code_version": run.code_version,
        "setup_s": round(run.setup_s, 2),
        "train_s": round(run.elapsed_s, 2),
        "time_to_target_s": None if hit is None else round(hit.t, 2),
        "samples_to_target": None if hit is None else hit.samples,
        "bytes_sent_per_peer": None if hit is None or wire_only else round(hit.bytes_sent),
        "bytes_received_per_peer": None if hit is None or wire_only else round(hit.bytes_received),
        "wire_bytes_sent_per_peer": None if hit is None else _round(_wire_at(wire_tx, hit.t)),
        "total_samples": None if end is None else end.samples,
        "total_bytes_sent_per_peer": None if end is None or wire_only else round(end.bytes_sent),
        "total_bytes_received_per_peer": None if end is None or wire_only else round(end.bytes_received),
        "total_wire_bytes_sent_per_peer": _round(_wire_at(wire_tx, run.elapsed_s)),
        "total_wire_bytes_received_per_peer": _round(_wire_at(wire_rx, run.elapsed_s)),
        "compute_utilization": _round(mean_of("compute_utilization"), 4),
        "initial_loss": _round(mean_of("initial_val_loss"), 4),
        "final_loss": _round(mean_of("final_val_loss"), 4),
        "final_train_loss": None if end is None else round(end.loss, 4),
        **_val_fields(run, cfg, curve, mean_of("initial_val_loss"), wire_only),
        "identical_anchors": len({p["anchor_sha256"] for p in per_peer}) == 1 if per_peer else None,
        "time_profile": _time_profile(run),
        "per_peer": per_peer,
        "load_average": {"before": run.load_before, "after": run.load_after},
        "curve_columns": [
            "t_s",
            "samples",
            "train_loss",
            "payload_bytes_sent_per_peer",
            "wire_bytes_sent_per_peer",
        ],
        "curve": [
            [
                round(c.t, 2),
                c.samples,
                round(c.loss, 4),
                None if wire_only else round(c.bytes_sent),
                _round(_wire_at(wire_tx, c.t)),
            ]
            for c in curve
        ],
    }


def _val_fields(
    run: StrategyRun, cfg: BenchConfig, curve: list[CurvePoint], initial: float | None, wire_only: bool
) -> dict[str, Any]:
    """Validation-loss curve and the time, samples and bytes until it reaches the target."""
    points = val_curve(run, cfg)
    if initial is not None:
        points.insert(0, (0.0, initial))
    samples = [(0.0, 0.0), *((c.t, float(c.samples)) for c in curve)]
    sent = [(0.0, 0.0), *((c.t, c.bytes_sent) for c in curve)]
    hit = next(((t, v) for t, v in points if v <= cfg.target_loss), None)
    return {
        "val_time_to_target_s": None if hit is None else round(hit[0], 2),
        "val_samples_to_target": None if hit is None else _round(at_time(samples, hit[0])),
        "val_bytes_sent_per_peer": None if hit is None or wire_only else _round(at_time(sent, hit[0])),
        "val_last_t_s": round(points[-1][0], 2) if points else None,
        "val_curve": [[round(t, 2), _round(at_time(samples, t)), round(v, 4)] for t, v in points],
    }


def _round(x: float | None, digits: int = 0) -> float | None:
    if x is None:
        return None
    return round(x, digits) if digits else float(round(x))


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    """Speed-ups (time to target) and bytes ratios vs allreduce and the diloco variants, in place."""
    for ours in results.values():
        for base_name in ("allreduce", "diloco", "diloco-adamw"):
            base = results.get(base_name)
            if base is None:
                continue
            t = ratio(base["time_to_target_s"], base["train_s"], ours["time_to_target_s"], ours["train_s"])
            ours[f"speedup_vs_{base_name}"] = None if t.value is None else round(t.value, 2)
            ours[f"speedup_vs_{base_name}_bound"] = t.bound
            b = ratio(
                base["bytes_sent_per_peer"],
                base["total_bytes_sent_per_peer"] or 0.0,
                ours["bytes_sent_per_peer"],
                ours["total_bytes_sent_per_peer"] or 0.0,
            )
            ours[f"bytes_ratio_vs_{base_name}"] = None if b.value is None else round(b.value, 2)
            ours[f"bytes_ratio_vs_{base_name}_bound"] = b.bound
            if base["val_last_t_s"] is not None and ours["val_last_t_s"] is not None:
                v = ratio(
                    base["val_time_to_target_s"],
                    base["val_last_t_s"],
                    ours["val_time_to_target_s"],
                    ours["val_last_t_s"],
                )
                ours[f"val_speedup_vs_{base_name}"] = None if v.value is None else round(v.value, 2)
                ours[f"val_speedup_vs_{base_name}_bound"] = v.bound


# ---------------------------------------------------------------------------------------- plots
def plot(results: dict[str, dict[str, Any]], target: float, title: str, path: Path) -> None:
    """Training loss vs wall time, samples, payload and wire bytes; validation loss vs time and samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(18, 9))
    train = "training loss (swarm, smoothed)"
    val = "validation loss (peer 0's anchor)"
    panels = (
        (axes[0][0], "curve", 0, "wall time since training began (s)", train, False),
        (axes[0][1], "curve", 1, "samples (all peers)", train, False),
        (axes[0][2], "val_curve", 0, "wall time since training began (s)", val, False),
        (axes[1][0], "curve", 3, "payload bytes sent per peer (lioncub's own count)", train, True),
        (axes[1][1], "curve", 4, "bytes on the wire sent per peer (veth: headers, DHT, all)", train, True),
        (axes[1][2], "val_curve", 1, "samples (all peers)", val, False),
    )
    for name, res in results.items():
        for ax, key, col, _, _, log_x in panels:
            pts = [
                (row[col], row[2])
                for row in res.get(key, [])
                if row[col] is not None and (not log_x or row[col] > 0)
            ]
            if pts:
                ax.plot(
                    [x for x, _ in pts],
                    [v for _, v in pts],
                    label=name,
                    lw=1.3,
                    marker="." if key == "val_curve" else None,
                )
    for ax, _, _, xlabel, ylabel, log_x in panels:
        ax.axhline(target, color="grey", ls="--", lw=0.8)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        if ax.lines[1:]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown_table(doc: dict[str, Any]) -> str:
    """The results document as a Markdown table (what bench/RESULTS.md shows)."""

    def num(x: Any, fmt: str = "{:.1f}") -> str:
        return "–" if x is None else fmt.format(x)

    def mb(x: Any) -> str:
        return "–" if x is None else f"{x / 1e6:.2f}"

    def ratio_cell(r: dict[str, Any], key: str) -> str:
        value, bound = r.get(key), r.get(f"{key}_bound")
        if value is None:
            return "–"
        return {"lower": "≥ ", "upper": "≤ "}.get(bound or "", "") + f"{value:.2f}×"

    head = (
        "| strategy | train → target (s) | samples | val → target (s) | MB sent/peer to target "
        "(payload / wire) | MB sent/peer total (payload / wire) | compute util | final val loss | "
        "speed-up vs allreduce (train / val) | vs diloco (train / val) | bytes vs diloco |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for name, r in doc["strategies"].items():
        rows.append(
            f"| {name} | {num(r['time_to_target_s'])} | {num(r['samples_to_target'], '{:.0f}')} | "
            f"{num(r.get('val_time_to_target_s'))} | {mb(r['bytes_sent_per_peer'])} / "
            f"{mb(r['wire_bytes_sent_per_peer'])} | {mb(r['total_bytes_sent_per_peer'])} / "
            f"{mb(r['total_wire_bytes_sent_per_peer'])} | {num(r['compute_utilization'], '{:.2f}')} | "
            f"{num(r['final_loss'], '{:.3f}')} | {ratio_cell(r, 'speedup_vs_allreduce')} / "
            f"{ratio_cell(r, 'val_speedup_vs_allreduce')} | {ratio_cell(r, 'speedup_vs_diloco')} / "
            f"{ratio_cell(r, 'val_speedup_vs_diloco')} | {ratio_cell(r, 'bytes_ratio_vs_diloco')} |"
        )
    return head + "\n".join(rows) + "\n"
