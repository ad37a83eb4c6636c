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

from lioncub import __version__
from lioncub.optim.strategies import OuterState, make_strategy
from lioncub.protocol import AdmissionPolicy, Identity

from .checkpoint import Checkpoint, CheckpointStore
from .config import ConfigError, RunConfig, from_dict, to_dict
from .dht import (
    DHTError,
    PeerRecord,
    SwarmRegistry,
    fetch_run_config_async,
    list_runs_async,
    publish_run_config_async,
    shutdown_dht,
    start_dht_async,
)
from .exchange import ExchangeHub, HubConfig
from .groups import peer_info
from .local import LocalResult, LocalTrainer
from .matchmaking import Matchmaker, MatchmakingConfig
from .metrics import PeerMetrics
from .rounds import RoundEngine, RoundReport
from .server import HealthInfo, PeerServer
from .state_service import StateDownloadError, StateService, download_state
from .tasks import get_task, select_device

__all__ = ["PeerRuntime", "PeerSettings", "RunSummary", "SetupError"]

log = logging.getLogger(__name__)


class SetupError(RuntimeError):
    """The peer cannot start: no run to join, a bad config, an unreachable DHT. Says what to do."""


@dataclass(frozen=True)
class PeerSettings:
    """This peer's local settings (not shared with the swarm).

    Attributes:
        initial_peers: multiaddrs of DHT nodes to join (empty: start a new swarm).
        run_id: the run to join (default: the newest run in the DHT, or the config's).
        host, port: where the gRPC server binds (port 0 = any free port).
        advertise_host: the address others dial (default: ``host``, or 127.0.0.1 for 0.0.0.0).
        client_mode: accept no connections (behind NAT); own no shard.
        identity_path: Ed25519 key file (created 0600 if missing); None = a fresh key.
        checkpoint_dir, checkpoint_every: periodic atomic checkpoints (None = off).
        resume: start from the newest good checkpoint in ``checkpoint_dir``.
        metrics_port: serve Prometheus metrics on 127.0.0.1:port (None = off, 0 = any port).
        bandwidth_mbps: upload bandwidth to report (sizes this peer's shard).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        data_shard, num_data_shards: which slice of the data this peer reads.
        eval_every, eval_batches: validation loss every N rounds (and at the start and the end).
        announce_every, peer_ttl: how often the peer refreshes its registry entry and how long it lives.
        swarm_key: shared secret for a closed swarm (None = open).
        min_peers, start_timeout: before the first round, wait up to ``start_timeout`` seconds
            until this many peers (this one included) are in the registry.
    """

    initial_peers: tuple[str, ...] = ()
    run_id: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    dht_host: str = "127.0.0.1"
    dht_port: int = 0
    client_mode: bool = False
    identity_path: Path | None = None
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 10
    resume: bool = False
    metrics_port: int | None = None
    bandwidth_mbps: float = 100.0
    device: str = "auto"
    data_shard: int | None = None
    num_data_shards: int = 64
    eval_every: int = 10
    eval_batches: int = 8
    announce_every: float = 2.0
    peer_ttl: float = 8.0
    swarm_key: bytes | None = None
    min_peers: int = 1
    start_timeout: float = 120.0


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
    resumed_round: int | None = None

    @property
    def compute_utilization(self) -> float:
        return self.compute_s / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["compute_utilization"] = round(self.compute_utilization, 4)
        return out


def anchor_digest(anchor: torch.Tensor) -> str:
    return hashlib.sha256(anchor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


async def _resolve_config(
    dht: Any, settings: PeerSettings, config: RunConfig | None
) -> tuple[RunConfig, bool]:
    """The run to take part in; True when this peer created it."""
    run_id = settings.run_id or (config.run_id if config is not None else None)
    if run_id is None:
        runs = await list_runs_async(dht)
        if not runs:
            raise SetupError(
                "no run found in the DHT to join; start one with --task (and optionally --config), "
                "or pass --run-id"
            )
        run_id = runs[0]
    doc = await fetch_run_config_async(dht, run_id)
    if doc is not None:
        try:
            remote = from_dict(RunConfig, doc)
        except ConfigError as exc:
            raise SetupError(f"the run config published for {run_id!r} is invalid: {exc}") from exc
        if config is not None and to_dict(config) != doc and config.run_id == run_id:
            log.warning("run %s already exists; using its published config, not the local one", run_id)
        return remote, False
    if config is None:
        if settings.run_id is not None:
            raise SetupError(f"run {settings.run_id!r} is not published in the DHT; start it with --task")
        config = RunConfig()
    if config.run_id != run_id:
        config = from_dict(RunConfig, {**to_dict(config), "run_id": run_id})
    await publish_run_config_async(dht, run_id, to_dict(config), ttl=3600.0)
    log.info("published the config of new run %s", run_id)
    return config, True


class PeerRuntime:
    """One peer. See the module docstring for the life cycle."""

    def __init__(self, settings: PeerSettings, config: RunConfig, identity: Identity, dht: Any) -> None:
        self.settings = settings
        self.config = config
        self.identity = identity
        self.dht = dht
        self.peer_id = identity.peer_id
        self.server: PeerServer | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.summary = RunSummary(self.peer_id, config.run_id)
        self.metrics = PeerMetrics(self.peer_id, config.run_id)
        self._peers_seen: set[str] = set()
        self._last_loss: float | None = None
        self._closed = False
        self.stop_event = asyncio.Event()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    async def create(cls, settings: PeerSettings, config: RunConfig | None = None) -> PeerRuntime:
        identity = (
            Identity.load_or_create(settings.identity_path) if settings.identity_path else Identity.generate()
        )
        try:
            dht = await start_dht_async(
                settings.initial_peers,
                host=settings.dht_host,
                port=settings.dht_port,
                client_mode=settings.client_mode,
            )
        except DHTError as exc:
            raise SetupError(str(exc)) from exc
        try:
            run_config, _created = await _resolve_config(dht, settings, config)
            self = cls(settings, run_config, identity, dht)
            await self._build()
            return self
        except BaseException:
            shutdown_dht(dht)
            raise

    async def _build(self) -> None:
        cfg, s = self.config, self.settings
        device = select_device(s.device)
        self.task = get_task(cfg.task.name, device=device, **cfg.task.overrides)
        shard = (
            s.data_shard
            if s.data_shard is not None
            else int(self.peer_id.encode().hex(), 16) % s.num_data_shards
        )
        model = self.task.make_model(cfg.seed)
        self.trainer = LocalTrainer(
            self.task,
            model,
            self.task.batches(shard, max(s.num_data_shards, shard + 1), cfg.inner.batch_size, cfg.seed),
            local_steps=cfg.strategy.local_steps,
            inner=cfg.inner.optimizer,
            inner_lr=cfg.inner.lr,
            inner_weight_decay=cfg.inner.weight_decay,
            batch_size=cfg.inner.batch_size,
        )
        self.state = OuterState.create(self.trainer.get_flat())
        self.strategy = make_strategy(cfg.strategy)
        policy = AdmissionPolicy(swarm_key=s.swarm_key)
        self.hub = ExchangeHub(
            self.identity, cfg.run_id, config=HubConfig(max_pull_wait_s=cfg.rounds.exchange_timeout)
        )
        endpoint = ""
        if not s.client_mode:
            self.server = await PeerServer.start(
                f"{s.host}:{s.port}",
                identity=self.identity,
                health=lambda: HealthInfo(run_id=cfg.run_id, round=self.state.round),
            )
            host = s.advertise_host or ("127.0.0.1" if s.host in ("0.0.0.0", "::", "[::]") else s.host)
            endpoint = f"{host}:{self.server.port}"
        self.info = peer_info(
            self.identity, endpoint=endpoint, client_mode=s.client_mode, bandwidth_mbps=s.bandwidth_mbps
        )
        self.registry = SwarmRegistry(self.dht, cfg.run_id, ttl=s.peer_ttl)
        self.matchmaker = Matchmaker(
            self.dht,
            self.identity,
            cfg.run_id,
            self.info,
            total_numel=self.state.anchor.numel(),
            config=MatchmakingConfig(
                group_size=cfg.rounds.group_size,
                timeout=cfg.rounds.matchmaking_timeout,
                exchange_timeout=cfg.rounds.exchange_timeout,
            ),
            policy=policy,
            channels=self.hub.channels,
            registry=self.registry,
        )
        self.state_service = StateService(self.identity, self.info, cfg.run_id, to_dict(cfg), policy=policy)
        if self.server is not None:
            self.server.exchange = self.hub
            self.server.groups = self.matchmaker
            self.server.state = self.state_service
        self.engine = RoundEngine(
            self.strategy,
            self.state,
            self.hub,
            self.matchmaker,
            matchmaking_timeout=cfg.rounds.matchmaking_timeout,
            exchange_timeout=cfg.rounds.exchange_timeout,
            momentum_sync=cfg.momentum_sync,
            averaging=cfg.averaging,
        )
        self.store = (
            CheckpointStore(s.checkpoint_dir, every_rounds=s.checkpoint_every) if s.checkpoint_dir else None
        )
        if s.metrics_port is not None:
            self.metrics_port: int | None = self.metrics.serve("127.0.0.1", s.metrics_port)
        else:
            self.metrics_port = None
        await self._enter()
        self.state_service.publish(self.state.round, self.state.anchor, self.state.momentum)
        await self._announce()
        self.tasks.append(asyncio.create_task(self._announce_loop()))

    async def _enter(self) -> None:
        """Resume from a checkpoint, or download the state from a live peer, or start fresh."""
        if self.settings.resume and self.store is not None:
            ckpt = self.store.load_latest(run_id=self.config.run_id)
            if ckpt is not None:
                self._restore(ckpt.round, ckpt.anchor, ckpt.momentum)
                self.trainer.set_flat(ckpt.params)
                if self.trainer.optimizer is not None and ckpt.optimizer_state:
                    self.trainer.optimizer.load_state_dict(ckpt.optimizer_state)
                self.summary.resumed_round = ckpt.round
                log.info("resumed from checkpoint of round %d", ckpt.round)
                return
            log.info("--resume: no checkpoint in %s yet, joining as a new peer", self.settings.checkpoint_dir)
        await self._catch_up(min_lead=1)

    def _restore(self, round: int, anchor: torch.Tensor, momentum: torch.Tensor) -> None:
        if anchor.numel() != self.state.anchor.numel():
            raise SetupError(
                f"the swarm's model has {anchor.numel()} parameters, this peer's task builds "
                f"{self.state.anchor.numel()}: task settings differ"
            )
        self.state.anchor.copy_(anchor.to(self.state.anchor.device))
        self.state.momentum.copy_(momentum.to(self.state.momentum.device))
        self.state.round = round
        self.trainer.set_flat(self.state.anchor)

    async def _catch_up(self, min_lead: int) -> bool:
        """Download the state from the most advanced live peer if it is ``min_lead`` rounds ahead."""
        try:
            others = [p for p in await self.registry.peers_async() if p.peer_id != self.peer_id]
        except DHTError as exc:
            log.warning("could not read the peer registry: %s", exc)
            return False
        ahead = sorted(
            (p for p in others if p.endpoint and p.round >= self.state.round + min_lead),
            key=lambda p: -p.round,
        )
        for rec in ahead[:3]:
            try:
                _received, snap = await download_state(
                    self.hub.channels,
                    rec.endpoint,
                    identity=self.identity,
                    peer_info=self.info,
                    run_id=self.config.run_id,
                    swarm_key=self.settings.swarm_key,
                    expect_peer_id=rec.peer_id,
                )
            except StateDownloadError as exc:
                log.warning("%s", exc)
                continue
            self._restore(snap.round, snap.anchor, snap.momentum)
            self.summary.joined_from = rec.peer_id
            log.info("downloaded the state of round %d from %s", snap.round, rec.peer_id[:8])
            return True
        return False

    # -- the loop ------------------------------------------------------------------------------

    def _record(self) -> PeerRecord:
        return PeerRecord(
            peer_id=self.peer_id,
            endpoint=self.info.endpoint,
            public_key=self.identity.public_key.hex(),
            version=__version__,
            throughput=self.summary.samples / max(self.summary.wall_s, 1e-9),
            bandwidth_mbps=self.settings.bandwidth_mbps,
            round=self.state.round,
            client_mode=self.settings.client_mode,
            loss=self._last_loss,
            bytes_sent=self.summary.bytes_sent,
            bytes_received=self.summary.bytes_received,
        )

    async def _announce(self) -> None:
        try:
            await self.registry.announce_async(self._record())
            await publish_run_config_async(self.dht, self.config.run_id, to_dict(self.config), ttl=3600.0)
        except DHTError as exc:
            log.warning("registry announce failed: %s", exc)

    async def _announce_loop(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.settings.announce_every)
            await self._announce()

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

        while more():
            if pending is None and summary.rounds_completed and await self._catch_up(min_lead=2):
                log.warning("fell behind the swarm; jumped to round %d", self.state.round)
                began = self.state.anchor.clone()
            local = await asyncio.to_thread(
                self.trainer.run_round,
                began if overlap else self.state.anchor,
                max_seconds=cfg.rounds.max_seconds,
            )
            if not overlap:
                report = await self.engine.sync(local.delta, local.samples)
                self.trainer.set_flat(self.state.anchor)
                await self._after_round(report, local, start, on_round)
                continue
            if pending is not None:
                assert pending_local is not None
                await self._after_round(await pending, pending_local, start, on_round)
            # Carry this round's progress (Δ = S − θ) over onto the newest anchor, then send it.
            began = self.state.anchor - local.delta
            self.trainer.set_flat(began)
            pending, pending_local = asyncio.create_task(self.engine.sync(local.delta, local.samples)), local
        if pending is not None:
            assert pending_local is not None
            await self._after_round(await pending, pending_local, start, on_round)
            self.trainer.set_flat(self.state.anchor)
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
        self.state_service.publish(self.state.round, self.state.anchor, self.state.momentum)
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
        self._update_metrics(report, local.loss, local.samples)
        if self.settings.eval_every and self.state.round % self.settings.eval_every == 0:
            self.metrics.set_val_loss(await asyncio.to_thread(self.evaluate))
        if self.store is not None and self.store.due(self.state.round):
            await asyncio.to_thread(self.save_checkpoint)
        if on_round is not None:
            on_round(report, summary)

    async def _wait_for_peers(self) -> None:
        want = self.settings.min_peers
        if want <= 1:
            return
        deadline = time.monotonic() + self.settings.start_timeout
        delay = 0.1
        while not self.stop_event.is_set():
            try:
                count = len(await self.registry.peers_async())
            except DHTError as exc:
                log.warning("registry read failed while waiting for peers: %s", exc)
                count = 0
            if count >= want:
                log.info("%d peers in the swarm, starting", count)
                return
            if time.monotonic() >= deadline:
                log.warning(
                    "only %d of %d peers after %.0fs; starting anyway",
                    count,
                    want,
                    self.settings.start_timeout,
                )
                return
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)
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

    # -- shutdown ------------------------------------------------------------------------------

    async def close(self) -> None:
        """Deregister, stop serving, shut the DHT (and its p2pd) down. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for task in self.tasks:
            task.cancel()
        try:
            await asyncio.wait_for(self.registry.withdraw_async(self.peer_id), timeout=5.0)
        except (DHTError, TimeoutError) as exc:
            log.warning("could not withdraw from the registry: %s", exc)
        await self.matchmaker.close()
        await self.hub.close()
        if self.server is not None:
            await self.server.stop(1.0)
        self.metrics.close()
        await asyncio.to_thread(shutdown_dht, self.dht)
