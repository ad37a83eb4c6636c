from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import pytest
import torch

from lioncub.optim.codec import Codec
from lioncub.protocol import (
    AdmissionPolicy,
    BadSignature,
    ChunkOrderError,
    DigestMismatch,
    Identity,
    InvalidMessage,
    ReceivedState,
    TooLarge,
    check_state_request,
    make_admission,
    receive_state,
    sign_message,
    state_replies,
)
from lioncub.protocol import lioncub_pb2 as pb

Lookup = Callable[[str], Codec]
CONFIG = json.dumps({"task": "tiny", "lr": 0.001, "nested": {"a": [1, 2, 3]}})


def sender_info(identity: Identity) -> pb.PeerInfo:
    return pb.PeerInfo(peer_id=identity.peer_id, public_key=identity.public_key, endpoint="127.0.0.1:7000")


def replies(identity: Identity, codec_lookup: Lookup, config: str = CONFIG) -> list[pb.StateReply]:
    fp16 = codec_lookup("fp16")  # values exact in fp16
    tensors = [("anchor", fp16.encode(torch.arange(600.0))), ("outer_momentum", fp16.encode(torch.zeros(0)))]
    return list(
        state_replies(identity, sender_info(identity), run_id="run-a", round=41, config_json=config,
                      tensors=tensors, chunk_bytes=1000)
    )  # fmt: skip


def receive(items: Iterable[pb.StateReply], codec_lookup: Lookup, **kw: Any) -> ReceivedState:
    async def stream() -> AsyncIterator[pb.StateReply]:
        for item in items:
            yield item

    return asyncio.run(receive_state(stream(), run_id="run-a", codec_lookup=codec_lookup, **kw))


def test_state_round_trip(alice: Identity, codec_lookup: Lookup) -> None:
    items = replies(alice, codec_lookup)
    assert items[0].WhichOneof("body") == "manifest" and len(items) == 1 + 2 + 1
    state = receive(items, codec_lookup, sender_id=alice.peer_id)
    assert (state.sender_id, state.round, state.config["task"]) == (alice.peer_id, 41, "tiny")
    anchor = codec_lookup("fp16").decode(state.tensors["anchor"])
    assert torch.equal(anchor, torch.arange(600.0))
    assert state.tensors["outer_momentum"].numel == 0


def test_state_rejections(alice: Identity, bob: Identity, codec_lookup: Lookup) -> None:
    items = replies(alice, codec_lookup)
    with pytest.raises(ChunkOrderError, match="1 of 2"):
        receive(items[:-1], codec_lookup)
    with pytest.raises(ChunkOrderError):
        receive(items[:-2], codec_lookup)
    with pytest.raises(InvalidMessage, match="manifest"):
        receive(items[1:], codec_lookup)
    with pytest.raises(InvalidMessage, match="second manifest"):
        receive([items[0], items[0]], codec_lookup)
    with pytest.raises(ChunkOrderError, match="after its last"):
        receive([*items, items[-1]], codec_lookup)
    with pytest.raises(BadSignature, match="asked"):
        receive(items, codec_lookup, sender_id=bob.peer_id)
    tampered = [pb.StateReply(), *items[1:]]
    tampered[0].CopyFrom(items[0])
    tampered[0].manifest.round = 40
    with pytest.raises(BadSignature):
        receive(tampered, codec_lookup)
    resigned = [pb.StateReply(), *items[1:]]
    resigned[0].CopyFrom(items[0])
    resigned[0].manifest.tensors[0].payload_digest = b"\x01" * 32
    sign_message(resigned[0].manifest, alice)
    with pytest.raises(DigestMismatch):
        receive(resigned, codec_lookup)
    with pytest.raises(InvalidMessage, match="JSON object"):
        receive(replies(alice, codec_lookup, config="[1, 2]"), codec_lookup)
    with pytest.raises(TooLarge):
        receive(replies(alice, codec_lookup, config=json.dumps({"x": "y" * 300_000})), codec_lookup)


def test_state_request(alice: Identity, bob: Identity) -> None:
    swarm_key = b"s" * 32
    req = pb.StateRequest(
        protocol_version=1,
        run_id="run-a",
        peer=sender_info(bob),
        admission=make_admission(swarm_key, bob, run_id="run-a"),
    )
    sign_message(req, bob)
    check_state_request(req, run_id="run-a", policy=AdmissionPolicy(swarm_key=swarm_key))
    req.peer.endpoint = "10.0.0.9:1"
    with pytest.raises(BadSignature):
        check_state_request(req, run_id="run-a", policy=AdmissionPolicy(swarm_key=swarm_key))
