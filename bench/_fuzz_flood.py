"""Memory flood: concurrent oversized, stalled and trickling push streams against one live peer.

A :class:`~lioncub.peer.server.PeerServer` with an :class:`~lioncub.peer.exchange.ExchangeHub`
(buffer budget ``budget_mib``, chunk timeout ``chunk_timeout_s``) owns the only shard of two
exchanges of a group with ``members`` client-mode members; each shard payload is 1 MiB (sign1). At
once it receives

* ``oversized`` streams whose first message is over ``MAX_MESSAGE_BYTES`` (gRPC refuses it unread);
* ``outsiders`` streams of one full 1 MiB chunk signed by a key outside the group;
* from every member, to both exchanges, a legit stream that stalls after its first chunk (slowloris)
  or trickles its chunks (one per ``chunk_timeout_s / 2``, so it overruns ``max_push_s``).

Every flood call must end with an error status, the hub's accounted push bytes must never exceed
``unverified + max(budget, one payload)`` (:attr:`ExchangeHub.peak_buffered_bytes`, running maxima,
not samples) and be 0 afterwards, and the same members' legit pushes, all sent at once (8 MiB into a
4 MiB budget: flow control makes them take turns), must then reduce to exactly the reference result.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import psutil
import torch

from bench._fuzz_peer import SERVICE, _Loop, identity_from_seed
from lioncub.optim.strategies import StrategyConfig, make_strategy
from lioncub.peer.exchange import ExchangeHub, HubConfig
from lioncub.peer.groups import announce_group, deadline_ms_after, peer_info
from lioncub.peer.server import PeerServer
from lioncub.protocol import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    GroupPlan,
    check_group_announcement,
    chunk_payload,
    grpc_message_options,
    sign_chunk,
    sign_message,
)
from lioncub.protocol import lioncub_pb2 as pb

__all__ = ["run_flood"]

RUN = "flood-run"
ROUND = 1
EXCHANGES = ("update", "momentum")
_REFUSED = {"RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_ARGUMENT"}


def _status(future: grpc.Future) -> str:
    try:
        future.result()
    except grpc.RpcError as exc:
        return str(exc.code().name)  # type: ignore[attr-defined]
    return "OK"


def run_flood(
    seed: int = 0,
    *,
    members: int = 8,
    numel: int = 8 << 20,
    budget_mib: int = 4,
    unverified_mib: int = 2,
    chunk_bytes: int = 64 << 10,
    chunk_timeout_s: float = 1.0,
    oversized: int = 16,
    outsiders: int = 16,
) -> dict[str, Any]:
    """Run the flood (see the module docstring); return the measurements and ``passed``."""
    owner = identity_from_seed(seed, "flood-owner")
    mems = [identity_from_seed(seed, f"flood-member-{i}") for i in range(members)]
    outsider = identity_from_seed(seed, "flood-outsider")
    reducer = make_strategy(StrategyConfig())
    gen = torch.Generator().manual_seed(seed)
    own = {ex: reducer.encode(torch.randn(numel, generator=gen)) for ex in EXCHANGES}
    theirs = {
        (m.peer_id, ex): reducer.encode(torch.randn(numel, generator=gen)) for m in mems for ex in EXCHANGES
    }
    config = HubConfig(
        retain_rounds=1, open_wait_s=0.05, max_pull_wait_s=30.0, max_buffered_bytes=budget_mib << 20,
        max_unverified_bytes=unverified_mib << 20, chunk_timeout_s=chunk_timeout_s, max_push_s=4 * chunk_timeout_s,
    )  # fmt: skip
    loop = _Loop()

    async def start() -> tuple[PeerServer, ExchangeHub, GroupPlan]:
        server = await PeerServer.start("127.0.0.1:0", identity=owner)
        hub = ExchangeHub(owner, RUN, config=config)
        server.exchange = hub
        infos = [peer_info(owner, endpoint=server.endpoint), *(peer_info(m, client_mode=True) for m in mems)]
        announcement = announce_group(
            owner,
            run_id=RUN,
            round=ROUND,
            members=infos,
            total_numel=numel,
            deadline_ms=deadline_ms_after(3600),
        )
        plan = check_group_announcement(announcement, run_id=RUN, round=ROUND, self_id=owner.peer_id)
        for ex in EXCHANGES:
            hub.open_slot(plan, ex, 0, reducer, own[ex], 1)
        return server, hub, plan

    release = threading.Event()

    async def stop() -> None:
        await server.stop(None)
        await hub.close()

    try:
        server, hub, plan = loop.run(start())
        channel = grpc.insecure_channel(server.endpoint, options=grpc_message_options())
        try:
            push = channel.stream_unary(SERVICE + "PushShard")
            chunks = {
                key: [c.SerializeToString() for c in chunk_payload(plan.key(pb.PURPOSE_PUSH, key[1], 0), enc, m, chunk_bytes=chunk_bytes)]
                for m in mems
                for key, enc in theirs.items()
                if key[0] == m.peer_id
            }  # fmt: skip

            def stalled(raws: list[bytes]) -> Iterator[bytes]:
                yield raws[0]
                release.wait()  # never sends the rest: the server must cut the stream off

            def trickle(raws: list[bytes]) -> Iterator[bytes]:
                for raw in raws:
                    yield raw
                    if release.wait(chunk_timeout_s / 2):  # pacing the attack, not synchronisation
                        return

            outsider_chunk = pb.Chunk(
                header=pb.Chunk.FromString(chunks[(mems[0].peer_id, "update")][0]).header
            )
            outsider_chunk.header.sender_id = outsider.peer_id
            outsider_chunk.data = bytes(1 << 20)
            sign_chunk(outsider_chunk, outsider)
            flood: list[tuple[str, grpc.Future]] = []
            process = psutil.Process()
            rss_before = process.memory_info().rss
            rss_peak = rss_before
            timeout = 10 * chunk_timeout_s + 30
            for i, raws in enumerate(chunks.values()):
                kind, it = ("stalled", stalled(raws)) if i % 2 == 0 else ("trickle", trickle(raws))
                flood.append((kind, push.future(it, timeout=timeout)))
            for _ in range(oversized):
                flood.append(
                    ("oversized", push.future(iter([bytes(MAX_MESSAGE_BYTES + 1)]), timeout=timeout))
                )
            for _ in range(outsiders):
                flood.append(
                    ("outsider", push.future(iter([outsider_chunk.SerializeToString()]), timeout=timeout))
                )
            pending = [f for _, f in flood]
            while not all(f.done() for f in pending):  # sampling RSS while the flood runs
                rss_peak = max(rss_peak, process.memory_info().rss)
                threading.Event().wait(0.02)
            release.set()
            statuses: dict[str, dict[str, int]] = {}
            for kind, future in flood:
                code = _status(future)
                statuses.setdefault(kind, {}).setdefault(code, 0)
                statuses[kind][code] += 1
            peak_during_flood = hub.peak_buffered_bytes
            buffered_after_flood = hub.buffered_bytes

            # The same members' legit pushes, all at once, then the reduced results.
            with ThreadPoolExecutor(max_workers=2 * members) as pool:
                legit = list(
                    pool.map(lambda raws: _status(push.future(iter(raws), timeout=60)), chunks.values())
                )
            exact = {ex: False for ex in EXCHANGES}
            for ex in EXCHANGES if all(code == "OK" for code in legit) else ():
                request = pb.PullResultRequest(
                    protocol_version=PROTOCOL_VERSION, run_id=RUN, round=ROUND, group_id=plan.group_id, exchange=ex,
                    shard_index=0, requester_id=mems[0].peer_id, wait_ms=30_000,
                )  # fmt: skip
                sign_message(request, mems[0])
                got = b"".join(
                    pb.Chunk.FromString(r).data
                    for r in channel.unary_stream(SERVICE + "PullResult")(
                        request.SerializeToString(), timeout=60
                    )
                )
                parts = {owner.peer_id: own[ex], **{m.peer_id: theirs[(m.peer_id, ex)] for m in mems}}
                want = reducer.reduce([parts[p] for p in plan.members], [1] * len(plan.members))
                exact[ex] = got == want.to_bytes()
            rss_after = process.memory_info().rss
        finally:
            release.set()  # no stalled stream left waiting
            channel.close()
            loop.run(stop())
    finally:
        loop.close()
    payload = (numel + 7) // 8
    bound = (unverified_mib << 20) + max(budget_mib << 20, payload)
    flood_refused = all(code in _REFUSED for per in statuses.values() for code in per)
    report = {
        "members": members,
        "payload_bytes": payload,
        "streams": {"stalled_or_trickle": len(chunks), "oversized": oversized, "outsiders": outsiders},
        "statuses": statuses,
        "buffer_limit_bytes": budget_mib << 20,
        "unverified_limit_bytes": unverified_mib << 20,
        "buffer_bound_bytes": bound,
        "hub_peak_buffered_bytes_flood": peak_during_flood,
        "hub_buffered_bytes_after_flood": buffered_after_flood,
        "hub_peak_buffered_bytes_total": hub.peak_buffered_bytes,
        "legit_pushes": {code: legit.count(code) for code in sorted(set(legit))},
        "exchange_after_exact": exact,
        "rss_mib_before": round(rss_before / 2**20, 1),
        "rss_mib_peak_sampled": round(rss_peak / 2**20, 1),
        "rss_mib_growth_peak": round((rss_peak - rss_before) / 2**20, 1),
        "rss_mib_after": round(rss_after / 2**20, 1),
    }
    report["passed"] = bool(
        flood_refused
        and peak_during_flood <= bound
        and hub.peak_buffered_bytes <= bound
        and buffered_after_flood == 0
        and all(code == "OK" for code in legit)
        and all(exact.values())
    )
    return report
