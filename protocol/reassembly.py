"""Receiving a payload: validate every chunk and hand out the whole shard, or nothing.

:class:`Reassembler` takes the chunks of one payload in order and checks, for every chunk:
size limit, protocol version, that the sender is one this stream expects, the signature, the
routing fields against a :class:`ShardExpectation` (round last, so that a genuine chunk from
another round is reported as stale or future), codec and declared sizes (the first chunk only:
later headers must equal the first but for ``chunk_index``), chunk order and byte counts. Only
after the last chunk, and only if the SHA-256 of all bytes equals the announced digest, the codec
accepts the payload and a float payload holds no NaN/Inf, is the :class:`Encoded` returned.

Every failure is a :class:`~lioncub.protocol.errors.ProtocolError`; after one, the reassembler
drops its buffer and refuses further chunks, so a partial shard can never leak out.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, Callable, Mapping
from dataclasses import dataclass

import torch

from lioncub.optim.codec import Codec, Encoded

from . import lioncub_pb2 as pb
from .errors import (
    ChunkOrderError,
    DigestMismatch,
    InvalidMessage,
    NotAMember,
    ProtocolError,
    SizeError,
    TooLarge,
)
from .framing import ShardKey
from .limits import DIGEST_BYTES, MAX_CHUNK_BYTES, MAX_NUMEL
from .signing import verify_chunk
from .validate import (
    CodecLookup,
    check_finite,
    check_round,
    check_run,
    check_version,
    check_weight,
    registry_codec,
    resolve_codec,
    show,
)

__all__ = ["Reassembler", "ShardExpectation", "receive_payload"]


@dataclass(frozen=True)
class ShardExpectation:
    """What the receiver of one payload stream accepts.

    Attributes:
        key: the payload's routing fields; the round must match exactly.
        senders: peer id -> raw Ed25519 public key of every peer allowed to send this payload.
        numel: exact element count (from the shard plan or state manifest); None accepts any
            count up to MAX_NUMEL.
        codecs: codec ids accepted; None accepts any codec the lookup knows.
        digest: the SHA-256 the payload must have (state downloads); None accepts the header's.
        max_payload_bytes: largest payload accepted (``RESOURCE_EXHAUSTED`` beyond); None: no
            limit beyond the sizes the codec produces for ``numel``.
    """

    key: ShardKey
    senders: Mapping[str, bytes]
    numel: int | None = None
    codecs: frozenset[str] | None = None
    digest: bytes | None = None
    max_payload_bytes: int | None = None


def _stream_fields(h: pb.ChunkHeader) -> tuple[object, ...]:
    """Every header field except ``chunk_index``: must not change within one payload."""
    return (
        h.protocol_version, h.run_id, h.round, h.group_id, h.sender_id, h.purpose, h.exchange,
        h.shard_index, h.codec, h.numel, h.payload_nbytes, h.payload_digest, h.chunk_total,
        h.weight, h.contributors,
    )  # fmt: skip


class Reassembler:
    """Accepts the chunks of one payload in order; :meth:`feed` returns it once complete."""

    def __init__(self, expect: ShardExpectation, *, codec_lookup: CodecLookup | None = None) -> None:
        self.expect = expect
        self._lookup: CodecLookup = codec_lookup or registry_codec
        self._codec: Codec | None = None
        self._first: pb.ChunkHeader | None = None
        self._fields: tuple[object, ...] = ()
        self._parts: list[bytes] = []  # the chunks' own bytes objects: one copy, at the end
        self._received = 0
        self._hasher = hashlib.sha256()
        self._next_index = 0
        self._result: Encoded | None = None
        self._error: ProtocolError | None = None

    @property
    def complete(self) -> bool:
        return self._result is not None

    @property
    def received_bytes(self) -> int:
        return self._received

    @property
    def received_chunks(self) -> int:
        return self._next_index

    @property
    def sender_id(self) -> str | None:
        """The (verified) sender of the payload, once its first chunk was accepted."""
        return None if self._first is None else self._first.sender_id

    def feed(self, chunk: pb.Chunk) -> Encoded | None:
        """Check and take one chunk; return the whole payload after its last chunk, else None."""
        if self._error is not None:
            raise InvalidMessage(f"stream already failed ({self._error}); no more chunks accepted")
        if self._result is not None:
            raise ChunkOrderError(
                f"chunk after the last one: payload was complete with {self._next_index} chunk(s)"
            )
        try:
            return self._feed(chunk)
        except ProtocolError as exc:
            self._error = exc
            self._parts, self._received = [], 0
            raise

    def finish(self) -> Encoded:
        """The payload; raise :class:`ChunkOrderError` if the stream ended before its last chunk."""
        if self._result is not None:
            return self._result
        if self._error is not None:
            raise InvalidMessage(f"stream failed: {self._error}")
        total = "?" if self._first is None else str(self._first.chunk_total)
        raise ChunkOrderError(f"stream ended after {self._next_index} of {total} chunk(s): missing chunks")

    # --- checks --------------------------------------------------------------------------------

    def _feed(self, chunk: pb.Chunk) -> Encoded | None:
        if not chunk.HasField("header"):
            raise InvalidMessage("chunk has no header")
        h = chunk.header
        if len(chunk.data) > MAX_CHUNK_BYTES:
            raise TooLarge(f"chunk carries {len(chunk.data)} bytes, at most {MAX_CHUNK_BYTES} allowed")
        check_version(h.protocol_version, "chunk")
        public_key = self.expect.senders.get(h.sender_id)
        if public_key is None:
            raise NotAMember(
                f"sender {show(h.sender_id)} may not send {self._describe()}"
                f" (expected one of {sorted(self.expect.senders)[:8]})"
            )
        verify_chunk(chunk, public_key)
        if self._first is None:
            self._check_first(h)
            self._first = h
            self._fields = _stream_fields(h)
        elif _stream_fields(h) != self._fields:
            raise InvalidMessage(f"chunk {h.chunk_index}'s header differs from the first chunk's")
        return self._take(h, chunk.data)

    def _describe(self) -> str:
        k = self.expect.key
        return f"shard {k.shard_index} of group {show(k.group_id)} round {k.round} ({k.exchange})"

    def _check_first(self, h: pb.ChunkHeader) -> None:
        want = self.expect.key
        got = ShardKey.of(h)
        check_run(h.run_id, want.run_id, "chunk")
        for field in ("group_id", "purpose", "exchange", "shard_index"):
            if getattr(got, field) != getattr(want, field):
                raise InvalidMessage(
                    f"chunk is for {field} {show(getattr(got, field))},"
                    f" this stream carries {field} {show(getattr(want, field))}"
                )
        check_round(h.round, want.round, "chunk")
        codec = resolve_codec(h.codec, self._lookup, self.expect.codecs)
        if h.numel > MAX_NUMEL:
            raise SizeError(f"element count {h.numel} exceeds the limit {MAX_NUMEL}")
        if self.expect.numel is not None and h.numel != self.expect.numel:
            raise SizeError(f"payload has {h.numel} elements, {self._describe()} has {self.expect.numel}")
        sizes = codec.valid_nbytes(h.numel)
        if h.payload_nbytes not in sizes:
            raise SizeError(
                f"codec {h.codec} encodes {h.numel} elements in {' or '.join(map(str, sizes))} bytes,"
                f" header says {h.payload_nbytes}"
            )
        limit = self.expect.max_payload_bytes
        if limit is not None and h.payload_nbytes > limit:
            raise TooLarge(f"payload of {h.payload_nbytes} bytes exceeds the limit of {limit}")
        min_chunks = max(1, -(-h.payload_nbytes // MAX_CHUNK_BYTES))
        max_chunks = max(1, h.payload_nbytes)  # every chunk of a non-empty payload has >= 1 byte
        if not min_chunks <= h.chunk_total <= max_chunks:
            raise SizeError(
                f"{h.chunk_total} chunk(s) cannot carry {h.payload_nbytes} bytes"
                f" (need {min_chunks}..{max_chunks})"
            )
        if len(h.payload_digest) != DIGEST_BYTES:
            raise InvalidMessage(
                f"payload digest has {len(h.payload_digest)} bytes, SHA-256 has {DIGEST_BYTES}"
            )
        if self.expect.digest is not None and h.payload_digest != self.expect.digest:
            raise DigestMismatch("payload digest differs from the one the manifest announced")
        check_weight("weight", h.weight)
        self._codec = codec

    def _take(self, h: pb.ChunkHeader, data: bytes) -> Encoded | None:
        if h.chunk_index < self._next_index:
            raise ChunkOrderError(f"duplicate chunk {h.chunk_index} (expected chunk {self._next_index})")
        if h.chunk_index > self._next_index:
            raise ChunkOrderError(
                f"chunk {h.chunk_index} out of order: chunk {self._next_index} is missing"
                f" (of {h.chunk_total})"
            )
        last = h.chunk_index == h.chunk_total - 1
        received = self._received + len(data)
        if received > h.payload_nbytes:
            raise SizeError(f"chunks carry more than the {h.payload_nbytes} bytes the header announced")
        if last and received != h.payload_nbytes:
            raise SizeError(
                f"last chunk leaves the payload at {received} of {h.payload_nbytes} bytes (truncated)"
            )
        if not last and (not data or received == h.payload_nbytes):
            raise SizeError(f"chunk {h.chunk_index} leaves no bytes for the {h.chunk_total} announced chunks")
        self._parts.append(data)
        self._received = received
        self._hasher.update(data)
        self._next_index += 1
        if not last:
            return None
        return self._complete(h)

    def _complete(self, h: pb.ChunkHeader) -> Encoded:
        if self._hasher.digest() != h.payload_digest:
            raise DigestMismatch(f"payload of {self._describe()} does not match its SHA-256 digest")
        assert self._codec is not None  # set with the first chunk
        buffer = bytearray().join(self._parts)
        self._parts = []
        data = torch.frombuffer(buffer, dtype=torch.uint8) if buffer else torch.empty(0, dtype=torch.uint8)
        encoded = Encoded(codec=h.codec, numel=h.numel, data=data)
        try:
            self._codec.check(encoded)
        except ValueError as exc:  # CodecError
            raise SizeError(f"codec {h.codec} rejects the payload: {exc}") from exc
        check_finite(encoded, self._codec)
        self._result = encoded
        return encoded


async def receive_payload(
    chunks: AsyncIterable[pb.Chunk],
    expect: ShardExpectation | Callable[[pb.ChunkHeader], ShardExpectation],
    *,
    codec_lookup: CodecLookup | None = None,
) -> tuple[Encoded, pb.ChunkHeader]:
    """Consume a whole chunk stream and return the payload and its (verified) first header.

    ``expect`` may be a callable that picks the expectation from the first chunk's header (for
    a servicer that routes by round / group / shard); it sees the header before any check and may
    raise a :class:`ProtocolError` itself (unknown group, stale round). Raises
    :class:`ChunkOrderError` if the stream ends early or continues after the last chunk.
    """
    reassembler: Reassembler | None = None
    result: Encoded | None = None
    first: pb.ChunkHeader | None = None
    async for chunk in chunks:
        if reassembler is None:
            first = chunk.header
            expectation = expect if isinstance(expect, ShardExpectation) else expect(chunk.header)
            reassembler = Reassembler(expectation, codec_lookup=codec_lookup)
        result = reassembler.feed(chunk)
    if reassembler is None or first is None:
        raise ChunkOrderError("stream ended before its first chunk")
    return (result if result is not None else reassembler.finish()), first
