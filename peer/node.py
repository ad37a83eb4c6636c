"""The network side of one peer, whoever drives its local steps (the CLI runtime or a user's loop).

A :class:`PeerNode` owns the identity, the DHT node, the run config, the gRPC server with its
exchange / matchmaking / state-download handlers, the registry entry and the round engine. Create
with ``await PeerNode.create(settings, config)``, then ``await node.start(state, strategy)``,
always ``await node.close()``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from lioncub.optim.strategies import OuterState, SyncStrategy
from lioncub.protocol import AdmissionPolicy, Identity
from lioncub.protocol import lioncub_pb2 as pb

from .adversary import make_adversary
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
from .faults import FaultInjector, FaultyMatchmaker
from .groups import peer_info
from .matchmaking import Matchmaker, MatchmakingConfig
from .reachability import DialBack, probe_reachability
from .rounds import RoundEngine
from .server import HealthInfo, PeerServer
from .state_service import Snapshot, StateDownloadError, StateService, download_state

__all__ = ["PeerNode", "PeerSettings", "SetupError"]

log = logging.getLogger(__name__)

_CONFIG_TTL = 3600.0
#: Peers asked for their round (Health RPC) when this one suspects it fell behind, and how long each may take.
_ASK_AT_MOST = 4
_ASK_TIMEOUT_S = 1.5
_ASK_EVERY_S = 1.0


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
        dht_host, dht_port: where the DHT node listens.
        client_mode: accept no connections (behind NAT); own no shard.
        reachability_check: before going live, ask up to three reachable peers to dial this
            peer's server back (:mod:`lioncub.peer.reachability`); when none can, switch to
            client mode by itself. Ignored with ``client_mode``.
        identity_path: Ed25519 key file (created 0600 if missing); None = a fresh key.
        checkpoint_dir, checkpoint_every: periodic atomic checkpoints (None = off).
        resume: start from the newest good checkpoint in ``checkpoint_dir``.
        metrics_port: serve Prometheus metrics on ``metrics_host``:port (None = off, 0 = any port).
        metrics_host: the address the metrics exporter binds (``0.0.0.0`` to be scraped from outside).
        bandwidth_mbps: upload bandwidth to report (sizes this peer's shard).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``.
        data_shard, num_data_shards: which slice of the data this peer reads.
        eval_every, eval_batches: validation loss every N rounds (and at the start and the end).
        announce_every, peer_ttl: how often the registry entry is refreshed and how long it lives.
        swarm_key: shared secret for a closed swarm (None = open).
        min_peers, start_timeout: before the first round, wait up to ``start_timeout`` seconds
            until this many peers (this one included) are in the registry.
        faults: TEST-ONLY fault injection specs (:mod:`lioncub.peer.faults`, e.g. ``kill@round=3``):
            the peer crashes, cuts its link or slows itself down on purpose. Empty in real swarms.
        adversary: TEST-ONLY: make this peer Byzantine, corrupting what it sends (a mode of
            :data:`lioncub.peer.adversary.ADVERSARY_MODES`); None = an honest peer.
    """

    initial_peers: tuple[str, ...] = ()
    run_id: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    advertise_host: str | None = None
    dht_host: str = "127.0.0.1"
    dht_port: int = 0
    client_mode: bool = False
    reachability_check: bool = True
    identity_path: Path | None = None
    checkpoint_dir: Path | None = None
    checkpoint_every: int = 10
    resume: bool = False
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
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
    faults: tuple[str, ...] = ()
    adversary: str | None = None


async def _resolve_config(
    dht: Any, settings: PeerSettings, config: RunConfig | None
) -> tuple[RunConfig, bool]:
    """The run to take part in: the one published in the DHT (then True), or ``config``, which is
    then published (False)."""
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
        return remote, True
    if config is None:
        if settings.run_id is not None:
            raise SetupError(f"run {settings.run_id!r} is not published in the DHT; start it with --task")
        config = RunConfig()
    if config.run_id != run_id:
        config = from_dict(RunConfig, {**to_dict(config), "run_id": run_id})
    await publish_run_config_async(dht, run_id, to_dict(config), ttl=_CONFIG_TTL)
    log.info("published the config of new run %s", run_id)
    return config, False


async def _start_dht(settings: PeerSettings, client_mode: bool, what: str = "") -> Any:
    """This peer's DHT node; a :class:`SetupError` (prefixed with ``what``) if it cannot start."""
    try:
        return await start_dht_async(
            settings.initial_peers, host=settings.dht_host, port=settings.dht_port, client_mode=client_mode
        )
    except DHTError as exc:
        raise SetupError(f"{what}{exc}") from exc


class PeerNode:
    """Identity, DHT, server and round engine of one peer. See the module docstring."""

    def __init__(self, settings: PeerSettings, config: RunConfig, identity: Identity, dht: Any) -> None:
        self.settings = settings
        self.config = config
        self.identity = identity
        self.dht = dht
        self.peer_id = identity.peer_id
        self.server: PeerServer | None = None
        #: Whether this peer takes part as a client (set, or detected by :meth:`start`).
        self.client_mode = settings.client_mode
        self.record_fn: Callable[[], dict[str, Any]] = dict
        #: Test-only fault injection (None unless ``settings.faults``).
        self.faults = FaultInjector.from_specs(settings.faults) if settings.faults else None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._next_ask = 0.0
        #: Whether the run's config was already published in the DHT (this peer did not start it).
        self.existing_run = False

    @classmethod
    async def create(cls, settings: PeerSettings, config: RunConfig | None = None) -> PeerNode:
        """Load the identity, join the DHT and settle the run config (publishing it if new)."""
        identity = (
            Identity.load_or_create(settings.identity_path) if settings.identity_path else Identity.generate()
        )
        dht = await _start_dht(settings, settings.client_mode)
        try:
            resolved, existing = await _resolve_config(dht, settings, config)
            node = cls(settings, resolved, identity, dht)
            node.existing_run = existing
            return node
        except BaseException:
            shutdown_dht(dht)
            raise

    async def start(self, state: OuterState, strategy: SyncStrategy) -> None:
        """Serve (unless in client mode) and build the matchmaker and the round engine for ``state``."""
        cfg, s = self.config, self.settings
        self.state = state
        policy = AdmissionPolicy(swarm_key=s.swarm_key)
        self.hub = ExchangeHub(
            self.identity, cfg.run_id, config=HubConfig(max_pull_wait_s=cfg.rounds.exchange_timeout)
        )
        if self.faults is not None:
            self.hub.channels = self.faults.channels()
        endpoint = ""
        self.registry = SwarmRegistry(self.dht, cfg.run_id, ttl=s.peer_ttl)
        if not self.client_mode:
            self.server = await PeerServer.start(
                f"{s.host}:{s.port}",
                identity=self.identity,
                health=lambda: HealthInfo(run_id=cfg.run_id, round=self.state.round),
            )
            self.server.reachability = DialBack()
            host = s.advertise_host or ("127.0.0.1" if s.host in ("0.0.0.0", "::", "[::]") else s.host)
            endpoint = f"{host}:{self.server.port}"
            if s.reachability_check and not await self._reachable(self.server.port):
                await self._become_client()
                endpoint = ""
        self.info = peer_info(
            self.identity, endpoint=endpoint, client_mode=self.client_mode, bandwidth_mbps=s.bandwidth_mbps
        )
        make = (
            Matchmaker if self.faults is None else functools.partial(FaultyMatchmaker, injector=self.faults)
        )
        self.matchmaker = make(
            self.dht,
            self.identity,
            cfg.run_id,
            self.info,
            total_numel=state.anchor.numel(),
            config=MatchmakingConfig(
                group_size=cfg.rounds.group_size,
                timeout=cfg.rounds.matchmaking_timeout,
                exchange_timeout=cfg.rounds.exchange_timeout,
            ),
            policy=policy,
            channels=self.hub.channels,
            registry=self.registry,
            current_round=lambda: self.state.round,
        )
        self.state_service = StateService(self.identity, self.info, cfg.run_id, to_dict(cfg), policy=policy)
        if self.server is not None:
            self.server.exchange = self.hub
            self.server.groups = self.matchmaker
            self.server.state = self.state_service
        if self.faults is not None:
            self.faults.attach(self.server)
        self.engine = RoundEngine(
            strategy,
            state,
            self.hub,
            self.matchmaker,
            matchmaking_timeout=cfg.rounds.matchmaking_timeout,
            exchange_timeout=cfg.rounds.exchange_timeout,
            momentum_sync=cfg.momentum_sync,
            averaging=cfg.averaging,
            adversary=make_adversary(s.adversary, seed=cfg.seed),
        )

    async def _reachable(self, port: int) -> bool:
        """False only when every reachable peer that answered failed to dial ``port`` back."""
        try:
            others = [
                p.endpoint
                for p in await self.registry.peers_async()
                if p.peer_id != self.peer_id and p.endpoint and not p.client_mode
            ]
        except DHTError as exc:
            log.warning("could not read the registry for a reachability check: %s", exc)
            return True
        if not others:
            log.info("no other reachable peer yet: assuming this one is reachable")
            return True
        verdict = await probe_reachability(others, port=port, peer_id=self.peer_id)
        if verdict.reachable is None:
            log.info("no peer answered the reachability check: assuming this one is reachable")
        elif verdict.reachable:
            log.info("reachable: a peer dialled back %s:%d", verdict.observed_host, port)
        else:
            reasons = "; ".join(f"{e}: {d}" for e, _, d in verdict.answers)
            log.warning("not reachable from the swarm (%s): switching to client mode", reasons)
        return verdict.reachable is not False

    async def _become_client(self) -> None:
        """Stop serving and rejoin the DHT as a client (it must not be asked to store records)."""
        assert self.server is not None
        await self.server.stop(None)
        self.server = None
        self.client_mode = True
        s = self.settings
        old, self.dht = self.dht, None
        await asyncio.to_thread(shutdown_dht, old)
        self.dht = await _start_dht(s, client_mode=True, what="could not rejoin the DHT in client mode: ")
        self.registry = SwarmRegistry(self.dht, self.config.run_id, ttl=s.peer_ttl)

    def go_live(self) -> None:
        """Offer the current state to joiners and start refreshing the registry entry."""
        self.publish_state()
        self._tasks.append(asyncio.create_task(self._announce_loop()))

    def publish_state(self) -> None:
        self.state_service.publish(self.state.round, self.state.anchor, self.state.momentum)

    def record(self) -> PeerRecord:
        extra = self.record_fn()
        return PeerRecord(
            peer_id=self.peer_id,
            endpoint=self.info.endpoint,
            public_key=self.identity.public_key.hex(),
            version=self.info.software_version,
            bandwidth_mbps=self.settings.bandwidth_mbps,
            round=self.state.round,
            client_mode=self.client_mode,
            throughput=float(extra.get("throughput", 0.0)),
            loss=extra.get("loss"),
            bytes_sent=int(extra.get("bytes_sent", 0)),
            bytes_received=int(extra.get("bytes_received", 0)),
        )

    async def announce(self) -> None:
        try:
            await self.registry.announce_async(self.record())
            await publish_run_config_async(
                self.dht, self.config.run_id, to_dict(self.config), ttl=_CONFIG_TTL
            )
        except DHTError as exc:
            log.warning("registry announce failed: %s", exc)

    async def _announce_loop(self) -> None:
        while not self._closed:
            await self.announce()
            await asyncio.sleep(self.settings.announce_every)

    async def peers_ahead(self, min_lead: int, *, ask: bool = False) -> list[PeerRecord]:
        """Reachable peers at least ``min_lead`` rounds ahead of this one, the most advanced first.

        A peer's round is the newest of its registry record (refreshed every ``announce_every``
        seconds), what it said when it last rejected this peer's join request and, with ``ask``,
        what its ``Health`` RPC says now: after a pause (a closed laptop lid, a swapped-out
        process) the registry this peer's DHT node returns can be several rounds stale.
        """
        try:
            others = [p for p in await self.registry.peers_async() if p.peer_id != self.peer_id]
        except DHTError as exc:
            log.debug("could not read the peer registry to compare rounds: %s", exc)
            return []

        def with_heard(records: list[PeerRecord]) -> list[PeerRecord]:
            heard = self.matchmaker.peers_ahead(self.state.round)
            return [dataclasses.replace(p, round=max(p.round, heard.get(p.peer_id, 0))) for p in records]

        others = with_heard(others)
        now = time.monotonic()
        if ask and now >= self._next_ask and not any(p.round >= self.state.round + min_lead for p in others):
            self._next_ask = now + _ASK_EVERY_S  # a dead peer's record may linger: never stall each round
            await self._ask_rounds([p for p in others if p.endpoint][:_ASK_AT_MOST])
            others = with_heard(others)
        return sorted(
            (p for p in others if p.endpoint and p.round >= self.state.round + min_lead),
            key=lambda p: -p.round,
        )

    async def _ask_rounds(self, records: list[PeerRecord]) -> None:
        """Ask each peer's ``Health`` for its round (at once, ``_ASK_TIMEOUT_S`` each); note the answers."""

        async def ask(rec: PeerRecord) -> None:
            try:
                reply = await self.hub.channels.stub(rec.endpoint).Health(
                    pb.HealthRequest(), timeout=_ASK_TIMEOUT_S
                )
            except (grpc.RpcError, ValueError) as exc:
                log.debug("Health of %s failed: %s", rec.peer_id[:8], exc)
                return
            if reply.peer_id == rec.peer_id and reply.run_id == self.config.run_id and reply.round < 2**63:
                self.matchmaker.note_round(rec.peer_id, reply.round)

        await asyncio.gather(*(ask(r) for r in records))

    async def fetch_ahead(self, min_lead: int) -> tuple[str, Snapshot] | None:
        """The state of the most advanced live peer, if it is at least ``min_lead`` rounds ahead."""
        for rec in (await self.peers_ahead(min_lead))[:3]:
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
            if snap.anchor.numel() != self.state.anchor.numel():
                raise SetupError(
                    f"the swarm's model has {snap.anchor.numel()} parameters, this peer's has "
                    f"{self.state.anchor.numel()}: task settings differ"
                )
            log.info("downloaded the state of round %d from %s", snap.round, rec.peer_id[:8])
            return rec.peer_id, snap
        return None

    def restore(self, round: int, anchor: Any, momentum: Any) -> None:
        """Adopt a snapshot (state download or checkpoint) as this peer's outer state."""
        self.state.anchor.copy_(anchor.to(self.state.anchor.device))
        self.state.momentum.copy_(momentum.to(self.state.momentum.device))
        self.state.round = round

    async def wait_for_peers(self, want: int, timeout: float, stop: asyncio.Event) -> int:
        """Wait until ``want`` peers are in the registry (bounded by ``timeout``); return the count."""
        deadline, delay, count = time.monotonic() + timeout, 0.1, 0
        while not stop.is_set():
            try:
                count = len(await self.registry.peers_async())
            except DHTError as exc:
                log.warning("registry read failed while waiting for peers: %s", exc)
            if count >= want or time.monotonic() >= deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        if count < want:
            log.warning("only %d of %d peers after %.0fs; starting anyway", count, want, timeout)
        return count

    async def close(self) -> None:
        """Deregister, stop serving, shut the DHT (and its p2pd) down. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self.faults is not None:
            self.faults.close()
        if hasattr(self, "registry"):
            try:
                await asyncio.wait_for(self.registry.withdraw_async(self.peer_id), timeout=5.0)
            except (DHTError, TimeoutError) as exc:
                log.warning("could not withdraw from the registry: %s", exc)
            await self.matchmaker.close()
            await self.hub.close()
        if self.server is not None:
            await self.server.stop(1.0)
        await asyncio.to_thread(shutdown_dht, self.dht)
