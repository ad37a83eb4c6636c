"""In-process swarm simulator: N virtual peers, one process, the real strategy objects, exact bytes.

Each virtual peer owns a model replica, a disjoint data shard, an inner optimizer and an
:class:`~lioncub.optim.strategies.OuterState`. A round runs the same steps as the network runtime
(local steps → prepare → encode per shard → owners reduce → everyone decodes and applies), with the
shard plan of a reduce-scatter + all-gather, so the byte counts are exactly the payload bytes each
peer would send and receive on the wire (framing excluded).
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lioncub.optim.partition import shard_bounds
from lioncub.optim.reducers import MeanReducer, Reducer
from lioncub.optim.schedules import SyncSchedule, consensus_distance
from lioncub.optim.strategies import OuterState, StrategyConfig, make_strategy

from .local import LocalTrainer, copy_into_params
from .tasks import Task, get_task

__all__ = ["RoundRecord", "SimConfig", "SimResult", "simulate"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimConfig:
    """One simulated run.

    Attributes:
        peers: number of virtual peers.
        rounds: number of sync rounds (for ``allreduce`` a round is one step).
        task: task name from the registry; ``task_overrides`` are passed to it.
        strategy: the sync strategy and its outer hyperparameters.
        inner: ``"lion"`` or ``"adamw"``; unused when ``strategy.local_steps == 0``.
        inner_lr, inner_weight_decay: the inner optimizer's settings.
        batch_size: samples per inner step per peer.
        group_size: members per round's group; 0 or ≥ peers means everyone (no gossip).
        momentum_sync, averaging: extra float syncs of outer momentum / anchors.
        eval_every: evaluate validation loss every this many rounds (and at the end).
        eval_batches: validation batches per evaluation.
        seed: everything is deterministic given it.
    """

    peers: int = 4
    rounds: int = 20
    task: str = "tiny"
    task_overrides: dict[str, Any] = field(default_factory=dict)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    inner: str = "lion"
    inner_lr: float = 1e-3
    inner_weight_decay: float = 0.0
    batch_size: int = 32
    group_size: int = 0
    momentum_sync: SyncSchedule = field(default_factory=SyncSchedule)
    averaging: SyncSchedule = field(default_factory=SyncSchedule)
    eval_every: int = 5
    eval_batches: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.peers < 1:
            raise ValueError(f"peers must be >= 1, got {self.peers}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.inner not in ("lion", "adamw"):
            raise ValueError(f"inner optimizer must be 'lion' or 'adamw', got {self.inner!r}")
        if not self.inner_lr > 0:
            raise ValueError(f"inner_lr must be > 0, got {self.inner_lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.group_size < 0 or self.group_size == 1:
            raise ValueError(f"group_size must be 0 (everyone) or >= 2, got {self.group_size}")
        if self.eval_every < 1 or self.eval_batches < 1:
            raise ValueError("eval_every and eval_batches must be >= 1")

    @property
    def samples_per_round(self) -> int:
        """Samples one peer processes per round."""
        return self.batch_size * max(1, self.strategy.local_steps)


@dataclass(frozen=True)
class RoundRecord:
    """What one round did (validation loss only on evaluation rounds)."""

    round: int
    samples: int
    train_loss: float
    val_loss: float | None
    bytes_sent_per_peer: float
    bytes_received_per_peer: float
    consensus_distance: float
    elapsed_s: float
    momentum_synced: bool = False
    averaged: bool = False


@dataclass
class SimResult:
    config: SimConfig
    records: list[RoundRecord]
    num_params: int
    initial_val_loss: float

    @property
    def final_val_loss(self) -> float:
        vals = [r.val_loss for r in self.records if r.val_loss is not None]
        return vals[-1] if vals else self.initial_val_loss

    def to_json(self) -> dict[str, Any]:
        last = self.records[-1]
        return {
            "config": asdict(self.config),
            "num_params": self.num_params,
            "initial_val_loss": self.initial_val_loss,
            "final_val_loss": self.final_val_loss,
            "samples": last.samples,
            "bytes_sent_per_peer": last.bytes_sent_per_peer,
            "bytes_received_per_peer": last.bytes_received_per_peer,
            "records": [asdict(r) for r in self.records],
        }


@dataclass
class _Peer:
    index: int
    trainer: LocalTrainer
    state: OuterState
    bytes_sent: int = 0
    bytes_received: int = 0
    last_loss: float = float("nan")


def _groups(n: int, group_size: int, seed: int, rnd: int) -> list[list[int]]:
    if group_size == 0 or group_size >= n:
        return [list(range(n))]
    order = list(range(n))
    random.Random(seed * 1_000_003 + rnd).shuffle(order)
    groups = [order[i : i + group_size] for i in range(0, n, group_size)]
    if len(groups) > 1 and len(groups[-1]) < 2:
        groups[-2].extend(groups.pop())
    return groups


def _exchange(
    reducer: Reducer, members: list[_Peer], vecs: list[torch.Tensor], weights: list[int]
) -> torch.Tensor:
    """Reduce-scatter + all-gather of ``vecs`` among ``members``; returns the agreed vector.

    Byte accounting: a member sends its slice of every other owner's shard and, as an owner, the
    result to the n - 1 others; it receives the mirror image.
    """
    n = len(members)
    numel = vecs[0].numel()
    out = torch.empty(numel, dtype=torch.float32, device=vecs[0].device)
    for owner, (lo, hi) in enumerate(shard_bounds(numel, [1.0] * n)):
        parts = [reducer.encode(v[lo:hi]) for v in vecs]
        result = reducer.reduce(parts, weights)
        out[lo:hi] = reducer.decode(result)
        for m, peer in enumerate(members):
            if m == owner:
                peer.bytes_received += sum(p.nbytes for j, p in enumerate(parts) if j != owner)
                peer.bytes_sent += (n - 1) * result.nbytes
            else:
                peer.bytes_sent += parts[m].nbytes
                peer.bytes_received += result.nbytes
    return out


def _evaluate(task: Task, model: nn.Module, anchor: torch.Tensor, batches: int) -> float:
    probe = copy.deepcopy(model)
    copy_into_params(anchor, [p for p in probe.parameters() if p.requires_grad])
    return float(task.evaluate(probe, max_batches=batches))


def simulate(
    cfg: SimConfig,
    *,
    device: torch.device | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> SimResult:
    """Run ``cfg`` to completion and return every round's record."""
    dev = device or torch.device("cpu")
    torch.manual_seed(cfg.seed)
    task = get_task(cfg.task, device=dev, **cfg.task_overrides)
    strategy = make_strategy(cfg.strategy)
    template = task.make_model(cfg.seed).to(dev)
    peers: list[_Peer] = []
    for i in range(cfg.peers):
        trainer = LocalTrainer(
            task,
            copy.deepcopy(template),
            task.batches(i, cfg.peers, cfg.batch_size, cfg.seed),
            local_steps=cfg.strategy.local_steps,
            inner=cfg.inner,
            inner_lr=cfg.inner_lr,
            inner_weight_decay=cfg.inner_weight_decay,
            batch_size=cfg.batch_size,
        )
        peers.append(_Peer(i, trainer, OuterState.create(trainer.get_flat())))
    num_params = peers[0].state.anchor.numel()
    initial = _evaluate(task, peers[0].trainer.model, peers[0].state.anchor, cfg.eval_batches)
    log.info(
        "simulating %d peers, %s, %d params, initial val loss %.4f",
        cfg.peers,
        strategy.name,
        num_params,
        initial,
    )
    records: list[RoundRecord] = []
    start = time.perf_counter()
    weight = cfg.samples_per_round
    for rnd in range(1, cfg.rounds + 1):
        deltas = []
        for p in peers:
            local = p.trainer.run_round(p.state.anchor)
            p.last_loss = local.loss
            deltas.append(local.delta)
        for group in _groups(cfg.peers, cfg.group_size, cfg.seed, rnd):
            members = [peers[i] for i in group]
            vecs = [strategy.prepare(peers[i].state, deltas[i]) for i in group]
            update = _exchange(strategy, members, vecs, [weight] * len(group))
            for i in group:
                strategy.apply(peers[i].state, update, deltas[i])
        synced = cfg.momentum_sync.is_due(rnd)
        averaged = cfg.averaging.is_due(rnd)
        for group in _groups(cfg.peers, cfg.group_size, cfg.seed, rnd) if synced or averaged else []:
            members = [peers[i] for i in group]
            ones = [1] * len(members)
            if synced:
                mean_m = _exchange(
                    MeanReducer(cfg.momentum_sync.codec), members, [p.state.momentum for p in members], ones
                )
                for p in members:
                    p.state.momentum.copy_(mean_m)
            if averaged:
                mean_a = _exchange(
                    MeanReducer(cfg.averaging.codec), members, [p.state.anchor for p in members], ones
                )
                for p in members:
                    p.state.anchor.copy_(mean_a)
        for p in peers:
            p.trainer.set_flat(p.state.anchor)
        evaluate = rnd % cfg.eval_every == 0 or rnd == cfg.rounds
        val = (
            _evaluate(task, peers[0].trainer.model, peers[0].state.anchor, cfg.eval_batches)
            if evaluate
            else None
        )
        rec = RoundRecord(
            round=rnd,
            samples=rnd * weight * cfg.peers,
            train_loss=sum(p.last_loss for p in peers) / len(peers),
            val_loss=val,
            bytes_sent_per_peer=sum(p.bytes_sent for p in peers) / len(peers),
            bytes_received_per_peer=sum(p.bytes_received for p in peers) / len(peers),
            consensus_distance=consensus_distance([p.state.anchor for p in peers]),
            elapsed_s=time.perf_counter() - start,
            momentum_synced=synced,
            averaged=averaged,
        )
        records.append(rec)
        if on_round is not None:
            on_round(rec)
    return SimResult(cfg, records, num_params, initial)
