"""The peer that ``bench/fuzz.py`` attacks: a real PeerServer on 127.0.0.1 port 0, fully deterministic.

Everything derives from the seed: the identities (owner, two client-mode members, an outsider), the
swarm key (the swarm is closed: join and state requests need its HMAC proof), the vectors and so the
signed messages. The server runs on an event loop in a background thread and serves

* an :class:`ExchangeHub` with open slots of round :data:`ROUND1` (``update``: nobody pushed yet;
  ``momentum``: member 1 pushed, member 2 not yet), round :data:`ROUND0` having been exchanged
  legitimately and discarded (its messages are captured for replays);
* a :class:`StateService` with a published snapshot; a :class:`Matchmaker` on a real DHT node (not
  forming any round: well-formed joins are REJECTED in-band); a :class:`DialBack`.

:meth:`FuzzPeer.digest` hashes every piece of state an input could change; :meth:`finish_exchange`
completes round :data:`ROUND1` legitimately and checks the reduced results byte for byte against
the reference reduction of the known parts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lioncub.optim.codec import Encoded
from lioncub.optim.strategies import StrategyConfig, make_strategy
from lioncub.peer.dht import shutdown_dht, start_dht
from lioncub.peer.exchange import ExchangeHub, HubConfig
from lioncub.peer.groups import announce_group, deadline_ms_after, peer_info
from lioncub.peer.matchmaking import Matchmaker
from lioncub.peer.reachability import DialBack
from lioncub.peer.server import PeerServer
from lioncub.peer.state_service import StateService
from lioncub.protocol import (
    PROTOCOL_VERSION,
    AdmissionPolicy,
    GroupPlan,
    Identity,
    admission_proof,
    check_group_announcement,
    chunk_payload,
    grpc_message_options,
    sign_message,
)
from lioncub.protocol import lioncub_pb2 as pb

__all__ = ["NUMEL", "ROUND0", "ROUND1", "RUN", "SERVICE", "FuzzPeer", "identity_from_seed"]

RUN = "fuzz-run"
NUMEL = 4099  # one shard: a 513-byte sign1 payload whose last byte has 5 padding bits
CHUNK_BYTES = 200  # legit pushes travel as 3 chunks, so streams can be cut and reordered
ROUND0, ROUND1 = 5, 6
SERVICE = "/lioncub.v1.LioncubPeer/"
T = TypeVar("T")

#: Short waits: a push or pull for a slot that never opens answers within this instead of 10 s.
FUZZ_HUB = HubConfig(open_wait_s=0.02, max_pull_wait_s=0.02, retain_rounds=1, chunk_timeout_s=5.0)


def identity_from_seed(seed: int, name: str) -> Identity:
    """A deterministic Ed25519 identity (Ed25519 signatures are deterministic too)."""
    raw = hashlib.sha256(f"lioncub-fuzz/{seed}/{name}".encode()).digest()
    return Identity(Ed25519PrivateKey.from_private_bytes(raw))


class _Loop:
    """An event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-peer", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@dataclass
class Captured:
    """Legit messages, serialized, for building attacks (all deterministic given the seed)."""

    push0: dict[str, list[bytes]]  # round ROUND0 "update" pushes by member id (stale now)
    pull0: bytes  # member 1's pull of round ROUND0 (stale now)
    momentum1_m1: list[bytes]  # member 1's accepted push to ROUND1 "momentum" (a replay is a duplicate)
    update1: dict[str, list[pb.Chunk]]  # the ROUND1 "update" pushes, sent only by finish_exchange
    momentum1_m2: list[pb.Chunk]  # member 2's ROUND1 "momentum" push, sent only by finish_exchange
    pull1: dict[str, pb.PullResultRequest]  # valid ROUND1 pulls by member id, per exchange below
    join: pb.JoinGroupRequest  # a valid join request (member 1, round ROUND1)
    state: pb.StateRequest  # a valid state request (member 1)


class FuzzPeer:
    """See the module docstring. Make with :meth:`start`, end with :meth:`close`."""

    def __init__(self, seed: int, hub_config: HubConfig) -> None:
        self.seed = seed
        self.owner = identity_from_seed(seed, "owner")
        self.m1 = identity_from_seed(seed, "member-1")
        self.m2 = identity_from_seed(seed, "member-2")
        self.outsider = identity_from_seed(seed, "outsider")
        self.swarm_key = hashlib.sha256(f"lioncub-fuzz/{seed}/swarm-key".encode()).digest()
        self.policy = AdmissionPolicy(swarm_key=self.swarm_key)
        self.reducer = make_strategy(StrategyConfig())
        self.hub_config = hub_config
        gen = torch.Generator().manual_seed(seed)
        self.vectors = {
            name: torch.randn(NUMEL, generator=gen) for name in ("owner", "m1", "m2", "m1b", "m2b")
        }
        self.own_parts = {
            ex: self.reducer.encode(torch.randn(NUMEL, generator=gen)) for ex in ("update", "momentum")
        }
        self.dht = start_dht()  # before any thread: the DHT forks its process
        self._loop = _Loop()
        self.server, self.hub, self.state, self.matchmaker = self._loop.run(self._start())
        self.endpoint = self.server.endpoint
        self.channel = grpc.insecure_channel(self.endpoint, options=grpc_message_options())
        self.info = peer_info(self.owner, endpoint=self.endpoint)
        self.plans: dict[int, GroupPlan] = {}
        self.captured = self._prepare()

    @classmethod
    def start(cls, seed: int, hub_config: HubConfig = FUZZ_HUB) -> FuzzPeer:
        return cls(seed, hub_config)

    def close(self) -> None:
        self.channel.close()

        async def stop() -> None:
            await self.server.stop(None)
            await self.matchmaker.close()
            await self.hub.close()

        try:
            self._loop.run(stop())
        finally:
            self._loop.close()
            shutdown_dht(self.dht)

    def __enter__(self) -> FuzzPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run ``coro`` on the peer's event loop."""
        return self._loop.run(coro, timeout)

    async def _start(self) -> tuple[PeerServer, ExchangeHub, StateService, Matchmaker]:
        server = await PeerServer.start("127.0.0.1:0", identity=self.owner)
        info = peer_info(self.owner, endpoint=server.endpoint)
        hub = ExchangeHub(self.owner, RUN, config=self.hub_config)
        state = StateService(self.owner, info, RUN, {"task": "fuzz", "numel": NUMEL}, policy=self.policy)
        state.publish(ROUND0, self.vectors["owner"], -self.vectors["owner"])
        matchmaker = Matchmaker(self.dht, self.owner, RUN, info, total_numel=NUMEL, policy=self.policy)
        server.exchange, server.state, server.groups = hub, state, matchmaker
        server.reachability = DialBack(timeout=1.0)
        return server, hub, state, matchmaker

    # --- set-up ----------------------------------------------------------------------------------

    def plan(self, round: int) -> GroupPlan:
        if round not in self.plans:
            members = [self.info, *(peer_info(m, client_mode=True) for m in (self.m1, self.m2))]
            announcement = announce_group(
                self.owner, run_id=RUN, round=round, members=members, total_numel=NUMEL,
                deadline_ms=deadline_ms_after(3600),
            )  # fmt: skip
            self.plans[round] = check_group_announcement(
                announcement, run_id=RUN, round=round, self_id=self.owner.peer_id
            )
        return self.plans[round]

    def push_chunks(self, who: Identity, round: int, exchange: str, vec_name: str) -> list[pb.Chunk]:
        key = self.plan(round).key(pb.PURPOSE_PUSH, exchange, 0)
        return chunk_payload(key, self.reducer.encode(self.vectors[vec_name]), who, chunk_bytes=CHUNK_BYTES)

    def pull_request(
        self, who: Identity, round: int, exchange: str, wait_ms: int = 0
    ) -> pb.PullResultRequest:
        plan = self.plan(round)
        request = pb.PullResultRequest(
            protocol_version=PROTOCOL_VERSION, run_id=RUN, round=round, group_id=plan.group_id,
            exchange=exchange, shard_index=0, requester_id=who.peer_id, wait_ms=wait_ms,
        )  # fmt: skip
        sign_message(request, who)
        return request

    def admission(
        self, who: Identity, timestamp_ms: int, nonce: bytes, key: bytes | None = None
    ) -> pb.Admission:
        proof = admission_proof(
            key or self.swarm_key, run_id=RUN, peer_id=who.peer_id, public_key=who.public_key,
            timestamp_ms=timestamp_ms, nonce=nonce,
        )  # fmt: skip
        return pb.Admission(timestamp_ms=timestamp_ms, nonce=nonce, swarm_proof=proof)

    def _open_round(self, round: int) -> None:
        plan = self.plan(round)

        async def open_slots() -> None:
            for exchange, part in self.own_parts.items():
                self.hub.open_slot(plan, exchange, 0, self.reducer, part, 1)

        self.run(open_slots())

    def push(self, chunks: list[pb.Chunk] | list[bytes]) -> pb.PushAck:
        raws = [c if isinstance(c, bytes) else c.SerializeToString() for c in chunks]
        reply = self.channel.stream_unary(SERVICE + "PushShard")(iter(raws), timeout=10)
        return pb.PushAck.FromString(reply)

    def pull(self, request: pb.PullResultRequest) -> bytes:
        """The reduced payload a member receives (chunk data joined)."""
        raw = self.channel.unary_stream(SERVICE + "PullResult")(request.SerializeToString(), timeout=10)
        return b"".join(pb.Chunk.FromString(r).data for r in raw)

    def _prepare(self) -> Captured:
        # Round 0: a whole legit exchange, captured; then round 1 discards it.
        self._open_round(ROUND0)
        push0 = {
            m.peer_id: self.push_chunks(m, ROUND0, "update", v) for m, v in ((self.m1, "m1"), (self.m2, "m2"))
        }
        for chunks in push0.values():
            self.push(chunks)
        pull0 = self.pull_request(self.m1, ROUND0, "update", wait_ms=5000)
        self.pull(pull0)
        self._open_round(ROUND1)
        momentum1_m1 = self.push_chunks(self.m1, ROUND1, "momentum", "m1b")
        self.push(momentum1_m1)
        nonce = hashlib.sha256(f"{self.seed}/nonce".encode()).digest()[:16]
        now_ms = deadline_ms_after(0)
        join = pb.JoinGroupRequest(
            protocol_version=PROTOCOL_VERSION, run_id=RUN, round=ROUND1, matchmaking_key=f"{RUN}.round{ROUND1}.ready",
            peer=peer_info(self.m1, client_mode=True), admission=self.admission(self.m1, now_ms, nonce), weight=1.0,
        )  # fmt: skip
        sign_message(join, self.m1)
        state = pb.StateRequest(
            protocol_version=PROTOCOL_VERSION, run_id=RUN, peer=peer_info(self.m1, client_mode=True),
            admission=self.admission(self.m1, now_ms, nonce),
        )  # fmt: skip
        sign_message(state, self.m1)
        return Captured(
            push0={k: [c.SerializeToString() for c in v] for k, v in push0.items()},
            pull0=pull0.SerializeToString(),
            momentum1_m1=[c.SerializeToString() for c in momentum1_m1],
            update1={
                m.peer_id: self.push_chunks(m, ROUND1, "update", v)
                for m, v in ((self.m1, "m1"), (self.m2, "m2"))
            },
            momentum1_m2=self.push_chunks(self.m2, ROUND1, "momentum", "m2b"),
            pull1={
                m.peer_id: self.pull_request(m, ROUND1, "update", wait_ms=5000) for m in (self.m1, self.m2)
            },
            join=join,
            state=state,
        )

    # --- checks ----------------------------------------------------------------------------------

    def digest(self) -> dict[str, Any]:
        """Everything a message could change, as plain data (compare two with ==)."""

        async def collect() -> dict[str, Any]:
            slots = {}
            for key in sorted(
                self.hub.slot_keys, key=lambda k: (k.round, k.group_id, k.exchange, k.shard_index)
            ):
                slot = self.hub.slot(key)
                assert slot is not None
                result = b"".join(c.SerializeToString() for c in slot.chunks)
                slots[key.describe()] = {
                    "state": slot.state.value,
                    "received": sorted(slot.received),
                    "receiving": sorted(slot._receiving),
                    "parts": {
                        peer: [part.codec, part.numel, hashlib.sha256(part.to_bytes()).hexdigest(), weight]
                        for peer, (part, weight) in sorted(slot._parts.items())
                    },
                    "result": hashlib.sha256(result).hexdigest(),
                    "pulled": sorted(slot._pulled),
                }
            snap = self.state.snapshot
            assert snap is not None
            return {
                "hub_round": self.hub.round,
                "slots": slots,
                "hub_buffered_bytes": self.hub.buffered_bytes,
                "state_round": snap.round,
                "state_anchor": hashlib.sha256(snap.anchor.numpy().tobytes()).hexdigest(),
                "state_momentum": hashlib.sha256(snap.momentum.numpy().tobytes()).hexdigest(),
                "state_served": self.state.served,
                "state_active": self.state.active,
                "matchmaker_rounds": [
                    r for r in range(ROUND0 - 2, ROUND1 + 3) if self.matchmaker.round_status(r)
                ],
            }

        return self.run(collect())

    @staticmethod
    def digest_hash(digest: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(digest, sort_keys=True).encode()).hexdigest()

    def health(self) -> pb.HealthReply:
        raw = self.channel.unary_unary(SERVICE + "Health")(pb.HealthRequest().SerializeToString(), timeout=5)
        return pb.HealthReply.FromString(raw)

    def expected_result(self, exchange: str) -> Encoded:
        """The reduction of every member's legit part of ``exchange`` in round ROUND1 (plan order)."""
        vec = {"update": {"m1": "m1", "m2": "m2"}, "momentum": {"m1": "m1b", "m2": "m2b"}}[exchange]
        parts = {
            self.owner.peer_id: self.own_parts[exchange],
            self.m1.peer_id: self.reducer.encode(self.vectors[vec["m1"]]),
            self.m2.peer_id: self.reducer.encode(self.vectors[vec["m2"]]),
        }
        order = list(self.plan(ROUND1).members)
        return self.reducer.reduce([parts[p] for p in order], [1] * len(order))

    def finish_exchange(self) -> dict[str, bool]:
        """Complete round ROUND1 with the legit pushes; True per exchange whose result is exact."""
        ok = {}
        pushes = {"update": list(self.captured.update1.values()), "momentum": [self.captured.momentum1_m2]}
        for exchange, streams in pushes.items():
            try:
                for chunks in streams:
                    self.push(chunks)
                want = self.expected_result(exchange).to_bytes()
                got = [
                    self.pull(self.pull_request(m, ROUND1, exchange, wait_ms=5000))
                    for m in (self.m1, self.m2)
                ]
            except grpc.RpcError:
                ok[exchange] = False
            else:
                ok[exchange] = all(g == want for g in got)
        return ok
