"""Garbage at every RPC of a live PeerServer: an error status (never INTERNAL), and the server stays up.

The server (with an exchange hub holding an open slot, and join / state handlers that run the
protocol's checks) runs on an event loop in a background thread for the whole module; hypothesis
examples call it synchronously, as raw bytes (identity serializers) or as random-but-well-formed
messages whose fields are sometimes the valid ones and sometimes correctly signed, so that they
get past the first checks.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bench._fuzz_peer import SERVICE, _Loop
from lioncub.optim.strategies import StrategyConfig, make_strategy
from lioncub.peer.exchange import ExchangeHub, HubConfig
from lioncub.peer.groups import announce_group, deadline_ms_after, peer_info
from lioncub.peer.server import CallInfo, PeerServer
from lioncub.protocol import (
    AdmissionPolicy,
    GroupPlan,
    Identity,
    check_group_announcement,
    check_join_request,
    check_state_request,
    grpc_message_options,
    make_admission,
    sign_chunk,
    sign_message,
    state_replies,
)
from lioncub.protocol import lioncub_pb2 as pb

pytestmark = pytest.mark.network

RUN = "run-fuzz"
NUMEL = 1000
UNARY_STREAM = ("JoinGroup", "PullResult", "DownloadState")
LOOP_TIMEOUT_S = 30.0
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


class _Groups:
    async def join_group(
        self, request: pb.JoinGroupRequest, call: CallInfo
    ) -> AsyncIterator[pb.JoinGroupReply]:
        check_join_request(request, run_id=RUN, round=1, policy=AdmissionPolicy())
        yield pb.JoinGroupReply(status=pb.JoinGroupReply.STATUS_REJECTED, reason="fuzz")


class _State:
    def __init__(self, identity: Identity, info: pb.PeerInfo) -> None:
        self.identity, self.info = identity, info

    async def download_state(self, request: pb.StateRequest, call: CallInfo) -> AsyncIterator[pb.StateReply]:
        check_state_request(request, run_id=RUN, policy=AdmissionPolicy())
        for reply in state_replies(
            self.identity, self.info, run_id=RUN, round=1, config_json="{}", tensors=[]
        ):
            yield reply


@dataclass
class Served:
    endpoint: str
    owner: Identity
    member: Identity
    channel: grpc.Channel
    hub: ExchangeHub
    loop: _Loop
    info: pb.PeerInfo
    plan: GroupPlan | None = None

    def open_round(self) -> GroupPlan:
        """Enter the next round with a fresh slot (so that a push accepted earlier is no duplicate)."""
        round = 1 if self.plan is None else self.plan.round + 1
        announcement = announce_group(
            self.owner,
            run_id=RUN,
            round=round,
            members=[self.info, peer_info(self.member, client_mode=True)],
            total_numel=NUMEL,
            deadline_ms=deadline_ms_after(3600),
        )
        plan = check_group_announcement(announcement, run_id=RUN, round=round, self_id=self.owner.peer_id)

        async def open_slot() -> None:
            self.hub.open_slot(plan, "update", 0, _REDUCER, _REDUCER.encode(torch.randn(NUMEL)), 1)

        self.loop.run(open_slot(), timeout=LOOP_TIMEOUT_S)
        self.plan = plan
        return plan


_REDUCER = make_strategy(StrategyConfig())


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    loop = _Loop()
    owner, member = Identity.generate(), Identity.generate()
    config = HubConfig(open_wait_s=0.02, max_pull_wait_s=0.02, retain_rounds=1)

    async def start() -> tuple[PeerServer, ExchangeHub]:
        server = await PeerServer.start(identity=owner)
        hub = ExchangeHub(owner, RUN, config=config)
        info = peer_info(owner, endpoint=server.endpoint)
        server.exchange, server.groups, server.state = hub, _Groups(), _State(owner, info)
        return server, hub

    server, hub = loop.run(start(), timeout=LOOP_TIMEOUT_S)
    channel = grpc.insecure_channel(server.endpoint, options=grpc_message_options())
    served = Served(
        server.endpoint, owner, member, channel, hub, loop, peer_info(owner, endpoint=server.endpoint)
    )
    served.open_round()
    try:
        yield served
    finally:
        channel.close()

        async def stop() -> None:
            await server.stop(None)
            await hub.close()

        loop.run(stop(), timeout=LOOP_TIMEOUT_S)
        loop.close()


def _code_unary(served: Served, method: str, raw: bytes) -> grpc.StatusCode:
    try:
        served.channel.unary_unary(SERVICE + method)(raw, timeout=5)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return, attr-defined]
    return grpc.StatusCode.OK


def _code_server_stream(served: Served, method: str, raw: bytes) -> grpc.StatusCode:
    try:
        for _ in served.channel.unary_stream(SERVICE + method)(raw, timeout=5):
            pass
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return, attr-defined]
    return grpc.StatusCode.OK


def _code_push(served: Served, raws: list[bytes]) -> grpc.StatusCode:
    try:
        served.channel.stream_unary(SERVICE + "PushShard")(iter(raws), timeout=5)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return, attr-defined]
    return grpc.StatusCode.OK


def _assert_alive(served: Served) -> None:
    reply = pb.HealthReply.FromString(
        served.channel.unary_unary(SERVICE + "Health")(pb.HealthRequest().SerializeToString(), timeout=5)
    )
    assert reply.alive and reply.peer_id == served.owner.peer_id


@settings(max_examples=40)
@given(method=st.sampled_from(["Health", *UNARY_STREAM]), raw=st.binary(max_size=300))
def test_random_bytes_at_unary_request_methods(served: Served, method: str, raw: bytes) -> None:
    code = (
        _code_unary(served, method, raw) if method == "Health" else _code_server_stream(served, method, raw)
    )
    assert code not in FORBIDDEN


@settings(max_examples=40)
@given(raws=st.lists(st.binary(max_size=200), max_size=4))
def test_random_bytes_at_push_shard(served: Served, raws: list[bytes]) -> None:
    assert _code_push(served, raws) not in FORBIDDEN


_TEXT = st.text(max_size=40)
_U32 = st.integers(0, 2**32 - 1)
_U64 = st.integers(0, 2**64 - 1)
_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
_PAYLOAD_BYTES = NUMEL // 8  # sign1

#: How a field of a chunk header may be broken (a few at a time; the rest stay valid).
_HEADER_MUTATIONS: dict[str, st.SearchStrategy[Any]] = {
    "protocol_version": _U32,
    "run_id": _TEXT,
    "round": st.one_of(st.integers(0, 3), _U64, st.just(10**6)),
    "group_id": _TEXT,
    "sender_id": _TEXT,
    "purpose": st.sampled_from([pb.PURPOSE_RESULT, pb.PURPOSE_STATE, 0, 77]),
    "exchange": st.one_of(st.sampled_from(["momentum", "params"]), _TEXT),
    "shard_index": st.one_of(st.integers(0, 2), _U32),
    "codec": st.sampled_from(["tern", "fp16", "int8", "pbit2", "counts3", "fp32", "sign2", "", "x" * 200]),
    "numel": st.one_of(st.integers(0, 2 * NUMEL), _U64),
    "payload_nbytes": st.one_of(st.integers(0, 2 * _PAYLOAD_BYTES), _U64),
    "payload_digest": st.binary(max_size=40),
    "chunk_total": st.one_of(st.integers(0, 5), _U32),
    "weight": st.one_of(_FLOAT, st.integers(0, 2**60).map(float)),
    "contributors": _U32,
}


@st.composite
def _chunks(draw: st.DrawFn, served: Served, plan: GroupPlan) -> list[bytes]:
    """A push that is valid but for a few broken fields, chunks or signatures."""
    payload = draw(st.binary(min_size=_PAYLOAD_BYTES, max_size=_PAYLOAD_BYTES))
    count = draw(st.integers(1, 3))
    fields: dict[str, Any] = {
        "protocol_version": 1,
        "run_id": RUN,
        "round": plan.round,
        "group_id": plan.group_id,
        "sender_id": served.member.peer_id,
        "purpose": pb.PURPOSE_PUSH,
        "exchange": "update",
        "shard_index": 0,
        "codec": "sign1",
        "numel": NUMEL,
        "payload_nbytes": _PAYLOAD_BYTES,
        "payload_digest": hashlib.sha256(payload).digest(),
        "chunk_total": count,
        "weight": 1.0,
        "contributors": 1,
    }
    for name in draw(st.sets(st.sampled_from(sorted(_HEADER_MUTATIONS)), max_size=3)):
        fields[name] = draw(_HEADER_MUTATIONS[name])
    header = pb.ChunkHeader(**fields)
    size = -(-len(payload) // count)
    pieces = [payload[i * size : (i + 1) * size] for i in range(count)]
    if draw(st.booleans()):  # break the pieces: drop, duplicate, reorder, flip or resize one
        pieces = draw(st.permutations(pieces))
        pieces = pieces[: draw(st.integers(0, len(pieces)))] + draw(
            st.lists(st.binary(max_size=200), max_size=2)
        )
    signed = draw(st.sampled_from([True, True, True, False]))
    raws = []
    for index, data in enumerate(pieces):
        header.chunk_index = draw(st.one_of(st.just(index), _U32))
        chunk = pb.Chunk(header=header, data=data)
        if signed:
            sign_chunk(chunk, served.member)
        else:
            chunk.signature = draw(st.binary(max_size=70))
        raws.append(chunk.SerializeToString())
    return raws


@settings(max_examples=80)
@given(data=st.data())
def test_well_formed_random_chunks_at_push_shard(served: Served, data: st.DataObject) -> None:
    plan = served.open_round()
    assert _code_push(served, data.draw(_chunks(served, plan))) not in FORBIDDEN


def _either(valid: Any, strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly the valid value, sometimes anything."""
    return st.one_of(st.just(valid), st.just(valid), st.just(valid), strategy)


@settings(max_examples=60)
@given(data=st.data())
def test_well_formed_random_requests(served: Served, data: st.DataObject) -> None:
    plan, member = served.open_round(), served.member
    draw = data.draw
    method = draw(st.sampled_from(UNARY_STREAM))
    request: pb.PullResultRequest | pb.JoinGroupRequest | pb.StateRequest
    info = pb.PeerInfo(
        peer_id=draw(_either(member.peer_id, _TEXT)),
        public_key=draw(_either(member.public_key, st.binary(max_size=40))),
        endpoint=draw(_either("", st.sampled_from(["127.0.0.1:1", "nohost", ":0", "[::1]:65536"]))),
        client_mode=draw(_either(True, st.booleans())),
        bandwidth_mbps=draw(_either(10.0, _FLOAT)),
    )
    if method == "PullResult":
        request = pb.PullResultRequest(
            protocol_version=draw(_either(1, _U32)),
            run_id=draw(_either(RUN, _TEXT)),
            round=draw(_either(plan.round, _U64)),
            group_id=draw(_either(plan.group_id, _TEXT)),
            exchange=draw(_either("update", _TEXT)),
            shard_index=draw(_either(0, _U32)),
            requester_id=draw(_either(member.peer_id, _TEXT)),
            wait_ms=draw(_U32),
        )
    elif method == "JoinGroup":
        request = pb.JoinGroupRequest(
            protocol_version=draw(_either(1, _U32)),
            run_id=draw(_either(RUN, _TEXT)),
            round=draw(_either(1, _U64)),
            matchmaking_key=draw(_either("mm-key", _TEXT)),
            peer=info,
            admission=make_admission(None, member, run_id=RUN),
            weight=draw(_either(1.0, _FLOAT)),
        )
    else:
        request = pb.StateRequest(
            protocol_version=draw(_either(1, _U32)),
            run_id=draw(_either(RUN, _TEXT)),
            peer=info,
            admission=make_admission(None, member, run_id=RUN),
        )
    if draw(st.sampled_from([True, True, False])):
        sign_message(request, member)
    else:
        request.signature = draw(st.binary(max_size=70))
    assert _code_server_stream(served, method, request.SerializeToString()) not in FORBIDDEN


def test_server_is_still_healthy_after_the_garbage(served: Served) -> None:
    _assert_alive(served)
    assert served.hub.round is not None and len(served.hub.slot_keys) == 1  # old rounds were dropped
