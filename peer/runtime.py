"""A lioncub peer process: identity, DHT, run config, join or resume, the round loop, shutdown.

Create with ``await PeerRuntime.create(settings, config)``, drive with ``await runtime.run()``,
always ``await runtime.close()``. The first peer of a run publishes its :class:`RunConfig` in the
DHT; every later peer takes the published one (data, validated, never code) and downloads the
current anchor, outer momentum and round from a live peer before it votes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lioncub.optim.strategies import OuterState, make_strategy

from .checkpoint import Checkpoint, CheckpointStore
from .config import RunConfig, to_dict
from .dht import DHTError
from .local import LocalResult, LocalTrainer
from .metrics import PeerMetrics
from .node import PeerNode, PeerSettings, SetupError
from .rounds import RoundReport
from .tasks import get_task, select_device

__all__ = ["PeerRuntime", "PeerSettings", "RunSummary", "SetupError", "anchor_digest"]

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    """What ``--summary`` writes."""

    peer_id: str
    run_id: str
    rounds_completed: int = 0
    first_round: int = 0
    initial_loss: float | None = None
    final_loss: float | None = None
    bytes_sent: int = 0
    bytes_received: int = 0
    peers_seen: list[str] = field(default_factory=list)
    groups_formed: int = 0
    rounds_alone: int = 0
    compute_s: float = 0.0
    wall_s: float = 0.0
    samples: int = 0
    anchor_sha256: str = ""
    joined_from: str | None = None
    #: This peer found the run's config in the DHT but no live peer: the run started over from round 0.
    restarted_run: bool = False
    resumed_round: int | None = None
    consensus_distance: float | None = None

    @property
    def compute_utilization(self) -> float:
        return self.compute_s / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["compute_utilization"] = round(self.compute_utilization, 4)
        return out


def anchor_digest(anchor: torch.Tensor) -> str:
    return hashlib.sha256(anchor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


class PeerRuntime:
    """One peer driven by a bundled task. See the module docstring for the life cycle."""

    def __init__(self, node: PeerNode) -> None:
        self.node = node
        self.settings = node.settings
        self.config = node.config
        self.peer_id = node.peer_id
        self.summary = RunSummary(self.peer_id, node.config.run_id)
        self.metrics = PeerMetrics(self.peer_id, node.config.run_id)
        self.metrics_port: int | None = None
        self._peers_seen: set[str] = set()
        self._last_loss: float | None = None
        self._last_alone = False
        self.stop_event = asyncio.Event()

    @property
    def dht(self) -> Any:
        return self.node.dht

    @property
    def info(self) -> Any:
        return self.node.info

    @classmethod
    async def create(cls, settings: PeerSettings, config: RunConfig | None = None) -> PeerRuntime:
        node = await PeerNode.create(settings, config)
        self = cls(node)
        try:
            await self._build()
        except BaseException:
            await node.close()
            raise
        return self

    async def _build(self) -> None:
        cfg, s = self.config, self.settings
        self.task = get_task(cfg.task.name, device=select_device(s.device), **cfg.task.overrides)
        shard = (
            s.data_shard
            if s.data_shard is not None
            else int(self.peer_id.encode().hex(), 16) % s.num_data_shards
        )
        self.trainer = LocalTrainer(
            self.task,
            self.task.make_model(cfg.seed),
            self.task.batches(shard, max(s.num_data_shards, shard + 1), cfg.inner.batch_size, cfg.seed),
            local_steps=cfg.strategy.local_steps,
            inner=cfg.inner.optimizer,
            inner_lr=cfg.inner.lr,
            inner_weight_decay=cfg.inner.weight_decay,
            batch_size=cfg.inner.batch_size,
        )
        self.state = OuterState.create(self.trainer.get_flat())
        await self.node.start(self.state, make_strategy(cfg.strategy))
        self.node.record_fn = self._record_fields
        faults = self.node.faults
        self.store = (
            CheckpointStore(
                s.checkpoint_dir,
                every_rounds=s.checkpoint_every,
                write_hook=faults.checkpoint_hook if faults is not None else None,
            )
            if s.checkpoint_dir
            else None
        )
        if s.metrics_port is not None:
            self.metrics_port = self.metrics.serve(s.metrics_host, s.metrics_port)
        await self._enter()
        self.node.go_live()

    async def _enter(self) -> None:
        """Resume from a checkpoint, or download the state from a live peer, or start fresh."""
        if self.settings.resume and self.store is not None:
            ckpt = self.store.load_latest(run_id=self.config.run_id)
            if ckpt is not None:
                if ckpt.anchor.numel() != self.state.anchor.numel():
                    raise SetupError("the checkpoint's model size does not match this run's task settings")
                self.node.restore(ckpt.round, ckpt.anchor, ckpt.momentum)
                self.trainer.set_flat(ckpt.params)
                if self.trainer.optimizer is not None and ckpt.optimizer_state:
                    self.trainer.optimizer.load_state_dict(ckpt.optimizer_state)
                self.summary.resumed_round = ckpt.round
                log.info("resumed from checkpoint of round %d", ckpt.round)
                return
            log.info("--resume: no checkpoint in %s yet, joining as a new peer", self.settings.checkpoint_dir)
        if not await self._catch_up(min_lead=1) and self.node.existing_run and not await self._others_live():
            log.warning(
                "run %s is published in the DHT but no live peer serves its state: it starts over from "
                "round 0 with a fresh model (to continue it, restart a peer that has a checkpoint with "
                "--resume; to start a new run, pass another --run-id)",
                self.config.run_id,
            )
            self.summary.restarted_run = True

    async def _others_live(self) -> bool:
        try:
            return any(p.peer_id != self.peer_id for p in await self.node.registry.peers_async())
        except DHTError:
            return True  # unknown: no warning

    async def _behind(self, min_lead: int, *, ask: bool = False) -> bool:
        """Whether some reachable peer is at least ``min_lead`` rounds ahead of this one."""
        return bool(await self.node.peers_ahead(min_lead, ask=ask))

    async def _catch_up(self, min_lead: int) -> bool:
        got = await self.node.fetch_ahead(min_lead)
        if got is None:
            return False
        sender, snap = got
        self.node.restore(snap.round, snap.anchor, snap.momentum)
        self.trainer.set_flat(self.state.anchor)
        self.summary.joined_from = sender
        return True

    def _record_fields(self) -> dict[str, Any]:
        s = self.summary
        return {
            "throughput": s.samples / max(s.wall_s, 1e-9),
            "loss": self._last_loss,
            "bytes_sent": s.bytes_sent,
            "bytes_received": s.bytes_received,
            "bytes_per_s": (s.bytes_sent + s.bytes_received) / max(s.wall_s, 1e-9),
        }

    def evaluate(self) -> float:
        probe_params = self.trainer.get_flat()
        self.trainer.set_flat(self.state.anchor)
        try:
            return float(self.task.evaluate(self.trainer.model, max_batches=self.settings.eval_batches))
        finally:
            self.trainer.set_flat(probe_params)

    async def run(
        self, max_rounds: int | None = None, on_round: Callable[[RoundReport, RunSummary], None] | None = None
    ) -> RunSummary:
        """Train until ``max_rounds`` rounds were applied (counting from round 0) or :attr:`stop_event`.

        With ``rounds.overlap`` (and local steps), the exchange of round r runs while the local
        steps of round r + 1 compute; when U_r lands, the local progress is carried over on top of
        the new anchor: θ_local ← θ_anchor,r+1 + (θ_local − S_r), S_r being where the steps began.
        """
        await self._wait_for_peers()
        summary, start = self.summary, time.perf_counter()
        summary.first_round = self.state.round
        summary.initial_loss = await asyncio.to_thread(self.evaluate)
        self._last_loss = summary.initial_loss
        cfg = self.config
        overlap = cfg.rounds.overlap and cfg.strategy.local_steps > 0
        pending: asyncio.Task[RoundReport] | None = None
        pending_local: LocalResult | None = None
        began = self.trainer.get_flat()  # S: where this round's local steps start

        def more() -> bool:
            planned = self.state.round + (1 if pending is not None else 0)
            return not self.stop_event.is_set() and (max_rounds is None or planned < max_rounds)

        next_check = 0.0
        while more():
            # Rate-limited: did the swarm get ahead (2 rounds, or 1 after a round alone)?
            # Gossip peers legitimately drift by a round or two while an exchange is in flight, and
            # a jump there would cost them their own progress: they only catch up between exchanges.
            settled = pending is None or cfg.rounds.group_size == 0
            # Gossip peers may differ by a round; with everyone in one group, alone means behind,
            # and then every round is checked (a round alone takes milliseconds: a rate-limited check
            # would let a peer that was paused replay several rounds alone before it jumps).
            suspect = self._last_alone and cfg.rounds.group_size == 0
            if settled and summary.rounds_completed and (suspect or time.monotonic() >= next_check):
                next_check = time.monotonic() + 0.5  # a registry read costs ~10 ms
                lead = 1 if suspect else 2
                if await self._behind(lead, ask=suspect):
                    if pending is not None:
                        assert pending_local is not None
                        await self._after_round(await pending, pending_local, start, on_round)
                        pending = None
                    if await self._catch_up(min_lead=lead):
                        log.warning("fell behind the swarm; jumped to round %d", self.state.round)
                        began = self.state.anchor.clone()
                        self.trainer.set_flat(began)
            faults = self.node.faults  # test-only: a straggler gets less compute time
            budget = cfg.rounds.max_seconds * (faults.slow_factor(self.state.round) if faults else 1.0)
            local = await asyncio.to_thread(
                self.trainer.run_round, began if overlap else self.state.anchor, max_seconds=budget
            )
            if faults is not None:
                await faults.slow_down(self.state.round, local.compute_s)
            if not overlap:
                report = await self.node.engine.sync(local.delta, local.samples)
                self.trainer.set_flat(self.state.anchor)
                await self._after_round(report, local, start, on_round)
                continue
            if pending is not None:
                assert pending_local is not None
                await self._after_round(await pending, pending_local, start, on_round)
            # Carry this round's progress (Δ = S − θ) over onto the newest anchor, then send it.
            began = self.state.anchor - local.delta
            self.trainer.set_flat(began)
            pending, pending_local = (
                asyncio.create_task(self.node.engine.sync(local.delta, local.samples)),
                local,
            )
        if pending is not None:
            assert pending_local is not None
            await self._after_round(await pending, pending_local, start, on_round)
            self.trainer.set_flat(self.state.anchor)
        if self.store is not None and summary.rounds_completed:
            await asyncio.to_thread(self.save_checkpoint)  # a graceful stop loses no round
        summary.final_loss = await asyncio.to_thread(self.evaluate)
        summary.wall_s = time.perf_counter() - start
        summary.peers_seen = sorted(self._peers_seen)
        summary.anchor_sha256 = anchor_digest(self.state.anchor)
        return summary

    async def _after_round(
        self,
        report: RoundReport,
        local: LocalResult,
        start: float,
        on_round: Callable[[RoundReport, RunSummary], None] | None,
    ) -> None:
        """Book-keeping once round ``report.round`` was applied to the anchor."""
        summary = self.summary
        self.node.publish_state()
        summary.rounds_completed += 1
        summary.samples += local.samples
        summary.compute_s += local.compute_s
        summary.bytes_sent += report.bytes_sent
        summary.bytes_received += report.bytes_received
        summary.wall_s = time.perf_counter() - start
        summary.groups_formed += report.group_size > 1
        summary.rounds_alone += report.group_size <= 1
        self._peers_seen.update(m for m in report.group_members if m != self.peer_id)
        self._last_loss = local.loss
        self._last_alone = report.group_size <= 1
        self._update_metrics(report, local.loss, local.samples)
        if self.settings.eval_every and self.state.round % self.settings.eval_every == 0:
            self.metrics.set_val_loss(await asyncio.to_thread(self.evaluate))
        if self.store is not None and self.store.due(self.state.round):
            await asyncio.to_thread(self.save_checkpoint)
        if on_round is not None:
            on_round(report, summary)
        if self.node.faults is not None:  # test-only: kills and partitions due after this round
            self.node.faults.round_applied(self.state.round)

    async def _wait_for_peers(self) -> None:
        if self.settings.min_peers <= 1:
            return
        await self.node.wait_for_peers(self.settings.min_peers, self.settings.start_timeout, self.stop_event)
        # A joiner that waited may now be behind the swarm.
        await self._catch_up(min_lead=1)

    def _update_metrics(self, report: RoundReport, loss: float, samples: int) -> None:
        m = self.metrics
        m.record_round(self.state.round, seconds=report.matchmaking_s + report.exchange_s, loss=loss)
        m.add_bytes(report.bytes_sent, report.bytes_received)
        m.add_samples(samples)
        m.set_peers_seen(len(self._peers_seen))
        m.set_compute_utilization(min(1.0, self.summary.compute_utilization))
        for reason in report.failures:
            m.record_failure(reason)
        if report.group_size > 1:
            m.record_exchange(report.exchange_s, group_size=report.group_size)
        if report.momentum_synced:
            m.record_momentum_sync()
        if report.averaged:
            m.record_averaging()
        if report.consensus_distance is not None:
            m.set_consensus_distance(report.consensus_distance)
            self.summary.consensus_distance = report.consensus_distance

    def save_checkpoint(self) -> Path | None:
        if self.store is None:
            return None
        optimizer = self.trainer.optimizer
        ckpt = Checkpoint.from_outer_state(
            self.state,
            params=self.trainer.get_flat(),
            optimizer_state=optimizer.state_dict() if optimizer is not None else {},
            config=to_dict(self.config),
            run_id=self.config.run_id,
            peer_id=self.peer_id,
            samples_seen=self.summary.samples,
        )
        return self.store.save(ckpt)

    async def close(self) -> None:
        """Deregister, stop serving, shut the DHT (and its p2pd) down. Safe to call twice."""
        self.metrics.close()
        await self.node.close()
