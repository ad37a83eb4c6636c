from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import pytest
import torch

from lioncub.optim.codec import Codec, Encoded
from lioncub.protocol import (
    MAX_CHUNK_BYTES,
    BadSignature,
    ChunkOrderError,
    DigestMismatch,
    FutureRound,
    Identity,
    InvalidMessage,
    InvalidPayload,
    NonFinitePayload,
    NotAMember,
    ProtocolError,
    Reassembler,
    ShardExpectation,
    ShardKey,
    SizeError,
    StaleRound,
    TooLarge,
    UnknownCodec,
    UnsupportedVersion,
    WrongRun,
    chunk_payload,
    receive_payload,
    sign_chunk,
)
from lioncub.protocol import lioncub_pb2 as pb

Lookup = Callable[[str], Codec]
KEY = ShardKey("run-a", 7, "group-1", pb.PURPOSE_PUSH, "update", 2)


def payload(codec: Codec, numel: int, seed: int = 0) -> Encoded:
    gen = torch.Generator().manual_seed(seed)
    return codec.encode(torch.randn(numel, generator=gen))


def expect(senders: Iterable[Identity], numel: int, key: ShardKey = KEY, **kw: Any) -> ShardExpectation:
    return ShardExpectation(key=key, senders={i.peer_id: i.public_key for i in senders}, numel=numel, **kw)


def feed_all(r: Reassembler, chunks: Iterable[pb.Chunk]) -> list[Encoded | None]:
    return [r.feed(c) for c in chunks]


def resigned(chunk: pb.Chunk, identity: Identity, data: bytes | None = None, **header: Any) -> pb.Chunk:
    """A copy of ``chunk`` with changed fields, validly signed by ``identity`` (a buggy or malicious sender)."""
    out = pb.Chunk()
    out.CopyFrom(chunk)
    for name, value in header.items():
        setattr(out.header, name, value)
    if data is not None:
        out.data = data
    sign_chunk(out, identity)
    return out


@pytest.mark.parametrize(
    ("numel", "chunk_bytes"), [(0, 64), (1, 64), (8 * 64, 64), (8 * 64 + 3, 64), (5000, 100)]
)
def test_round_trip_yields_only_after_last_chunk(
    alice: Identity, codec_lookup: Lookup, numel: int, chunk_bytes: int
) -> None:
    enc = payload(codec_lookup("sign1"), numel)
    chunks = chunk_payload(KEY, enc, alice, chunk_bytes=chunk_bytes, weight=3.5)
    assert len(chunks) == max(1, -(-enc.nbytes // chunk_bytes))
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    r = Reassembler(expect([alice], numel), codec_lookup=codec_lookup)
    results = feed_all(r, chunks)
    assert results[:-1] == [None] * (len(chunks) - 1)
    out = results[-1]
    assert out is not None and r.complete and r.sender_id == alice.peer_id
    assert (out.codec, out.numel) == (enc.codec, enc.numel)
    assert torch.equal(out.data, enc.data)


@pytest.mark.parametrize("with_zeros", [False, True])
def test_variable_size_codec_payloads(alice: Identity, codec_lookup: Lookup, with_zeros: bool) -> None:
    x = torch.tensor([1.0, -1.0, 0.0 if with_zeros else 1.0] * 100)
    enc = codec_lookup("tern").encode(x)
    out = feed_all(
        Reassembler(expect([alice], 300), codec_lookup=codec_lookup), chunk_payload(KEY, enc, alice)
    )[-1]
    assert out is not None and torch.equal(codec_lookup("tern").decode(out), codec_lookup("tern").decode(enc))


def test_default_chunks_are_at_most_one_mebibyte(alice: Identity, codec_lookup: Lookup) -> None:
    enc = payload(codec_lookup("fp16"), (MAX_CHUNK_BYTES // 2) * 2 + 10)
    chunks = chunk_payload(KEY, enc, alice)
    assert [len(c.data) for c in chunks] == [MAX_CHUNK_BYTES, MAX_CHUNK_BYTES, 20]
    out = feed_all(Reassembler(expect([alice], enc.numel), codec_lookup=codec_lookup), chunks)[-1]
    assert out is not None and torch.equal(out.data, enc.data)


@pytest.mark.parametrize(
    "field,value",
    [("round", 8), ("shard_index", 3), ("group_id", "group-2"), ("numel", 999), ("chunk_index", 1),
     ("payload_digest", b"\x00" * 32), ("purpose", pb.PURPOSE_RESULT), ("weight", 100.0)],
)  # fmt: skip
def test_tampered_header_fails_signature(
    alice: Identity, codec_lookup: Lookup, field: str, value: Any
) -> None:
    chunks = chunk_payload(KEY, payload(codec_lookup("sign1"), 1000), alice, chunk_bytes=50)
    setattr(chunks[0].header, field, value)
    with pytest.raises(BadSignature):
        Reassembler(expect([alice], 1000), codec_lookup=codec_lookup).feed(chunks[0])


def test_tampered_chunk_bytes_fail_signature(alice: Identity, codec_lookup: Lookup) -> None:
    chunks = chunk_payload(KEY, payload(codec_lookup("sign1"), 1000), alice, chunk_bytes=50)
    r = Reassembler(expect([alice], 1000), codec_lookup=codec_lookup)
    r.feed(chunks[0])
    corrupted = bytearray(chunks[1].data)
    corrupted[3] ^= 0x10
    chunks[1].data = bytes(corrupted)
    with pytest.raises(BadSignature):
        r.feed(chunks[1])


def test_signature_by_another_member_fails(alice: Identity, bob: Identity, codec_lookup: Lookup) -> None:
    (chunk,) = chunk_payload(KEY, payload(codec_lookup("sign1"), 100), alice)
    chunk.header.sender_id = bob.peer_id  # claims to be bob, signed by alice
    with pytest.raises(BadSignature):
        Reassembler(expect([alice, bob], 100), codec_lookup=codec_lookup).feed(chunk)


def test_replay_from_another_round_fails_the_round_check(alice: Identity, codec_lookup: Lookup) -> None:
    (chunk,) = chunk_payload(KEY, payload(codec_lookup("sign1"), 100), alice)
    later = ShardKey(KEY.run_id, KEY.round + 1, KEY.group_id, KEY.purpose, KEY.exchange, KEY.shard_index)
    with pytest.raises(StaleRound):
        Reassembler(expect([alice], 100, key=later), codec_lookup=codec_lookup).feed(chunk)
    earlier = ShardKey(KEY.run_id, KEY.round - 1, KEY.group_id, KEY.purpose, KEY.exchange, KEY.shard_index)
    with pytest.raises(FutureRound):
        Reassembler(expect([alice], 100, key=earlier), codec_lookup=codec_lookup).feed(chunk)
    other_run = ShardKey("run-b", KEY.round, KEY.group_id, KEY.purpose, KEY.exchange, KEY.shard_index)
    with pytest.raises(WrongRun):
        Reassembler(expect([alice], 100, key=other_run), codec_lookup=codec_lookup).feed(chunk)


def test_chunks_cannot_be_swapped_between_shards_or_groups(alice: Identity, codec_lookup: Lookup) -> None:
    sign1 = codec_lookup("sign1")
    key_b = ShardKey(KEY.run_id, KEY.round, KEY.group_id, KEY.purpose, KEY.exchange, KEY.shard_index + 1)
    key_g = ShardKey(KEY.run_id, KEY.round, "group-9", KEY.purpose, KEY.exchange, KEY.shard_index)
    key_m = ShardKey(KEY.run_id, KEY.round, KEY.group_id, KEY.purpose, "momentum", KEY.shard_index)
    key_r = ShardKey(KEY.run_id, KEY.round, KEY.group_id, pb.PURPOSE_RESULT, KEY.exchange, KEY.shard_index)
    a = chunk_payload(KEY, payload(sign1, 1000, seed=1), alice, chunk_bytes=50)
    for other in (key_b, key_g, key_m, key_r):
        foreign = chunk_payload(other, payload(sign1, 1000, seed=2), alice, chunk_bytes=50)
        with pytest.raises(InvalidMessage):  # as the first chunk: wrong routing fields
            Reassembler(expect([alice], 1000), codec_lookup=codec_lookup).feed(foreign[0])
        r = Reassembler(expect([alice], 1000), codec_lookup=codec_lookup)
        r.feed(a[0])
        with pytest.raises(InvalidMessage, match="differs"):  # mid-stream: header changed
            r.feed(foreign[1])


def test_same_shard_other_payload_cannot_be_spliced(alice: Identity, codec_lookup: Lookup) -> None:
    sign1 = codec_lookup("sign1")
    a = chunk_payload(KEY, payload(sign1, 1000, seed=1), alice, chunk_bytes=50)
    b = chunk_payload(KEY, payload(sign1, 1000, seed=2), alice, chunk_bytes=50)
    r = Reassembler(expect([alice], 1000), codec_lookup=codec_lookup)
    r.feed(a[0])
    with pytest.raises(InvalidMessage, match="differs"):  # payload digest differs
        r.feed(b[1])


def test_out_of_order_missing_duplicate_and_extra(alice: Identity, codec_lookup: Lookup) -> None:
    chunks = chunk_payload(KEY, payload(codec_lookup("sign1"), 1000), alice, chunk_bytes=30)

    def fresh() -> Reassembler:
        return Reassembler(expect([alice], 1000), codec_lookup=codec_lookup)

    with pytest.raises(ChunkOrderError, match="out of order"):
        feed_all(fresh(), [chunks[1], chunks[0]])
    with pytest.raises(ChunkOrderError, match="missing"):
        feed_all(fresh(), [chunks[0], chunks[2]])
    with pytest.raises(ChunkOrderError, match="duplicate"):
        feed_all(fresh(), [chunks[0], chunks[1], chunks[1]])
    r = fresh()
    feed_all(r, chunks[:-1])
    assert not r.complete
    with pytest.raises(ChunkOrderError, match="missing"):
        r.finish()
    r = fresh()
    assert feed_all(r, chunks)[-1] is not None
    with pytest.raises(ChunkOrderError, match="after the last"):
        r.feed(chunks[0])


def test_failed_stream_refuses_everything_after(
    alice: Identity, mallory: Identity, codec_lookup: Lookup
) -> None:
    chunks = chunk_payload(KEY, payload(codec_lookup("sign1"), 1000), alice, chunk_bytes=30)
    r = Reassembler(expect([alice], 1000), codec_lookup=codec_lookup)
    r.feed(chunks[0])
    with pytest.raises(ChunkOrderError):
        r.feed(chunks[2])
    with pytest.raises(InvalidMessage, match="already failed"):
        r.feed(chunks[1])
    with pytest.raises(InvalidMessage):
        r.finish()
    assert r.received_bytes == 0  # the partial buffer is dropped


def test_sizes(alice: Identity, codec_lookup: Lookup) -> None:
    sign1 = codec_lookup("sign1")
    (chunk,) = chunk_payload(KEY, payload(sign1, 100), alice)

    def first(c: pb.Chunk, numel: int | None = 100, **kw: Any) -> None:
        Reassembler(
            ShardExpectation(KEY, {alice.peer_id: alice.public_key}, numel, **kw), codec_lookup=codec_lookup
        ).feed(c)

    with pytest.raises(SizeError, match="elements"):
        first(chunk, numel=101)
    with pytest.raises(SizeError, match="header says"):  # payload_nbytes not the codec's exact size
        first(resigned(chunk, alice, payload_nbytes=12))
    with pytest.raises(SizeError, match="limit"):  # numel absurdly large
        first(resigned(chunk, alice, numel=1 << 50), numel=None)
    with pytest.raises(TooLarge):
        first(chunk, max_payload_bytes=10)
    with pytest.raises(TooLarge):
        first(resigned(chunk, alice, data=b"\x00" * (MAX_CHUNK_BYTES + 1)))
    with pytest.raises(SizeError, match="truncated"):
        first(resigned(chunk, alice, data=chunk.data[:-1]))
    with pytest.raises(SizeError, match="more than"):  # oversize: more bytes than announced
        first(resigned(chunk, alice, data=chunk.data + b"\x00"))
    with pytest.raises(SizeError, match="cannot carry"):
        first(resigned(chunk, alice, chunk_total=14))
    with pytest.raises(SizeError, match="cannot carry"):
        first(resigned(chunk, alice, chunk_total=0))


def test_chunk_leaving_no_bytes_for_announced_chunks(alice: Identity, codec_lookup: Lookup) -> None:
    chunks = chunk_payload(KEY, payload(codec_lookup("sign1"), 100), alice, chunk_bytes=5)
    whole = b"".join(c.data for c in chunks)
    bad = resigned(chunks[0], alice, data=whole)  # says chunk 0 of 3 but carries everything
    with pytest.raises(SizeError, match="leaves no bytes"):
        Reassembler(expect([alice], 100), codec_lookup=codec_lookup).feed(bad)


def test_digest_mismatch_is_detected_after_the_last_chunk(alice: Identity, codec_lookup: Lookup) -> None:
    chunks = chunk_payload(KEY, payload(codec_lookup("sign1"), 1000), alice, chunk_bytes=50)
    wrong = hashlib.sha256(b"something else").digest()
    forged = [resigned(c, alice, payload_digest=wrong) for c in chunks]
    r = Reassembler(expect([alice], 1000), codec_lookup=codec_lookup)
    with pytest.raises(DigestMismatch):
        feed_all(r, forged)
    assert not r.complete
    with pytest.raises(DigestMismatch):  # a digest pinned by a manifest is checked up front
        Reassembler(expect([alice], 1000, digest=wrong), codec_lookup=codec_lookup).feed(chunks[0])


def test_rejects_unknown_codec_version_and_sender(
    alice: Identity, mallory: Identity, codec_lookup: Lookup
) -> None:
    (chunk,) = chunk_payload(KEY, payload(codec_lookup("sign1"), 100), alice)
    with pytest.raises(UnknownCodec):
        Reassembler(expect([alice], 100), codec_lookup=codec_lookup).feed(
            resigned(chunk, alice, codec="zstd9")
        )
    with pytest.raises(UnknownCodec, match="not accepted"):
        Reassembler(expect([alice], 100, codecs=frozenset({"fp16"})), codec_lookup=codec_lookup).feed(chunk)
    with pytest.raises(UnsupportedVersion):
        Reassembler(expect([alice], 100), codec_lookup=codec_lookup).feed(
            resigned(chunk, alice, protocol_version=2)
        )
    with pytest.raises(NotAMember):
        Reassembler(expect([alice], 100), codec_lookup=codec_lookup).feed(
            resigned(chunk, mallory, sender_id=mallory.peer_id)
        )
    with pytest.raises(BadSignature, match="missing"):
        Reassembler(expect([alice], 100), codec_lookup=codec_lookup).feed(
            pb.Chunk(header=chunk.header, data=chunk.data)
        )
    with pytest.raises(InvalidMessage, match="no header"):
        Reassembler(expect([alice], 100), codec_lookup=codec_lookup).feed(pb.Chunk(data=b"x"))
    with pytest.raises(InvalidMessage, match="weight"):
        Reassembler(expect([alice], 100), codec_lookup=codec_lookup).feed(
            resigned(chunk, alice, weight=float("nan"))
        )


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_fp16_payload(alice: Identity, codec_lookup: Lookup, bad: float) -> None:
    enc = codec_lookup("fp16").encode(torch.ones(300))
    raw = enc.data.clone()
    raw.view(torch.float16)[123] = bad  # what a buggy or malicious sender could put on the wire
    chunks = chunk_payload(KEY, Encoded("fp16", 300, raw), alice, chunk_bytes=128)
    r = Reassembler(expect([alice], 300), codec_lookup=codec_lookup)
    with pytest.raises(InvalidPayload, match="NaN/Inf"):
        feed_all(r, chunks)
    assert not r.complete


def test_non_finite_decoded_values(alice: Identity, codec_lookup: Lookup) -> None:
    class LeakyFP16(Codec):  # a codec whose decoder lets NaN through
        spec = codec_lookup("fp16").spec

        def encoded_nbytes(self, numel: int) -> int:
            return 2 * numel

        def encode(self, x: torch.Tensor) -> Encoded:
            raise NotImplementedError

        def decode(self, enc: Encoded, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return enc.data.view(torch.float16).to(dtype)

    raw = torch.tensor([1.0, float("nan"), float("inf")], dtype=torch.float16).view(torch.uint8)
    chunks = chunk_payload(KEY, Encoded("fp16", 3, raw), alice)
    with pytest.raises(NonFinitePayload, match="2 NaN/Inf"):
        feed_all(Reassembler(expect([alice], 3), codec_lookup=lambda _: LeakyFP16()), chunks)


def test_payload_the_codec_rejects(alice: Identity, codec_lookup: Lookup) -> None:
    enc = codec_lookup("int8").encode(torch.linspace(-1, 1, 300))
    raw = enc.data.clone()
    raw[-1] = 0x80  # -128 is never produced by the int8 codec
    chunks = chunk_payload(KEY, Encoded("int8", 300, raw), alice)
    with pytest.raises(InvalidPayload, match="rejected by its codec"):
        feed_all(Reassembler(expect([alice], 300), codec_lookup=codec_lookup), chunks)


def test_receive_payload_routes_by_first_header(alice: Identity, codec_lookup: Lookup) -> None:
    enc = payload(codec_lookup("fp16"), 777)
    chunks = chunk_payload(KEY, enc, alice, chunk_bytes=100)
    seen: list[ShardKey] = []

    def route(header: pb.ChunkHeader) -> ShardExpectation:
        seen.append(ShardKey.of(header))
        return expect([alice], 777)

    async def stream(items: list[pb.Chunk]) -> AsyncIterator[pb.Chunk]:
        for item in items:
            yield item

    out, header = asyncio.run(receive_payload(stream(chunks), route, codec_lookup=codec_lookup))
    assert seen == [KEY] and header.sender_id == alice.peer_id
    assert torch.equal(out.data, enc.data)
    with pytest.raises(ChunkOrderError, match="missing"):
        asyncio.run(receive_payload(stream(chunks[:-1]), route, codec_lookup=codec_lookup))
    with pytest.raises(ChunkOrderError, match="after the last"):
        asyncio.run(receive_payload(stream([*chunks, chunks[-1]]), route, codec_lookup=codec_lookup))
    with pytest.raises(ChunkOrderError, match="first chunk"):
        asyncio.run(receive_payload(stream([]), route, codec_lookup=codec_lookup))
    assert issubclass(ChunkOrderError, ProtocolError)
