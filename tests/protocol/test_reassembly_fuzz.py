"""Garbage and mutated chunk streams into the Reassembler: only ProtocolErrors, never a wrong shard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lioncub.optim.codec import Codec
from lioncub.protocol import (
    Identity,
    ProtocolError,
    Reassembler,
    ShardExpectation,
    ShardKey,
    chunk_payload,
    sign_chunk,
)
from lioncub.protocol import lioncub_pb2 as pb

KEY = ShardKey("run-a", 7, "group-1", pb.PURPOSE_PUSH, "update", 2)
ALICE = Identity.generate()
BOB = Identity.generate()
SENDERS = {ALICE.peer_id: ALICE.public_key, BOB.peer_id: BOB.public_key}
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def near(value: int) -> st.SearchStrategy[int]:
    return st.one_of(st.just(value), st.integers(max(0, value - 2), value + 2), U32)


headers = st.fixed_dictionaries(
    {
        "protocol_version": near(1),
        "run_id": st.sampled_from(["run-a", "run-b", ""]) | st.text(max_size=200),
        "round": near(7),
        "group_id": st.sampled_from(["group-1", ""]) | st.text(max_size=20),
        "sender_id": st.sampled_from([ALICE.peer_id, BOB.peer_id, ""]) | st.text(max_size=40),
        "purpose": st.integers(0, 3),
        "exchange": st.sampled_from(["update", "momentum"]) | st.text(max_size=10),
        "shard_index": near(2),
        "codec": st.sampled_from(["sign1", "fp16", "fp32", "zzz", ""]) | st.text(max_size=40),
        "numel": st.one_of(st.integers(0, 100), U64),
        "payload_nbytes": st.one_of(st.integers(0, 400), U64),
        "payload_digest": st.binary(max_size=40),
        "chunk_index": near(0),
        "chunk_total": near(1),
        "weight": st.floats(allow_nan=True, allow_infinity=True),
        "contributors": U32,
    }
)
chunks = st.builds(
    lambda h, data, sig, signer: _make(h, data, sig, signer),
    headers,
    st.binary(max_size=300),
    st.binary(max_size=70),
    st.sampled_from([None, ALICE, BOB]),
)


def _make(header: dict[str, Any], data: bytes, signature: bytes, signer: Identity | None) -> pb.Chunk:
    chunk = pb.Chunk(header=pb.ChunkHeader(**header), data=data, signature=signature)
    if signer is not None:
        sign_chunk(chunk, signer)
    return chunk


def _reassembler(codec_lookup: Callable[[str], Codec], numel: int | None) -> Reassembler:
    return Reassembler(ShardExpectation(KEY, SENDERS, numel=numel), codec_lookup=codec_lookup)


@FUZZ
@given(stream=st.lists(chunks, min_size=1, max_size=6), numel=st.none() | st.integers(0, 100))
def test_garbage_raises_only_protocol_errors(
    codec_lookup: Callable[[str], Codec], stream: list[pb.Chunk], numel: int | None
) -> None:
    r = _reassembler(codec_lookup, numel)
    try:
        for chunk in stream:
            r.feed(chunk)
        r.finish()
    except ProtocolError:
        pass


HEADER_FIELDS = [f.name for f in pb.ChunkHeader.DESCRIPTOR.fields]
mutations = st.lists(
    st.tuples(
        st.sampled_from(["drop", "dup", "swap", "flip", "field", "field-resigned"]),
        st.integers(0, 10_000),
        st.sampled_from(HEADER_FIELDS),
        st.integers(0, 2**16),
    ),
    max_size=3,
)


@FUZZ
@given(
    numel=st.integers(0, 400),
    codec_name=st.sampled_from(["sign1", "fp16"]),
    chunk_bytes=st.integers(1, 64),
    ops=mutations,
)
def test_mutated_streams_yield_the_original_or_a_protocol_error(
    codec_lookup: Callable[[str], Codec], numel: int, codec_name: str, chunk_bytes: int, ops: list[Any]
) -> None:
    enc = codec_lookup(codec_name).encode(torch.linspace(-1, 1, numel))
    stream = chunk_payload(KEY, enc, ALICE, chunk_bytes=chunk_bytes)
    for op, pos, field, value in ops:
        if not stream:
            break
        i = pos % len(stream)
        c = pb.Chunk()
        c.CopyFrom(stream[i])
        if op == "drop":
            del stream[i]
            continue
        if op == "dup":
            stream.insert(i, c)
        elif op == "swap":
            j = (pos // 7) % len(stream)
            stream[i], stream[j] = stream[j], stream[i]
        elif op == "flip":
            if c.data:
                data = bytearray(c.data)
                data[value % len(data)] ^= 1 << (value % 8)
                c.data = bytes(data)
            stream[i] = c
        else:
            _set_field(c.header, field, value)
            if op == "field-resigned":
                sign_chunk(c, ALICE)
            stream[i] = c
    r = _reassembler(codec_lookup, numel)
    try:
        for chunk in stream:
            r.feed(chunk)
        out = r.finish()
    except ProtocolError:
        return
    assert (out.codec, out.numel) == (enc.codec, enc.numel)
    assert torch.equal(out.data, enc.data)


def _set_field(header: pb.ChunkHeader, field: str, value: int) -> None:
    if field == "codec":
        header.codec = ["sign1", "fp16", "fp32", "nope"][value % 4]
    elif field == "weight":
        header.weight = [float("nan"), -1.0, 2.0, float("inf")][value % 4]
    elif field in ("run_id", "group_id", "sender_id", "exchange"):
        setattr(header, field, str(value))
    elif field == "payload_digest":
        header.payload_digest = value.to_bytes(32, "big")
    else:
        setattr(header, field, value)
