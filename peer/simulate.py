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

from lioncub.optim.codec import Encoded
from lioncub.optim.partition import shard_bounds
from lioncub.optim.reducers import MeanReducer, Reducer, TrustedVoteReducer
from lioncub.optim.robust import AgreementTracker, TrustConfig
from lioncub.optim.schedules import SyncSchedule, consensus_distance
from lioncub.optim.strategies import OuterState, StrategyConfig, SyncStrategy, make_strategy

from .adversary import ADVERSARY_MODES, Adversary, Envelope, admit, forged_envelopes
from .local import LocalTrainer, copy_into_params
from .tasks import Task, get_task

__all__ = ["Defences", "RoundRecord", "SimConfig", "SimResult", "simulate"]


@dataclass(frozen=True)
class Defences:
    """The Byzantine defences every simulated shard owner runs (all on by default).

    The robust float reduction is a run setting (``momentum_sync.reduction``,
    ``averaging.reduction``); these are the owner-side checks.

    Attributes:
        verify_identity: count a contribution only if signed by the member it claims to come from,
            for this round and group, once per member (what the wire enforces; see
            :func:`lioncub.peer.adversary.admit`). Off: every envelope counts.
        trust: weigh sign votes by their agreement with the majority (None: off).
        reject_non_finite: drop float contributions that do not decode to finite values.
    """

    verify_identity: bool = True
    trust: TrustConfig | None = field(default_factory=TrustConfig)
    reject_non_finite: bool = True


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
        adversaries: peer index -> adversary mode (:data:`~lioncub.peer.adversary.ADVERSARY_MODES`);
            those peers are Byzantine (resilience testing). Validation loss is measured on the
            first honest peer.
        defences: the owners' Byzantine defences.
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
    adversaries: dict[int, str] = field(default_factory=dict)
    defences: Defences = field(default_factory=Defences)

    def __post_init__(self) -> None:
        if self.peers < 1:
            raise ValueError(f"peers must be >= 1, got {self.peers}")
        for index, mode in self.adversaries.items():
            if not 0 <= index < self.peers:
                raise ValueError(f"adversary index {index} is not a peer (0..{self.peers - 1})")
            if mode not in ADVERSARY_MODES:
                raise ValueError(
                    f"unknown adversary mode {mode!r}; choose one of {', '.join(ADVERSARY_MODES)}"
                )
        if len(self.adversaries) >= self.peers:
            raise ValueError("at least one peer must be honest")
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
    #: peer index -> the peer indices its agreement tracker evicted (honest peers only).
    evicted: dict[int, list[int]] = field(default_factory=dict)
    #: float contributions dropped as non-finite, over the run.
    rejected_non_finite: int = 0

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
            "evicted": {str(k): v for k, v in self.evicted.items()},
            "rejected_non_finite": self.rejected_non_finite,
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
    adversary: Adversary | None = None
    tracker: AgreementTracker | None = None
    #: ``stale-replay`` only: the vector it sent last, per exchange (replayed as last round's).
    sent: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return f"peer{self.index:04d}"


def _groups(n: int, group_size: int, seed: int, rnd: int) -> list[list[int]]:
    if group_size == 0 or group_size >= n:
        return [list(range(n))]
    order = list(range(n))
    random.Random(seed * 1_000_003 + rnd).shuffle(order)
    groups = [order[i : i + group_size] for i in range(0, n, group_size)]
    if len(groups) > 1 and len(groups[-1]) < 2:
        groups[-2].extend(groups.pop())
    return groups


@dataclass(frozen=True)
class _Exchange:
    """One exchange of one group: its name, envelope and reducer."""

    name: str
    round: int
    group: str
    reducer: Reducer
    defences: Defences


def _unique(ids: list[str]) -> list[str]:
    """Distinct names for the counted contributions (repeats only happen without identity checks)."""
    seen: dict[str, int] = {}
    out = []
    for i in ids:
        seen[i] = seen.get(i, 0) + 1
        out.append(i if seen[i] == 1 else f"{i}#{seen[i]}")
    return out


def _owner_result(
    ex: _Exchange, owner: _Peer, senders: list[str], parts: list[Encoded], weights: list[int]
) -> Encoded:
    """The owner's reduction of what it counted (trust-weighted for sign votes when enabled).

    Owners have a tracker exactly when ``defences.trust`` is set; only a strategy's sign votes
    (the update exchange) are scored.
    """
    reducer = ex.reducer
    if owner.tracker is not None and isinstance(reducer, SyncStrategy) and reducer.uplink.name == "sign1":
        return TrustedVoteReducer(reducer, owner.tracker, owner.id).reduce_from(senders, parts, weights)
    return reducer.reduce(parts, weights)


def _exchange(
    ex: _Exchange, members: list[_Peer], vecs: list[torch.Tensor], weights: list[int]
) -> list[torch.Tensor]:
    """Reduce-scatter + all-gather of ``vecs`` among ``members``; each member's agreed vector.

    Byzantine members send their corrupted vector (and forged envelopes); each owner admits
    contributions by the envelope rules and reduces them. A reduction that fails leaves every
    member with its own contribution for that shard, as on the network.

    Byte accounting: a member sends its slice of every other owner's shard and, as an owner, the
    result to the n - 1 others; it receives the mirror image (forged envelopes are not counted).
    """
    n = len(members)
    numel = vecs[0].numel()
    ids = [p.id for p in members]
    weight_of = dict(zip(ids, weights, strict=True))
    sent = [p.adversary.corrupt(ex.name, v) if p.adversary else v for p, v in zip(members, vecs, strict=True)]
    encoders = [p.adversary.wrap(ex.name, ex.reducer) if p.adversary else ex.reducer for p in members]
    outs = [torch.empty(numel, dtype=torch.float32, device=vecs[0].device) for _ in members]
    for owner, (lo, hi) in enumerate(shard_bounds(numel, [1.0] * n)):
        parts = [enc.encode(v[lo:hi]) for enc, v in zip(encoders, sent, strict=True)]
        envelopes: list[Envelope] = []
        for m, p in enumerate(members):  # forgeries first: the worst case for the first-come rule
            if p.adversary is not None and p.adversary.forges:
                prev = p.sent.get(ex.name)  # kept for stale-replay only
                old = None if prev is None else encoders[m].encode(prev[lo:hi])
                envelopes += forged_envelopes(p.adversary, p.id, ids, ex.round, ex.group, parts[m], old)
        envelopes += [Envelope(p.id, p.id, ex.round, ex.group, parts[m]) for m, p in enumerate(members)]
        counted = admit(
            envelopes, members=ids, round=ex.round, group=ex.group, verify=ex.defences.verify_identity
        )
        senders = _unique([c for c, _ in counted])
        nbytes = 0  # a failed reduction sends no result
        try:
            result = _owner_result(
                ex, members[owner], senders, [part for _, part in counted], [weight_of[c] for c, _ in counted]
            )
            values = ex.reducer.decode(result)
            nbytes = result.nbytes
        except ValueError as exc:  # CodecError included: the owner could not reduce
            log.info("round %d %s: shard %d not reduced (%s): local fallback", ex.round, ex.name, owner, exc)
            for m in range(n):
                own = ex.reducer.encode(vecs[m][lo:hi])
                outs[m][lo:hi] = ex.reducer.decode(ex.reducer.local_fallback(own, weights[m]))
        else:
            for out in outs:
                out[lo:hi] = values
        for m, peer in enumerate(members):
            if m == owner:
                peer.bytes_received += sum(p.nbytes for j, p in enumerate(parts) if j != owner)
                peer.bytes_sent += (n - 1) * nbytes
            else:
                peer.bytes_sent += parts[m].nbytes
                peer.bytes_received += nbytes
    for p, v in zip(members, sent, strict=True):
        if p.adversary is not None and p.adversary.mode == "stale-replay":
            p.sent[ex.name] = v
    return outs


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
        mode = cfg.adversaries.get(i)
        peers.append(
            _Peer(
                i,
                trainer,
                OuterState.create(trainer.get_flat()),
                adversary=None if mode is None else Adversary(mode, seed=cfg.seed * 7919 + i),
                tracker=AgreementTracker(cfg.defences.trust) if cfg.defences.trust is not None else None,
            )
        )
    honest = [p for p in peers if p.adversary is None]
    probe = honest[0]  # validation loss is the first honest peer's
    num_params = probe.state.anchor.numel()
    initial = _evaluate(task, probe.trainer.model, probe.state.anchor, cfg.eval_batches)
    log.info(
        "simulating %d peers (%d Byzantine), %s, %d params, initial val loss %.4f",
        cfg.peers,
        len(cfg.adversaries),
        strategy.name,
        num_params,
        initial,
    )
    momentum_reducer = MeanReducer(
        cfg.momentum_sync.codec, cfg.momentum_sync.reduction, reject_non_finite=cfg.defences.reject_non_finite
    )
    averaging_reducer = MeanReducer(
        cfg.averaging.codec, cfg.averaging.reduction, reject_non_finite=cfg.defences.reject_non_finite
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
        groups = _groups(cfg.peers, cfg.group_size, cfg.seed, rnd)
        for k, group in enumerate(groups):
            members = [peers[i] for i in group]
            vecs = [strategy.prepare(peers[i].state, deltas[i]) for i in group]
            ex = _Exchange("update", rnd, f"r{rnd}g{k}", strategy, cfg.defences)
            updates = _exchange(ex, members, vecs, [weight] * len(group))
            for i, update in zip(group, updates, strict=True):
                strategy.apply(peers[i].state, update, deltas[i])
        synced = cfg.momentum_sync.is_due(rnd)
        averaged = cfg.averaging.is_due(rnd)
        for k, group in enumerate(groups if synced or averaged else []):
            members = [peers[i] for i in group]
            ones = [1] * len(members)
            if synced:
                ex = _Exchange("momentum", rnd, f"r{rnd}g{k}", momentum_reducer, cfg.defences)
                means = _exchange(ex, members, [p.state.momentum for p in members], ones)
                for p, mean in zip(members, means, strict=True):
                    p.state.momentum.copy_(mean)
            if averaged:
                ex = _Exchange("params", rnd, f"r{rnd}g{k}", averaging_reducer, cfg.defences)
                means = _exchange(ex, members, [p.state.anchor for p in members], ones)
                for p, mean in zip(members, means, strict=True):
                    p.state.anchor.copy_(mean)
        for p in peers:
            p.trainer.set_flat(p.state.anchor)
        evaluate = rnd % cfg.eval_every == 0 or rnd == cfg.rounds
        val = _evaluate(task, probe.trainer.model, probe.state.anchor, cfg.eval_batches) if evaluate else None
        rec = RoundRecord(
            round=rnd,
            samples=rnd * weight * cfg.peers,
            train_loss=sum(p.last_loss for p in honest) / len(honest),
            val_loss=val,
            bytes_sent_per_peer=sum(p.bytes_sent for p in peers) / len(peers),
            bytes_received_per_peer=sum(p.bytes_received for p in peers) / len(peers),
            consensus_distance=consensus_distance([p.state.anchor for p in honest]),
            elapsed_s=time.perf_counter() - start,
            momentum_synced=synced,
            averaged=averaged,
        )
        records.append(rec)
        if on_round is not None:
            on_round(rec)
    index_of = {p.id: p.index for p in peers}
    evicted = {
        p.index: sorted(index_of[e] for e in p.tracker.evicted if e in index_of)
        for p in honest
        if p.tracker is not None
    }
    rejected = momentum_reducer.rejected + averaging_reducer.rejected
    return SimResult(cfg, records, num_params, initial, evicted, rejected)
